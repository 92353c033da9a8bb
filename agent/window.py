"""Per-window accumulators: the mutable side of a `Summary`, fed one event or one batch at a time.

The per-event path keeps plain Python lists of counts and a latency buffer (no numpy call per
event); closing the window turns them into a frozen-in-spirit `Summary`.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.binning import make_binner
from agent.spec import Spec
from agent.summary import Summary, empty_kll

__all__ = ["WindowAccumulator", "window_start"]

_ABSENT = object()
# The latency sketch holds float32: larger values would become inf, which ingest refuses.
_MAX_LATENCY_MS = float(np.finfo(np.float32).max)


def window_start(t: float, length_s: int) -> int:
    """Start of the tumbling window holding time t (aligned to multiples of length since epoch)."""
    return int(t // length_s) * length_s  # not floor(t / length_s): t / length_s may round


def _latency_array(latency_ms: Any) -> np.ndarray:
    """Latencies as float64, each value taken as `_add_latency` takes it: None (not measured) is
    left out, and a value float() cannot take becomes NaN, which is counted invalid."""
    arr = np.asarray(latency_ms)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64).reshape(-1)
    out = []
    for v in arr.astype(object).reshape(-1):
        if v is None:
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError, OverflowError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


class WindowAccumulator:
    """Accumulates events of one window. Not thread-safe: the Monitor holds the lock."""

    def __init__(self, spec: Spec, start_unix_s: int) -> None:
        self.spec = spec
        self.start_unix_s = start_unix_s
        self.end_unix_s = start_unix_s + spec.window_length_s
        self._binners = [(f.name, make_binner(f)) for f in spec.features]
        self._counts = {f.name: [0] * f.histogram_length for f in spec.features}
        self._batch_counts = {f.name: np.zeros(f.histogram_length, np.int64)
                              for f in spec.features}
        self._pred_binner = make_binner(spec.prediction) if spec.prediction else None
        self._pred_counts = [0] * spec.prediction.histogram_length if spec.prediction else []
        self._pred_batch = (np.zeros(spec.prediction.histogram_length, np.int64)
                            if spec.prediction else None)
        self._latency_buf = array("f")
        self._latency = empty_kll()
        self.events = 0
        self.errors = 0
        self.late = 0
        self.invalid = 0
        self.unknown = 0

    # -- one event ---------------------------------------------------------------------------

    def observe(self, features: Mapping[str, Any], prediction: Any, latency_ms: float | None,
                error: bool, late: bool = False) -> None:
        found = 0
        get = features.get
        for name, binner in self._binners:
            v = get(name, _ABSENT)
            if v is _ABSENT:
                self._counts[name][binner.missing] += 1
                continue
            found += 1
            i, bad = binner.index(v)
            self._counts[name][i] += 1
            if bad:
                self.invalid += 1
        if len(features) > found:
            self.unknown += len(features) - found
        if self._pred_binner is not None:
            i, bad = self._pred_binner.index(prediction)
            self._pred_counts[i] += 1
            if bad:
                self.invalid += 1
        self._add_latency(latency_ms)
        self.events += 1
        if error:
            self.errors += 1
        if late:
            self.late += 1

    def _add_latency(self, latency_ms: Any) -> None:
        if latency_ms is None:
            return
        try:
            x = float(latency_ms)
        except (TypeError, ValueError, OverflowError):
            self.invalid += 1
            return
        if not 0 <= x <= _MAX_LATENCY_MS:  # NaN fails too; float32 holds the sketch
            self.invalid += 1
            return
        self._latency_buf.append(x)
        if len(self._latency_buf) >= 4096:  # bound memory; the sketch takes arrays fast
            self._drain_latency()

    def _drain_latency(self) -> None:
        if self._latency_buf:
            self._latency.update(np.frombuffer(self._latency_buf, dtype=np.float32))
            self._latency_buf = array("f")

    # -- a batch -----------------------------------------------------------------------------

    def observe_batch(self, features: Mapping[str, Any], predictions: Any, latency_ms: Any,
                      errors: Any, n: int, late: bool = False) -> None:
        """Add n events given as arrays; the caller checked that lengths agree."""
        lat = None if latency_ms is None else _latency_array(latency_ms)  # before any update
        for name, binner in self._binners:
            values = features.get(name, _ABSENT)
            if values is _ABSENT:
                self._batch_counts[name][binner.missing] += n
                continue
            counts, invalid = binner.counts(values)
            self._batch_counts[name] += counts
            self.invalid += invalid
        self.unknown += sum(1 for k in features if k not in self._counts) * n
        if self._pred_binner is not None and self._pred_batch is not None:
            if predictions is None:  # like an absent feature: n missing values
                self._pred_batch[self._pred_binner.missing] += n
            else:
                counts, invalid = self._pred_binner.counts(predictions)
                self._pred_batch += counts
                self.invalid += invalid
        if lat is not None:
            ok = (lat >= 0) & (lat <= _MAX_LATENCY_MS)
            self.invalid += int(lat.size - ok.sum())
            if ok.any():
                self._latency.update(lat[ok].astype(np.float32))
        self.events += n
        if errors is not None:
            self.errors += int(np.count_nonzero(np.asarray(errors).reshape(-1)))
        if late:
            self.late += n

    # -- closing -----------------------------------------------------------------------------

    def to_summary(self) -> Summary:
        self._drain_latency()
        features = {name: self._batch_counts[name] + np.asarray(self._counts[name], np.int64)
                    for name, _ in self._binners}
        prediction = None
        if self._pred_batch is not None:
            prediction = self._pred_batch + np.asarray(self._pred_counts, np.int64)
        return Summary(
            features=features,
            prediction=prediction,
            latency=self._latency,
            report_count=1,
            event_count=self.events,
            error_count=self.errors,
            late_event_count=self.late,
            invalid_value_count=self.invalid,
            unknown_feature_count=self.unknown,
        )
