"""Tests for agent.window: window alignment and the per-event / batch accumulators."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spec import CATEGORICAL, NUMERIC, FeatureSpec, Spec
from agent.window import WindowAccumulator, window_start

SPEC = Spec(
    model="m",
    model_version="1",
    features=(
        FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),  # [under, [0,1), [1,2], over, missing]
        FeatureSpec("c", CATEGORICAL, vocabulary=("a", "b")),  # [a, b, other, missing]
    ),
    prediction=FeatureSpec("p", CATEGORICAL, vocabulary=("0", "1")),
    window_length_s=60,
)


def _acc(start: int = 0) -> WindowAccumulator:
    return WindowAccumulator(SPEC, start)


def _sorted_items(sketch) -> list[float]:
    return sorted(item for item, weight in sketch for _ in range(weight))


def _totals_match_events(s) -> None:
    for name, counts in s.features.items():
        assert counts.sum() == s.event_count, name
    if s.prediction is not None:
        assert s.prediction.sum() == s.event_count


# -- window_start -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("t", "length", "start"),
    [
        (0, 60, 0),
        (0.0, 60, 0),
        (59.999, 60, 0),
        (60, 60, 60),
        (60.0, 60, 60),
        (119.5, 60, 60),
        (-0.001, 60, -60),
        (-1e-12, 60, -60),
        (-60, 60, -60),
        (-60.5, 60, -120),
        (-61, 60, -120),
        (1_700_000_000.5, 60, 1_699_999_980),
        (1_700_000_000, 3600, 1_699_999_200),
        (3599.9, 3600, 0),
        (86399.99, 86400, 0),
        (7.5, 1, 7),
        (-7.5, 1, -8),
        (13, 7, 7),
    ],
)
def test_window_start(t, length, start):
    ws = window_start(t, length)
    assert ws == start
    assert type(ws) is int


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(-1e11, 1e11), st.integers(-(10**11), 10**11)),
       st.sampled_from([1, 7, 60, 300, 3600, 86400]))
def test_window_start_contains_t(t, length):
    ws = window_start(t, length)
    assert ws % length == 0
    assert ws <= t < ws + length


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**9), 10**9), st.sampled_from([1, 60, 3600]))
def test_window_start_just_below_a_boundary(k, length):
    boundary = float(k * length)
    assert window_start(boundary, length) == k * length
    assert window_start(math.nextafter(boundary, -math.inf), length) == (k - 1) * length


# -- per event ---------------------------------------------------------------------------------

def test_window_bounds():
    acc = _acc(120)
    assert (acc.start_unix_s, acc.end_unix_s) == (120, 180)
    s = acc.to_summary()
    assert s.event_count == 0 and s.report_count == 1
    assert all(c.sum() == 0 for c in s.features.values())


def test_observe_bins_each_feature():
    acc = _acc()
    acc.observe({"x": 0.5, "c": "a"}, "1", 3.0, False)
    acc.observe({"x": 2.0, "c": "zz"}, 0, 4.0, True)
    acc.observe({"x": -3, "c": "b"}, "7", None, False)
    s = acc.to_summary()
    assert s.features["x"].tolist() == [1, 1, 1, 0, 0]
    assert s.features["c"].tolist() == [1, 1, 1, 0]
    assert s.prediction.tolist() == [1, 1, 1, 0]
    assert (s.event_count, s.error_count, s.invalid_value_count) == (3, 1, 0)
    assert s.latency.n == 2


def test_missing_feature_goes_to_missing_bin():
    acc = _acc()
    acc.observe({}, None, None, False)
    acc.observe({"x": 1.5}, None, None, False)
    s = acc.to_summary()
    assert s.features["x"].tolist() == [0, 0, 1, 0, 1]
    assert s.features["c"].tolist() == [0, 0, 0, 2]
    assert s.prediction.tolist() == [0, 0, 0, 2]
    assert s.invalid_value_count == 0 and s.unknown_feature_count == 0


def test_unknown_feature_names_counted():
    acc = _acc()
    acc.observe({"x": 1.0, "zzz": 2, "yyy": "q"}, None, None, False)
    acc.observe({"X": 1.0}, None, None, False)  # names are case-sensitive
    s = acc.to_summary()
    assert s.unknown_feature_count == 3
    assert s.features["x"].tolist() == [0, 0, 1, 0, 1]


def test_unknown_feature_names_counted_in_batch():
    acc = _acc()
    acc.observe_batch({"x": np.ones(4), "zzz": np.ones(4), "yyy": np.ones(4)}, None, None,
                      None, 4)
    s = acc.to_summary()
    assert s.unknown_feature_count == 8
    assert s.features["c"].tolist() == [0, 0, 0, 4]


def test_invalid_values_counted():
    acc = _acc()
    acc.observe({"x": "abc", "c": 1.5}, {"p": 1}, None, False)
    acc.observe({"x": math.inf, "c": None}, None, None, False)
    s = acc.to_summary()
    assert s.invalid_value_count == 4  # "abc", 1.5, the dict prediction, inf
    assert s.features["x"].tolist() == [0, 0, 0, 0, 2]
    assert s.features["c"].tolist() == [0, 0, 0, 2]


@pytest.mark.parametrize("bad", [math.nan, -1.0, -1e-9, math.inf, -math.inf, "fast", object(),
                                 [1.0], 1e39, pytest.param(10**400, id="10**400")])
def test_invalid_latency_counted_not_sketched(bad):
    acc = _acc()
    acc.observe({"x": 1.0}, None, bad, False)
    acc.observe({"x": 1.0}, None, 5.0, False)
    acc.observe({"x": 1.0}, None, 0.0, False)  # zero is a latency
    s = acc.to_summary()
    assert s.invalid_value_count == 1
    assert s.latency.n == 2
    assert _sorted_items(s.latency) == [0.0, 5.0]
    _totals_match_events(s)


def test_invalid_latency_in_batch_counted_not_sketched():
    acc = _acc()
    lat = np.array([np.nan, -1.0, np.inf, 5.0, 0.0, 7.0])
    acc.observe_batch({"x": np.ones(6)}, None, lat, None, 6)
    s = acc.to_summary()
    assert s.invalid_value_count == 3
    assert _sorted_items(s.latency) == [0.0, 5.0, 7.0]


def test_garbage_latencies_in_batch_do_not_corrupt_the_window():
    acc = _acc()
    acc.observe_batch({"x": np.ones(4), "c": ["a"] * 4}, ["1"] * 4,
                      ["fast", "2.5", None, object()], None, 4)
    s = acc.to_summary()
    assert s.event_count == 4
    _totals_match_events(s)
    assert s.invalid_value_count == 2  # "fast" and the object; None is "not measured"
    assert _sorted_items(s.latency) == [2.5]


def test_batch_without_predictions_counts_them_missing():
    acc = _acc()
    acc.observe_batch({"x": np.arange(5.0)}, None, None, None, 5)
    s = acc.to_summary()
    assert s.prediction.tolist() == [0, 0, 0, 5]
    assert s.features["x"].tolist() == [0, 1, 2, 2, 0]
    assert s.features["c"].tolist() == [0, 0, 0, 5]
    _totals_match_events(s)


def test_errors_and_late():
    acc = _acc()
    acc.observe({}, None, None, True, late=True)
    acc.observe({}, None, None, False, late=False)
    acc.observe_batch({}, None, None, np.array([1, 0, 1, 1]), 4, late=True)
    acc.observe_batch({}, None, None, None, 3)
    s = acc.to_summary()
    assert s.event_count == 9
    assert s.error_count == 4
    assert s.late_event_count == 5


def test_many_latencies_all_sketched():
    # More than the 4096-value buffer: every value reaches the sketch (n is exact).
    acc = _acc()
    n = 3 * 4096 + 17
    for i in range(n):
        acc.observe({}, None, float(i), False)
    acc.observe_batch({}, None, np.arange(1000, dtype=np.float64), None, 1000)
    s = acc.to_summary()
    assert s.latency.n == n + 1000
    assert s.event_count == n + 1000
    assert s.latency.get_min_value() == 0.0
    assert s.latency.get_max_value() == float(n - 1)
    assert s.invalid_value_count == 0
    # the median of 0..n-1 plus 0..999, within the sketch's rank error
    values = np.concatenate([np.arange(n), np.arange(1000)])
    rank = np.searchsorted(np.sort(values), s.latency.get_quantile(0.5)) / values.size
    assert abs(rank - 0.5) < 0.03


def test_exactly_4096_latencies():
    acc = _acc()
    for i in range(4096):
        acc.observe({}, None, i, False)
    assert acc.to_summary().latency.n == 4096


# -- observe == observe_batch ------------------------------------------------------------------

_x = st.one_of(st.floats(-1, 3), st.sampled_from([0.0, 1.0, 2.0, math.nan, math.inf]),
               st.integers(-2, 4), st.none(), st.just("abc"))
_c = st.one_of(st.sampled_from(["a", "b", "c", ""]), st.integers(0, 2), st.none(),
               st.just(1.5), st.just(math.nan))
_p = st.one_of(st.sampled_from(["0", "1", "2"]), st.integers(0, 2), st.booleans(), st.none())
_lat = st.one_of(st.floats(0, 1e4, width=32), st.sampled_from([math.nan, -1.0, math.inf]),
                 st.just("bad"), st.none())


@st.composite
def _events(draw):
    n = draw(st.integers(1, 60))
    present = draw(st.sets(st.sampled_from(["x", "c", "extra"])))
    feats = {}
    if "x" in present:
        feats["x"] = draw(st.lists(_x, min_size=n, max_size=n))
    if "c" in present:
        feats["c"] = draw(st.lists(_c, min_size=n, max_size=n))
    if "extra" in present:
        feats["extra"] = [1.0] * n
    preds = draw(st.one_of(st.none(), st.lists(_p, min_size=n, max_size=n)))
    lats = draw(st.one_of(st.none(), st.lists(_lat, min_size=n, max_size=n)))
    errs = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    return n, feats, preds, lats, errs


def _object_array(values):
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


@settings(max_examples=80, deadline=None)
@given(_events(), st.booleans(), st.booleans())
def test_observe_and_observe_batch_agree(events, late, as_arrays):
    n, feats, preds, lats, errs = events
    one = _acc()
    for i in range(n):
        one.observe({k: v[i] for k, v in feats.items()},
                    None if preds is None else preds[i],
                    None if lats is None else lats[i],
                    False if errs is None else errs[i], late)
    batch = _acc()
    if as_arrays:
        feats = {k: _object_array(v) for k, v in feats.items()}
        preds = None if preds is None else _object_array(preds)
        lats = None if lats is None else _object_array(lats)
        errs = None if errs is None else np.asarray(errs)
    batch.observe_batch(feats, preds, lats, errs, n, late)
    a, b = one.to_summary(), batch.to_summary()
    assert a == b
    for name in a.features:
        assert a.features[name].tolist() == b.features[name].tolist()
    assert a.prediction.tolist() == b.prediction.tolist()
    assert (a.invalid_value_count, a.unknown_feature_count, a.late_event_count,
            a.error_count) == (b.invalid_value_count, b.unknown_feature_count,
                               b.late_event_count, b.error_count)
    assert _sorted_items(a.latency) == _sorted_items(b.latency)
    _totals_match_events(a)


def test_observe_and_batch_numeric_arrays_agree():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 1.0, 180)
    x[::17] = np.nan
    x[::31] = np.inf
    c = rng.choice(np.array(["a", "b", "q"]), 180)
    p = rng.integers(0, 3, 180)
    lat = rng.exponential(20.0, 180)  # < 200 values: exact sketch
    lat[::13] = -1
    one, batch = _acc(), _acc()
    for i in range(180):
        one.observe({"x": x[i], "c": c[i]}, p[i], lat[i], False)
    batch.observe_batch({"x": x, "c": c}, p, lat, None, 180)
    a, b = one.to_summary(), batch.to_summary()
    assert a == b
    assert a.invalid_value_count > 0
    assert a.latency.get_quantiles([0.1, 0.5, 0.9]) == b.latency.get_quantiles([0.1, 0.5, 0.9])


# -- the per-event loop's inlined numeric path ---------------------------------------------------

_EDGY = [-1.0, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0000000000000004, 3.0, -5, 0, 1, 2, 3, 10**400,
         -(10**400), math.nan, math.inf, -math.inf, True, False, np.float64(1.0),
         np.float64(2.0), np.int64(2), np.float32(math.nan), None, "1.0"]


@pytest.mark.parametrize("value", _EDGY, ids=repr)
def test_per_event_bin_is_the_binners(value):
    """The accumulator inlines NumericBinner.index for floats and ints in interior bins: every
    value lands where index() puts it and counts invalid as it says (last edge, NaN, infinities,
    ints beyond float range, bools, numpy scalars)."""
    acc = _acc()
    acc.observe({"x": value}, None, None, False)
    binner = dict(acc._binners)["x"]
    i, bad = binner.index(value)
    s = acc.to_summary()
    expected = [0] * 5
    expected[i] = 1
    assert s.features["x"].tolist() == expected
    assert s.invalid_value_count == int(bad)


def test_a_defaultdict_of_features_is_not_filled_in():
    from collections import defaultdict

    feats: defaultdict[str, float] = defaultdict(lambda: 1.5, {"x": 0.5})
    acc = _acc()
    acc.observe(feats, None, None, False)
    assert dict(feats) == {"x": 0.5}  # reading it did not insert "c"
    s = acc.to_summary()
    assert s.features["x"].tolist() == [0, 1, 0, 0, 0]
    assert s.features["c"].tolist() == [0, 0, 0, 1]  # absent: the missing bin
    assert s.unknown_feature_count == 0
