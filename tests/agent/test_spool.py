"""Tests for agent.spool: the durable, bounded outbox."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.spool import Spool


@pytest.fixture
def path(tmp_path):
    return tmp_path / "dev" / "spool.sqlite"


@pytest.fixture
def spool(path):
    s = Spool(path)
    yield s
    s.close()


def _payload(seq: int, dropped: int, size: int = 16) -> bytes:
    head = f"{seq}:{dropped}:".encode()
    return head + b"x" * max(0, size - len(head))


class Recorder:
    """A build callback that records what the spool told it."""

    def __init__(self, size: int = 16) -> None:
        self.calls: list[tuple[int, int]] = []
        self.size = size

    def __call__(self, seq: int, dropped: int) -> bytes:
        self.calls.append((seq, dropped))
        return _payload(seq, dropped, self.size)


def test_creates_parent_directories(path):
    s = Spool(path)
    try:
        assert path.exists()
        st = s.stats()
        assert (st.pending, st.pending_bytes, st.dropped_total, st.dead_letters, st.next_seq) == \
            (0, 0, 0, 0, 1)
    finally:
        s.close()


@pytest.mark.parametrize(("kwargs", "word"), [(dict(max_reports=0), "max_reports"),
                                              (dict(max_bytes=1023), "max_bytes")])
def test_bad_bounds(path, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        Spool(path, **kwargs)


def test_seq_strictly_increasing_and_build_gets_it(spool):
    rec = Recorder()
    seqs = [spool.enqueue(100 + i, rec) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert rec.calls == [(s, 0) for s in seqs]
    pending = spool.pending()
    assert [r.seq for r in pending] == seqs
    assert [r.window_start for r in pending] == [100, 101, 102, 103, 104]
    assert [r.payload for r in pending] == [_payload(s, 0) for s in seqs]
    assert all(type(r.payload) is bytes for r in pending)
    assert spool.stats().next_seq == 6
    assert spool.stats().pending_bytes == 5 * 16


def test_seq_survives_reopen(path):
    s = Spool(path)
    assert [s.enqueue(0, Recorder()) for _ in range(3)] == [1, 2, 3]
    s.ack(1)
    s.ack(2)
    s.ack(3)
    s.close()
    s = Spool(path)
    try:
        assert s.stats().next_seq == 4
        assert s.enqueue(0, Recorder()) == 4  # never reused, even with the outbox empty
        assert [r.seq for r in s.pending()] == [4]
    finally:
        s.close()


def test_pending_survives_reopen(path):
    s = Spool(path)
    s.enqueue(60, lambda seq, d: b"report-one")
    s.close()
    s = Spool(path)
    try:
        [r] = s.pending()
        assert (r.seq, r.window_start, r.payload) == (1, 60, b"report-one")
    finally:
        s.close()


def test_failed_build_uses_no_seq(spool):
    def boom(seq, dropped):
        raise RuntimeError("cannot serialize")

    with pytest.raises(RuntimeError):
        spool.enqueue(0, boom)
    assert spool.stats().pending == 0
    assert spool.enqueue(0, Recorder()) == 1


def test_pending_order_and_limit(spool):
    for _ in range(10):
        spool.enqueue(0, Recorder())
    assert [r.seq for r in spool.pending(limit=3)] == [1, 2, 3]
    spool.ack(2)
    assert [r.seq for r in spool.pending(limit=3)] == [1, 3, 4]


def test_ack_removes(spool):
    rec = Recorder()
    for _ in range(3):
        spool.enqueue(0, rec)
    spool.ack(2)
    assert [r.seq for r in spool.pending()] == [1, 3]
    spool.ack(2)  # twice: harmless
    spool.ack(99)  # unknown: harmless
    assert [r.seq for r in spool.pending()] == [1, 3]
    spool.ack(1)
    spool.ack(3)
    assert spool.pending() == []
    assert spool.stats().pending == 0 and spool.stats().pending_bytes == 0


def test_dead_letter_moves(spool, path):
    for _ in range(3):
        spool.enqueue(0, Recorder())
    spool.dead_letter(2, "INVALID_ARGUMENT: " + "x" * 2000)
    assert [r.seq for r in spool.pending()] == [1, 3]
    assert spool.stats().dead_letters == 1
    spool.dead_letter(42, "unknown seq")  # nothing to move
    assert spool.stats().dead_letters == 1
    db = sqlite3.connect(path)
    try:
        [(seq, payload, reason)] = db.execute(
            "SELECT seq, payload, reason FROM dead_letters").fetchall()
    finally:
        db.close()
    assert seq == 2 and payload == _payload(2, 0)
    assert reason.startswith("INVALID_ARGUMENT") and len(reason) == 1000


def _carried(payload: bytes) -> int:
    return int(payload.split(b":")[1])


def _settle(spool: Spool, delivered: list[int]) -> int:
    """Deliver (ack) everything pending, then spool one more report into the empty outbox:
    returns the drops that final report carries."""
    for r in spool.pending(limit=100_000):
        delivered.append(_carried(r.payload))
        spool.ack(r.seq)
    rec = Recorder()
    spool.enqueue(0, rec)
    [(_, dropped)] = rec.calls
    return dropped


def test_bound_on_reports_drops_oldest_and_counts(path):
    s = Spool(path, max_reports=3)
    try:
        rec = Recorder()
        for i in range(7):
            s.enqueue(i, rec)
        assert [r.seq for r in s.pending()] == [5, 6, 7]  # the oldest went first
        st = s.stats()
        assert st.pending == 3 and st.dropped_total == 4
        # Each build is told about the drops since the previous build.
        assert [d for _, d in rec.calls] == [0, 0, 0, 0, 1, 1, 1]
        # Every drop reaches the aggregator exactly once, in some report.
        delivered: list[int] = []
        last = _settle(s, delivered)
        assert sum(delivered) + last == s.stats().dropped_total == 4
    finally:
        s.close()


def test_drops_carried_by_a_dropped_report_are_not_lost(path):
    # seq 3 carries the drop of seq 1; when seq 3 is dropped in turn, both drops are owed.
    s = Spool(path, max_reports=1)
    rec = Recorder()
    s.enqueue(0, rec)
    s.enqueue(0, rec)  # drops seq 1
    s.close()
    s = Spool(path, max_reports=1)
    try:
        s.ack(2)
        s.enqueue(0, rec)  # carries the drop of seq 1 (owed across the reopen)
        s.enqueue(0, rec)  # drops seq 3
        assert rec.calls == [(1, 0), (2, 0), (3, 1), (4, 0)]
        assert s.stats().dropped_total == 2
        delivered: list[int] = []
        last = _settle(s, delivered)
        assert sum(delivered) + last == 2
    finally:
        s.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["enqueue", "enqueue", "enqueue", "ack", "reopen"]),
                max_size=40),
       st.integers(1, 4))
def test_every_drop_is_carried_exactly_once(tmp_path_factory, ops, max_reports):
    path = tmp_path_factory.mktemp("spool") / "spool.sqlite"
    s = Spool(path, max_reports=max_reports)
    delivered: list[int] = []
    rec = Recorder()
    try:
        for op in ops:
            if op == "enqueue":
                s.enqueue(0, rec)
                assert s.stats().pending <= max_reports
            elif op == "ack":
                pending = s.pending(limit=1)
                if pending:
                    delivered.append(_carried(pending[0].payload))
                    s.ack(pending[0].seq)
            else:
                s.close()
                s = Spool(path, max_reports=max_reports)
        assert [seq for seq, _ in rec.calls] == list(range(1, len(rec.calls) + 1))
        total = s.stats().dropped_total
        last = _settle(s, delivered)
        assert sum(delivered) + last == total
    finally:
        s.close()


def test_bound_on_bytes_drops_oldest(path):
    s = Spool(path, max_bytes=1024)
    try:
        rec = Recorder(size=400)
        for _ in range(5):
            s.enqueue(0, rec)
        assert [r.seq for r in s.pending()] == [4, 5]  # 800 bytes fit, 1200 do not
        assert s.stats().pending_bytes == 800
        assert s.stats().dropped_total == 3
        assert [d for _, d in rec.calls] == [0, 0, 0, 1, 1]
    finally:
        s.close()


def test_newest_report_is_kept_even_when_too_big(path):
    s = Spool(path, max_bytes=1024)
    try:
        s.enqueue(0, Recorder(size=100))
        s.enqueue(0, Recorder(size=5000))
        assert [r.seq for r in s.pending()] == [2]
        assert s.stats().dropped_total == 1
    finally:
        s.close()


def test_spec_cache_round_trip(path):
    s = Spool(path)
    assert s.cached_spec("m", "1") is None
    s.cache_spec("m", "1", "h1", '{"v": 1}')
    s.cache_spec("m", "2", "h2", '{"v": 2}')
    assert s.cached_spec("m", "1") == '{"v": 1}'
    s.cache_spec("m", "1", "h3", '{"v": 3}')  # replaced
    assert s.cached_spec("m", "1") == '{"v": 3}'
    assert s.cached_spec("other", "1") is None
    s.close()
    s = Spool(path)
    try:
        assert s.cached_spec("m", "1") == '{"v": 3}'
        assert s.cached_spec("m", "2") == '{"v": 2}'
    finally:
        s.close()


def test_concurrent_enqueue_gives_unique_seqs(spool):
    threads_n, per_thread = 8, 40
    results: list[list[int]] = [[] for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                results[i].append(spool.enqueue(i, lambda seq, d: f"{seq}".encode()))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    seqs = [s for r in results for s in r]
    assert len(seqs) == threads_n * per_thread
    assert sorted(seqs) == list(range(1, threads_n * per_thread + 1))
    for r in results:  # each thread saw its own seqs increase
        assert r == sorted(r)
    pending = spool.pending(limit=10_000)
    assert len(pending) == threads_n * per_thread
    assert all(r.payload == f"{r.seq}".encode() for r in pending)
    assert spool.stats().next_seq == threads_n * per_thread + 1


def test_label_cache_copy_round_trips_and_stays_bounded(tmp_path) -> None:
    """The spool's copy of the label cache: NaN predictions and confidences survive (SQLite has
    no NaN), joined ids are forgotten, expired entries are deleted on update, and a load takes
    only the newest entries not older than its cutoff."""
    nan = float("nan")
    spool = Spool(tmp_path / "s.sqlite")
    spool.label_cache_update({"a": (10.0, 0.9, nan), "b": (11.0, nan, 0.4),
                              "c": (12.0, 1.0, 0.7)}, (), min_t=0.0)
    spool.label_cache_update({"d": (13.0, 0.1, nan)}, ["b"], min_t=0.0)
    got = spool.label_cache_load(0.0, 10)
    assert [k for k, _ in got] == ["a", "c", "d"]          # oldest first, "b" joined
    t, pred, conf = dict(got)["a"]
    assert (t, pred) == (10.0, 0.9) and conf != conf        # NaN back as NaN
    assert [k for k, _ in spool.label_cache_load(0.0, 2)] == ["c", "d"]    # newest 2 loaded
    assert [k for k, _ in spool.label_cache_load(11.5, 10)] == ["c", "d"]  # none too old
    spool.label_cache_update({}, (), min_t=12.5)
    assert [k for k, _ in spool.label_cache_load(0.0, 10)] == ["d"]        # TTL cutoff
    spool.close()
    reopened = Spool(tmp_path / "s.sqlite")
    assert [k for k, _ in reopened.label_cache_load(0.0, 10)] == ["d"]
    reopened.close()
