"""Significance of drift scores: vectorized scores, calibration, power, noise floor, cache.

Statistical tests are seeded, so they are deterministic; each tolerance is chosen so that the
check would also pass for almost every other seed (the justification is next to each test).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import norm

from agent.spec import FeatureSpec
from aggregator.drift import (
    bin_points,
    feature_drift,
    js_distance,
    ks_binned,
    psi,
    suppress_noise,
    wasserstein_binned,
)
from aggregator.significance import (
    NullModel,
    Significance,
    SignificanceCache,
    _noise,
    batch_js_distance,
    batch_ks,
    batch_psi,
    batch_wasserstein,
    count_bucket,
    draw_null_histograms,
    expected_null_psi,
    insufficient_data,
    is_drifting,
    min_detectable_psi,
    noise_bucket,
    p_value,
    simulate_null,
)

B_LAPLACE = 10.0
Q = math.exp(-1.0 / B_LAPLACE)
LAPLACE_VAR = 2.0 * Q / (1.0 - Q) ** 2  # one device's discrete Laplace variance at b = 10: ~200

EDGES = tuple(float(e) for e in norm.ppf(np.linspace(0.1, 0.9, 9)))  # 10 equal-mass bins


def discrete_laplace(rng: np.random.Generator, devices: int, shape: tuple[int, ...]) -> np.ndarray:
    """The summed noise of `devices` reports: each a discrete Laplace(b = 10) per bin.

    A discrete Laplace variable is the difference of two i.i.d. geometric ones.
    """
    p = 1.0 - Q
    g1 = rng.geometric(p, size=(devices, *shape))
    g2 = rng.geometric(p, size=(devices, *shape))
    return (g1 - g2).sum(axis=0)


def normal_feature(props: np.ndarray, rows: int, name: str = "x") -> FeatureSpec:
    """A numeric feature on EDGES ([under, 8 bins, over, missing]) with reference `props`."""
    counts = np.rint(np.asarray(props) * rows).astype(int)
    return FeatureSpec(name, "numeric", edges=EDGES, reference_counts=tuple(counts))


def histogram(values: np.ndarray) -> np.ndarray:
    """Counts of `values` in the EDGES layout (no missing values)."""
    idx = np.searchsorted(np.asarray(EDGES), values, side="right")
    ordered = np.bincount(idx, minlength=len(EDGES) + 1)
    return np.r_[ordered, 0]


P_MISS = np.r_[np.full(10, 0.098), 0.02]  # 10 equal-mass bins, 2% missing
P_NO_MISS = np.r_[np.full(10, 0.1), 0.0]  # 10 equal-mass bins, nothing missing


# -- vectorized scores agree with drift.py -----------------------------------------------------


def test_batch_scores_match_drift_on_random_inputs() -> None:
    """Row-wise batch scores equal drift.py's scalar functions to 1e-9.

    Inputs include zeros, negative (noisy) counts, near-empty and all-non-positive rows (NaN
    on both sides), and bins far below the EPS floor.
    """
    rng = np.random.default_rng(1)
    for trial in range(60):
        b = int(rng.integers(2, 40))
        ref = rng.integers(0, 1000, size=b) * (rng.random(b) < 0.8)
        if trial % 7 == 0:
            ref[0] = 10**7  # the other bins fall below EPS
        scale = [1, 10, 1000, 10**5][trial % 4]
        cur = rng.integers(-scale, 3 * scale, size=(25, b))
        cur[0] = -np.abs(cur[0])  # all non-positive: NaN
        cur[1, :] = 0
        cur[1, -1] = 1  # a single event
        pts = np.sort(rng.normal(size=b)) * 10.0
        got = {
            "psi": batch_psi(ref, cur),
            "js": batch_js_distance(ref, cur),
            "ks": batch_ks(ref, cur),
            "w": batch_wasserstein(pts, ref, cur),
        }
        want = {
            "psi": [psi(ref, row) for row in cur],
            "js": [js_distance(ref, row) for row in cur],
            "ks": [ks_binned(ref, row) for row in cur],
            "w": [wasserstein_binned(pts, ref, row) for row in cur],
        }
        for name in got:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12,
                                       equal_nan=True, err_msg=name)
        # A batch of references against a batch of currents (the simulation's shape).
        refs = rng.integers(0, 50, size=(25, b))
        np.testing.assert_allclose(batch_psi(refs, cur),
                                   [psi(r, c) for r, c in zip(refs, cur, strict=True)],
                                   rtol=1e-9, atol=1e-12, equal_nan=True)


def test_batch_wasserstein_sorts_unsorted_points() -> None:
    rng = np.random.default_rng(2)
    pts = rng.normal(size=12)
    ref = rng.integers(0, 100, size=12)
    cur = rng.integers(-5, 100, size=(10, 12))
    np.testing.assert_allclose(batch_wasserstein(pts, ref, cur),
                               [wasserstein_binned(pts, ref, row) for row in cur],
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("numeric", [True, False])
def test_simulated_null_scores_are_feature_drift_scores(numeric: bool) -> None:
    """simulate_null's samples are exactly feature_drift's scores of the drawn histograms."""
    if numeric:
        feature = normal_feature(P_MISS, 5000)
    else:
        feature = FeatureSpec("c", "categorical", vocabulary=("a", "b", "c"),
                              reference_counts=(500, 300, 150, 40, 10))
    model = NullModel.for_feature(feature, 300, 150.0)
    reference, current = draw_null_histograms(model, 200, seed=7)
    null = simulate_null(model, 200, seed=7)
    scores = [feature_drift(FeatureSpec(feature.name, feature.type, feature.edges,
                                        feature.vocabulary, tuple(int(x) for x in ref)), cur)
              for ref, cur in zip(reference, current, strict=True)]

    def sort(xs: list[float]) -> np.ndarray:
        return np.sort(np.where(np.isnan(xs), np.inf, xs))

    np.testing.assert_allclose(null.psi, sort([s.psi for s in scores]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(null.js, sort([s.js_distance for s in scores]), rtol=1e-9,
                               atol=1e-12)
    if numeric:
        assert null.ks is not None and null.wasserstein is not None
        np.testing.assert_allclose(null.ks, sort([s.ks for s in scores]), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(null.wasserstein, sort([s.wasserstein for s in scores]),
                                   rtol=1e-9, atol=1e-12)
    else:
        assert null.ks is None and null.wasserstein is None


def test_simulation_is_fast() -> None:
    """400 samples x 25 bins in < 20 ms (best of 5; typically ~3 ms)."""
    edges = tuple(float(e) for e in norm.ppf(np.linspace(0.04, 0.96, 23)))  # 25 bins
    feature = FeatureSpec("f", "numeric", edges=edges,
                          reference_counts=tuple([4000] * 24 + [100]))
    model = NullModel.for_feature(feature, 5000, 2000.0)
    simulate_null(model, 400, 0)  # warm up
    best = math.inf
    for seed in range(5):
        t0 = time.perf_counter()
        simulate_null(model, 400, seed)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.020, f"{best * 1e3:.1f} ms"


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_noise_has_the_requested_variance(kind: str) -> None:
    """Rounded noise has variance V + ~1/12; 200 000 draws give a ~0.3% standard error."""
    e = _noise(np.random.default_rng(3), 200.0, (200_000,), kind)  # type: ignore[arg-type]
    assert np.all(e == np.round(e))
    assert abs(e.mean()) < 0.2
    assert e.var() == pytest.approx(200.0 + 1 / 12, rel=0.02)


# -- p-values ----------------------------------------------------------------------------------


def test_p_value_rule() -> None:
    null = np.sort(np.array([0.1, 0.2, 0.3, np.inf]))  # one empty simulated histogram
    assert p_value(null, 0.25) == pytest.approx(3 / 5)  # 0.3 and inf are >= 0.25
    assert p_value(null, 0.3) == pytest.approx(3 / 5)  # ties count
    assert p_value(null, 10.0) == pytest.approx(2 / 5)  # only the empty draw (inf) is >= 10
    assert p_value(null, 0.0) == pytest.approx(1.0)
    assert math.isnan(p_value(null, math.nan))
    assert math.isnan(p_value(None, 0.1))


# -- calibration under the null ----------------------------------------------------------------


def test_p_values_are_calibrated_under_the_null() -> None:
    """Null cohorts: 20 000 events from the reference, 200 devices' discrete Laplace noise.

    Each draw uses a fresh cache seed, so the draws' p-values are independent (each with its
    own simulated null) and the count of p < alpha is Binomial(N, <= alpha): the
    (1 + k)/(1 + S) p-value is valid marginally over the null samples. The only departures
    are the model's approximations (count/noise bucketing, Gaussian for summed Laplace noise,
    the clamped-sum count), which the observed rates bound.

    N = 600: at alpha = 0.05 the binomial sd is 0.009, so [0.01, 0.10] is -4.5 / +5.6 sd.
    The flag rate is at most the p < 0.01 rate (~0.01; sd 0.004), so <= 2% is +2.5 sd
    (Poisson(6) > 12 has probability 0.9%).
    """
    feature = normal_feature(P_MISS, 1_000_000)
    variance = 200 * LAPLACE_VAR
    rng = np.random.default_rng(11)
    n = 600
    p = {"psi": [], "js": [], "ks": [], "w": []}
    flags = 0
    for i in range(n):
        cache = SignificanceCache(seed=1000 + i)
        current = rng.multinomial(20_000, P_MISS) + discrete_laplace(rng, 200, (11,))
        scores = feature_drift(feature, suppress_noise(current, variance, feature.reference_counts))
        sig = cache.significance(feature, scores, scores.count, variance)
        assert not insufficient_data(sig.expected_null_psi)  # the flagging rule is live here
        p["psi"].append(sig.p_psi)
        p["js"].append(sig.p_js)
        p["ks"].append(sig.p_ks)
        p["w"].append(sig.p_wasserstein)
        flags += is_drifting(scores, sig)
    rates = {k: float(np.mean(np.array(v) < 0.05)) for k, v in p.items()}
    print(f"null p < 0.05 rates: {rates}; p_psi < 0.01: {np.mean(np.array(p['psi']) < 0.01)}; "
          f"flag rate {flags / n}")
    for name, rate in rates.items():
        assert 0.01 <= rate <= 0.10, (name, rate)
    assert flags / n <= 0.02


def test_p_values_with_one_shared_cache() -> None:
    """As deployed: one cache, 300 null draws sharing a few buckets' simulated nulls.

    The draws share null samples, so besides the binomial sd (0.0126 at 0.05) the rate
    carries the error of the null's 5% quantile from 400 samples (sd ~0.011): total ~0.017,
    and [0.01, 0.10] is -2.4 / +2.9 sd.
    """
    feature = normal_feature(P_MISS, 1_000_000)
    variance = 200 * LAPLACE_VAR
    rng = np.random.default_rng(12)
    cache = SignificanceCache()
    ps = []
    for _ in range(300):
        current = rng.multinomial(20_000, P_MISS) + discrete_laplace(rng, 200, (11,))
        scores = feature_drift(feature, suppress_noise(current, variance, feature.reference_counts))
        ps.append(cache.significance(feature, scores, scores.count, variance).p_value)
    rate = float(np.mean(np.array(ps) < 0.05))
    print(f"shared cache: null p < 0.05 rate {rate}")
    assert 0.01 <= rate <= 0.10
    assert len(cache) <= 3  # the clamped counts fall in one or two count buckets


def test_reference_sampling_is_part_of_the_null() -> None:
    """A reference of 3 000 rows and cohorts of 3 000 events, no noise: the reference's own
    sampling doubles the null PSI. Resampling it keeps p < 0.05 at ~5% (binomial sd 0.0126
    over 300 independent draws: each has its own reference, hence its own cache entry);
    a fixed reference underestimates the null and flags ~half the null cohorts (chi-square:
    P(2 X > q95(X)) ~ 0.5 for X ~ chi2_10), far above 0.25.
    """
    truth = P_MISS
    rng = np.random.default_rng(13)
    resampled = SignificanceCache()
    fixed = SignificanceCache(resample_reference=False)
    p_resampled, p_fixed = [], []
    for _ in range(300):
        feature = FeatureSpec("x", "numeric", edges=EDGES,
                              reference_counts=tuple(rng.multinomial(3000, truth)))
        scores = feature_drift(feature, rng.multinomial(3000, truth))
        p_resampled.append(resampled.significance(feature, scores, scores.count, 0.0).p_value)
        p_fixed.append(fixed.significance(feature, scores, scores.count, 0.0).p_value)
    rate_resampled = float(np.mean(np.array(p_resampled) < 0.05))
    rate_fixed = float(np.mean(np.array(p_fixed) < 0.05))
    print(f"reference resampled: {rate_resampled}, fixed: {rate_fixed}")
    assert 0.01 <= rate_resampled <= 0.10
    assert rate_fixed > 0.25


# -- power -------------------------------------------------------------------------------------


def test_half_sd_shift_is_flagged_in_a_200_device_cohort() -> None:
    """A 0.5-sd mean shift, 20 000 events, 200 devices' discrete Laplace noise (b = 10).

    PSI of the shift itself is ~0.33 (10 equal-mass bins); the null's 99th percentile is
    ~0.14 and its mean ~0.03, so every one of 5 independent cohorts is flagged.
    """
    feature = normal_feature(P_NO_MISS, 100_000)
    variance = 200 * LAPLACE_VAR
    cache = SignificanceCache()
    rng = np.random.default_rng(21)
    for _ in range(5):
        current = histogram(rng.normal(0.5, 1.0, 20_000)) + discrete_laplace(rng, 200, (11,))
        scores = feature_drift(feature, suppress_noise(current, variance, feature.reference_counts))
        sig = cache.significance(feature, scores, scores.count, variance)
        assert scores.psi > 0.1
        assert sig.p_value < 0.01
        assert sig.p_ks < 0.01 and sig.p_wasserstein < 0.01 and sig.p_js < 0.01
        assert is_drifting(scores, sig)


# -- small cohorts -----------------------------------------------------------------------------


def test_five_device_cohort_never_cries_wolf() -> None:
    """5 devices x 60 events, noise 5 x Laplace variance (b = 10): noise sd ~32 per bin
    against ~30 events per bin. The noise floor (mean null PSI ~1) is far above the
    threshold, so none of 200 null cohorts is flagged (the rule, not luck: insufficient data).
    """
    feature = normal_feature(P_MISS, 1_000_000)
    variance = 5 * LAPLACE_VAR
    cache = SignificanceCache()
    rng = np.random.default_rng(31)
    flags = 0
    for _ in range(200):
        current = rng.multinomial(300, P_MISS) + discrete_laplace(rng, 5, (11,))
        scores = feature_drift(feature, suppress_noise(current, variance, feature.reference_counts))
        sig = cache.significance(feature, scores, scores.count, variance)
        assert insufficient_data(sig.expected_null_psi)
        flags += is_drifting(scores, sig)
    assert flags == 0
    assert insufficient_data(expected_null_psi(P_MISS, 300, variance, 1_000_000))
    assert insufficient_data(expected_null_psi(P_NO_MISS, 50, 1000.0))
    assert not insufficient_data(expected_null_psi(P_MISS, 100_000, 0.0, 1_000_000))


def test_insufficient_data_rule() -> None:
    assert insufficient_data(0.05, 0.1)
    assert not insufficient_data(0.0499, 0.1)
    assert insufficient_data(math.nan, 0.1)
    assert insufficient_data(math.inf, 0.1)


def test_no_data_or_no_reference_is_never_drifting() -> None:
    feature = normal_feature(P_MISS, 10_000)
    cache = SignificanceCache()
    empty = feature_drift(feature, np.zeros(11))
    sig = cache.significance(feature, empty, 0, 100.0)
    assert math.isnan(sig.p_value) and sig.expected_null_psi == math.inf
    assert not is_drifting(empty, sig)
    no_ref = FeatureSpec("y", "numeric", edges=EDGES)
    sig = cache.significance(no_ref, feature_drift(no_ref, np.ones(11)), 11, 0.0)
    assert math.isnan(sig.p_value)
    assert len(cache) == 0


# -- the analytic noise floor ------------------------------------------------------------------


@pytest.mark.parametrize(("count", "variance"), [
    (2000, 0.0), (2000, 50.0), (5000, 200.0), (20_000, 0.0), (20_000, 2000.0),
    (100_000, 20_000.0),
])
def test_expected_null_psi_matches_the_simulated_mean(count: int, variance: float) -> None:
    """The second-order approximation is within 25% of the simulated mean null PSI when every
    bin's noise-plus-sampling sd, sqrt(T r_i + V), is at most half its expected count T r_i
    (checked below), with T_ref = 10 000 so that the reference term matters too.

    Mean of 4000 simulated draws: relative standard error < 1%.
    """
    feature = normal_feature(P_MISS, 10_000)
    t_ref = sum(feature.reference_counts)
    r_min = float(P_MISS.min())
    assert math.sqrt(count * r_min + variance) <= 0.5 * count * r_min
    model = NullModel.for_feature(feature, count, variance)
    simulated = float(simulate_null(model, 4000, seed=5, scores="psi",
                                     suppress=False).psi.mean())
    analytic = expected_null_psi(P_MISS, count, variance, t_ref)
    print(f"T={count} V={variance}: analytic {analytic:.5f} simulated {simulated:.5f}")
    assert analytic == pytest.approx(simulated, rel=0.25)


@pytest.mark.parametrize(("props", "count", "variance"), [
    (P_NO_MISS, 20_000, 200 * LAPLACE_VAR),  # empty reference bin (missing): r = EPS
    (P_NO_MISS, 2000, 1000.0),
    (P_MISS, 300, 40_000.0),  # noise sd 200 against 6 missing values
])
def test_expected_null_psi_overestimates_when_noise_dwarfs_a_bin(
        props: np.ndarray, count: int, variance: float) -> None:
    """Outside its domain, where a bin's noise dwarfs its count (above all an empty reference
    bin, floored at EPS), the approximation overestimates the noise floor many times over
    (observed 5x-40x here): the clamp at 0 and the EPS floor bound that bin's contribution.
    It then errs towards "insufficient data"; the simulated mean, which the flagging rule
    uses, does not."""
    feature = normal_feature(props, 1_000_000)
    model = NullModel.for_feature(feature, count, variance)
    simulated = float(simulate_null(model, 2000, seed=6, scores="psi",
                                     suppress=False).psi.mean())
    analytic = expected_null_psi(props, count, variance, 1_000_000)
    print(f"analytic {analytic:.4f} simulated {simulated:.4f}")
    assert analytic > 3 * simulated


@pytest.mark.parametrize(("count", "variance"), [(300, 200.0), (2000, 4000.0)])
def test_expected_null_psi_is_somewhat_low_when_noise_matches_a_bin(
        count: int, variance: float) -> None:
    """In between (the 2% missing bin's sd 0.5-5x its count) the bin is sometimes clamped to 0
    and floored at EPS, where the logarithm is steep: the approximation is 10-30% low
    (observed 0.72 and 0.87 of the simulated mean; 2000 draws: ~2% standard error)."""
    feature = normal_feature(P_MISS, 1_000_000)
    model = NullModel.for_feature(feature, count, variance)
    simulated = float(simulate_null(model, 2000, seed=6, scores="psi",
                                     suppress=False).psi.mean())
    analytic = expected_null_psi(P_MISS, count, variance, 1_000_000)
    assert 0.6 * simulated < analytic < simulated


def test_expected_null_psi_terms() -> None:
    r = np.r_[np.full(4, 0.25)]
    assert expected_null_psi(r, 1000, 0.0) == pytest.approx(3 / 1000)
    assert expected_null_psi(r, 1000, 0.0, 500) == pytest.approx(3 / 1000 + 3 / 500)
    assert expected_null_psi(r, 1000, 100.0) == pytest.approx(3 / 1000 + 100 / 1e6 * (16 - 4))
    assert expected_null_psi(r, 0, 100.0) == math.inf


def test_min_detectable_psi() -> None:
    """The null's 99th percentile: above the mean, shrinking with the cohort size, and close to
    the chi-square value chi2_{0.99}(B - 1)/T without noise (21.67/T for 9 df, 10 bins; 2000
    draws estimate a 99th percentile to ~5%)."""
    r = np.full(10, 0.1)
    q_small = min_detectable_psi(r, 2000, 0.0)
    assert q_small == pytest.approx(21.67 / 2000, rel=0.15)
    assert min_detectable_psi(r, 20_000, 0.0) < q_small
    variance = 200 * LAPLACE_VAR
    assert min_detectable_psi(P_NO_MISS, 20_000, variance, 100_000) > 2 * min_detectable_psi(
        P_NO_MISS, 20_000, 0.0, 100_000)
    assert min_detectable_psi(r, 0, 1.0) == math.inf


# -- the cache ---------------------------------------------------------------------------------


def _scores(feature: FeatureSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    current = rng.multinomial(20_000, P_MISS) + discrete_laplace(rng, 50, (11,))
    return feature_drift(feature, current)


def test_cache_same_bucket_same_result() -> None:
    feature = normal_feature(P_MISS, 100_000)
    scores = _scores(feature)
    assert count_bucket(20_000) == count_bucket(20_100)
    assert noise_bucket(10_000.0) == noise_bucket(10_100.0)
    cache = SignificanceCache()
    a = cache.significance(feature, scores, 20_000, 10_000.0)
    b = cache.significance(feature, scores, 20_100, 10_100.0)
    assert a == b
    assert isinstance(a, Significance)
    assert (len(cache), cache.hits, cache.misses) == (1, 1, 1)
    # A different bucket, noise level or reference is a different null.
    cache.significance(feature, scores, 30_000, 10_000.0)
    cache.significance(feature, scores, 20_000, 0.0)
    other = normal_feature(P_NO_MISS + np.r_[np.zeros(10), 1e-3], 100_000)
    cache.significance(other, scores, 20_000, 10_000.0)
    renamed = FeatureSpec("z", feature.type, feature.edges, (), feature.reference_counts)
    cache.significance(renamed, scores, 20_000, 10_000.0)
    assert len(cache) == 5


def test_cache_is_deterministic_and_order_independent() -> None:
    f1 = normal_feature(P_MISS, 100_000, "a")
    f2 = normal_feature(P_NO_MISS, 100_000, "b")
    s1, s2 = _scores(f1, 1), _scores(f2, 2)
    first = SignificanceCache(seed=3)
    r1 = (first.significance(f1, s1, 20_000, 10_000.0), first.significance(f2, s2, 5000, 0.0))
    second = SignificanceCache(seed=3)
    r2 = (second.significance(f2, s2, 5000, 0.0), second.significance(f1, s1, 20_000, 10_000.0))
    assert r1 == (r2[1], r2[0])
    other_seed = SignificanceCache(seed=4).significance(f1, s1, 20_000, 10_000.0)
    assert other_seed.null_psi_q99 != r1[0].null_psi_q99


def test_cache_is_lru_bounded() -> None:
    feature = normal_feature(P_MISS, 100_000)
    scores = _scores(feature)
    cache = SignificanceCache(samples=50, max_entries=3)
    counts = [100 * 2**k for k in range(8)]  # 8 different count buckets
    for c in counts:
        cache.significance(feature, scores, c, 10.0)
        assert len(cache) <= 3
    assert cache.misses == 8
    cache.significance(feature, scores, counts[-3], 10.0)  # still cached: a hit, now newest
    assert cache.hits == 1
    cache.significance(feature, scores, counts[0], 10.0)  # evicted long ago: a miss
    assert cache.misses == 9
    cache.significance(feature, scores, counts[-3], 10.0)  # survived as most recently used
    assert cache.hits == 2 and len(cache) == 3


def test_categorical_feature_has_no_ks_or_wasserstein_p_values() -> None:
    feature = FeatureSpec("c", "categorical", vocabulary=("a", "b"),
                          reference_counts=(6000, 3000, 900, 100))
    scores = feature_drift(feature, np.array([600, 300, 90, 10]))
    sig = SignificanceCache().significance(feature, scores, scores.count, 0.0)
    assert math.isnan(sig.p_ks) and math.isnan(sig.p_wasserstein)
    assert 0 < sig.p_value <= 1 and 0 < sig.p_js <= 1
    assert sig.p_value == sig.p_psi


def test_null_model_validation() -> None:
    feature = normal_feature(P_MISS, 1000)
    model = NullModel.for_feature(feature, 10, 1.0)
    assert model.numeric and len(model.points) == len(bin_points(feature))
    with pytest.raises(ValueError):
        NullModel((1, 2), 3, 0, 0.0, False)
    with pytest.raises(ValueError):
        NullModel((1, 2), 3, 10, -1.0, False)
    with pytest.raises(ValueError):
        NullModel((1, 2, 3), 6, 10, 0.0, True, points=(0.0,))
