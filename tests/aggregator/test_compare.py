"""The canary gate's statistics (aggregator/compare.py), checked against scipy on raw samples.

Type-I error is measured over many simulated pairs drawn from one distribution: the rejection
count must be at most alpha * R plus three binomial standard deviations sqrt(R alpha (1-alpha))
(a correct test at or below its level exceeds that with probability ~0.1%; every simulation is
seeded, so the outcome is fixed anyway). Power is checked on effects a canary must catch.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from datasketches import kll_floats_sketch
from scipy.stats import fisher_exact, hypergeom, norm

from agent.spec import NUMERIC, FeatureSpec, Spec
from agent.summary import Summary
from aggregator import compare
from aggregator.cli import main
from aggregator.compare import (
    CohortData,
    accuracy_test,
    compare_cohorts,
    error_rate_test,
    hypergeom_sf,
    quantile_test,
)
from aggregator.render import COMPARE_TESTED, compare_failures, compare_json
from aggregator.service import comparison_to_proto

SPEC = Spec(model="m", model_version="1",
            features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0), reference_counts=(1, 8, 1, 0)),))


def budget(reps: int, alpha: float) -> float:
    """Most rejections a level-alpha test may show in `reps` null trials (3 binomial sd)."""
    return alpha * reps + 3 * math.sqrt(reps * alpha * (1 - alpha))


def sketch(x: np.ndarray, parts: int = 1) -> kll_floats_sketch:
    """The merge of `parts` device sketches of x, as the aggregator builds it."""
    out = kll_floats_sketch(200)
    for part in np.array_split(np.asarray(x, dtype=np.float32), parts):
        s = kll_floats_sketch(200)
        s.update(part)
        out.merge(s)
    return out


# -- error rate ---------------------------------------------------------------------------------

def test_hypergeom_sf_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    for _ in range(2000):
        total = int(rng.integers(1, 20_000))
        k = int(rng.integers(0, total + 1))
        n = int(rng.integers(0, total + 1))
        x = int(rng.integers(-1, n + 2))
        expected = float(hypergeom.sf(x - 1, total, k, n))
        assert hypergeom_sf(x, total, k, n) == pytest.approx(expected, rel=1e-9, abs=1e-250)
    # Large counts (a fleet-day): still exact and fast (the tail stops once its terms vanish).
    assert hypergeom_sf(50_900, 2_000_000, 100_000, 1_000_000) == pytest.approx(
        float(hypergeom.sf(50_899, 2_000_000, 100_000, 1_000_000)), rel=1e-9)


def test_error_rate_test_is_fisher_exact_doubled() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        nb, nc = (int(v) for v in rng.integers(1, 5000, 2))
        eb, ec = int(rng.binomial(nb, 0.02)), int(rng.binomial(nc, 0.03))
        table = [[ec, nc - ec], [eb, nb - eb]]
        p = min(1.0, 2 * min(fisher_exact(table, alternative="greater")[1],
                             fisher_exact(table, alternative="less")[1]))
        out = error_rate_test(eb, nb, ec, nc)
        assert out.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
        assert out.candidate_higher == (ec / nc > eb / nb)


@pytest.mark.parametrize("rate, nb, nc", [(0.01, 3000, 2500), (0.0005, 4000, 4000)])
def test_error_rate_type_one_error(rate: float, nb: int, nc: int) -> None:
    # Rare errors (2 expected per side) included: the exact test stays at its level.
    rng = np.random.default_rng(3)
    reps = 2000
    p = np.array([error_rate_test(int(rng.binomial(nb, rate)), nb, int(rng.binomial(nc, rate)),
                                  nc).p_value for _ in range(reps)])
    for alpha in (0.05, 0.01):
        assert np.sum(p < alpha) <= budget(reps, alpha)


def test_error_rate_power() -> None:
    # 2% against 1% at 10 000 events each: ~5.8 sd apart, flagged at a Bonferroni level of
    # 1e-4 (z = 3.9) in every run.
    rng = np.random.default_rng(4)
    hits = [error_rate_test(int(rng.binomial(10_000, 0.01)), 10_000,
                            int(rng.binomial(10_000, 0.02)), 10_000) for _ in range(50)]
    assert all(h.p_value < 1e-4 and h.candidate_higher for h in hits)


# -- latency quantiles --------------------------------------------------------------------------

def test_quantile_test_on_exact_sketches_matches_raw_computation() -> None:
    # Up to k = 200 items a KLL sketch is exact (the pooled one too, hence at most 200 in
    # all): the statistic must equal Mood's quantile test written here from the raw samples
    # (the pooled quantile as datasketches defines it, item floor(q n) of the sorted sample;
    # continuity correction; normal tail from scipy), to 1e-9.
    rng = np.random.default_rng(5)
    for _ in range(50):
        b = rng.lognormal(2.8, 0.5, int(rng.integers(30, 100))).astype(np.float32)
        c = (1.3 * rng.lognormal(2.8, 0.5, int(rng.integers(30, 100)))).astype(np.float32)
        sb, sc = sketch(b), sketch(c)
        assert not sb.is_estimation_mode() and not sc.is_estimation_mode()
        for q in (0.5, 0.95, 0.99):
            pooled = np.sort(np.concatenate([b, c]))
            m = pooled[min(pooled.size - 1, int(q * pooled.size))]
            ub, uc = np.mean(b > m), np.mean(c > m)
            n = b.size + c.size
            p = min(max((ub * b.size + uc * c.size) / n, 1 / n), 1 - 1 / n)
            se = math.sqrt(p * (1 - p) * (1 / b.size + 1 / c.size))
            z = (abs(uc - ub) - 0.5 * (1 / b.size + 1 / c.size)) / se
            expected = 1.0 if z <= 0 else 2 * norm.sf(z)
            out = quantile_test(sb, sc, q)
            assert out.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)
            assert out.candidate_higher == (uc > ub)


def test_quantile_test_type_one_error() -> None:
    # Same latency distribution on both sides, unequal sizes, sketches merged from several
    # devices (the aggregator's case): at or below the level for every quantile.
    rng = np.random.default_rng(6)
    reps = 600
    p = {q: [] for q in (0.5, 0.95, 0.99)}
    for i in range(reps):
        nb = int(rng.integers(300, 6000))
        nc = int(nb * rng.uniform(0.5, 1.5))
        sb = sketch(rng.lognormal(2.8, 0.5, nb), parts=1 + i % 8)
        sc = sketch(rng.lognormal(2.8, 0.5, nc), parts=1 + (i // 8) % 8)
        for q in p:
            p[q].append(quantile_test(sb, sc, q).p_value)
    for q, values in p.items():
        for alpha in (0.05, 0.01):
            assert np.sum(np.array(values) < alpha) <= budget(reps, alpha), (q, alpha)


def test_quantile_test_power_at_1_3x_slower() -> None:
    # A 1.3x slower candidate at 3000 events per side: p50 and p95 must clear a Bonferroni
    # level of 0.01 / 20 (five tests in four cohorts), in (almost) every run.
    rng = np.random.default_rng(7)
    runs = 40
    flagged = {0.5: 0, 0.95: 0}
    for _ in range(runs):
        sb = sketch(rng.lognormal(2.8, 0.5, 3000), parts=5)
        sc = sketch(1.3 * rng.lognormal(2.8, 0.5, 3000), parts=5)
        for q in flagged:
            out = quantile_test(sb, sc, q)
            flagged[q] += out.p_value < 0.01 / 20 and out.candidate_higher
    assert flagged[0.5] == runs
    assert flagged[0.95] >= runs - 2
    # A faster candidate is significant too, the other way.
    out = quantile_test(sketch(rng.lognormal(2.8, 0.5, 3000)),
                        sketch(0.7 * rng.lognormal(2.8, 0.5, 3000)), 0.5)
    assert out.p_value < 1e-6 and not out.candidate_higher


def test_quantile_test_empty_side_is_nan() -> None:
    out = quantile_test(kll_floats_sketch(200), sketch(np.ones(10)), 0.5)
    assert math.isnan(out.p_value)


# -- accuracy with DP noise ---------------------------------------------------------------------

def noisy_confusion(rng: np.random.Generator, n: int, accuracy: float,
                    variance: float) -> np.ndarray:
    """A binary 3x3 confusion ([true][pred], index 2 = other) of n labels, plus rounded Gaussian
    noise of `variance` per cell (a merge of many reports' discrete noise)."""
    correct = int(rng.binomial(n, accuracy))
    c = np.zeros((3, 3))
    c[0, 0], c[1, 1] = correct // 2, correct - correct // 2
    c[0, 1], c[1, 0] = (n - correct) // 2, n - correct - (n - correct) // 2
    return c + np.rint(rng.normal(0, math.sqrt(variance), (3, 3)))


def accuracy_counts(c: np.ndarray) -> tuple[float, float]:
    c = np.clip(c, 0, None)
    return float(np.trace(c[:2, :2])), float(c.sum())


def test_accuracy_test_type_one_error_with_noise() -> None:
    # 200 labels a side, noise sd 7 per cell (b ~ 5 discrete Laplace merged over a few reports):
    # noise is a large part of the variance here, and the test must still hold its level.
    rng = np.random.default_rng(8)
    reps, variance = 2000, 50.0
    p = []
    for _ in range(reps):
        db, tb = accuracy_counts(noisy_confusion(rng, 200, 0.85, variance))
        dc, tc = accuracy_counts(noisy_confusion(rng, 200, 0.85, variance))
        p.append(accuracy_test(db, tb, variance, dc, tc, variance, 2).p_value)
    for alpha in (0.05, 0.01):
        assert np.sum(np.array(p) < alpha) <= budget(reps, alpha)


def test_accuracy_test_power_and_direction() -> None:
    rng = np.random.default_rng(9)
    db, tb = accuracy_counts(noisy_confusion(rng, 5000, 0.90, 50.0))
    dc, tc = accuracy_counts(noisy_confusion(rng, 5000, 0.85, 50.0))
    out = accuracy_test(db, tb, 50.0, dc, tc, 50.0, 2)
    assert out.p_value < 1e-6 and not out.candidate_higher


# -- the per-cohort comparison and the gate -----------------------------------------------------

def summary(rng: np.random.Generator, n: int, error_rate: float = 0.01,
            latency_factor: float = 1.0, parts: int = 3) -> Summary:
    s = Summary.zero(SPEC)
    s.event_count = n
    s.error_count = int(rng.binomial(n, error_rate))
    s.latency = sketch(latency_factor * rng.lognormal(2.8, 0.5, n), parts)
    return s


def test_identical_candidate_passes_family_wise() -> None:
    # A/A over four cohorts (16 tests): the chance that ANY test is significant is held at
    # alpha by the Bonferroni correction (measured at alpha = 0.05 to have events to count).
    rng = np.random.default_rng(10)
    reps, alpha = 300, 0.05
    failed = 0
    for _ in range(reps):
        data = [CohortData({"region": r}, summary(rng, int(rng.integers(1000, 4000))),
                           summary(rng, int(rng.integers(1000, 4000))))
                for r in ("a", "b", "c", "d")]
        cohorts, tests, corrected = compare_cohorts(SPEC, SPEC, data, alpha)
        assert tests == 16 and corrected == pytest.approx(alpha / 16)
        failed += any(m.significant for c in cohorts for m in c.metrics)
    assert failed <= budget(reps, alpha)


def test_slower_candidate_is_worse_only_where_it_is_slower() -> None:
    rng = np.random.default_rng(11)
    data = [CohortData({"region": "eu"}, summary(rng, 4000),
                       summary(rng, 4000, latency_factor=1.3)),
            CohortData({"region": "us"}, summary(rng, 4000), summary(rng, 4000))]
    cohorts, tests, corrected = compare_cohorts(SPEC, SPEC, data)
    worse = {(c.cohort["region"], m.metric) for c in cohorts for m in c.metrics if m.worse}
    assert ("eu", "latency_p95_ms") in worse and ("eu", "latency_p50_ms") in worse
    assert not any(r == "us" for r, _ in worse)
    resp = comparison_to_proto(compare.Comparison(cohorts, "a", "b", 0, 60, 0.01, corrected,
                                                  tests))
    assert [(c.cohort["region"], m.metric) for c, m in compare_failures(resp, ["latency_p95_ms"])
            ] == [("eu", "latency_p95_ms")]
    assert compare_failures(resp, ["error_rate"]) == []


def test_missing_side_is_nan_and_never_worse() -> None:
    rng = np.random.default_rng(12)
    data = [CohortData({"region": "ap"}, None, summary(rng, 4000, latency_factor=3.0),
                       candidate_devices=2)]
    cohorts, tests, _ = compare_cohorts(SPEC, SPEC, data)
    assert tests == 0
    m = {x.metric: x for x in cohorts[0].metrics}
    assert m["events"].baseline == 0 and m["devices"].candidate == 2
    for name in ("error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
        assert math.isnan(m[name].baseline) and math.isnan(m[name].p_value)
        assert not m[name].worse and not m[name].significant
    doc = compare_json(comparison_to_proto(compare.Comparison(cohorts, "a", "b", 0, 60, 0.01,
                                                              0.01, 0)),
                       model="m", baseline_version="1", candidate_version="2", alpha=0.01,
                       fail_on=["latency_p95_ms"])
    assert doc["verdict"] == "NO_DATA" and doc["cohorts"][0]["metrics"][2]["baseline"] is None


def test_accuracy_is_compared_when_both_sides_have_labels() -> None:
    labels = SimpleNamespace(task="binary", classes=("neg", "pos"))
    spec = SimpleNamespace(labels=labels, features=(), prediction=None)
    rng = np.random.default_rng(13)
    b, c = summary(rng, 4000), summary(rng, 4000)
    b.confusion = np.array([[450, 50, 0], [50, 450, 0], [0, 0, 0]])   # accuracy 0.90
    c.confusion = np.array([[400, 100, 0], [100, 400, 0], [0, 0, 0]])  # accuracy 0.80
    b.label_histogram_count = c.label_histogram_count = 1000  # the exact label counts
    cohorts, tests, _ = compare_cohorts(spec, spec, [CohortData({}, b, c)])  # type: ignore[arg-type]
    acc = next(m for m in cohorts[0].metrics if m.metric == "accuracy")
    assert tests == 5
    assert acc.baseline == pytest.approx(0.9) and acc.candidate == pytest.approx(0.8)
    assert acc.worse and not acc.higher_is_worse
    # Without labels on one side: reported, NaN, not tested.
    c.confusion = None
    cohorts, tests, _ = compare_cohorts(spec, spec, [CohortData({}, b, c)])  # type: ignore[arg-type]
    acc = next(m for m in cohorts[0].metrics if m.metric == "accuracy")
    assert tests == 4 and math.isnan(acc.candidate) and not acc.worse


def test_render_counts_the_same_tests_as_the_server() -> None:
    assert set(COMPARE_TESTED) == set(compare.TESTED_METRICS)


@pytest.mark.parametrize("argv, message", [
    (["--fail-on", "p95"], "unknown metric 'p95'"),
    (["--fail-on", ","], "name at least one metric"),
    (["--alpha", "0"], "--alpha must be in (0, 1)"),
    (["--candidate", "1"], "itself"),
])
def test_cli_usage_errors_before_any_rpc(argv: list[str], message: str, capsys) -> None:
    # Port 9 (discard) on loopback: nothing listens; usage errors must come first (exit 2).
    base = ["compare", "--aggregator", "127.0.0.1:9", "--model", "m", "--baseline", "1",
            "--candidate", "2", "--timeout", "1"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
