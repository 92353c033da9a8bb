"""The durable on-device spool: one SQLite file (WAL, synchronous=FULL) per device.

It holds the outbox of serialized report envelopes keyed by `seq`, the next `seq`, the cached
specs, the privacy ledger, the predictions waiting for their label (so a restart does not turn
every pending label into "unmatched"), and a dead-letter table for reports the aggregator
refused for good. A report leaves the
outbox only when the aggregator acknowledged it, so a crash or restart loses nothing that was
spooled. The spool is bounded: past `max_reports` or `max_bytes` the oldest reports are dropped,
and the drop is counted and carried by the next report (never silent).
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.errors import ConfigError
from agent.renumber import renumber_plan
from agent.sqlite_tx import immediate

__all__ = ["Spool", "SpoolStats", "SpooledReport"]

logger = logging.getLogger(__name__)


def _real(x: float) -> float | None:
    return None if x != x else x   # SQLite has no NaN: NULL stands for it


def _unreal(x: float | None) -> float:
    return float("nan") if x is None else float(x)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    window_start INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    dropped_carried INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS specs (
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    hash TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (model, model_version)
);
CREATE TABLE IF NOT EXISTS privacy_ledger (
    id INTEGER PRIMARY KEY,
    window_start INTEGER NOT NULL,
    day INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    rho REAL NOT NULL,
    released INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS privacy_ledger_by_day ON privacy_ledger (day);
CREATE TABLE IF NOT EXISTS label_cache (
    request_id TEXT PRIMARY KEY,
    t REAL NOT NULL,
    prediction REAL,
    confidence REAL
);
CREATE INDEX IF NOT EXISTS label_cache_by_time ON label_cache (t);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SpooledReport:
    seq: int
    window_start: int
    payload: bytes


@dataclass(frozen=True)
class SpoolStats:
    pending: int
    pending_bytes: int
    dropped_total: int
    dead_letters: int
    next_seq: int


class Spool:
    """A durable outbox. Thread-safe; every method is one short transaction."""

    def __init__(self, path: str | pathlib.Path, *, max_reports: int = 10_000,
                 max_bytes: int = 64 << 20) -> None:
        if max_reports < 1:
            raise ConfigError("max_reports must be at least 1")
        if max_bytes < 1024:
            raise ConfigError("max_bytes must be at least 1024")
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_reports = max_reports
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "dropped_carried" not in columns:  # a spool written before the column existed
            self._db.execute("ALTER TABLE outbox ADD COLUMN dropped_carried INTEGER NOT NULL "
                             "DEFAULT 0")

    # -- outbox ------------------------------------------------------------------------------

    def enqueue(self, window_start: int, build: Callable[[int, int], bytes]) -> int:
        """Allocate the next seq, build the payload with `build(seq, dropped_unreported)` and
        store it, all in one transaction. Returns the seq."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                seq = self._get(cur, "next_seq", 1)
                dropped = self._get(cur, "dropped_unreported", 0)
                payload = build(seq, dropped)
                cur.execute("INSERT INTO outbox (seq, window_start, payload, created_ms, "
                            "dropped_carried) VALUES (?, ?, ?, ?, ?)",
                            (seq, window_start, payload, int(time.time() * 1000), dropped))
                self._set(cur, "next_seq", seq + 1)
                self._set(cur, "dropped_unreported", 0)
                self._enforce_bounds(cur, keep_seq=seq)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return seq

    def _enforce_bounds(self, cur: sqlite3.Cursor, keep_seq: int) -> None:
        n, size = cur.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        dropped = 0
        carried = 0  # drops that the dropped reports were carrying: report them again
        while (n > self.max_reports or size > self.max_bytes) and n > 1:
            seq, length, was_carrying = cur.execute(
                "SELECT seq, LENGTH(payload), dropped_carried FROM outbox WHERE seq != ? "
                "ORDER BY seq LIMIT 1", (keep_seq,)).fetchone()
            cur.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            n -= 1
            size -= length
            dropped += 1
            carried += was_carrying
        if dropped:
            logger.warning("spool full: dropped the %d oldest report(s)", dropped)
            self._set(cur, "dropped_unreported",
                      self._get(cur, "dropped_unreported", 0) + dropped + carried)
            self._set(cur, "dropped_total", self._get(cur, "dropped_total", 0) + dropped)

    def pending(self, limit: int = 100) -> list[SpooledReport]:
        """The oldest unacknowledged reports, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, window_start, payload FROM outbox ORDER BY seq LIMIT ?",
                (limit,)).fetchall()
        return [SpooledReport(seq, ws, bytes(p)) for seq, ws, p in rows]

    def renumber_above(self, mark: int, rebuild: Callable[[bytes, int], bytes]) -> int:
        """Give every pending report a new seq above ``mark`` (and above any seq handed out),
        in order, rebuilding each payload with ``rebuild(payload, new_seq)``; the next report
        continues after them. One transaction: a crash leaves either the old numbers or the
        new ones. Returns how many were renumbered.

        For a device that lost its spool (it restarted at seq 1) and is told by the
        aggregator that its seqs are below the high-water mark of its earlier life."""
        with self._lock, immediate(self._db) as cur:
            rows = cur.execute("SELECT seq, payload FROM outbox ORDER BY seq").fetchall()
            first, updates = renumber_plan(rows, mark, self._get(cur, "next_seq", 1), rebuild)
            cur.executemany("UPDATE outbox SET seq = ?, payload = ? WHERE seq = ?", updates)
            self._set(cur, "next_seq", first + len(rows))
        if rows:
            logger.warning("renumbered %d pending report(s) from seq %d: the aggregator's mark "
                           "for this device is %d (was its spool lost?)", len(rows), first, mark)
        return len(rows)

    def ack(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def dead_letter(self, seq: int, reason: str) -> None:
        """Move a report the aggregator refused for good out of the outbox, keeping it."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute("INSERT OR REPLACE INTO dead_letters (seq, payload, reason, created_ms)"
                            " SELECT seq, payload, ?, ? FROM outbox WHERE seq = ?",
                            (reason[:1000], int(time.time() * 1000), seq))
                row = cur.execute("SELECT dropped_carried FROM outbox WHERE seq = ?",
                                  (seq,)).fetchone()
                if row and row[0]:  # the drops it carried still need reporting
                    self._set(cur, "dropped_unreported",
                              self._get(cur, "dropped_unreported", 0) + row[0])
                cur.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def stats(self) -> SpoolStats:
        with self._lock:
            cur = self._db.cursor()
            n, size = cur.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
            dead = cur.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            return SpoolStats(n, size, self._get(cur, "dropped_total", 0), dead,
                              self._get(cur, "next_seq", 1))

    # -- privacy ledger ------------------------------------------------------------------------

    def ledger_record(self, window_start: int, day: int, epsilon: float, rho: float,
                      released: bool) -> None:
        with self._lock:
            self._db.execute("INSERT INTO privacy_ledger (window_start, day, epsilon, rho, "
                             "released) VALUES (?, ?, ?, ?, ?)",
                             (window_start, day, epsilon if released else 0.0,
                              rho if released else 0.0, int(released)))

    def ledger_try_spend(self, window_start: int, day: int, epsilon: float, rho: float,
                         affordable: Callable[[float, float], bool]) -> tuple[bool, float, float]:
        """In one transaction: read the day's spend, ask `affordable(eps_sum, rho_sum)`, record
        the release (or the refusal). Returns (allowed, eps_sum, rho_sum) after it."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                eps_sum, rho_sum = cur.execute(
                    "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(rho), 0) FROM "
                    "privacy_ledger WHERE day = ?", (day,)).fetchone()
                allowed = affordable(eps_sum, rho_sum)
                cur.execute("INSERT INTO privacy_ledger (window_start, day, epsilon, rho, "
                            "released) VALUES (?, ?, ?, ?, ?)",
                            (window_start, day, epsilon if allowed else 0.0,
                             rho if allowed else 0.0, int(allowed)))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        if allowed:
            eps_sum, rho_sum = eps_sum + epsilon, rho_sum + rho
        return allowed, eps_sum, rho_sum

    def ledger_day(self, day: int) -> tuple[float, float]:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(rho), 0) "
                                   "FROM privacy_ledger WHERE day = ?", (day,)).fetchone()
        return float(row[0]), float(row[1])

    def ledger_max_epsilon(self) -> float:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(epsilon), 0) FROM privacy_ledger"
                                   ).fetchone()
        return float(row[0])

    # -- predictions waiting for their label ---------------------------------------------------

    def label_cache_update(self, added: Mapping[str, tuple[float, float, float]],
                           removed: Iterable[str], min_t: float) -> None:
        """Store new cache entries and forget joined / evicted ones, and those older than
        `min_t` (the TTL), in one transaction. The caller mirrors a bounded cache (its
        evictions come as `removed`), so the copy stays bounded; `label_cache_load` takes the
        newest entries only, should it not be."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany("DELETE FROM label_cache WHERE request_id = ?",
                                ((r,) for r in removed))
                cur.executemany("INSERT OR REPLACE INTO label_cache VALUES (?, ?, ?, ?)",
                                ((k, t, _real(p), _real(c)) for k, (t, p, c) in added.items()))
                cur.execute("DELETE FROM label_cache WHERE t < ?", (min_t,))  # indexed
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def label_cache_load(self, min_t: float, max_entries: int
                         ) -> list[tuple[str, tuple[float, float, float]]]:
        """The newest `max_entries` entries not older than `min_t`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, t, prediction, confidence FROM label_cache WHERE t >= ? "
                "ORDER BY t DESC LIMIT ?", (min_t, max_entries)).fetchall()
        return [(k, (float(t), _unreal(p), _unreal(c))) for k, t, p, c in reversed(rows)]

    # -- spec cache --------------------------------------------------------------------------

    def cached_spec(self, model: str, model_version: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT json FROM specs WHERE model = ? AND model_version = ?",
                                   (model, model_version)).fetchone()
        return row[0] if row else None

    def cache_spec(self, model: str, model_version: str, spec_hash: str, text: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO specs (model, model_version, hash, json) "
                             "VALUES (?, ?, ?, ?)", (model, model_version, spec_hash, text))

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _get(cur: sqlite3.Cursor, key: str, default: int) -> int:
        row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    @staticmethod
    def _set(cur: sqlite3.Cursor, key: str, value: int) -> None:
        cur.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._db.close()
