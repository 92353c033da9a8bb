"""The embedded default store: one SQLite file in WAL mode.

One writer connection behind a lock (SQLite allows one writer at a time anyway) and one reader
connection per thread, so queries never wait for ingest commits.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence

from agent.spec import Spec
from agent.summary import Summary
from agent.wire import ReportMeta, summary_from_proto, summary_to_proto
from aggregator.store.base import (
    REORDER_WINDOW,
    AlertRecord,
    IngestOutcome,
    LabelSet,
    PrivacyStats,
    canonical_labels,
    parse_labels,
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


class SqliteStore:
    """`Store` on one SQLite file.

    ``reorder_window``: how far below a device's high-water mark a seq not seen before is
    still merged (further below, it is a replay: `IngestOutcome.REPLAYED`)."""

    def __init__(self, path: str | pathlib.Path, reorder_window: int = REORDER_WINDOW) -> None:
        if not isinstance(reorder_window, int) or reorder_window < 0:
            raise ValueError(f"reorder_window: must be a non-negative integer, got "
                             f"{reorder_window!r}")
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
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._label_cache: dict[str, int] = {}

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=60)
        db.execute("PRAGMA busy_timeout=60000")
        return db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            self._local.db = db
            with self._write_lock:
                self._readers.append(db)
        return db

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
        db = self._reader()
        if spec_hash:
            row = db.execute("SELECT json FROM specs WHERE hash = ?", (spec_hash,)).fetchone()
        elif model_version:
            row = db.execute("SELECT json FROM specs WHERE model = ? AND model_version = ? "
                             "ORDER BY registered_ms DESC, rowid DESC LIMIT 1",
                             (model, model_version)).fetchone()
        else:
            row = db.execute("SELECT json FROM specs WHERE model = ? "
                             "ORDER BY registered_ms DESC, rowid DESC LIMIT 1",
                             (model,)).fetchone()
        return Spec.from_json(row[0]) if row else None

    def list_specs(self, model: str = "") -> list[Spec]:
        db = self._reader()
        if model:
            rows = db.execute("SELECT json FROM specs WHERE model = ? ORDER BY registered_ms",
                              (model,)).fetchall()
        else:
            rows = db.execute("SELECT json FROM specs ORDER BY model, registered_ms").fetchall()
        return [Spec.from_json(r[0]) for r in rows]

    # -- ingest ------------------------------------------------------------------------------

    def _label_set_id(self, cur: sqlite3.Cursor, labels: dict[str, str]) -> int:
        canonical = canonical_labels(labels)
        cached = self._label_cache.get(canonical)
        if cached is not None:
            return cached
        cur.execute("INSERT OR IGNORE INTO label_sets (canonical) VALUES (?)", (canonical,))
        lid = cur.execute("SELECT id FROM label_sets WHERE canonical = ?",
                          (canonical,)).fetchone()[0]
        self._label_cache[canonical] = lid
        return lid

    def ingest(self, meta: ReportMeta, envelope: bytes, summary: Summary,
               resolutions: tuple[int, ...]) -> IngestOutcome:
        with self._write_lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                # Deduplicate before interning the label set: a label set interned (and
                # cached) in a transaction that is then rolled back would leave a dangling id.
                if cur.execute("SELECT 1 FROM reports WHERE device_id = ? AND seq = ?",
                               (meta.device_id, meta.seq)).fetchone() is not None:
                    cur.execute("ROLLBACK")
                    return IngestOutcome.DUPLICATE
                hwm = self._high_water_mark(cur, meta.device_id)
                if hwm is not None and meta.seq < hwm - self.reorder_window:
                    cur.execute("ROLLBACK")
                    return IngestOutcome.REPLAYED
                lid = self._label_set_id(cur, dict(meta.labels))
                cur.execute(
                    "INSERT INTO reports (device_id, seq, spec_hash, label_set, "
                    "window_start, received_ms, withheld, epsilon, day_epsilon, envelope) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (meta.device_id, meta.seq, meta.spec_hash, lid, meta.window_start_unix_s,
                     int(time.time() * 1000), int(meta.private_withheld), meta.epsilon_spent,
                     meta.day_epsilon_spent, envelope))
                cur.execute("INSERT OR IGNORE INTO spec_label_sets VALUES (?, ?)",
                            (meta.spec_hash, lid))
                for res in resolutions:
                    bucket = (meta.window_start_unix_s // res) * res
                    row = cur.execute(
                        "SELECT summary FROM rollups WHERE spec_hash = ? AND resolution = ? "
                        "AND window_start = ? AND label_set = ?",
                        (meta.spec_hash, res, bucket, lid)).fetchone()
                    if row is None:
                        merged = summary
                    else:
                        merged = summary_from_proto(pb.Summary.FromString(row[0]))
                        merged.merge_in(summary)
                    cur.execute(
                        "INSERT OR REPLACE INTO rollups (spec_hash, resolution, window_start, "
                        "label_set, summary) VALUES (?, ?, ?, ?, ?)",
                        (meta.spec_hash, res, bucket, lid,
                         summary_to_proto(merged).SerializeToString()))
                cur.execute(
                    "INSERT INTO devices (device_id, hwm_seq, updated_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET "
                    "hwm_seq = MAX(hwm_seq, excluded.hwm_seq), updated_ms = excluded.updated_ms",
                    (meta.device_id, meta.seq, int(time.time() * 1000)))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                self._label_cache.clear()  # an interned id may have been rolled back
                raise
        return IngestOutcome.ACCEPTED

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
        return self._high_water_mark(self._reader().cursor(), device_id)

    # -- queries -----------------------------------------------------------------------------

    def label_sets(self, spec_hash: str) -> list[LabelSet]:
        rows = self._reader().execute(
            "SELECT l.id, l.canonical FROM spec_label_sets s JOIN label_sets l "
            "ON l.id = s.label_set WHERE s.spec_hash = ? ORDER BY l.canonical",
            (spec_hash,)).fetchall()
        return [LabelSet(lid, parse_labels(canonical)) for lid, canonical in rows]

    def model_label_sets(self, model: str) -> list[LabelSet]:
        rows = self._reader().execute(
            "SELECT DISTINCT l.id, l.canonical FROM specs p JOIN spec_label_sets s "
            "ON s.spec_hash = p.hash JOIN label_sets l ON l.id = s.label_set "
            "WHERE p.model = ? ORDER BY l.canonical", (model,)).fetchall()
        return [LabelSet(lid, parse_labels(canonical)) for lid, canonical in rows]

    def merged_rollups(self, spec_hash: str, label_set_ids: Iterable[int],
                       cover: list[tuple[int, int, int]]) -> dict[int, Summary]:
        ids = sorted(set(label_set_ids))
        out: dict[int, Summary] = {}
        if not ids:
            return out
        db = self._reader()
        marks = ",".join("?" * len(ids))
        for res, lo, hi in cover:
            rows = db.execute(
                f"SELECT label_set, summary FROM rollups WHERE spec_hash = ? AND resolution = ? "
                f"AND window_start >= ? AND window_start < ? AND label_set IN ({marks})",
                (spec_hash, res, lo, hi, *ids))
            for lid, blob in rows:
                s = summary_from_proto(pb.Summary.FromString(blob))
                if lid in out:
                    out[lid].merge_in(s)
                else:
                    out[lid] = s
        return out

    def device_count(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                     end: int) -> int:
        ids = sorted(set(label_set_ids))
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        row = self._reader().execute(
            f"SELECT COUNT(DISTINCT device_id) FROM reports WHERE spec_hash = ? "
            f"AND window_start >= ? AND window_start < ? AND label_set IN ({marks})",
            (spec_hash, start, end, *ids)).fetchone()
        return int(row[0])

    def privacy_stats(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                      end: int) -> PrivacyStats:
        ids = sorted(set(label_set_ids))
        if not ids:
            return PrivacyStats(0, 0, 0, 0, 0.0, 0.0)
        marks = ",".join("?" * len(ids))
        row = self._reader().execute(
            f"SELECT COUNT(*), COUNT(CASE WHEN w > 0 THEN 1 END), COALESCE(SUM(n), 0), "
            f"COALESCE(SUM(w), 0), COALESCE(MAX(d), 0), COALESCE(AVG(d), 0) FROM ("
            f"SELECT device_id, COUNT(*) AS n, SUM(withheld) AS w, MAX(day_epsilon) AS d "
            f"FROM reports WHERE spec_hash = ? AND window_start >= ? AND window_start < ? "
            f"AND label_set IN ({marks}) GROUP BY device_id)",
            (spec_hash, start, end, *ids)).fetchone()
        return PrivacyStats(int(row[0]), int(row[1]), int(row[2]), int(row[3]),
                            float(row[4]), float(row[5]))

    # -- alerting ----------------------------------------------------------------------------

    def window_range(self, spec_hash: str) -> tuple[int, int] | None:
        db = self._reader()
        # Two single-aggregate queries: each is one seek in reports_by_window.
        lo = db.execute("SELECT MIN(window_start) FROM reports WHERE spec_hash = ?",
                        (spec_hash,)).fetchone()[0]
        if lo is None:
            return None
        hi = db.execute("SELECT MAX(window_start) FROM reports WHERE spec_hash = ?",
                        (spec_hash,)).fetchone()[0]
        return int(lo), int(hi)

    def label_keys(self) -> set[str]:
        rows = self._reader().execute("SELECT canonical FROM label_sets").fetchall()
        return {k for (canonical,) in rows for k in parse_labels(canonical)}

    def load_alert_state(self, model: str, model_version: str) -> tuple[float, str] | None:
        row = self._reader().execute(
            "SELECT evaluated_until, snapshot FROM alert_engines WHERE model = ? "
            "AND model_version = ?", (model, model_version)).fetchone()
        return None if row is None else (float(row[0]), row[1])

    def save_alert_window(self, model: str, model_version: str, evaluated_until: float,
                          snapshot_json: str, transitions: Sequence[AlertRecord]) -> None:
        with self._write_lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(
                    "INSERT OR REPLACE INTO alert_engines (model, model_version, "
                    "evaluated_until, snapshot, updated_ms) VALUES (?, ?, ?, ?, ?)",
                    (model, model_version, evaluated_until, snapshot_json,
                     int(time.time() * 1000)))
                cur.executemany(
                    "INSERT INTO alert_history (at, rule, kind, model, model_version, "
                    "fingerprint, previous_state, state, cohort, severity, value, threshold, "
                    "starts_at, ends_at, labels, annotations) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(t.at_s, t.rule, t.kind, t.model, t.model_version, t.fingerprint,
                      t.previous_state, t.state, json.dumps([list(p) for p in t.cohort]),
                      t.severity, _real(t.value), _real(t.threshold), t.starts_at_s,
                      t.ends_at_s, json.dumps(dict(t.labels), sort_keys=True),
                      json.dumps(dict(t.annotations), sort_keys=True))
                     for t in transitions])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def alert_history(self, model: str = "", state: str = "", limit: int = 100
                      ) -> list[AlertRecord]:
        where, args = [], []
        if model:
            where.append("model = ?")
            args.append(model)
        if state:
            where.append("state = ?")
            args.append(state)
        sql = ("SELECT at, rule, kind, model, model_version, fingerprint, previous_state, "
               "state, cohort, severity, value, threshold, starts_at, ends_at, labels, "
               "annotations FROM alert_history" + (" WHERE " + " AND ".join(where)
                                                   if where else "")
               + " ORDER BY id DESC LIMIT ?")
        rows = self._reader().execute(sql, (*args, max(0, int(limit)))).fetchall()
        return [AlertRecord(
            at_s=r[0], rule=r[1], kind=r[2], model=r[3], model_version=r[4], fingerprint=r[5],
            previous_state=r[6], state=r[7],
            cohort=tuple((str(k), str(v)) for k, v in json.loads(r[8])), severity=r[9],
            value=math.nan if r[10] is None else r[10],
            threshold=math.nan if r[11] is None else r[11], starts_at_s=r[12], ends_at_s=r[13],
            labels=json.loads(r[14]), annotations=json.loads(r[15])) for r in rows]

    def close(self) -> None:
        with self._write_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._writer.close()


def _real(x: float) -> float | None:
    """SQLite stores NaN as NULL anyway; say so explicitly."""
    return None if math.isnan(x) else x
