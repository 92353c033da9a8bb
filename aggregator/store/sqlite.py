"""The embedded default store: one SQLite file in WAL mode.

One writer connection behind a lock (SQLite allows one writer at a time anyway) and reader
connections borrowed per query from a bounded pool (`aggregator.store.pool`), so queries never
wait for ingest commits. Ingest commits in groups:
reports that arrive while a commit is in progress share the next transaction (`ingest`), so
one fsync serves many reports.
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.spec import Spec
from agent.sqlite_tx import immediate
from agent.summary import Summary
from agent.wire import ReportMeta, summary_from_proto, summary_to_proto
from aggregator.store.base import (
    ACTIVITY_RESOLUTIONS,
    HOUR_S,
    REORDER_WINDOW,
    AlertRecord,
    Contribution,
    IngestItem,
    IngestOutcome,
    LabelSet,
    PrivacyStats,
    activity_cover,
    canonical_labels,
    parse_labels,
)
from aggregator.store.group_commit import commit_in_group, commit_many_in_group
from aggregator.store.pool import READERS, ReaderPool
from aggregator.store.rollup_cache import BatchRollups, Lru, ReadCache, WriteCache
from aggregator.store.rows import (
    alert_from_row,
    alert_history_query,
    alert_insert_sql,
    alert_to_row,
    check_store_args,
    contributions_to_blob,
)
from protos import fleetwatch_pb2 as pb

__all__ = ["SqliteStore"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS specs (
    hash TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    json TEXT NOT NULL,
    registered_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS specs_by_model ON specs (model, model_version, registered_ms);
CREATE TABLE IF NOT EXISTS label_sets (
    id INTEGER PRIMARY KEY,
    canonical TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS spec_label_sets (
    spec_hash TEXT NOT NULL,
    label_set INTEGER NOT NULL,
    PRIMARY KEY (spec_hash, label_set)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    label_set INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    withheld INTEGER NOT NULL DEFAULT 0,
    epsilon REAL NOT NULL DEFAULT 0,
    day_epsilon REAL NOT NULL DEFAULT 0,
    envelope BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX IF NOT EXISTS reports_by_window ON reports (spec_hash, window_start, label_set);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    hwm_seq INTEGER NOT NULL,       -- the highest seq merged: replay protection
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollups (
    spec_hash TEXT NOT NULL,
    resolution INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    label_set INTEGER NOT NULL,
    summary BLOB NOT NULL,
    PRIMARY KEY (spec_hash, resolution, window_start, label_set)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_engines (
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    evaluated_until REAL NOT NULL,
    snapshot TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (model, model_version)
);
CREATE TABLE IF NOT EXISTS alert_history (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    rule TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    previous_state TEXT NOT NULL,
    state TEXT NOT NULL,
    cohort TEXT NOT NULL,
    severity TEXT NOT NULL,
    value REAL,
    threshold REAL,
    starts_at REAL NOT NULL,
    ends_at REAL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_history_by_model ON alert_history (model, state, id);
"""
# The alert tables and `devices` were added without a schema version bump: CREATE IF NOT
# EXISTS adds them to a database made by an earlier build, and nothing else changed (a device
# with no `devices` row gets its mark from its stored reports, see `_high_water_mark`).


# Which devices reported in a bucket (an hour, a day), and what their reports there add up to
# for the privacy table: device counts and privacy stats over a long range read these rows for
# the whole buckets inside it and the raw reports only at the (under an hour long) edges,
# instead of every report in the range. Written in the ingest transaction, exactly once per
# accepted report (ingest deduplicates first), so the sums stay exact. Added without a version
# bump: a database from an earlier build gets the table filled from its reports once, at open
# (`_add_device_activity`). (A file written by this build, then by an earlier one, then by this
# one again would miss the earlier build's rows: downgrades are not supported.)
_ACTIVITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_activity (
    spec_hash TEXT NOT NULL,
    resolution INTEGER NOT NULL,    -- the bucket's length in seconds: HOUR_S or DAY_S
    label_set INTEGER NOT NULL,
    bucket INTEGER NOT NULL,        -- window_start rounded down to the resolution
    device_id TEXT NOT NULL,
    reports INTEGER NOT NULL,
    withheld INTEGER NOT NULL,
    max_day_epsilon REAL NOT NULL,
    PRIMARY KEY (spec_hash, resolution, label_set, bucket, device_id)
) WITHOUT ROWID;
-- The edges: "did this device report in [a, b)?" is one seek per device.
CREATE INDEX IF NOT EXISTS reports_by_device ON reports (device_id, window_start);
"""
# A cohort's rollups over a range: without it, reading one label set's rows walks the rows of
# every label set in the range (the primary key puts window_start before label_set).
_ROLLUPS_BY_LABEL_SET = ("CREATE INDEX IF NOT EXISTS rollups_by_label_set ON rollups "
                         "(spec_hash, resolution, label_set, window_start)")
# Per device (by contribution: a forwarded report's devices, not its sender) and window: the
# exact edges of `device_count` and `privacy_stats` ("did this device report in [a, b)?" is one
# seek). Written in the ingest transaction like `device_activity`; a database from an earlier
# build gets it filled from its reports once, at open (`_add_window_contributions`).
_CONTRIBUTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS window_contributions (
    device_id TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    label_set INTEGER NOT NULL,
    reports INTEGER NOT NULL,
    withheld INTEGER NOT NULL,
    max_day_epsilon REAL NOT NULL,
    PRIMARY KEY (device_id, window_start, spec_hash, label_set)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS window_contributions_by_window
    ON window_contributions (spec_hash, window_start, label_set);
"""
# Regional forwarding (`aggregator.forward`, `SqliteStore(forwarding=True)`): every accepted
# report's validated summary and contributions, written in its ingest transaction, until the
# forwarder moves it into an outbox entry (one transaction again): so each accepted report is
# forwarded exactly once, whatever crashes.
_FORWARD_PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_pending (
    sender TEXT NOT NULL,
    seq INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    label_set INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    summary BLOB NOT NULL,
    contributions BLOB NOT NULL,
    PRIMARY KEY (sender, seq)
) WITHOUT ROWID;
-- Covering for the forwarder's per-tick "which groups are open, since when" scan.
CREATE INDEX IF NOT EXISTS forward_pending_by_window
    ON forward_pending (spec_hash, label_set, window_start, received_ms);
"""
# Per (spec, sender): its newest window start and when its last report was received, upserted
# in the ingest transaction (`sender_activity`): the alert watermark read from the database,
# as replicas on a shared database need it. Added without a version bump, filled from the
# stored reports once when missing (`_add_sender_activity`).
_SENDER_SCHEMA = """
CREATE TABLE IF NOT EXISTS sender_activity (
    spec_hash TEXT NOT NULL,
    sender TEXT NOT NULL,
    newest_window_start INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (spec_hash, sender)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sender_activity_by_time ON sender_activity (spec_hash, received_ms);
"""


# Device sets kept for device counts (`SqliteStore._bucket_devices`): entries, and the rows
# of one range above which it is counted in SQL instead (~100 bytes a device id in a set).
DEVICE_SET_ENTRIES = 512
DEVICE_SET_MAX_ROWS = 200_000

# Reports per group-commit transaction, at most: bounds how long the write lock is held
# (and so how long a query's `save_alert_window` or a spec push may wait behind a batch).
MAX_BATCH = 256


@dataclass(eq=False)
class _IngestJob:
    """A report waiting in the group-commit queue, and what became of it."""

    meta: ReportMeta
    envelope: bytes
    summary: Summary
    resolutions: tuple[int, ...]
    contributions: Sequence[Contribution] | None = None
    done: bool = False
    outcome: IngestOutcome | None = None
    error: BaseException | None = None


class SqliteStore:
    """`Store` on one SQLite file.

    ``reorder_window``: how far below a device's high-water mark a seq not seen before is
    still merged (further below, it is a replay: `IngestOutcome.REPLAYED`).

    ``forwarding``: also record each accepted report in `forward_pending` (a regional
    aggregator, `aggregator.forward`). ``readers``: at most this many reader connections,
    shared by the query threads (`aggregator.store.pool`)."""

    def __init__(self, path: str | pathlib.Path, reorder_window: int = REORDER_WINDOW, *,
                 forwarding: bool = False, readers: int = READERS) -> None:
        check_store_args(reorder_window, readers)
        self.reorder_window = reorder_window
        self.path = pathlib.Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; FULL also survives power loss.
        self._writer.execute("PRAGMA synchronous=FULL")
        self._writer.executescript(_SCHEMA)
        row = self._writer.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            self._writer.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {row[0]}, this build knows "
                               f"{SCHEMA_VERSION}")
        self._add_device_activity()
        self._add_window_contributions()
        self.forwarding = forwarding
        self._writer.executescript(_FORWARD_PENDING_SCHEMA)
        self._add_sender_activity()
        self._writer.execute(_ROLLUPS_BY_LABEL_SET)
        # Readers are borrowed per query, not kept per thread: the HTTP server's thread per
        # client connection would otherwise leave a file handle each (review #8).
        self._readers: ReaderPool[sqlite3.Connection] = ReaderPool(
            self._connect, readers, usable=_sqlite_usable, close_conn=self._close_reader,
            name=str(self.path))
        # `device_count`'s memo per reader connection: (its data_version, {key: count}).
        self._counts: dict[sqlite3.Connection, tuple[int, dict[tuple[object, ...], int]]] = {}
        self._label_cache: dict[str, int] = {}   # canonical -> id, committed ids only
        self._queue_lock = threading.Lock()
        self._queue: list[_IngestJob] = []        # reports waiting for the next batch
        self.ingest_commits = 0                   # group-commit transactions committed
        self._read_cache = ReadCache()            # decoded rollups for queries
        # (spec, label sets, resolution, lo, hi) -> (rows, frozenset of device ids) of that
        # device_activity range (`_bucket_devices`); bounded in entries and in set size.
        self._device_sets = Lru(DEVICE_SET_ENTRIES)
        # Decoded rollups as this writer committed them: any other write to `rollups` on the
        # writer connection must clear it (another connection's shows in data_version).
        self._write_cache = WriteCache()
        self._write_cache_version: int | None = None  # the writer's data_version it matches

    def _add_device_activity(self) -> None:
        """Create `device_activity` (and the edge index), filled from the stored reports when
        the database was written by a build without it: once, in one transaction, so a crash
        part-way leaves no half-filled table behind (the next open starts over)."""
        with immediate(self._writer) as cur:
            if cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                           "name = 'device_activity'").fetchone() is not None:
                return
            t0 = time.monotonic()
            for statement in filter(str.strip, _ACTIVITY_SCHEMA.split(";")):
                cur.execute(statement)
            for res in ACTIVITY_RESOLUTIONS:
                cur.execute(
                    "INSERT INTO device_activity (spec_hash, resolution, label_set, bucket, "
                    "device_id, reports, withheld, max_day_epsilon) "
                    "SELECT spec_hash, ?, label_set, (window_start / ?) * ?, device_id, "
                    "COUNT(*), SUM(withheld), MAX(day_epsilon) FROM reports "
                    "GROUP BY spec_hash, label_set, window_start / ?, device_id",
                    (res, res, res, res))
            rows = cur.execute("SELECT COUNT(*) FROM device_activity").fetchone()[0]
        if rows:
            logger.info("%s: device_activity filled from the stored reports: %d rows in %.1f s",
                        self.path, rows, time.monotonic() - t0)

    def _add_sender_activity(self) -> None:
        """Create `sender_activity`, filled from the stored reports when missing (one
        transaction, as `_add_device_activity`)."""
        with immediate(self._writer) as cur:
            if cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                           "name = 'sender_activity'").fetchone() is None:
                for statement in filter(str.strip, _SENDER_SCHEMA.split(";")):
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO sender_activity (spec_hash, sender, newest_window_start, "
                    "received_ms) SELECT spec_hash, device_id, MAX(window_start), "
                    "MAX(received_ms) FROM reports GROUP BY spec_hash, device_id")

    def _add_window_contributions(self) -> None:
        """Create `window_contributions`, filled from the stored reports (each its own
        device's contribution: no earlier build stored forwarded reports) when missing; once,
        in one transaction, as `_add_device_activity`."""
        with immediate(self._writer) as cur:
            if cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                           "name = 'window_contributions'").fetchone() is not None:
                return
            t0 = time.monotonic()
            for statement in filter(str.strip, _CONTRIBUTIONS_SCHEMA.split(";")):
                cur.execute(statement)
            cur.execute(
                "INSERT INTO window_contributions (device_id, window_start, spec_hash, "
                "label_set, reports, withheld, max_day_epsilon) "
                "SELECT device_id, window_start, spec_hash, label_set, COUNT(*), "
                "SUM(withheld), MAX(day_epsilon) FROM reports "
                "GROUP BY device_id, window_start, spec_hash, label_set")
            rows = cur.execute("SELECT COUNT(*) FROM window_contributions").fetchone()[0]
        if rows:
            logger.info("%s: window_contributions filled from the stored reports: %d rows in "
                        "%.1f s", self.path, rows, time.monotonic() - t0)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=60)
        db.execute("PRAGMA busy_timeout=60000")
        return db

    def _close_reader(self, db: sqlite3.Connection) -> None:
        self._counts.pop(db, None)
        db.close()

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """One query's rows, on a pooled reader (autocommit: it sees what is committed)."""
        with self._readers.borrow() as db:
            return db.execute(sql, args).fetchall()

    # -- specs -------------------------------------------------------------------------------

    def put_spec(self, spec: Spec) -> bool:
        with self._write_lock:
            cur = self._writer.execute(
                "INSERT OR IGNORE INTO specs (hash, model, model_version, json, registered_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (spec.hash, spec.model, spec.model_version, spec.to_json(),
                 int(time.time() * 1000)))
            return cur.rowcount == 1

    def get_spec(self, model: str, model_version: str = "", spec_hash: str = "") -> Spec | None:
        if spec_hash:
            rows = self._query("SELECT json FROM specs WHERE hash = ?", (spec_hash,))
        elif model_version:
            rows = self._query("SELECT json FROM specs WHERE model = ? AND model_version = ? "
                               "ORDER BY registered_ms DESC, rowid DESC LIMIT 1",
                               (model, model_version))
        else:
            rows = self._query("SELECT json FROM specs WHERE model = ? "
                               "ORDER BY registered_ms DESC, rowid DESC LIMIT 1", (model,))
        return Spec.from_json(rows[0][0]) if rows else None

    def list_specs(self, model: str = "") -> list[Spec]:
        if model:
            rows = self._query("SELECT json FROM specs WHERE model = ? ORDER BY registered_ms",
                               (model,))
        else:
            rows = self._query("SELECT json FROM specs ORDER BY model, registered_ms")
        return [Spec.from_json(r[0]) for r in rows]

    # -- ingest ------------------------------------------------------------------------------

    def _label_set_id(self, cur: sqlite3.Cursor, labels: dict[str, str],
                      interned: dict[str, int]) -> int:
        """The label set's id; one interned in the open transaction goes into `interned`,
        not the cache: the cache only learns ids whose transaction committed."""
        canonical = canonical_labels(labels)
        cached = self._label_cache.get(canonical)
        if cached is None:
            cached = interned.get(canonical)
        if cached is not None:
            return cached
        cur.execute("INSERT OR IGNORE INTO label_sets (canonical) VALUES (?)", (canonical,))
        lid = cur.execute("SELECT id FROM label_sets WHERE canonical = ?",
                          (canonical,)).fetchone()[0]
        interned[canonical] = lid
        return lid

    def ingest(self, meta: ReportMeta, envelope: bytes, summary: Summary,
               resolutions: tuple[int, ...],
               contributions: Sequence[Contribution] | None = None) -> IngestOutcome:
        """Group commit: the report joins a queue; whoever holds the write lock (the leader)
        writes everything queued, each report in its own savepoint, commits once and hands
        every caller its outcome. A caller returns only after the commit that holds its
        report, so the acknowledgement still follows a durable commit, and one fsync serves
        every report that arrived while the previous batch was committing. Nobody waits for
        a batch to fill: a report alone is committed at once."""
        job = _IngestJob(meta, envelope, summary, resolutions, contributions)
        return commit_in_group(job, self._queue, self._queue_lock, self._write_lock,
                               self._write_batch, MAX_BATCH)

    def ingest_many(self, items: Sequence[IngestItem]) -> list[IngestOutcome | BaseException]:
        """`ingest` for several reports at once: they share the group-commit transactions."""
        jobs = [_IngestJob(meta, envelope, summary, resolutions, contributions)
                for meta, envelope, summary, resolutions, contributions in items]
        return commit_many_in_group(jobs, self._queue, self._queue_lock, self._write_lock,
                                    self._write_batch, MAX_BATCH)

    def _write_batch(self, batch: list[_IngestJob], eager: bool = False) -> None:
        """One transaction for the batch; a report that fails rolls back its savepoint alone
        and its caller gets the exception; when the transaction itself fails every caller
        gets it (nothing of the batch is stored). Called with the write lock held.

        Rollups are merged in memory and each touched row is written once, at the end. A
        report that fails may have left a summary that fails only later (when merged into or
        encoded): so when anything fails, the batch is rolled back and done again `eager`ly,
        each report writing its own rollup rows inside its savepoint, as one report at a time
        would (failures are rare: the fast path pays nothing for this)."""
        interned: dict[str, int] = {}
        cur = self._writer.cursor()
        rollups = BatchRollups(self._write_cache, lambda key: self._load_rollup(cur, key),
                               eager=eager)
        try:
            cur.execute("BEGIN IMMEDIATE")
            # The write cache mirrors what this connection committed: another connection's
            # commit (data_version moved) may have changed any rollup row.
            version = cur.execute("PRAGMA data_version").fetchone()[0]
            if version != self._write_cache_version:
                self._write_cache.clear()
                self._write_cache_version = version
            failed = False
            for job in batch:
                job.outcome = job.error = None  # (a batch done again starts afresh)
                before = set(interned)
                cur.execute("SAVEPOINT report")
                try:
                    job.outcome = self._write_one(cur, job.meta, job.envelope, job.summary,
                                                  job.resolutions, interned,
                                                  job.contributions, rollups=rollups)
                    if eager:
                        self._write_rollups(cur, rollups.staged)
                except Exception as e:
                    if not self._writer.in_transaction:
                        raise  # SQLite rolled the whole transaction back: the batch fails
                    cur.execute("ROLLBACK TO report")
                    for canonical in set(interned) - before:
                        del interned[canonical]  # rolled back with the savepoint
                    rollups.drop()
                    job.outcome, job.error = None, e
                    failed = True
                else:
                    try:
                        rollups.keep()
                    except Exception:
                        failed = True  # half merged: the eager redo finds whose it was
                cur.execute("RELEASE report")
            if not eager:
                try:
                    if not failed:
                        self._write_rollups(cur, rollups.pending)
                except Exception:
                    if not self._writer.in_transaction:
                        raise
                    failed = True
                if failed:
                    cur.execute("ROLLBACK")
                    self._write_cache.clear()
                    self._write_batch(batch, eager=True)
                    return
            cur.execute("COMMIT")
        except BaseException as e:
            self._write_cache.clear()  # cheap to refill; never trusted after a failure
            if self._writer.in_transaction:
                cur.execute("ROLLBACK")
            for job in batch:
                job.outcome, job.error = None, job.error or e
                job.done = True
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt and the like stop the leader too
            return
        self._label_cache.update(interned)
        for key, merged in rollups.pending.items():
            self._write_cache.put(key, merged)
        self.ingest_commits += 1
        for job in batch:
            job.done = True

    @staticmethod
    def _write_rollups(cur: sqlite3.Cursor, rows: dict[tuple[str, int, int, int], Summary]
                       ) -> None:
        cur.executemany(
            "INSERT OR REPLACE INTO rollups (spec_hash, resolution, window_start, label_set, "
            "summary) VALUES (?, ?, ?, ?, ?)",
            [(*key, summary_to_proto(merged).SerializeToString())
             for key, merged in rows.items()])

    def _write_one(self, cur: sqlite3.Cursor, meta: ReportMeta, envelope: bytes,
                   summary: Summary, resolutions: tuple[int, ...],
                   interned: dict[str, int],
                   contributions: Sequence[Contribution] | None = None, *,
                   rollups: BatchRollups) -> IngestOutcome:
        # Earlier reports of the batch are visible here (same transaction): a second
        # copy of a report in one batch is a duplicate, and the high-water mark is exact.
        stored = cur.execute("SELECT envelope FROM reports WHERE device_id = ? AND seq = ?",
                             (meta.device_id, meta.seq)).fetchone()
        if stored is not None:
            # An empty envelope was pruned (retention): its bytes are gone, its seq is not.
            return (IngestOutcome.DUPLICATE if bytes(stored[0]) in (envelope, b"")
                    else IngestOutcome.SEQ_REUSED)
        hwm = self._high_water_mark(cur, meta.device_id)
        if hwm is not None and meta.seq < hwm - self.reorder_window:
            return IngestOutcome.REPLAYED
        lid = self._label_set_id(cur, dict(meta.labels), interned)
        cur.execute(
            "INSERT INTO reports (device_id, seq, spec_hash, label_set, "
            "window_start, received_ms, withheld, epsilon, day_epsilon, envelope) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (meta.device_id, meta.seq, meta.spec_hash, lid, meta.window_start_unix_s,
             int(time.time() * 1000), int(meta.private_withheld), meta.epsilon_spent,
             meta.day_epsilon_spent, envelope))
        cur.execute("INSERT OR IGNORE INTO spec_label_sets VALUES (?, ?)",
                    (meta.spec_hash, lid))
        if contributions is None:
            contributions = (Contribution.of(meta),)
        self._write_contributions(cur, meta, lid, contributions)
        if self.forwarding:
            cur.execute(
                "INSERT INTO forward_pending (sender, seq, spec_hash, label_set, window_start, "
                "received_ms, summary, contributions) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (meta.device_id, meta.seq, meta.spec_hash, lid, meta.window_start_unix_s,
                 int(time.time() * 1000), summary_to_proto(summary).SerializeToString(),
                 contributions_to_blob(contributions)))
        # Merged in memory; `_write_batch` writes each touched row once per batch.
        for res in resolutions:
            rollups.stage((meta.spec_hash, res, (meta.window_start_unix_s // res) * res, lid),
                          summary)
        cur.execute(
            "INSERT INTO devices (device_id, hwm_seq, updated_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET "
            "hwm_seq = MAX(hwm_seq, excluded.hwm_seq), updated_ms = excluded.updated_ms",
            (meta.device_id, meta.seq, int(time.time() * 1000)))
        cur.execute(
            "INSERT INTO sender_activity (spec_hash, sender, newest_window_start, received_ms) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (spec_hash, sender) DO UPDATE SET "
            "newest_window_start = MAX(newest_window_start, excluded.newest_window_start), "
            "received_ms = MAX(received_ms, excluded.received_ms)",
            (meta.spec_hash, meta.device_id, meta.window_start_unix_s, int(time.time() * 1000)))
        return IngestOutcome.ACCEPTED

    @staticmethod
    def _write_contributions(cur: sqlite3.Cursor, meta: ReportMeta, lid: int,
                             contributions: Sequence[Contribution]) -> None:
        """Device counts and privacy sums by contribution (the devices, not the sender)."""
        ws = meta.window_start_unix_s
        rows = [(c.device_id, c.reports, c.withheld, c.max_day_epsilon) for c in contributions]
        for res in ACTIVITY_RESOLUTIONS:
            cur.executemany(
                "INSERT INTO device_activity (spec_hash, resolution, label_set, bucket, "
                "device_id, reports, withheld, max_day_epsilon) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (spec_hash, resolution, label_set, bucket, device_id) "
                "DO UPDATE SET reports = reports + excluded.reports, "
                "withheld = withheld + excluded.withheld, "
                "max_day_epsilon = MAX(max_day_epsilon, excluded.max_day_epsilon)",
                [(meta.spec_hash, res, lid, (ws // res) * res, d, n, w, e)
                 for d, n, w, e in rows])
        cur.executemany(
            "INSERT INTO window_contributions (device_id, window_start, spec_hash, label_set, "
            "reports, withheld, max_day_epsilon) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id, window_start, spec_hash, label_set) "
            "DO UPDATE SET reports = reports + excluded.reports, "
            "withheld = withheld + excluded.withheld, "
            "max_day_epsilon = MAX(max_day_epsilon, excluded.max_day_epsilon)",
            [(d, ws, meta.spec_hash, lid, n, w, e) for d, n, w, e in rows])

    @staticmethod
    def _load_rollup(cur: sqlite3.Cursor, key: tuple[str, int, int, int]) -> Summary | None:
        row = cur.execute(
            "SELECT summary FROM rollups WHERE spec_hash = ? AND resolution = ? "
            "AND window_start = ? AND label_set = ?", key).fetchone()
        return None if row is None else _decode_rollup(row[0])

    @staticmethod
    def _high_water_mark(cur: sqlite3.Cursor, device_id: str) -> int | None:
        """The highest seq merged for the device (in the open transaction), None if none."""
        row = cur.execute("SELECT hwm_seq FROM devices WHERE device_id = ?",
                          (device_id,)).fetchone()
        if row is not None:
            return int(row[0])
        # No row: a new device, or a database from before the devices table.
        row = cur.execute("SELECT MAX(seq) FROM reports WHERE device_id = ?",
                          (device_id,)).fetchone()
        return None if row[0] is None else int(row[0])

    def high_water_mark(self, device_id: str) -> int | None:
        """The highest seq merged for the device, None if none (for tests and operators)."""
        with self._readers.borrow() as db:
            return self._high_water_mark(db.cursor(), device_id)

    # -- queries -----------------------------------------------------------------------------

    def label_sets(self, spec_hash: str) -> list[LabelSet]:
        rows = self._query(
            "SELECT l.id, l.canonical FROM spec_label_sets s JOIN label_sets l "
            "ON l.id = s.label_set WHERE s.spec_hash = ? ORDER BY l.canonical", (spec_hash,))
        return [LabelSet(lid, parse_labels(canonical)) for lid, canonical in rows]

    def model_label_sets(self, model: str) -> list[LabelSet]:
        rows = self._query(
            "SELECT DISTINCT l.id, l.canonical FROM specs p JOIN spec_label_sets s "
            "ON s.spec_hash = p.hash JOIN label_sets l ON l.id = s.label_set "
            "WHERE p.model = ? ORDER BY l.canonical", (model,))
        return [LabelSet(lid, parse_labels(canonical)) for lid, canonical in rows]

    def merged_rollups(self, spec_hash: str, label_set_ids: Iterable[int],
                       cover: list[tuple[int, int, int]]) -> dict[int, Summary]:
        """Per label set, the merge of its rollups over the cover (new summaries, the
        caller's). Each (resolution, range, label set) run of rows is merged once and kept
        while its stored bytes stay the same (`rollup_cache.ReadCache`): closed buckets never
        change, so a repeated query decodes and merges only the rows that did."""
        ids = sorted(set(label_set_ids))
        out: dict[int, Summary] = {}
        if not ids:
            return out
        marks = ",".join("?" * len(ids))
        cache = self._read_cache
        for res, lo, hi in cover:
            runs: dict[int, list[tuple[int, bytes]]] = {}
            for lid, ws, blob in self._query(
                    f"SELECT label_set, window_start, summary FROM rollups WHERE spec_hash = ? "
                    f"AND resolution = ? AND window_start >= ? AND window_start < ? "
                    f"AND label_set IN ({marks}) ORDER BY label_set, window_start",
                    (spec_hash, res, lo, hi, *ids)):
                runs.setdefault(lid, []).append((ws, blob))
            for lid, run in runs.items():
                merged = cache.run((spec_hash, res, lo, hi, lid), run,
                                   lambda r=res, i=lid, rows=run: self._merge_run(
                                       spec_hash, r, i, rows))
                if lid in out:
                    out[lid].merge_in(merged)
                else:
                    out[lid] = merged.copy()
        return out

    def _merge_run(self, spec_hash: str, res: int, lid: int,
                   rows: Sequence[tuple[int, bytes]]) -> Summary:
        acc: Summary | None = None
        for ws, blob in rows:
            s = self._read_cache.row((spec_hash, res, ws, lid), blob, _decode_rollup)
            if acc is None:
                acc = s.copy()
            else:
                acc.merge_in(s)
        assert acc is not None  # a run has at least one row
        return acc

    def device_count(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                     end: int) -> int:
        """Devices with a contribution to a report whose window starts in [start, end),
        exactly (a forwarded report counts each of its devices, never its sender).

        The whole hours and days inside the range come from `device_activity` (a row per
        device per bucket, not per report). A partial hour at an edge only adds the devices of
        that hour's rows that are not counted already and that have a report inside the edge
        (one seek each in `window_contributions`): for a fleet that reports steadily there are
        none to check."""
        ids = sorted(set(label_set_ids))
        if not ids or start >= end:
            return 0
        with self._readers.borrow() as db:
            return self._device_count(db, spec_hash, ids, start, end)

    def _device_count(self, db: sqlite3.Connection, spec_hash: str, ids: list[int],
                      start: int, end: int) -> int:
        # The health query asks for the same count twice per cohort (the range, and the last
        # day, often the same): remembered per reader connection until anything commits
        # (data_version changes with every commit by another connection or process, and is
        # per connection: so is the memo; only the borrower of `db` touches its entry).
        version = db.execute("PRAGMA data_version").fetchone()[0]
        memo = self._counts.get(db)
        if memo is None or memo[0] != version or len(memo[1]) > 4096:
            memo = self._counts[db] = (version, {})
        key = (spec_hash, tuple(ids), start, end)
        if key in memo[1]:
            return memo[1][key]
        count = self._count_from_sets(db, spec_hash, ids, start, end)
        if count is None:
            count = self._count_in_sql(db, spec_hash, ids, start, end)
        memo[1][key] = count
        return count

    def _count_from_sets(self, db: sqlite3.Connection, spec_hash: str, ids: list[int],
                         start: int, end: int) -> int | None:
        """The count from the device sets of the range's buckets (`_bucket_devices`: each
        kept across commits while its rows stay the same); None when a set is too large to
        keep (then `_count_in_sql` counts in the database)."""
        whole, edges = activity_cover(start, end)
        covered: set[str] = set()
        for res, lo, hi in whole:
            devices = self._bucket_devices(db, spec_hash, ids, res, lo, hi)
            if devices is None:
                return None
            covered.update(devices)
        added: set[str] = set()
        for lo, hi in edges:
            # A partial hour: its hour's devices not counted yet, if they have a report with
            # a window inside the edge (for a fleet reporting steadily there are none).
            devices = self._bucket_devices(db, spec_hash, ids, HOUR_S, lo // HOUR_S * HOUR_S,
                                           -(-hi // HOUR_S) * HOUR_S)
            if devices is None:
                return None
            candidates = sorted(devices - covered - added)
            for i in range(0, len(candidates), 500):
                chunk = candidates[i:i + 500]
                added.update(row[0] for row in db.execute(
                    f"SELECT DISTINCT device_id FROM window_contributions "
                    f"WHERE device_id IN ({','.join('?' * len(chunk))}) AND window_start >= ? "
                    f"AND window_start < ? AND spec_hash = ? "
                    f"AND label_set IN ({','.join('?' * len(ids))})",
                    (*chunk, lo, hi, spec_hash, *ids)))
        return len(covered) + len(added)

    def _bucket_devices(self, db: sqlite3.Connection, spec_hash: str, ids: list[int], res: int,
                        lo: int, hi: int) -> frozenset[str] | None:
        """The devices with a `device_activity` row of resolution ``res`` for these label sets
        in buckets [lo, hi); None when there are more than DEVICE_SET_MAX_ROWS rows.

        Kept across commits, and checked on every use by counting the range's rows (an index
        range count, ~7x cheaper here than the DISTINCT): `device_activity` rows are only ever
        inserted (ingest's upserts add rows or update counters in place; nothing deletes
        them), so the same number of rows in a range means the same rows, whoever wrote the
        file. Counted before the set is read: a row inserted in between makes the kept count
        low, so the next use reads the set again."""
        marks = ",".join("?" * len(ids))
        where = (f"FROM device_activity WHERE spec_hash = ? AND resolution = ? "
                 f"AND label_set IN ({marks}) AND bucket >= ? AND bucket < ?")
        args = (spec_hash, res, *ids, lo, hi)
        rows = int(db.execute(f"SELECT COUNT(*) {where}", args).fetchone()[0])
        if rows > DEVICE_SET_MAX_ROWS:
            return None
        key = (spec_hash, tuple(ids), res, lo, hi)
        kept = self._device_sets.get(key)
        if kept is not None and kept[0] == rows:  # type: ignore[index]
            return kept[1]  # type: ignore[index,no-any-return]
        devices = frozenset(row[0] for row in db.execute(f"SELECT DISTINCT device_id {where}",
                                                         args))
        self._device_sets.put(key, (rows, devices))
        return devices

    @staticmethod
    def _count_in_sql(db: sqlite3.Connection, spec_hash: str, ids: list[int], start: int,
                      end: int) -> int:
        """`_count_from_sets` in one statement, for ranges too large to keep in memory."""
        marks = ",".join("?" * len(ids))
        whole, edges = activity_cover(start, end)
        covered_sql, covered_args = [], []
        for res, lo, hi in whole:
            covered_sql.append(
                f"SELECT DISTINCT device_id FROM device_activity WHERE spec_hash = ? "
                f"AND resolution = ? "
                f"AND label_set IN ({marks}) AND bucket >= ? AND bucket < ?")
            covered_args += [spec_hash, res, *ids, lo, hi]
        edge_sql, edge_args = [], []
        for lo, hi in edges:
            edge_sql.append(
                f"SELECT DISTINCT e.device_id FROM device_activity e WHERE e.spec_hash = ? "
                f"AND e.resolution = {HOUR_S} AND e.label_set IN ({marks}) "
                f"AND e.bucket >= ? AND e.bucket < ? "
                + ("AND e.device_id NOT IN (SELECT device_id FROM covered) "
                   if covered_sql else "")
                + "AND EXISTS (SELECT 1 FROM window_contributions r "
                  "WHERE r.device_id = e.device_id AND r.window_start >= ? "
                  "AND r.window_start < ? AND r.spec_hash = e.spec_hash "
                  "AND r.label_set = e.label_set)")
            edge_args += [spec_hash, *ids, lo // HOUR_S * HOUR_S, -(-hi // HOUR_S) * HOUR_S,
                          lo, hi]
        parts = []
        if covered_sql:
            parts.append("(SELECT COUNT(*) FROM covered)")
        if edge_sql:
            parts.append(f"(SELECT COUNT(*) FROM ({' UNION '.join(edge_sql)}))")
        sql = "SELECT " + " + ".join(parts)
        if covered_sql:
            sql = f"WITH covered(device_id) AS MATERIALIZED ({' UNION '.join(covered_sql)}) " + sql
        return int(db.execute(sql, (*covered_args, *edge_args)).fetchone()[0])

    def privacy_stats(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                      end: int) -> PrivacyStats:
        """Per-device sums over the range: from `device_activity` for the whole hours and days
        inside it, from `window_contributions` for the (under an hour long) edges; so a month
        costs about what a day does."""
        ids = sorted(set(label_set_ids))
        if not ids or start >= end:
            return PrivacyStats(0, 0, 0, 0, 0.0, 0.0)
        marks = ",".join("?" * len(ids))
        whole, edges = activity_cover(start, end)
        parts, args = [], []
        for res, lo, hi in whole:
            parts.append(
                f"SELECT device_id, reports AS n, withheld AS w, max_day_epsilon AS d "
                f"FROM device_activity WHERE spec_hash = ? AND resolution = ? "
                f"AND label_set IN ({marks}) AND bucket >= ? AND bucket < ?")
            args += [spec_hash, res, *ids, lo, hi]
        for lo, hi in edges:
            parts.append(
                f"SELECT device_id, reports AS n, withheld AS w, max_day_epsilon AS d "
                f"FROM window_contributions INDEXED BY window_contributions_by_window "
                f"WHERE spec_hash = ? AND window_start >= ? AND window_start < ? "
                f"AND label_set IN ({marks})")
            args += [spec_hash, lo, hi, *ids]
        row = self._query(
            f"SELECT COUNT(*), COUNT(CASE WHEN w > 0 THEN 1 END), COALESCE(SUM(n), 0), "
            f"COALESCE(SUM(w), 0), COALESCE(MAX(d), 0), COALESCE(AVG(d), 0) FROM ("
            f"SELECT device_id, SUM(n) AS n, SUM(w) AS w, MAX(d) AS d FROM ("
            f"{' UNION ALL '.join(parts)}) GROUP BY device_id)", args)[0]
        return PrivacyStats(int(row[0]), int(row[1]), int(row[2]), int(row[3]),
                            float(row[4]), float(row[5]))

    # -- alerting ----------------------------------------------------------------------------

    def prune_raw(self, spec_hash: str, start: int, end: int, limit: int = 5000) -> int:
        with self._write_lock, immediate(self._writer) as cur:
            cur.execute("UPDATE reports SET envelope = x'' WHERE rowid IN (SELECT rowid FROM "
                        "reports WHERE spec_hash = ? AND window_start >= ? AND window_start < ? "
                        "AND length(envelope) > 0 LIMIT ?)", (spec_hash, start, end, limit))
            n = cur.rowcount
        return max(0, n)

    def window_range(self, spec_hash: str) -> tuple[int, int] | None:
        # Two single-aggregate queries: each is one seek in reports_by_window.
        lo = self._query("SELECT MIN(window_start) FROM reports WHERE spec_hash = ?",
                         (spec_hash,))[0][0]
        if lo is None:
            return None
        hi = self._query("SELECT MAX(window_start) FROM reports WHERE spec_hash = ?",
                         (spec_hash,))[0][0]
        return int(lo), int(hi)

    def label_keys(self) -> set[str]:
        rows = self._query("SELECT canonical FROM label_sets")
        return {k for (canonical,) in rows for k in parse_labels(canonical)}

    def load_alert_state(self, model: str, model_version: str) -> tuple[float, str] | None:
        rows = self._query(
            "SELECT evaluated_until, snapshot FROM alert_engines WHERE model = ? "
            "AND model_version = ?", (model, model_version))
        return None if not rows else (float(rows[0][0]), rows[0][1])

    def save_alert_window(self, model: str, model_version: str, evaluated_until: float,
                          snapshot_json: str, transitions: Sequence[AlertRecord]) -> None:
        with self._write_lock, immediate(self._writer) as cur:
            cur.execute(
                "INSERT OR REPLACE INTO alert_engines (model, model_version, "
                "evaluated_until, snapshot, updated_ms) VALUES (?, ?, ?, ?, ?)",
                (model, model_version, evaluated_until, snapshot_json,
                 int(time.time() * 1000)))
            cur.executemany(alert_insert_sql("?"), [alert_to_row(t) for t in transitions])

    def alert_history(self, model: str = "", state: str = "", limit: int = 100
                      ) -> list[AlertRecord]:
        return [alert_from_row(r) for r in self._query(*alert_history_query(model, state,
                                                                             limit, "?"))]

    def sender_activity(self, spec_hash: str, received_since_ms: int
                        ) -> dict[str, tuple[int, int]]:
        rows = self._query(
            "SELECT sender, newest_window_start, received_ms FROM sender_activity "
            "WHERE spec_hash = ? AND received_ms >= ?", (spec_hash, int(received_since_ms)))
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def try_lead(self, role: str) -> int:
        """One process owns a SQLite file: it always leads, in one unbroken epoch."""
        return 1

    def close(self) -> None:
        with self._write_lock:
            self._readers.close()
            self._counts.clear()
            self._writer.close()


def _sqlite_usable(db: sqlite3.Connection) -> bool:
    """Not closed (a closed connection raises on any use)."""
    try:
        db.total_changes  # noqa: B018 -- read only to probe the connection
    except sqlite3.ProgrammingError:
        return False
    return True


def _decode_rollup(blob: bytes) -> Summary:
    return summary_from_proto(pb.Summary.FromString(blob))
