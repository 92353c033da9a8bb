"""Per-window accumulators: the mutable side of a `Summary`, fed one event or one batch at a time.

The per-event path keeps plain Python lists of counts and a latency buffer (no numpy call per
event); closing the window turns them into a frozen-in-spirit `Summary`.

Ground truth: the Monitor caches what `LabelBinner.cache_entry` makes of a prediction, and
when its label arrives `WindowAccumulator.add_label` counts the pair into the window of the
label's arrival (one count in each of the task's label histograms).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np

from agent.binning import NumericBinner, make_binner
from agent.spec import BINARY, MULTICLASS, NUMERIC, FeatureSpec, LabelSpec, Spec
from agent.summary import Summary, empty_kll

__all__ = ["CacheEntry", "LabelBinner", "WindowAccumulator", "window_start"]

# What the label cache keeps per request: (observation time, prediction, confidence), the
# prediction already reduced to what the task needs (binary: the score; multiclass: the class
# index; regression: the value), NaN where it was not a usable number.
CacheEntry = tuple[float, float, float]

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
        return arr.astype(np.float64, copy=False).reshape(-1)  # only read: no copy needed
    out = []
    for v in arr.astype(object).reshape(-1):
        if v is None:
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError, OverflowError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def _number(value: Any) -> float:
    """A real number as float, NaN for anything else (bools included: not a score)."""
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, Real) and not isinstance(value, (bool, np.bool_)):
        try:
            return float(value)
        except (OverflowError, TypeError, ValueError):
            return math.nan
    return math.nan


class LabelBinner:
    """Maps a (cached prediction, label) pair to bins of the task's label histograms."""

    __slots__ = ("_cal_edges", "_cal_bins", "_index", "_latency", "_residuals", "k", "spec")

    def __init__(self, spec: LabelSpec) -> None:
        self.spec = spec
        self.k = len(spec.classes)  # index k is "other"
        self._index = {c: i for i, c in enumerate(spec.classes)}
        self._cal_edges = list(spec.calibration_edges)
        self._cal_bins = max(0, len(self._cal_edges) - 1)
        self._latency = NumericBinner(FeatureSpec("label_latency", NUMERIC,
                                                  edges=spec.latency_edges))
        self._residuals = (None if spec.is_classifier else
                           NumericBinner(FeatureSpec("residuals", NUMERIC,
                                                     edges=spec.residual_edges)))

    def _predicted_class(self, value: Any) -> int:
        # Like the categorical binner: strings by name, integers by their str().
        if isinstance(value, str):
            return self._index.get(str(value), self.k)
        if isinstance(value, Integral) and not isinstance(value, (bool, np.bool_)):
            return self._index.get(str(value), self.k)
        return self.k

    def true_class(self, y: Any) -> int:
        """A label's class index: the class name, or bool / 0 / 1 meaning classes[int(y)]
        (an integer is looked up by its str() first); anything else is "other" (k)."""
        if isinstance(y, str):
            return self._index.get(str(y), self.k)
        if isinstance(y, (bool, np.bool_)):
            return int(y)
        if isinstance(y, Integral):
            i = self._index.get(str(y))
            if i is not None:
                return i
        if isinstance(y, Real) and (y == 0 or y == 1):
            return int(y)
        return self.k

    def cache_entry(self, t: float, prediction: Any, confidence: Any) -> CacheEntry:
        task = self.spec.task
        if task == MULTICLASS:
            conf = math.nan if confidence is None else _number(confidence)
            return (t, float(self._predicted_class(prediction)), conf)
        return (t, _number(prediction), math.nan)

    def _calibration_bin(self, p: float) -> int:
        p = min(1.0, max(0.0, p))
        return min(bisect_right(self._cal_edges, p) - 1, self._cal_bins - 1)

    def add(self, acc: WindowAccumulator, entry: CacheEntry, y_true: Any, now: float) -> None:
        t, pred, conf = entry
        task = self.spec.task
        if task == BINARY or task == MULTICLASS:
            k1 = self.k + 1
            truth = self.true_class(y_true)
            if task == BINARY:
                predicted = self.k if pred != pred else int(pred >= self.spec.threshold)
                score, outcome = pred, int(truth == 1)
            else:
                predicted = int(pred)
                # An "other" prediction is never counted correct: it names no known class.
                score, outcome = conf, int(predicted == truth != self.k)
            acc.confusion[truth * k1 + predicted] += 1
            if score == score:  # NaN (no score, no confidence): no calibration count
                acc.calibration[2 * self._calibration_bin(score) + outcome] += 1
        else:
            assert self._residuals is not None
            y = _number(y_true)
            if y_true is not None and (not isinstance(y_true, Real)
                                       or isinstance(y_true, (bool, np.bool_))):
                acc.invalid += 1  # a label of the wrong type (counted missing)
            i, _ = self._residuals.index(pred - y)
            acc.residuals[i] += 1
        i, _ = self._latency.index(now - t)
        acc.label_latency[i] += 1
        acc.labeled += 1


class WindowAccumulator:
    """Accumulates events of one window. Not thread-safe: the Monitor holds the lock."""

    def __init__(self, spec: Spec, start_unix_s: int) -> None:
        self.spec = spec
        self.start_unix_s = start_unix_s
        self.end_unix_s = start_unix_s + spec.window_length_s
        self._binners = [(f.name, make_binner(f)) for f in spec.features]
        self._counts = {f.name: [0] * f.histogram_length for f in spec.features}
        # The per-event loop's view of the same binners and counts: numeric features carry
        # their edges, so that a float or int in an interior bin costs one bisect and no call
        # (see `observe`).
        self._numeric_plan = [
            (name, binner, self._counts[name], binner.edges, len(binner.edges))
            for name, binner in self._binners if isinstance(binner, NumericBinner)]
        self._other_plan = [(name, binner, self._counts[name]) for name, binner in self._binners
                            if not isinstance(binner, NumericBinner)]
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
        self.labeled = 0
        self.labels_unmatched = 0
        self.label_cache_evicted = 0
        ls = spec.labels
        self.confusion = [0] * ls.confusion_length if ls else []
        self.calibration = [0] * ls.calibration_length if ls else []
        self.residuals = [0] * ls.residuals_length if ls else []
        self.label_latency = [0] * ls.label_latency_length if ls else []

    # -- one event ---------------------------------------------------------------------------

    def observe(self, features: Mapping[str, Any], prediction: Any, latency_ms: float | None,
                error: bool, late: bool = False) -> None:
        if type(features) is not dict:
            # The loop subscripts: a plain dict's [] never inserts nor calls user code (a
            # defaultdict's would add the absent features).
            features = dict(features)
        absent = 0  # counted on the rare path; found = features looked up - absent
        bisect = bisect_right
        for name, binner, counts, edges, n_edges in self._numeric_plan:
            try:
                v = features[name]  # not .get(): cheaper than a method call
            except KeyError:
                counts[binner.missing] += 1
                absent += 1
                continue
            t = type(v)
            if t is float or t is int:
                # NumericBinner.index inlined for the common case, an interior bin. What lands
                # in bin 0 or n_edges takes the general path: underflow and overflow, but also
                # the last edge itself (closed on the right), NaN (bisect puts it past the end)
                # and the infinities (invalid).
                i = bisect(edges, v)
                if 0 < i < n_edges:
                    counts[i] += 1
                    continue
            i, bad = binner.index(v)
            counts[i] += 1
            if bad:
                self.invalid += 1
        for name, binner, counts in self._other_plan:
            try:
                v = features[name]
            except KeyError:
                counts[binner.missing] += 1
                absent += 1
                continue
            i, bad = binner.index(v)
            counts[i] += 1
            if bad:
                self.invalid += 1
        found = len(self._binners) - absent
        if len(features) > found:
            self.unknown += len(features) - found
        if self._pred_binner is not None:
            i, bad = self._pred_binner.index(prediction)
            self._pred_counts[i] += 1
            if bad:
                self.invalid += 1
        if latency_ms is not None:
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
            good = int(np.count_nonzero(ok))
            self.invalid += lat.size - good
            if good:  # usually all good: no selection copy then
                self._latency.update((lat if good == lat.size else lat[ok]).astype(np.float32))
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
        summary = Summary(
            features=features,
            prediction=prediction,
            latency=self._latency,
            report_count=1,
            event_count=self.events,
            error_count=self.errors,
            late_event_count=self.late,
            invalid_value_count=self.invalid,
            unknown_feature_count=self.unknown,
            labels_unmatched_count=self.labels_unmatched,
            label_cache_evicted_count=self.label_cache_evicted,
        )
        if self.spec.labels is not None:
            summary.labeled_count = self.labeled
            for name in self.spec.labels.histograms:
                setattr(summary, name, np.asarray(getattr(self, name), np.int64))
        return summary

    @property
    def idle(self) -> bool:
        """No event and no label: the window's report is a heartbeat."""
        return self.events == 0 and self.labeled == 0
