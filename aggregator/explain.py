"""Root-cause drill-down: which cohorts, along each label key, a fleet-level regression comes from.

    response = explain(store, "detector", metric="latency_p95_ms", keys=("region", "hw"))
    top = response.contributions[0]    # e.g. hw=pi: p95 68 ms with it, 47 ms without it

The method is leave-one-out over merged summaries. For every value v of a label key, the fleet
(the selection) is merged WITHOUT the cohort key=v and the metric is computed on that merge
exactly as `fleetwatch health` computes it on any merge (the same functions: the latency
quantiles of `aggregator.query`, `aggregator.drift.feature_drift` after `suppress_noise` for
PSI, `aggregator.slis.label_slis` for ground-truth SLIs). The cohort's contribution is the
fleet's value minus the value without it, signed so that positive means "removing the cohort
makes the fleet better" (for accuracy-like metrics, where higher is better, the sign flips).
Its share of the regression is the contribution over the fleet's distance from the reference
(the spec's reference latency quantile; 0 for error rates and PSI; 1 for availability), NaN
when the fleet is no worse than the reference. Contributions of one key need not add up to the
regression: quantiles and PSI are not additive (two bad cohorts can each explain most of it).

Bounded work, whatever the number of values of a key (a key with thousands of device ids):

- Everything in a summary but the latency sketch is additive (counts, histograms, noise
  variances), so "the fleet without v" is the fleet's merge minus v's, one subtraction per
  value: O(values), exact.
- KLL sketches do not subtract. The values are ordered by events and the first
  `MAX_SKETCH_COHORTS` get an exact leave-one-out sketch from prefix and suffix merges
  (without_i = merge(c_1..c_{i-1}) + merge(c_{i+1}..c_n), the rest of the values folded into
  one sketch at the end): about 3 x that many sketch merges per key instead of values^2. For
  latency metrics, values beyond that bound (the smallest by events) are not ranked.
- Device counts (availability) subtract too: a device is counted under its label set, so the
  fleet's count minus the cohort's is exact unless a device changed labels within the range.

Only the answer crosses to the wire: the function returns the `ExplainResponse` the Query
service sends (`protos/fleetwatch.proto` defines the fields).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from datasketches import kll_floats_sketch

from agent.errors import ValidationError
from agent.spec import FeatureSpec, Spec
from agent.summary import Summary, empty_kll
from aggregator.compare import LATENCY_QUANTILES
from aggregator.drift import feature_drift, suppress_noise
from aggregator.query import (
    MergedCohort,
    QueryError,
    _reference_latency,
    merged_cohorts,
    resolve_range,
    resolve_spec,
)
from aggregator.slis import label_slis
from aggregator.store.base import DAY_S, Store
from protos import fleetwatch_pb2 as pb

__all__ = ["DEFAULT_LIMIT", "EXPLAINABLE_METRICS", "MAX_SKETCH_COHORTS", "explain",
           "metric_direction"]

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 10
# Values of one key that get an exact leave-one-out latency sketch (see the module docstring).
MAX_SKETCH_COHORTS = 256
PSI_PREFIX = "psi:"
PREDICTION = "prediction"   # psi:prediction: the drift of the model's output

# Ground-truth SLIs (aggregator.slis.LabelSLIs fields) and whether a higher value is worse.
_LABEL_METRICS = {"accuracy": False, "precision": False, "recall": False, "f1": False,
                  "brier": True, "ece": True, "mae": True, "rmse": True,
                  "label_latency_p50_s": True, "label_latency_p95_s": True,
                  # Not a quality score: a rising positive rate is read as the regression.
                  "positive_rate": True}
EXPLAINABLE_METRICS: tuple[str, ...] = (*LATENCY_QUANTILES, "error_rate", "availability",
                                        *_LABEL_METRICS)
# Counts (events, devices, labeled, heartbeats, withheld_reports) are not regressions a
# cohort explains by leave-one-out: the fleet without a cohort has exactly that many fewer.


@dataclass(frozen=True)
class _Part:
    """A merge of some cohorts: the summary and the device counts availability needs."""

    summary: Summary
    devices: int = 0
    devices_last_day: int = 0


@dataclass(frozen=True)
class _Metric:
    name: str
    higher_is_worse: bool
    value: Callable[[_Part], float]
    reference: float
    latency: bool = False    # needs leave-one-out KLL sketches
    devices: bool = False    # needs device counts per cohort


def metric_direction(metric: str) -> bool:
    """True when a higher value of `metric` is worse (latency, errors, drift, calibration)."""
    if metric.startswith(PSI_PREFIX) or metric in LATENCY_QUANTILES or metric == "error_rate":
        return True
    if metric == "availability":
        return False
    if metric in _LABEL_METRICS:
        return _LABEL_METRICS[metric]
    raise ValidationError("metric", f"unknown metric {metric!r}")


def _psi_feature(spec: Spec, name: str) -> FeatureSpec | None:
    for f in spec.features:
        if f.name == name:
            return f
    if spec.prediction is not None and name in (PREDICTION, spec.prediction.name):
        return spec.prediction
    return None


def _metric(spec: Spec, name: str) -> _Metric:
    nan = math.nan
    if name.startswith(PSI_PREFIX):
        feature = _psi_feature(spec, name[len(PSI_PREFIX):])
        if feature is None:
            known = [f.name for f in spec.features] + ([PREDICTION] if spec.prediction else [])
            raise ValidationError("metric", f"{name!r}: model {spec.model!r} version "
                                  f"{spec.model_version!r} has no feature "
                                  f"{name[len(PSI_PREFIX):]!r} (known: {', '.join(known)})")
        is_prediction = feature is spec.prediction

        def psi(p: _Part) -> float:
            s = p.summary
            counts = s.prediction if is_prediction else s.features[feature.name]
            if counts is None:
                return nan
            # As aggregator.query._feature_health scores a cohort.
            return float(feature_drift(feature, suppress_noise(
                counts, s.noise_variance_per_bin, feature.reference_counts)).psi)

        return _Metric(name, True, psi, 0.0)
    if name in LATENCY_QUANTILES:
        q = LATENCY_QUANTILES[name]
        ref = _reference_latency(spec)[list(LATENCY_QUANTILES).index(name)]

        def quantile(p: _Part) -> float:
            sketch = p.summary.latency
            return nan if sketch.is_empty() else float(sketch.get_quantile(q))

        return _Metric(name, True, quantile, ref, latency=True)
    if name == "error_rate":
        return _Metric(name, True, lambda p: (p.summary.error_count / p.summary.event_count
                                              if p.summary.event_count > 0 else nan), 0.0)
    if name == "availability":
        # The ideal is every device of the last day reporting.
        return _Metric(name, False, lambda p: (p.devices / p.devices_last_day
                                               if p.devices_last_day > 0 else nan), 1.0,
                       devices=True)
    if name in _LABEL_METRICS:
        if spec.labels is None:
            raise ValidationError("metric", f"{name!r}: model {spec.model!r} version "
                                  f"{spec.model_version!r} gets no ground truth (its spec has "
                                  "no labels)")
        return _Metric(name, _LABEL_METRICS[name],
                       lambda p: float(getattr(label_slis(spec, p.summary), name)), nan)
    raise ValidationError("metric", f"cannot explain {name!r} (explainable: "
                          f"{', '.join(EXPLAINABLE_METRICS)}, psi:FEATURE, psi:prediction)")


def _minus(total: Summary, part: Summary, latency: kll_floats_sketch) -> Summary:
    """total - part for every additive field (all but the latency sketch, given instead)."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(Summary):
        a, b = getattr(total, f.name), getattr(part, f.name)
        if f.name == "latency":
            values[f.name] = latency
        elif a is None or b is None:
            values[f.name] = None
        elif isinstance(a, dict):
            values[f.name] = {k: a[k] - b[k] for k in a}
        else:
            values[f.name] = a - b
    # Float rounding must not leave a negative variance.
    values["noise_variance_per_bin"] = max(0.0, float(values["noise_variance_per_bin"]))  # type: ignore[arg-type]
    return Summary(**values)  # type: ignore[arg-type]


def _merged(*sketches: kll_floats_sketch) -> kll_floats_sketch:
    out = empty_kll()
    for s in sketches:
        if not s.is_empty():
            out.merge(s)
    return out


def _leave_one_out_sketches(cohorts: Sequence[MergedCohort]) -> dict[int, kll_floats_sketch]:
    """Index in `cohorts` -> the latency sketch of all the others, for the largest
    MAX_SKETCH_COHORTS by events (prefix and suffix merges: O(n) merges, not O(n^2))."""
    order = sorted(range(len(cohorts)), key=lambda i: -cohorts[i].summary.event_count)
    top, rest = order[:MAX_SKETCH_COHORTS], order[MAX_SKETCH_COHORTS:]
    sketches = [cohorts[i].summary.latency for i in top]
    sketches.append(_merged(*(cohorts[i].summary.latency for i in rest)))
    n = len(sketches)
    prefix = [empty_kll()]
    for s in sketches[:-1]:
        prefix.append(_merged(prefix[-1], s))
    suffix = [empty_kll()] * (n + 1)
    for i in range(n - 1, 0, -1):
        suffix[i] = _merged(sketches[i], suffix[i + 1])
    return {c: _merged(prefix[j], suffix[j + 1]) for j, c in enumerate(top)}


def _share(contribution: float, regression: float) -> float:
    if not (math.isfinite(contribution) and math.isfinite(regression)) or regression <= 0:
        return math.nan
    return contribution / regression


def _rank_key(c: pb.CohortContribution) -> tuple[bool, float, str, str]:
    finite = math.isfinite(c.contribution)
    return (not finite, -c.contribution if finite else 0.0, c.key, c.value)


def explain(store: Store, model: str, model_version: str = "",
            selector: Mapping[str, str] | None = None, metric: str = "latency_p95_ms",
            start: int = 0, end: int = 0, keys: Sequence[str] = (),
            limit: int = DEFAULT_LIMIT, now: float | None = None) -> pb.ExplainResponse:
    """Rank the cohorts of each label key in `keys` (default: every key of the selection's
    devices but those the selector fixes) by their contribution to `metric` over the
    selection; at most `limit` per key (0: DEFAULT_LIMIT), largest contribution first.

    Raises QueryError for an unknown model or a selection without data in the range, and
    ValidationError (field "metric" or "keys") for what cannot be explained."""
    selector = dict(selector or {})
    limit = limit or DEFAULT_LIMIT
    spec = resolve_spec(store, model, model_version)
    m = _metric(spec, metric)
    lo, hi = resolve_range(start, end, spec.window_length_s, now)
    known = sorted({k for ls in store.label_sets(spec.hash) if ls.matches(selector)
                    for k in ls.labels})
    if keys:
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValidationError("keys", f"{unknown[0]!r} is not a label of any device in "
                                  f"this selection (known keys: {', '.join(known) or 'none'})")
        keys = list(dict.fromkeys(keys))
    else:
        keys = [k for k in known if k not in selector]
    fleets = merged_cohorts(store, spec, selector, (), lo, hi)
    if not fleets:
        raise QueryError(f"no data for model {spec.model!r} version {spec.model_version!r} "
                         f"in {selector or 'the fleet'} over [{lo}, {hi}): widen --since or "
                         "check --cohort")
    [fleet_mc] = fleets
    day_lo = min(lo, hi - DAY_S)  # availability's denominator, as cohort_health takes it

    def devices(mc: MergedCohort) -> tuple[int, int]:
        if not m.devices:
            return 0, 0
        return (store.device_count(spec.hash, mc.label_set_ids, lo, hi),
                store.device_count(spec.hash, mc.member_ids, day_lo, hi))

    fleet = _Part(fleet_mc.summary, *devices(fleet_mc))
    fleet_value = m.value(fleet)
    sign = 1.0 if m.higher_is_worse else -1.0
    regression = sign * (fleet_value - m.reference)
    events = fleet.summary.event_count
    out: list[pb.CohortContribution] = []
    for key in keys:
        cohorts = merged_cohorts(store, spec, selector, (key,), lo, hi)
        sketches = _leave_one_out_sketches(cohorts) if m.latency else {}
        rows = []
        for i, mc in enumerate(cohorts):
            if m.latency and i not in sketches:
                continue  # beyond MAX_SKETCH_COHORTS: not ranked (module docstring)
            mine = _Part(mc.summary, *devices(mc))
            without = _Part(_minus(fleet.summary, mc.summary, sketches.get(i, empty_kll())),
                            fleet.devices - mine.devices,
                            fleet.devices_last_day - mine.devices_last_day)
            value_without = m.value(without)
            contribution = sign * (fleet_value - value_without)
            rows.append(pb.CohortContribution(
                key=key, value=mc.cohort[key], cohort_value=m.value(mine),
                fleet_without=value_without,
                event_share=mc.summary.event_count / events if events else math.nan,
                contribution=contribution, contribution_share=_share(contribution, regression),
                events=mc.summary.event_count))
        rows.sort(key=_rank_key)
        out.extend(rows[:limit])
    out.sort(key=_rank_key)
    logger.debug("explain %s over %d keys: fleet %.4g, reference %.4g", metric, len(keys),
                 fleet_value, m.reference)
    return pb.ExplainResponse(metric=metric, model=spec.model, model_version=spec.model_version,
                              start_unix_s=lo, end_unix_s=hi, fleet_value=fleet_value,
                              reference_value=m.reference, higher_is_worse=m.higher_is_worse,
                              contributions=out)
