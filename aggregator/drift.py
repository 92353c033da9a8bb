"""Drift scores between a feature's reference histogram and a current (merged) histogram.

Histogram layouts (see `agent.spec`):

- numeric, edges e_0 < ... < e_m:  [underflow, [e_0,e_1), ..., [e_{m-1},e_m], overflow, missing]
- categorical, vocabulary v_1..v_k: [v_1, ..., v_k, other, missing]

Current counts may be negative (differential-privacy noise). Definitions:

- Proportions: negative counts are clamped to 0 (only when turning counts into proportions),
  then divided by the total. Before any logarithm the proportions are floored at EPS = 1e-4 and
  renormalized to sum to 1.
- PSI = sum_i (c_i - r_i) * ln(c_i / r_i) over all bins, the missing bin included (a change in
  the missing rate is drift), on floored proportions. Reading: PSI < 0.1 stable, 0.1-0.25
  moderate shift, > 0.25 major shift.
- Jensen-Shannon distance = sqrt(JS divergence) with base-2 logarithms, in [0, 1], over all
  bins including missing, on floored proportions (equal to
  `scipy.spatial.distance.jensenshannon(r, c, base=2)` on the same proportions).
- KS (numeric only): the largest gap between the two cumulative distributions at the bin edges,
  over the ordered part [underflow, bins..., overflow], the missing bin excluded and the rest
  renormalized. Binned KS is a lower bound of the KS statistic on the raw values.
- Wasserstein-1 (numeric only, missing excluded, renormalized): the underflow mass sits at e_0,
  the overflow mass at e_m and each interior bin's mass at its midpoint; W1 is the Wasserstein
  distance between the two discrete distributions on these points (equal to
  `scipy.stats.wasserstein_distance(points, points, r, c)`). `wasserstein_norm` is W1 divided
  by the standard deviation of the reference's discrete distribution on the same points (NaN
  when that standard deviation is 0).
- Categorical features: `ks`, `wasserstein` and `wasserstein_norm` are NaN.
- `missing_rate` = current missing count / current total (clamped counts).
- Empty current (total <= 0 after clamping) or empty reference: every score is NaN and
  `count` is 0. When every non-missing count of either side is 0, KS and Wasserstein are NaN.

KS and Wasserstein use clamped, renormalized proportions without the EPS floor (no logarithms).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from agent.errors import ValidationError
from agent.spec import NUMERIC, FeatureSpec

__all__ = [
    "EPS",
    "DriftScores",
    "bin_points",
    "feature_drift",
    "js_distance",
    "ks_binned",
    "proportions",
    "psi",
    "wasserstein_binned",
]

EPS: float = 1e-4

_NAN = float("nan")


@dataclass(frozen=True)
class DriftScores:
    """Drift of one feature's current histogram against its reference."""

    count: int  # current total (after clamping negatives)
    psi: float
    js_distance: float
    ks: float
    wasserstein: float
    wasserstein_norm: float
    missing_rate: float


# -- validation and normalization -------------------------------------------------------------


def _as_counts(counts: object, name: str) -> np.ndarray:
    """A 1-D, non-empty, finite, real-valued float64 copy of `counts`."""
    arr = np.asarray(counts)
    if arr.ndim != 1:
        raise ValidationError(name, f"must be a 1-D array, got {arr.ndim} dimensions")
    if arr.size == 0:
        raise ValidationError(name, "must not be empty")
    if arr.dtype.kind not in "iuf":
        raise ValidationError(name, f"must hold integer or float counts, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValidationError(name, "counts must be finite")
    return out


def _same_length(reference: np.ndarray, current: np.ndarray) -> None:
    if reference.shape != current.shape:
        raise ValidationError(
            "current", f"length {current.size} does not match the reference length "
            f"{reference.size}")


def _normalize(counts: np.ndarray) -> np.ndarray | None:
    """Clamp negatives to 0 and divide by the total; None when the total is not positive."""
    clamped = np.clip(counts, 0.0, None)
    total = clamped.sum()
    if not total > 0:
        return None
    return clamped / total


def _floor(p: np.ndarray, eps: float) -> np.ndarray:
    floored = np.maximum(p, eps)
    return floored / floored.sum()


def proportions(counts: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Counts to proportions: clamp negatives to 0, normalize, floor at `eps`, renormalize.

    Raises ValueError when the counts are not a 1-D finite array or total 0 after clamping.
    """
    eps = float(eps)
    if not (math.isfinite(eps) and 0 <= eps < 1):
        raise ValidationError("eps", f"must be a finite number in [0, 1), got {eps!r}")
    c = _as_counts(counts, "counts")
    p = _normalize(c)
    if p is None:
        raise ValidationError("counts", "total is 0 after clamping negative counts")
    return _floor(p, eps)


# -- scores on bare counts -------------------------------------------------------------------


def _floored_pair(reference: object, current: object) -> tuple[np.ndarray, np.ndarray] | None:
    r = _as_counts(reference, "reference")
    c = _as_counts(current, "current")
    _same_length(r, c)
    pr, pc = _normalize(r), _normalize(c)
    if pr is None or pc is None:
        return None
    return _floor(pr, EPS), _floor(pc, EPS)


def _psi(r: np.ndarray, c: np.ndarray) -> float:
    return float(np.sum((c - r) * np.log(c / r)))


def _js_distance(r: np.ndarray, c: np.ndarray) -> float:
    m = 0.5 * (r + c)
    divergence = 0.5 * (np.sum(r * np.log(r / m)) + np.sum(c * np.log(c / m))) / math.log(2.0)
    # Rounding can push the divergence a hair outside [0, 1]; the distance lives in [0, 1].
    return float(math.sqrt(min(max(float(divergence), 0.0), 1.0)))


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of `current` against `reference` (counts, same length).

    NaN when either side totals 0 after clamping negative counts.
    """
    pair = _floored_pair(reference, current)
    return _NAN if pair is None else _psi(*pair)


def js_distance(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count vectors of equal length.

    NaN when either side totals 0 after clamping negative counts.
    """
    pair = _floored_pair(reference, current)
    return _NAN if pair is None else _js_distance(*pair)


def ks_binned(reference: np.ndarray, current: np.ndarray) -> float:
    """Largest gap between the cumulative distributions of two ordered count vectors.

    The inputs are the ordered part of a numeric histogram, [underflow, bins..., overflow],
    without the missing bin. NaN when either side totals 0 after clamping negative counts.
    """
    r = _as_counts(reference, "reference")
    c = _as_counts(current, "current")
    _same_length(r, c)
    pr, pc = _normalize(r), _normalize(c)
    if pr is None or pc is None:
        return _NAN
    return float(np.max(np.abs(np.cumsum(pr) - np.cumsum(pc))))


def _check_points(points: object, n: int) -> np.ndarray:
    pts = _as_counts(points, "points")
    if pts.size != n:
        raise ValidationError("points", f"length {pts.size} does not match the counts length {n}")
    return pts


def _wasserstein(pts: np.ndarray, pr: np.ndarray, pc: np.ndarray) -> float:
    order = np.argsort(pts, kind="stable")
    pts, pr, pc = pts[order], pr[order], pc[order]
    gap = np.abs(np.cumsum(pr - pc)[:-1])
    return float(np.sum(gap * np.diff(pts)))


def wasserstein_binned(points: np.ndarray, reference: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein-1 distance between two discrete distributions on the same `points`.

    `reference` and `current` are counts (negatives clamped to 0), one per point. NaN when
    either side totals 0 after clamping.
    """
    r = _as_counts(reference, "reference")
    c = _as_counts(current, "current")
    _same_length(r, c)
    pts = _check_points(points, r.size)
    pr, pc = _normalize(r), _normalize(c)
    if pr is None or pc is None:
        return _NAN
    return _wasserstein(pts, pr, pc)


def bin_points(feature: FeatureSpec) -> np.ndarray:
    """Support points of a numeric feature's ordered bins: e_0, the bin midpoints, e_m."""
    if feature.type != NUMERIC:
        raise ValidationError("feature", f"{feature.name!r} is not numeric")
    edges = np.asarray(feature.edges, dtype=np.float64)
    mids = 0.5 * (edges[:-1] + edges[1:])
    return np.concatenate(([edges[0]], mids, [edges[-1]]))


# -- one feature -----------------------------------------------------------------------------


def feature_drift(feature: FeatureSpec, current: np.ndarray) -> DriftScores:
    """Drift scores of `current` (a histogram in `feature`'s layout) against its reference."""
    n = feature.histogram_length
    where = f"{feature.name}.current"
    raw = np.asarray(current)
    c = _as_counts(raw, where)
    if c.size != n:
        raise ValidationError(
            where, f"expected {n} counts for {feature.type} feature {feature.name!r}, "
            f"got {c.size}")
    if raw.dtype.kind == "f" and not np.all(c == np.round(c)):
        raise ValidationError(where, "counts must be whole numbers")
    empty = DriftScores(0, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN)
    if not feature.reference_counts:
        return empty
    ref = _reference_side(feature)

    clamped = np.clip(c, 0.0, None)
    pc = _normalize(c)
    if ref.pr is None or pc is None:
        return empty

    fc = _floor(pc, EPS)
    psi_value = _psi(ref.fr, fc)
    js_value = _js_distance(ref.fr, fc)
    missing_rate = float(clamped[feature.missing_index] / clamped.sum())

    ks_value = w1 = w1_norm = _NAN
    if feature.type == NUMERIC:
        or_, oc = ref.ordered, _normalize(c[:-1])
        if or_ is not None and oc is not None:
            ks_value = float(np.max(np.abs(np.cumsum(or_) - np.cumsum(oc))))
            w1 = _wasserstein(ref.points, or_, oc)
            w1_norm = w1 / ref.std if ref.std > 0 else _NAN

    return DriftScores(
        count=int(np.clip(raw, 0, None).astype(np.int64).sum()),
        psi=psi_value,
        js_distance=js_value,
        ks=ks_value,
        wasserstein=w1,
        wasserstein_norm=w1_norm,
        missing_rate=missing_rate,
    )


@dataclass(frozen=True)
class _Reference:
    """What `feature_drift` derives from a feature's reference alone (read-only arrays)."""

    pr: np.ndarray | None        # proportions (None: an all-zero reference)
    fr: np.ndarray | None        # floored proportions
    ordered: np.ndarray | None   # the ordered part (no missing bin), renormalized
    points: np.ndarray | None    # numeric bins' support points
    std: float                   # of the ordered reference over the points (0: undefined)


@functools.lru_cache(maxsize=4096)  # per feature spec: a fleet query scores every cohort
def _reference_side(feature: FeatureSpec) -> _Reference:
    n = feature.histogram_length
    r = _as_counts(feature.reference_counts, f"{feature.name}.reference_counts")
    if r.size != n:  # FeatureSpec already checks this; kept for hand-built inputs
        raise ValidationError(
            f"{feature.name}.reference_counts", f"expected {n} counts, got {r.size}")
    pr = _normalize(r)
    fr = None if pr is None else _floor(pr, EPS)
    ordered = points = None
    std = 0.0
    if feature.type == NUMERIC:
        ordered = _normalize(r[:-1])
        points = bin_points(feature)
        if ordered is not None and np.count_nonzero(ordered) > 1:
            # (a one-point reference has standard deviation 0: no normalized Wasserstein)
            mean = float(np.sum(ordered * points))
            std = math.sqrt(float(np.sum(ordered * (points - mean) ** 2)))
    for a in (pr, fr, ordered, points):
        if a is not None:
            a.flags.writeable = False
    return _Reference(pr, fr, ordered, points, std)


# Bins whose noisy count is below this many noise standard deviations are read as empty.
NOISE_SUPPRESSION_SD = 5.0


def suppress_noise(counts: np.ndarray, noise_variance_per_bin: float,
                   reference_counts: np.ndarray | tuple[int, ...],
                   k: float = NOISE_SUPPRESSION_SD) -> np.ndarray:
    """Zero the bins the reference never saw whose noisy count is below k noise sd.

    Post-processing of the DP release (it costs no privacy). Why: PSI weighs a bin by
    ln(c/r), and in a bin the reference never saw (r floored at 1e-4: typically underflow,
    overflow, missing) pure noise becomes a large score. A true zero there stays zero unless
    the noise exceeds k sd (3e-7 at k = 5: a fleet query touches thousands of such bins,
    and one noisy bin past a 3 sd cut would already add ~0.06 to a PSI); bins the reference
    saw are left alone, so a
    real shift into them is never hidden. The significance module applies the same step to
    its null histograms, so p-values stay calibrated.
    """
    if noise_variance_per_bin <= 0:
        return counts
    cut = k * math.sqrt(noise_variance_per_bin)
    empty = np.asarray(reference_counts) == 0
    if not empty.any():
        return counts
    return np.where(empty & (counts < cut), 0, counts)
