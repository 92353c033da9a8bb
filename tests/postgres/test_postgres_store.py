"""PostgresStore beyond the shared contract: two stores on one database ingesting the same
reports concurrently (as two replicas would), versioned schema migrations, lost connections,
and the CLI's errors for a database it cannot use."""

from __future__ import annotations

import collections
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import pytest
from test_store_contract import LABELS, RES, SPEC, T0, W, make_summary, meta

import aggregator.store.postgres as pgmod
from agent.errors import ConfigError
from aggregator.store import open_store
from aggregator.store.base import IngestOutcome, time_cover
from aggregator.store.postgres import PostgresStore, SchemaTooNew, redact_dsn

REPO = Path(__file__).resolve().parents[2]


def test_open_store_chooses_by_the_name(tmp_path: Path, pg_dsn: str) -> None:
    lite = open_store(tmp_path / "a.sqlite")
    pg = open_store(pg_dsn)
    also_pg = open_store("postgres://" + pg_dsn.split("://", 1)[1])
    try:
        assert type(lite).__name__ == "SqliteStore"
        assert isinstance(pg, PostgresStore) and isinstance(also_pg, PostgresStore)
    finally:
        for s in (lite, pg, also_pg):
            s.close()


# -- two replicas, one database ---------------------------------------------------------------

def test_two_stores_ingesting_the_same_reports_concurrently_merge_each_once(
        pg_dsn: str) -> None:
    """Every report goes through both stores, from 8 threads each, in shuffled orders, into
    few rollup rows (heavy row contention): each is accepted exactly once, the rollups hold
    exactly the distinct reports' events at every resolution, the high-water marks are the
    largest seqs, and no transaction ever deadlocked (lock order) or had to be retried."""
    a, b = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    try:
        a.put_spec(SPEC)
        rng = np.random.default_rng(21)
        devices, seqs = 64, 8
        reports = []
        for d in range(devices):
            for seq in range(1, seqs + 1):
                ws = T0 + (seq % 4) * 20 * W   # 4 windows, across an hour boundary
                s, _, _ = make_summary(rng, int(rng.integers(1, 6)), ws=ws)
                reports.append((meta(f"dev-{d:02d}", seq, ws, dict(LABELS[d % 2])), s))
        outcomes: collections.Counter[tuple[str, int, IngestOutcome]] = collections.Counter()
        lock = threading.Lock()
        errors: list[BaseException] = []
        barrier = threading.Barrier(16)

        def worker(store: PostgresStore, order: list[int]) -> None:
            try:
                barrier.wait()
                for i in order:
                    m, s = reports[i]
                    out = store.ingest(m, b"env", s, RES)
                    with lock:
                        outcomes[m.device_id, m.seq, out] += 1
            except BaseException as e:
                errors.append(e)

        threads = []
        for store in (a, b):
            idx = list(range(len(reports)))
            random.Random(id(store)).shuffle(idx)
            for k in range(8):
                threads.append(threading.Thread(target=worker, args=(store, idx[k::8])))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads), "ingest hung (deadlock?)"

        accepted = collections.Counter((d, s) for d, s, o in outcomes
                                       if o is IngestOutcome.ACCEPTED)
        dups = collections.Counter((d, s) for (d, s, o), n in outcomes.items()
                                   for _ in range(n) if o is IngestOutcome.DUPLICATE)
        assert len(accepted) == len(reports) and set(accepted.values()) == {1}
        assert len(dups) == len(reports) and set(dups.values()) == {1}
        assert a.ingest_retries == b.ingest_retries == 0
        assert a.ingest_commits + b.ingest_commits < 2 * len(reports)   # group commit worked

        want_events = sum(s.event_count for _, s in reports)
        for store in (a, b):
            ids = [ls.id for ls in store.label_sets(SPEC.hash)]
            for res in RES:
                lo = T0 // res * res
                merged = store.merged_rollups(SPEC.hash, ids, [(res, lo, T0 + 4 * 20 * W)])
                assert sum(s.event_count for s in merged.values()) == want_events, res
                assert sum(s.report_count for s in merged.values()) == len(reports), res
                hist = sum(s.features["x"] for s in merged.values())
                assert hist.sum() == want_events
            cover = time_cover(T0, T0 + 80 * W, RES)
            assert sum(s.event_count for s in store.merged_rollups(
                SPEC.hash, ids, cover).values()) == want_events
            assert store.device_count(SPEC.hash, ids, T0, T0 + 80 * W) == devices
            stats = store.privacy_stats(SPEC.hash, ids, T0, T0 + 80 * W)
            assert (stats.devices, stats.reports) == (devices, len(reports))
            for d in range(devices):
                assert store.high_water_mark(f"dev-{d:02d}") == seqs
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == len(reports)
    finally:
        a.close()
        b.close()


# -- migrations -------------------------------------------------------------------------------

def applied(dsn: str) -> list[tuple[int, object]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, applied_at FROM schema_migrations "
                            "ORDER BY version").fetchall()


def test_migrations_on_an_empty_database_then_a_restart_is_a_no_op(pg_dsn: str) -> None:
    s = PostgresStore(pg_dsn)
    assert s.schema_version == pgmod.SCHEMA_VERSION
    first = applied(pg_dsn)
    assert [v for v, _ in first] == [v for v, _, _ in pgmod.MIGRATIONS]
    s.put_spec(SPEC)
    summary, _, _ = make_summary(np.random.default_rng(1), 3)
    assert s.ingest(meta("d1", 1), b"e", summary, RES) is IngestOutcome.ACCEPTED
    s.close()
    again = PostgresStore(pg_dsn)
    try:
        assert applied(pg_dsn) == first      # nothing re-applied, no new row
        assert again.get_spec("m", "1") is not None
        assert again.ingest(meta("d1", 1), b"e", summary, RES) is IngestOutcome.DUPLICATE
    finally:
        again.close()


def test_two_stores_opening_an_empty_database_together_both_work(pg_dsn: str) -> None:
    barrier = threading.Barrier(4)
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            barrier.wait()
            stores.append(PostgresStore(pg_dsn))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors, errors
        assert len(stores) == 4
        assert [v for v, _ in applied(pg_dsn)] == [v for v, _, _ in pgmod.MIGRATIONS]
        summary, _, _ = make_summary(np.random.default_rng(1), 3)
        stores[0].put_spec(SPEC)
        for i, s in enumerate(stores):
            assert s.ingest(meta("d1", i + 1), b"e", summary, RES) is IngestOutcome.ACCEPTED
    finally:
        for s in stores:
            s.close()


def test_a_later_migration_is_applied_in_order_and_a_failing_one_leaves_the_last_good(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    PostgresStore(pg_dsn).close()
    n = pgmod.SCHEMA_VERSION   # the build's own migrations are 1..n
    monkeypatch.setattr(pgmod, "MIGRATIONS", pgmod.MIGRATIONS + (
        (n + 1, "a note per device", "ALTER TABLE devices ADD COLUMN note TEXT"),))
    monkeypatch.setattr(pgmod, "SCHEMA_VERSION", n + 1)
    PostgresStore(pg_dsn).close()
    assert [v for v, _ in applied(pg_dsn)] == list(range(1, n + 2))
    monkeypatch.setattr(pgmod, "MIGRATIONS", pgmod.MIGRATIONS + (
        (n + 2, "broken",
         "ALTER TABLE devices ADD COLUMN other TEXT; ALTER TABLE nope ADD x INT"),))
    monkeypatch.setattr(pgmod, "SCHEMA_VERSION", n + 2)
    with pytest.raises(psycopg.errors.UndefinedTable):
        PostgresStore(pg_dsn)
    assert [v for v, _ in applied(pg_dsn)] == list(range(1, n + 2))
    with psycopg.connect(pg_dsn) as conn:   # the failed migration left nothing behind
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'devices'")}
    assert "note" in cols and "other" not in cols


def test_a_database_from_a_newer_build_is_refused(pg_dsn: str) -> None:
    PostgresStore(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)",
                     (pgmod.SCHEMA_VERSION + 7,))
    with pytest.raises(SchemaTooNew, match=rf"schema version {pgmod.SCHEMA_VERSION + 7} is "
                       rf"newer than this build's {pgmod.SCHEMA_VERSION}"):
        PostgresStore(pg_dsn)
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--db", pg_dsn, "--listen",
         "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "newer than this build" in proc.stderr and "Traceback" not in proc.stderr


# -- errors and lost connections --------------------------------------------------------------

@pytest.mark.parametrize("dsn", [
    "postgresql://fw:s3cret-pw@127.0.0.1:1/fleet",               # nothing listens
    "postgresql://fw:s3cret-pw@127.0.0.1:5432/fleet?bogus=1",    # not a valid DSN
])
def test_an_unusable_database_is_a_clear_error_without_the_password(dsn: str) -> None:
    with pytest.raises(ConfigError) as e:
        PostgresStore(dsn)
    assert redact_dsn(dsn) in str(e.value) and "s3cret-pw" not in str(e.value)
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--db", dsn, "--listen",
         "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fleetwatch serve: error: database postgresql://fw:***@")
    assert "s3cret-pw" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:pw@h:5/db?sslmode=require&password=pw2") == \
        "postgresql://u:***@h:5/db?sslmode=require&password=***"
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_dsn("postgres://h/db") == "postgres://h/db"


def kill_sessions(server: str, dsn: str) -> int:
    """pg_terminate_backend every session of the test database (a server restart, a dropped
    connection: what a replica sees)."""
    dbname = dsn.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(server, autocommit=True) as conn:
        return len(conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND pid <> pg_backend_pid()", (dbname,)).fetchall())


def test_lost_connections_are_reopened_and_a_lost_lease_passes_on(
        pg_server: str, pg_database: Callable[[], str]) -> None:
    dsn = pg_database()
    a, b = PostgresStore(dsn), PostgresStore(dsn)
    try:
        a.put_spec(SPEC)
        summary, _, _ = make_summary(np.random.default_rng(1), 3)
        assert a.ingest(meta("d1", 1), b"e", summary, RES) is IngestOutcome.ACCEPTED
        first = a.try_lead("alerts")
        assert first > 0 and b.try_lead("alerts") == 0
        assert kill_sessions(pg_server, dsn) >= 3   # a's writer, reader and lease, b's ...
        # Ingest and queries reconnect; the report after the loss is merged once.
        assert a.ingest(meta("d1", 2), b"e", summary, RES) is IngestOutcome.ACCEPTED
        assert a.ingest(meta("d1", 2), b"e", summary, RES) is IngestOutcome.DUPLICATE
        assert a.get_spec("m", "1") is not None
        ids = [ls.id for ls in a.label_sets(SPEC.hash)]
        assert sum(s.event_count for s in a.merged_rollups(
            SPEC.hash, ids, [(W, T0, T0 + W)]).values()) == 6
        # The lease died with its session: whoever asks first takes it, and only one does.
        got = [b.try_lead("alerts"), a.try_lead("alerts")]
        assert got[0] > 0 and got[1] == 0
        # b goes away: a takes the lease again, as a new hold (another replica held it in
        # between), which its epoch tells apart from the first one.
        b.close()
        deadline = time.monotonic() + 10
        while not (again := a.try_lead("alerts")):
            assert time.monotonic() < deadline, "the lease of a closed store was never released"
            time.sleep(0.05)
        assert again != first and a.try_lead("alerts") == again
    finally:
        a.close()
        b.close()


def test_readers_all_lost_at_once_are_replaced_on_the_next_query(
        pg_server: str, pg_database: Callable[[], str]) -> None:
    """A server restart ends every pooled reader's session at once: the next query drops the
    dead idle ones with the one it found broken, instead of retrying on another dead one."""
    dsn = pg_database()
    store = PostgresStore(dsn, readers=4)
    try:
        store.put_spec(SPEC)
        together = threading.Barrier(4)

        def hold() -> None:    # four threads at once: four sessions, idle afterwards
            with store._readers.borrow() as db:
                db.execute("SELECT 1")
                together.wait(10)

        threads = [threading.Thread(target=hold) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert store._readers.open_connections == 4
        assert kill_sessions(pg_server, dsn) >= 5   # the writer and the four readers
        assert store.get_spec(SPEC.model, SPEC.model_version) == SPEC
        assert [s.hash for s in store.list_specs()] == [SPEC.hash]
        assert store._readers.open_connections == 1
    finally:
        store.close()
