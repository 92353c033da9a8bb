"""Tests for agent.binning: per-event `index` and batch `counts` agree and follow the layout."""

from __future__ import annotations

import contextlib
import math
import warnings
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import binning
from agent.binning import CategoricalBinner, NumericBinner, make_binner
from agent.spec import CATEGORICAL, NUMERIC, FeatureSpec

EDGES = (-1.0, 0.0, 0.5, 2.0)
NUM = FeatureSpec("x", NUMERIC, edges=EDGES)
# [underflow, [-1,0), [0,0.5), [0.5,2], overflow, missing]
UNDER, FIRST, LAST, OVER, MISSING = 0, 1, 3, 4, 5

VOCAB = ("a", "b", "1", "True")
CAT = FeatureSpec("c", CATEGORICAL, vocabulary=VOCAB)
# [a, b, "1", "True", other, missing]
OTHER, CMISSING = 4, 5
_FMAX = float(np.finfo(np.float64).max)


def _objects(*values) -> np.ndarray:
    """A 1-d object array holding exactly these values (numpy does not look inside them)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _by_index(binner, values) -> tuple[np.ndarray, int]:
    counts = np.zeros(binner.length, np.int64)
    invalid = 0
    for v in values:
        i, bad = binner.index(v)
        counts[i] += 1
        invalid += bad
    return counts, invalid


def test_make_binner_picks_the_type():
    assert isinstance(make_binner(NUM), NumericBinner)
    assert isinstance(make_binner(CAT), CategoricalBinner)
    assert make_binner(NUM).length == NUM.histogram_length == 6
    assert make_binner(CAT).length == CAT.histogram_length == 6


# -- numeric, one value -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1.0, (FIRST, False)),  # first edge -> first bin
        (-1, (FIRST, False)),
        (math.nextafter(-1.0, -math.inf), (UNDER, False)),  # just below the first edge
        (-1e300, (UNDER, False)),
        pytest.param(-(10**400), (UNDER, False), id="-10**400"),  # too big for a float
        (-0.5, (1, False)),
        (0.0, (2, False)),
        (-0.0, (2, False)),
        (math.nextafter(0.5, -math.inf), (2, False)),
        (0.5, (3, False)),
        (2.0, (LAST, False)),  # last edge -> last interior bin (closed on the right)
        (2, (LAST, False)),
        (math.nextafter(2.0, math.inf), (OVER, False)),  # just above the last edge
        (1e300, (OVER, False)),
        pytest.param(10**400, (OVER, False), id="10**400"),
        (math.nan, (MISSING, False)),
        (None, (MISSING, False)),
        (math.inf, (MISSING, True)),
        (-math.inf, (MISSING, True)),
        ("1.0", (MISSING, True)),
        ("abc", (MISSING, True)),
        (b"1", (MISSING, True)),
        ([1.0], (MISSING, True)),
        ({"a": 1}, (MISSING, True)),
        (True, (MISSING, True)),
        (1 + 0j, (MISSING, True)),
        (object(), (MISSING, True)),
        (Fraction(1, 2), (3, False)),
        (np.float32(0.5), (3, False)),
        (np.float64(2.0), (LAST, False)),
        (np.float16(-1.0), (FIRST, False)),
        (np.int64(-1), (FIRST, False)),
        (np.int8(3), (OVER, False)),
        (np.uint8(0), (2, False)),
        (np.float32("nan"), (MISSING, False)),
        (np.float64("inf"), (MISSING, True)),
        (np.float32("-inf"), (MISSING, True)),
        (np.bool_(True), (MISSING, True)),
        (np.str_("0.1"), (MISSING, True)),
    ],
)
def test_numeric_index(value, expected):
    binner = NumericBinner(NUM)
    assert binner.index(value) == expected
    # The batch path says the same about that value, alone and among others.
    want = np.zeros(binner.length, np.int64)
    want[expected[0]] = 1
    counts, invalid = binner.counts(_objects(value))
    assert counts.tolist() == want.tolist()
    assert invalid == int(expected[1])
    if not isinstance(value, list):  # a list in a list is a 2-d batch
        counts, invalid = binner.counts([value])
        assert counts.tolist() == want.tolist()
        assert invalid == int(expected[1])
    counts, invalid = binner.counts(_objects(value, 0.1, None))
    want[2] += 1
    want[MISSING] += 1
    assert counts.tolist() == want.tolist() and invalid == int(expected[1])


def test_numeric_edges_exact_in_batch():
    binner = NumericBinner(NUM)
    x = np.array([-1.0, 0.0, 0.5, 2.0, np.nextafter(2.0, 3.0), np.nextafter(-1.0, -2.0)])
    counts, invalid = binner.counts(x)
    assert counts.tolist() == [1, 1, 1, 2, 1, 0]
    assert invalid == 0
    counts32, _ = binner.counts(x.astype(np.float32))
    assert counts32.sum() == len(x)


def test_numeric_counts_shapes_and_types():
    binner = NumericBinner(NUM)
    assert binner.counts([])[0].tolist() == [0] * 6
    assert binner.counts(np.array([], dtype=np.float64))[0].tolist() == [0] * 6
    # a scalar is one value, a 2-d array is its flattened values
    assert binner.counts(0.1)[0].tolist() == [0, 0, 1, 0, 0, 0]
    assert binner.counts(np.array([[0.1, 3.0], [-5, 1]]))[0].tolist() == [1, 0, 1, 1, 1, 0]
    # integer and unsigned arrays
    assert binner.counts(np.array([-3, 0, 1, 2, 9]))[0].tolist() == [1, 0, 1, 2, 1, 0]
    assert binner.counts(np.array([0, 1, 200], np.uint8))[0].tolist() == [0, 0, 1, 1, 1, 0]
    # a lone string is one invalid value (not one per character)
    counts, invalid = binner.counts("abc")
    assert counts.tolist() == [0, 0, 0, 0, 0, 1] and invalid == 1


def test_numeric_counts_wrong_types_are_invalid():
    binner = NumericBinner(NUM)
    # Strings that look like numbers and booleans are not numbers, in a batch as one by one.
    counts, invalid = binner.counts(np.array(["0.1", "1", "x"]))
    assert counts.tolist() == [0, 0, 0, 0, 0, 3] and invalid == 3
    counts, invalid = binner.counts(np.array([True, False]))
    assert counts.tolist() == [0, 0, 0, 0, 0, 2] and invalid == 2
    counts, invalid = binner.counts([0.1, [1.0, 2.0], None, "2", math.inf])  # ragged
    assert counts.tolist() == [0, 0, 1, 0, 0, 4] and invalid == 3


def test_numeric_object_array_mixed_types():
    binner = NumericBinner(NUM)
    values = _objects(1.0, "x", None, np.nan, 3, {"a": 1}, np.float32(-0.5), -math.inf,
                      Fraction(-3), 10**400, True)
    counts, invalid = binner.counts(values)
    assert counts.tolist() == [1, 1, 0, 1, 2, 6]
    assert invalid == 4  # "x", the dict, -inf, True
    assert (counts, invalid)[0].tolist() == _by_index(binner, values)[0].tolist()


def _reference_histogram(x: np.ndarray) -> tuple[list[int], int]:
    """An independent computation of the layout with numpy.histogram."""
    finite = x[np.isfinite(x)]
    inner, _ = np.histogram(finite, bins=np.asarray(EDGES))  # last bin closed, like the spec
    under = int((finite < EDGES[0]).sum())
    over = int((finite > EDGES[-1]).sum())
    missing = int((~np.isfinite(x)).sum())
    return [under, *inner.tolist(), over, missing], int(np.isinf(x).sum())


_interesting = st.sampled_from(
    [*EDGES, *(math.nextafter(e, math.inf) for e in EDGES),
     *(math.nextafter(e, -math.inf) for e in EDGES), math.nan, math.inf, -math.inf, -0.0])
_floats = st.one_of(_interesting, st.floats(-4, 4), st.floats(allow_subnormal=False))


@settings(max_examples=150, deadline=None)
@given(st.lists(_floats, max_size=60))
def test_numeric_batch_equals_numpy_histogram(values):
    x = np.asarray(values, dtype=np.float64)
    counts, invalid = NumericBinner(NUM).counts(x)
    want, want_invalid = _reference_histogram(x)
    assert counts.tolist() == want
    assert invalid == want_invalid
    assert counts.sum() == len(values)


_anything_numeric = st.one_of(
    _floats,
    st.integers(-10, 10),
    st.integers(),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
    st.sampled_from(["1.0", "nan", "inf", ""]),
    st.floats(width=32).map(np.float32),
    st.integers(-128, 127).map(np.int8),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.fractions(max_denominator=10),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_anything_numeric, max_size=40), st.lists(st.lists(st.floats(), max_size=2)))
def test_numeric_index_and_counts_agree(values, lists):
    binner = NumericBinner(NUM)
    want, want_invalid = _by_index(binner, values)
    counts, invalid = binner.counts(values)
    assert counts.tolist() == want.tolist()
    assert invalid == want_invalid
    assert want.sum() == len(values)
    # In an object array, even a list is one (invalid) value.
    mixed = values + lists
    want, want_invalid = _by_index(binner, mixed)
    counts, invalid = binner.counts(_objects(*mixed))
    assert counts.tolist() == want.tolist()
    assert invalid == want_invalid


@settings(max_examples=100, deadline=None)
@given(st.lists(_floats, max_size=40))
def test_numeric_index_and_counts_agree_on_float_arrays(values):
    binner = NumericBinner(NUM)
    want, want_invalid = _by_index(binner, values)
    for dtype in (np.float64, object):
        counts, invalid = binner.counts(np.asarray(values, dtype=dtype))
        assert counts.tolist() == want.tolist() and invalid == want_invalid


# -- categorical ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", (0, False)),
        ("b", (1, False)),
        ("1", (2, False)),
        ("True", (3, False)),
        ("A", (OTHER, False)),
        ("", (OTHER, False)),
        ("zebra", (OTHER, False)),
        (1, (2, False)),  # class ids given as ints count as their str()
        (2, (OTHER, False)),
        (np.int64(1), (2, False)),
        (np.uint8(1), (2, False)),
        (True, (3, False)),
        (False, (OTHER, False)),
        (np.str_("b"), (1, False)),
        (None, (CMISSING, False)),
        (math.nan, (CMISSING, False)),
        (np.float64("nan"), (CMISSING, False)),
        (np.float32("nan"), (CMISSING, False)),
        (1.0, (CMISSING, True)),
        (np.float32(1.0), (CMISSING, True)),
        (math.inf, (CMISSING, True)),
        (b"a", (CMISSING, True)),
        ({"a": 1}, (CMISSING, True)),
        (["a"], (CMISSING, True)),
        (("a",), (CMISSING, True)),
        (object(), (CMISSING, True)),
    ],
)
def test_categorical_index(value, expected):
    binner = CategoricalBinner(CAT)
    assert binner.index(value) == expected
    want = np.zeros(binner.length, np.int64)
    want[expected[0]] = 1
    counts, invalid = binner.counts(_objects(value))
    assert counts.tolist() == want.tolist() and invalid == int(expected[1])
    counts, invalid = binner.counts(_objects(value, "a", "a", None))
    want[0] += 2
    want[CMISSING] += 1
    assert counts.tolist() == want.tolist() and invalid == int(expected[1])


def test_categorical_equal_values_of_different_types_bin_apart():
    # 1 == True == 1.0 in Python, but they are three different categories here.
    binner = CategoricalBinner(CAT)
    counts, invalid = binner.counts([1, True, 1.0, 1, np.int64(1)])
    assert counts.tolist() == [0, 0, 3, 1, 0, 1]
    assert invalid == 1


def test_categorical_counts_inputs():
    binner = CategoricalBinner(CAT)
    assert binner.counts([])[0].tolist() == [0] * 6
    assert binner.counts(np.array([], dtype=str))[0].tolist() == [0] * 6
    counts, invalid = binner.counts(np.array(["a", "b", "zz", "a", "1"]))  # a str array
    assert counts.tolist() == [2, 1, 1, 0, 1, 0] and invalid == 0
    counts, invalid = binner.counts(np.array([1, 3, 1, 0]))  # class ids as an int array
    assert counts.tolist() == [0, 0, 2, 0, 2, 0] and invalid == 0
    counts, invalid = binner.counts("a")  # a scalar is one value
    assert counts.tolist() == [1, 0, 0, 0, 0, 0] and invalid == 0
    counts, invalid = binner.counts(np.array([["a", "b"], ["b", "x"]]))
    assert counts.tolist() == [1, 2, 0, 0, 1, 0]
    nans = [float("nan") for _ in range(5)] + [math.nan] * 3
    assert binner.counts(nans)[0].tolist() == [0, 0, 0, 0, 0, 8]


def test_categorical_object_array_mixed_types():
    binner = CategoricalBinner(CAT)
    values = _objects("a", 1, None, {"k": 1}, [1], 2.5, math.nan, True, "b", "q", b"a")
    counts, invalid = binner.counts(values)
    assert counts.tolist() == [1, 1, 1, 1, 1, 6]
    assert invalid == 4  # dict, list, 2.5, bytes
    want, want_invalid = _by_index(binner, values)
    assert counts.tolist() == want.tolist() and invalid == want_invalid


_anything_categorical = st.one_of(
    st.sampled_from([*VOCAB, "other", ""]),
    st.text(max_size=3),
    st.integers(-2, 3),
    st.integers(-2, 3).map(np.int64),
    st.booleans(),
    st.none(),
    st.floats(),
    st.floats(width=32).map(np.float32),
    st.sampled_from(VOCAB).map(np.str_),
    st.binary(max_size=2),
    st.dictionaries(st.text(max_size=1), st.integers(), max_size=1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_anything_categorical, max_size=40),
       st.lists(st.lists(st.integers(), max_size=2), max_size=3))
def test_categorical_index_and_counts_agree(values, lists):
    binner = CategoricalBinner(CAT)
    want, want_invalid = _by_index(binner, values)
    counts, invalid = binner.counts(values)
    assert counts.tolist() == want.tolist()
    assert invalid == want_invalid
    assert want.sum() == len(values)
    mixed = values + lists
    want, want_invalid = _by_index(binner, mixed)
    counts, invalid = binner.counts(_objects(*mixed))
    assert counts.tolist() == want.tolist()
    assert invalid == want_invalid


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([*VOCAB, "x", "y"]), max_size=50))
def test_categorical_counts_equal_a_counter(values):
    counts, invalid = CategoricalBinner(CAT).counts(np.array(values, dtype=str))
    want = [values.count(v) for v in VOCAB] + [values.count("x") + values.count("y"), 0]
    assert counts.tolist() == want and invalid == 0


# -- numeric batch fast path: chunked threshold counts against per-value oracles ----------------

def _searchsorted_oracle(binner: NumericBinner, values) -> tuple[list[int], int]:
    """The batch path as it was before chunked counting: a bin index per value."""
    x = np.asarray(values).astype(np.float64, copy=False).reshape(-1)
    edges = np.asarray(binner.edges, dtype=np.float64)
    idx = np.searchsorted(edges, x, side="right")
    idx[x == edges[-1]] = len(edges) - 1
    bad = ~np.isfinite(x)
    idx[bad] = binner.missing
    return np.bincount(idx, minlength=binner.length).tolist(), int(np.isinf(x).sum())


def _binner(edges) -> NumericBinner:
    return NumericBinner(FeatureSpec("x", NUMERIC, edges=tuple(edges)))


@contextlib.contextmanager
def _path(method: str, chunk: int):
    """Force the comparison or the sort path of `NumericBinner._tally`, with small chunks."""
    with mock.patch.object(binning, "_CMP_MAX_EDGES", 0 if method == "sort" else 10**6), \
            mock.patch.object(binning, "_CMP_CHUNK", chunk), \
            mock.patch.object(binning, "_SORT_CHUNK", chunk):
        yield


_edge_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # huge magnitudes, subnormals, -0.0
    st.floats(-100, 100, allow_nan=False),
    st.integers(-1000, 1000).map(float),
    st.sampled_from([-(2.0**63), 2.0**53, 2.0**53 + 2, 2.0**63, 2.0**64, -_FMAX, _FMAX]),
)
_edge_sets = (st.lists(_edge_values, min_size=2, max_size=60)
              .map(lambda es: sorted(set(es))).filter(lambda es: 2 <= len(es) <= 50))


@st.composite
def _batches(draw):
    """Edges, a chunk size and an array whose length sits around a chunk boundary, its values
    hitting the edges exactly, next to them, NaN, the infinities, ints past 2**53."""
    edges = draw(_edge_sets)
    chunk = draw(st.integers(1, 9))
    n = draw(st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk, 3 * chunk + 1,
                              5 * chunk - 1]))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.int64, np.uint64]))
    near = [*edges, *(math.nextafter(e, math.inf) for e in edges),
            *(math.nextafter(e, -math.inf) for e in edges)]
    if dtype in (np.float64, np.float32):
        value = st.one_of(st.sampled_from([*near, math.nan, math.inf, -math.inf, -0.0]),
                          st.floats(), st.floats(-2 * abs(edges[0]) - 1, 2 * abs(edges[-1]) + 1))
        with np.errstate(over="ignore"):  # float32 overflows to inf: an invalid value
            values = np.array(draw(st.lists(value, min_size=n, max_size=n)),
                              dtype=np.float64).astype(dtype)
    else:
        info = np.iinfo(dtype)
        ints = [int(e) for e in near if info.min <= e <= info.max]
        ints += [i + d for i in ints for d in (-1, 1) if info.min <= i + d <= info.max]
        value = st.one_of(st.integers(info.min, info.max), st.integers(-5, 5).filter(
            lambda i: i >= info.min), *([st.sampled_from(ints)] if ints else []))
        values = np.array(draw(st.lists(value, min_size=n, max_size=n)), dtype=dtype)
    return edges, chunk, values


@settings(max_examples=400, deadline=None)
@given(_batches(), st.sampled_from(["compare", "sort"]))
def test_numeric_counts_equal_per_value_binning(batch, method):
    edges, chunk, values = batch
    binner = _binner(edges)
    want, want_invalid = _by_index(binner, values)  # numpy scalars: index() takes float(v)
    with _path(method, chunk), warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from the inf/NaN check
        counts, invalid = binner.counts(values)
    assert counts.dtype == np.int64
    assert counts.tolist() == want.tolist() == _searchsorted_oracle(binner, values)[0]
    assert invalid == want_invalid == _searchsorted_oracle(binner, values)[1]


@pytest.mark.parametrize("method", ["compare", "sort"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.uint8])
def test_numeric_counts_at_real_chunk_sizes(method, dtype):
    rng = np.random.default_rng(7)
    edges = np.unique(np.round(rng.normal(0, 3, 21), 1))
    binner = _binner(edges)
    chunk = binning._CMP_CHUNK if method == "compare" else binning._SORT_CHUNK
    force = mock.patch.object(binning, "_CMP_MAX_EDGES", 0 if method == "sort" else 10**6)
    for n in (chunk - 1, chunk, chunk + 1, 3 * chunk + 5):
        x = rng.normal(0, 4, n)
        x[rng.integers(0, n, 20)] = rng.choice(edges, 20)  # exactly on edges
        if dtype in (np.float64, np.float32):
            x[rng.integers(0, n, 5)] = np.nan
            x[rng.integers(0, n, 3)] = np.inf
            x[-2:] = [-np.inf, np.nan]  # in the last, partial chunk
        values = x.astype(dtype)
        with force:
            counts, invalid = binner.counts(values)
        want, want_invalid = _searchsorted_oracle(binner, values)
        assert counts.tolist() == want and invalid == want_invalid
        assert counts.sum() == n


@pytest.mark.parametrize("method", ["compare", "sort"])
def test_numeric_counts_huge_finite_values(method):
    # Their sum overflows, which only sends the chunk to the exact inf/NaN count.
    binner = _binner([-1e308, 0.0, 1e308])
    x = np.array([1.7e308, 1e308, -1.7e308, 5e307, 1e308, np.nextafter(1e308, np.inf)] * 3)
    with _path(method, 4), warnings.catch_warnings():
        warnings.simplefilter("error")
        counts, invalid = binner.counts(x)
    assert counts.tolist() == _searchsorted_oracle(binner, x)[0] == [3, 0, 9, 6, 0]
    assert invalid == 0


@pytest.mark.parametrize("method", ["compare", "sort"])
def test_numeric_counts_shapes_on_both_paths(method):
    binner = NumericBinner(NUM)
    grid = np.array([[-2.0, -1.0, 0.0], [0.5, 2.0, np.inf], [np.nan, 3.0, -0.0]])
    with _path(method, 2):
        for values in (grid, grid.T, grid[:, ::2], np.asfortranarray(grid), grid[1, 1],
                       np.float32(2.0), np.array(7, np.int64), np.array([], np.int64),
                       np.zeros((0, 3))):
            counts, invalid = binner.counts(values)
            want, want_invalid = _searchsorted_oracle(binner, values)
            assert counts.tolist() == want and invalid == want_invalid


def test_numeric_counts_ints_past_2_53_as_float64():
    # Ints are compared as float64, as before: 2**53 + 1 rounds to the edge 2**53.
    binner = _binner([0.0, 2.0**53, 2.0**64])
    x = np.array([2**53 - 1, 2**53, 2**53 + 1, 2**53 + 3, 2**63 - 1], np.int64)
    assert binner.counts(x)[0].tolist() == [0, 1, 4, 0, 0]
    u = np.array([2**64 - 1, 2**63, 1], np.uint64)  # 2**64 - 1 rounds to the last edge
    assert binner.counts(u)[0].tolist() == [0, 1, 2, 0, 0]
    assert binner.counts(u)[0].tolist() == _searchsorted_oracle(binner, u)[0]
