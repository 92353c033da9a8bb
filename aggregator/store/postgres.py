"""The server store: PostgreSQL, shared by several aggregator processes ("replicas").

Same semantics as `SqliteStore`, for any number of processes ingesting into one database at
once: the same report sent to two replicas is merged once, rollups and high-water marks stay
exact, and at most one replica leads alerting (`try_lead`).

How ingest stays exact and deadlock-free across replicas: every ingest transaction (a group
commit of the reports queued in this process, as in SqliteStore) takes its row locks in one
global order: first its devices' rows (sorted), which serializes all writers of a device, so
the dedup check and the REORDER_WINDOW replay rule read a stable high-water mark; then label
sets, reports (and their forward_pending rows), spec label sets, contributions, device
activity, rollups and sender activity, each sorted by key. Two transactions that lock in the
same total order cannot wait on each other in a cycle; a deadlock or serialization failure
all the same (a concurrent schema change, say) retries the whole transaction. Rollups are
read-modify-write: an upsert locks each row (new or old) and returns what it held, the merge
happens here, and an UPDATE writes it back before the commit. The caller is answered only
after COMMIT (synchronous_commit as the server has it: on by default).

Connections: one writer (the group commit's leader uses it), readers in autocommit borrowed
per query from a bounded pool (`aggregator.store.pool`), and one per held lease (`try_lead`:
a session-level advisory lock lives as long as its connection).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from agent.errors import ConfigError
from agent.spec import Spec
from agent.summary import Summary
from agent.wire import ReportMeta, summary_from_proto, summary_to_proto
from aggregator.store.base import (
    ACTIVITY_RESOLUTIONS,
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
from aggregator.store.rows import (
    alert_from_row,
    alert_history_query,
    alert_insert_sql,
    alert_to_row,
    check_store_args,
    contributions_to_blob,
)
from protos import fleetwatch_pb2 as pb

__all__ = ["MIGRATIONS", "PostgresStore", "SchemaTooNew", "redact_dsn"]

logger = logging.getLogger(__name__)

# Reports per group-commit transaction, at most (as in SqliteStore).
MAX_BATCH = 256
# Whole-transaction retries on a deadlock, a serialization failure or a lost connection.
MAX_RETRIES = 8
# First key of every advisory lock this store takes (the second is the lock's own): keeps
# them apart from other applications' advisory locks in the same database.
LOCK_NAMESPACE = 0x66770001
# The lease whose holder evaluates alerts (aggregator.alerts.evaluator).
ALERTS_LEASE = "alerts"
_MIGRATION_LOCK = 1   # (LOCK_NAMESPACE, 1): held by whoever applies migrations


_V1 = """
CREATE TABLE specs (
    id BIGSERIAL UNIQUE,                -- registration order among equal registered_ms
    hash TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    json TEXT NOT NULL,
    registered_ms BIGINT NOT NULL
);
CREATE INDEX specs_by_model ON specs (model, model_version, registered_ms);
CREATE TABLE label_sets (
    id BIGSERIAL PRIMARY KEY,
    canonical TEXT NOT NULL UNIQUE
);
CREATE TABLE spec_label_sets (
    spec_hash TEXT NOT NULL,
    label_set BIGINT NOT NULL,
    PRIMARY KEY (spec_hash, label_set)
);
CREATE TABLE reports (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    spec_hash TEXT NOT NULL,
    label_set BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    withheld INTEGER NOT NULL DEFAULT 0,
    epsilon DOUBLE PRECISION NOT NULL DEFAULT 0,
    day_epsilon DOUBLE PRECISION NOT NULL DEFAULT 0,
    envelope BYTEA NOT NULL,
    PRIMARY KEY (device_id, seq)        -- the dedup: INSERT ... ON CONFLICT DO NOTHING
);
CREATE INDEX reports_by_window ON reports (spec_hash, window_start, label_set);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    hwm_seq BIGINT,                     -- the highest seq merged (NULL: none yet)
    updated_ms BIGINT NOT NULL
);
-- label_set before window_start: a cohort's rows over a range are one index range.
CREATE TABLE rollups (
    spec_hash TEXT NOT NULL,
    resolution INTEGER NOT NULL,
    label_set BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    summary BYTEA NOT NULL,
    PRIMARY KEY (spec_hash, resolution, label_set, window_start)
);
-- One row per device (by contribution) per label set and window: device counts and privacy
-- stats at the edges of a range; whole hours and days come from device_activity.
CREATE TABLE contributions (
    spec_hash TEXT NOT NULL,
    label_set BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    reports BIGINT NOT NULL,
    withheld BIGINT NOT NULL,
    max_day_epsilon DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (spec_hash, label_set, window_start, device_id)
);
CREATE TABLE device_activity (
    spec_hash TEXT NOT NULL,
    resolution INTEGER NOT NULL,        -- the bucket's length in seconds: HOUR_S or DAY_S
    label_set BIGINT NOT NULL,
    bucket BIGINT NOT NULL,             -- window_start rounded down to the resolution
    device_id TEXT NOT NULL,
    reports BIGINT NOT NULL,
    withheld BIGINT NOT NULL,
    max_day_epsilon DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (spec_hash, resolution, label_set, bucket, device_id)
);
CREATE TABLE sender_activity (
    spec_hash TEXT NOT NULL,
    device_id TEXT NOT NULL,            -- the sender: a device or a regional aggregator
    newest_window BIGINT NOT NULL,
    last_received_ms BIGINT NOT NULL,
    PRIMARY KEY (spec_hash, device_id)
);
CREATE INDEX sender_activity_by_time ON sender_activity (spec_hash, last_received_ms);
CREATE TABLE alert_engines (
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    evaluated_until DOUBLE PRECISION NOT NULL,
    snapshot TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (model, model_version)
);
CREATE TABLE alert_history (
    id BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    rule TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    previous_state TEXT NOT NULL,
    state TEXT NOT NULL,
    cohort TEXT NOT NULL,
    severity TEXT NOT NULL,
    value DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    starts_at DOUBLE PRECISION NOT NULL,
    ends_at DOUBLE PRECISION,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL
);
CREATE INDEX alert_history_by_model ON alert_history (model, state, id);
"""

# Regional forwarding (`aggregator.forward`, `aggregator.forward_pg`): every accepted report's
# validated summary and contributions, written in its ingest transaction when the store is
# opened with ``forwarding=True``, until the forwarding lease holder moves it into an outbox
# row (one transaction again, numbered from the locked `forward_state` row).
_V2 = """
CREATE TABLE forward_pending (
    sender TEXT NOT NULL,
    seq BIGINT NOT NULL,
    spec_hash TEXT NOT NULL,
    label_set BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    summary BYTEA NOT NULL,
    contributions BYTEA NOT NULL,
    PRIMARY KEY (sender, seq)
);
-- For the forwarder's per-tick "which groups are open, since when" scan and its build.
CREATE INDEX forward_pending_by_window
    ON forward_pending (spec_hash, label_set, window_start, received_ms);
CREATE TABLE forward_outbox (
    seq BIGINT PRIMARY KEY,
    spec_hash TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE forward_dead_letters (
    seq BIGINT PRIMARY KEY,
    payload BYTEA NOT NULL,
    reason TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE forward_state (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
-- The region's one upstream identity (its seqs are one sequence): the first forwarder claims
-- it, a replica started with another --upstream-id is refused.
CREATE TABLE forward_upstream (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    upstream_id TEXT NOT NULL
);
-- The seq counter exists from the start: a build locks this row (SELECT ... FOR UPDATE), so
-- two replicas' builds are serialized and never allocate the same seq.
INSERT INTO forward_state (key, value) VALUES ('next_seq', 1);
"""

# (version, description, SQL), in order. Append only: a released migration never changes.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "initial schema", _V1),
    (2, "regional forwarding tables", _V2),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaTooNew(ConfigError):
    """The database was migrated by a newer build than this one."""


_SECRET_KEYS = frozenset({"password", "sslpassword"})
# key=value conninfo: a secret's value is a single-quoted string (backslash escapes) or a word.
_CONNINFO_SECRET = re.compile(r"(?:(?<=\s)|^)((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")


def redact_dsn(dsn: str) -> str:
    """The DSN without its passwords (for messages and logs): a URI's userinfo password and
    its ``password``/``sslpassword`` parameters, or those keys' values in a ``key=value``
    conninfo string. Parsed the way libpq reads a URI, not as urllib does: libpq's userinfo
    runs from ``://`` to the first '@' (a password may hold '#', '?', ':'), and its
    parameters follow the first '?' after the host part. When in doubt it masks more."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return _CONNINFO_SECRET.sub(r"\1***", dsn)
    at = rest.find("@")
    slash = rest.find("/", 0, at)
    if at >= 0 and (slash < 0 or "=" not in rest[slash:at]):
        # libpq stops looking for the '@' at a '/', so for it "u:pa/ss@h" has no userinfo
        # (and cannot connect): masked anyway, to keep such a password out of the logs. An
        # '@' after a '/' and a '=' is in a parameter's value instead. libpq ends the
        # userinfo at the first '@' (a raw '@' in a password is an error): masking through
        # any further '@' before the path hides the rest of such a password too.
        while (nxt := rest.find("@", at + 1)) >= 0 and not any(
                c in rest[at + 1:nxt] for c in "/?"):
            at = nxt
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    host, qmark, query = rest.partition("?")
    if not qmark:
        return f"{scheme}://{host}"
    params = []
    for param in query.split("&"):
        key = urllib.parse.unquote(param.partition("=")[0])
        params.append(f"{param.partition('=')[0]}=***" if key in _SECRET_KEYS else param)
    return f"{scheme}://{host}?{'&'.join(params)}"


def _password(dsn: str) -> str:
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password") or ""
    except psycopg.Error:
        return ""


@dataclass(eq=False)
class _IngestJob:
    """A report waiting in the group-commit queue, and what became of it."""

    meta: ReportMeta
    envelope: bytes
    summary: Summary
    resolutions: tuple[int, ...]
    contributions: tuple[Contribution, ...]
    canonical: str
    done: bool = False
    outcome: IngestOutcome | None = None
    error: BaseException | None = None

    @classmethod
    def of(cls, meta: ReportMeta, envelope: bytes, summary: Summary,
           resolutions: tuple[int, ...],
           contributions: Sequence[Contribution] | None) -> _IngestJob:
        """The job for `ingest`'s arguments (None contributions: the report's own)."""
        return cls(meta, envelope, summary, tuple(resolutions),
                   (Contribution.of(meta),) if contributions is None else tuple(contributions),
                   canonical_labels(dict(meta.labels)))


class _Retry(Exception):
    """The transaction hit a deadlock, a serialization failure or a lost connection."""


class PostgresStore:
    """`Store` on a PostgreSQL database (``dsn``: ``postgresql://user@host:port/dbname``).

    ``reorder_window``: how far below a device's high-water mark a seq not seen before is
    still merged (further below, it is a replay: `IngestOutcome.REPLAYED`). Opening applies
    the pending schema migrations; a database newer than this build raises `SchemaTooNew`,
    an unreachable server or a bad DSN `ConfigError` (naming the DSN without its password).

    ``forwarding``: also record each accepted report in `forward_pending`, in its ingest
    transaction (a regional aggregator, `aggregator.forward`). ``readers``: at most this many
    reader sessions, shared by the query threads (`aggregator.store.pool`)."""

    def __init__(self, dsn: str, reorder_window: int = REORDER_WINDOW, *,
                 forwarding: bool = False, readers: int = READERS) -> None:
        check_store_args(reorder_window, readers)
        self.reorder_window = reorder_window
        self.forwarding = forwarding
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self._write_lock = threading.Lock()
        self._writer = self._connect()
        try:
            self.schema_version = self._migrate()
        except BaseException:
            self._writer.close()
            raise
        # Readers are borrowed per query, not kept per thread: the HTTP server's thread per
        # client connection would otherwise leave a session each (review #8).
        self._readers: ReaderPool[psycopg.Connection[Any]] = ReaderPool(
            self._connect, readers, usable=lambda db: not (db.closed or db.broken),
            close_conn=lambda db: db.close(), name=self.where)
        self._label_cache: dict[str, int] = {}   # canonical -> id, committed ids only
        self._queue_lock = threading.Lock()
        self._queue: list[_IngestJob] = []
        self._lease_lock = threading.Lock()
        self._leases: dict[str, psycopg.Connection[Any]] = {}   # role -> its lock's session
        # role -> epoch of the current hold (`try_lead`); from a counter of acquisitions, so
        # a lease lost and taken again gets a new one
        self._lease_epochs: dict[str, int] = {}
        self._lease_acquired = 0
        self.ingest_commits = 0      # group-commit transactions committed
        self.ingest_retries = 0      # transactions retried (deadlock, serialization, connection)
        self._closed = False

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            params = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error as e:
            raise ConfigError(f"database {self.where}: not a valid PostgreSQL DSN "
                              f"({self._scrub(e)})") from None
        extra: dict[str, Any] = {"application_name": "fleetwatch"}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = 10
        try:
            return psycopg.connect(self.dsn, autocommit=True, **extra)
        except psycopg.Error as e:
            raise ConfigError(f"database {self.where}: cannot connect to PostgreSQL "
                              f"({self._scrub(e)})") from None

    def _scrub(self, e: BaseException) -> str:
        text = re.sub(r"\s*\n\s*", "; ", str(e).strip())
        password = _password(self.dsn)
        return text.replace(password, "***") if password else text

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query on a pooled reader (autocommit: it sees what is committed when it
        starts); once more on a new connection when that one broke (a restarted server, a
        dropped TCP connection): the pool drops a broken one when it is given back, and the
        idle ones now, as they likely broke too."""
        for attempt in (0, 1):
            with self._readers.borrow() as db:
                try:
                    return db.execute(sql, args).fetchall()
                except psycopg.OperationalError:
                    if attempt or not db.broken:
                        raise
                    dropped = self._readers.drop_idle()
                    logger.warning("%s: reader connection lost; reconnecting (%d idle readers "
                                   "closed)", self.where, dropped)
        raise AssertionError("unreachable")

    # -- schema --------------------------------------------------------------------------------

    def _migrate(self) -> int:
        """Apply the migrations this database lacks, each in its own transaction under an
        advisory transaction lock (replicas starting together apply each one once)."""
        db = self._writer
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s::int, %s::int)",
                       (LOCK_NAMESPACE, _MIGRATION_LOCK))
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version INTEGER PRIMARY KEY, "
                       "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            current = self._schema_version(db)
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database {self.where}: schema version {current} is newer than this build's "
                f"{SCHEMA_VERSION}: upgrade fleetwatch (downgrades are not supported)")
        for version, description, sql in MIGRATIONS:
            if version <= current:
                continue
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s::int, %s::int)",
                           (LOCK_NAMESPACE, _MIGRATION_LOCK))
                if self._schema_version(db) >= version:
                    continue   # another replica applied it while we waited for the lock
                t0 = time.monotonic()
                db.execute(sql)   # no parameters: several statements in one go
                db.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            logger.info("%s: schema migration %d (%s) applied in %.2f s", self.where, version,
                        description, time.monotonic() - t0)
        return max(current, SCHEMA_VERSION)

    @staticmethod
    def _schema_version(db: psycopg.Connection[Any]) -> int:
        row = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        return int(row[0]) if row else 0

    # -- specs ---------------------------------------------------------------------------------

    def put_spec(self, spec: Spec) -> bool:
        with self._write_lock:
            for attempt in (0, 1):
                if self._writer.closed or self._writer.broken:
                    self._writer = self._connect()
                try:
                    cur = self._writer.execute(
                        "INSERT INTO specs (hash, model, model_version, json, registered_ms) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (hash) DO NOTHING",
                        (spec.hash, spec.model, spec.model_version, spec.to_json(),
                         int(time.time() * 1000)))
                    return cur.rowcount == 1
                except psycopg.OperationalError:
                    # Idempotent: once more on a fresh connection when this one broke.
                    if attempt or not self._writer.broken:
                        raise
            raise AssertionError("unreachable")

    def get_spec(self, model: str, model_version: str = "", spec_hash: str = "") -> Spec | None:
        if spec_hash:
            rows = self._read("SELECT json FROM specs WHERE hash = %s", (spec_hash,))
        elif model_version:
            rows = self._read("SELECT json FROM specs WHERE model = %s AND model_version = %s "
                              "ORDER BY registered_ms DESC, id DESC LIMIT 1",
                              (model, model_version))
        else:
            rows = self._read("SELECT json FROM specs WHERE model = %s "
                              "ORDER BY registered_ms DESC, id DESC LIMIT 1", (model,))
        return Spec.from_json(rows[0][0]) if rows else None

    def list_specs(self, model: str = "") -> list[Spec]:
        if model:
            rows = self._read("SELECT json FROM specs WHERE model = %s "
                              "ORDER BY registered_ms, id", (model,))
        else:
            rows = self._read("SELECT json FROM specs ORDER BY model, registered_ms, id")
        return [Spec.from_json(r[0]) for r in rows]

    # -- ingest --------------------------------------------------------------------------------

    def ingest(self, meta: ReportMeta, envelope: bytes, summary: Summary,
               resolutions: tuple[int, ...],
               contributions: Sequence[Contribution] | None = None) -> IngestOutcome:
        """Group commit, as in SqliteStore: the report joins a queue; whoever holds the write
        lock writes everything queued in one transaction and hands every caller its outcome
        after the COMMIT. Nobody waits for a batch to fill."""
        job = _IngestJob.of(meta, envelope, summary, resolutions, contributions)
        return commit_in_group(job, self._queue, self._queue_lock, self._write_lock,
                               self._write_batch, MAX_BATCH)

    def ingest_many(self, items: Sequence[IngestItem]) -> list[IngestOutcome | BaseException]:
        """`ingest` for several reports at once: they share the group-commit transactions."""
        jobs = [_IngestJob.of(*item) for item in items]
        return commit_many_in_group(jobs, self._queue, self._queue_lock, self._write_lock,
                                    self._write_batch, MAX_BATCH)

    def _write_batch(self, batch: list[_IngestJob]) -> None:
        """The batch in one transaction, retried whole on a deadlock, a serialization failure
        or a lost connection. When it fails otherwise (a report the database refuses), each
        report is written alone, so that only the bad one's caller gets the error. Called
        with the write lock held."""
        try:
            self._commit_with_retries(batch)
        except Exception as e:
            if len(batch) == 1:
                batch[0].outcome, batch[0].error = None, e
            else:
                logger.warning("%s: a batch of %d reports failed (%s); writing them one by one",
                               self.where, len(batch), e)
                for job in batch:
                    try:
                        self._commit_with_retries([job])
                    except Exception as e1:
                        job.outcome, job.error = None, e1
        except BaseException as e:
            for job in batch:
                job.outcome, job.error, job.done = None, job.error or e, True
            raise  # KeyboardInterrupt and the like stop the leader too
        for job in batch:
            job.done = True

    def _commit_with_retries(self, batch: list[_IngestJob]) -> None:
        for attempt in range(MAX_RETRIES + 1):
            try:
                interned = self._transaction(batch)
            except _Retry as e:
                if attempt == MAX_RETRIES:
                    raise RuntimeError(f"database {self.where}: ingest transaction failed "
                                       f"{MAX_RETRIES + 1} times: {e.__cause__}") from None
                self.ingest_retries += 1
                # Jittered backoff: two replicas that collided do not collide again in step.
                time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))
                continue
            self._label_cache.update(interned)
            self.ingest_commits += 1
            return

    def _transaction(self, batch: list[_IngestJob]) -> dict[str, int]:
        """Write the batch; returns the label sets interned in it (committed)."""
        if self._writer.closed or self._writer.broken:
            self._writer = self._connect()
        interned: dict[str, int] = {}
        try:
            # Pipeline mode: statements whose results are not needed yet go out without
            # waiting for each other, so a batch costs ~4 round trips, not one per statement.
            with self._writer.pipeline(), self._writer.transaction():
                self._write(self._writer, batch, interned)
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as e:
            logger.info("%s: ingest transaction retried: %s", self.where,
                        type(e).__name__)
            raise _Retry() from e
        except psycopg.OperationalError as e:
            if not self._writer.broken:
                raise
            # Not known whether a COMMIT in flight took effect: the retry finds such reports
            # stored and answers DUPLICATE, never merges them twice.
            logger.warning("%s: writer connection lost (%s); reconnecting", self.where, e)
            raise _Retry() from e
        return interned

    def _write(self, conn: psycopg.Connection[Any], batch: list[_IngestJob],
               interned: dict[str, int]) -> None:
        """The batch's statements, in the lock order of the module docstring. A cursor per
        statement whose result is read later (pipeline mode)."""
        now_ms = int(time.time() * 1000)
        for job in batch:
            job.outcome, job.error = None, None
        # 1. Lock the batch's devices (sorted): every other writer of these devices waits for
        #    this commit, so what follows reads a stable high-water mark and set of reports.
        devices = sorted({job.meta.device_id for job in batch})
        locked = conn.execute(
            "INSERT INTO devices (device_id, hwm_seq, updated_ms) "
            "SELECT d, NULL, %s FROM unnest(%s::text[]) AS u(d) ORDER BY d "
            "ON CONFLICT (device_id) DO UPDATE SET updated_ms = excluded.updated_ms "
            "RETURNING device_id, hwm_seq", (now_ms, devices))
        keys = sorted({(job.meta.device_id, job.meta.seq) for job in batch})
        seen = conn.execute(
            "SELECT device_id, seq, envelope FROM reports WHERE (device_id, seq) IN "
            "(SELECT * FROM unnest(%s::text[], %s::bigint[]))",
            ([k[0] for k in keys], [k[1] for k in keys]))
        hwm: dict[str, int | None] = {d: (None if h is None else int(h))
                                      for d, h in locked.fetchall()}
        # A resend is byte-identical (spools keep the payload): other bytes under a stored
        # seq are a new report under a used seq (SEQ_REUSED), never a duplicate.
        stored: dict[tuple[str, int], bytes] = {(d, int(s)): bytes(e)
                                                for d, s, e in seen.fetchall()}
        # 2. Outcomes in the batch's order, as if its reports came one after another.
        accepted: list[_IngestJob] = []
        for job in batch:
            m = job.meta
            mark = hwm.get(m.device_id)
            if (m.device_id, m.seq) in stored:
                # An empty envelope was pruned (retention): its bytes are gone, its seq is not.
                job.outcome = (IngestOutcome.DUPLICATE
                               if stored[(m.device_id, m.seq)] in (job.envelope, b"")
                               else IngestOutcome.SEQ_REUSED)
            elif mark is not None and m.seq < mark - self.reorder_window:
                job.outcome = IngestOutcome.REPLAYED
            else:
                job.outcome = IngestOutcome.ACCEPTED
                stored[(m.device_id, m.seq)] = job.envelope
                hwm[m.device_id] = m.seq if mark is None else max(mark, m.seq)
                accepted.append(job)
        if not accepted:
            return
        # 3. Label sets (sorted: two transactions interning the same new one wait in order).
        lids: dict[str, int] = {}
        for canonical in sorted({job.canonical for job in accepted}):
            lid = self._label_cache.get(canonical)
            if lid is None:
                conn.execute("INSERT INTO label_sets (canonical) VALUES (%s) "
                             "ON CONFLICT (canonical) DO NOTHING", (canonical,))
                row = conn.execute("SELECT id FROM label_sets WHERE canonical = %s",
                                   (canonical,)).fetchone()
                assert row is not None
                lid = interned[canonical] = int(row[0])
            lids[canonical] = lid
        # 4. The raw reports. Their devices are locked by this transaction, so none can be
        #    there already; should one be all the same, the constraint refuses it and the
        #    row count (checked below, before the commit) aborts the batch: never a merge
        #    of a report that is not stored.
        accepted.sort(key=lambda j: (j.meta.device_id, j.meta.seq))
        reports = conn.execute(
            "INSERT INTO reports (device_id, seq, spec_hash, label_set, window_start, "
            "received_ms, withheld, epsilon, day_epsilon, envelope) "
            "SELECT d, s, h, l, w, %s, wh, e, de, env FROM unnest(%s::text[], %s::bigint[], "
            "%s::text[], %s::bigint[], %s::bigint[], %s::int[], %s::float8[], %s::float8[], "
            "%s::bytea[]) AS u(d, s, h, l, w, wh, e, de, env) ORDER BY d, s "
            "ON CONFLICT (device_id, seq) DO NOTHING",
            (now_ms, [j.meta.device_id for j in accepted], [j.meta.seq for j in accepted],
             [j.meta.spec_hash for j in accepted], [lids[j.canonical] for j in accepted],
             [j.meta.window_start_unix_s for j in accepted],
             [int(j.meta.private_withheld) for j in accepted],
             [j.meta.epsilon_spent for j in accepted],
             [j.meta.day_epsilon_spent for j in accepted],
             [j.envelope for j in accepted]))
        # 4b. Forwarding: the report waits in forward_pending, committed with it (its key is
        #     a locked device's, so no other writer touches the row).
        if self.forwarding:
            conn.execute(
                "INSERT INTO forward_pending (sender, seq, spec_hash, label_set, window_start, "
                "received_ms, summary, contributions) SELECT d, s, h, l, w, %s, sm, c FROM "
                "unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[], "
                "%s::bytea[], %s::bytea[]) AS u(d, s, h, l, w, sm, c) ORDER BY d, s",
                (now_ms, [j.meta.device_id for j in accepted], [j.meta.seq for j in accepted],
                 [j.meta.spec_hash for j in accepted], [lids[j.canonical] for j in accepted],
                 [j.meta.window_start_unix_s for j in accepted],
                 [summary_to_proto(j.summary).SerializeToString() for j in accepted],
                 [contributions_to_blob(j.contributions) for j in accepted]))
        # 5. Spec label sets, contributions and device activity: summed here per key, then
        #    one sorted upsert per table.
        pairs = sorted({(j.meta.spec_hash, lids[j.canonical]) for j in accepted})
        conn.execute("INSERT INTO spec_label_sets (spec_hash, label_set) "
                     "SELECT * FROM unnest(%s::text[], %s::bigint[]) AS u(h, l) "
                     "ORDER BY h, l ON CONFLICT DO NOTHING",
                     ([p[0] for p in pairs], [p[1] for p in pairs]))
        contrib: dict[tuple[Any, ...], list[Any]] = {}
        activity: dict[tuple[Any, ...], list[Any]] = {}
        for job in accepted:
            m, lid = job.meta, lids[job.canonical]
            for c in job.contributions:
                keys_of = [(contrib, (m.spec_hash, lid, m.window_start_unix_s, c.device_id))]
                keys_of += [(activity, (m.spec_hash, res, lid,
                                        m.window_start_unix_s // res * res, c.device_id))
                            for res in ACTIVITY_RESOLUTIONS]
                for table, key in keys_of:
                    acc = table.setdefault(key, [0, 0, 0.0])
                    acc[0] += c.reports
                    acc[1] += c.withheld
                    acc[2] = max(acc[2], c.max_day_epsilon)
        self._upsert_sums(conn, "contributions", ("spec_hash", "label_set", "window_start",
                                                  "device_id"),
                          ("text", "bigint", "bigint", "text"), contrib)
        self._upsert_sums(conn, "device_activity", ("spec_hash", "resolution", "label_set",
                                                    "bucket", "device_id"),
                          ("text", "int", "bigint", "bigint", "text"), activity)
        # 6. Rollups: the batch's summaries merged here per row, then each row locked by an
        #    upsert (sorted) that returns what it held, merged and written back.
        merged: dict[tuple[str, int, int, int], Summary] = {}
        for job in accepted:
            m, lid = job.meta, lids[job.canonical]
            for res in job.resolutions:
                key = (m.spec_hash, res, lid, m.window_start_unix_s // res * res)
                if key in merged:
                    merged[key].merge_in(job.summary)
                else:
                    merged[key] = job.summary.copy()
        rkeys = sorted(merged)
        blobs = {k: summary_to_proto(merged[k]).SerializeToString() for k in rkeys}
        rows = conn.execute(
            "INSERT INTO rollups (spec_hash, resolution, label_set, window_start, summary) "
            "SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[], "
            "%s::bytea[]) AS u(h, r, l, w, s) ORDER BY h, r, l, w "
            "ON CONFLICT (spec_hash, resolution, label_set, window_start) "
            "DO UPDATE SET summary = rollups.summary "
            "RETURNING spec_hash, resolution, label_set, window_start, xmax = 0, summary",
            ([k[0] for k in rkeys], [k[1] for k in rkeys], [k[2] for k in rkeys],
             [k[3] for k in rkeys], [blobs[k] for k in rkeys])).fetchall()
        if reports.rowcount != len(accepted):
            raise RuntimeError(f"database {self.where}: {len(accepted) - reports.rowcount} of "
                               f"{len(accepted)} reports were stored meanwhile by another "
                               "writer although their devices were locked; batch not merged")
        updates = []
        for h, r, lid, w, fresh, old in rows:
            if fresh:
                continue   # the row is what this batch brought
            key = (h, int(r), int(lid), int(w))
            total = summary_from_proto(pb.Summary.FromString(bytes(old)))
            total.merge_in(merged[key])
            updates.append((summary_to_proto(total).SerializeToString(), *key))
        if updates:
            conn.cursor().executemany(
                "UPDATE rollups SET summary = %s WHERE spec_hash = %s AND resolution = %s "
                "AND label_set = %s AND window_start = %s", updates)
        # 7. Sender activity (the alert evaluator's watermark) and the high-water marks.
        senders: dict[tuple[str, str], int] = {}
        for job in accepted:
            key2 = (job.meta.spec_hash, job.meta.device_id)
            senders[key2] = max(senders.get(key2, job.meta.window_start_unix_s),
                                job.meta.window_start_unix_s)
        skeys = sorted(senders)
        conn.execute(
            "INSERT INTO sender_activity (spec_hash, device_id, newest_window, "
            "last_received_ms) SELECT h, d, w, %s FROM unnest(%s::text[], %s::text[], "
            "%s::bigint[]) AS u(h, d, w) ORDER BY h, d "
            "ON CONFLICT (spec_hash, device_id) DO UPDATE SET "
            "newest_window = GREATEST(sender_activity.newest_window, excluded.newest_window), "
            "last_received_ms = GREATEST(sender_activity.last_received_ms, "
            "excluded.last_received_ms)",
            (now_ms, [k[0] for k in skeys], [k[1] for k in skeys], [senders[k] for k in skeys]))
        marks = sorted({(j.meta.device_id, hwm[j.meta.device_id]) for j in accepted})
        conn.execute(
            "UPDATE devices SET hwm_seq = GREATEST(devices.hwm_seq, u.s) "
            "FROM unnest(%s::text[], %s::bigint[]) AS u(d, s) WHERE devices.device_id = u.d",
            ([m[0] for m in marks], [m[1] for m in marks]))

    @staticmethod
    def _upsert_sums(conn: psycopg.Connection[Any], table: str, key_cols: tuple[str, ...],
                     key_types: tuple[str, ...], sums: dict[tuple[Any, ...], list[Any]]
                     ) -> None:
        """Add (reports, withheld, max day epsilon) to each key's row, keys in sorted order."""
        if not sums:
            return
        keys = sorted(sums)
        cols = ", ".join(key_cols)
        arrays = ", ".join(f"%s::{t}[]" for t in (*key_types, "bigint", "bigint", "float8"))
        names = ", ".join(f"k{i}" for i in range(len(key_cols)))
        conn.execute(
            f"INSERT INTO {table} ({cols}, reports, withheld, max_day_epsilon) "
            f"SELECT * FROM unnest({arrays}) AS u({names}, n, w, e) ORDER BY {names} "
            f"ON CONFLICT ({cols}) DO UPDATE SET reports = {table}.reports + excluded.reports, "
            f"withheld = {table}.withheld + excluded.withheld, "
            f"max_day_epsilon = GREATEST({table}.max_day_epsilon, excluded.max_day_epsilon)",
            (*([k[i] for k in keys] for i in range(len(key_cols))),
             [sums[k][0] for k in keys], [sums[k][1] for k in keys],
             [sums[k][2] for k in keys]))

    def high_water_mark(self, device_id: str) -> int | None:
        """The highest seq merged for the device, None if none (for tests and operators)."""
        rows = self._read("SELECT hwm_seq FROM devices WHERE device_id = %s", (device_id,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    # -- queries -------------------------------------------------------------------------------

    def label_sets(self, spec_hash: str) -> list[LabelSet]:
        rows = self._read(
            "SELECT l.id, l.canonical FROM spec_label_sets s JOIN label_sets l "
            "ON l.id = s.label_set WHERE s.spec_hash = %s ORDER BY l.canonical", (spec_hash,))
        return [LabelSet(int(lid), parse_labels(canonical)) for lid, canonical in rows]

    def model_label_sets(self, model: str) -> list[LabelSet]:
        rows = self._read(
            "SELECT DISTINCT l.id, l.canonical FROM specs p JOIN spec_label_sets s "
            "ON s.spec_hash = p.hash JOIN label_sets l ON l.id = s.label_set "
            "WHERE p.model = %s ORDER BY l.canonical", (model,))
        return [LabelSet(int(lid), parse_labels(canonical)) for lid, canonical in rows]

    def merged_rollups(self, spec_hash: str, label_set_ids: Iterable[int],
                       cover: list[tuple[int, int, int]]) -> dict[int, Summary]:
        ids = sorted(set(label_set_ids))
        out: dict[int, Summary] = {}
        if not ids:
            return out
        for res, lo, hi in cover:
            rows = self._read(
                "SELECT label_set, summary FROM rollups WHERE spec_hash = %s "
                "AND resolution = %s AND label_set = ANY(%s) AND window_start >= %s "
                "AND window_start < %s ORDER BY label_set, window_start",
                (spec_hash, res, ids, lo, hi))
            for lid, blob in rows:
                s = summary_from_proto(pb.Summary.FromString(bytes(blob)))
                if lid in out:
                    out[int(lid)].merge_in(s)
                else:
                    out[int(lid)] = s
        return out

    def _activity_parts(self, spec_hash: str, ids: list[int], start: int, end: int,
                        columns: str) -> tuple[list[str], list[Any]]:
        """SELECTs of ``columns`` over [start, end): device_activity for the whole hours and
        days inside it, contributions for the (under an hour long) edges."""
        parts: list[str] = []
        args: list[Any] = []
        whole, edges = activity_cover(start, end)
        for res, lo, hi in whole:
            parts.append(f"SELECT {columns} FROM device_activity WHERE spec_hash = %s "
                         f"AND resolution = %s AND label_set = ANY(%s) AND bucket >= %s "
                         f"AND bucket < %s")
            args += [spec_hash, res, ids, lo, hi]
        for lo, hi in edges:
            parts.append(f"SELECT {columns} FROM contributions WHERE spec_hash = %s "
                         f"AND label_set = ANY(%s) AND window_start >= %s "
                         f"AND window_start < %s")
            args += [spec_hash, ids, lo, hi]
        return parts, args

    def device_count(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                     end: int) -> int:
        ids = sorted(set(label_set_ids))
        if not ids or start >= end:
            return 0
        parts, args = self._activity_parts(spec_hash, ids, start, end, "device_id")
        rows = self._read(f"SELECT COUNT(DISTINCT device_id) FROM ({' UNION ALL '.join(parts)}) "
                          f"AS d", args)
        return int(rows[0][0])

    def privacy_stats(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                      end: int) -> PrivacyStats:
        ids = sorted(set(label_set_ids))
        if not ids or start >= end:
            return PrivacyStats(0, 0, 0, 0, 0.0, 0.0)
        parts, args = self._activity_parts(
            spec_hash, ids, start, end,
            "device_id, reports AS n, withheld AS w, max_day_epsilon AS d")
        row = self._read(
            f"SELECT COUNT(*), COUNT(*) FILTER (WHERE w > 0), COALESCE(SUM(n), 0), "
            f"COALESCE(SUM(w), 0), COALESCE(MAX(d), 0), COALESCE(AVG(d), 0) FROM ("
            f"SELECT device_id, SUM(n) AS n, SUM(w) AS w, MAX(d) AS d FROM ("
            f"{' UNION ALL '.join(parts)}) AS p GROUP BY device_id) AS per_device", args)[0]
        return PrivacyStats(int(row[0]), int(row[1]), int(row[2]), int(row[3]),
                            float(row[4]), float(row[5]))

    # -- several replicas on one database ------------------------------------------------------

    def sender_activity(self, spec_hash: str, received_since_ms: int
                        ) -> dict[str, tuple[int, int]]:
        rows = self._read(
            "SELECT device_id, newest_window, last_received_ms FROM sender_activity "
            "WHERE spec_hash = %s AND last_received_ms >= %s", (spec_hash, received_since_ms))
        return {d: (int(w), int(ms)) for d, w, ms in rows}

    def try_lead(self, role: str) -> int:
        """A session-level advisory lock on (LOCK_NAMESPACE, hashtext(role)), held on a
        connection of its own: the server releases it when that session ends (the process
        died, or its connection broke), and then another replica's call takes it. When held,
        a call costs one round trip that proves the session (and so the lock) still alive.
        The epoch is this process's count of acquisitions: each new session's lock, a new
        one."""
        with self._lease_lock:
            if self._closed:
                return 0
            conn = self._leases.get(role)
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    return self._lease_epochs[role]
                except psycopg.Error as e:
                    logger.warning("%s: lost the %r lease with its connection (%s)",
                                   self.where, role, self._scrub(e))
                    del self._leases[role]
                    conn.close()
            try:
                conn = self._connect()
            except ConfigError as e:
                logger.warning("%s: cannot try the %r lease: %s", self.where, role, e)
                return 0
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s::int, hashtext(%s))",
                                   (LOCK_NAMESPACE, role)).fetchone()
            except psycopg.Error as e:
                logger.warning("%s: cannot try the %r lease: %s", self.where, role,
                               self._scrub(e))
                conn.close()
                return 0
            if row is not None and row[0]:
                self._lease_acquired += 1
                self._leases[role] = conn
                self._lease_epochs[role] = self._lease_acquired
                logger.info("%s: this process now leads %r (epoch %d)", self.where, role,
                            self._lease_acquired)
                return self._lease_acquired
            conn.close()
            return 0

    # -- alerting ------------------------------------------------------------------------------

    def prune_raw(self, spec_hash: str, start: int, end: int, limit: int = 5000) -> int:
        with self._write_lock:
            if self._writer.closed or self._writer.broken:
                self._writer = self._connect()
            with self._writer.transaction():
                cur = self._writer.execute(
                    "UPDATE reports SET envelope = ''::bytea WHERE (device_id, seq) IN ("
                    "SELECT device_id, seq FROM reports WHERE spec_hash = %s "
                    "AND window_start >= %s AND window_start < %s AND length(envelope) > 0 "
                    "LIMIT %s)", (spec_hash, start, end, limit))
                return max(0, cur.rowcount)

    def window_range(self, spec_hash: str) -> tuple[int, int] | None:
        row = self._read("SELECT MIN(window_start), MAX(window_start) FROM reports "
                         "WHERE spec_hash = %s", (spec_hash,))[0]
        return None if row[0] is None else (int(row[0]), int(row[1]))

    def label_keys(self) -> set[str]:
        rows = self._read("SELECT canonical FROM label_sets")
        return {k for (canonical,) in rows for k in parse_labels(canonical)}

    def load_alert_state(self, model: str, model_version: str) -> tuple[float, str] | None:
        rows = self._read("SELECT evaluated_until, snapshot FROM alert_engines "
                          "WHERE model = %s AND model_version = %s", (model, model_version))
        return None if not rows else (float(rows[0][0]), rows[0][1])

    def save_alert_window(self, model: str, model_version: str, evaluated_until: float,
                          snapshot_json: str, transitions: Sequence[AlertRecord]) -> None:
        """In the session that holds the "alerts" lease when this process holds it: if that
        session is gone, so is the lease (another replica may be evaluating), and the save
        fails instead of storing a window twice. The lease is released only when its
        session ends, after any commit in it: the next leader reads what was saved."""
        with self._lease_lock:
            lease = self._leases.get(ALERTS_LEASE)
            if lease is not None:
                try:
                    self._save_alert_window(lease, model, model_version, evaluated_until,
                                            snapshot_json, transitions)
                except psycopg.OperationalError:
                    if lease.broken or lease.closed:
                        logger.warning("%s: lost the %r lease while saving an alert window",
                                       self.where, ALERTS_LEASE)
                        del self._leases[ALERTS_LEASE]
                    raise
                return
        with self._write_lock:
            if self._writer.closed or self._writer.broken:
                self._writer = self._connect()
            self._save_alert_window(self._writer, model, model_version, evaluated_until,
                                    snapshot_json, transitions)

    @staticmethod
    def _save_alert_window(conn: psycopg.Connection[Any], model: str, model_version: str,
                           evaluated_until: float, snapshot_json: str,
                           transitions: Sequence[AlertRecord]) -> None:
        with conn.transaction():
            cur = conn.cursor()
            cur.execute(
                "INSERT INTO alert_engines (model, model_version, evaluated_until, "
                "snapshot, updated_ms) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (model, model_version) DO UPDATE SET "
                "evaluated_until = excluded.evaluated_until, snapshot = excluded.snapshot, "
                "updated_ms = excluded.updated_ms",
                (model, model_version, evaluated_until, snapshot_json,
                 int(time.time() * 1000)))
            if transitions:
                cur.executemany(alert_insert_sql("%s"),
                                [alert_to_row(t) for t in transitions])

    def alert_history(self, model: str = "", state: str = "", limit: int = 100
                      ) -> list[AlertRecord]:
        return [alert_from_row(r) for r in self._read(*alert_history_query(model, state,
                                                                            limit, "%s"))]

    def close(self) -> None:
        with self._lease_lock:
            self._closed = True
            for conn in self._leases.values():
                conn.close()   # ends the session: the leases go to another replica
            self._leases.clear()
        with self._write_lock:
            self._readers.close()
            self._writer.close()
