"""The regional tier: forward merged windows to an upstream (central) aggregator.

A regional aggregator (`fleetwatch serve --upstream HOST:PORT --upstream-id NAME`) is a normal
aggregator for its devices and also forwards. Its store records every accepted report in
`forward_pending` in the report's own ingest transaction (`SqliteStore(forwarding=True)`, or
`PostgresStore(forwarding=True)` for a region of several replicas: then the outbox is
`aggregator.forward_pg.PostgresForwardOutbox` and only the holder of the "forward" lease builds
and sends).
Here, per (spec, label set, window), once the window is closed in event time (every active
sender's newest window is past it: the watermark) or idle (no report for it for ``idle_s``),
the pending reports are merged into one forwarded report (`WindowReport.merged` and its
`contributions`), given the next seq, signed, and written to `forward_outbox`, while the
pending rows are deleted: ONE transaction of the regional's database. A report accepted after
its window was forwarded (late) goes into a further forwarded report for the same window:
merging is associative, so the central total is the same.

The outbox is sent oldest first by `agent.upload.Uploader` (capped exponential backoff with
jitter); a row leaves only on ACCEPTED/DUPLICATE, or into `forward_dead_letters` when refused
for good (INVALID_ARGUMENT; counted and logged). Nothing is ever dropped: the outbox is bounded
only by disk. The central deduplicates on (regional id, seq), so a crash of the regional at any
point, or a lost acknowledgement, forwards every accepted device report exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.errors import ConfigError
from agent.renumber import renumber_plan
from agent.signing import ReportSigner
from agent.spec import Spec
from agent.spool import SpooledReport
from agent.sqlite_tx import immediate
from agent.transport import TlsCredentials, make_channel
from agent.upload import Backoff, DeliveryResult, Uploader
from agent.wire import summary_from_proto, summary_to_proto
from aggregator.certs import check_id
from aggregator.keys import AGGREGATOR_KEY_PREFIX
from aggregator.store import is_postgres_dsn
from aggregator.store.base import Contribution, Store, parse_labels
from aggregator.store.rows import contributions_from_blob
from protos import fleetwatch_pb2 as pb

__all__ = ["FORWARD_LEASE", "ForwardConfig", "ForwardOutbox", "Forwarder", "Outbox"]

logger = logging.getLogger(__name__)

AGENT_VERSION = "fleetwatch-regional"
# The lease (`Store.try_lead`) whose holder builds and sends a region's forwarded reports;
# apart from the alert lease, so the two may sit on different replicas.
FORWARD_LEASE = "forward"

_OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_outbox (
    seq INTEGER PRIMARY KEY,
    spec_hash TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS forward_dead_letters (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS forward_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class ForwardConfig:
    """Where and how a regional aggregator forwards (`AggregatorConfig.forward`).

    ``upstream_id``: this regional's name at the central tier (the report's device_id, the
    name of its `issue-aggregator` certificate and of its signing key ``aggregator:NAME``).
    ``tls``: client credentials for the upstream (its CA, this regional's certificate and
    key); None: plaintext (loopback upstream only). ``signing_key``: the Ed25519 key
    (``aggregators/NAME.sign.key``); None: unsigned envelopes."""

    upstream: str
    upstream_id: str
    tls: TlsCredentials | None = None
    signing_key: str | os.PathLike[str] | None = None
    idle_s: float = 10.0
    tick_s: float = 0.5
    # Devices per forwarded report at most: a window of more devices is split over several
    # reports (~40 bytes a contribution: 2000 keep a report far below the 256 KiB limit).
    max_contributions: int = 2000
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    rpc_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        host, sep, port = self.upstream.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"upstream: {self.upstream!r} is not HOST:PORT")
        check_id("upstream_id", self.upstream_id)
        for name in ("idle_s", "tick_s", "backoff_base_s", "backoff_cap_s", "rpc_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"forward {name}: must be > 0, got {value!r}")
        if not isinstance(self.max_contributions, int) or self.max_contributions < 1:
            raise ConfigError(f"forward max_contributions: must be an integer >= 1, got "
                              f"{self.max_contributions!r}")

    def signer(self) -> ReportSigner | None:
        if self.signing_key is None:
            return None
        return ReportSigner.from_pem_file(self.signing_key,
                                          key_id=AGGREGATOR_KEY_PREFIX + self.upstream_id)


class Outbox(Protocol):
    """What the Forwarder needs of an outbox: `ForwardOutbox` (SQLite) or
    `aggregator.forward_pg.PostgresForwardOutbox`. Also the `Spool` interface of
    `agent.upload.Uploader` (pending, ack, dead_letter, renumber_above)."""

    dead_letters: int

    def open_groups(self) -> list[tuple[str, int, int, int]]: ...

    def build(self, groups: list[tuple[str, int, int]],
              spec_of: Callable[[str], Spec | None], upstream_id: str,
              signer: ReportSigner | None, max_contributions: int) -> int: ...

    def pending(self, limit: int = 100) -> list[SpooledReport]: ...

    def ack(self, seq: int) -> None: ...

    def dead_letter(self, seq: int, reason: str) -> None: ...

    def renumber_above(self, mark: int, rebuild: Callable[[bytes, int], bytes]) -> int: ...

    def counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class ForwardOutbox:
    """The forwarded reports of one regional database: built from `forward_pending`, sent
    from `forward_outbox`. Has the `Spool` methods `agent.upload.Uploader` uses (pending, ack,
    dead_letter, renumber_above). Its own connection to the store's file (SQLite serializes
    it with the store's writer)."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=60)
        self._db.execute("PRAGMA busy_timeout=60000")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_OUTBOX_SCHEMA)
        self._lock = threading.Lock()
        self.dead_letters = 0   # since start

    # -- building --------------------------------------------------------------------------

    def open_groups(self) -> list[tuple[str, int, int, int]]:
        """(spec hash, label set id, window start, newest received_ms) per pending group."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(  # type: ignore[misc]
                "SELECT spec_hash, label_set, window_start, MAX(received_ms) "
                "FROM forward_pending GROUP BY spec_hash, label_set, window_start")]

    def build(self, groups: list[tuple[str, int, int]], spec_of: Callable[[str], Spec | None],
              upstream_id: str, signer: ReportSigner | None, max_contributions: int) -> int:
        """Move the pending reports of ``groups`` into forwarded reports: choosing the rows,
        numbering, signing, writing the outbox rows and deleting the pending rows in one
        transaction (a crash leaves all of it or none). Returns the reports built."""
        built = 0
        with self._lock, immediate(self._db) as cur:
            seq = _get(cur, "next_seq", 1)
            for spec_hash, lid, ws in groups:
                spec = spec_of(spec_hash)
                if spec is None:  # cannot happen: the report was validated against it
                    logger.error("forward: no spec %s; its pending reports wait",
                                 spec_hash[:12])
                    continue
                canonical = cur.execute("SELECT canonical FROM label_sets WHERE id = ?",
                                        (lid,)).fetchone()[0]
                rows = cur.execute(
                    "SELECT sender, seq, summary, contributions FROM forward_pending "
                    "WHERE spec_hash = ? AND label_set = ? AND window_start = ? "
                    "ORDER BY sender, seq", (spec_hash, lid, ws)).fetchall()
                for chunk in _chunks(rows, max_contributions):
                    payload = _forwarded_payload(spec, parse_labels(canonical), ws, seq,
                                                 upstream_id, chunk, signer)
                    cur.execute("INSERT INTO forward_outbox (seq, spec_hash, window_start, "
                                "payload, created_ms) VALUES (?, ?, ?, ?, ?)",
                                (seq, spec_hash, ws, payload, int(time.time() * 1000)))
                    seq += 1
                    built += 1
                cur.executemany("DELETE FROM forward_pending WHERE sender = ? AND seq = ?",
                                [(r[0], r[1]) for r in rows])
            _set(cur, "next_seq", seq)
        return built

    # -- the Spool interface of agent.upload.Uploader -------------------------------------

    def pending(self, limit: int = 100) -> list[SpooledReport]:
        with self._lock:
            rows = self._db.execute("SELECT seq, window_start, payload FROM forward_outbox "
                                    "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [SpooledReport(seq, ws, bytes(payload)) for seq, ws, payload in rows]

    def ack(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM forward_outbox WHERE seq = ?", (seq,))

    def dead_letter(self, seq: int, reason: str) -> None:
        """Refused for good by the upstream: kept (it is the region's data) for an operator,
        out of the way of the reports behind it."""
        with self._lock:
            with immediate(self._db) as cur:
                cur.execute("INSERT OR REPLACE INTO forward_dead_letters (seq, payload, reason, "
                            "created_ms) SELECT seq, payload, ?, ? FROM forward_outbox "
                            "WHERE seq = ?", (reason[:2000], int(time.time() * 1000), seq))
                cur.execute("DELETE FROM forward_outbox WHERE seq = ?", (seq,))
            self.dead_letters += 1   # (the Uploader logs the refusal)

    def renumber_above(self, mark: int, rebuild: Callable[[bytes, int], bytes]) -> int:
        """The upstream's mark for us is above our seqs (this regional's database was
        replaced): renumber every unsent report above it, in order, in one transaction."""
        with self._lock, immediate(self._db) as cur:
            rows = cur.execute("SELECT seq, payload FROM forward_outbox ORDER BY seq"
                               ).fetchall()
            first, updates = renumber_plan(rows, mark, _get(cur, "next_seq", 1), rebuild)
            cur.executemany("UPDATE forward_outbox SET seq = ?, payload = ? WHERE seq = ?",
                            updates)
            _set(cur, "next_seq", first + len(rows))
        if rows:
            logger.warning("forward: renumbered %d report(s) from seq %d (the upstream's mark "
                           "for this regional is %d)", len(rows), first, mark)
        return len(rows)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "pending": self._db.execute("SELECT COUNT(*) FROM forward_pending"
                                            ).fetchone()[0],
                "outbox": self._db.execute("SELECT COUNT(*) FROM forward_outbox"
                                           ).fetchone()[0],
                "dead_letter_rows": self._db.execute(
                    "SELECT COUNT(*) FROM forward_dead_letters").fetchone()[0],
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _get(cur: sqlite3.Cursor, key: str, default: int) -> int:
    row = cur.execute("SELECT value FROM forward_state WHERE key = ?", (key,)).fetchone()
    return default if row is None else int(row[0])


def _set(cur: sqlite3.Cursor, key: str, value: int) -> None:
    cur.execute("INSERT OR REPLACE INTO forward_state (key, value) VALUES (?, ?)", (key, value))


def _chunks(rows: list[tuple[str, int, bytes, bytes]], max_devices: int
            ) -> list[list[tuple[list[Contribution], bytes]]]:
    """The pending rows of one group in reports of at most ``max_devices`` devices each (a
    row is never split: one forwarded into us may hold many devices)."""
    out: list[list[tuple[list[Contribution], bytes]]] = []
    devices: set[str] = set()
    for _sender, _seq, summary, blob in rows:
        contributions = contributions_from_blob(bytes(blob))
        new = {c.device_id for c in contributions} - devices
        if not out or (devices and len(devices) + len(new) > max_devices):
            out.append([])
            devices = set()
            new = {c.device_id for c in contributions}
        out[-1].append((contributions, bytes(summary)))
        devices |= new
    return out


def _forwarded_payload(spec: Spec, labels: dict[str, str], window_start: int, seq: int,
                       upstream_id: str, chunk: list[tuple[list[Contribution], bytes]],
                       signer: ReportSigner | None) -> bytes:
    """The outbox payload of one forwarded report: its envelope, signed when ``signer``."""
    data = _forwarded_report(spec, labels, window_start, seq, upstream_id, chunk
                             ).SerializeToString()
    return (signer.envelope(data) if signer is not None else
            pb.ReportEnvelope(report=data).SerializeToString())


def _forwarded_report(spec: Spec, labels: dict[str, str], window_start: int, seq: int,
                      upstream_id: str, chunk: list[tuple[list[Contribution], bytes]]
                      ) -> pb.WindowReport:
    merged = None
    by_device: dict[str, Contribution] = {}
    for contributions, blob in chunk:
        s = summary_from_proto(pb.Summary.FromString(blob))  # ours: validated at ingest
        if merged is None:
            merged = s
        else:
            merged.merge_in(s)
        for c in contributions:
            was = by_device.get(c.device_id)
            by_device[c.device_id] = c if was is None else Contribution(
                c.device_id, was.reports + c.reports, was.withheld + c.withheld,
                max(was.max_day_epsilon, c.max_day_epsilon))
    assert merged is not None
    return pb.WindowReport(
        device_id=upstream_id, model=spec.model, model_version=spec.model_version,
        labels=labels, window_start_unix_s=window_start,
        window_length_s=spec.window_length_s, seq=seq, spec_hash=spec.hash,
        created_unix_ms=int(time.time() * 1000), agent_version=AGENT_VERSION,
        merged=summary_to_proto(merged),
        contributions=[pb.Contribution(device_id=c.device_id, reports=c.reports,
                                       withheld=c.withheld, max_day_epsilon=c.max_day_epsilon)
                       for c in sorted(by_device.values(), key=lambda c: c.device_id)])


class Forwarder:
    """The background thread of a regional aggregator: builds forwarded reports from closed
    windows and delivers the outbox. ``on_accepted`` is the Ingestor's hook (the event-time
    watermark); ``spec_of(hash)`` looks specs up in the store."""

    def __init__(self, db: str | pathlib.Path | Outbox, config: ForwardConfig,
                 spec_of: Callable[[str], Spec | None], store: Store | None = None) -> None:
        """``db``: the regional's SQLite path, a ``postgresql://`` DSN, or an outbox.
        ``store``: the regional's store; with it, the Forwarder builds and sends only while
        it holds the store's "forward" lease (`Store.try_lead`; a SQLite store always
        leads). A shared (PostgreSQL) outbox needs it: several replicas use it, and the
        event-time watermark is read from the store's `sender_activity` (every replica's
        reports) instead of this process's own ones."""
        self.config = config
        self.spec_of = spec_of
        self.store = store
        self._signer = config.signer()   # a bad key file fails before anything starts
        if isinstance(db, (str, pathlib.Path)):
            if is_postgres_dsn(db):
                from aggregator.forward_pg import PostgresForwardOutbox  # loads psycopg

                db = PostgresForwardOutbox(str(db))
            else:
                db = ForwardOutbox(db)
        self.outbox: Outbox = db
        self._shared = bool(getattr(db, "shared", False))
        if self._shared and store is None:
            raise ValueError("a shared (PostgreSQL) forwarding outbox needs the store")
        claim = getattr(db, "claim_upstream_id", None)
        if claim is not None:   # several replicas, one upstream identity
            try:
                claim(config.upstream_id)
            except BaseException:
                db.close()
                raise
        self._epoch = 0         # of this process's hold on the forwarding lease; 0: none
        self.lead_changes = 0   # times this process gained the forwarding lease
        self._channel = make_channel(config.upstream, config.tls,
                                     backoff_base_s=config.backoff_base_s,
                                     backoff_cap_s=config.backoff_cap_s)
        self.uploader = Uploader(self.outbox, self._channel,  # type: ignore[arg-type]
                                 rpc_timeout_s=config.rpc_timeout_s, rebuild=self._rebuild)
        self._backoff = Backoff(config.backoff_base_s, config.backoff_cap_s)
        self._lock = threading.Lock()
        # spec hash -> sender -> (newest window start, monotonic time last seen)
        self._senders: dict[str, dict[str, tuple[int, float]]] = {}
        self.forwarded = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleetwatch-forward",
                                        daemon=True)

    def on_accepted(self, spec_hash: str, window_start: int, sender: str) -> None:
        if self._shared:
            return   # the watermark comes from the database (every replica's senders)
        now = time.monotonic()
        with self._lock:
            senders = self._senders.setdefault(spec_hash, {})
            newest = senders.get(sender, (window_start, now))[0]
            senders[sender] = (max(newest, window_start), now)

    def _watermark(self, spec: Spec, now: float) -> int | None:
        """The oldest newest-window of the senders active lately: every window before it is
        closed in event time (no active sender will report it, except late)."""
        horizon = now - (3 * spec.window_length_s + self.config.idle_s)
        if self._shared:
            # Every replica's senders, from the database (wall clock: received_ms is).
            assert self.store is not None
            since_ms = int((time.time() - 3 * spec.window_length_s - self.config.idle_s) * 1000)
            active = self.store.sender_activity(spec.hash, since_ms)
            return min((ws for ws, _ in active.values()), default=None)
        with self._lock:
            senders = self._senders.get(spec.hash, {})
            for gone in [s for s, (_, seen) in senders.items() if seen < horizon]:
                del senders[gone]
            return min((ws for ws, _ in senders.values()), default=None)

    def closed_groups(self) -> list[tuple[str, int, int]]:
        now_ms, now = time.time() * 1000, time.monotonic()
        marks: dict[str, int | None] = {}
        out = []
        for spec_hash, lid, ws, newest_ms in self.outbox.open_groups():
            if spec_hash not in marks:
                spec = self.spec_of(spec_hash)
                marks[spec_hash] = None if spec is None else self._watermark(spec, now)
            mark = marks[spec_hash]
            if (mark is not None and ws < mark) or now_ms - newest_ms >= \
                    self.config.idle_s * 1000:
                out.append((spec_hash, lid, ws))
        return out

    def build_once(self) -> int:
        groups = self.closed_groups()
        if not groups:
            return 0
        built = self.outbox.build(groups, self.spec_of, self.config.upstream_id, self._signer,
                                  self.config.max_contributions)
        with self._lock:
            self.forwarded += built
        logger.debug("forward: %d window group(s) -> %d report(s)", len(groups), built)
        return built

    def _rebuild(self, payload: bytes, seq: int) -> bytes:
        env = pb.ReportEnvelope.FromString(payload)
        report = pb.WindowReport.FromString(env.report)
        report.seq = seq
        data = report.SerializeToString()
        return (self._signer.envelope(data) if self._signer is not None
                else pb.ReportEnvelope(report=data).SerializeToString())

    def _lead(self) -> bool:
        """Whether this process builds and sends this tick (holds the "forward" lease). What
        a holder builds and sends lives in the shared outbox, so a new hold (a new epoch,
        even one re-taken after losing the lease) only restarts the upstream backoff."""
        if self.store is None:
            return True
        try:
            epoch = int(self.store.try_lead(FORWARD_LEASE))
        except Exception:
            logger.exception("forward: cannot take or check the %r lease", FORWARD_LEASE)
            epoch = 0
        if epoch and epoch != self._epoch:
            self.lead_changes += 1
            self._backoff.reset()
            logger.info("forward: this replica forwards for the region (%r lease, epoch %d)",
                        FORWARD_LEASE, epoch)
        elif self._epoch and not epoch:
            logger.warning("forward: lost the %r lease; another replica forwards",
                           FORWARD_LEASE)
        self._epoch = epoch
        return bool(epoch)

    @property
    def leading(self) -> bool:
        """Whether this process held the forwarding lease at its last tick."""
        return self.store is None or bool(self._epoch)

    def stats(self) -> dict[str, int]:
        out = self.outbox.counts()
        with self._lock:
            out["forwarded"] = self.forwarded
        out["leading"] = int(self.leading)
        out["sent"] = self.uploader.sent
        out["duplicates"] = self.uploader.duplicates
        out["dead_letters"] = self.outbox.dead_letters
        return out

    def _run(self) -> None:
        retry_at = 0.0
        while not self._stop.is_set():
            try:
                if not self._lead():
                    retry_at = 0.0   # a new leader sends at once
                    self._wake.wait(self.config.tick_s)
                    self._wake.clear()
                    continue
                self.build_once()
                if time.monotonic() >= retry_at:
                    result = self.uploader.deliver(
                        deadline=time.monotonic() + max(5.0, self.config.rpc_timeout_s))
                    if result is DeliveryResult.RETRY_LATER:
                        delay = self._backoff.next_delay_s()
                        retry_at = time.monotonic() + delay
                        logger.info("forward: upstream %s unavailable (%s); retry in %.1f s",
                                    self.config.upstream, self.uploader.last_error, delay)
                    else:
                        self._backoff.reset()
            except Exception:   # keep forwarding: the data is safe in the database
                logger.exception("forward: tick failed")
            self._wake.wait(self.config.tick_s)
            self._wake.clear()

    def start(self) -> None:
        logger.info("forwarding closed windows to %s as aggregator %s (%s, %s)",
                    self.config.upstream, self.config.upstream_id,
                    "mutual TLS" if self.config.tls else "plaintext",
                    "signed" if self._signer else "unsigned")
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._channel.close()
        self.outbox.close()
