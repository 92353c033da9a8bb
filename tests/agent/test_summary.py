"""Tests for agent.summary: the Summary monoid (identity, associativity, commutativity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spec import BINARY, CATEGORICAL, NUMERIC, REGRESSION, FeatureSpec, LabelSpec, Spec
from agent.summary import _COUNTERS, KLL_K, LABEL_HISTOGRAMS, Summary, empty_kll

SPEC = Spec(
    model="m",
    model_version="1",
    features=(
        FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),
        FeatureSpec("c", CATEGORICAL, vocabulary=("a", "b", "c")),
    ),
    prediction=FeatureSpec("p", CATEGORICAL, vocabulary=("0", "1")),
)
NO_PREDICTION = Spec(model="m", model_version="1", features=SPEC.features)
LABELED = Spec(model="m", model_version="1", features=SPEC.features, prediction=SPEC.prediction,
               labels=LabelSpec(BINARY, classes=("0", "1"), calibration_edges=(0, 0.5, 1),
                                latency_edges=(0, 10, 100)))
REGRESSOR = Spec(model="m", model_version="1", features=SPEC.features,
                 labels=LabelSpec(REGRESSION, residual_edges=(-1, 0, 1)))

# Three summaries of at most 60 latencies each stay below k: the sketches are exact.
MAX_LATENCIES = 60
assert 3 * MAX_LATENCIES < KLL_K


def _kll(values) -> object:
    sk = empty_kll()
    if len(values):
        sk.update(np.asarray(values, dtype=np.float32))
    return sk


def _items(sketch) -> list[float]:
    return sorted(item for item, weight in sketch for _ in range(weight))


def _counter(name: str) -> st.SearchStrategy:
    """Integers, or integer-valued floats for float counters (their sums stay exact)."""
    values = st.integers(0, 2**40)
    if isinstance(Summary.__dataclass_fields__[name].default, float):
        return values.map(float)
    return values


@dataclass(frozen=True)
class Recipe:
    """What a Summary is made of, as plain data. Sketches still alive when the interpreter
    exits (held in parametrize lists, say) make nanobind print leak warnings, so tests build
    their summaries (and sketches) inside the test."""

    features: dict
    prediction: list | None
    latencies: list
    counters: dict
    labels: dict

    def build(self) -> Summary:
        return Summary(
            features={k: np.asarray(v, dtype=np.int64) for k, v in self.features.items()},
            prediction=None if self.prediction is None else np.asarray(self.prediction, np.int64),
            latency=_kll(self.latencies), **self.counters,
            **{k: np.asarray(v, dtype=np.int64) for k, v in self.labels.items()})


@st.composite
def summaries(draw, spec: Spec = SPEC, max_latencies: int = MAX_LATENCIES):
    counts = st.integers(0, 2**40)
    features = {f.name: draw(st.lists(counts, min_size=f.histogram_length,
                                      max_size=f.histogram_length))
                for f in spec.features}
    prediction = None
    if spec.prediction is not None:
        n = spec.prediction.histogram_length
        prediction = draw(st.lists(counts, min_size=n, max_size=n))
    lat = draw(st.lists(st.floats(0, 1e6, width=32), max_size=max_latencies))
    labels = {}
    if spec.labels is not None:
        # Noisy label counts may be negative: the monoid holds for any integers.
        noisy = st.integers(-2**40, 2**40)
        for name in spec.labels.histograms:
            n = spec.labels.histogram_length(name)
            labels[name] = draw(st.lists(noisy, min_size=n, max_size=n))
    return Recipe(features, prediction, lat, {name: draw(_counter(name)) for name in _COUNTERS},
                  labels)


def assert_same(a: Summary, b: Summary) -> None:
    """Exact equality, the latency sketch included (exact-mode sketches only)."""
    assert a == b
    assert a.features.keys() == b.features.keys()
    for name in a.features:
        assert a.features[name].dtype == np.int64
        assert a.features[name].tolist() == b.features[name].tolist()
    if a.prediction is None:
        assert b.prediction is None
    else:
        assert a.prediction.tolist() == b.prediction.tolist()
    for name in _COUNTERS:
        assert getattr(a, name) == getattr(b, name), name
    for name in LABEL_HISTOGRAMS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == np.int64 and x.tolist() == y.tolist(), name
    assert a.latency.n == b.latency.n
    assert _items(a.latency) == _items(b.latency)
    if not a.latency.is_empty():
        ranks = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
        assert a.latency.get_quantiles(ranks) == b.latency.get_quantiles(ranks)


def _snapshot(s: Summary) -> tuple:
    return ({k: v.tolist() for k, v in s.features.items()},
            None if s.prediction is None else s.prediction.tolist(),
            s.latency.n, _items(s.latency),  # (not the bytes: queries sort level 0 in place)
            tuple(getattr(s, n) for n in _COUNTERS),
            tuple(None if getattr(s, n) is None else getattr(s, n).tolist()
                  for n in LABEL_HISTOGRAMS))


# -- the monoid laws ---------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(summaries())
def test_zero_is_identity(s):
    s = s.build()
    zero = Summary.zero(SPEC)
    assert_same(zero.merge(s), s)
    assert_same(s.merge(zero), s)
    assert_same(zero.merge(zero), Summary.zero(SPEC))


@settings(max_examples=50, deadline=None)
@given(summaries(), summaries(), summaries())
def test_merge_is_associative(a, b, c):
    a, b, c = a.build(), b.build(), c.build()
    assert_same(a.merge(b).merge(c), a.merge(b.merge(c)))


@settings(max_examples=50, deadline=None)
@given(summaries(), summaries())
def test_merge_is_commutative(a, b):
    a, b = a.build(), b.build()
    assert_same(a.merge(b), b.merge(a))


@settings(max_examples=50, deadline=None)
@given(summaries(), summaries())
def test_merge_adds(a, b):
    a, b = a.build(), b.build()
    m = a.merge(b)
    for name in a.features:
        assert m.features[name].tolist() == (a.features[name] + b.features[name]).tolist()
    assert m.prediction.tolist() == (a.prediction + b.prediction).tolist()
    for name in _COUNTERS:
        assert getattr(m, name) == getattr(a, name) + getattr(b, name)
    assert _items(m.latency) == sorted(_items(a.latency) + _items(b.latency))


@settings(max_examples=40, deadline=None)
@given(summaries(NO_PREDICTION), summaries(NO_PREDICTION))
def test_laws_without_prediction(a, b):
    a, b = a.build(), b.build()
    assert_same(a.merge(b), b.merge(a))
    assert_same(a.merge(Summary.zero(NO_PREDICTION)), a)
    assert a.merge(b).prediction is None


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([LABELED, REGRESSOR]).flatmap(
    lambda spec: st.tuples(st.just(spec), summaries(spec), summaries(spec), summaries(spec))))
def test_laws_with_label_histograms(args):
    spec, a, b, c = args
    a, b, c = a.build(), b.build(), c.build()
    zero = Summary.zero(spec)
    assert_same(zero.merge(a), a)
    assert_same(a.merge(zero), a)
    assert_same(a.merge(b), b.merge(a))
    assert_same(a.merge(b).merge(c), a.merge(b.merge(c)))
    m = a.merge(b)
    for name in spec.labels.histograms:
        assert getattr(m, name).tolist() == (getattr(a, name) + getattr(b, name)).tolist()
    before = _snapshot(a)
    m.merge_in(a)
    for name in spec.labels.histograms:
        getattr(m, name)[0] += 1
    c2 = a.copy()
    getattr(c2, spec.labels.histograms[0])[0] += 1
    assert _snapshot(a) == before  # neither merge nor copy shares the label arrays


def test_label_histograms_of_different_specs_do_not_merge():
    with pytest.raises(ValueError, match="confusion"):
        Summary.zero(LABELED).merge(Summary.zero(SPEC))
    with pytest.raises(ValueError, match="confusion"):
        Summary.zero(SPEC).merge(Summary.zero(LABELED))
    other = Summary.zero(LABELED)
    other.calibration = np.zeros(6, np.int64)
    with pytest.raises(ValueError, match="calibration"):
        Summary.zero(LABELED).merge(other)


def test_zero_label_layout():
    z = Summary.zero(LABELED)
    assert z.confusion.tolist() == [0] * 9 and z.calibration.tolist() == [0] * 4
    assert z.label_latency.tolist() == [0] * 5 and z.residuals is None
    r = Summary.zero(REGRESSOR)
    assert r.residuals.tolist() == [0] * 5 and r.confusion is None and r.calibration is None
    assert Summary.zero(SPEC).label_histograms() == {}
    assert list(z.label_histograms()) == ["confusion", "calibration", "label_latency"]


@settings(max_examples=50, deadline=None)
@given(summaries(), summaries())
def test_merge_does_not_mutate_inputs(a, b):
    a, b = a.build(), b.build()
    before_a, before_b = _snapshot(a), _snapshot(b)
    m = a.merge(b)
    assert _snapshot(a) == before_a
    assert _snapshot(b) == before_b
    # nor is the result tied to them
    m.merge_in(a)
    m.features["x"][0] += 1
    m.latency.update(1.0)
    assert _snapshot(a) == before_a
    assert _snapshot(b) == before_b


@settings(max_examples=50, deadline=None)
@given(summaries())
def test_copy_is_independent(s):
    s = s.build()
    before = _snapshot(s)
    c = s.copy()
    assert_same(c, s)
    c.merge_in(s)
    c.latency.update(3.0)
    assert _snapshot(s) == before


def test_merge_in_updates_in_place():
    a = Summary.zero(SPEC)
    b = Summary.zero(SPEC)
    b.features["x"][1] = 3
    b.event_count = 3
    b.latency.update(2.0)
    a.merge_in(b)
    a.merge_in(b)
    assert a.features["x"].tolist() == [0, 6, 0, 0, 0]
    assert a.event_count == 6
    assert a.latency.n == 2


def test_big_sketches_merge_with_exact_n():
    rng = np.random.default_rng(0)
    parts = [rng.exponential(10.0, 5000).astype(np.float32) for _ in range(4)]
    summaries_ = []
    for p in parts:
        s = Summary.zero(SPEC)
        s.latency.update(p)
        summaries_.append(s)
    left = summaries_[0].merge(summaries_[1]).merge(summaries_[2]).merge(summaries_[3])
    right = summaries_[3].merge(summaries_[2].merge(summaries_[1].merge(summaries_[0])))
    assert left.latency.n == right.latency.n == 20000
    everything = np.sort(np.concatenate(parts))
    eps = left.latency.normalized_rank_error(False)
    for s in (left, right):
        for q in (0.1, 0.5, 0.9, 0.99):
            rank = np.searchsorted(everything, s.latency.get_quantile(q)) / everything.size
            assert abs(rank - q) <= 2 * eps


# -- different specs --------------------------------------------------------------------------

def _spec_of(*features, prediction=None) -> Spec:
    return Spec(model="m", model_version="1", features=features, prediction=prediction)


@pytest.mark.parametrize(
    "other_spec",
    [
        _spec_of(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0))),  # a feature fewer
        _spec_of(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),
                 FeatureSpec("d", CATEGORICAL, vocabulary=("a", "b", "c")),
                 prediction=SPEC.prediction),  # another feature name
        _spec_of(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0, 3.0)),
                 FeatureSpec("c", CATEGORICAL, vocabulary=("a", "b", "c")),
                 prediction=SPEC.prediction),  # more bins
        _spec_of(*SPEC.features),  # no prediction
        _spec_of(*SPEC.features,
                 prediction=FeatureSpec("p", CATEGORICAL, vocabulary=("0", "1", "2"))),
    ],
    ids=["fewer-features", "other-name", "more-bins", "no-prediction", "prediction-bins"],
)
def test_merging_different_specs_raises(other_spec):
    mine = Summary.zero(SPEC)
    other = Summary.zero(other_spec)
    with pytest.raises(ValueError):
        mine.merge(other)
    with pytest.raises(ValueError):
        other.merge(mine)
    assert_same(mine, Summary.zero(SPEC))  # merge() left its inputs alone


def test_zero_layout():
    z = Summary.zero(SPEC)
    assert {k: v.tolist() for k, v in z.features.items()} == {"x": [0] * 5, "c": [0] * 5}
    assert z.prediction.tolist() == [0] * 4
    assert z.latency.is_empty()
    assert all(getattr(z, n) == 0 for n in _COUNTERS)
    assert Summary.zero(NO_PREDICTION).prediction is None


def test_equality_sees_every_part():
    base = Summary.zero(SPEC)
    changed = []
    for name in _COUNTERS:
        s = base.copy()
        setattr(s, name, 1)
        changed.append(s)
    s = base.copy()
    s.features["c"][2] = 1
    changed.append(s)
    s = base.copy()
    s.prediction[0] = 1
    changed.append(s)
    s = base.copy()
    s.latency.update(1.0)
    changed.append(s)
    labeled = Summary.zero(LABELED)
    for name in LABELED.labels.histograms:
        s = labeled.copy()
        getattr(s, name)[0] = 1
        assert s != labeled
    assert labeled != Summary.zero(SPEC)
    for s in changed:
        assert s != base
    assert base == Summary.zero(SPEC)
    assert base != Summary.zero(NO_PREDICTION)
    assert base.__eq__(object()) is NotImplemented
