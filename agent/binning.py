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

_FLOAT_MAX = float(np.finfo(np.float64).max)
# Batch binning (`NumericBinner._tally`): up to this many edges, one comparison pass per edge
# beats sorting the chunk (on 1e6 normal values the two cost the same near 25 edges); chunks
# of values sized to stay in the L2 cache, the comparison ones large enough to amortize the
# Python loop over the edges.
_CMP_MAX_EDGES = 24
_CMP_CHUNK = 65536
_SORT_CHUNK = 16384


def _has_bool(values: Any) -> bool:
    return any(type(v) is bool or type(v) is np.bool_
               for v in np.asarray(values, dtype=object).reshape(-1))


class NumericBinner:
    """Bins numbers into [underflow, edges..., overflow, missing]."""

    __slots__ = ("_cmp_keys", "_edges", "_last", "_sort_keys", "_top", "length", "missing")

    def __init__(self, feature: FeatureSpec) -> None:
        self._edges = list(feature.edges)
        self._last = self._edges[-1]
        self._top = len(self._edges) - 1  # index of the last interior bin, closed on the right
        self.length = feature.histogram_length
        self.missing = self.length - 1
        # The batch path counts, for thresholds k, the values x < k (see `_tally`):
        # -inf's count (x < -max), the edges but the last (bisect_right), the last edge
        # closed on the right (x <= last is x < nextafter(last)), then x < inf (neither NaN
        # nor +inf) and x < NaN (not NaN; NaN sorts last in numpy).
        last_up = math.nextafter(self._last, math.inf)
        self._sort_keys = np.array([-_FLOAT_MAX, *self._edges[:-1], last_up, math.inf, math.nan],
                                   dtype=np.float64)
        # The comparison path needs only the edge thresholds, NaN and infinities being rare.
        self._cmp_keys = [*self._edges[:-1], last_up]

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
        return self._counts_fast(x.reshape(-1))

    def _counts_fast(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """`counts` of a 1-d int or float array: each value as float64 (what index() compares;
        ints past 2**53 round) in its bin, as index() bins it."""
        t = self._tally(x)
        m = len(self._edges)
        n = x.size
        neg_inf = t[0]
        nan = n - t[m + 2]
        pos_inf = t[m + 2] - t[m + 1]
        below = t[1:m + 1] - neg_inf  # finite values below each threshold, non-decreasing
        counts = np.empty(self.length, dtype=np.int64)
        counts[0] = below[0]
        counts[1:m] = np.diff(below)
        counts[m] = n - nan - pos_inf - neg_inf - below[-1]
        counts[m + 1] = nan + pos_inf + neg_inf
        return counts, int(pos_inf + neg_inf)

    def _tally(self, x: np.ndarray) -> np.ndarray:
        """How many values are below each of `_sort_keys`, counted over cache-sized chunks.

        A histogram needs only these counts, not a bin per value: with few edges, one
        comparison pass per edge; with more, a sort of the chunk and a search of the keys
        in it (the cost of a sort does not grow with the edges)."""
        n = x.size
        keys = self._sort_keys
        tally = np.zeros(len(keys), dtype=np.int64)
        if n == 0:
            return tally
        if len(self._cmp_keys) > _CMP_MAX_EDGES:
            step = _SORT_CHUNK
            buf = np.empty(min(n, step), dtype=np.float64)
            for start in range(0, n, step):
                b = buf[:min(step, n - start)]
                b[...] = x[start:start + step]  # the float64 cast, as index() compares
                b.sort()
                tally += np.searchsorted(b, keys)
            return tally
        step = _CMP_CHUNK
        buf = np.empty(min(n, step), dtype=np.float64) if x.dtype != np.float64 else None
        hit = np.empty(min(n, step), dtype=np.bool_)
        thresholds = self._cmp_keys
        below = [0] * len(thresholds)
        below_inf = neg_inf = not_nan = 0
        less, count = np.less, np.count_nonzero
        with np.errstate(over="ignore", invalid="ignore"):  # sums of inf, -inf, huge
            for start in range(0, n, step):
                c = x[start:start + step]
                if buf is not None:
                    c = buf[:c.size]
                    c[...] = x[start:start + step]  # the float64 cast, as above
                h = hit[:c.size]
                for j, k in enumerate(thresholds):
                    less(c, k, out=h)
                    below[j] += int(count(h))
                # A finite sum means no NaN nor infinity in the chunk (one pass, no temporary);
                # a sum that overflows only costs the exact count below.
                if math.isfinite(np.add.reduce(c)):
                    below_inf += c.size
                    not_nan += c.size
                else:
                    neg_inf += int(count(c == -math.inf))
                    below_inf += int(count(c < math.inf))
                    not_nan += int(count(c == c))
        tally[0] = neg_inf
        tally[1:-2] = below
        tally[-2] = below_inf
        tally[-1] = not_nan
        return tally

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
