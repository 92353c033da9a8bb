"""Group commit in aggregator.store.sqlite: reports queued while a batch commits go into one
transaction, each in its own savepoint, and every caller gets its own outcome only after the
commit."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator.store.base import IngestOutcome, rollup_resolutions
from aggregator.store.sqlite import SqliteStore

W = 60
SPEC = Spec(model="m", model_version="1", features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
            window_length_s=W, privacy=PrivacySpec(mechanism=NO_NOISE))
WS = 1_700_000_000 // W * W
RES = rollup_resolutions(W)


def summary(events: int = 2) -> Summary:
    acc = WindowAccumulator(SPEC, WS)
    acc.observe_batch({"x": np.full(events, 0.5)}, None, np.full(events, 5.0),
                      np.zeros(events, bool), events)
    return acc.to_summary()


def meta(device: str, seq: int, labels: dict[str, str] | None = None, ws: int = WS
         ) -> ReportMeta:
    return ReportMeta(device, "m", "1", labels or {"region": "eu"}, ws, W, seq, SPEC.hash)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "a.sqlite")
    s.put_spec(SPEC)
    yield s
    s.close()


def one_batch(store: SqliteStore, calls: list[Callable[[], IngestOutcome]]
              ) -> list[Any]:
    """Run the calls in threads while the write lock is held (a commit in progress), so that
    all of them queue up, then let go: the first to get the lock writes them all at once."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e

    commits = store.ingest_commits
    with store._write_lock:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for i, t in enumerate(threads):
            t.start()
            deadline = time.monotonic() + 10
            while len(store._queue) <= i:  # in order: the batch is the calls' order
                assert time.monotonic() < deadline, "a call never queued"
                time.sleep(0.001)
    for t in threads:
        t.join(timeout=30)
    assert store.ingest_commits == commits + 1, "expected one transaction for the batch"
    return results


def stored(store: SqliteStore) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        return db.execute("SELECT device_id, seq FROM reports ORDER BY 1, 2").fetchall()


def rollup_reports(store: SqliteStore) -> int:
    merged = store.merged_rollups(SPEC.hash, [ls.id for ls in store.label_sets(SPEC.hash)],
                                  [(W, WS - 3600, WS + 3600)])
    return sum(s.report_count for s in merged.values())


def test_a_duplicate_inside_one_batch_is_merged_once(store: SqliteStore) -> None:
    s = summary()
    out = one_batch(store, [lambda: store.ingest(meta("d1", 1), b"e", s, RES),
                            lambda: store.ingest(meta("d2", 1), b"e", s, RES),
                            lambda: store.ingest(meta("d1", 1), b"e", s, RES)])
    assert out == [IngestOutcome.ACCEPTED, IngestOutcome.ACCEPTED, IngestOutcome.DUPLICATE]
    assert stored(store) == [("d1", 1), ("d2", 1)]
    assert rollup_reports(store) == 2
    ids = [ls.id for ls in store.label_sets(SPEC.hash)]
    assert store.device_count(SPEC.hash, ids, WS, WS + W) == 2
    assert store.high_water_mark("d1") == 1


def test_a_replay_inside_one_batch_is_judged_on_the_mark_the_batch_raised(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite", reorder_window=10)
    try:
        s = summary()
        out = one_batch(store, [lambda: store.ingest(meta("d1", 100), b"e", s, RES),
                                lambda: store.ingest(meta("d1", 50), b"e", s, RES),
                                lambda: store.ingest(meta("d1", 95), b"e", s, RES)])
        assert out == [IngestOutcome.ACCEPTED, IngestOutcome.REPLAYED, IngestOutcome.ACCEPTED]
        assert stored(store) == [("d1", 95), ("d1", 100)]
        assert store.high_water_mark("d1") == 100
    finally:
        store.close()


def test_a_bad_report_in_the_middle_rolls_back_alone(store: SqliteStore) -> None:
    good, bad = summary(), summary()
    bad.report_count = "not a count"  # type: ignore[assignment]  # fails after it is written
    out = one_batch(store, [
        lambda: store.ingest(meta("d1", 1, {"region": "eu"}), b"e", good, RES),
        lambda: store.ingest(meta("d2", 1, {"region": "us"}), b"e", bad, RES),
        lambda: store.ingest(meta("d3", 1, {"region": "apac"}), b"e", good, RES)])
    assert out[0] is IngestOutcome.ACCEPTED and out[2] is IngestOutcome.ACCEPTED
    assert isinstance(out[1], TypeError)           # its caller gets the exception
    assert stored(store) == [("d1", 1), ("d3", 1)]
    assert rollup_reports(store) == 2
    assert store.high_water_mark("d2") is None
    assert [ls.labels for ls in store.label_sets(SPEC.hash)] == [{"region": "apac"},
                                                                 {"region": "eu"}]
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        assert db.execute("SELECT COUNT(*) FROM label_sets WHERE canonical = 'region=us'"
                          ).fetchone()[0] == 0     # the interned label set went with it
        assert db.execute("SELECT COUNT(*) FROM device_activity WHERE device_id = 'd2'"
                          ).fetchone()[0] == 0
    # The label-set cache did not keep the rolled-back id: d2's retry interns it afresh.
    assert store.ingest(meta("d2", 1, {"region": "us"}), b"e", good, RES) \
        is IngestOutcome.ACCEPTED
    us = [ls for ls in store.label_sets(SPEC.hash) if ls.labels == {"region": "us"}]
    assert len(us) == 1
    assert store.device_count(SPEC.hash, [us[0].id], WS, WS + W) == 1
    assert rollup_reports(store) == 3


def test_concurrent_ingest_from_many_threads_adds_up(store: SqliteStore) -> None:
    devices, per_device = 16, 30
    s = summary(events=3)
    outcomes: list[list[IngestOutcome]] = [[] for _ in range(devices)]

    def device(d: int) -> None:
        rng = random.Random(d)
        for seq in range(1, per_device + 1):
            m = meta(f"d{d:02d}", seq, {"region": ("eu", "us")[d % 2]}, WS + (seq % 5) * W)
            outcomes[d].append(store.ingest(m, b"e", s, RES))
            if rng.random() < 0.3:  # a retry whose ack was lost: a duplicate
                outcomes[d].append(store.ingest(m, b"e", s, RES))

    threads = [threading.Thread(target=device, args=(d,)) for d in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    accepted = sum(o.count(IngestOutcome.ACCEPTED) for o in outcomes)
    assert accepted == devices * per_device
    assert sum(o.count(IngestOutcome.DUPLICATE) for o in outcomes) \
        == sum(len(o) for o in outcomes) - accepted
    assert len(stored(store)) == devices * per_device
    assert rollup_reports(store) == devices * per_device
    ids = [ls.id for ls in store.label_sets(SPEC.hash)]
    merged = store.merged_rollups(SPEC.hash, ids, [(W, WS, WS + 5 * W)])
    assert sum(m.event_count for m in merged.values()) == 3 * devices * per_device
    assert store.device_count(SPEC.hash, ids, WS, WS + 5 * W) == devices
    assert all(store.high_water_mark(f"d{d:02d}") == per_device for d in range(devices))
    # Batching happened: fewer transactions than reports.
    assert store.ingest_commits < accepted
