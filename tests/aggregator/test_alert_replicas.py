"""The alert evaluator of several replicas on one database (in process, one SQLite file).

Two replicas are two `SqliteStore`s on the same file, each with its `Ingestor` and
`AlertEvaluator`, as two processes would be. SQLite has no lease of its own (one process owns
a file), so the lease here is an in-process `Lease` the test moves by hand; the PostgreSQL
advisory lock, real processes and kill -9 are in tests/postgres/test_replicas.py.
Helpers (spec, fake monotonic clock, rules) are test_alert_evaluator's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from test_alert_evaluator import BASE, RULES, Clock, W, end, make_spec

from agent.spec import Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator.alerts import load_rules
from aggregator.alerts.evaluator import AlertEvaluator, EvaluatorConfig
from aggregator.ingest import Ingestor
from aggregator.notify import MemoryNotifier
from aggregator.store.sqlite import SqliteStore
from protos import fleetwatch_pb2 as pb


class Lease:
    """Who holds the "alerts" lease; the test hands it over (a dead leader's lease), now or
    after a number of `try_lead` calls (a lease session that breaks in the middle of a tick).
    Every hand-over starts a new epoch, as a new PostgreSQL lock session does: handing it
    back to a former holder is a new hold, not the old one."""

    def __init__(self) -> None:
        self._holder = "a"
        self.epoch = 1
        self.switch: tuple[int, str] | None = None

    @property
    def holder(self) -> str:
        return self._holder

    @holder.setter
    def holder(self, name: str) -> None:
        if name != self._holder:
            self._holder = name
            self.epoch += 1

    def check(self, name: str) -> int:
        if self.switch is not None:
            calls, holder = self.switch
            self.switch = (calls - 1, holder) if calls > 1 else None
            if calls <= 1:     # this call is the n-th: the lease has moved
                self.holder = holder
        return self.epoch if self.holder == name else 0


class LeasedStore(SqliteStore):
    def __init__(self, path: Path, name: str, lease: Lease) -> None:
        super().__init__(path)
        self.name, self.lease = name, lease

    def try_lead(self, role: str) -> int:
        assert role == "alerts"
        return self.lease.check(self.name)


class Replica:
    def __init__(self, db: Path, name: str, lease: Lease, clock: Clock, spec: Spec) -> None:
        self.spec = spec
        self.store = LeasedStore(db, name, lease)
        self.store.put_spec(spec)
        self.notifier = MemoryNotifier()
        self.evaluator = AlertEvaluator(self.store, load_rules(RULES), self.notifier,
                                        EvaluatorConfig(idle_flush_s=5.0), clock=clock)
        self.ingestor = Ingestor(self.store, on_accepted=self.evaluator.on_accepted)

    def send(self, window: int, latency_ms: float, region: str, seq: int) -> None:
        ws = BASE + window * W
        acc = WindowAccumulator(self.spec, ws)
        acc.observe_batch({"x": np.full(50, 0.5)}, np.full(50, 0.25), np.full(50, latency_ms),
                          np.zeros(50, bool), 50)
        meta = ReportMeta(f"dev-{region}", self.spec.model, self.spec.model_version,
                          {"region": region}, ws, W, seq, self.spec.hash)
        env = pb.ReportEnvelope(report=report_to_proto(meta, acc.to_summary())
                                .SerializeToString())
        self.ingestor.ingest(env.SerializeToString())

    def drain(self) -> int:
        total = 0
        while (n := self.evaluator.tick()):
            total += n
        return total

    def until(self) -> float | None:
        return self.evaluator.view().evaluated_until.get("m/1")


@pytest.fixture
def replicas(tmp_path: Path):
    lease, clock, spec = Lease(), Clock(), make_spec()
    made = [Replica(tmp_path / "shared.sqlite", n, lease, clock, spec) for n in ("a", "b")]
    yield (*made, lease, clock)
    for r in made:
        r.store.close()


def test_the_watermark_sees_the_reports_of_every_replica(replicas) -> None:
    """eu reports to a, us to b; a leads: us's newest window, known only to b's ingest,
    holds a's windows open (read from the shared database)."""
    a, b, _, clock = replicas
    for w in range(6):
        a.send(w, 20.0, "eu", seq=w + 1)
        if w <= 2:
            b.send(w, 20.0, "us", seq=w + 1)
    assert b.drain() == 0          # not the leader: evaluates nothing
    a.drain()
    assert a.until() == end(1)     # us delivered window 2 (to b); one window of lateness
    b.send(3, 20.0, "us", seq=4)
    a.drain()
    assert a.until() == end(2)
    clock.t += 5.0                 # nobody reported for idle_flush_s: eu's windows close
    a.drain()
    assert a.until() == end(5)


def test_failover_continues_after_the_last_saved_window_and_notifies_once(replicas) -> None:
    a, b, lease, clock = replicas
    # eu breaches from window 1 (for = 3m: fires at the end of window 3); a fires it.
    for w in range(5):
        a.send(w, 20.0 if w == 0 else 250.0, "eu", seq=w + 1)
    clock.t += 10
    a.drain()
    assert [n.status for n in a.notifier.notifications] == ["firing"]
    assert a.until() == end(4)
    # The follower mirrors the stored engine: the same firing alert from either replica.
    b.drain()
    assert b.until() == end(4)
    assert [(x.rule, x.state, x.starts_at_s) for x in b.evaluator.view().alerts] == [
        (x.rule, x.state, x.starts_at_s) for x in a.evaluator.view().alerts] == [
        ("latency-p95", "firing", BASE + W)]

    lease.holder = "b"             # a died: b takes the lease
    for w in range(5, 8):          # eu's device fails over to b; the breach goes on, then ends
        b.send(w, 250.0 if w < 7 else 20.0, "eu", seq=w + 1)
    clock.t += 10
    assert a.drain() == 0          # lost the lease: stops
    assert b.drain() == 3          # windows 5..7: after a's last saved window, none twice
    assert b.evaluator.lead_changes == 1
    assert b.until() == end(7)
    assert a.notifier.notifications[1:] == []
    assert [n.status for n in b.notifier.notifications] == ["resolved"]   # not fired again
    history = b.store.alert_history()
    assert [(h.previous_state, h.state, h.at_s) for h in reversed(history)] == [
        ("pending", "firing", end(3)), ("firing", "resolved", end(7))]


def test_sender_activity_is_per_sender_newest_window_and_last_receipt(tmp_path: Path) -> None:
    """The table behind the watermark, written in the ingest transaction; a duplicate (the
    same report through the other replica) changes nothing."""
    lease, clock, spec = Lease(), Clock(), make_spec()
    a = Replica(tmp_path / "s.sqlite", "a", lease, clock, spec)
    b = Replica(tmp_path / "s.sqlite", "b", lease, clock, spec)
    try:
        a.send(3, 20.0, "eu", seq=1)
        b.send(1, 20.0, "eu", seq=2)      # an older window, later: newest stays 3
        before = a.store.sender_activity(spec.hash, 0)
        a.send(1, 20.0, "eu", seq=2)      # the same report again, through a: a duplicate
        assert a.store.sender_activity(spec.hash, 0) == before
        (newest, received_ms), = before.values()
        assert list(before) == ["dev-eu"] and newest == BASE + 3 * W
        assert a.store.sender_activity(spec.hash, received_ms + 1) == {}
        assert b.store.sender_activity("no-such-spec", 0) == {}
    finally:
        a.store.close()
        b.store.close()


def test_a_lease_lost_mid_tick_saves_and_notifies_nothing(replicas) -> None:
    """a's lease goes to b after a's tick began: a evaluated up to the firing window but
    finds it lost right before the save, so neither stores nor notifies it; b evaluates from
    the database's state and fires once."""
    a, b, lease, clock = replicas
    for w in range(5):
        a.send(w, 250.0, "eu", seq=w + 1)
    clock.t += 10
    lease.switch = (2, "b")        # the tick's own check passes, the next one fails
    assert a.evaluator.tick() == 2            # windows 0, 1 (window 2 fires: not saved)
    assert a.notifier.notifications == [] and a.store.alert_history() == []
    assert a.store.load_alert_state("m", "1") is None
    b.drain()
    assert a.drain() == 0
    assert [n.status for n in b.notifier.notifications] == ["firing"]
    assert [(h.state, h.at_s) for h in b.store.alert_history()] == [("firing", end(2))]


def test_the_leader_finds_specs_whose_reports_reached_only_the_other_replica(replicas) -> None:
    a, b, _, clock = replicas
    for w in range(6):
        b.send(w, 20.0 if w < 2 else 250.0, "eu", seq=w + 1)   # a accepts nothing itself
    assert b.drain() == 0
    # Found in the database (its receipts are fresh on a's clock): one window of lateness,
    # then the idle flush.
    assert a.drain() == 5 and a.until() == end(4)
    clock.t += 5
    assert a.drain() == 1 and a.until() == end(5)
    assert [n.status for n in a.notifier.notifications] == ["firing"]   # at the end of 4
    assert b.notifier.notifications == []


def test_a_database_from_before_sender_activity_gets_it_from_its_reports(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    lease, clock, spec = Lease(), Clock(), make_spec()
    r = Replica(db, "a", lease, clock, spec)
    r.send(2, 20.0, "eu", seq=1)
    r.send(4, 20.0, "eu", seq=2)
    r.send(1, 20.0, "us", seq=1)
    want = r.store.sender_activity(spec.hash, 0)
    r.store.close()
    with sqlite3.connect(db) as conn:   # as an earlier build left it
        conn.execute("DROP TABLE sender_activity")
    reopened = SqliteStore(db)
    try:
        got = reopened.sender_activity(spec.hash, 0)
        assert {k: v[0] for k, v in got.items()} == {"dev-eu": BASE + 4 * W,
                                                     "dev-us": BASE + 1 * W}
        # the receipt times are the reports' own (stamped by a separate clock reading)
        assert all(abs(got[k][1] - want[k][1]) < 1000 for k in want)
    finally:
        reopened.close()
