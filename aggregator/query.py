"""Cohort health: select label sets, merge their rollups over a time range, score them.

Nothing is precomputed per cohort: any selector and any grouping works, because the rollups are
kept per label set and summaries merge.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from datasketches import kll_floats_sketch

from agent.privacy import noise_plan
from agent.spec import EVENT, FeatureSpec, Spec
from agent.summary import Summary
from aggregator.drift import DriftScores, feature_drift, suppress_noise
from aggregator.significance import (
    Significance,
    SignificanceCache,
    insufficient_data,
    is_drifting,
)
from aggregator.slis import PROTO_FIELDS, FairnessDelta, LabelSLIs, fairness_delta, label_slis
from aggregator.store.base import (
    DAY_S,
    LabelSet,
    PrivacyStats,
    Store,
    rollup_resolutions,
    time_cover,
)
from aggregator.store.rollup_cache import Lru

__all__ = ["CohortHealth", "CohortPrivacy", "MergedCohort", "QueryError", "cohort_fairness",
           "cohort_health", "cohort_privacy", "list_cohorts", "merged_cohorts", "resolve_range",
           "resolve_spec"]

logger = logging.getLogger(__name__)

DEFAULT_RANGE_S = 3600
PSI_THRESHOLD = 0.1   # a feature drifts when its PSI passes this and is significant
# False-flag rate per cohort and evaluation, over all its signals (Bonferroni). Health is
# asked again and again (every minute, for every cohort): at 1e-3 a 5-device cohort still
# raised ~1 false flag a day (measured with scripts/dp_detection.py); 1e-5 makes it ~0.01.
ALPHA_FAMILY = 1e-5
NONE_VALUE = ""  # group value for label sets that lack the group key


class QueryError(ValueError):
    """A query that cannot be answered as asked (unknown model, bad range)."""


@dataclass(frozen=True)
class FeatureHealth:
    """A feature's drift scores with their significance."""

    name: str
    scores: DriftScores
    significance: Significance
    drifting: bool
    insufficient_data: bool


@dataclass(frozen=True)
class CohortHealth:
    """One cohort's SLIs and drift over a range.

    The ground-truth SLIs live in `ground_truth` and read as attributes of the health, too
    (`health.accuracy`, `health.label_latency_p95_s`, ...: the CohortHealth proto's names),
    so code that maps a metric name to a value needs no special case for them."""

    cohort: Mapping[str, str]
    model: str
    model_version: str
    spec_hash: str
    start_unix_s: int
    end_unix_s: int
    devices: int
    reports: int
    events: int
    errors: int
    error_rate: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_rank_error: float
    features: Sequence[FeatureHealth] = field(default_factory=tuple)
    prediction: FeatureHealth | None = None
    late_events: int = 0
    invalid_values: int = 0
    unknown_features: int = 0
    spool_dropped: int = 0
    reference_latency_ms: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    withheld_reports: int = 0
    histogram_events: int = 0
    noise_sd_per_bin: float = 0.0
    # Devices that reported in the range (heartbeats count) over those that reported in the
    # day before its end (NaN when none did).
    devices_last_day: int = 0
    availability: float = math.nan
    heartbeats: int = 0
    ground_truth: LabelSLIs = field(default_factory=LabelSLIs)

    def __getattr__(self, name: str) -> object:
        # Only called when normal lookup fails: the ground-truth fields, flat.
        if name in _GROUND_TRUTH_FIELDS:
            return getattr(self.ground_truth, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


_GROUND_TRUTH_FIELDS = frozenset(PROTO_FIELDS)


def resolve_spec(store: Store, model: str, model_version: str = "") -> Spec:
    spec = store.get_spec(model, model_version)
    if spec is None:
        known = sorted({s.model for s in store.list_specs()})
        what = f"{model}/{model_version}" if model_version else model
        raise QueryError(f"no spec registered for model {what!r} (known models: "
                         f"{', '.join(known) or 'none'}); push one with `fleetwatch spec push`")
    return spec


def resolve_range(start: int, end: int, window_length_s: int,
                  now: float | None = None) -> tuple[int, int]:
    """[start, end) in window starts, aligned outward to whole windows.

    end 0 means now; start 0 means end minus one hour."""
    if end <= 0:
        end = int(time.time() if now is None else now)
    if start <= 0:
        start = end - DEFAULT_RANGE_S
    if start >= end:
        raise QueryError(f"empty time range: start {start} is not before end {end}")
    length = window_length_s
    return (start // length) * length, -(-end // length) * length


def _latency_quantiles_of(sketch: kll_floats_sketch) -> tuple[float, float, float]:
    if sketch.is_empty():
        return math.nan, math.nan, math.nan
    p50, p95, p99 = sketch.get_quantiles([0.5, 0.95, 0.99])
    return float(p50), float(p95), float(p99)


def _reference_latency(spec: Spec) -> tuple[float, float, float]:
    if not spec.latency_reference_kll:
        return math.nan, math.nan, math.nan
    return _latency_quantiles_of(kll_floats_sketch.deserialize(spec.latency_reference_kll))


def _group_key(ls: LabelSet, group_by: Sequence[str]) -> tuple[str, ...]:
    return tuple(ls.labels.get(k, NONE_VALUE) for k in group_by)


_DEFAULT_SIGNIFICANCE = SignificanceCache()

# Per significance cache: FeatureHealth by everything `_feature_health` reads. A repeated
# query over closed buckets merges to the same counts, and drift with its significance was
# ~30 % of a day's health query (12 features x 20 cohorts; docs/performance.md).
_FEATURE_MEMO: weakref.WeakKeyDictionary[SignificanceCache, Lru] = weakref.WeakKeyDictionary()
_FEATURE_MEMO_LOCK = threading.Lock()
FEATURE_MEMO_ENTRIES = 4096


def _feature_health_memo(spec: Spec, feature: FeatureSpec, counts: np.ndarray, merged: Summary,
                         cache: SignificanceCache, alpha: float) -> FeatureHealth:
    """`_feature_health`, remembered by its inputs' values (the counts by their bytes)."""
    with _FEATURE_MEMO_LOCK:
        memo = _FEATURE_MEMO.get(cache)
        if memo is None:
            memo = _FEATURE_MEMO[cache] = Lru(FEATURE_MEMO_ENTRIES)
    counts = np.asarray(counts)
    key = (spec.hash, feature.name, counts.dtype.str, counts.shape, counts.tobytes(),
           merged.noise_variance_per_bin, merged.histogram_event_count, alpha)
    hit = memo.get(key)
    if hit is None:
        hit = _feature_health(feature, counts, merged, cache, alpha)
        memo.put(key, hit)
    return hit  # type: ignore[return-value]


def _feature_health(feature: FeatureSpec, counts: np.ndarray, merged: Summary,
                    cache: SignificanceCache, alpha: float) -> FeatureHealth:
    scores = feature_drift(feature, suppress_noise(counts, merged.noise_variance_per_bin,
                                                   feature.reference_counts))
    # The events the histograms cover, not the clamped noisy sum (which overstates it).
    count = merged.histogram_event_count or scores.count
    sig = cache.significance(feature, scores, count, merged.noise_variance_per_bin,
                             min_p=alpha / 2)
    return FeatureHealth(feature.name, scores, sig,
                         drifting=is_drifting(scores, sig, PSI_THRESHOLD, alpha),
                         insufficient_data=insufficient_data(sig.expected_null_psi,
                                                             PSI_THRESHOLD))


@dataclass(frozen=True)
class MergedCohort:
    """One cohort's label sets and the merge of their rollups over a range."""

    cohort: Mapping[str, str]
    label_set_ids: tuple[int, ...]   # the label sets with data in the range
    summary: Summary
    # Every label set of the cohort, with data in the range or not (availability's "last day").
    member_ids: tuple[int, ...] = ()


def merged_cohorts(store: Store, spec: Spec, selector: Mapping[str, str],
                   group_by: Sequence[str], lo: int, hi: int,
                   include_empty: bool = False) -> list[MergedCohort]:
    """Per cohort of the selection (sorted by group key), the merged summary over [lo, hi).

    Cohorts without any rollup in the range are left out, unless `include_empty`: then they
    come with a zero summary and no `label_set_ids` (their `member_ids` say who they are)."""
    cover = time_cover(lo, hi, rollup_resolutions(spec.window_length_s))
    groups = _select(store, spec, selector, group_by)
    out = []
    for key in sorted(groups):
        per_set = store.merged_rollups(spec.hash, (ls.id for ls in groups[key]), cover)
        if not per_set and not include_empty:
            continue
        merged = Summary.zero(spec)
        for s in per_set.values():
            merged.merge_in(s)
        cohort = dict(selector)
        cohort.update(zip(group_by, key, strict=True))
        out.append(MergedCohort(cohort, tuple(sorted(per_set)), merged,
                                tuple(sorted(ls.id for ls in groups[key]))))
    return out


def cohort_health(store: Store, model: str, model_version: str = "",
                  selector: Mapping[str, str] | None = None, group_by: Sequence[str] = (),
                  start: int = 0, end: int = 0, now: float | None = None,
                  significance: SignificanceCache | None = None) -> list[CohortHealth]:
    """Health of every cohort of the selection, grouped by `group_by` keys (sorted by key)."""
    # `is None`, not `or`: an empty cache is falsy (it has a length) but is still the caller's.
    significance = _DEFAULT_SIGNIFICANCE if significance is None else significance
    selector = dict(selector or {})
    spec = resolve_spec(store, model, model_version)
    lo, hi = resolve_range(start, end, spec.window_length_s, now)
    reference_latency = _reference_latency(spec)
    alpha = ALPHA_FAMILY / max(1, spec.private_histograms)  # per signal
    out = []
    # Availability's denominator: the day before the range's end, or the whole range when it
    # is longer (so that a device counted above is always counted below: availability <= 1).
    day_lo = min(lo, hi - DAY_S)
    for mc in merged_cohorts(store, spec, selector, group_by, lo, hi, include_empty=True):
        merged = mc.summary
        last_day = store.device_count(spec.hash, mc.member_ids, day_lo, hi)
        if not mc.label_set_ids:
            # Silence is the worst outage, not the absence of a cohort: a cohort whose every
            # device stopped reporting (heartbeats included) stays listed, at availability
            # 0, for a day after its last report.
            if last_day:
                out.append(_silent_cohort(spec, mc, lo, hi, last_day, reference_latency))
            continue
        p50, p95, p99 = _latency_quantiles_of(merged.latency)
        devices = store.device_count(spec.hash, mc.label_set_ids, lo, hi)
        out.append(CohortHealth(
            cohort=mc.cohort,
            model=spec.model,
            model_version=spec.model_version,
            spec_hash=spec.hash,
            start_unix_s=lo,
            end_unix_s=hi,
            devices=devices,
            reports=merged.report_count,
            events=merged.event_count,
            errors=merged.error_count,
            error_rate=merged.error_count / merged.event_count if merged.event_count else math.nan,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
            latency_rank_error=merged.latency.normalized_rank_error(False)
            if not merged.latency.is_empty() else 0.0,
            features=tuple(_feature_health_memo(spec, f, merged.features[f.name], merged,
                                                significance, alpha) for f in spec.features),
            prediction=(_feature_health_memo(spec, spec.prediction, merged.prediction, merged,
                                             significance, alpha)
                        if spec.prediction is not None and merged.prediction is not None
                        else None),
            late_events=merged.late_event_count,
            invalid_values=merged.invalid_value_count,
            unknown_features=merged.unknown_feature_count,
            spool_dropped=merged.spool_dropped_count,
            reference_latency_ms=reference_latency,
            withheld_reports=merged.withheld_report_count,
            histogram_events=merged.histogram_event_count,
            noise_sd_per_bin=math.sqrt(merged.noise_variance_per_bin),
            devices_last_day=last_day,
            availability=devices / last_day if last_day else math.nan,
            heartbeats=merged.heartbeat_count,
            ground_truth=label_slis(spec, merged),
        ))
    return out


def _silent_cohort(spec: Spec, mc: MergedCohort, lo: int, hi: int, last_day: int,
                   reference_latency: tuple[float, float, float]) -> CohortHealth:
    nan = math.nan
    return CohortHealth(
        cohort=mc.cohort, model=spec.model, model_version=spec.model_version,
        spec_hash=spec.hash, start_unix_s=lo, end_unix_s=hi, devices=0, reports=0, events=0,
        errors=0, error_rate=nan, latency_p50_ms=nan, latency_p95_ms=nan, latency_p99_ms=nan,
        latency_rank_error=0.0, reference_latency_ms=reference_latency,
        devices_last_day=last_day, availability=0.0, heartbeats=0,
        ground_truth=label_slis(spec, mc.summary))


def cohort_fairness(store: Store, model: str, model_version: str = "",
                    selector: Mapping[str, str] | None = None, key: str = "",
                    start: int = 0, end: int = 0, now: float | None = None) -> FairnessDelta:
    """The largest gaps in accuracy and positive rate between the values of label key `key`
    within the selection (aggregator.slis.fairness_delta). Devices without the key are left
    out: they belong to no value of it."""
    selector = dict(selector or {})
    spec = resolve_spec(store, model, model_version)
    if spec.labels is None:
        raise QueryError(f"fairness_key {key!r}: model {spec.model!r} version "
                         f"{spec.model_version!r} gets no ground truth (its spec has no "
                         "labels), so there is no accuracy to compare")
    known = sorted({k for ls in store.label_sets(spec.hash) if ls.matches(selector)
                    for k in ls.labels})
    if key not in known:
        raise QueryError(f"fairness_key {key!r} is not a label of any device in this "
                         f"selection (known keys: {', '.join(known) or 'none'})")
    lo, hi = resolve_range(start, end, spec.window_length_s, now)
    groups = {mc.cohort[key]: label_slis(spec, mc.summary)
              for mc in merged_cohorts(store, spec, selector, [key], lo, hi)
              if mc.cohort[key] != NONE_VALUE}
    return fairness_delta(key, groups)


@dataclass(frozen=True)
class CohortPrivacy:
    cohort: Mapping[str, str]
    spec: Spec
    start_unix_s: int
    end_unix_s: int
    noise_sd_per_bin: float
    stats: PrivacyStats
    per_event_epsilon: float


def _select(store: Store, spec: Spec, selector: Mapping[str, str],
            group_by: Sequence[str]) -> dict[tuple[str, ...], list[LabelSet]]:
    groups: dict[tuple[str, ...], list[LabelSet]] = {}
    for ls in store.label_sets(spec.hash):
        if ls.matches(selector):
            groups.setdefault(_group_key(ls, group_by), []).append(ls)
    return groups


def cohort_privacy(store: Store, model: str, model_version: str = "",
                   selector: Mapping[str, str] | None = None, group_by: Sequence[str] = (),
                   start: int = 0, end: int = 0, now: float | None = None
                   ) -> list[CohortPrivacy]:
    """Per cohort: how much budget its devices spent and how many are withholding."""
    selector = dict(selector or {})
    spec = resolve_spec(store, model, model_version)
    lo, hi = resolve_range(start, end, spec.window_length_s, now)
    plan = noise_plan(spec)
    out = []
    for key, members in sorted(_select(store, spec, selector, group_by).items()):
        stats = store.privacy_stats(spec.hash, (ls.id for ls in members), lo, hi)
        if not stats.reports:
            continue
        cohort = dict(selector)
        cohort.update(zip(group_by, key, strict=True))
        out.append(CohortPrivacy(
            cohort=cohort, spec=spec, start_unix_s=lo, end_unix_s=hi,
            noise_sd_per_bin=math.sqrt(plan.variance_per_bin) if plan else 0.0,
            stats=stats,
            per_event_epsilon=(spec.privacy.epsilon_per_window
                               if plan and spec.privacy.unit == EVENT else math.nan)))
    return out


def list_cohorts(store: Store, model: str, model_version: str = "") -> list[LabelSet]:
    spec = resolve_spec(store, model, model_version)
    return store.label_sets(spec.hash)


