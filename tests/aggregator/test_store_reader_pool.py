"""SqliteStore's readers come from a bounded pool (`aggregator.store.pool`), not one per
thread: short-lived query threads (the HTTP server's thread per connection) leave a bounded
number of open file handles, a caller waits for a free reader, a closed one is replaced,
`close` closes them all, and `device_count`'s memo stays right per pooled connection."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator.store.base import DAY_S, IngestOutcome
from aggregator.store.pool import PoolClosed
from aggregator.store.sqlite import SqliteStore

W = 900
SPEC = Spec(model="m", model_version="1", features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
            window_length_s=W, privacy=PrivacySpec(mechanism=NO_NOISE))
T0 = 1_700_006_400


def one_summary() -> Summary:
    acc = WindowAccumulator(SPEC, 0)
    acc.observe_batch({"x": np.full(2, 0.5)}, None, np.full(2, 5.0), np.zeros(2, bool), 2)
    return acc.to_summary()


def send(store: SqliteStore, device: str, window: int, seq: int) -> None:
    meta = ReportMeta(device, "m", "1", {"region": "eu"}, T0 + window * W, W, seq, SPEC.hash)
    assert store.ingest(meta, b"e", one_summary(), (W,)) is IngestOutcome.ACCEPTED


def db_handles(path: Path) -> int:
    """This process's open file descriptors on the database file (the OS's count, not the
    pool's: one per SQLite connection)."""
    target = str(path.resolve())
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass   # closed since listed
    return n


def brute_count(path: Path, start: int, end: int) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(DISTINCT device_id) FROM reports WHERE spec_hash = ? "
                          "AND window_start >= ? AND window_start < ?",
                          (SPEC.hash, start, end)).fetchone()[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_many_short_lived_query_threads_leave_a_bounded_number_of_connections(
        tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    store = SqliteStore(path, readers=4)
    try:
        store.put_spec(SPEC)
        for d in range(5):
            send(store, f"dev-{d}", d, 1)
        ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        base = db_handles(path)
        results: list[tuple[int, int]] = []
        lock = threading.Lock()
        start = threading.Barrier(10)

        def query() -> None:
            start.wait()      # 10 at once: more threads than readers, so some must wait
            got = (store.device_count(SPEC.hash, ids, T0, T0 + DAY_S), len(store.list_specs()))
            with lock:
                results.append(got)

        for _ in range(12):   # 120 threads, each gone after its queries
            threads = [threading.Thread(target=query) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
                assert not t.is_alive()
        assert results == [(5, 1)] * 120
        # The leak kept one connection per thread: 120 more handles. The pool: at most 4.
        assert store._readers.open_connections <= 4
        assert db_handles(path) - base <= 4
        assert store._readers.opened <= 4
    finally:
        store.close()
    assert db_handles(path) == 0


def test_a_reader_waits_while_all_are_borrowed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite", readers=2)
    try:
        store.put_spec(SPEC)
        done = threading.Event()
        got: list[int] = []

        def query() -> None:
            got.append(len(store.list_specs()))
            done.set()

        with store._readers.borrow(), store._readers.borrow():
            pass   # one thread borrowing twice nests: the same connection, no wait
        hold, release = threading.Event(), threading.Event()

        def holder() -> None:
            with store._readers.borrow():
                hold.set()
                release.wait(30)

        holders = [threading.Thread(target=holder) for _ in range(2)]
        for t in holders:
            t.start()
            assert hold.wait(10)
            hold.clear()
        waiter = threading.Thread(target=query)
        waiter.start()
        assert not done.wait(0.5)          # both readers are borrowed: the query waits
        assert store._readers.open_connections == 2
        release.set()
        assert done.wait(10) and got == [1]
        for t in (*holders, waiter):
            t.join(10)
    finally:
        store.close()


def test_a_closed_reader_is_replaced_and_close_ends_them_all(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    store = SqliteStore(path, readers=2)
    store.put_spec(SPEC)
    with store._readers.borrow() as db:
        db.close()                 # unusable now: dropped when given back, not reused
    assert [s.hash for s in store.list_specs()] == [SPEC.hash]
    assert (store._readers.discarded, store._readers.opened) == (1, 2)
    assert store._readers.open_connections == 1
    with store._readers.borrow() as held:
        store.close()              # a borrowed reader is closed when given back
        held.execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError):
        held.execute("SELECT 1")
    assert store._readers.open_connections == 0
    with pytest.raises(PoolClosed, match="closed"):
        store.list_specs()
    store.close()                  # twice: no error
    if os.path.isdir("/proc/self/fd"):
        assert db_handles(path) == 0


def test_the_device_count_memo_is_right_on_every_pooled_reader(tmp_path: Path) -> None:
    """The memo is per reader connection (PRAGMA data_version is): two readers both asked
    before and after a commit each answer the brute-force count."""
    path = tmp_path / "a.sqlite"
    store = SqliteStore(path, readers=2)
    try:
        store.put_spec(SPEC)
        send(store, "a", 0, 1)
        ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        span = (T0, T0 + DAY_S)

        def count_on_the_other_reader() -> int:
            out: list[int] = []
            t = threading.Thread(target=lambda: out.append(store.device_count(SPEC.hash, ids,
                                                                              *span)))
            t.start()
            t.join(10)
            return out[0]

        for device, window in (("b", 1), ("c", 2), ("c", 3)):
            expected = brute_count(path, *span)
            with store._readers.borrow():   # this thread's reader: the other is the thread's
                assert store.device_count(SPEC.hash, ids, *span) == expected
                assert store.device_count(SPEC.hash, ids, *span) == expected   # memo hit
                assert count_on_the_other_reader() == expected
                assert len(store._counts) == 2
            send(store, device, window, window + 1)
        assert brute_count(path, *span) == 3
        assert store.device_count(SPEC.hash, ids, *span) == 3
        assert count_on_the_other_reader() == 3
    finally:
        store.close()
    assert store._counts == {}
