"""The canary gate: two versions of a model side by side, per cohort, with significance tests.

    result = compare_versions(store, "detector", "1", "2", group_by=["region"])
    worse = [(c.cohort, m.metric) for c in result.cohorts for m in c.metrics if m.worse]

Both versions' specs are resolved, their rollups merged per cohort (`query.merged_cohorts`, one
call per version since each has its own spec hash) and joined on the cohort: the cohorts are
the group-by values present for either version. Per cohort every SLI is compared:

- error_rate: Fisher's exact test on the exact event and error counts (`error_rate_test`);
- latency_p50_ms / p95 / p99: a two-sample quantile test on the two KLL sketches that folds
  in the sketches' rank error (`quantile_test`);
- accuracy, when both versions have a classification task and labels: a two-proportion z-test
  whose variance includes the DP noise of the confusion counts (`accuracy_test`);
- drift, per feature (`psi:FEATURE`) and of the prediction (`prediction_psi`): each version's
  PSI against its own reference, as `fleetwatch health` flags it (`query.cohort_health`);
- events and devices, for reading (never tested).

Every p-value here is two-sided. The family-wise error of "some difference is significant" is
held at `alpha` by Bonferroni: each test is judged at alpha / m, m the number of tests made
over all cohorts (error rate, three latency quantiles and accuracy where both sides have the
data). A metric is `worse` when it is significant and the difference points the bad way, so
an identical candidate is flagged on any metric with probability at most alpha (one-sided:
alpha / 2). Drift is not part of m: its flag already holds its own family-wise level per
cohort query (`query.ALPHA_FAMILY`); a drift metric is significant (and worse) when the
candidate is flagged drifting and the baseline is not. A metric either side has no data for
is NaN and never worse.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from datasketches import kll_floats_sketch

from agent.errors import ValidationError
from agent.spec import REGRESSION, Spec
from agent.summary import KLL_K, Summary
from aggregator.query import (
    CohortHealth,
    FeatureHealth,
    cohort_health,
    merged_cohorts,
    resolve_range,
    resolve_spec,
)
from aggregator.slis import MAX_NOISE_SHARE
from aggregator.store.base import Store

__all__ = ["DEFAULT_ALPHA", "LATENCY_QUANTILES", "TESTED_METRICS", "CohortComparison",
           "CohortData", "Comparison", "MetricComparison", "Outcome", "accuracy_test",
           "compare_cohorts", "compare_versions", "error_rate_test", "hypergeom_sf",
           "quantile_test"]

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.01
LATENCY_QUANTILES = {"latency_p50_ms": 0.5, "latency_p95_ms": 0.95, "latency_p99_ms": 0.99}
# The metrics with a significance test, in table order; drift metrics follow them.
TESTED_METRICS = ("error_rate", *LATENCY_QUANTILES, "accuracy")
PREDICTION_PSI = "prediction_psi"
PSI_PREFIX = "psi:"
# datasketches' normalized_rank_error is a bound at ~99% confidence; read as a two-sided
# Gaussian 99% point it gives the sketch's rank error sd (see quantile_test).
Z_99 = 2.5758293035489004
_TAIL_RELATIVE = 1e-20  # stop summing a decreasing tail once its terms are this small


@dataclass(frozen=True)
class Outcome:
    """A two-sided p-value and the direction of the candidate's departure from the baseline."""

    p_value: float
    candidate_higher: bool


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    baseline: float
    candidate: float
    difference: float  # candidate - baseline
    p_value: float
    significant: bool
    worse: bool
    higher_is_worse: bool


@dataclass(frozen=True)
class CohortComparison:
    cohort: Mapping[str, str]
    baseline_events: int
    candidate_events: int
    metrics: Sequence[MetricComparison] = field(default_factory=tuple)


@dataclass(frozen=True)
class Comparison:
    cohorts: Sequence[CohortComparison]
    baseline_spec_hash: str
    candidate_spec_hash: str
    start_unix_s: int
    end_unix_s: int
    alpha: float
    corrected_alpha: float
    tests: int  # m, the number of comparisons the correction is over


# -- the tests ---------------------------------------------------------------------------------

def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeom_sf(x: int, total: int, successes: int, draws: int) -> float:
    """P(X >= x) for X ~ Hypergeometric(total, successes, draws), exactly (no scipy at run
    time). The tail on the far side of the mode is summed term by term with the ratio
    p(k+1)/p(k) = (K-k)(n-k) / ((k+1)(N-K-n+k+1)) until the terms vanish; the near side as one
    minus the other tail, through X' = n - X ~ Hypergeometric(N, N-K, n)."""
    n_, k_, d = total, successes, draws
    lo, hi = max(0, d - (n_ - k_)), min(k_, d)
    if x <= lo:
        return 1.0
    if x > hi:
        return 0.0
    mode = (d + 1) * (k_ + 1) // (n_ + 2)
    if x < mode:
        # P(X >= x) = 1 - P(X <= x-1) = 1 - P(X' >= d - x + 1), past the mode of X' (which is
        # at most d + 1 - mode): no recursion beyond this one.
        return max(0.0, 1.0 - hypergeom_sf(d - x + 1, n_, n_ - k_, d))
    log_p = _log_comb(k_, x) + _log_comb(n_ - k_, d - x) - _log_comb(n_, d)
    total_p, term, k = 0.0, math.exp(log_p), x
    while k <= hi:
        total_p += term
        if term <= _TAIL_RELATIVE * total_p:
            break
        term *= (k_ - k) * (d - k) / ((k + 1) * (n_ - k_ - d + k + 1))
        k += 1
    return min(1.0, total_p)


def error_rate_test(baseline_errors: int, baseline_events: int, candidate_errors: int,
                    candidate_events: int) -> Outcome:
    """Fisher's exact test of equal error rates, two-sided by doubling the smaller tail.

    Given the total number of errors K over both versions' N events, under "same error rate"
    the candidate's errors are Hypergeometric(N, K, candidate events): every split of the K
    errors between the two versions' events is equally likely. The one-sided p for "the
    candidate errs more" is P(X >= candidate errors); for "less", P(X <= candidate errors).
    Exact at any count (rare errors included), conservative (a discrete test never exceeds its
    level). The counts are exact: errors are an operational signal, sent without noise."""
    n = baseline_events + candidate_events
    k = baseline_errors + candidate_errors
    x, d = candidate_errors, candidate_events
    upper = hypergeom_sf(x, n, k, d)
    lower = hypergeom_sf(d - x, n, n - k, d)  # P(X <= x), summed directly on its own side
    higher = candidate_errors * baseline_events > baseline_errors * candidate_events
    return Outcome(min(1.0, 2.0 * min(upper, lower)), higher)


def _rank_sd(sketch: kll_floats_sketch) -> float:
    return sketch.normalized_rank_error(False) / Z_99 if sketch.is_estimation_mode() else 0.0


def quantile_test(baseline: kll_floats_sketch, candidate: kll_floats_sketch,
                  q: float) -> Outcome:
    """Two-sample test of equal q-quantiles from two KLL sketches (Mood's quantile test).

    Derivation. Let m be the q-quantile of the pooled sample (read off the merge of the two
    sketches) and u_b, u_c the fractions of each version's events above m. If both versions'
    latencies come from one distribution, the pooled events are exchangeable: which of them
    belong to the candidate is a random split, m does not depend on it, so the candidate's
    count above m is hypergeometric around n_c (1 - q) and d = u_c - u_b has mean 0 and variance
    p (1 - p) (1/n_b + 1/n_c), p the pooled fraction above m. A candidate whose q-quantile is
    higher puts more than its share above m: d > 0. Distribution-free: no shape is assumed.
    (When only the q-quantiles agree but the densities at them differ, the variance is off by
    a factor near 1; the test is then approximate, which a canary tolerates.)

    The sketches. u = 1 - rank(m) is known only to the sketch's rank error: a KLL sketch's
    estimate errs by a sum of many independent compaction errors, close to Gaussian, whose
    99% point datasketches reports as `normalized_rank_error(False)` (1.33% at k = 200). Its
    sd, that bound / 2.576, is added to the variance for each sketch in estimation mode (an
    exact sketch adds nothing). That is conservative: measured over merges of 1-50 device
    sketches of 300-200 000 events, the actual sd of the rank error was 0.0021-0.0032, below
    the 0.0052 assumed.

    z = (|d| - c) / sqrt(var) with the continuity correction c = (1/n_b + 1/n_c) / 2, and the
    two-sided p = erfc(z / sqrt 2). NaN when either sketch is empty."""
    if baseline.is_empty() or candidate.is_empty():
        return Outcome(math.nan, False)
    pooled = kll_floats_sketch(KLL_K)
    pooled.merge(baseline)
    pooled.merge(candidate)
    m = pooled.get_quantile(q)
    n_b, n_c = float(baseline.n), float(candidate.n)
    u_b = 1.0 - baseline.get_rank(m, inclusive=True)
    u_c = 1.0 - candidate.get_rank(m, inclusive=True)
    d = u_c - u_b
    n = n_b + n_c
    p = min(max((u_b * n_b + u_c * n_c) / n, 1.0 / n), 1.0 - 1.0 / n)
    var = p * (1 - p) * (1 / n_b + 1 / n_c) + _rank_sd(baseline) ** 2 + _rank_sd(candidate) ** 2
    z = (abs(d) - 0.5 * (1 / n_b + 1 / n_c)) / math.sqrt(var)
    return Outcome(1.0 if z <= 0 else math.erfc(z / math.sqrt(2)), d > 0)


def accuracy_test(baseline_correct: float, baseline_total: float, baseline_noise_var: float,
                  candidate_correct: float, candidate_total: float, candidate_noise_var: float,
                  classes: int) -> Outcome:
    """Two-proportion z-test of equal accuracy from noisy confusion matrices.

    Accuracy a = D / T with D the (raw, noisy) diagonal over the `classes` named classes and T
    the exact number of labels the matrix covers (`label_histogram_count`, released exactly):
    the estimate is unbiased, as `aggregator.slis.classification` computes it. Sampling: under
    "same accuracy", a_c - a_b has variance p (1 - p) (1/T_b + 1/T_c), p the pooled accuracy.
    DP noise of variance v per cell: D sums K noisy cells, so Var(D/T) = K v / T^2, added for
    each version. Two-sided p = erfc(|z| / sqrt 2). NaN without labels on a side."""
    if baseline_total <= 0 or candidate_total <= 0:
        return Outcome(math.nan, False)
    a_b, a_c = baseline_correct / baseline_total, candidate_correct / candidate_total
    p = (baseline_correct + candidate_correct) / (baseline_total + candidate_total)
    p = min(max(p, 0.5 / (baseline_total + candidate_total)),
            1 - 0.5 / (baseline_total + candidate_total))

    def noise(a: float, t: float, v: float) -> float:
        return v * classes / (t * t)

    var = (p * (1 - p) * (1 / baseline_total + 1 / candidate_total)
           + noise(a_b, baseline_total, baseline_noise_var)
           + noise(a_c, candidate_total, candidate_noise_var))
    z = abs(a_c - a_b) / math.sqrt(var)
    return Outcome(math.erfc(z / math.sqrt(2)), a_c > a_b)


# -- per cohort --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CohortData:
    """What the two versions bring to one cohort's comparison (None: no data there).

    The health records carry the drift flags (`query.cohort_health`); without them the
    comparison has no drift rows."""

    cohort: Mapping[str, str]
    baseline: Summary | None = None
    candidate: Summary | None = None
    baseline_devices: int = 0
    candidate_devices: int = 0
    baseline_health: CohortHealth | None = None
    candidate_health: CohortHealth | None = None


@dataclass(frozen=True)
class _Pending:
    """A metric before the correction: values and, for a tested metric, its test."""

    metric: str
    baseline: float
    candidate: float
    higher_is_worse: bool
    test: Outcome | None = None      # None: not tested (informational or drift)
    drift_worse: bool = False


def _confusion_accuracy(spec: Spec, summary: Summary) -> tuple[float, float, int] | None:
    """(correct, total, classes) of a classification spec's merged confusion, else None.

    As `aggregator.slis`: the raw (noisy, unbiased) diagonal over the exact label count, and
    no answer when the labels drown in the privacy noise (`slis.MAX_NOISE_SHARE`)."""
    labels = spec.labels
    confusion = summary.confusion
    if labels is None or confusion is None or labels.task == REGRESSION:
        return None
    k = len(labels.classes)
    c = np.asarray(confusion, dtype=np.float64)
    if c.size != (k + 1) ** 2:
        logger.warning("confusion of %d cells under a %d-class spec: accuracy skipped",
                       c.size, k)
        return None
    total = float(summary.label_histogram_count)
    if total <= 0 or math.sqrt(summary.noise_variance_per_bin) > MAX_NOISE_SHARE * total:
        return None
    c = c.reshape(k + 1, k + 1)
    # "other" against "other" is not counted correct (two unknown classes need not agree).
    correct = min(max(float(np.trace(c[:k, :k])), 0.0), total)
    return correct, total, k


def _drift_rows(base: CohortHealth | None, cand: CohortHealth | None) -> list[_Pending]:
    def by_name(h: CohortHealth | None) -> dict[str, FeatureHealth]:
        out = {PSI_PREFIX + f.name: f for f in (h.features if h else ())}
        if h is not None and h.prediction is not None:
            out[PREDICTION_PSI] = h.prediction
        return out

    b, c = by_name(base), by_name(cand)
    names = [n for n in b if n != PREDICTION_PSI] + [n for n in c if n not in b
                                                      and n != PREDICTION_PSI]
    if PREDICTION_PSI in b or PREDICTION_PSI in c:
        names.append(PREDICTION_PSI)
    rows = []
    for name in names:
        fb, fc = b.get(name), c.get(name)
        rows.append(_Pending(
            name, fb.scores.psi if fb else math.nan, fc.scores.psi if fc else math.nan, True,
            test=Outcome(fc.significance.p_value if fc else math.nan, False),
            drift_worse=bool(fb and fc and fc.drifting and not fb.drifting)))
    return rows


def _cohort_rows(base_spec: Spec, cand_spec: Spec, data: CohortData) -> list[_Pending]:
    bs = data.baseline if data.baseline is not None else Summary.zero(base_spec)
    cs = data.candidate if data.candidate is not None else Summary.zero(cand_spec)
    rows = [_Pending("events", bs.event_count, cs.event_count, False),
            _Pending("devices", data.baseline_devices, data.candidate_devices, False)]

    both_events = bs.event_count > 0 and cs.event_count > 0
    rate_b = bs.error_count / bs.event_count if bs.event_count else math.nan
    rate_c = cs.error_count / cs.event_count if cs.event_count else math.nan
    rows.append(_Pending("error_rate", rate_b, rate_c, True,
                         error_rate_test(bs.error_count, bs.event_count, cs.error_count,
                                         cs.event_count) if both_events else None))

    for metric, q in LATENCY_QUANTILES.items():
        qb = math.nan if bs.latency.is_empty() else float(bs.latency.get_quantile(q))
        qc = math.nan if cs.latency.is_empty() else float(cs.latency.get_quantile(q))
        test = (quantile_test(bs.latency, cs.latency, q)
                if not (bs.latency.is_empty() or cs.latency.is_empty()) else None)
        rows.append(_Pending(metric, qb, qc, True, test))

    acc_b, acc_c = _confusion_accuracy(base_spec, bs), _confusion_accuracy(cand_spec, cs)
    if acc_b is not None or acc_c is not None:
        test = None
        if acc_b is not None and acc_c is not None and acc_b[2] == acc_c[2]:
            test = accuracy_test(acc_b[0], acc_b[1], bs.noise_variance_per_bin,
                                 acc_c[0], acc_c[1], cs.noise_variance_per_bin, acc_b[2])
        rows.append(_Pending("accuracy", acc_b[0] / acc_b[1] if acc_b else math.nan,
                             acc_c[0] / acc_c[1] if acc_c else math.nan, False, test))

    rows.extend(_drift_rows(data.baseline_health, data.candidate_health))
    return rows


def _finish(row: _Pending, corrected_alpha: float) -> MetricComparison:
    diff = row.candidate - row.baseline
    p = row.test.p_value if row.test else math.nan
    if row.metric.startswith(PSI_PREFIX) or row.metric == PREDICTION_PSI:
        significant = worse = row.drift_worse
    elif row.test is None or not math.isfinite(p) or not math.isfinite(diff):
        significant = worse = False
    else:
        significant = p < corrected_alpha
        # The test's direction and the point estimates must agree for a verdict of "worse".
        bad_way = (row.test.candidate_higher and diff > 0) if row.higher_is_worse else \
            (not row.test.candidate_higher and diff < 0)
        worse = significant and bad_way
    return MetricComparison(row.metric, float(row.baseline), float(row.candidate), float(diff),
                            float(p), significant, worse, row.higher_is_worse)


def _is_test(row: _Pending) -> bool:
    return (row.metric in TESTED_METRICS and row.test is not None
            and math.isfinite(row.test.p_value))


def _key(cohort: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(cohort.items()))


def compare_versions(store: Store, model: str, baseline_version: str, candidate_version: str,
                     selector: Mapping[str, str] | None = None, group_by: Sequence[str] = (),
                     start: int = 0, end: int = 0, alpha: float = 0.0,
                     now: float | None = None) -> Comparison:
    """Compare `candidate_version` with `baseline_version` of `model`, per cohort.

    alpha 0 means DEFAULT_ALPHA. start/end as in `query.resolve_range` (each version's range
    is aligned to its own window length; the reported range is their union)."""
    if not baseline_version:
        raise ValidationError("baseline_version", "required: name the version to compare with")
    if not candidate_version:
        raise ValidationError("candidate_version", "required: name the version under test")
    if baseline_version == candidate_version:
        raise ValidationError("candidate_version",
                              f"is the baseline version {baseline_version!r} itself")
    alpha = DEFAULT_ALPHA if alpha == 0 else alpha
    if not (math.isfinite(alpha) and 0 < alpha < 1):
        raise ValidationError("alpha", f"must be in (0, 1), got {alpha}")
    selector = dict(selector or {})
    group_by = list(group_by)
    base_spec = resolve_spec(store, model, baseline_version)
    cand_spec = resolve_spec(store, model, candidate_version)

    per_cohort: dict[tuple, dict[str, object]] = {}
    ranges = []
    for role, spec in (("baseline", base_spec), ("candidate", cand_spec)):
        lo, hi = resolve_range(start, end, spec.window_length_s, now)
        ranges.append((lo, hi))
        health = {_key(h.cohort): h
                  for h in cohort_health(store, model, spec.model_version, selector, group_by,
                                         lo, hi)}
        for mc in merged_cohorts(store, spec, selector, group_by, lo, hi):
            key = _key(mc.cohort)
            fields = per_cohort.setdefault(key, {"cohort": dict(mc.cohort)})
            fields[role] = mc.summary
            fields[f"{role}_devices"] = store.device_count(spec.hash, mc.label_set_ids, lo, hi)
            fields[f"{role}_health"] = health.get(key)
    data = [CohortData(**per_cohort[key]) for key in sorted(per_cohort)]  # type: ignore[arg-type]
    cohorts, tests, corrected = compare_cohorts(base_spec, cand_spec, data, alpha)
    logger.info("compare %s %s vs %s: %d cohorts, %d tests at %.3g each", model,
                candidate_version, baseline_version, len(cohorts), tests, corrected)
    return Comparison(cohorts, base_spec.hash, cand_spec.hash, min(r[0] for r in ranges),
                      max(r[1] for r in ranges), alpha, corrected, tests)


def compare_cohorts(baseline_spec: Spec, candidate_spec: Spec, data: Sequence[CohortData],
                    alpha: float = DEFAULT_ALPHA
                    ) -> tuple[list[CohortComparison], int, float]:
    """The comparisons of the cohorts, the number m of tests made over all of them, and the
    Bonferroni level alpha / m each test was judged at."""
    rows = [_cohort_rows(baseline_spec, candidate_spec, d) for d in data]
    tests = sum(_is_test(r) for cohort_rows in rows for r in cohort_rows)
    corrected = alpha / max(1, tests)
    out = [CohortComparison(
        cohort=dict(d.cohort),
        baseline_events=d.baseline.event_count if d.baseline is not None else 0,
        candidate_events=d.candidate.event_count if d.candidate is not None else 0,
        metrics=tuple(_finish(r, corrected) for r in cohort_rows))
        for d, cohort_rows in zip(data, rows, strict=True)]
    return out, tests, corrected
