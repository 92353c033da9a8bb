"""Drift scores checked against independent scipy/numpy computations on the same binned counts."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

from agent.spec import FeatureSpec
from aggregator.drift import (
    EPS,
    DriftScores,
    bin_points,
    feature_drift,
    js_distance,
    ks_binned,
    proportions,
    psi,
    wasserstein_binned,
)

REL = 1e-9
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- independent reference computations -------------------------------------------------------


def ref_proportions(counts) -> np.ndarray:
    """Clamp, normalize, floor at EPS, renormalize, written out in plain Python."""
    clamped = [max(float(c), 0.0) for c in counts]
    total = math.fsum(clamped)
    floored = [max(c / total, EPS) for c in clamped]
    s = math.fsum(floored)
    return np.array([f / s for f in floored])


def ref_psi(ref_counts, cur_counts) -> float:
    r, c = ref_proportions(ref_counts), ref_proportions(cur_counts)
    total = 0.0
    for ri, ci in zip(r, c, strict=True):
        total += (ci - ri) * math.log(ci / ri)
    return total


def ref_js(ref_counts, cur_counts) -> float:
    with np.errstate(invalid="ignore"):
        d = float(jensenshannon(ref_proportions(ref_counts), ref_proportions(cur_counts), base=2))
    return 0.0 if math.isnan(d) else d  # scipy gives NaN when rounding makes the divergence < 0


def ref_ks(ref_ordered, cur_ordered) -> float:
    r = np.clip(np.asarray(ref_ordered, dtype=float), 0, None)
    c = np.clip(np.asarray(cur_ordered, dtype=float), 0, None)
    cdf_r = np.cumsum(r) / r.sum()
    cdf_c = np.cumsum(c) / c.sum()
    return float(np.max(np.abs(cdf_r - cdf_c)))


def ref_points(edges) -> np.ndarray:
    e = list(edges)
    return np.array([e[0]] + [(a + b) / 2 for a, b in zip(e, e[1:], strict=False)] + [e[-1]])


def ref_w1(points, ref_ordered, cur_ordered) -> float:
    r = np.clip(np.asarray(ref_ordered, dtype=float), 0, None)
    c = np.clip(np.asarray(cur_ordered, dtype=float), 0, None)
    return float(wasserstein_distance(points, points, r, c))


def ref_std(points, ref_ordered) -> float:
    w = np.clip(np.asarray(ref_ordered, dtype=float), 0, None)
    mean = np.average(points, weights=w)
    return float(np.sqrt(np.average((points - mean) ** 2, weights=w)))


def close(actual: float, expected: float, abs_tol: float = 1e-15) -> bool:
    return math.isclose(actual, expected, rel_tol=REL, abs_tol=abs_tol)


def js_close(actual: float, expected: float) -> bool:
    # The distance is sqrt(divergence): near 0 it is ill-conditioned, so compare divergences.
    return math.isclose(actual**2, expected**2, rel_tol=REL, abs_tol=1e-14)


def bin_values(edges, values) -> np.ndarray:
    """Bin raw values into the numeric layout (last interior bin closed, NaN -> missing)."""
    edges = np.asarray(edges, dtype=float)
    values = np.asarray(values, dtype=float)
    missing = np.isnan(values)
    x = values[~missing]
    idx = np.searchsorted(edges, x, side="right")
    idx[x == edges[-1]] = len(edges) - 1
    ordered = np.bincount(idx, minlength=len(edges) + 1)
    return np.append(ordered, missing.sum()).astype(np.int64)


# -- strategies ------------------------------------------------------------------------------

count = st.one_of(st.just(0), st.integers(0, 30), st.integers(0, 100_000))
noisy_count = st.one_of(count, st.integers(-50, -1))


@st.composite
def numeric_case(draw, noisy: bool = True):
    m = draw(st.integers(1, 25))  # number of interior bins; m + 1 edges
    start = draw(st.floats(-1e3, 1e3, allow_nan=False))
    widths = draw(st.lists(st.floats(1e-3, 1e2, allow_nan=False), min_size=m, max_size=m))
    edges = start + np.concatenate(([0.0], np.cumsum(widths)))
    assume(np.all(np.diff(edges) > 0))
    n = m + 3
    ref = draw(st.lists(count, min_size=n, max_size=n))
    cur = draw(st.lists(noisy_count if noisy else count, min_size=n, max_size=n))
    assume(sum(ref) > 0 and sum(max(c, 0) for c in cur) > 0)
    feature = FeatureSpec(name="x", type="numeric", edges=tuple(edges),
                          reference_counts=tuple(ref))
    return feature, np.array(cur, dtype=np.int64)


@st.composite
def categorical_case(draw):
    k = draw(st.integers(1, 30))
    n = k + 2
    ref = draw(st.lists(count, min_size=n, max_size=n))
    cur = draw(st.lists(noisy_count, min_size=n, max_size=n))
    assume(sum(ref) > 0 and sum(max(c, 0) for c in cur) > 0)
    feature = FeatureSpec(name="c", type="categorical",
                          vocabulary=tuple(f"v{i}" for i in range(k)),
                          reference_counts=tuple(ref))
    return feature, np.array(cur, dtype=np.int64)


@st.composite
def count_pair(draw):
    n = draw(st.integers(1, 40))
    ref = draw(st.lists(noisy_count, min_size=n, max_size=n))
    cur = draw(st.lists(noisy_count, min_size=n, max_size=n))
    assume(sum(max(c, 0) for c in ref) > 0 and sum(max(c, 0) for c in cur) > 0)
    return np.array(ref, dtype=np.int64), np.array(cur, dtype=np.int64)


# -- agreement with independent computations -------------------------------------------------


@SETTINGS
@given(numeric_case())
def test_numeric_feature_matches_independent_computation(case):
    feature, cur = case
    ref = np.array(feature.reference_counts)
    s = feature_drift(feature, cur)

    clamped = np.clip(cur, 0, None)
    assert s.count == int(clamped.sum())
    assert close(s.missing_rate, clamped[-1] / clamped.sum())
    assert close(s.psi, ref_psi(ref, cur))
    assert js_close(s.js_distance, ref_js(ref, cur))

    ref_o, cur_o = ref[:-1], cur[:-1]
    if ref_o.sum() == 0 or clamped[:-1].sum() == 0:
        assert math.isnan(s.ks) and math.isnan(s.wasserstein) and math.isnan(s.wasserstein_norm)
        return
    points = ref_points(feature.edges)
    np.testing.assert_allclose(bin_points(feature), points, rtol=0, atol=0)
    span = points[-1] - points[0]
    assert close(s.ks, ref_ks(ref_o, cur_o), abs_tol=1e-14)
    w1 = ref_w1(points, ref_o, cur_o)
    assert close(s.wasserstein, w1, abs_tol=1e-13 * span)
    if np.count_nonzero(ref_o) == 1:  # one-point reference: std 0 (numpy may round to 1e-16)
        assert math.isnan(s.wasserstein_norm)
    else:
        std = ref_std(points, ref_o)
        assert close(s.wasserstein_norm, w1 / std, abs_tol=1e-13 * span / std)


@SETTINGS
@given(categorical_case())
def test_categorical_feature_matches_independent_computation(case):
    feature, cur = case
    ref = np.array(feature.reference_counts)
    s = feature_drift(feature, cur)
    clamped = np.clip(cur, 0, None)
    assert s.count == int(clamped.sum())
    assert close(s.missing_rate, clamped[-1] / clamped.sum())
    assert close(s.psi, ref_psi(ref, cur))
    assert js_close(s.js_distance, ref_js(ref, cur))
    assert math.isnan(s.ks) and math.isnan(s.wasserstein) and math.isnan(s.wasserstein_norm)


@SETTINGS
@given(count_pair())
def test_count_functions_match_independent_computation(pair):
    ref, cur = pair
    np.testing.assert_allclose(proportions(cur), ref_proportions(cur), rtol=REL, atol=0)
    assert close(psi(ref, cur), ref_psi(ref, cur))
    d = js_distance(ref, cur)
    assert 0.0 <= d <= 1.0
    assert js_close(d, ref_js(ref, cur))
    assert close(ks_binned(ref, cur), ref_ks(ref, cur), abs_tol=1e-14)
    points = np.arange(len(ref), dtype=float) * 0.5 - 3.0
    assert close(wasserstein_binned(points, ref, cur), ref_w1(points, ref, cur), abs_tol=1e-13)


def test_many_seeded_random_histograms():
    rng = np.random.default_rng(20240611)
    for _ in range(500):
        m = int(rng.integers(1, 60))
        edges = np.cumsum(rng.uniform(0.01, 5.0, m + 1)) - 10.0
        ref = rng.integers(0, 1000, m + 3) * (rng.random(m + 3) < 0.8)
        cur = rng.integers(-20, 1000, m + 3) * (rng.random(m + 3) < 0.8)
        ref[int(rng.integers(0, m + 3))] += 1
        cur[int(rng.integers(0, m + 3))] += 50
        feature = FeatureSpec(name="x", type="numeric", edges=tuple(edges),
                              reference_counts=tuple(int(r) for r in ref))
        s = feature_drift(feature, cur)
        assert close(s.psi, ref_psi(ref, cur))
        assert js_close(s.js_distance, ref_js(ref, cur))
        if ref[:-1].sum() > 0 and np.clip(cur[:-1], 0, None).sum() > 0:
            points = ref_points(edges)
            w1 = ref_w1(points, ref[:-1], cur[:-1])
            assert close(s.ks, ref_ks(ref[:-1], cur[:-1]), abs_tol=1e-14)
            assert close(s.wasserstein, w1, abs_tol=1e-12)
            if np.count_nonzero(ref[:-1]) == 1:
                assert math.isnan(s.wasserstein_norm)
            else:
                std = ref_std(points, ref[:-1])
                assert close(s.wasserstein_norm, w1 / std, abs_tol=1e-12)


def test_psi_explicit_small_example():
    ref = np.array([50, 30, 20])
    cur = np.array([20, 30, 50])
    expected = (0.2 - 0.5) * math.log(0.2 / 0.5) + 0.0 + (0.5 - 0.2) * math.log(0.5 / 0.2)
    assert close(psi(ref, cur), expected)


# -- properties --------------------------------------------------------------------------------


@SETTINGS
@given(numeric_case(noisy=False))
def test_identical_distributions_score_zero(case):
    feature, _ = case
    ref = np.array(feature.reference_counts, dtype=np.int64)
    s = feature_drift(feature, ref.copy())
    assert s.psi == 0.0 and s.js_distance == 0.0
    if ref[:-1].sum() > 0:
        assert s.ks == 0.0 and s.wasserstein == 0.0
        assert s.wasserstein_norm == 0.0 or math.isnan(s.wasserstein_norm)
    # A scaled copy is the same distribution, up to rounding.
    t = feature_drift(feature, ref * 7)
    assert t.psi < 1e-14 and t.js_distance < 1e-7
    if ref[:-1].sum() > 0:
        assert t.ks < 1e-14 and t.wasserstein < 1e-12


def test_identical_categorical_scores_zero():
    f = FeatureSpec(name="c", type="categorical", vocabulary=("a", "b", "c"),
                    reference_counts=(10, 0, 5, 3, 2))
    s = feature_drift(f, np.array([10, 0, 5, 3, 2]))
    assert s.psi == 0.0 and s.js_distance == 0.0
    assert s.count == 20 and s.missing_rate == 0.1


def test_shifted_normal_is_major_drift_and_binned_ks_tracks_raw_ks():
    rng = np.random.default_rng(7)
    reference = rng.normal(0.0, 1.0, 50_000)
    current = rng.normal(1.0, 1.0, 50_000)
    edges = np.quantile(reference, np.linspace(0.0, 1.0, 21))  # 20 equal-mass bins
    feature = FeatureSpec(name="x", type="numeric", edges=tuple(edges),
                          reference_counts=tuple(int(c) for c in bin_values(edges, reference)))
    s = feature_drift(feature, bin_values(edges, current))

    assert s.psi > 0.25
    raw_ks = ks_2samp(reference, current).statistic
    assert s.ks <= raw_ks + 1e-12  # the binned KS only looks at the edges
    assert raw_ks - s.ks < 0.05
    assert s.wasserstein_norm > 0.5
    assert s.count == 50_000 and s.missing_rate == 0.0

    # No drift: a second sample from the reference distribution.
    same = feature_drift(feature, bin_values(edges, rng.normal(0.0, 1.0, 50_000)))
    assert same.psi < 0.1
    assert same.ks < 0.02


def test_missing_rate_change_is_psi_and_js_drift_but_not_ks_or_wasserstein():
    edges = (0.0, 1.0, 2.0, 3.0)
    ref = (0, 100, 200, 100, 0, 0)
    f = FeatureSpec(name="x", type="numeric", edges=edges, reference_counts=ref)
    cur = np.array([0, 100, 200, 100, 0, 400])  # same values, half of them missing
    s = feature_drift(f, cur)
    assert s.missing_rate == 0.5
    assert s.psi > 0.25 and s.js_distance > 0.1
    assert s.ks == 0.0 and s.wasserstein == 0.0 and s.wasserstein_norm == 0.0


def test_negative_counts_are_clamped():
    f = FeatureSpec(name="x", type="numeric", edges=(0.0, 1.0, 2.0, 4.0),
                    reference_counts=(5, 40, 30, 20, 5, 10))
    noisy = np.array([-3, 50, -7, 25, 2, -1])
    s = feature_drift(f, noisy)
    assert s == feature_drift(f, np.clip(noisy, 0, None))
    assert s.count == 77
    assert s.missing_rate == 0.0
    np.testing.assert_array_equal(proportions(noisy), proportions(np.clip(noisy, 0, None)))
    assert ks_binned(noisy[:-1], f.reference_counts[:-1]) == ks_binned(
        np.clip(noisy[:-1], 0, None), f.reference_counts[:-1])


def test_js_distance_bounded_for_disjoint_supports():
    ref = np.array([1000, 0, 0, 0])
    cur = np.array([0, 0, 0, 1000])
    d = js_distance(ref, cur)
    assert 0.99 < d <= 1.0
    assert js_close(d, ref_js(ref, cur))
    f = FeatureSpec(name="c", type="categorical", vocabulary=("a", "b"),
                    reference_counts=(1000, 0, 0, 0))
    s = feature_drift(f, cur)
    assert 0.99 < s.js_distance <= 1.0
    assert s.psi > 0.25


def test_proportions_floor_and_renormalize():
    p = proportions(np.array([1_000_000, 0, -5, 0]))
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-15)
    assert np.all(p > 0)
    np.testing.assert_allclose(p[1:], EPS / (1 + 3 * EPS), rtol=1e-12)
    np.testing.assert_allclose(proportions(np.array([1, 1]), eps=0.0), [0.5, 0.5])


def test_categorical_scores():
    f = FeatureSpec(name="c", type="categorical", vocabulary=("a", "b", "c"),
                    reference_counts=(40, 30, 20, 5, 5))
    s = feature_drift(f, np.array([10, 30, 50, 5, 5]))
    assert isinstance(s, DriftScores)
    assert math.isnan(s.ks) and math.isnan(s.wasserstein) and math.isnan(s.wasserstein_norm)
    assert s.psi > 0 and 0 < s.js_distance < 1
    assert close(s.psi, ref_psi(f.reference_counts, [10, 30, 50, 5, 5]))


# -- empty inputs ------------------------------------------------------------------------------


def _all_nan(s: DriftScores) -> bool:
    values = [v for k, v in dataclasses.asdict(s).items() if k != "count"]
    return all(math.isnan(v) for v in values)


@pytest.mark.parametrize("current", [[0, 0, 0, 0, 0], [-1, 0, -4, 0, -2]])
def test_empty_current_gives_nan_and_zero_count(current):
    f = FeatureSpec(name="x", type="numeric", edges=(0.0, 1.0, 2.0),
                    reference_counts=(1, 2, 3, 4, 5))
    s = feature_drift(f, np.array(current))
    assert s.count == 0 and _all_nan(s)


@pytest.mark.parametrize("reference", [(), (0, 0, 0, 0, 0)])
def test_empty_reference_gives_nan_and_zero_count(reference):
    f = FeatureSpec(name="x", type="numeric", edges=(0.0, 1.0, 2.0), reference_counts=reference)
    s = feature_drift(f, np.array([1, 2, 3, 4, 5]))
    assert s.count == 0 and _all_nan(s)


def test_all_missing_current_has_nan_ks_and_wasserstein():
    f = FeatureSpec(name="x", type="numeric", edges=(0.0, 1.0, 2.0),
                    reference_counts=(1, 2, 3, 4, 5))
    s = feature_drift(f, np.array([0, 0, 0, 0, 9]))
    assert s.count == 9 and s.missing_rate == 1.0 and s.psi > 0.25
    assert math.isnan(s.ks) and math.isnan(s.wasserstein) and math.isnan(s.wasserstein_norm)


def test_count_functions_on_empty_side_are_nan():
    z, c = np.zeros(4, dtype=np.int64), np.array([1, 2, 3, 4])
    assert math.isnan(psi(z, c)) and math.isnan(js_distance(c, -c))
    assert math.isnan(ks_binned(c, z)) and math.isnan(wasserstein_binned(np.arange(4.0), z, c))
    with pytest.raises(ValueError, match="total is 0"):
        proportions(z)


# -- validation --------------------------------------------------------------------------------


def test_mismatched_lengths_raise():
    f = FeatureSpec(name="x", type="numeric", edges=(0.0, 1.0, 2.0),
                    reference_counts=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="expected 5 counts"):
        feature_drift(f, np.array([1, 2, 3, 4]))
    g = FeatureSpec(name="c", type="categorical", vocabulary=("a",), reference_counts=(1, 2, 3))
    with pytest.raises(ValueError, match="expected 3 counts"):
        feature_drift(g, np.array([1, 2, 3, 4]))
    a, b = np.array([1, 2, 3]), np.array([1, 2])
    for fn in (psi, js_distance, ks_binned):
        with pytest.raises(ValueError, match="does not match"):
            fn(a, b)
    with pytest.raises(ValueError, match="does not match"):
        wasserstein_binned(np.arange(3.0), a, b)
    with pytest.raises(ValueError, match="points"):
        wasserstein_binned(np.arange(2.0), a, a)


@pytest.mark.parametrize("bad", [
    np.array([[1, 2], [3, 4]]),
    np.array([], dtype=np.int64),
    np.array([1.0, np.nan, 2.0, 3.0]),
    np.array(["a", "b", "c", "d"]),
])
def test_malformed_counts_raise(bad):
    with pytest.raises(ValueError):
        psi(bad, bad)
    with pytest.raises(ValueError):
        proportions(bad)


def test_feature_drift_rejects_malformed_current():
    f = FeatureSpec(name="x", type="numeric", edges=(0.0, 1.0, 2.0),
                    reference_counts=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="whole numbers"):
        feature_drift(f, np.array([1.5, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="finite"):
        feature_drift(f, np.array([np.inf, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="1-D"):
        feature_drift(f, np.ones((5, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="eps"):
        proportions(np.array([1, 2]), eps=1.5)
