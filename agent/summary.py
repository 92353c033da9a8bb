"""Mergeable window summaries: the value that crosses from device to aggregator.

A `Summary` is a monoid: `Summary.zero(spec)` is the identity and `merge` adds counts and merges
the latency sketch, so device -> aggregator and region -> centre use the same code. Summaries
of different specs are never merged (their histograms do not line up).

Label-derived histograms (`confusion`, `calibration`, `residuals`, `label_latency`) are present
exactly when the spec's `LabelSpec` task has them, and None otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasketches import kll_floats_sketch

from agent.spec import Spec

__all__ = ["KLL_K", "LABEL_HISTOGRAMS", "Summary", "empty_kll"]

KLL_K = 200  # normalized rank error ~1.33% (single rank), ~1.65% (pmf)

_COUNTERS = (
    "report_count",
    "event_count",
    "error_count",
    "late_event_count",
    "invalid_value_count",
    "unknown_feature_count",
    "spool_dropped_count",
    "withheld_report_count",
    "histogram_event_count",
    "clamped_event_count",
    "noise_variance_per_bin",
    "labeled_count",
    "heartbeat_count",
    "labels_unmatched_count",
    "label_cache_evicted_count",
    "clamped_label_count",
    "label_histogram_count",
)

LABEL_HISTOGRAMS = ("confusion", "calibration", "residuals", "label_latency")


def empty_kll() -> kll_floats_sketch:
    return kll_floats_sketch(KLL_K)


@dataclass
class Summary:
    """Counts, per-feature histograms and a latency sketch for one or more windows."""

    features: dict[str, np.ndarray]
    prediction: np.ndarray | None
    latency: kll_floats_sketch = field(default_factory=empty_kll)
    report_count: int = 0
    event_count: int = 0
    error_count: int = 0
    late_event_count: int = 0
    invalid_value_count: int = 0
    unknown_feature_count: int = 0
    spool_dropped_count: int = 0
    withheld_report_count: int = 0
    # Events the histograms cover: released reports' events less those clamped away.
    histogram_event_count: int = 0
    clamped_event_count: int = 0
    # Per-bin variance of the DP noise in the histograms (variances of independent noise add).
    noise_variance_per_bin: float = 0.0
    # Ground truth, counted in the window the label arrived in (layouts in agent.spec).
    labeled_count: int = 0
    confusion: np.ndarray | None = None
    calibration: np.ndarray | None = None
    residuals: np.ndarray | None = None
    label_latency: np.ndarray | None = None
    heartbeat_count: int = 0
    labels_unmatched_count: int = 0
    label_cache_evicted_count: int = 0
    clamped_label_count: int = 0
    # Labels the label histograms cover: released reports' labels less those clamped away.
    label_histogram_count: int = 0

    @classmethod
    def zero(cls, spec: Spec) -> Summary:
        out = cls(
            features={f.name: np.zeros(f.histogram_length, np.int64) for f in spec.features},
            prediction=(np.zeros(spec.prediction.histogram_length, np.int64)
                        if spec.prediction else None),
        )
        if spec.labels is not None:
            for name in spec.labels.histograms:
                setattr(out, name, np.zeros(spec.labels.histogram_length(name), np.int64))
        return out

    def label_histograms(self) -> dict[str, np.ndarray]:
        """The label histograms present, by name, in LABEL_HISTOGRAMS order."""
        return {n: getattr(self, n) for n in LABEL_HISTOGRAMS if getattr(self, n) is not None}

    def merge(self, other: Summary) -> Summary:
        """A new summary holding both; neither input changes."""
        out = self.copy()
        out.merge_in(other)
        return out

    def merge_in(self, other: Summary) -> None:
        """Add `other` into this summary in place."""
        if self.features.keys() != other.features.keys():
            raise ValueError("cannot merge summaries of different specs (features differ)")
        for name, counts in other.features.items():
            mine = self.features[name]
            if mine.shape != counts.shape:
                raise ValueError(f"cannot merge summaries: feature {name!r} has "
                                 f"{mine.shape[0]} bins here and {counts.shape[0]} there")
            self.features[name] = mine + counts
        if (self.prediction is None) != (other.prediction is None):
            raise ValueError("cannot merge summaries of different specs (prediction differs)")
        if self.prediction is not None and other.prediction is not None:
            if self.prediction.shape != other.prediction.shape:
                raise ValueError("cannot merge summaries: prediction bins differ")
            self.prediction = self.prediction + other.prediction
        for name in LABEL_HISTOGRAMS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if (mine is None) != (theirs is None):
                raise ValueError(f"cannot merge summaries of different specs ({name} differs)")
            if mine is not None and theirs is not None:
                if mine.shape != theirs.shape:
                    raise ValueError(f"cannot merge summaries: {name} bins differ")
                setattr(self, name, mine + theirs)
        if not other.latency.is_empty():
            self.latency.merge(other.latency)
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def copy(self) -> Summary:
        lat = empty_kll()
        if not self.latency.is_empty():
            lat.merge(self.latency)
        return Summary(
            features={k: v.copy() for k, v in self.features.items()},
            prediction=None if self.prediction is None else self.prediction.copy(),
            latency=lat,
            **{name: getattr(self, name) for name in _COUNTERS},
            **{name: None if getattr(self, name) is None else getattr(self, name).copy()
               for name in LABEL_HISTOGRAMS},
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Summary):
            return NotImplemented
        return (
            self.features.keys() == other.features.keys()
            and all(np.array_equal(v, other.features[k]) for k, v in self.features.items())
            and ((self.prediction is None and other.prediction is None)
                 or (self.prediction is not None and other.prediction is not None
                     and np.array_equal(self.prediction, other.prediction)))
            and all(_same(getattr(self, n), getattr(other, n)) for n in LABEL_HISTOGRAMS)
            and self.latency.n == other.latency.n
            and all(getattr(self, n) == getattr(other, n) for n in _COUNTERS)
        )

    __hash__ = None  # type: ignore[assignment]


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))
