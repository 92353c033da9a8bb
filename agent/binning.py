"""Map raw values to histogram bins, per event and per numpy batch.

Layouts are defined in `agent.spec`. Values the spec cannot take (wrong type, infinities) are
counted as *invalid* and land in the missing bin, so a histogram's total always equals the
number of events; NaN and None are plain missing values.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from agent.spec import NUMERIC, FeatureSpec

__all__ = ["CategoricalBinner", "NumericBinner", "make_binner"]


def _has_bool(values: Any) -> bool:
    return any(type(v) is bool or type(v) is np.bool_
               for v in np.asarray(values, dtype=object).reshape(-1))


class NumericBinner:
    """Bins numbers into [underflow, edges..., overflow, missing]."""

    __slots__ = ("_edges", "_edges_np", "_last", "_top", "length", "missing")

    def __init__(self, feature: FeatureSpec) -> None:
        self._edges = list(feature.edges)
        self._edges_np = np.asarray(feature.edges, dtype=np.float64)
        self._last = self._edges[-1]
        self._top = len(self._edges) - 1  # index of the last interior bin, closed on the right
        self.length = feature.histogram_length
        self.missing = self.length - 1

    @property
    def edges(self) -> list[float]:
        """The edges, for callers that inline `index` for values in an interior bin (the
        accumulator's per-event loop): there, index(x) == bisect_right(edges, x) whenever
        that is strictly between 0 and len(edges). Do not modify."""
        return self._edges

    def index(self, value: Any) -> tuple[int, bool]:
        """Bin index of one value and whether the value was invalid."""
        t = type(value)
        if t is float or t is int:
            x = value
        elif value is None:
            return self.missing, False
        elif isinstance(value, Real) and not isinstance(value, bool):
            try:
                x = float(value)
            except (OverflowError, TypeError, ValueError):
                return self.missing, True
        else:
            return self.missing, True
        if x != x:  # NaN
            return self.missing, False
        if x == self._last:
            return self._top, False
        if x == math.inf or x == -math.inf:  # not math.isinf: it raises on ints past 1e308
            return self.missing, True
        return bisect_right(self._edges, x), False

    def counts(self, values: Any) -> tuple[np.ndarray, int]:
        """Histogram of an array of values and the number of invalid ones."""
        try:
            x = np.asarray(values)
        except (TypeError, ValueError):  # ragged input
            return self._counts_slow(values)
        if x.dtype.kind not in "fiu" or (not isinstance(values, np.ndarray)
                                         and _has_bool(values)):
            # strings, bools, objects (or bools numpy coerced to numbers in a list): judge each
            # value as index() does
            return self._counts_slow(values)
        x = x.astype(np.float64, copy=False).reshape(-1)
        idx = np.searchsorted(self._edges_np, x, side="right")
        idx[x == self._last] = self._top
        bad = ~np.isfinite(x)
        invalid = 0
        if bad.any():
            idx[bad] = self.missing
            invalid = int(np.isinf(x).sum())
        return np.bincount(idx, minlength=self.length).astype(np.int64, copy=False), invalid

    def _counts_slow(self, values: Sequence[Any]) -> tuple[np.ndarray, int]:
        counts = np.zeros(self.length, dtype=np.int64)
        invalid = 0
        for v in np.asarray(values, dtype=object).reshape(-1):
            i, bad = self.index(v)
            counts[i] += 1
            invalid += bad
        return counts, invalid


class CategoricalBinner:
    """Counts strings into [vocabulary..., other, missing]; integers count as their str()."""

    __slots__ = ("_index", "length", "missing", "other")

    def __init__(self, feature: FeatureSpec) -> None:
        self._index = {v: i for i, v in enumerate(feature.vocabulary)}
        self.length = feature.histogram_length
        self.other = self.length - 2
        self.missing = self.length - 1

    def index(self, value: Any) -> tuple[int, bool]:
        if isinstance(value, str):  # str subclasses too (numpy.str_)
            return self._index.get(str(value), self.other), False
        if value is None:
            return self.missing, False
        if isinstance(value, Integral):  # class ids given as ints (bool included: "True")
            return self._index.get(str(value), self.other), False
        if isinstance(value, (float, np.floating)) and value != value:
            return self.missing, False
        return self.missing, True

    def counts(self, values: Any) -> tuple[np.ndarray, int]:
        arr = np.asarray(values, dtype=object).reshape(-1)
        counts = np.zeros(self.length, dtype=np.int64)
        invalid = 0
        if arr.size == 0:
            return counts, 0
        # Look each distinct value up once; batches repeat values heavily. The key holds the
        # type: values that compare equal can bin differently (1, True and 1.0).
        try:
            tally = Counter(zip(map(type, arr), arr, strict=True))
        except TypeError:  # unhashable values
            for v in arr:
                i, bad = self.index(v)
                counts[i] += 1
                invalid += bad
            return counts, invalid
        for (_, v), n in tally.items():
            i, bad = self.index(v)
            counts[i] += n
            if bad:
                invalid += int(n)
        return counts, invalid


def make_binner(feature: FeatureSpec) -> NumericBinner | CategoricalBinner:
    return NumericBinner(feature) if feature.type == NUMERIC else CategoricalBinner(feature)
