"""Tests for agent.spec: validation names the field, JSON round trip, the content hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import SpecError
from agent.spec import (
    BINARY,
    CATEGORICAL,
    DEFAULT_LABEL_LATENCY_EDGES,
    MULTICLASS,
    NO_NOISE,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)


def _spec(**overrides) -> Spec:
    fields = dict(
        model="detector",
        model_version="3",
        features=(
            FeatureSpec("brightness", NUMERIC, edges=(0.0, 0.25, 0.5, 1.0),
                        reference_counts=(1, 2, 3, 4, 5, 6)),
            FeatureSpec("scene", CATEGORICAL, vocabulary=("day", "night"),
                        reference_counts=(10, 20, 3, 0)),
        ),
        prediction=FeatureSpec("label", CATEGORICAL, vocabulary=("cat", "dog")),
        latency_reference_kll=b"\x01\x02\x03kll",
        window_length_s=60,
        reference_rows=36,
        created_unix_s=1_700_000_000,
    )
    fields.update(overrides)
    return Spec(**fields)


# -- FeatureSpec validation -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(type=NUMERIC, edges=(0, 1, 1)), "edges", "strictly increasing"),
        (dict(type=NUMERIC, edges=(2, 1)), "edges", "strictly increasing"),
        (dict(type=NUMERIC, edges=(0, math.nan, 2)), "edges", "finite"),
        (dict(type=NUMERIC, edges=(math.nan, math.nan)), "edges", "finite"),
        (dict(type=NUMERIC, edges=(0, math.inf)), "edges", "finite"),
        (dict(type=NUMERIC, edges=(0,)), "edges", "at least 2"),
        (dict(type=NUMERIC, edges=()), "edges", "at least 2"),
        (dict(type=NUMERIC, edges=tuple(range(1001))), "edges", "at most"),
        (dict(type=NUMERIC, edges=(0, 1), vocabulary=("a",)), "vocabulary", "no vocabulary"),
        (dict(type=CATEGORICAL, vocabulary=("a", "b", "a")), "vocabulary", "distinct"),
        # ints are stored as their str(): "1" and 1 are the same value
        (dict(type=CATEGORICAL, vocabulary=("1", 1)), "vocabulary", "distinct"),
        (dict(type=CATEGORICAL, vocabulary=()), "vocabulary", "needs a vocabulary"),
        (dict(type=CATEGORICAL, vocabulary=("a",), edges=(0, 1)), "edges", "no edges"),
        (dict(type="ordinal", edges=(0, 1)), "type", "ordinal"),
        (dict(type=NUMERIC, edges=(0, 1), reference_counts=(1, 2, 3)), "reference_counts",
         "expected 4 counts, got 3"),
        (dict(type=NUMERIC, edges=(0, 1), reference_counts=(1, 2, 3, 4, 5)), "reference_counts",
         "expected 4 counts, got 5"),
        (dict(type=CATEGORICAL, vocabulary=("a",), reference_counts=(1, -1, 0)),
         "reference_counts", "negative"),
    ],
)
def test_feature_validation_names_the_field(kwargs, field, words):
    with pytest.raises(SpecError) as info:
        FeatureSpec(name="f", **kwargs)
    assert info.value.field == f"features['f'].{field}"
    assert info.value.field in str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize("name", ["", "x" * 201])
def test_feature_name_is_validated(name):
    with pytest.raises(SpecError) as info:
        FeatureSpec(name=name, type=NUMERIC, edges=(0, 1))
    assert info.value.field.endswith(".name")


def test_feature_values_are_normalized():
    f = FeatureSpec("f", NUMERIC, edges=(0, 1, 2), reference_counts=(1.0, 2, 3, 4, 5))
    assert f.edges == (0.0, 1.0, 2.0) and all(type(e) is float for e in f.edges)
    assert f.reference_counts == (1, 2, 3, 4, 5)
    assert f.histogram_length == 5 and f.missing_index == 4
    c = FeatureSpec("c", CATEGORICAL, vocabulary=(0, 1, "x"))
    assert c.vocabulary == ("0", "1", "x")
    assert c.histogram_length == 5 and c.missing_index == 4


# -- Spec validation --------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, -60, 86401, 1.5, 60.0, "60", None, True])
def test_bad_window_length(length):
    with pytest.raises(SpecError) as info:
        _spec(window_length_s=length)
    assert info.value.field == "window_length_s"


@pytest.mark.parametrize("length", [1, 60, 86400])
def test_window_length_bounds_accepted(length):
    assert _spec(window_length_s=length).window_length_s == length


def test_duplicate_feature_names():
    f = FeatureSpec("dup", NUMERIC, edges=(0, 1))
    g = FeatureSpec("dup", CATEGORICAL, vocabulary=("a",))
    with pytest.raises(SpecError) as info:
        _spec(features=(f, g))
    assert info.value.field == "features"
    assert "distinct" in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("model", ""), ("model", None),
                                            ("model_version", ""), ("model_version", 3)])
def test_model_identity_validated(key, value):
    with pytest.raises(SpecError) as info:
        _spec(**{key: value})
    assert info.value.field == key


# -- JSON ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model", "model_version", "features"])
def test_missing_top_level_key(key):
    d = _spec().to_dict()
    del d[key]
    del d["hash"]
    with pytest.raises(SpecError) as info:
        Spec.from_json(json.dumps(d))
    assert info.value.field == key
    assert "missing" in str(info.value)


@pytest.mark.parametrize("key", ["name", "type"])
def test_missing_feature_key(key):
    d = _spec().to_dict()
    del d["features"][0][key]
    del d["hash"]
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    assert info.value.field == f"features.{key}"


@pytest.mark.parametrize("text", ["", "{", "{'model': 1}", "[1, 2", "nul"])
def test_bad_json(text):
    with pytest.raises(SpecError) as info:
        Spec.from_json(text)
    assert info.value.field == "spec"
    assert "not valid JSON" in str(info.value)


@pytest.mark.parametrize("text", ["[]", "1", "\"spec\"", "null"])
def test_json_not_an_object(text):
    with pytest.raises(SpecError) as info:
        Spec.from_json(text)
    assert info.value.field == "spec"


def test_features_must_be_a_list_of_objects():
    d = _spec().to_dict()
    del d["hash"]
    with pytest.raises(SpecError) as info:
        Spec.from_dict({**d, "features": "brightness"})
    assert info.value.field == "features"
    with pytest.raises(SpecError) as info:
        Spec.from_dict({**d, "features": [1]})
    assert info.value.field == "features"


def test_bad_base64_kll():
    d = _spec().to_dict()
    del d["hash"]
    d["latency_reference_kll"] = "not base64!"
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    assert info.value.field == "latency_reference_kll"


def test_bad_window_length_in_json():
    d = _spec().to_dict()
    del d["hash"]
    d["window_length_s"] = True
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    assert info.value.field == "window_length_s"


def test_bad_edge_value_in_json_names_the_feature():
    d = _spec().to_dict()
    del d["hash"]
    d["features"][0]["edges"] = [0, "a lot"]
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    assert "brightness" in info.value.field


def test_json_round_trip_preserves_equality_hash_and_created():
    spec = _spec()
    back = Spec.from_json(spec.to_json())
    assert back == spec
    assert back.hash == spec.hash
    assert back.created_unix_s == spec.created_unix_s
    assert back.latency_reference_kll == spec.latency_reference_kll
    assert back.prediction == spec.prediction


def test_save_and_load(tmp_path):
    spec = _spec(prediction=None)
    path = tmp_path / "spec.json"
    spec.save(path)
    back = Spec.load(path)
    assert back == spec and back.hash == spec.hash and back.prediction is None


_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
_finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def _features(draw, name):
    if draw(st.booleans()):
        edges = draw(st.lists(_finite, min_size=2, max_size=8, unique=True).map(sorted))
        edges = [e for i, e in enumerate(edges) if i == 0 or e != edges[i - 1]]  # -0.0 == 0.0
        if len(edges) < 2:
            edges = [0.0, 1.0]
        kind, vocab = NUMERIC, ()
    else:
        vocab = tuple(draw(st.lists(_names, min_size=1, max_size=6, unique=True)))
        kind, edges = CATEGORICAL, ()
    length = (len(edges) if kind == NUMERIC else len(vocab)) + 2
    counts = draw(st.one_of(st.just(()), st.lists(st.integers(0, 2**62), min_size=length,
                                                   max_size=length).map(tuple)))
    return FeatureSpec(name, kind, edges=tuple(edges), vocabulary=vocab, reference_counts=counts)


@st.composite
def specs(draw):
    names = draw(st.lists(_names, min_size=0, max_size=4, unique=True))
    return Spec(
        model=draw(_names),
        model_version=draw(_names),
        features=tuple(draw(_features(n)) for n in names),
        prediction=draw(st.one_of(st.none(), _features("prediction"))),
        latency_reference_kll=draw(st.binary(max_size=40)),
        window_length_s=draw(st.integers(1, 86400)),
        reference_rows=draw(st.integers(0, 2**62)),
        created_unix_s=draw(st.integers(0, 2**40)),
    )


@settings(max_examples=60, deadline=None)
@given(specs())
def test_json_round_trip_property(spec):
    back = Spec.from_json(spec.to_json())
    assert back == spec
    assert back.hash == spec.hash
    assert back.created_unix_s == spec.created_unix_s
    assert back.canonical_bytes() == spec.canonical_bytes()


# -- hash ---------------------------------------------------------------------------------------

def test_hash_is_sha256_of_canonical_bytes():
    spec = _spec()
    assert spec.hash == hashlib.sha256(spec.canonical_bytes()).hexdigest()
    assert len(spec.hash) == 64
    assert b"created_unix_s" not in spec.canonical_bytes()


def test_hash_ignores_created_unix_s():
    a = _spec(created_unix_s=1)
    b = _spec(created_unix_s=2_000_000_000)
    assert a.hash == b.hash
    assert a == b


def test_hash_independent_of_how_numbers_were_given():
    a = _spec(features=(FeatureSpec("x", NUMERIC, edges=(0, 1, 2)),))
    b = _spec(features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),))
    assert a.hash == b.hash


def _with_feature(spec: Spec, index: int, **changes) -> Spec:
    feats = list(spec.features)
    feats[index] = dataclasses.replace(feats[index], **changes)
    return dataclasses.replace(spec, features=tuple(feats))


_CHANGES = {
    "model": lambda s: dataclasses.replace(s, model="other"),
    "model_version": lambda s: dataclasses.replace(s, model_version="4"),
    "window_length_s": lambda s: dataclasses.replace(s, window_length_s=61),
    "reference_rows": lambda s: dataclasses.replace(s, reference_rows=37),
    "latency_reference_kll": lambda s: dataclasses.replace(s, latency_reference_kll=b"x"),
    "no latency_reference_kll": lambda s: dataclasses.replace(s, latency_reference_kll=b""),
    "prediction removed": lambda s: dataclasses.replace(s, prediction=None),
    "prediction vocabulary": lambda s: dataclasses.replace(
        s, prediction=FeatureSpec("label", CATEGORICAL, vocabulary=("cat", "cow"))),
    "feature order": lambda s: dataclasses.replace(s, features=s.features[::-1]),
    "feature removed": lambda s: dataclasses.replace(s, features=s.features[:1]),
    "feature name": lambda s: _with_feature(s, 0, name="brightness2"),
    "one edge": lambda s: _with_feature(s, 0, edges=(0.0, 0.25, 0.5000001, 1.0)),
    "reference count": lambda s: _with_feature(s, 0, reference_counts=(1, 2, 3, 4, 5, 7)),
    "reference counts dropped": lambda s: _with_feature(s, 0, reference_counts=()),
    "vocabulary order": lambda s: _with_feature(s, 1, vocabulary=("night", "day")),
    "vocabulary value": lambda s: _with_feature(s, 1, vocabulary=("day", "Night")),
    "privacy epsilon": lambda s: dataclasses.replace(
        s, privacy=PrivacySpec(epsilon_per_window=2.0)),
    "privacy off": lambda s: dataclasses.replace(s, privacy=PrivacySpec(mechanism=NO_NOISE)),
}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_hash_changes_with_any_content(change):
    spec = _spec()
    other = _CHANGES[change](spec)
    assert other.hash != spec.hash
    assert other != spec


def test_all_content_changes_give_distinct_hashes():
    hashes = {f(_spec()).hash for f in _CHANGES.values()} | {_spec().hash}
    assert len(hashes) == len(_CHANGES) + 1


# -- tampering ----------------------------------------------------------------------------------

def test_tampered_file_is_refused(tmp_path):
    spec = _spec()
    d = json.loads(spec.to_json())
    d["features"][0]["edges"][1] = 0.3  # edited after it was built; "hash" kept
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SpecError) as info:
        Spec.load(path)
    assert info.value.field == "hash"
    message = str(info.value)
    assert spec.hash in message  # what the file claims
    assert "edited" in message and "delete" in message
    # Deleting the claimed hash accepts the edit, and the hash is the new content's.
    del d["hash"]
    edited = Spec.from_dict(d)
    assert edited.feature("brightness").edges[1] == 0.3
    assert edited.hash != spec.hash


def test_tampered_hash_is_refused():
    d = _spec().to_dict()
    d["hash"] = "0" * 64
    with pytest.raises(SpecError) as info:
        Spec.from_dict(d)
    assert info.value.field == "hash"


def test_created_unix_s_may_be_edited_without_breaking_the_hash():
    d = _spec().to_dict()
    d["created_unix_s"] = 5
    assert Spec.from_dict(d).created_unix_s == 5


def test_feature_lookup():
    spec = _spec()
    assert spec.feature_names == ("brightness", "scene")
    assert spec.feature("scene").type == CATEGORICAL
    with pytest.raises(KeyError):
        spec.feature("nope")


# -- LabelSpec -----------------------------------------------------------------------------------

def test_label_free_spec_keeps_its_hash() -> None:
    # Computed with the spec code before labels existed (commit 30c6f2d): adding the `labels`
    # field must not change the hash of any spec without labels.
    assert _spec().hash == "6b80e0edd92c3253c00302c22a06e0db4af1ef599bb14e62f289bef5c5e467c4"
    assert "labels" not in _spec().to_dict()


def test_labels_change_the_hash_and_round_trip() -> None:
    labels = LabelSpec(BINARY, classes=("no", "yes"), threshold=0.3)
    spec = _spec(labels=labels)
    assert spec.hash != _spec().hash
    back = Spec.from_json(spec.to_json())
    assert back == spec and back.hash == spec.hash and back.labels == labels
    assert LabelSpec(BINARY, classes=("no", "yes")).threshold == 0.5
    assert _spec(labels=LabelSpec(BINARY, classes=("no", "yes"), threshold=0.4)).hash != spec.hash


def test_label_lengths_and_private_histograms() -> None:
    binary = LabelSpec(BINARY, classes=("n", "p"))
    assert (binary.confusion_length, binary.calibration_length, binary.residuals_length,
            binary.label_latency_length) == (9, 20, 0, len(DEFAULT_LABEL_LATENCY_EDGES) + 2)
    multi = LabelSpec(MULTICLASS, classes=("a", "b", "c"), calibration_edges=(0, 0.5, 1))
    assert (multi.confusion_length, multi.calibration_length) == (16, 4)
    reg = LabelSpec(REGRESSION, residual_edges=(-1, 0, 1))
    assert (reg.confusion_length, reg.calibration_length, reg.residuals_length) == (0, 0, 5)
    assert reg.calibration_edges == ()  # a regression spec carries no calibration
    # Every feature, the prediction, and the task's label histograms share the epsilon.
    assert _spec().private_histograms == 3
    assert _spec(labels=binary).private_histograms == 6
    assert _spec(labels=reg).private_histograms == 5


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(task="ranking"), "labels.task", "ranking"),
        (dict(task=BINARY, classes=("a",)), "labels.classes", "exactly 2"),
        (dict(task=BINARY, classes=("a", "b", "c")), "labels.classes", "exactly 2"),
        (dict(task=BINARY, classes=("a", "a")), "labels.classes", "distinct"),
        (dict(task=BINARY, classes=("a", "")), "labels.classes", "1-200"),
        (dict(task=MULTICLASS, classes=("a",)), "labels.classes", "2-100"),
        (dict(task=MULTICLASS, classes=tuple(map(str, range(101)))), "labels.classes", "2-100"),
        (dict(task=BINARY, classes=("a", "b"), threshold=1.5), "labels.threshold", "[0, 1]"),
        (dict(task=BINARY, classes=("a", "b"), threshold=math.nan), "labels.threshold", "[0, 1]"),
        (dict(task=BINARY, classes=("a", "b"), calibration_edges=(0.1, 1)),
         "labels.calibration_edges", "from 0 to 1"),
        (dict(task=BINARY, classes=("a", "b"), calibration_edges=(0, 0.9)),
         "labels.calibration_edges", "from 0 to 1"),
        (dict(task=BINARY, classes=("a", "b"), calibration_edges=(0, 0.5, 0.5, 1)),
         "labels.calibration_edges", "increasing"),
        (dict(task=BINARY, classes=("a", "b"), residual_edges=(0, 1)), "labels.residual_edges",
         "regression"),
        (dict(task=REGRESSION), "labels.residual_edges", "at least 2"),
        (dict(task=REGRESSION, residual_edges=(1, 0)), "labels.residual_edges", "increasing"),
        (dict(task=REGRESSION, residual_edges=(0, math.inf)), "labels.residual_edges",
         "finite"),
        (dict(task=REGRESSION, residual_edges=(0, 1), classes=("a",)), "labels.classes",
         "no classes"),
        (dict(task=REGRESSION, residual_edges=(0, 1), latency_edges=(-1, 0)),
         "labels.latency_edges", "at least 0"),
        (dict(task=REGRESSION, residual_edges=(0, 1), latency_edges=(5,)),
         "labels.latency_edges", "at least 2"),
        (dict(task=BINARY, classes=("a", "b"), latency_edges=(0, 10, 5)),
         "labels.latency_edges", "increasing"),
    ],
)
def test_label_spec_validation_names_the_field(kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError, match=re.escape(words)) as e:
        LabelSpec(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("labels,field", [
    ("binary", "labels"),
    ({"classes": ["a", "b"]}, "labels.task"),
    ({"task": "binary", "classes": ["a", "b"], "colour": 1}, "labels"),
])
def test_label_spec_from_bad_json(labels, field: str) -> None:
    d = _spec().to_dict()
    del d["hash"]
    d["labels"] = labels
    with pytest.raises(SpecError) as e:
        Spec.from_dict(d)
    assert e.value.field == field
