"""One window's cohort samples for the alert engine, computed with the health query.

Example::

    samples = window_samples(store, "detector", "1", engine.samplings, start, start + 60)
    engine.evaluate(start, start + 60, samples)

A sample's metrics are exactly what ``fleetwatch health`` shows for that cohort and window:
every SLI in :data:`~aggregator.alerts.rules.SLI_METRICS` (NaN when the health query does not
compute it), and ``psi:NAME`` / ``drifting:NAME`` for every feature and for the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from aggregator.alerts.engine import CohortSample
from aggregator.alerts.rules import SLI_METRICS, Sampling
from aggregator.query import CohortHealth, cohort_health
from aggregator.significance import SignificanceCache
from aggregator.store.base import Store

__all__ = ["health_metrics", "window_samples"]

_SLI_NAMES = tuple(sorted(SLI_METRICS))


def _number(value: object) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return math.nan  # absent (an SLI this build does not compute yet) or not a number


def health_metrics(h: CohortHealth) -> dict[str, float]:
    """The metrics a rule may name, read from one cohort's health."""
    # getattr with a default: CohortHealth grows SLIs over time; a rule on one it does not
    # have yet sees NaN (unknown: never breaches, never clears) instead of crashing.
    metrics = {name: _number(getattr(h, name, math.nan)) for name in _SLI_NAMES}
    drift = [*h.features, *([h.prediction] if h.prediction is not None else [])]
    for f in drift:
        metrics[f"psi:{f.name}"] = float(f.scores.psi)
        metrics[f"drifting:{f.name}"] = 1.0 if f.drifting else 0.0
    return metrics


def window_samples(store: Store, model: str, model_version: str,
                   samplings: Iterable[Sampling | tuple[str, ...]], start: int, end: int,
                   significance: SignificanceCache | None = None
                   ) -> dict[Sampling, list[CohortSample]]:
    """Per sampling, one sample per cohort with data in its range: the window ``[start, end)``
    itself, or the whole windows of the last ``over_s`` up to ``end`` (never less than the
    window). A bare ``by`` tuple stands for ``Sampling(by)``."""
    out: dict[Sampling, list[CohortSample]] = {}
    length = end - start
    for sampling in samplings:
        if not isinstance(sampling, Sampling):
            sampling = Sampling(tuple(sampling))
        lookback = max(length, -(-int(math.ceil(sampling.over_s)) // length) * length)
        cohorts = cohort_health(store, model, model_version, group_by=sampling.by,
                                start=end - lookback, end=end, significance=significance)
        out[sampling] = [CohortSample(_cohort(h.cohort, sampling.by), health_metrics(h))
                         for h in cohorts]
    return out


def _cohort(cohort: Mapping[str, str], by: tuple[str, ...]) -> dict[str, str]:
    return {k: cohort[k] for k in by}
