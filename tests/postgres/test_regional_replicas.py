"""A region of two replicas on one PostgreSQL database forwarding to a central, exactly once.

Real processes: two `fleetwatch serve --db postgresql://... --upstream CENTRAL` replicas of one
region (same `--upstream-id`), a central `fleetwatch serve` on SQLite. A simulated fleet
(test_regional.py's: real Monitors, DP noise, labels) reports to a single in-process
aggregator first; the very same envelopes are then spread over the two replicas by device
(a quarter of the devices send every report to both at once). Halfway through, once the
central has taken forwarded reports, the replica holding the "forward" lease (found in
pg_locks of this test's database) is killed with SIGKILL; its devices fail over to the other
replica and resend their last reports (lost acknowledgements). The survivor takes the lease,
continues from the outbox rows in the database and drains.

Checked: the central's cohort health and privacy answers equal the single aggregator's
(test_regional.py's comparison: exact for counts, histograms, devices, privacy; 1e-9 for
floats; latency quantiles within the KLL rank error of the true latencies); the central took
the region's reports under seqs 1..N, each once; the contributions of everything it accepted
add up, per device, to the number of distinct reports that device sent. And, apart, two
outboxes building concurrently on one database never allocate a seq twice or forward a
pending report twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest

from agent.errors import ConfigError
from agent.spec import Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator.forward import FORWARD_LEASE, ForwardConfig, Forwarder
from aggregator.forward_pg import PostgresForwardOutbox
from aggregator.server import AggregatorConfig, serve
from aggregator.simulator import (
    LATENCY_COLUMN,
    PREDICTION_COLUMN,
    reference_columns,
    run_fleet,
)
from aggregator.store.base import IngestOutcome
from aggregator.store.postgres import PostgresStore
from aggregator.validate import validate_report
from protos import fleetwatch_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
_INTEGRATION = REPO / "tests" / "integration"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _as_modules(**modules: ModuleType) -> Iterator[None]:
    """test_regional.py imports `conftest` and `delivery_helpers` by their plain names (the
    integration directory's); give it those while it loads, then put back what was there."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


_conftest = _load("fleetwatch_integration_conftest", _INTEGRATION / "conftest.py")
_delivery = _load("fleetwatch_delivery_helpers", _INTEGRATION / "delivery_helpers.py")
with _as_modules(conftest=_conftest, delivery_helpers=_delivery):
    _regional = _load("fleetwatch_regional_helpers", _INTEGRATION / "test_regional.py")
AggregatorProcess = _delivery.AggregatorProcess
Process = Any   # AggregatorProcess (loaded above, so not importable for annotations)
pick_free_port = _conftest.pick_free_port
FLEET, MINUTE_S = _regional.FLEET, _regional.MINUTE_S
health = _regional.health
push, send, stats = _regional.push, _regional.send, _regional.stats

REGION_ID = "region-r"
IDLE_S = "1"


def forwarding_replica(dsn: str, replicas: list[Process], timeout_s: float = 15.0
                       ) -> Process:
    """The replica whose process holds the "forward" lease's session."""
    return _delivery.lease_holder(dsn, FORWARD_LEASE, replicas, timeout_s)


def device_of(envelope: bytes) -> str:
    return pb.WindowReport.FromString(pb.ReportEnvelope.FromString(envelope).report).device_id


def feed(replicas: list[Process], dsn: str, envelopes: list[bytes], central: str) -> dict:
    """Device i reports to replica i % 2; devices with i % 4 == 0 send each report to both
    at once. Halfway, once the central has taken forwarded reports, kill -9 the forwarding
    replica; its devices go to the survivor and resend their last 3 reports."""
    devices = sorted({device_of(e) for e in envelopes})
    index = {d: i for i, d in enumerate(devices)}
    channels = [grpc.insecure_channel(r.target) for r in replicas]
    alive = [True, True]
    sent_to: dict[int, list[bytes]] = {0: [], 1: []}
    out = {"accepted": 0, "duplicate": 0, "killed": None, "both": 0}
    pool = concurrent.futures.ThreadPoolExecutor(2)

    def tally(status: int) -> None:
        out["accepted" if status == pb.ReportResponse.ACCEPTED else "duplicate"] += 1

    try:
        for n, envelope in enumerate(envelopes):
            i = index[device_of(envelope)]
            home = i % 2 if alive[i % 2] else 1 - i % 2
            if i % 4 == 0 and all(alive):
                both = [pool.submit(send, channels[k], envelope) for k in (0, 1)]
                statuses = sorted(f.result() for f in both)
                # Merged once: one replica accepted it, the other found it stored.
                assert statuses == sorted([pb.ReportResponse.ACCEPTED,
                                           pb.ReportResponse.DUPLICATE]), statuses
                out["both"] += 1
                tally(pb.ReportResponse.ACCEPTED)
                tally(pb.ReportResponse.DUPLICATE)
            else:
                tally(send(channels[home], envelope))
            sent_to[home].append(envelope)
            if n == len(envelopes) // 2:
                deadline = time.monotonic() + 30
                while stats(central).accepted == 0:   # forwarding is under way
                    assert time.monotonic() < deadline, "nothing forwarded before the kill"
                    time.sleep(0.1)
                out["central_at_kill"] = stats(central).accepted
                victim = forwarding_replica(dsn, replicas)
                k = replicas.index(victim)
                victim.kill()
                alive[k] = False
                out["killed"] = k
                for again in sent_to[k][-3:]:   # their acknowledgements were "lost"
                    assert send(channels[1 - k], again) == pb.ReportResponse.DUPLICATE
                    out["duplicate"] += 1
    finally:
        pool.shutdown()
        for channel in channels:
            channel.close()
    return out


def test_two_replicas_forward_each_report_once_across_a_kill_of_the_forwarder(
        pg_dsn: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    spec = _regional.demo_spec()
    end = int(time.time()) // MINUTE_S * MINUTE_S
    start = end - FLEET.minutes * MINUTE_S
    central = AggregatorProcess(tmp_path / "central.sqlite", pick_free_port(),
                                tmp_path / "central.log")
    replicas = [AggregatorProcess(pg_dsn, pick_free_port(), tmp_path / f"replica-{k}.log",
                                  args=("--upstream", central.target, "--upstream-id",
                                        REGION_ID, "--forward-idle-s", IDLE_S))
                for k in range(2)]
    with serve(AggregatorConfig(db=tmp_path / "single.sqlite", listen="127.0.0.1:0",
                                workers=4)) as single:
        try:
            central.start()
            push(central.target, spec)
            for r in replicas:
                r.start()
            push(replicas[0].target, spec)   # one database: both replicas know it now
            push(single.target, spec)
            truth = run_fleet(FLEET, single.target, tmp_path / "spools", start)
            with single.store._readers.borrow() as db:  # type: ignore[attr-defined]
                rows = db.execute("SELECT envelope, device_id FROM reports "
                                  "ORDER BY received_ms, device_id, seq").fetchall()
            envelopes = [bytes(e) for e, _ in rows]
            per_device = Counter(d for _, d in rows)
            fed = feed(replicas, pg_dsn, envelopes, central.target)
            survivor = replicas[1 - fed["killed"]]
            assert forwarding_replica(pg_dsn, replicas) is survivor   # the lease moved
            drained = _regional.wait_drained({"survivor": survivor}, timeout_s=60)["survivor"]
            assert drained["leading"] == 1 and drained["sent"] > 0, drained
            assert drained["dead_letters"] == 0 and drained["dead_letter_rows"] == 0, drained
            assert fed["both"] > 0 and fed["duplicate"] >= fed["both"] + 3, fed
            assert fed["accepted"] == len(envelopes), fed
            # Both replicas forwarded: the killed one before, the survivor after.
            assert 0 < fed["central_at_kill"] < stats(central.target).accepted, fed

            # The central's answers equal the single aggregator's.
            _regional.assert_same_health(central.target, single.target, truth, start, end,
                                         ((start, end), (start + 2 * MINUTE_S, end - MINUTE_S)))
            _regional.assert_same_privacy(central.target, single.target, start, end)
            fleet = health(central.target, start, end)[0]
            assert fleet.reports == len(envelopes) and fleet.devices == FLEET.devices

            # Nothing doubled or lost: seqs 1..N each once, contributions = distinct reports.
            central_stats = stats(central.target)
            assert not central_stats.rejected, dict(central_stats.rejected)
            with contextlib.closing(sqlite3.connect(tmp_path / "central.sqlite")) as db:
                stored = db.execute("SELECT device_id, seq, envelope FROM reports").fetchall()
            assert {d for d, _, _ in stored} == {REGION_ID}
            seqs = sorted(s for _, s, _ in stored)
            assert seqs == list(range(1, len(seqs) + 1)), seqs
            assert central_stats.accepted == len(seqs) < len(envelopes) // 3
            contributed: Counter[str] = Counter()
            for _, _, envelope in stored:
                report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(envelope).report)
                for c in report.contributions:
                    contributed[c.device_id] += c.reports
            assert contributed == per_device
        finally:
            for proc in (*replicas, central):
                proc.kill()
    assert time.monotonic() - t0 < 60, "over the 60 s budget"


def test_two_outboxes_building_at_once_allocate_each_seq_once_and_each_report_once(
        pg_dsn: str) -> None:
    """Two replicas' outboxes race to build the same pending groups: the counter row lock
    serializes them, so the seqs are 1..N without a gap or a repeat and every pending report
    lands in exactly one outbox row."""
    spec = _regional.demo_spec()
    store = PostgresStore(pg_dsn, forwarding=True)
    outboxes = [PostgresForwardOutbox(pg_dsn) for _ in range(2)]
    try:
        store.put_spec(spec)
        _ingest(store, spec, devices=30, windows=4)
        assert outboxes[0].counts()["pending"] == 120
        groups = [(h, lid, ws) for h, lid, ws, _ in outboxes[0].open_groups()]
        barrier = threading.Barrier(2)

        def build(k: int) -> int:
            barrier.wait()
            total = 0
            for g in (groups if k == 0 else groups[::-1]):   # opposite orders
                total += outboxes[k].build([g], lambda h: spec, REGION_ID, None, 7)
            return total

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            built = sum(pool.map(build, (0, 1)))
        rows = outboxes[1].pending(limit=1000)
        assert [r.seq for r in rows] == list(range(1, built + 1))
        assert outboxes[0].counts() == {"pending": 0, "outbox": built, "dead_letter_rows": 0}
        seen: Counter[tuple[str, int]] = Counter()
        for r in rows:
            report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(r.payload).report)
            assert report.seq == r.seq and report.device_id == REGION_ID
            for c in report.contributions:
                seen[(c.device_id, report.window_start_unix_s)] += c.reports
        assert len(seen) == 120 and set(seen.values()) == {1}   # each report exactly once
        assert built == 4 * 5   # 30 devices a window in chunks of at most 7
    finally:
        for o in outboxes:
            o.close()
        store.close()


def test_the_watermark_of_a_replica_sees_the_reports_other_replicas_took(pg_dsn: str) -> None:
    """A Forwarder on a PostgreSQL store closes windows in event time from the database's
    sender activity: here every report went through another store (another replica), none
    through this Forwarder's `on_accepted`, and the idle rule is far away."""
    spec = _regional.demo_spec()
    other = PostgresStore(pg_dsn, forwarding=True)
    mine = PostgresStore(pg_dsn, forwarding=True)
    forwarder = Forwarder(pg_dsn, ForwardConfig(upstream="127.0.0.1:1", upstream_id=REGION_ID,
                                                idle_s=600.0),
                          lambda h: spec if h == spec.hash else None, store=mine)
    try:
        other.put_spec(spec)
        _ingest(other, spec, devices=5, windows=4)
        starts = sorted({ws for _, _, ws, _ in forwarder.outbox.open_groups()})
        assert len(starts) == 4
        # Every active sender has reported window 3: windows 0-2 are closed, 3 is not.
        assert sorted(ws for _, _, ws in forwarder.closed_groups()) == starts[:3]
        assert forwarder._lead() and forwarder.build_once() == 3
        assert forwarder.stats()["leading"] == 1 and forwarder.stats()["pending"] == 5
        # The lease is this store's session's: another store cannot take it meanwhile.
        assert mine.try_lead(FORWARD_LEASE) and not other.try_lead(FORWARD_LEASE)
        # A replica configured with another upstream identity is refused before it starts.
        with pytest.raises(ConfigError, match="forwards as 'region-r'"):
            Forwarder(pg_dsn, ForwardConfig(upstream="127.0.0.1:1", upstream_id="region-q"),
                      lambda h: spec, store=other)
    finally:
        forwarder.close()
        mine.close()
        other.close()


def _ingest(store: PostgresStore, spec: Spec, devices: int, windows: int) -> None:
    """Real validated device reports (a few events each) straight into the store."""
    cols = reference_columns(50, 3)
    base = int(time.time()) // spec.window_length_s * spec.window_length_s - 10 * 60
    for d in range(devices):
        for w in range(windows):
            ws = base + w * spec.window_length_s
            acc = WindowAccumulator(spec, ws)
            n = 10 + d
            acc.observe_batch({f.name: cols[f.name][:n] for f in spec.features},
                              cols[PREDICTION_COLUMN][:n], cols[LATENCY_COLUMN][:n],
                              np.zeros(n, bool), n)
            meta = ReportMeta(f"dev-{d:02d}", spec.model, spec.model_version, {"region": "r"},
                              ws, spec.window_length_s, w + 1, spec.hash,
                              int(time.time() * 1000), "t")
            msg = report_to_proto(meta, acc.to_summary())
            meta, summary = validate_report(msg, spec)
            envelope = pb.ReportEnvelope(report=msg.SerializeToString()).SerializeToString()
            outcome = store.ingest(meta, envelope, summary, (spec.window_length_s,))
            assert outcome is IngestOutcome.ACCEPTED
