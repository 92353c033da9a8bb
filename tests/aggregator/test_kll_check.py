"""Tests for aggregator.kll_check, the layout check that stands between untrusted bytes and
kll deserialize.

datasketches only ever sees bytes in this process once the check has passed them. Bytes the
check passes are also exercised (deserialize, merge, quantiles) in a child process, so a
segfault or a hang there fails the test instead of killing pytest.
"""

from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasketches as ds
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, SketchError, ValidationError
from aggregator.kll_check import (
    HARD_MAX_N,
    MAX_N,
    check_kll_doubles,
    check_kll_floats,
    kll_capacity,
    load_kll_doubles,
    load_kll_floats,
)

SEED = 20240611
CHILD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Kind:
    code: str  # "f" or "d", as the child process takes it
    cls: Any
    dtype: type[np.floating[Any]]
    check: Callable[..., None]
    load: Callable[..., Any]

    @property
    def size(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def fmt(self) -> str:
        return "<f" if self.code == "f" else "<d"


FLOATS = Kind("f", ds.kll_floats_sketch, np.float32, check_kll_floats, load_kll_floats)
DOUBLES = Kind("d", ds.kll_doubles_sketch, np.float64, check_kll_doubles, load_kll_doubles)
KINDS = [pytest.param(FLOATS, id="floats"), pytest.param(DOUBLES, id="doubles")]


# ---------------------------------------------------------------------------------------------
# legitimate sketches


def _sketch(kind: Kind, k: int, values: np.ndarray, *, single: bool = False) -> Any:
    s = kind.cls(k)
    if single:
        for v in values.tolist():
            s.update(v)
    elif len(values):
        s.update(values.astype(kind.dtype))
    return s


@functools.cache
def legit_sketches(kind: Kind) -> list[tuple[str, Any]]:
    """Real sketches: many sizes and k, built from arrays and from single updates, queried
    (which sorts level zero and sets its flag), round-tripped, and merged."""
    rng = np.random.default_rng(SEED)
    out: list[tuple[str, Any]] = []
    for k in (8, 200, 1000):
        for n in (0, 1, 2, 7, 100, 1000, 100_000, 1_000_000):
            values = rng.exponential(20.0, n)
            out.append((f"k={k} n={n} array", _sketch(kind, k, values)))
            if n <= 100_000:
                out.append((f"k={k} n={n} single", _sketch(kind, k, values, single=n <= 1000)))
            if n:
                queried = _sketch(kind, k, values)
                queried.get_quantile(0.5)
                out.append((f"k={k} n={n} queried", queried))
    shapes = [("constant", np.full(5000, 3.25)), ("negative", -rng.lognormal(2, 1, 3000)),
              ("ascending", np.arange(50_000.0)), ("descending", np.arange(50_000.0)[::-1]),
              ("signed zeros", np.array([0.0, -0.0] * 600)), ("wide", rng.normal(0, 1e30, 2000))]
    for label, values in shapes:
        out.append((label, _sketch(kind, 100, values)))
    for trial in range(12):
        acc = kind.cls(int(rng.choice([8, 64, 200, 1000])))
        for _ in range(int(rng.integers(2, 9))):
            n = int(rng.choice([0, 1, 2, 5, 300, 4000, 60_000]))
            part = _sketch(kind, int(rng.choice([8, 50, 200, 2000])), rng.lognormal(3, 1, n))
            if rng.random() < 0.5:
                part = kind.cls.deserialize(part.serialize())
            acc.merge(part)
            out.append((f"merge {trial} n={acc.n}", kind.cls.deserialize(acc.serialize())))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_accepts_legitimate_sketches(kind: Kind) -> None:
    sketches = legit_sketches(kind)
    assert len(sketches) > 80
    for label, s in sketches:
        data = s.serialize()
        kind.check(data)  # raises on failure
        kind.check(bytearray(data))
        kind.check(memoryview(data))
        if data[0] == 5:  # full form: the level offsets end at the capacity we compute
            k, levels = struct.unpack_from("<H", data, 4)[0], data[18]
            offset0 = struct.unpack_from("<I", data, 20)[0]
            retained = (len(data) - 20 - 4 * levels) // kind.size - 2
            assert offset0 + retained == kll_capacity(k, levels), label
            assert retained == s.num_retained, label


@pytest.mark.parametrize("kind", KINDS)
def test_load_round_trips(kind: Kind) -> None:
    fractions = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0]
    for label, s in legit_sketches(kind):
        data = s.serialize()
        loaded = kind.load(data)
        assert isinstance(loaded, kind.cls)
        assert loaded.serialize() == data, label
        assert (loaded.n, loaded.k, loaded.num_retained) == (s.n, s.k, s.num_retained), label
        if s.n:
            assert loaded.get_quantiles(fractions) == s.get_quantiles(fractions), label
            assert loaded.get_min_value() == s.get_min_value(), label


def test_load_kll_floats_passes_options_and_field() -> None:
    s = _sketch(FLOATS, 200, np.arange(1000.0))
    assert load_kll_floats(s.serialize()).n == 1000
    with pytest.raises(SketchError, match="above the limit of 999") as info:
        load_kll_floats(s.serialize(), max_n=999, field="reports[3].latency_kll")
    assert info.value.field == "reports[3].latency_kll"
    assert isinstance(info.value, ValidationError)


@settings(max_examples=60, deadline=None)
@given(
    k=st.sampled_from([8, 9, 33, 200, 511, 4096]),
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=3000),
    query=st.booleans(),
)
def test_accepts_arbitrary_float_streams(k: int, values: list[float], query: bool) -> None:
    s = _sketch(FLOATS, k, np.asarray(values, dtype=np.float32))
    if query and values:
        s.get_rank(values[0])
    loaded = load_kll_floats(s.serialize())
    assert loaded.n == len(values)
    if values:
        assert loaded.get_quantile(0.5) == s.get_quantile(0.5)


def _forged_sketch(kind: Kind, k: int, pops: list[int], *, n: int | None = None) -> bytes:
    """Full-form bytes laid out the way datasketches lays them out, from level populations."""
    levels = len(pops)
    capacity = kll_capacity(k, levels)
    offsets = np.concatenate([[capacity - sum(pops)], capacity - sum(pops) + np.cumsum(pops)[:-1]])
    items = np.concatenate([np.arange(1, p + 1, dtype=kind.dtype) for p in pops])
    if n is None:
        n = sum(p << h for h, p in enumerate(pops))
    return (struct.pack("<BBBBHBBQHBB", 5, 1, 15, 0, k, 8, 0, n, k, levels, 0)
            + offsets.astype("<u4").tobytes()
            + np.array([items.min(), items.max()], dtype=kind.dtype).tobytes()
            + items.astype(kind.dtype).tobytes())


@pytest.mark.parametrize("k", [8, 9, 10, 101, 200, 1000, 12345, 65535])
def test_capacity_matches_datasketches_for_every_level_count(k: int) -> None:
    """Two items at level 0 and one at the top level L-1 (so n = 2 + 2**(L-1) allows L levels):
    datasketches reads capacity - offsets[0] items, so it only accepts the exact byte count,
    and it only gets the 3 items we wrote if its capacity equals ours, up to 61 levels."""
    assert kll_capacity(200, 1) == 200 and kll_capacity(8, 1) == 8
    for levels in range(1, 62):
        pops = [2] + [0] * (levels - 2) + [1] if levels > 1 else [3]
        data = _forged_sketch(FLOATS, k, pops)
        sketch = load_kll_floats(data, max_n=HARD_MAX_N)
        assert (sketch.n, sketch.num_retained) == (sum(p << h for h, p in enumerate(pops)), 3)
    with pytest.raises(ValueError):
        kll_capacity(k, 62)


# ---------------------------------------------------------------------------------------------
# targeted rejections, with clear messages


def _base(kind: Kind, n: int = 1000, k: int = 200) -> bytes:
    return _sketch(kind, k, np.random.default_rng(n).exponential(10, n)).serialize()


def _patch(data: bytes, fmt: str, offset: int, *values: Any) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _item_at(data: bytes, kind: Kind, index: int) -> int:
    """Byte position of retained item `index` (after min and max) in a full-form sketch."""
    return 20 + 4 * data[18] + (2 + index) * kind.size


def _unsort_upper_level(data: bytes, kind: Kind) -> bytes:
    """Swap the first and last items of the first level above 0 holding two distinct items."""
    num_levels = data[18]
    capacity = kll_capacity(struct.unpack_from("<H", data, 4)[0], num_levels)
    bounds = [*struct.unpack_from(f"<{num_levels}I", data, 20), capacity]
    for h in range(1, num_levels):
        first, last = bounds[h] - bounds[0], bounds[h + 1] - bounds[0] - 1
        a, b = _item_at(data, kind, first), _item_at(data, kind, last)
        if last > first and data[a:a + kind.size] != data[b:b + kind.size]:
            out = bytearray(data)
            out[a:a + kind.size] = data[b:b + kind.size]
            out[b:b + kind.size] = data[a:a + kind.size]
            return bytes(out)
    raise AssertionError("no level above 0 with two distinct items")


CASES: list[tuple[str, Callable[[Kind], bytes], str]] = [
    ("empty payload", lambda kind: b"", "no bytes"),
    ("7 bytes", lambda kind: _base(kind)[:7], "shorter than the 8-byte header"),
    ("not kll", lambda kind: _patch(_base(kind), "<B", 2, 7), "family id 7 is not KLL"),
    ("unknown flag", lambda kind: _patch(_base(kind), "<B", 3, 0x10), "unknown flag bits"),
    ("m", lambda kind: _patch(_base(kind), "<B", 6, 4), "m is 4"),
    ("k too small", lambda kind: _patch(_base(kind), "<H", 4, 7), "k is 7"),
    ("unused byte", lambda kind: _patch(_base(kind), "<B", 7, 1), "byte 7"),
    ("empty plus a byte", lambda kind: _base(kind, 0) + b"\0", "expected exactly 8"),
    ("empty, version 2", lambda kind: _patch(_base(kind, 0), "<B", 1, 2), "serial version 2"),
    ("empty and single", lambda kind: _patch(_base(kind, 0), "<B", 3, 5), "both empty and single"),
    ("single, version 1", lambda kind: _patch(_base(kind, 1), "<B", 1, 1), "serial version 1"),
    ("single NaN", lambda kind: _patch(_base(kind, 1), kind.fmt, 8, float("nan")), "not finite"),
    ("single short", lambda kind: _base(kind, 1)[:-1], "expected exactly"),
    ("full, preamble 2", lambda kind: _patch(_base(kind), "<B", 0, 2), "preamble size 2"),
    ("full, version 2", lambda kind: _patch(_base(kind), "<B", 1, 2), "serial version 2"),
    ("byte 19", lambda kind: _patch(_base(kind), "<B", 19, 3), "byte 19"),
    ("n = 1", lambda kind: _patch(_base(kind), "<Q", 8, 1), "n is 1 in the full form"),
    ("n = 2**63", lambda kind: _patch(_base(kind), "<Q", 8, 1 << 63), "above the limit"),
    ("n off by one", lambda kind: _patch(_base(kind), "<Q", 8, 1001), "weigh 1000"),
    ("min_k > k", lambda kind: _patch(_base(kind), "<H", 16, 201), "min_k is 201"),
    ("no levels", lambda kind: _patch(_base(kind), "<B", 18, 0), "number of levels is 0"),
    ("levels for n", lambda kind: _patch(_base(kind), "<B", 18, 11), "11 levels for n=1000"),
    ("offsets decrease", lambda kind: _patch(_base(kind), "<I", 24, 1), "decrease at level 0"),
    ("offset past capacity", lambda kind: _patch(_base(kind), "<I", 24, 1 << 31), "decrease"),
    ("extra item", lambda kind: _base(kind) + bytes(kind.size), "need exactly"),
    ("NaN min", lambda kind: _patch(_base(kind), kind.fmt, _item_at(_base(kind), kind, -2),
                                    float("nan")), "not finite"),
    ("min > max", lambda kind: _patch(_base(kind), kind.fmt, _item_at(_base(kind), kind, -2),
                                      1e9), "above max"),
    ("NaN item", lambda kind: _patch(_base(kind), kind.fmt, _item_at(_base(kind), kind, 5),
                                     float("nan")), "item 5 is nan, not finite"),
    ("inf item", lambda kind: _patch(_base(kind), kind.fmt, _item_at(_base(kind), kind, 5),
                                     float("inf")), "not finite"),
    ("item below min", lambda kind: _patch(_base(kind), kind.fmt, _item_at(_base(kind), kind, 0),
                                           -1.0), "outside \\[min"),
    ("upper level unsorted", lambda kind: _unsort_upper_level(_base(kind), kind),
     "level [1-9][0-9]* is not sorted"),
    ("level 0 sorted flag", lambda kind: _patch(_base(kind), "<B", 3, 2), "level 0 is not sorted"),
    ("exact-mode min", lambda kind: _patch(_base(kind, 50), kind.fmt,
                                           _item_at(_base(kind, 50), kind, -2), -5.0),
     "exact-mode min"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("label", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_rejects_with_clear_message(kind: Kind, label: str, make: Callable[[Kind], bytes],
                                    message: str) -> None:
    data = make(kind)
    with pytest.raises(SketchError, match=message) as info:
        kind.check(data)
    assert info.value.field == ("latency_kll" if kind is FLOATS else "kll")
    assert str(info.value).startswith(f"{info.value.field}: kll_")


@pytest.mark.parametrize("kind", KINDS)
def test_rejects_garbage_and_oversize(kind: Kind) -> None:
    rng = np.random.default_rng(SEED)
    for size in [1, 2, 7, 8, 9, 12, 20, 40, 100, 1000, 5000] * 20:
        with pytest.raises(SketchError):
            kind.check(rng.bytes(size))
    for not_bytes in ["\x05\x01\x0f\x00", None, 12, [5, 1, 15]]:
        with pytest.raises(SketchError, match="expected bytes"):
            kind.check(not_bytes)  # type: ignore[arg-type]
    big = _sketch(kind, 65535, np.arange(40_000.0)).serialize()  # a legitimate 160-320 kB sketch
    kind.check(big, max_bytes=len(big))
    with pytest.raises(SketchError, match=f"{len(big)} bytes, above the limit of {len(big) - 1}"):
        kind.check(big, max_bytes=len(big) - 1)
    with pytest.raises(SketchError, match="above the limit of 1048576"):
        kind.check(big + bytes(1 << 20))
    with pytest.raises(SketchError, match="above the limit of 1000"):
        kind.check(_base(kind, 2000), max_n=1000)
    with pytest.raises(ConfigError):
        kind.check(big, max_n=HARD_MAX_N + 1)
    with pytest.raises(ConfigError):
        kind.check(big, max_bytes=4)
    assert MAX_N == 1 << 40


def test_floats_and_doubles_are_told_apart() -> None:
    floats, doubles = _base(FLOATS), _base(DOUBLES)
    with pytest.raises(SketchError, match="need exactly"):
        check_kll_floats(doubles)
    with pytest.raises(SketchError, match="need exactly"):
        check_kll_doubles(floats)


@pytest.mark.parametrize("kind", KINDS)
def test_rejects_every_truncation_and_extension(kind: Kind) -> None:
    rng = np.random.default_rng(SEED)
    blobs = [_base(kind, n, k) for n, k in [(0, 200), (1, 200), (2, 200), (100, 200), (1000, 8),
                                            (100_000, 200), (1_000_000, 8),
                                            (100_000, 1000)]]
    merged = kind.cls(100)
    for n in (10, 3000, 70_000):
        merged.merge(_sketch(kind, 300, rng.normal(0, 1, n)))
    blobs.append(merged.serialize())
    cuts = 0
    for data in blobs:
        kind.check(data)
        for cut in range(len(data)):
            with pytest.raises(SketchError):
                kind.check(data[:cut])
            cuts += 1
        for extra in (b"\0", bytes(kind.size), rng.bytes(2 * kind.size)):
            with pytest.raises(SketchError):
                kind.check(data + extra)
    assert cuts == sum(map(len, blobs)) > 10_000
    print(f"\n{kind.code}: {cuts} truncations rejected")


# ---------------------------------------------------------------------------------------------
# mutants: rejected, or harmless to datasketches (proved in a child process)

_U64_EDGES = [0, 1, 2, 3, 1 << 31, (1 << 32) + 1, MAX_N, MAX_N + 1, 1 << 62, 1 << 63,
              (1 << 63) + 7, (1 << 64) - 1]


def _mutate(blob: bytes, rng: np.random.Generator, kind: Kind, nested: bool = False
            ) -> tuple[str, bytes]:
    """One random mutation of `blob`: its name and the mutated bytes."""
    b = bytearray(blob)
    size = len(b)
    num_levels = b[18] if size >= 20 else 0
    full = (size >= 20 and b[0] == 5 and 1 <= num_levels <= 61 and size >= 20 + 4 * num_levels
            and struct.unpack_from("<H", b, 4)[0] >= 8)
    items_at = min(size, 20 + 4 * num_levels if full else 8)
    n_items = (size - items_at) // kind.size
    strategy = int(rng.integers(0, 11 if nested else 12))
    if size < 8 and strategy != 9:
        strategy = 0 if size else 9
    if not full and strategy in (3, 4, 5, 6):
        strategy = 0
    if strategy in (7, 8) and n_items < 2:
        strategy = 1

    if strategy == 0:  # 1-3 bit flips anywhere
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, size))] ^= 1 << int(rng.integers(0, 8))
        return "bit flip", bytes(b)
    if strategy == 1:  # one random byte anywhere
        b[int(rng.integers(0, size))] = int(rng.integers(0, 256))
        return "byte", bytes(b)
    if strategy == 2:  # one byte of the header or of the level offsets
        i = int(rng.integers(0, max(1, items_at)))
        b[i] = int(rng.choice([0, 0xFF, (b[i] + 1) & 0xFF, (b[i] - 1) & 0xFF,
                               int(rng.integers(0, 256))]))
        return "header byte", bytes(b)
    if strategy == 3:  # forged n
        n = struct.unpack_from("<Q", b, 8)[0]
        new = (int(rng.choice(_U64_EDGES + [n - 1, n + 1, 2 * n, n // 2])) if rng.random() < 0.8
               else int(rng.integers(0, 1 << 63)))
        struct.pack_into("<Q", b, 8, new % (1 << 64))
        return "forged n", bytes(b)
    if strategy == 4:  # forged level offset
        h = int(rng.integers(0, num_levels))
        old = struct.unpack_from("<I", b, 20 + 4 * h)[0]
        new = int(rng.choice([0, old - 1, old + 1, old + int(rng.integers(-50, 50)), 0xFFFFFFFF,
                              1 << 31, int(rng.integers(0, 1 << 32))]))
        struct.pack_into("<I", b, 20 + 4 * h, new % (1 << 32))
        return "forged offset", bytes(b)
    if strategy == 5:  # forged level count, sometimes with offsets added or removed to match
        new = int(rng.choice([0, num_levels - 1, num_levels + 1, num_levels + 2, 61, 62, 255,
                              int(rng.integers(0, 256))])) % 256
        b[18] = new
        if new > num_levels and rng.random() < 0.5:
            b[items_at:items_at] = bytes(b[items_at - 4:items_at]) * (new - num_levels)
        elif new < num_levels and rng.random() < 0.5:
            del b[20 + 4 * new:items_at]
        return "forged levels", bytes(b)
    if strategy == 6:  # an offset moved and n forged to the new weighted count
        offsets = list(struct.unpack_from(f"<{num_levels}I", b, 20))
        h = int(rng.integers(0, num_levels))
        offsets[h] = min(max(0, offsets[h] + int(rng.choice([-3, -2, -1, 1, 2, 3]))), 2**32 - 1)
        struct.pack_into(f"<{num_levels}I", b, 20, *offsets)
        k = struct.unpack_from("<H", b, 4)[0]
        bounds = offsets + [kll_capacity(k, num_levels)]
        weight = sum((bounds[i + 1] - bounds[i]) << i for i in range(num_levels))
        struct.pack_into("<Q", b, 8, weight % (1 << 64))
        return "offset and n", bytes(b)
    if strategy == 7:  # one item (or min/max) set to a special value
        value = float(rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0,
                                  float(rng.normal(0, 100))]))
        struct.pack_into(kind.fmt, b, items_at + int(rng.integers(0, n_items)) * kind.size, value)
        return "item value", bytes(b)
    if strategy == 8:  # two items swapped
        i, j = (items_at + int(x) * kind.size for x in rng.choice(n_items, 2, replace=False))
        b[i:i + kind.size], b[j:j + kind.size] = b[j:j + kind.size], b[i:i + kind.size]
        return "swap", bytes(b)
    if strategy == 9:  # truncated or extended
        if rng.random() < 0.5 and size:
            return "truncate", bytes(b[:int(rng.integers(0, size))])
        return "extend", bytes(b) + rng.bytes(int(rng.choice([1, 4, kind.size, 8, 100])))
    if strategy == 10:  # k, min_k, m, flags, serial version or preamble size
        which = int(rng.integers(0, 6))
        if which == 0 or (which == 1 and not full):
            struct.pack_into("<H", b, 4, int(rng.choice([0, 1, 7, 8, 9, 100, 201, 65535,
                                                          int(rng.integers(0, 65536))])))
        elif which == 1:
            struct.pack_into("<H", b, 16, int(rng.choice([0, 7, 8, 65535,
                                                           int(rng.integers(0, 65536))])))
        elif which == 2:
            b[6] = int(rng.choice([0, 1, 2, 4, 7, 9, 16, 255]))
        elif which == 3:
            b[3] = int(rng.integers(0, 256))
        elif which == 4:
            b[1] = int(rng.choice([0, 1, 2, 3, 255]))
        else:
            b[0] = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 255]))
        return "header field", bytes(b)
    out = bytes(b)  # several of the above
    for _ in range(int(rng.integers(2, 5))):
        out = _mutate(out, rng, kind, nested=True)[1]
    return "several", out


def _forge(rng: np.random.Generator, kind: Kind) -> tuple[str, bytes]:
    """A sketch built from scratch with a self-consistent layout (random k, level count and
    populations, n usually equal to the weighted count, sorted levels), sometimes subtly off:
    the inputs that get past naive checks."""
    k = int(rng.choice([8, 9, 16, 200, 1000, 65535, int(rng.integers(8, 65536))]))
    levels = int(rng.choice([1, 2, 3, 4, 6, 10, 20, 31, 32, 36, 40, 41, 61,
                             int(rng.integers(1, 62))]))
    capacity = kll_capacity(k, levels)
    total = int(rng.integers(0, min(capacity, 600) + 1))
    share = rng.random(levels) * (rng.random(levels) < 0.6)
    if rng.random() < 0.5 or not share.any():
        share[-1] += 1.0
    pops = rng.multinomial(total, share / share.sum()).tolist()
    n = sum(p << h for h, p in enumerate(pops))
    roll = rng.random()
    if roll < 0.1:
        n += int(rng.choice([-1, 1]))
    elif roll < 0.15:
        n = int(rng.integers(0, 1 << 63))
    min_k = k if rng.random() < 0.7 else int(rng.integers(8, k + 1))
    sorted0 = bool(rng.random() < 0.5)
    parts = []
    for h, p in enumerate(pops):
        values = rng.normal(50, 20, p).astype(kind.dtype)
        if h or sorted0:
            values.sort()
        parts.append(values)
    items = np.concatenate(parts) if total else np.zeros(0, kind.dtype)
    lo, hi = (float(items.min()), float(items.max())) if total else (0.0, 0.0)
    if rng.random() < 0.3:
        lo, hi = lo - float(rng.exponential(5)), hi + float(rng.exponential(5))
    roll = rng.random()
    if roll < 0.05 and total:
        items[int(rng.integers(0, total))] = np.nan
    elif roll < 0.1 and total > 1:
        rng.shuffle(items)
    offsets = (capacity - total + np.concatenate([[0], np.cumsum(pops)[:-1]])).astype("<u4")
    data = (struct.pack("<BBBBHBBQHBB", 5, 1, 15, 2 if sorted0 else 0, k, 8, 0, n % (1 << 64),
                        min_k, levels, 0)
            + offsets.tobytes() + np.array([lo, hi], kind.dtype).tobytes()
            + items.astype(kind.dtype).tobytes())
    return "forged sketch", data


def _mutant_bases(kind: Kind) -> list[bytes]:
    rng = np.random.default_rng(SEED + 1)
    bases = []
    for k, n in [(200, 0), (200, 1), (200, 2), (200, 7), (200, 100), (200, 1000), (8, 1000),
                 (200, 100_000), (8, 1_000_000), (1000, 5000)]:
        s = _sketch(kind, k, rng.exponential(10, n))
        bases.append(s.serialize())
        if n > 1:
            s.get_quantile(0.5)  # level zero sorted, flag set
            bases.append(s.serialize())
    for k in (200, 50):
        acc = kind.cls(k)
        for _ in range(6):
            acc.merge(_sketch(kind, int(rng.choice([8, 100, 400])),
                              rng.normal(0, 5, int(rng.integers(1, 50_000)))))
        bases.append(acc.serialize())
    return bases


def mutants(kind: Kind, count: int, forged: int) -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(SEED + (0 if kind is FLOATS else 1))
    bases = _mutant_bases(kind)
    for i in range(count):
        yield _mutate(bases[i % len(bases)], rng, kind)
    for _ in range(forged):
        yield _forge(rng, kind)


# Run in a fresh interpreter: deserialize, query and merge every sketch it reads (framed as
# uint32 length + bytes on stdin) the way the aggregator would, reporting progress on stderr so
# that a crash can be traced to its input.
CHILD = r"""
import json, struct, sys
import numpy as np
import datasketches as ds

cls, dtype = {"f": (ds.kll_floats_sketch, np.float32),
              "d": (ds.kll_doubles_sketch, np.float64)}[sys.argv[1]]
data = sys.stdin.buffer.read()
probe = cls(200)
probe.update(np.linspace(-10, 100, 1000).astype(dtype))
fleet = cls(200)
pos = done = 0
errors = []
while pos < len(data):
    (size,) = struct.unpack_from("<I", data, pos)
    blob = data[pos + 4:pos + 4 + size]
    pos += 4 + size
    sys.stderr.write(f"mutant {done}\n")
    sys.stderr.flush()
    try:
        s = cls.deserialize(blob)
        fleet.merge(s)
        fresh = cls(8)
        fresh.merge(s)
        fresh.merge(probe)
        if not s.is_empty():
            s.get_quantile(0.5)
            s.get_quantiles([0.0, 0.01, 0.5, 0.99, 1.0])
            s.get_rank(s.get_quantile(0.3))
            s.get_cdf([1.0, 10.0])
            s.get_pmf([1.0, 10.0])
        s.merge(probe)
        s.get_quantile(0.5)
        cls.deserialize(s.serialize()).get_quantile(0.5)
    except Exception as exc:
        errors.append([done, repr(exc)])
    done += 1
if not fleet.is_empty():
    fleet.get_quantile(0.5)
print(json.dumps({"done": done, "errors": errors}))
"""


def _run_child(kind: Kind, blobs: list[bytes], timeout: float = CHILD_TIMEOUT_S
               ) -> subprocess.CompletedProcess[bytes]:
    payload = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    return subprocess.run([sys.executable, "-c", CHILD, kind.code], input=payload,
                          capture_output=True, timeout=timeout, check=False)


@pytest.mark.parametrize("kind", KINDS)
def test_mutants_are_rejected_or_harmless(kind: Kind) -> None:
    verdicts: Counter[tuple[str, str]] = Counter()
    passed: list[tuple[str, bytes]] = []
    for name, data in mutants(kind, count=2500, forged=600):
        try:
            kind.check(data)
        except SketchError:
            verdicts[name, "rejected"] += 1
        else:
            verdicts[name, "passed"] += 1
            passed.append((name, data))
    total = sum(verdicts.values())
    rejected = sum(v for (_, verdict), v in verdicts.items() if verdict == "rejected")
    print(f"\n{kind.code}: {total} mutants, {rejected} rejected, {len(passed)} passed: "
          f"{sorted(verdicts.items())}")
    assert total == 3100
    assert rejected > total // 2 and len(passed) > 100  # both paths are exercised

    try:
        result = _run_child(kind, [data for _, data in passed])
    except subprocess.TimeoutExpired as exc:
        last = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        pytest.fail(f"datasketches hung on a mutant the check passed ({last})")
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        last = [line for line in lines if line.startswith("mutant ")][-1:]
        index = int(last[0].split()[1]) if last else -1
        name, data = passed[index] if last else ("?", b"")
        pytest.fail(f"datasketches died (rc {result.returncode}) on passed mutant {index} "
                    f"({name}): {data.hex()}\n" + "\n".join(lines[-5:]))
    report = json.loads(result.stdout)
    assert report["done"] == len(passed)
    assert report["errors"] == [], [(passed[i][0], passed[i][1].hex(), e)
                                    for i, e in report["errors"][:3]]


# ---------------------------------------------------------------------------------------------
# the hazard is real (raw bytes go to datasketches only in a child process)

HAZARD_CHILD = r"""
import sys
import datasketches as ds
blob = sys.stdin.buffer.read()
s = ds.kll_floats_sketch.deserialize(blob)
acc = ds.kll_floats_sketch(200)
acc.update(1.0)
acc.merge(s)
s.get_quantile(0.5)
"""


def _hazards() -> dict[str, bytes]:
    base = _base(FLOATS, 1000)  # 3 levels
    return {
        "offset past the buffer (reads and writes out of bounds)": _patch(base, "<I", 24,
                                                                          0xFFFFFFFF),
        "n = 2**63 (merge never returns)": _patch(base, "<Q", 8, 1 << 63),
        "61 empty levels over 3 items (merge overruns its level arrays)":
            _forged_sketch(FLOATS, 200, [3] + [0] * 60),
    }


def test_hazard_is_real_and_rejected() -> None:
    outcomes = {}
    for label, data in _hazards().items():
        with pytest.raises(SketchError):
            check_kll_floats(data)
        try:
            rc: int | str = subprocess.run([sys.executable, "-c", HAZARD_CHILD], input=data,
                                           capture_output=True, timeout=3, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "hung"
        outcomes[label] = rc
    print(f"\nraw datasketches 5.2.0 on hazard bytes: {outcomes}")
    assert outcomes["n = 2**63 (merge never returns)"] == "hung"
    # killed by a signal (negative rc: SIGSEGV, or SIGABRT from glibc's heap checks), not an
    # ordinary Python exception (rc 1)
    assert any(isinstance(rc, int) and rc < 0 for rc in outcomes.values()), outcomes
