"""Tests for agent.wire: exact round trips between domain types and protobuf messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import SpecError
from agent.spec import (
    BINARY,
    CATEGORICAL,
    MULTICLASS,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    Spec,
)
from agent.summary import _COUNTERS, LABEL_HISTOGRAMS, Summary, empty_kll
from agent.wire import (
    ReportMeta,
    report_from_proto,
    report_to_proto,
    spec_from_proto,
    spec_to_proto,
    summary_from_proto,
    summary_to_proto,
)
from protos import fleetwatch_pb2 as pb

SPEC = Spec(
    model="detector",
    model_version="3",
    features=(
        FeatureSpec("brightness", NUMERIC, edges=(-0.5, 0.0, 0.1, 1e300),
                    reference_counts=(0, 1, 2, 3, 2**62, 5)),
        FeatureSpec("scene", CATEGORICAL, vocabulary=("day", "night", "ünïcödé"),
                    reference_counts=(1, 2, 3, 4, 5)),
    ),
    prediction=FeatureSpec("label", CATEGORICAL, vocabulary=("cat", "dog")),
    latency_reference_kll=b"\x00\x01binary\xff",
    window_length_s=300,
    reference_rows=12345,
    created_unix_s=1_700_000_123,
)


def _items(sketch) -> list[float]:
    return sorted(item for item, weight in sketch for _ in range(weight))


# -- summaries ----------------------------------------------------------------------------------

_count = st.integers(0, 2**62)


@st.composite
def summary_parts(draw, with_prediction=None):
    """Plain data for a Summary (sketches are built inside the tests)."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True))
    features = {n: draw(st.lists(_count, min_size=3, max_size=8)) for n in names}
    if with_prediction is None:
        with_prediction = draw(st.booleans())
    prediction = draw(st.lists(_count, min_size=3, max_size=6)) if with_prediction else None
    latencies = draw(st.lists(st.floats(0, 1e9, width=32), max_size=300))
    counters = {n: draw(_count.map(float) if isinstance(
        Summary.__dataclass_fields__[n].default, float) else _count) for n in _COUNTERS}
    return features, prediction, latencies, counters


def _build(parts) -> Summary:
    features, prediction, latencies, counters = parts
    sketch = empty_kll()
    if latencies:
        sketch.update(np.asarray(latencies, np.float32))
    return Summary(
        features={k: np.asarray(v, np.int64) for k, v in features.items()},
        prediction=None if prediction is None else np.asarray(prediction, np.int64),
        latency=sketch, **counters)


def _carried_by(message) -> list[str]:
    """The Summary counters a message type has a field for (a report is one window: it has
    no report_count, and aggregate-only counters are not in it)."""
    return [n for n in _COUNTERS if n in message.DESCRIPTOR.fields_by_name]


SUMMARY_COUNTERS = _carried_by(pb.Summary)
REPORT_COUNTERS = _carried_by(pb.WindowReport)


def test_every_counter_is_on_the_wire():
    assert SUMMARY_COUNTERS == list(_COUNTERS)
    assert {"event_count", "error_count", "late_event_count", "invalid_value_count",
            "unknown_feature_count", "spool_dropped_count"} <= set(REPORT_COUNTERS)


def _assert_exact(a: Summary, b: Summary, *, report_count: int | None = None) -> None:
    assert list(a.features) == list(b.features)  # order kept
    for name in a.features:
        assert b.features[name].dtype == np.int64
        assert a.features[name].tolist() == b.features[name].tolist()
    if a.prediction is None:
        assert b.prediction is None
    else:
        assert a.prediction.tolist() == b.prediction.tolist()
    counters = SUMMARY_COUNTERS if report_count is None else REPORT_COUNTERS
    for name in counters:
        assert getattr(b, name) == getattr(a, name), name
    if report_count is not None:
        assert b.report_count == report_count
    assert a.latency.n == b.latency.n
    assert bytes(a.latency.serialize()) == bytes(b.latency.serialize())
    if not a.latency.is_empty():
        ranks = [0.0, 0.01, 0.5, 0.99, 1.0]
        assert a.latency.get_quantiles(ranks) == b.latency.get_quantiles(ranks)


@settings(max_examples=60, deadline=None)
@given(summary_parts())
def test_summary_round_trip(parts):
    s = _build(parts)
    msg = summary_to_proto(s)
    back = summary_from_proto(pb.Summary.FromString(msg.SerializeToString()))
    _assert_exact(s, back)
    assert back == s


def test_summary_round_trip_negative_counts_survive():
    # sint64 on the wire; the aggregator validates, the conversion must not mangle them
    s = _build(({"x": [-1, 0, 2**63 - 1]}, [-(2**63), 1, 2], [], {n: 0 for n in _COUNTERS}))
    back = summary_from_proto(pb.Summary.FromString(summary_to_proto(s).SerializeToString()))
    _assert_exact(s, back)


def test_empty_summary_round_trip():
    z = Summary.zero(SPEC)
    back = summary_from_proto(summary_to_proto(z))
    _assert_exact(z, back)
    assert back.latency.is_empty()
    nopred = Summary.zero(dataclasses.replace(SPEC, prediction=None))
    back = summary_from_proto(summary_to_proto(nopred))
    assert back.prediction is None


def test_summary_from_proto_uses_the_given_loader():
    s = _build(({"x": [1, 2, 3]}, None, [1.0, 2.0], {n: 1 for n in _COUNTERS}))
    seen = []

    def load(data: bytes):
        seen.append(bytes(data))
        return type(s.latency).deserialize(data)

    summary_from_proto(summary_to_proto(s), load_kll=load)
    assert seen == [bytes(s.latency.serialize())]


# -- reports ------------------------------------------------------------------------------------

def _meta(**overrides) -> ReportMeta:
    fields = dict(
        device_id="cam-0042",
        model="detector",
        model_version="3",
        labels={"region": "eu", "hw": "jetson"},
        window_start_unix_s=1_699_999_980,
        window_length_s=60,
        seq=2**63 + 5,
        spec_hash=SPEC.hash,
        created_unix_ms=1_700_000_000_123,
        agent_version="fleetwatch-agent/0.1.0",
    )
    fields.update(overrides)
    return ReportMeta(**fields)


@settings(max_examples=60, deadline=None)
@given(summary_parts(),
       st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=4),
       st.integers(-(2**62), 2**62), st.integers(0, 2**64 - 1))
def test_report_round_trip(parts, labels, window_start, seq):
    s = _build(parts)
    s.report_count = 1  # a report is one window
    meta = _meta(labels=labels, window_start_unix_s=window_start, seq=seq)
    data = report_to_proto(meta, s).SerializeToString()
    back_meta, back = report_from_proto(pb.WindowReport.FromString(data))
    assert back_meta == meta
    _assert_exact(s, back, report_count=1)


def test_report_count_is_always_one():
    s = _build(({"x": [1, 2, 3]}, [0, 1, 0], [5.0], {n: 7 for n in _COUNTERS}))
    meta, back = report_from_proto(report_to_proto(_meta(), s))
    assert back.report_count == 1
    assert back.event_count == 7 and back.spool_dropped_count == 7


def test_report_meta_fields_on_the_wire():
    s = Summary.zero(SPEC)
    msg = report_to_proto(_meta(), s)
    assert msg.device_id == "cam-0042"
    assert dict(msg.labels) == {"region": "eu", "hw": "jetson"}
    assert msg.spec_hash == SPEC.hash
    assert [f.name for f in msg.features] == ["brightness", "scene"]
    assert list(msg.features[0].histogram.counts) == [0] * 6
    assert msg.HasField("prediction")
    msg = report_to_proto(_meta(), Summary.zero(dataclasses.replace(SPEC, prediction=None)))
    assert not msg.HasField("prediction")
    assert report_from_proto(msg)[1].prediction is None


# -- specs --------------------------------------------------------------------------------------

def test_spec_round_trip():
    msg = spec_to_proto(SPEC)
    assert msg.hash == SPEC.hash
    back = spec_from_proto(pb.Spec.FromString(msg.SerializeToString()))
    assert back == SPEC
    assert back.hash == SPEC.hash
    assert back.created_unix_s == SPEC.created_unix_s
    assert back.prediction == SPEC.prediction
    assert back.latency_reference_kll == SPEC.latency_reference_kll


def test_spec_round_trip_without_prediction_or_kll():
    spec = dataclasses.replace(SPEC, prediction=None, latency_reference_kll=b"",
                               created_unix_s=0)
    back = spec_from_proto(pb.Spec.FromString(spec_to_proto(spec).SerializeToString()))
    assert back == spec and back.hash == spec.hash and back.prediction is None


_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10)


@st.composite
def _feature(draw, name):
    if draw(st.booleans()):
        edges = sorted(set(draw(st.lists(st.floats(allow_nan=False, allow_infinity=False),
                                         min_size=2, max_size=6))) | {0.0})
        edges = [e for i, e in enumerate(edges) if i == 0 or e != edges[i - 1]]
        if len(edges) < 2:
            edges = [0.0, 1.0]
        return FeatureSpec(name, NUMERIC, edges=tuple(edges))
    vocab = tuple(draw(st.lists(_names, min_size=1, max_size=5, unique=True)))
    counts = draw(st.one_of(st.just(()), st.lists(_count, min_size=len(vocab) + 2,
                                                   max_size=len(vocab) + 2).map(tuple)))
    return FeatureSpec(name, CATEGORICAL, vocabulary=vocab, reference_counts=counts)


@st.composite
def specs(draw):
    names = draw(st.lists(_names, max_size=4, unique=True))
    return Spec(
        model=draw(_names),
        model_version=draw(_names),
        features=tuple(draw(_feature(n)) for n in names),
        prediction=draw(st.one_of(st.none(), _feature("prediction"))),
        latency_reference_kll=draw(st.binary(max_size=30)),
        window_length_s=draw(st.integers(1, 86400)),
        reference_rows=draw(st.integers(0, 2**62)),
        created_unix_s=draw(st.integers(0, 2**40)),
    )


@settings(max_examples=60, deadline=None)
@given(specs())
def test_spec_round_trip_property(spec):
    back = spec_from_proto(pb.Spec.FromString(spec_to_proto(spec).SerializeToString()))
    assert back == spec
    assert back.hash == spec.hash
    assert back.created_unix_s == spec.created_unix_s


def test_tampered_proto_hash_is_refused():
    msg = spec_to_proto(SPEC)
    msg.hash = "0" * 64
    with pytest.raises(SpecError) as info:
        spec_from_proto(msg)
    assert info.value.field == "hash"


def test_tampered_proto_content_is_refused():
    msg = spec_to_proto(SPEC)
    msg.features[0].edges[1] = 0.01  # the claimed hash is the original's
    with pytest.raises(SpecError) as info:
        spec_from_proto(msg)
    assert info.value.field == "hash"
    assert SPEC.hash in str(info.value)
    msg = spec_to_proto(SPEC)
    msg.window_length_s = 60
    with pytest.raises(SpecError):
        spec_from_proto(msg)


def test_proto_without_hash_is_accepted_and_hashed():
    msg = spec_to_proto(SPEC)
    msg.hash = ""
    assert spec_from_proto(msg).hash == SPEC.hash


def test_proto_with_unknown_feature_type_is_refused():
    msg = spec_to_proto(SPEC)
    msg.features[1].type = pb.FEATURE_TYPE_UNSPECIFIED
    with pytest.raises(SpecError) as info:
        spec_from_proto(msg)
    assert info.value.field == "features['scene'].type"


def test_invalid_proto_spec_is_refused_with_the_field():
    msg = spec_to_proto(SPEC)
    msg.hash = ""
    msg.features[0].edges[2] = -1.0  # not increasing
    with pytest.raises(SpecError) as info:
        spec_from_proto(msg)
    assert info.value.field == "features['brightness'].edges"


# -- ground truth and heartbeats ----------------------------------------------------------------

@pytest.mark.parametrize("labels", [
    LabelSpec(BINARY, classes=("no", "yes"), threshold=0.25),
    LabelSpec(MULTICLASS, classes=("cat", "dog", "ünï"), calibration_edges=(0, 0.3, 1),
              latency_edges=(0, 5, 60)),
    LabelSpec(REGRESSION, residual_edges=(-3.5, 0, 1e-9, 2)),
])
def test_spec_with_labels_round_trip(labels):
    spec = dataclasses.replace(SPEC, labels=labels)
    msg = pb.Spec.FromString(spec_to_proto(spec).SerializeToString())
    assert msg.HasField("labels") and msg.hash == spec.hash
    back = spec_from_proto(msg)
    assert back == spec and back.hash == spec.hash and back.labels == labels
    assert not spec_to_proto(SPEC).HasField("labels")
    assert spec_from_proto(spec_to_proto(SPEC)).labels is None


def test_spec_with_unknown_label_task_is_refused():
    msg = spec_to_proto(dataclasses.replace(SPEC, labels=LabelSpec(BINARY, classes=("a", "b"))))
    msg.labels.task = 99
    msg.hash = ""
    with pytest.raises(SpecError) as e:
        spec_from_proto(msg)
    assert e.value.field == "labels.task"
    msg.labels.task = pb.LABEL_TASK_BINARY
    del msg.labels.classes[:]
    with pytest.raises(SpecError) as e:
        spec_from_proto(msg)
    assert e.value.field == "labels.classes"


def _labeled_summary() -> Summary:
    s = _build(({"x": [1, 2, 3]}, [0, 3, 0], [4.0, 5.0], {n: 3 for n in _COUNTERS}))
    s.confusion = np.asarray([5, -1, 0, 2**62, 0, 1, 0, 0, 0], np.int64)  # noisy counts
    s.calibration = np.asarray([1, 2, 3, -4], np.int64)
    s.label_latency = np.asarray([0, 7, 1, 0, 0], np.int64)
    s.labeled_count, s.clamped_label_count = 9, 2
    s.labels_unmatched_count, s.label_cache_evicted_count = 4, 5
    return s


def test_summary_round_trip_with_label_histograms():
    s = _labeled_summary()
    s.heartbeat_count, s.label_histogram_count = 11, 7
    back = summary_from_proto(pb.Summary.FromString(summary_to_proto(s).SerializeToString()))
    _assert_exact(s, back)
    for name in LABEL_HISTOGRAMS:
        mine, theirs = getattr(s, name), getattr(back, name)
        assert (mine is None and theirs is None) or mine.tolist() == theirs.tolist(), name
    assert back.residuals is None
    assert back == s


def test_report_carries_labels_and_derives_the_label_histogram_count():
    s = _labeled_summary()
    s.report_count = 1
    msg = pb.WindowReport.FromString(report_to_proto(_meta(), s).SerializeToString())
    assert (msg.labeled_count, msg.clamped_label_count) == (9, 2)
    assert (msg.labels_unmatched_count, msg.label_cache_evicted_count) == (4, 5)
    assert not msg.heartbeat and not msg.HasField("residuals")
    meta, back = report_from_proto(msg)
    assert not meta.heartbeat
    assert back.confusion.tolist() == s.confusion.tolist()
    assert back.calibration.tolist() == s.calibration.tolist()
    assert back.label_latency.tolist() == s.label_latency.tolist()
    assert back.label_histogram_count == 7 and back.heartbeat_count == 0
    # Withheld: nothing private leaves the device, the label counts still do.
    msg = report_to_proto(_meta(private_withheld=True), s)
    assert not any(msg.HasField(n) for n in LABEL_HISTOGRAMS)
    assert msg.labeled_count == 9
    _, back = report_from_proto(msg)
    assert back.label_histogram_count == 0 and back.confusion is None


def test_heartbeat_report_carries_no_histograms_and_no_sketch():
    s = _labeled_summary()
    msg = report_to_proto(_meta(heartbeat=True), s)
    assert msg.heartbeat
    assert not msg.features and not msg.HasField("prediction")
    assert not any(msg.HasField(n) for n in LABEL_HISTOGRAMS)
    assert msg.latency_kll == b""
    meta, back = report_from_proto(pb.WindowReport.FromString(msg.SerializeToString()))
    assert meta.heartbeat and back.heartbeat_count == 1
    assert back.histogram_event_count == 0 and back.label_histogram_count == 0
    assert back.latency.is_empty()
