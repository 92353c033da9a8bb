"""The SQLite store's in-memory rollups (aggregator/store/rollup_cache.py): a batch merges each
rollup row once, the write cache never serves a row another connection changed, and queries
served from the read cache equal a merge of the stored rows done here from scratch."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, summary_from_proto, summary_to_proto
from aggregator.store.base import IngestOutcome, rollup_resolutions
from aggregator.store.sqlite import SqliteStore
from protos import fleetwatch_pb2 as pb
from tests.aggregator.test_store_group_commit import one_batch

W = 60
SPEC = Spec(model="m", model_version="1",
            features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0, 3.0)),),
            window_length_s=W, privacy=PrivacySpec(mechanism=NO_NOISE))
WS = 1_700_000_000 // 86400 * 86400  # a day boundary: all three resolutions line up
RES = rollup_resolutions(W)


def summary(values: list[float]) -> Summary:
    acc = WindowAccumulator(SPEC, WS)
    n = len(values)
    acc.observe_batch({"x": np.asarray(values, float)}, None, np.full(n, 5.0),
                      np.zeros(n, bool), n)
    return acc.to_summary()


def meta(device: str, seq: int, ws: int = WS, region: str = "eu") -> ReportMeta:
    return ReportMeta(device, "m", "1", {"region": region}, ws, W, seq, SPEC.hash)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "a.sqlite")
    s.put_spec(SPEC)
    yield s
    s.close()


def stored_rows(path: Path) -> dict[tuple[int, int, int], Summary]:
    """Every rollup row as stored, decoded here: (resolution, window_start, label_set)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {(r, ws, lid): summary_from_proto(pb.Summary.FromString(blob))
                for r, ws, lid, blob in db.execute(
                    "SELECT resolution, window_start, label_set, summary FROM rollups")}


def x_counts(s: Summary) -> list[int]:
    return s.features["x"].tolist()


def test_a_batch_merges_each_rollup_row_once_and_equals_the_sum(store: SqliteStore) -> None:
    values = [[0.5, 1.5], [2.5], [0.1, 0.2, 2.9], [1.0]]
    out = one_batch(store, [lambda v=v, i=i: store.ingest(meta(f"d{i}", 1), b"e", summary(v),
                                                          RES)
                            for i, v in enumerate(values)])
    assert out == [IngestOutcome.ACCEPTED] * 4
    # Independently: one accumulator over all the events.
    expected = summary([x for v in values for x in v])
    rows = stored_rows(store.path)
    assert sorted(r for r, _, _ in rows) == sorted(RES)  # one row per resolution, no more
    for row in rows.values():
        assert x_counts(row) == x_counts(expected)
        assert row.report_count == 4 and row.event_count == 7
        assert row.latency.n == 7


def test_a_bad_report_sharing_rows_with_good_ones_rolls_back_alone(store: SqliteStore) -> None:
    # The bad summary fails only when something is merged into it or it into something:
    # in the batch's in-memory merge, after its own savepoint was released.
    good, bad = summary([0.5]), summary([1.5, 1.6])
    bad.error_count = "not a count"  # type: ignore[assignment]
    out = one_batch(store, [lambda: store.ingest(meta("d1", 1), b"e", good, RES),
                            lambda: store.ingest(meta("d2", 1), b"e", bad, RES),
                            lambda: store.ingest(meta("d3", 1), b"e", good, RES)])
    assert out[0] is IngestOutcome.ACCEPTED and out[2] is IngestOutcome.ACCEPTED
    assert isinstance(out[1], TypeError)
    for row in stored_rows(store.path).values():
        assert row.report_count == 2 and x_counts(row) == [0, 2, 0, 0, 0, 0]
    assert store.high_water_mark("d2") is None
    assert x_counts(good) == [0, 1, 0, 0, 0, 0]  # the callers' summaries are not merged into
    # The store goes on: d2's retry with a good summary lands on top.
    assert store.ingest(meta("d2", 1), b"e", summary([2.5]), RES) is IngestOutcome.ACCEPTED
    for row in stored_rows(store.path).values():
        assert row.report_count == 3 and x_counts(row) == [0, 2, 0, 1, 0, 0]


def test_the_write_cache_never_serves_a_row_another_connection_changed(
        store: SqliteStore) -> None:
    assert store.ingest(meta("d1", 1), b"e", summary([0.5]), RES) is IngestOutcome.ACCEPTED
    # Another process rewrites the minute row (as a repair tool or a second writer could).
    replacement = summary([2.5, 2.5, 2.5])
    with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
        db.execute("UPDATE rollups SET summary = ? WHERE resolution = ?",
                   (summary_to_proto(replacement).SerializeToString(), W))
    assert store.ingest(meta("d2", 1), b"e", summary([1.5]), RES) is IngestOutcome.ACCEPTED
    rows = stored_rows(store.path)
    (minute,) = [s for (r, _, _), s in rows.items() if r == W]
    assert x_counts(minute) == [0, 0, 1, 3, 0, 0]  # their row plus d2, not d1 plus d2
    (hour,) = [s for (r, _, _), s in rows.items() if r == 3600]
    assert x_counts(hour) == [0, 1, 1, 0, 0, 0]    # untouched by them: d1 plus d2


def test_queries_equal_a_fresh_merge_of_the_stored_rows_as_rows_change(
        store: SqliteStore) -> None:
    rng = np.random.default_rng(5)
    cover = [(W, WS, WS + 3600)]
    seq = 0

    def ingest_some(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            ws = WS + int(rng.integers(0, 60)) * W
            vals = rng.uniform(-0.5, 3.5, int(rng.integers(1, 5))).tolist()
            region = ("eu", "us")[int(rng.integers(0, 2))]
            assert store.ingest(meta(f"d{seq}", 1, ws, region), b"e", summary(vals), RES) \
                is IngestOutcome.ACCEPTED

    def fresh() -> dict[int, tuple[list[int], int, int]]:
        out: dict[int, Summary] = {}
        for (r, ws, lid), s in stored_rows(store.path).items():
            if r == W and WS <= ws < WS + 3600:
                if lid in out:
                    out[lid].merge_in(s)
                else:
                    out[lid] = s
        return {lid: (x_counts(s), s.report_count, s.latency.n) for lid, s in out.items()}

    ids = []
    for _ in range(4):
        ingest_some(25)
        ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        for _ in range(2):  # the second query is served from the cache
            got = store.merged_rollups(SPEC.hash, ids, cover)
            assert {lid: (x_counts(s), s.report_count, s.latency.n)
                    for lid, s in got.items()} == fresh()
    # A caller's changes to what it got do not reach the next caller.
    first = store.merged_rollups(SPEC.hash, ids, cover)
    for s in first.values():
        s.features["x"][:] = 0
        s.report_count = -1
    again = store.merged_rollups(SPEC.hash, ids, cover)
    assert {lid: (x_counts(s), s.report_count, s.latency.n) for lid, s in again.items()} \
        == fresh()
    assert store._read_cache.hits > 0  # the repeated queries did not decode every row again
