"""The forwarding outbox of a region served by several replicas on one PostgreSQL database.

The same interface as `aggregator.forward.ForwardOutbox` (open_groups, build, pending, ack,
dead_letter, renumber_above, counts, close), on the tables of PostgresStore's migration 2:
`forward_pending` (written in each report's ingest transaction, `PostgresStore(forwarding=True)`),
`forward_outbox`, `forward_dead_letters` and `forward_state` (the seq counter).

Exactly once across replicas: a build is ONE transaction that first locks the `next_seq` row
of `forward_state` (SELECT ... FOR UPDATE), so builds of two replicas are serialized and never
allocate the same seq; then it locks the chosen pending rows (FOR UPDATE), writes the outbox
rows and deletes exactly those pending rows (checking the count), and moves the counter. A
second builder waits on the counter row and then, in a fresh statement snapshot, no longer
sees the rows the first one deleted: a pending report is never forwarded twice. Normally only
the holder of the "forward" lease builds and sends (`Forwarder`); the locks make a lease
hand-over (two replicas briefly both building) safe too, and a row sent by both is answered
DUPLICATE by the central (one upstream identity per region).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from agent.errors import ConfigError
from agent.renumber import renumber_plan
from agent.signing import ReportSigner
from agent.spec import Spec
from agent.spool import SpooledReport
from aggregator.forward import _chunks, _forwarded_payload
from aggregator.store.base import parse_labels
from aggregator.store.postgres import redact_dsn

__all__ = ["PostgresForwardOutbox"]

logger = logging.getLogger(__name__)


class PostgresForwardOutbox:
    """The forwarded reports of a region's PostgreSQL database, on a connection of its own
    (autocommit; each multi-statement step is an explicit transaction). ``shared``: several
    replicas may use the same outbox (the Forwarder then takes the "forward" lease and reads
    the watermark from the database)."""

    shared = True

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self._lock = threading.Lock()
        self._db = self._connect()
        self.dead_letters = 0   # since start, by this process

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                   application_name="fleetwatch-forward")
        except psycopg.Error as e:
            raise ConfigError(f"database {self.where}: cannot connect for forwarding "
                              f"({type(e).__name__})") from None

    def _conn(self) -> psycopg.Connection[Any]:
        """The connection, opened again when it broke (a restarted server): the next tick
        retries what failed, and every step is one transaction, so nothing is half done."""
        if self._db.closed or self._db.broken:
            logger.warning("%s: forwarding connection lost; reconnecting", self.where)
            self._db = self._connect()
        return self._db

    def claim_upstream_id(self, upstream_id: str) -> None:
        """Record the region's upstream identity, or check it: the outbox's seqs are one
        sequence at the central under one device_id, so every replica must forward as the
        same one. Raises ConfigError when the database already forwards as another."""
        with self._lock:
            conn = self._conn()
            conn.execute("INSERT INTO forward_upstream (upstream_id) VALUES (%s) "
                         "ON CONFLICT (one) DO NOTHING", (upstream_id,))
            row = conn.execute("SELECT upstream_id FROM forward_upstream").fetchone()
        if row is not None and row[0] != upstream_id:
            raise ConfigError(
                f"forward (--upstream-id): the region's database {self.where} forwards as "
                f"{row[0]!r}; every replica of a region must use the same upstream id (and "
                f"its key and certificate), not {upstream_id!r}")

    # -- building --------------------------------------------------------------------------

    def open_groups(self) -> list[tuple[str, int, int, int]]:
        """(spec hash, label set id, window start, newest received_ms) per pending group."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT spec_hash, label_set, window_start, MAX(received_ms) "
                "FROM forward_pending GROUP BY spec_hash, label_set, window_start").fetchall()
        return [(h, int(lid), int(ws), int(ms)) for h, lid, ws, ms in rows]

    def build(self, groups: list[tuple[str, int, int]], spec_of: Callable[[str], Spec | None],
              upstream_id: str, signer: ReportSigner | None, max_contributions: int) -> int:
        """Move the pending reports of ``groups`` into forwarded reports in one transaction
        (see the module docstring). Returns the reports built."""
        built = 0
        with self._lock:
            conn = self._conn()
            with conn.transaction():
                row = conn.execute("SELECT value FROM forward_state WHERE key = 'next_seq' "
                                   "FOR UPDATE").fetchone()
                assert row is not None   # inserted by the migration
                seq = int(row[0])
                for spec_hash, lid, ws in groups:
                    spec = spec_of(spec_hash)
                    if spec is None:  # cannot happen: the report was validated against it
                        logger.error("forward: no spec %s; its pending reports wait",
                                     spec_hash[:12])
                        continue
                    rows = conn.execute(
                        "SELECT sender, seq, summary, contributions FROM forward_pending "
                        "WHERE spec_hash = %s AND label_set = %s AND window_start = %s "
                        "ORDER BY sender, seq FOR UPDATE", (spec_hash, lid, ws)).fetchall()
                    if not rows:
                        continue   # forwarded by another replica since the group was listed
                    label_row = conn.execute("SELECT canonical FROM label_sets WHERE id = %s",
                                             (lid,)).fetchone()
                    assert label_row is not None
                    labels = parse_labels(label_row[0])
                    outbox = []
                    for chunk in _chunks(rows, max_contributions):
                        payload = _forwarded_payload(spec, labels, ws, seq, upstream_id, chunk,
                                                     signer)
                        outbox.append((seq, spec_hash, ws, payload, int(time.time() * 1000)))
                        seq += 1
                    conn.cursor().executemany(
                        "INSERT INTO forward_outbox (seq, spec_hash, window_start, payload, "
                        "created_ms) VALUES (%s, %s, %s, %s, %s)", outbox)
                    deleted = conn.execute(
                        "DELETE FROM forward_pending WHERE (sender, seq) IN "
                        "(SELECT * FROM unnest(%s::text[], %s::bigint[]))",
                        ([r[0] for r in rows], [r[1] for r in rows])).rowcount
                    if deleted != len(rows):   # the row locks make this impossible
                        raise RuntimeError(f"forward: {len(rows) - deleted} pending report(s) "
                                           "vanished during the build; rolled back")
                    built += len(outbox)
                conn.execute("UPDATE forward_state SET value = %s WHERE key = 'next_seq'",
                             (seq,))
        return built

    # -- the Spool interface of agent.upload.Uploader -------------------------------------

    def pending(self, limit: int = 100) -> list[SpooledReport]:
        with self._lock:
            rows = self._conn().execute("SELECT seq, window_start, payload FROM forward_outbox "
                                        "ORDER BY seq LIMIT %s", (limit,)).fetchall()
        return [SpooledReport(int(seq), int(ws), bytes(payload)) for seq, ws, payload in rows]

    def ack(self, seq: int) -> None:
        with self._lock:
            self._conn().execute("DELETE FROM forward_outbox WHERE seq = %s", (seq,))

    def dead_letter(self, seq: int, reason: str) -> None:
        """Refused for good by the upstream: kept for an operator, out of the way."""
        with self._lock:
            conn = self._conn()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO forward_dead_letters (seq, payload, reason, created_ms) "
                    "SELECT seq, payload, %s, %s FROM forward_outbox WHERE seq = %s "
                    "ON CONFLICT (seq) DO UPDATE SET payload = excluded.payload, "
                    "reason = excluded.reason, created_ms = excluded.created_ms",
                    (reason[:2000], int(time.time() * 1000), seq))
                conn.execute("DELETE FROM forward_outbox WHERE seq = %s", (seq,))
            self.dead_letters += 1   # (the Uploader logs the refusal)

    def renumber_above(self, mark: int, rebuild: Callable[[bytes, int], bytes]) -> int:
        """The upstream's mark for the region is above our seqs (the database was replaced):
        renumber every unsent report above it, in order, in one transaction (under the
        counter's row lock, as builds)."""
        with self._lock:
            conn = self._conn()
            with conn.transaction():
                row = conn.execute("SELECT value FROM forward_state WHERE key = 'next_seq' "
                                   "FOR UPDATE").fetchone()
                assert row is not None
                rows = conn.execute("SELECT seq, payload FROM forward_outbox ORDER BY seq "
                                    "FOR UPDATE").fetchall()
                first, updates = renumber_plan(rows, mark, int(row[0]), rebuild)
                conn.cursor().executemany(
                    "UPDATE forward_outbox SET seq = %s, payload = %s WHERE seq = %s", updates)
                conn.execute("UPDATE forward_state SET value = %s WHERE key = 'next_seq'",
                             (first + len(rows),))
        if rows:
            logger.warning("forward: renumbered %d report(s) from seq %d (the upstream's mark "
                           "for this region is %d)", len(rows), first, mark)
        return len(rows)

    def counts(self) -> dict[str, int]:
        with self._lock:
            row = self._conn().execute(
                "SELECT (SELECT COUNT(*) FROM forward_pending), "
                "(SELECT COUNT(*) FROM forward_outbox), "
                "(SELECT COUNT(*) FROM forward_dead_letters)").fetchone()
        assert row is not None
        return {"pending": int(row[0]), "outbox": int(row[1]), "dead_letter_rows": int(row[2])}

    def close(self) -> None:
        with self._lock:
            self._db.close()
