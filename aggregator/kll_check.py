"""Strict layout check for serialized KLL sketches received from untrusted devices.

Why this exists: devices send their latency distribution as the bytes of a datasketches
``kll_floats_sketch``. In datasketches 5.2.0, ``kll_floats_sketch.deserialize`` trusts the body of
a message whose header looks right: truncated or mutated bytes can make it (or a later ``merge`` /
``get_quantile``) read and write outside its buffers, which segfaults the aggregator or silently
corrupts its heap, and a forged item count ``n`` of 2**63 or more makes ``merge`` loop forever
(``kll_helper::floor_of_log2_of_fraction`` shifts its denominator to zero). Random bytes are
rejected by the library, but a valid header followed by a bad body is not.

So the aggregator never hands bytes to datasketches before this module has checked the whole
serialized layout itself, with nothing but ``struct`` and ``numpy``. The compact layout written
by datasketches-cpp (little-endian) is::

    byte 0      preamble size in 32-bit words: 2 (empty or single item) or 5 (full)
    byte 1      serial version: 1, or 2 for the single-item form
    byte 2      family id, 15 for KLL
    byte 3      flags: bit 0 empty, bit 1 level zero sorted, bit 2 single item
    bytes 4-5   k (uint16)
    byte 6      m (uint8), always 8
    byte 7      unused (0)
    -- empty form: nothing more (8 bytes in all)
    -- single-item form: one item (8 + item size bytes)
    -- full form:
    bytes 8-15  n (uint64)
    bytes 16-17 min_k (uint16)
    byte 18     number of levels L (uint8)
    byte 19     unused (0)
    L uint32    level offsets into a buffer of ``capacity(k, m, L)`` items (the last offset,
                the capacity itself, is implied)
    2 items     min item, max item
    items       the retained items, buffer offsets[0] .. capacity, level after level

A full-form sketch passes only if: the header fields are as above; 2 <= n <= max_n;
8 <= min_k <= k; 1 <= L <= 61 and L <= 1 + floor(log2(n)) (``merge`` sizes its work arrays by
that bound and overruns the heap for a sketch with more levels, even empty ones); the offsets are
non-decreasing and end at or below the capacity; the length is exactly what the offsets imply;
the weighted count sum_h (items at level h) * 2**h equals n; min and max are finite with
min <= max; every item is finite (no NaN, no infinity) and within [min, max]; every level above
0 is sorted, and level 0 too when its flag says so; and, in exact mode (L == 1), min and max are
the smallest and largest items.

The cap on ``n`` keeps the sum of merged sketches far from 2**63 (about 8 million sketches at the
default cap of 2**40 items each).
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

import numpy as np

from agent.errors import ConfigError, SketchError

if TYPE_CHECKING:
    import datasketches

__all__ = [
    "HARD_MAX_N",
    "MAX_BYTES",
    "MAX_N",
    "check_kll_doubles",
    "check_kll_floats",
    "kll_capacity",
    "load_kll_doubles",
    "load_kll_floats",
]

logger = logging.getLogger(__name__)

MAX_N: Final[int] = 1 << 40
"""Default cap on a sketch's item count ``n``."""
MAX_BYTES: Final[int] = 1 << 20
"""Default cap on the serialized size in bytes."""
HARD_MAX_N: Final[int] = 1 << 62
"""No ``max_n`` above this is allowed: the sum of two sketches must stay below 2**63."""

FAMILY_KLL: Final = 15
PREAMBLE_INTS_SHORT: Final = 2
PREAMBLE_INTS_FULL: Final = 5
SERIAL_VERSION_1: Final = 1
SERIAL_VERSION_2: Final = 2
FLAG_EMPTY: Final = 1 << 0
FLAG_LEVEL_ZERO_SORTED: Final = 1 << 1
FLAG_SINGLE_ITEM: Final = 1 << 2
KNOWN_FLAGS: Final = FLAG_EMPTY | FLAG_LEVEL_ZERO_SORTED | FLAG_SINGLE_ITEM
DEFAULT_M: Final = 8
MIN_K: Final = 8
MAX_K: Final = 65535
MAX_LEVELS: Final = 61  # datasketches' int_cap_aux refuses a depth above 60
HEADER_BYTES: Final = 8  # also the whole empty form and the start of the single item
FULL_HEADER_BYTES: Final = 20

_HEADER = struct.Struct("<BBBBHBB")
_FULL_HEADER = struct.Struct("<QHBB")


@dataclass(frozen=True)
class _ItemKind:
    name: str
    dtype: np.dtype[Any]
    one: struct.Struct  # one item, and min and max: struct beats numpy on so few bytes
    two: struct.Struct

    @property
    def size(self) -> int:
        return self.dtype.itemsize


_FLOATS = _ItemKind("kll_floats_sketch", np.dtype("<f4"), struct.Struct("<f"),
                    struct.Struct("<2f"))
_DOUBLES = _ItemKind("kll_doubles_sketch", np.dtype("<f8"), struct.Struct("<d"),
                     struct.Struct("<2d"))


@functools.lru_cache(maxsize=MAX_LEVELS)
def _offsets_struct(num_levels: int) -> struct.Struct:
    return struct.Struct(f"<{num_levels}I")


def _int_cap_aux_aux(k: int, depth: int) -> int:
    """round(k * (2/3)**depth) as datasketches computes it (depth <= 30)."""
    tmp = ((k << 1) << depth) // (3**depth)
    return (tmp + 1) >> 1


def _int_cap_aux(k: int, depth: int) -> int:
    if depth <= 30:
        return _int_cap_aux_aux(k, depth)
    half = depth // 2
    return _int_cap_aux_aux(_int_cap_aux_aux(k, half), depth - half)


@functools.lru_cache(maxsize=4096)
def kll_capacity(k: int, num_levels: int, m: int = DEFAULT_M) -> int:
    """Total item capacity of a KLL sketch with `num_levels` levels.

    Mirrors ``kll_helper::compute_total_capacity``: the sum over heights h of
    ``max(m, int_cap_aux(k, num_levels - h - 1))``.
    """
    if not MIN_K <= k <= MAX_K or not 1 <= num_levels <= MAX_LEVELS:
        raise ValueError(f"k={k}, num_levels={num_levels} out of range")
    return sum(max(m, _int_cap_aux(k, depth)) for depth in range(num_levels))


def _fail(field: str, kind: _ItemKind, message: str) -> NoReturn:
    logger.debug("rejected %s bytes in %r: %s", kind.name, field, message)
    raise SketchError(field, f"{kind.name}: {message}")


def _check_kll(data: bytes, kind: _ItemKind, max_n: int, max_bytes: int, field: str) -> None:
    if not isinstance(max_n, int) or not 1 <= max_n <= HARD_MAX_N:
        raise ConfigError(f"max_n must be an int in [1, 2**62], got {max_n!r}")
    if not isinstance(max_bytes, int) or max_bytes < HEADER_BYTES:
        raise ConfigError(f"max_bytes must be an int >= {HEADER_BYTES}, got {max_bytes!r}")

    def fail(message: str) -> NoReturn:
        _fail(field, kind, message)

    if type(data) is not bytes:  # the common case skips two isinstance calls
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if not isinstance(data, bytes):
            fail(f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        fail("no bytes (an empty sketch still has an 8-byte header)")
    if size > max_bytes:
        fail(f"{size} bytes, above the limit of {max_bytes}")
    if size < HEADER_BYTES:
        fail(f"truncated: {size} bytes, shorter than the 8-byte header")

    pre_ints, serial_version, family, flags, k, m, unused = _HEADER.unpack_from(data, 0)
    if family != FAMILY_KLL:
        fail(f"family id {family} is not KLL ({FAMILY_KLL}); not a KLL sketch")
    if flags & ~KNOWN_FLAGS:
        fail(f"unknown flag bits set in flags byte 0x{flags:02x}")
    if m != DEFAULT_M:
        fail(f"m is {m}, expected {DEFAULT_M}")
    if not MIN_K <= k <= MAX_K:
        fail(f"k is {k}, outside [{MIN_K}, {MAX_K}]")
    if unused != 0:
        fail(f"unused header byte 7 is {unused}, expected 0")
    is_empty = bool(flags & FLAG_EMPTY)
    is_single = bool(flags & FLAG_SINGLE_ITEM)
    if is_empty and is_single:
        fail("flags say both empty and single item")

    if is_empty or is_single:
        form = "empty" if is_empty else "single-item"
        if pre_ints != PREAMBLE_INTS_SHORT:
            fail(f"preamble size {pre_ints} for the {form} form, expected {PREAMBLE_INTS_SHORT}")
        expected_version = SERIAL_VERSION_1 if is_empty else SERIAL_VERSION_2
        if serial_version != expected_version:
            fail(f"serial version {serial_version} for the {form} form, "
                 f"expected {expected_version}")
        expected_size = HEADER_BYTES + (0 if is_empty else kind.size)
        if size != expected_size:
            fail(f"{size} bytes for the {form} form, expected exactly {expected_size}")
        if is_single:
            (item,) = kind.one.unpack_from(data, HEADER_BYTES)
            if not math.isfinite(item):
                fail(f"single item {item!r} is not finite")
        return

    if pre_ints != PREAMBLE_INTS_FULL:
        fail(f"preamble size {pre_ints} for the full form, expected {PREAMBLE_INTS_FULL}")
    if serial_version != SERIAL_VERSION_1:
        fail(f"serial version {serial_version} for the full form, expected {SERIAL_VERSION_1}")
    if size < FULL_HEADER_BYTES:
        fail(f"truncated: {size} bytes, shorter than the {FULL_HEADER_BYTES}-byte full header")
    n, min_k, num_levels, unused = _FULL_HEADER.unpack_from(data, HEADER_BYTES)
    if unused != 0:
        fail(f"unused header byte 19 is {unused}, expected 0")
    if n < 2:
        fail(f"n is {n} in the full form (0 and 1 use the short forms)")
    if n > max_n:
        fail(f"n is {n}, above the limit of {max_n}")
    if not MIN_K <= min_k <= k:
        fail(f"min_k is {min_k}, outside [{MIN_K}, k={k}]")
    if not 1 <= num_levels <= MAX_LEVELS:
        fail(f"number of levels is {num_levels}, outside [1, {MAX_LEVELS}]")
    if num_levels > n.bit_length():
        # merge() sizes its level arrays for 1 + floor(log2(n)) levels; more overflows the heap.
        fail(f"{num_levels} levels for n={n}; at most 1 + floor(log2(n)) = {n.bit_length()}")

    item_size = kind.size
    items_at = FULL_HEADER_BYTES + 4 * num_levels
    if size < items_at + 2 * item_size:
        fail(f"truncated: {size} bytes, shorter than the {items_at + 2 * item_size} bytes of "
             f"header, {num_levels} level offsets, min and max")
    capacity = kll_capacity(k, num_levels)
    # Plain Python on the few level offsets: numpy's per-call overhead is larger than the work.
    bounds = [*_offsets_struct(num_levels).unpack_from(data, FULL_HEADER_BYTES), capacity]
    populations = [bounds[h + 1] - bounds[h] for h in range(num_levels)]
    if min(populations) < 0:
        h = next(i for i, pop in enumerate(populations) if pop < 0)
        fail(f"level offsets {bounds} decrease at level {h} "
             f"(capacity {capacity} for k={k} and {num_levels} levels)")
    first = bounds[0]
    retained = capacity - first
    expected_size = items_at + (2 + retained) * item_size
    if size != expected_size:
        fail(f"{size} bytes, but {num_levels} levels holding {retained} items need exactly "
             f"{expected_size}")
    weighted = sum(pop << h for h, pop in enumerate(populations))
    if weighted != n:
        fail(f"n is {n}, but the levels' items weigh {weighted} (populations {populations})")

    lo, hi = kind.two.unpack_from(data, items_at)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        fail(f"min {lo!r} or max {hi!r} is not finite")
    if not lo <= hi:
        fail(f"min {lo!r} is above max {hi!r}")
    items = np.frombuffer(data, dtype=kind.dtype, count=retained, offset=items_at + 2 * item_size)
    # retained >= 1 (the levels weigh n >= 2). min/max propagate NaN, so items in [lo, hi]
    # (lo and hi finite) are all finite too; otherwise find the first bad item as before.
    smallest, largest = float(items.min()), float(items.max())
    if not (lo <= smallest and largest <= hi):
        finite = np.isfinite(items)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            fail(f"item {i} is {float(items[i])!r}, not finite")
        outside = (items < lo) | (items > hi)
        i = int(np.flatnonzero(outside)[0])
        fail(f"item {i} is {float(items[i])!r}, outside [min {lo!r}, max {hi!r}]")
    # Every checked level's sortedness in one comparison: descents[i] compares item
    # begin + i + 1 with item begin + i, from the first level that must be sorted (level 0 only
    # when flagged); the pairs that straddle a level boundary are no level's order, so they are
    # masked out. An unsorted level 0 in exact mode (the usual small sketch) compares nothing.
    starts = [b - first for b in bounds]
    first_sorted = 0 if flags & FLAG_LEVEL_ZERO_SORTED else 1
    begin = starts[first_sorted]
    if begin < retained - 1:
        descents = items[begin + 1:] < items[begin:-1]
        for s in starts[first_sorted + 1:num_levels]:
            if begin < s < retained:
                descents[s - 1 - begin] = False
        if descents.any():  # find the first unsorted level, as the per-level loop always did
            for h in range(first_sorted, num_levels):
                level = items[starts[h]:starts[h + 1]]
                level_descents = level[1:] < level[:-1]
                if level_descents.any():
                    i = int(np.flatnonzero(level_descents)[0])
                    fail(f"level {h} is not sorted (item {i + 1} of the level, "
                         f"{float(level[i + 1])!r}, follows {float(level[i])!r})")
    if num_levels == 1 and (smallest != lo or largest != hi):
        fail(f"exact-mode min {lo!r} / max {hi!r} differ from the items' "
             f"{smallest!r} / {largest!r}")


def check_kll_floats(data: bytes, *, max_n: int = MAX_N, max_bytes: int = MAX_BYTES,
                     field: str = "latency_kll") -> None:
    """Check serialized ``kll_floats_sketch`` bytes before datasketches ever sees them.

    Return None when `data` is a well-formed sketch; otherwise raise `SketchError` for `field`
    with a message naming what is wrong. Raise `ConfigError` for a bad `max_n` / `max_bytes`.
    """
    _check_kll(data, _FLOATS, max_n, max_bytes, field)


def check_kll_doubles(data: bytes, *, max_n: int = MAX_N, max_bytes: int = MAX_BYTES,
                      field: str = "kll") -> None:
    """Same as `check_kll_floats`, for ``kll_doubles_sketch`` bytes (8-byte items)."""
    _check_kll(data, _DOUBLES, max_n, max_bytes, field)


def load_kll_floats(data: bytes, **kw: Any) -> datasketches.kll_floats_sketch:
    """`check_kll_floats` (keyword arguments are passed on), then deserialize."""
    check_kll_floats(data, **kw)
    import datasketches

    return datasketches.kll_floats_sketch.deserialize(bytes(data))


def load_kll_doubles(data: bytes, **kw: Any) -> datasketches.kll_doubles_sketch:
    """`check_kll_doubles` (keyword arguments are passed on), then deserialize."""
    check_kll_doubles(data, **kw)
    import datasketches

    return datasketches.kll_doubles_sketch.deserialize(bytes(data))
