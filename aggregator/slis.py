"""Ground-truth SLIs from the label histograms of a merged summary, and the fairness delta.

    slis = label_slis(spec, merged)          # accuracy, F1, Brier, ECE, MAE, ... per cohort
    delta = fairness_delta("region", {"eu": slis_eu, "us": slis_us})

The pure functions take the histograms in the layouts of `protos/fleetwatch.proto`'s
`LabelSpec` comment:

- confusion: (K+1) x (K+1) counts, row-major [true][predicted], index K = "other";
- calibration: [bin b: outcome 0, outcome 1] for each of the B bins of the edges (length 2B);
- residuals and label latency: the numeric layout [underflow, bins..., overflow, missing].

Noise. Label histograms are private, so merged counts carry discrete noise (zero mean) and may
be negative. Sums of cells are taken over the RAW noisy cells, which keeps them unbiased, and
are divided by the exact number of labels the histograms cover when it is known (`total`: the
summary's `label_histogram_count`, released exactly like the event count), else by the raw sum.
Clamping cells at 0 first would not do: over a merged cohort every cell whose true count is 0
(the "other" row and column, far label-latency bins) gains E[max(0, noise)] ~ 0.4 noise sd,
which at fleet scale (noise sd ~500 per cell over 750 reports) inflates totals by thousands and
biased accuracy down by several points. Linear scores (accuracy, positive rate, Brier, MAE,
mean squares) are then unbiased; ratios are clipped into their range; ECE (a sum of absolute
values) keeps a positive bias under noise, of the order of the noise sd over the bin counts.

Binning. Scores, residuals and latencies are known only to their bin; every value is read at
its bin midpoint (outer bins at their finite edge). The resulting error bounds are derived in
each function's docstring and returned with the value where they are finite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.spec import BINARY, REGRESSION, Spec
from agent.summary import Summary

__all__ = ["MAX_NOISE_SHARE", "MIN_FAIRNESS_LABELS", "NOISE_FLOOR_SD", "PROTO_FIELDS",
           "Calibration", "Classification",
           "FairnessDelta", "FairnessGroup", "LabelSLIs", "Regression",
           "calibration", "classification", "fairness_delta", "histogram_quantile",
           "label_slis", "regression"]

logger = logging.getLogger(__name__)

POSITIVE = 1  # binary: classes[1] is the positive class (LabelSpec)

# A value of the fairness key enters the gaps only with at least this many labels: below it,
# the share of a group is too noisy to rank (binomial sd of an accuracy near 0.8 at n = 30 is
# ~0.07, before any DP noise), so a gap between tiny groups would be mostly noise.
MIN_FAIRNESS_LABELS = 30

NAN = math.nan

# Label scores are left unknown (NaN) when the privacy noise of one histogram cell is more than
# this share of the labels the histograms cover: then the noise alone moves an accuracy by
# ~1.4x that (two cells), far more than the regressions one wants to see. At the demo's noise
# (sd ~20 per cell per report) a cohort needs ~3,000 labels over 25 reports to be judged.
MAX_NOISE_SHARE = 0.035


def _raw(counts: np.ndarray | Sequence[int]) -> np.ndarray:
    return np.asarray(counts, dtype=np.float64)


def _share(num: float, den: float) -> float:
    """A share of noisy counts: num / den clipped into [0, 1] (noise can push it out)."""
    return min(1.0, max(0.0, num / den)) if den > 0 else NAN


# -- classification ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Classification:
    """Scores read off a confusion matrix; NaN where a ratio has nothing to divide by."""

    total: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    positive_rate: float  # binary only (NaN for multiclass)


def classification(confusion: np.ndarray | Sequence[int], k: int,
                   binary: bool, total: float | None = None) -> Classification:
    """Accuracy, precision, recall and F1 from (K+1) x (K+1) counts [true][predicted].

    accuracy = (sum of the diagonal over the K named classes) / total. A label and a
    prediction that are both "other" (index K) are NOT counted correct: two unknown classes
    need not be the same one.

    Binary (the positive class is index 1): precision, recall and F1 of the positive class,
    F1 in its count form 2TP / (2TP + FP + FN), so that it is 0 (not NaN) when there are
    positives but none was found; precision is NaN without predicted positives, recall NaN
    without true positives, F1 NaN only when both are absent. positive_rate = predicted
    positive / total.

    Multiclass: macro averages over the named classes that occur (as a label or as a
    prediction), with sklearn's zero_division=0 convention inside that set: a class that was
    never predicted has precision 0, one never labeled has recall 0 (F1 per class is
    2TP / (support + predicted)). Classes that occur nowhere are left out, so a class the
    cohort never sees cannot drag the average down or turn it into NaN. "other" labels and
    predictions count as errors for the classes they meet but get no average of their own.
    Multiclass per-class ratios are taken on cells clamped at 0 (small noisy cells).

    `total`: the exact number of labels the matrix covers (noisy matrices); default its sum.
    """
    c = _raw(confusion)
    if c.size != (k + 1) ** 2:
        raise ValueError(f"confusion: expected {(k + 1) ** 2} counts for {k} classes, "
                         f"got {c.size}")
    c = c.reshape(k + 1, k + 1)
    total = float(c.sum()) if total is None else float(total)
    diag = np.diag(c)[:k]
    accuracy = _share(float(diag.sum()), total)
    if binary:
        if k != 2:
            raise ValueError(f"confusion: a binary task has 2 classes, got {k}")
        tp = float(c[POSITIVE, POSITIVE])
        predicted = float(c[:, POSITIVE].sum())
        actual = float(c[POSITIVE, :].sum())
        return Classification(total, accuracy, _share(tp, predicted), _share(tp, actual),
                              _share(2 * tp, predicted + actual), _share(predicted, total))
    c = np.clip(c, 0.0, None)
    diag = np.diag(c)[:k]
    support = c[:k, :].sum(axis=1)
    predicted = c[:, :k].sum(axis=0)
    seen = (support > 0) | (predicted > 0)
    if not seen.any():
        return Classification(total, accuracy, NAN, NAN, NAN, NAN)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, diag / predicted, 0.0)
        recall = np.where(support > 0, diag / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * diag / (support + predicted), 0.0)
    return Classification(total, accuracy, float(precision[seen].mean()),
                          float(recall[seen].mean()), float(f1[seen].mean()), NAN)


# -- calibration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    total: float
    brier: float
    ece: float
    # Largest possible error of brier / ece from reading each score at its bin midpoint.
    brier_bound: float
    ece_bound: float


def calibration(counts: np.ndarray | Sequence[int], edges: Sequence[float]) -> Calibration:
    """Brier score and expected calibration error from [bin b: outcome 0, outcome 1] counts.

    With m_b the midpoint of bin b, n0_b / n1_b its counts, n_b = n0_b + n1_b, N = sum n_b:
        ECE   = sum_b (n_b / N) |n1_b / n_b - m_b|
        Brier = sum_b [n1_b (1 - m_b)^2 + n0_b m_b^2] / N

    Error bounds against the same quantities on the raw scores p (bin width w_b):
    - Brier: one event in bin b contributes (y - m_b)^2 instead of (y - p)^2. Their difference
      is (p - m_b)(2y - p - m_b); |p - m_b| <= w_b / 2 and, with y in {0, 1} and p, m_b in
      [0, 1], |2y - p - m_b| <= 2, so each event errs by at most w_b and the score by at most
      sum_b (n_b / N) w_b (<= the widest bin). For a calibrated model the error is second
      order (its expectation is E[(p - m_b)^2] <= w_b^2 / 4), but the bound is what holds.
    - ECE: the raw-data ECE over the same bins uses each bin's mean score instead of m_b; the
      two differ by at most w_b / 2 per bin, so ECE errs by at most sum_b (n_b / N) w_b / 2.
    """
    e = np.asarray(edges, dtype=np.float64)
    bins = e.size - 1
    c = _raw(counts)
    if bins < 1 or c.size != 2 * bins:
        raise ValueError(f"calibration: expected {2 * max(bins, 0)} counts for "
                         f"{e.size} edges, got {c.size}")
    c = c.reshape(bins, 2)
    n0, n1 = c[:, 0], c[:, 1]
    n = n0 + n1
    total = float(n.sum())   # raw: unbiased under noise
    if total <= 0:
        return Calibration(0.0, NAN, NAN, NAN, NAN)
    mid = (e[:-1] + e[1:]) / 2
    width = np.diff(e)
    # Brier is linear in the cells: raw cells keep it unbiased. ECE weighs each bin's
    # |share - midpoint|: there a bin needs a non-negative count and a share in [0, 1].
    brier = min(1.0, max(0.0, float(np.sum(n1 * (1 - mid) ** 2 + n0 * mid ** 2) / total)))
    nc = np.clip(n, 0.0, None)
    if nc.sum() <= 0:
        return Calibration(total, brier, NAN, NAN, NAN)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(nc > 0, np.clip(n1 / n, 0.0, 1.0), 0.0)
    ece = float(np.sum(nc * np.abs(frac - mid)) / nc.sum())
    w = float(np.sum(nc * width) / nc.sum())
    return Calibration(total, brier, ece, w, w / 2)


# -- regression -------------------------------------------------------------------------------

def _numeric_values(edges: np.ndarray) -> np.ndarray:
    """The value each numeric-layout bin (missing excluded) is read at: midpoints, and the
    outer bins at their finite edge."""
    return np.concatenate([[edges[0]], (edges[:-1] + edges[1:]) / 2, [edges[-1]]])


def _numeric_counts(counts: np.ndarray | Sequence[int], edges: np.ndarray,
                    what: str) -> np.ndarray:
    c = _raw(counts)
    if edges.size < 2 or c.size != edges.size + 2:
        raise ValueError(f"{what}: expected {edges.size + 2} counts for {edges.size} edges "
                         f"(underflow, bins, overflow, missing), got {c.size}")
    return c[:-1]  # missing excluded


@dataclass(frozen=True)
class Regression:
    total: float
    mae: float
    rmse: float
    # Some residual fell outside the edges: it is counted at the outer edge, so (with edges
    # around 0) mae and rmse are lower bounds and the bounds below do not hold for them.
    clipped: bool
    # Largest error of mae / rmse from reading residuals at bin midpoints (inner bins).
    mae_bound: float
    rmse_bound: float


def regression(counts: np.ndarray | Sequence[int], edges: Sequence[float],
               total: float | None = None) -> Regression:
    """MAE and RMSE of the residuals (prediction - label) from their numeric-layout histogram.

    Each residual r is read at its bin midpoint v (the underflow at edges[0], the overflow at
    edges[-1]; missing excluded): MAE = sum n_i |v_i| / N, RMSE = sqrt(sum n_i v_i^2 / N).
    Bounds for residuals inside the edges (bin width w_i, |r - v| <= w_i / 2):
    ||r| - |v|| <= |r - v| gives |MAE error| <= sum (n_i / N) w_i / 2, and the triangle
    inequality of the root-mean-square norm gives |RMSE error| <= sqrt(sum (n_i / N) w_i^2 / 4).
    A residual beyond the edges makes both a lower bound (when edges[0] <= 0 <= edges[-1]):
    `clipped` says so. `total`: the exact number of residuals (noisy counts); default the sum.
    Under noise the sums are over the raw cells (unbiased).
    """
    e = np.asarray(edges, dtype=np.float64)
    c = _numeric_counts(counts, e, "residuals")
    total = float(c.sum()) if total is None else float(total)
    if total <= 0:
        return Regression(0.0, NAN, NAN, False, NAN, NAN)
    v = _numeric_values(e)
    mae = max(0.0, float(np.sum(c * np.abs(v)) / total))
    rmse = math.sqrt(max(0.0, float(np.sum(c * v * v)) / total))
    inner = np.clip(c[1:-1], 0.0, None)
    width = np.diff(e)
    return Regression(total, mae, rmse, bool(c[0] > 0 or c[-1] > 0),
                      float(np.sum(inner * width) / total / 2),
                      float(math.sqrt(np.sum(inner * width ** 2) / total / 4)))


# -- quantiles of a binned quantity -----------------------------------------------------------

# A bin of a noisy histogram is read as empty below this many noise sd: a truly empty bin
# passes it with probability ~4e-4 (discrete Laplace tail, 0.5 exp(-5 sqrt 2)).
NOISE_FLOOR_SD = 5.0


def histogram_quantile(counts: np.ndarray | Sequence[int], edges: Sequence[float],
                       q: float, noise_sd: float = 0.0,
                       total: float | None = None) -> tuple[float, bool]:
    """The q-quantile of a numeric-layout histogram and whether it is only a lower bound.

    Linear interpolation inside the bin that holds rank q * N (values assumed uniform within
    a bin), so the estimate lies in the same bin as the true quantile: it errs by at most
    that bin's width. A quantile in the underflow bin is reported at edges[0]; one in the
    overflow bin at edges[-1], flagged as a lower bound. Missing values are excluded. NaN when
    the histogram is empty.

    Noisy counts (`noise_sd`: the noise sd of every cell): a bin below NOISE_FLOOR_SD noise sd
    is read as empty. A quantile's tail is a few percent of the mass, as small as the noise of
    one cell over a merged cohort: kept as they are (or clamped at 0), the empty far bins'
    noise would make up that tail and drag high quantiles out to hours. The price: real bins
    of fewer values than that are ignored, so a cohort too small to rise above the noise
    gets NaN, not a made-up quantile. With the exact number of values (`total`), mass spread
    thinly over the dropped bins is detected: when the kept bins fall short of `total` by more
    than 3 sd of their own noise, where that mass lies is unknown, and the answer is NaN.
    """
    e = np.asarray(edges, dtype=np.float64)
    c = _numeric_counts(counts, e, "histogram")
    if noise_sd > 0:
        keep = c >= NOISE_FLOOR_SD * noise_sd
        c = np.where(keep, c, 0.0)
        if total is not None:
            hidden = float(total) - float(c.sum())
            if hidden > 3.0 * noise_sd * math.sqrt(max(1, int(keep.sum()))):
                return NAN, False
    else:
        c = np.clip(c, 0.0, None)
    total = float(c.sum())
    if total <= 0:
        return NAN, False
    rank = min(max(q, 0.0), 1.0) * total
    cum = np.cumsum(c)
    i = int(np.searchsorted(cum, rank, side="left"))
    i = min(i, c.size - 1)
    while i < c.size - 1 and c[i] == 0:  # rank 0 (q = 0) lands before the first nonempty bin
        i += 1
    if i == 0:
        return float(e[0]), False
    if i == c.size - 1:
        return float(e[-1]), True
    lo, hi = e[i - 1], e[i]
    before = float(cum[i - 1])
    frac = (rank - before) / c[i]
    return float(lo + min(max(frac, 0.0), 1.0) * (hi - lo)), False


# -- per cohort -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSLIs:
    """Ground-truth SLIs of one cohort, named as in the CohortHealth proto message.

    NaN where the spec's task does not have the metric, or where no label histogram arrived.
    """

    task: str = ""                    # "binary", "multiclass", "regression", "" without labels
    labeled: int = 0                  # labels joined with their prediction (exact)
    accuracy: float = NAN
    precision: float = NAN
    recall: float = NAN
    f1: float = NAN
    brier: float = NAN
    ece: float = NAN
    mae: float = NAN
    rmse: float = NAN
    label_latency_p50_s: float = NAN
    label_latency_p95_s: float = NAN
    labels_unmatched: int = 0
    label_cache_evicted: int = 0
    positive_rate: float = NAN
    # Not on the wire. Labels the (noisy) label histograms cover: what the scores rest on.
    histogram_labels: int = 0
    # MAE/RMSE are lower bounds (residuals beyond the edges); p95 latency is past the last edge.
    residuals_clipped: bool = False
    label_latency_p95_lower_bound: bool = False
    # Labels there were, but too few to rise above the privacy noise (MAX_NOISE_SHARE): the
    # histogram-derived scores are NaN.
    insufficient_labels: bool = False


# The proto fields a LabelSLIs fills (everything above the "not on the wire" ones).
PROTO_FIELDS: tuple[str, ...] = ("task", "labeled", "accuracy", "precision", "recall", "f1",
                                 "brier", "ece", "mae", "rmse", "label_latency_p50_s",
                                 "label_latency_p95_s", "labels_unmatched",
                                 "label_cache_evicted", "positive_rate")


def label_slis(spec: Spec, summary: Summary) -> LabelSLIs:
    """The label SLIs of a merged summary under the spec's `labels` (a LabelSpec, or None).

    Histogram-derived scores are NaN when the histograms cover no label (no labels, or every
    report withheld by the privacy budget); the counts are filled regardless."""
    ls = spec.labels
    if ls is None:
        return LabelSLIs()
    counts: dict[str, Any] = {
        "task": ls.task,
        "labeled": summary.labeled_count,
        "labels_unmatched": summary.labels_unmatched_count,
        "label_cache_evicted": summary.label_cache_evicted_count,
        "histogram_labels": summary.label_histogram_count,
    }
    if counts["histogram_labels"] <= 0:
        return LabelSLIs(**counts)
    if math.sqrt(summary.noise_variance_per_bin) > MAX_NOISE_SHARE * counts["histogram_labels"]:
        return LabelSLIs(**counts, insufficient_labels=True)
    out: dict[str, Any] = {}
    latency = summary.label_latency
    n = counts["histogram_labels"]  # exact: what every label histogram but calibration holds
    noise_sd = math.sqrt(summary.noise_variance_per_bin)
    if latency is not None and ls.latency_edges:
        out["label_latency_p50_s"], _ = histogram_quantile(latency, ls.latency_edges, 0.5,
                                                           noise_sd, n)
        p95, p95_low = histogram_quantile(latency, ls.latency_edges, 0.95, noise_sd, n)
        out["label_latency_p95_s"], out["label_latency_p95_lower_bound"] = p95, p95_low
    if ls.task == REGRESSION:
        residuals = summary.residuals
        if residuals is not None and ls.residual_edges:
            r = regression(residuals, ls.residual_edges, n)
            out.update(mae=r.mae, rmse=r.rmse, residuals_clipped=r.clipped)
        return LabelSLIs(**counts, **out)
    confusion = summary.confusion
    if confusion is not None:
        c = classification(confusion, len(ls.classes), binary=ls.task == BINARY, total=n)
        out.update(accuracy=c.accuracy, precision=c.precision, recall=c.recall, f1=c.f1,
                   positive_rate=c.positive_rate)
    cal = summary.calibration
    if cal is not None and ls.calibration_edges:
        k = calibration(cal, ls.calibration_edges)
        out.update(brier=k.brier, ece=k.ece)
    return LabelSLIs(**counts, **out)


# -- fairness ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FairnessGroup:
    value: str
    labeled: int          # labels the group's histograms cover (what eligibility rests on)
    accuracy: float
    positive_rate: float
    eligible: bool        # at least `min_labels` labels: part of the gaps


@dataclass(frozen=True)
class FairnessDelta:
    """The largest gaps between the values of one label key (names as in the proto)."""

    key: str
    accuracy_gap: float = NAN
    accuracy_best: str = ""
    accuracy_worst: str = ""
    positive_rate_gap: float = NAN
    positive_rate_highest: str = ""
    positive_rate_lowest: str = ""
    groups: tuple[FairnessGroup, ...] = field(default_factory=tuple)
    min_labels: int = MIN_FAIRNESS_LABELS


def _gap(groups: Sequence[FairnessGroup], metric: str) -> tuple[float, str, str]:
    scored = [(getattr(g, metric), g.value) for g in groups
              if g.eligible and math.isfinite(getattr(g, metric))]
    if len(scored) < 2:
        return NAN, "", ""
    # Groups come sorted by value and max/min keep the first of equals: ties go to the
    # alphabetically first value, whatever the input order.
    hi = max(scored, key=lambda s: s[0])
    lo = min(scored, key=lambda s: s[0])
    return hi[0] - lo[0], hi[1], lo[1]


def fairness_delta(key: str, groups: Mapping[str, LabelSLIs],
                   min_labels: int = MIN_FAIRNESS_LABELS) -> FairnessDelta:
    """Per value of `key`: labels, accuracy and positive rate (binary); the gaps are
    max - min over the values with at least `min_labels` labels in their histograms (NaN with
    fewer than two such values), with the best / worst (highest / lowest) value named.

    Every group is listed, eligible or not, sorted by value."""
    rows = tuple(FairnessGroup(value, s.histogram_labels, s.accuracy, s.positive_rate,
                               s.histogram_labels >= min_labels)
                 for value, s in sorted(groups.items()))
    acc_gap, best, worst = _gap(rows, "accuracy")
    pos_gap, highest, lowest = _gap(rows, "positive_rate")
    return FairnessDelta(key, acc_gap, best, worst, pos_gap, highest, lowest, rows, min_labels)
