"""Review of issue #8's PostgreSQL store and replica alerting: bugs found, each proven.

Each xfail(strict=True) test fails on the code as reviewed and passes once the bug is fixed
(then drop its marker). A real server (tests/postgres/conftest.py), no mocks; a broken lease
session is made with pg_terminate_backend, as a network blip or server restart would.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import numpy as np
import psycopg
import pytest

# test_alert_evaluator's spec, rules and clock (appended: shadows nothing here).
sys.path.append(str(Path(__file__).resolve().parents[1] / "aggregator"))
from test_alert_evaluator import BASE, RULES, Clock, W, end, make_spec  # noqa: E402

from agent.errors import ConfigError  # noqa: E402
from agent.spec import Spec  # noqa: E402
from agent.window import WindowAccumulator  # noqa: E402
from agent.wire import ReportMeta, report_to_proto  # noqa: E402
from aggregator.alerts import load_rules  # noqa: E402
from aggregator.alerts.evaluator import AlertEvaluator, EvaluatorConfig  # noqa: E402
from aggregator.ingest import Ingestor, ResourceExhausted  # noqa: E402
from aggregator.notify import MemoryNotifier  # noqa: E402
from aggregator.server import AggregatorConfig, serve  # noqa: E402
from aggregator.store.postgres import LOCK_NAMESPACE, PostgresStore, redact_dsn  # noqa: E402
from aggregator.validate import Limits  # noqa: E402
from protos import fleetwatch_pb2 as pb  # noqa: E402


def sessions(dsn: str) -> int:
    """This store's sessions on the test database (application_name fleetwatch)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND application_name = 'fleetwatch'"
                           ).fetchone()
    assert row is not None
    return int(row[0])


def test_http_requests_do_not_leave_a_postgres_session_each(pg_dsn: str) -> None:
    """`aggregator.http` is a ThreadingHTTPServer: every request runs in a new thread, and
    each such thread's first query opens a PostgreSQL session (`PostgresStore._reader`) that
    stays open, kept in `_readers`, until the store closes. 40 GET /api/models leave 40 idle
    sessions; a day of dashboard polling exhausts max_connections (100 by default), and then
    no replica on that server can connect."""
    with serve(AggregatorConfig(db=pg_dsn, listen="127.0.0.1:0", workers=2,
                                http_listen="127.0.0.1:0")) as agg:
        url = f"http://127.0.0.1:{agg.http_port}/api/models"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
        base = sessions(pg_dsn)
        for _ in range(40):
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200
        # A bounded pool, or a thread's session closed when the thread ends: a few at most
        # (the bound leaves room for a pool's size; the leak adds one per request).
        assert sessions(pg_dsn) - base <= 10


class Replica:
    """One replica in process: its own PostgresStore, Ingestor and AlertEvaluator."""

    def __init__(self, dsn: str, clock: Clock, spec: Spec) -> None:
        self.spec = spec
        self.store = PostgresStore(dsn)
        self.store.put_spec(spec)
        self.notifier = MemoryNotifier()
        self.evaluator = AlertEvaluator(self.store, load_rules(RULES), self.notifier,
                                        EvaluatorConfig(idle_flush_s=5.0,
                                                        max_windows_per_tick=2), clock=clock)
        self.ingestor = Ingestor(self.store, on_accepted=self.evaluator.on_accepted)

    def send(self, window: int, latency_ms: float, seq: int, region: str = "eu") -> None:
        ws = BASE + window * W
        acc = WindowAccumulator(self.spec, ws)
        acc.observe_batch({"x": np.full(50, 0.5)}, np.full(50, 0.25), np.full(50, latency_ms),
                          np.zeros(50, bool), 50)
        meta = ReportMeta(f"dev-{region}", self.spec.model, self.spec.model_version,
                          {"region": region}, ws, W, seq, self.spec.hash)
        self.ingestor.ingest(pb.ReportEnvelope(report=report_to_proto(
            meta, acc.to_summary()).SerializeToString()).SerializeToString())

    def drain(self) -> int:
        total = 0
        while (n := self.evaluator.tick()):
            total += n
        return total


def terminate_lease_session(dsn: str) -> None:
    """End the session holding the "alerts" advisory lock (a network blip, say)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) AND l.classid::bigint = %s",
            (LOCK_NAMESPACE % 2**32,)).fetchall()
    assert rows == [(True,)], rows


def test_a_lease_lost_and_regained_between_ticks_does_not_fire_twice(pg_dsn: str) -> None:
    """a leads and evaluates windows 0-1 (max 2 per tick; eu breaches from window 0, the rule
    fires at the end of window 2). a's lease session breaks; b takes the lease, evaluates
    windows 2-3 and fires; b then dies (its session ends, the lease is free). a's next tick
    takes the lease again -- `try_lead` answers True as if it had held it all along, so
    `_lead` sees no change, does not reload the engine from the store, and a evaluates
    windows 2-4 from its stale in-memory engine: a second firing notification and a second
    firing transition in the shared history."""
    clock, spec = Clock(), make_spec()
    a, b = Replica(pg_dsn, clock, spec), Replica(pg_dsn, clock, spec)
    try:
        for w in range(5):
            a.send(w, 250.0, seq=w + 1)
        clock.t += 10
        assert a.evaluator.tick() == 2 and a.evaluator.leading
        assert a.notifier.notifications == []
        terminate_lease_session(pg_dsn)
        b.drain()
        assert b.evaluator.leading
        assert [n.status for n in b.notifier.notifications] == ["firing"]
        b.store.close()                 # b dies: the lease is free again
        a.drain()
        firing = [h for h in a.store.alert_history() if h.state == "firing"]
        assert [h.at_s for h in firing] == [end(2)]
        assert a.notifier.notifications == []
    finally:
        a.store.close()
        b.store.close()


def test_a_password_with_hash_or_question_mark_is_redacted() -> None:
    """libpq reads the userinfo up to '@' ("s3cr#t?pw" below is the password: psycopg
    connects with it), but urllib.parse.urlsplit ends the netloc at '#' or '?', finds no
    '@' and leaves the DSN as it was: the password appears whole in `describe_db` (the serve
    banner), every log line naming the database and every ConfigError."""
    dsn = "postgresql://fw:s3cr#t?pw@127.0.0.1:1/fleet"
    from psycopg.conninfo import conninfo_to_dict

    assert conninfo_to_dict(dsn)["password"] == "s3cr#t?pw"
    with pytest.raises(ConfigError) as e:    # nothing listens on port 1
        PostgresStore(dsn)
    for text in (redact_dsn(dsn), str(e.value)):
        assert "s3cr" not in text and "pw@" not in text, text


def test_label_value_limit_holds_across_replicas(pg_dsn: str) -> None:
    """max_label_values_per_key = 2. a stores region=eu, b (which loads the stored values on
    its first report) region=us: 2 values. a's cache still holds only eu, so a accepts
    region=ap: 3 values in the shared database, and each further replica adds its own
    quota (the bound on rollups and cohorts is per replica, not per fleet)."""
    clock, spec = Clock(), make_spec()
    a, b = Replica(pg_dsn, clock, spec), Replica(pg_dsn, clock, spec)
    limits = Limits(max_label_values_per_key=2)
    a.ingestor = Ingestor(a.store, limits)
    b.ingestor = Ingestor(b.store, limits)
    try:
        a.send(0, 20.0, seq=1, region="eu")
        b.send(0, 20.0, seq=1, region="us")
        with pytest.raises(ResourceExhausted):
            a.send(0, 20.0, seq=1, region="ap")
    finally:
        a.store.close()
        b.store.close()
