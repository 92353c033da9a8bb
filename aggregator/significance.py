"""Significance of drift scores under the null hypothesis "no drift".

A drift score is never exactly 0, even when nothing changed: the current histogram is a finite
sample (T events), the reference is a finite sample too (T_ref rows), and with differential
privacy every bin of every device report carries independent noise. For a small cohort these
alone make PSI large; for a large one they are negligible. This module turns a score into a
p-value against the distribution the score would have if the cohort's data came from the
reference distribution, so that small cohorts do not cry wolf and large ones do not miss a shift.

Null model (`NullModel`, simulated by `simulate_null`), one draw of S:

1. the "true" proportions are the reference's, r = reference_counts / T_ref;
2. the reference the score is computed against is resampled, ref* ~ Multinomial(T_ref, r)
   (the observed reference is one sample of the truth; this is the parametric bootstrap of the
   two-sample statistic and adds the (B-1)/T_ref term of the noise floor);
3. the current histogram is cur ~ Multinomial(T, r) plus, in every bin, independent noise
   of variance V = `noise_variance_per_bin`. The noise is Gaussian with variance V rounded to
   the nearest integer (counts stay whole numbers, like the real reports; rounding adds 1/12 to
   the variance, negligible once V >= 1). A merged cohort histogram sums the noise of many
   reports, so by the central limit theorem its per-bin noise is close to Gaussian; a single
   device's discrete Laplace noise has heavier tails, which `noise="laplace"` models (a
   rounded Laplace with the same total variance: the heaviest-tailed case, conservative);
4. PSI, JS distance and, for numeric features, binned KS and Wasserstein-1 are computed with
   vectorized versions of `aggregator.drift`'s formulas: same clamping of negative counts,
   same EPS floor and renormalization, same bin points (tests check agreement to 1e-9).

p-value = (1 + #{null >= observed}) / (1 + S) (never 0; ties and simulated empty histograms,
whose scores are NaN, count as "at least as extreme": conservative). With S = 400 the smallest
p-value is 1/401, and p < 0.01 needs at most 3 null draws at or above the observed score.

Caching (`SignificanceCache`). The null depends on the feature (its reference and bin points),
T and V. Counts and variances are bucketed logarithmically, 16 buckets per factor of 10
(key round(16 log10 T) and round(16 log10(1 + V))), and the null is simulated once per bucket
at the bucket's representative value: T and 1 + V within about +-7.5% of it. The null PSI
scales like 1/T (sampling) and V/T^2 (noise), so its quantiles are within ~8% (sampling
dominated) to ~20% (noise dominated) of the exact ones; over many cohorts the errors average
out (the representative is the bucket's centre, not a conservative edge). The cache is
an LRU bounded by `max_entries` (each entry holds the sorted null samples: 4 x S float64,
about 13 kB at S = 400). Each bucket's draws use a generator seeded from (seed, feature
digest, buckets), so results are deterministic and independent of the order of the calls.

Noise floor. `expected_null_psi` is the second-order approximation of the mean null PSI,

    E[PSI] ~ (B+ - 1)/T + (B+ - 1)/T_ref + V/T^2 * (sum_i 1/r_i - B),

(B bins, B+ of them with a positive reference count: empty reference bins get no sampling
variance; r_i floored at EPS and renormalized as in `drift.py`). It expands
(c - r) ln(c / r) ~ (c - r)^2 / r: multinomial sampling contributes (1 - r_i)/T per bin, and
noise e_i on normalized proportions c_i = (T r_i + e_i) / (T + sum e) contributes
V (1 - 2 r_i + B r_i^2) / (T^2 r_i) per bin, which sums to V/T^2 (sum 1/r_i - B) (the -B is the
renormalization; it is small next to sum 1/r_i >= B^2). Its domain, measured against the
simulation (10 equal-mass bins plus a missing bin):

- every bin's noise-plus-sampling sd sqrt(T r_i + V) below ~0.4 T r_i: within ~10%;
- a small bin whose sd is ~0.5-5x its expected count: 10-30% low (the bin is sometimes
  clamped to 0 and floored at EPS, where the logarithm is steep);
- a bin whose sd is >> its count, in particular an empty reference bin (a feature that was
  never missing: r = EPS = 1e-4, so the term V/(T^2 EPS)): far too high, 5x to 1000x (the
  clamp at 0 and the EPS floor bound such a bin's true contribution). E.g. 200 devices with
  b = 10 discrete Laplace noise, T = 20 000, an empty missing bin: 1.0 against a simulated
  0.028.

So the analytic value is for planning (docs tables) on references without tiny bins; the
simulated mean (`Significance.expected_null_psi`), which has no such limitation, is what the
flagging rule uses.

Insufficient data: `insufficient_data(noise_floor, threshold)` is true when the expected null
PSI is at least half the drift threshold. Below the cohort size at which the noise floor is
comparable to the threshold, a score above the threshold is mostly noise, a shift of the size
the threshold means cannot be told apart from it, and the cohort is reported as "insufficient
data" rather than drifting or stable.

Flagging: `is_drifting` = PSI > threshold, PSI's p-value < alpha, and not insufficient data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.errors import ValidationError
from agent.spec import NUMERIC, FeatureSpec
from aggregator.drift import EPS, DriftScores, bin_points, suppress_noise

__all__ = [
    "BUCKETS_PER_DECADE",
    "NullModel",
    "NullSamples",
    "Significance",
    "SignificanceCache",
    "batch_js_distance",
    "batch_ks",
    "batch_psi",
    "batch_wasserstein",
    "count_bucket",
    "draw_null_histograms",
    "expected_null_psi",
    "insufficient_data",
    "is_drifting",
    "min_detectable_psi",
    "noise_bucket",
    "p_value",
    "simulate_null",
]

BUCKETS_PER_DECADE = 16

NoiseKind = Literal["gaussian", "laplace"]

_NAN = float("nan")
_LN2 = math.log(2.0)


# -- vectorized scores (rows are histograms), matching aggregator.drift -----------------------


def _normalize_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clamp negatives, divide each row by its total; also a mask of rows with total > 0.

    Rows whose total is not positive come back as all zeros (their scores are set to NaN).
    """
    clamped = np.clip(counts, 0.0, None)
    total = clamped.sum(axis=-1, keepdims=True)
    ok = total[..., 0] > 0
    safe = np.where(total > 0, total, 1.0)
    return clamped / safe, ok


def _floor_rows(p: np.ndarray) -> np.ndarray:
    floored = np.maximum(p, EPS)
    return floored / floored.sum(axis=-1, keepdims=True)


def _floored_pairs(reference: np.ndarray, current: np.ndarray) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    r, c = np.broadcast_arrays(r, c)
    pr, ok_r = _normalize_rows(r)
    pc, ok_c = _normalize_rows(c)
    return _floor_rows(pr), _floor_rows(pc), ok_r & ok_c


def batch_psi(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """PSI of each row of `current` against the matching row of `reference` (counts).

    Shapes broadcast: (B,) against (S, B) compares every row with one reference. Same
    definition as `aggregator.drift.psi` (clamp, normalize, floor at EPS, renormalize); NaN for
    rows where either side totals 0 after clamping.
    """
    fr, fc, ok = _floored_pairs(reference, current)
    out = np.sum((fc - fr) * np.log(fc / fr), axis=-1)
    return np.where(ok, out, _NAN)


def batch_js_distance(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon distance (base 2), as `aggregator.drift.js_distance`."""
    fr, fc, ok = _floored_pairs(reference, current)
    m = 0.5 * (fr + fc)
    divergence = 0.5 * (np.sum(fr * np.log(fr / m), axis=-1)
                        + np.sum(fc * np.log(fc / m), axis=-1)) / _LN2
    out = np.sqrt(np.clip(divergence, 0.0, 1.0))
    return np.where(ok, out, _NAN)


def batch_ks(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Row-wise binned KS on ordered counts (missing bin already removed), as `ks_binned`."""
    r, c = np.broadcast_arrays(np.asarray(reference, dtype=np.float64),
                               np.asarray(current, dtype=np.float64))
    pr, ok_r = _normalize_rows(r)
    pc, ok_c = _normalize_rows(c)
    out = np.max(np.abs(np.cumsum(pr, axis=-1) - np.cumsum(pc, axis=-1)), axis=-1)
    return np.where(ok_r & ok_c, out, _NAN)


def batch_wasserstein(points: np.ndarray, reference: np.ndarray,
                      current: np.ndarray) -> np.ndarray:
    """Row-wise Wasserstein-1 on `points` (ordered counts, missing removed).

    As `aggregator.drift.wasserstein_binned`; `points` are sorted (stable) first.
    """
    pts = np.asarray(points, dtype=np.float64)
    order = np.argsort(pts, kind="stable")
    r, c = np.broadcast_arrays(np.asarray(reference, dtype=np.float64),
                               np.asarray(current, dtype=np.float64))
    pr, ok_r = _normalize_rows(r[..., order])
    pc, ok_c = _normalize_rows(c[..., order])
    gap = np.abs(np.cumsum(pr - pc, axis=-1)[..., :-1])
    out = np.sum(gap * np.diff(pts[order]), axis=-1)
    return np.where(ok_r & ok_c, out, _NAN)


# -- the null model and its simulation --------------------------------------------------------


@dataclass(frozen=True)
class NullModel:
    """What the null distribution of a feature's drift scores depends on."""

    reference_counts: tuple[int, ...]
    reference_rows: int  # sum of reference_counts: the reference is a finite sample too
    count: int  # current histogram total (events covered, or clamped sum of noisy counts)
    noise_variance_per_bin: float  # total noise variance of every merged bin
    numeric: bool  # numeric features also get KS / Wasserstein
    points: tuple[float, ...] = ()  # numeric: support points of the ordered bins (bin_points)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference_counts", tuple(int(c) for c in self.reference_counts))
        object.__setattr__(self, "points", tuple(float(p) for p in self.points))
        if len(self.reference_counts) < 2 or any(c < 0 for c in self.reference_counts):
            raise ValidationError("reference_counts", "need at least 2 non-negative counts")
        if sum(self.reference_counts) <= 0:
            raise ValidationError("reference_counts", "total must be positive")
        if self.reference_rows <= 0:
            raise ValidationError("reference_rows", "must be positive")
        if self.count <= 0:
            raise ValidationError("count", "must be positive")
        v = float(self.noise_variance_per_bin)
        if not (math.isfinite(v) and v >= 0):
            raise ValidationError("noise_variance_per_bin", f"must be finite and >= 0, got {v}")
        if self.numeric and len(self.points) != len(self.reference_counts) - 1:
            raise ValidationError("points", "a numeric null model needs one point per ordered "
                                  "bin (histogram length - 1)")

    @classmethod
    def for_feature(cls, feature: FeatureSpec, count: int,
                    noise_variance_per_bin: float) -> NullModel:
        numeric = feature.type == NUMERIC
        return cls(
            reference_counts=feature.reference_counts,
            reference_rows=sum(feature.reference_counts),
            count=count,
            noise_variance_per_bin=noise_variance_per_bin,
            numeric=numeric,
            points=tuple(bin_points(feature)) if numeric else (),
        )


@dataclass(frozen=True)
class NullSamples:
    """Simulated null scores, each sorted ascending, NaN (empty histograms) mapped to +inf."""

    psi: np.ndarray
    js: np.ndarray
    ks: np.ndarray | None  # None for categorical features
    wasserstein: np.ndarray | None

    @property
    def samples(self) -> int:
        return int(self.psi.size)


def _noise(rng: np.random.Generator, variance: float, shape: tuple[int, ...],
           kind: NoiseKind) -> np.ndarray:
    if variance <= 0:
        return np.zeros(shape)
    if kind == "gaussian":
        e = rng.normal(0.0, math.sqrt(variance), size=shape)
    elif kind == "laplace":
        e = rng.laplace(0.0, math.sqrt(variance / 2.0), size=shape)
    else:
        raise ValidationError("noise", f"must be 'gaussian' or 'laplace', got {kind!r}")
    return np.rint(e)


def _sorted_null(x: np.ndarray) -> np.ndarray:
    return np.sort(np.where(np.isnan(x), np.inf, x))


def draw_null_histograms(model: NullModel, samples: int = 400,
                         seed: int | Sequence[int] = 0, *, resample_reference: bool = True,
                         noise: NoiseKind = "gaussian", suppress: bool = True
                         ) -> tuple[np.ndarray, np.ndarray]:
    """`samples` null (reference, current) histogram pairs, each of shape (samples, B).

    reference ~ Multinomial(T_ref, r) (or the fixed reference when `resample_reference` is
    False: right only when T_ref >> T); current ~ Multinomial(T, r) + rounded noise of
    variance V per bin. All values are whole numbers (float64).
    """
    if samples < 1:
        raise ValidationError("samples", "must be at least 1")
    rng = np.random.default_rng(seed)
    ref = np.asarray(model.reference_counts, dtype=np.float64)
    props = ref / ref.sum()
    b = props.size
    if resample_reference:
        reference = rng.multinomial(model.reference_rows, props, size=samples).astype(np.float64)
    else:
        reference = np.tile(ref, (samples, 1))
    current = rng.multinomial(model.count, props, size=samples).astype(np.float64)
    current += _noise(rng, float(model.noise_variance_per_bin), (samples, b), noise)
    if suppress:  # the same post-processing the query applies to observed histograms
        current = suppress_noise(current, float(model.noise_variance_per_bin), ref)
    return reference, current


def simulate_null(model: NullModel, samples: int = 400, seed: int | Sequence[int] = 0, *,
                  resample_reference: bool = True, noise: NoiseKind = "gaussian",
                  scores: Literal["all", "psi"] = "all", suppress: bool = True) -> NullSamples:
    """Score `draw_null_histograms(model, samples, seed, ...)` (see the module docstring).

    `scores="psi"` skips JS, KS and Wasserstein (returned as empty / None).
    """
    reference, current = draw_null_histograms(model, samples, seed,
                                              resample_reference=resample_reference,
                                              noise=noise, suppress=suppress)
    null_psi = _sorted_null(batch_psi(reference, current))
    if scores == "psi":
        return NullSamples(null_psi, np.empty(0), None, None)
    null_js = _sorted_null(batch_js_distance(reference, current))
    null_ks = null_w = None
    if model.numeric:
        # Ordered part only, as drift.feature_drift: drop the missing bin, renormalize.
        null_ks = _sorted_null(batch_ks(reference[:, :-1], current[:, :-1]))
        null_w = _sorted_null(batch_wasserstein(np.asarray(model.points), reference[:, :-1],
                                                current[:, :-1]))
    return NullSamples(null_psi, null_js, null_ks, null_w)


FINE_SAMPLES = 20_000   # draws of the PSI-only null made for scores beyond the small one
TAIL_FRACTION = 0.01    # the top share of those draws the exponential tail is fitted to


def tail_p_value(null_sorted: np.ndarray, observed: float) -> float:
    """p-value of `observed` against a sorted null, extrapolated past its top percent.

    Up to the null's (1 - TAIL_FRACTION) quantile u this is the empirical p-value. Beyond u
    it is q * exp(-(x - u) / s), q the share of draws above u and s their mean excess: the
    peaks-over-threshold estimate with an exponential tail. PSI under no drift is close to a
    weighted sum of chi-squares, whose tail is exponential times a power that makes it
    lighter than the exponential fitted further in, so the estimate errs on the side of
    larger p-values (fewer false flags).
    """
    return _TailFit.of(null_sorted).p_value(observed)


@dataclass(frozen=True)
class _TailFit:
    """`tail_p_value`'s fit to one sorted null, made once per null (the cache keeps it with
    the null: a fleet query asks it for every drifting feature of every cohort)."""

    null_sorted: np.ndarray
    n: int
    k: int
    finite_size: int
    u: float
    top: float
    scale: float

    @classmethod
    def of(cls, null_sorted: np.ndarray) -> _TailFit:
        n = int(null_sorted.size)
        finite = null_sorted[np.isfinite(null_sorted)]
        k = max(10, int(math.ceil(TAIL_FRACTION * n)))
        if finite.size <= k:
            return cls(null_sorted, n, k, int(finite.size), math.nan, math.nan, math.nan)
        u = float(finite[-k - 1])
        scale = float((finite[-k:] - u).mean())
        return cls(null_sorted, n, k, int(finite.size), u, float(finite[-1]), scale)

    def p_value(self, observed: float) -> float:
        if math.isnan(observed) or self.finite_size <= self.k or observed <= self.u:
            return p_value(self.null_sorted, observed)
        # draws above u, empty-histogram draws included
        q = (self.k + (self.n - self.finite_size)) / (self.n + 1)
        if self.scale <= 0:
            return q if observed <= self.top else 1.0 / (self.n + 1)
        return max(q * math.exp(-(observed - self.u) / self.scale), 1e-300)


def p_value(null_sorted: np.ndarray | None, observed: float) -> float:
    """(1 + #{null >= observed}) / (1 + S) on sorted null samples; NaN if not applicable.

    "At least as extreme" tolerates a relative 1e-12 so that a null draw identical to the
    observed histogram counts as a tie despite rounding differences (conservative).
    """
    if null_sorted is None or null_sorted.size == 0 or not math.isfinite(observed):
        return _NAN
    threshold = observed - 1e-12 * max(1.0, abs(observed))
    at_least = null_sorted.size - int(np.searchsorted(null_sorted, threshold, side="left"))
    return (1.0 + at_least) / (1.0 + null_sorted.size)


# -- analytic noise floor and decisions -------------------------------------------------------


def expected_null_psi(reference_props: Sequence[float] | np.ndarray, count: float,
                      noise_variance_per_bin: float,
                      reference_rows: float | None = None) -> float:
    """Second-order approximation of the mean PSI under the null (see the module docstring).

    (B+ - 1)/T + (B+ - 1)/T_ref + V/T^2 (sum_i 1/r_i - B). `reference_rows=None` treats the
    reference as exact (no T_ref term). inf when `count` <= 0. Accurate (~10%) when every
    bin's sqrt(T r_i + V) is below ~0.4 T r_i; 10-30% low when a small bin's sd is comparable
    to its count; far too high when a bin's noise dwarfs its count (empty reference bins).
    """
    r = np.asarray(reference_props, dtype=np.float64)
    if r.ndim != 1 or r.size < 2 or not np.all(np.isfinite(r)) or np.any(r < 0) or r.sum() <= 0:
        raise ValidationError("reference_props", "need at least 2 finite, non-negative values "
                              "with a positive sum")
    v = float(noise_variance_per_bin)
    if not (math.isfinite(v) and v >= 0):
        raise ValidationError("noise_variance_per_bin", f"must be finite and >= 0, got {v}")
    t = float(count)
    if not t > 0:
        return math.inf
    r = r / r.sum()
    b = r.size
    b_pos = int(np.count_nonzero(r))
    floored = _floor_rows(r)
    sampling = (b_pos - 1) / t
    if reference_rows is not None:
        sampling += (b_pos - 1) / float(reference_rows) if reference_rows > 0 else math.inf
    noise_term = v / (t * t) * (float(np.sum(1.0 / floored)) - b)
    return sampling + noise_term


def min_detectable_psi(reference_props: Sequence[float] | np.ndarray, count: int,
                       noise_variance_per_bin: float, reference_rows: int | None = None, *,
                       alpha: float = 0.01, samples: int = 2000, seed: int = 0,
                       noise: NoiseKind = "gaussian") -> float:
    """The (1 - alpha) quantile of the simulated null PSI: smaller scores cannot reach p < alpha.

    A shift is flagged only when its PSI exceeds both this and the drift threshold.
    `reference_rows=None` treats the reference as exact. inf when `count` <= 0.
    """
    r = np.asarray(reference_props, dtype=np.float64)
    if count <= 0:
        return math.inf
    scale = 1_000_000_000 if reference_rows is None else int(reference_rows)
    counts = tuple(int(x) for x in np.rint(r / r.sum() * scale))
    model = NullModel(reference_counts=counts, reference_rows=sum(counts), count=int(count),
                      noise_variance_per_bin=noise_variance_per_bin, numeric=False)
    null = simulate_null(model, samples, seed, resample_reference=reference_rows is not None,
                         noise=noise, scores="psi")
    return float(np.quantile(null.psi, 1.0 - alpha))


def insufficient_data(expected_null: float, threshold: float = 0.1) -> bool:
    """True when the noise floor (mean null PSI) is at least half the drift threshold.

    Then a threshold-sized shift cannot be told apart from sampling and privacy noise: report
    "insufficient data" rather than "stable" or "drifting". NaN counts as insufficient.
    """
    return not (expected_null < threshold / 2.0)


# -- per-feature significance with a cache ----------------------------------------------------


@dataclass(frozen=True)
class Significance:
    """p-values of one feature's drift scores against the simulated null."""

    p_psi: float
    p_js: float
    p_ks: float  # NaN for categorical features
    p_wasserstein: float  # NaN for categorical features
    p_value: float  # the p-value used for flagging (PSI's)
    expected_null_psi: float  # mean PSI under the null (simulated): the noise floor
    null_psi_q99: float


_NAN_SIGNIFICANCE = Significance(_NAN, _NAN, _NAN, _NAN, _NAN, math.inf, math.inf)


def count_bucket(count: float) -> int:
    """round(16 log10 count): 16 buckets per factor of 10."""
    return round(BUCKETS_PER_DECADE * math.log10(count))


def noise_bucket(variance: float) -> int:
    """round(16 log10(1 + variance)); 0 for no noise."""
    return round(BUCKETS_PER_DECADE * math.log10(1.0 + variance))


def _count_representative(bucket: int) -> int:
    return max(1, round(10.0 ** (bucket / BUCKETS_PER_DECADE)))


def _noise_representative(bucket: int) -> float:
    return 10.0 ** (bucket / BUCKETS_PER_DECADE) - 1.0


@functools.lru_cache(maxsize=4096)  # a JSON dump and a hash: asked twice per feature health
def _feature_digest(feature: FeatureSpec) -> str:
    """Identity of everything the null depends on: name, type, bins and reference counts."""
    blob = json.dumps(feature.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    null: NullSamples
    mean_psi: float
    q99_psi: float


class SignificanceCache:
    """Null distributions per (feature, count bucket, noise bucket), LRU-bounded, thread-safe.

    `samples` null draws per bucket; `seed` makes the results deterministic;
    `resample_reference` accounts for the reference's own finite sample; `noise` is the noise
    shape ("gaussian": merged cohorts; "laplace": conservative for single reports).
    """

    def __init__(self, samples: int = 400, seed: int = 0, max_entries: int = 10_000, *,
                 resample_reference: bool = True, noise: NoiseKind = "gaussian") -> None:
        if samples < 1:
            raise ValidationError("samples", "must be at least 1")
        if max_entries < 1:
            raise ValidationError("max_entries", "must be at least 1")
        if noise not in ("gaussian", "laplace"):
            raise ValidationError("noise", f"must be 'gaussian' or 'laplace', got {noise!r}")
        self.samples = samples
        self.seed = seed
        self.max_entries = max_entries
        self.resample_reference = resample_reference
        self.noise: NoiseKind = noise
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str, int, int], _Entry] = OrderedDict()
        # PSI-only nulls with many more draws, made only for scores beyond the small null
        # (to resolve p-values down to a multiple-testing-corrected alpha).
        self._fine: OrderedDict[tuple[str, str, int, int, int], _TailFit] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, feature: FeatureSpec, count: int, variance: float) -> _Entry:
        digest = _feature_digest(feature)
        kc, kv = count_bucket(count), noise_bucket(variance)
        key = (feature.name, digest, kc, kv)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        model = NullModel.for_feature(feature, _count_representative(kc),
                                      _noise_representative(kv))
        seed = [self.seed, int(digest[:16], 16), kc, kv]
        null = simulate_null(model, self.samples, seed,
                             resample_reference=self.resample_reference, noise=self.noise)
        finite = null.psi[np.isfinite(null.psi)]
        mean = float(finite.mean()) if finite.size == null.psi.size else math.inf
        entry = _Entry(null, mean, float(np.quantile(null.psi, 0.99)))
        with self._lock:
            self.misses += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry

    def _fine_psi(self, feature: FeatureSpec, count: int, variance: float,
                  samples: int) -> _TailFit:
        digest = _feature_digest(feature)
        kc, kv = count_bucket(count), noise_bucket(variance)
        key = (feature.name, digest, kc, kv, samples)
        with self._lock:
            null = self._fine.get(key)
            if null is not None:
                self._fine.move_to_end(key)
                return null
        model = NullModel.for_feature(feature, _count_representative(kc),
                                      _noise_representative(kv))
        seed = [self.seed, int(digest[:16], 16), kc, kv, samples]
        null = _TailFit.of(simulate_null(model, samples, seed,
                                         resample_reference=self.resample_reference,
                                         noise=self.noise, scores="psi").psi)
        with self._lock:
            self._fine[key] = null
            while len(self._fine) > max(16, self.max_entries // 100):  # each is large
                self._fine.popitem(last=False)
        return null

    def significance(self, feature: FeatureSpec, scores: DriftScores, count: int,
                     noise_variance_per_bin: float, min_p: float | None = None
                     ) -> Significance:
        """p-values of `scores` (from `feature_drift`) for a cohort of `count` events.

        `min_p`: the smallest PSI p-value the caller needs to tell apart (e.g. a Bonferroni-
        corrected alpha); a score beyond the small null gets a larger, PSI-only null with an
        exponential tail (`tail_p_value`).

        `count`: the number of events the histograms cover if known, else the clamped sum of
        the noisy counts (`scores.count`; it overstates T by about sqrt(V/2 pi) per near-empty
        bin). All NaN (and an infinite noise floor) when there is no reference or no data.
        """
        v = float(noise_variance_per_bin)
        if not (math.isfinite(v) and v >= 0):
            raise ValidationError("noise_variance_per_bin", f"must be finite and >= 0, got {v}")
        if not feature.reference_counts or sum(feature.reference_counts) <= 0 or count <= 0:
            return _NAN_SIGNIFICANCE
        entry = self._entry(feature, int(count), v)
        null = entry.null
        p_psi = p_value(null.psi, scores.psi)
        if min_p is not None and 0 < min_p < p_psi <= 2.0 / (null.psi.size + 1):
            # Beyond (almost) every draw of the small null: a larger PSI-only null, and past
            # its own top percent an exponential tail fitted to it (peaks over threshold).
            p_psi = self._fine_psi(feature, int(count), v, FINE_SAMPLES).p_value(scores.psi)
        return Significance(
            p_psi=p_psi,
            p_js=p_value(null.js, scores.js_distance),
            p_ks=p_value(null.ks, scores.ks),
            p_wasserstein=p_value(null.wasserstein, scores.wasserstein),
            p_value=p_psi,
            expected_null_psi=entry.mean_psi,
            null_psi_q99=entry.q99_psi,
        )


def is_drifting(scores: DriftScores, sig: Significance, psi_threshold: float = 0.1,
                alpha: float = 0.01) -> bool:
    """PSI above the threshold, significant at `alpha`, and enough data to tell."""
    return bool(scores.psi > psi_threshold and sig.p_value < alpha
                and not insufficient_data(sig.expected_null_psi, psi_threshold))
