"""Exactly once through crashes: a real `fleetwatch serve` process is killed with SIGKILL in the
middle of an upload storm from 200 agents, twice, and restarted on the same SQLite file and
port; the agents' spools hold whatever was not acknowledged, they retry, and the aggregator's
totals end up equal to what the agents observed, per cohort and per window: nothing lost,
nothing counted twice.

Also here: an acknowledgement lost in a kill (the report was committed, the agent never heard)
is answered DUPLICATE on the retry and leaves the spool; and background agents back off (capped
exponential backoff with jitter, no busy loop) while the aggregator is dead, then deliver
everything once it is back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import WINDOW_S, pick_free_port, push_spec
from delivery_helpers import AggregatorProcess, ReportCalls, check_backoff

from agent import Monitor
from agent.spec import Spec
from aggregator.simulator import SimClock, cohort_key

DEVICES = 200
WINDOWS = 6
KILL_ROUNDS = (1, 3)   # the upload rounds (windows) in which the aggregator is killed
DOWN_S = 0.5           # how long it stays dead before the restart begins
GRACE_S = 2.0
COHORTS = [{"region": r, "hw": h} for r in ("eu", "us", "apac", "latam") for h in ("jetson", "pi")]
SCENES = np.array(["indoor", "outdoor", "night", "fog"], dtype=object)
# gRPC's own reconnect backoff grows to 120 s by default; the Monitor shortens it on the
# channels it makes, and these tests do the same on the channels they share.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


class Observed:
    """What the agents observed, per (cohort, window start), counted by the test."""

    def __init__(self) -> None:
        self.events: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[tuple[str, int]] = collections.Counter()
        self.devices: collections.Counter[tuple[str, int]] = collections.Counter()

    def window(self, ws: int) -> dict[str, tuple[int, int, int, int]]:
        """cohort -> (devices, reports, events, errors) of one window."""
        return {c: (self.devices[c, w], self.devices[c, w], self.events[c, w],
                    self.errors[c, w]) for c, w in self.events if w == ws}


def observe(mon: Monitor, cohort: str, ws: int, rng: np.random.Generator,
            observed: Observed) -> None:
    """A few events (the point is the number of reports, not their size) at the window's
    middle: the caller has set the clock there."""
    n = int(rng.integers(3, 15))
    errors = rng.random(n) < 0.1
    mon.observe_batch({"temp": rng.normal(0.0, 1.2, n), "speed": rng.exponential(20.0, n),
                       "scene": rng.choice(SCENES, n)},
                      predictions=rng.uniform(0.0, 1.0, n),
                      latency_ms=rng.lognormal(3.0, 0.5, n), errors=errors)
    observed.events[cohort, ws] += n
    observed.errors[cohort, ws] += int(np.count_nonzero(errors))
    observed.devices[cohort, ws] += 1


def stored_reports(db: Path) -> list[tuple[str, int, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT device_id, seq, window_start FROM reports "
                            "ORDER BY device_id, seq").fetchall()


@pytest.fixture
def aggregator_process(tmp_path: Path, spec: Spec) -> Iterator[AggregatorProcess]:
    """A real `fleetwatch serve` subprocess on a free port, spec pushed; stopped at teardown."""
    with AggregatorProcess(tmp_path / "aggregator.sqlite", pick_free_port(),
                           tmp_path / "serve.log") as agg:
        push_spec(agg.target, spec)
        yield agg


def kill_mid_storm(agg: AggregatorProcess, calls: ReportCalls, at_acks: int,
                   kills: list[dict[str, int]]) -> None:
    """SIGKILL the aggregator once `at_acks` reports were acknowledged and others are in flight
    (the rest of the round waits in the spools), keep it dead for DOWN_S, then restart it on
    the same DB and port."""
    deadline = time.monotonic() + 20
    while calls.acked < at_acks or calls.in_flight == 0:
        if time.monotonic() > deadline:
            return  # the test fails on the missing kill
        time.sleep(0.0005)
    in_flight = calls.in_flight
    agg.kill()
    kills.append({"acked": calls.acked, "in_flight": in_flight})
    time.sleep(DOWN_S)
    agg.start()


def test_kill_9_during_an_upload_storm_loses_nothing_and_doubles_nothing(
        aggregator_process: AggregatorProcess, spec: Spec, tmp_path: Path, window_base: int,
        cohort_rpc) -> None:
    agg = aggregator_process
    calls = ReportCalls()
    raw = grpc.insecure_channel(agg.target, options=CHANNEL_OPTIONS)
    channel = grpc.intercept_channel(raw, calls)
    clock = SimClock(window_base)
    rng = np.random.default_rng(11)
    observed = Observed()
    cohorts = [cohort_key(COHORTS[i % len(COHORTS)]) for i in range(DEVICES)]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    monitors: list[Monitor] = []
    kills: list[dict[str, int]] = []
    retried = collections.Counter()  # round -> polls that left reports in the spool
    killer: threading.Thread | None = None
    try:
        monitors = list(pool.map(lambda i: Monitor(
            spec.model, spec.model_version, f"dev-{i:03d}", COHORTS[i % len(COHORTS)],
            channel=channel, spool_dir=tmp_path / "spools" / f"dev-{i:03d}", clock=clock,
            background=False, grace_s=GRACE_S, rpc_timeout_s=5.0), range(DEVICES)))
        assert all(m.spec is not None and m.spec.hash == spec.hash for m in monitors)

        pending: list[concurrent.futures.Future[bool]] = []
        for w in range(WINDOWS):
            ws = window_base + w * WINDOW_S
            clock.set(ws + WINDOW_S / 2)  # the previous round's uploads may still run
            for m, cohort in zip(monitors, cohorts, strict=True):
                observe(m, cohort, ws, rng, observed)
            retried[w - 1] += sum(not f.result() for f in pending)
            clock.set(ws + WINDOW_S + GRACE_S + 1.0)  # past the end and the grace: it closes
            if w in KILL_ROUNDS:
                if killer is not None:
                    killer.join()
                # Connected again (gRPC's reconnect backoff may still be running after the
                # last restart): this round's uploads reach the aggregator, and the kill
                # comes in the middle of them.
                grpc.channel_ready_future(raw).result(timeout=30)
                killer = threading.Thread(target=kill_mid_storm,
                                          args=(agg, calls, calls.acked + DEVICES // 2, kills))
                killer.start()
            pending = [pool.submit(m.poll, 5.0) for m in monitors]
        retried[WINDOWS - 1] += sum(not f.result() for f in pending)
        assert killer is not None
        killer.join()

        # The agents keep retrying until every spool is empty.
        left, deadline = monitors, time.monotonic() + 60
        while left and time.monotonic() < deadline:
            delivered = list(pool.map(lambda m: m.poll(5.0), left))
            left = [m for m, ok in zip(left, delivered, strict=True) if not ok]
            if left:
                time.sleep(0.2)
        assert not left, [m.stats() for m in left[:3]]

        # Both kills hit a round with reports acknowledged and others in flight; the reports
        # the kills cut off stayed in the spools and were retried.
        assert len(kills) == len(KILL_ROUNDS), kills
        assert all(k["in_flight"] >= 1 for k in kills), kills
        assert all(retried[w] >= 1 for w in KILL_ROUNDS), retried
        assert agg.starts == 1 + len(KILL_ROUNDS)
        assert calls.failed >= len(KILL_ROUNDS)

        # Exactly what the agents produced, window by window and cohort by cohort ...
        for w in range(WINDOWS):
            ws = window_base + w * WINDOW_S
            got = {cohort_key(h.cohort): (h.devices, h.reports, h.events, h.errors)
                   for h in cohort_rpc(agg.target, ws, ws + WINDOW_S, group_by=("region", "hw"))}
            assert got == observed.window(ws), f"window {w}"
        # ... and in total.
        (total,) = cohort_rpc(agg.target, window_base, window_base + WINDOWS * WINDOW_S)
        assert (total.devices, total.reports, total.events, total.errors) == (
            DEVICES, DEVICES * WINDOWS, sum(observed.events.values()),
            sum(observed.errors.values()))
        for m in monitors:
            stats = m.stats()
            assert (stats.windows_closed, stats.spool.pending, stats.spool.dead_letters,
                    stats.spool.dropped_total, stats.internal_errors) == (WINDOWS, 0, 0, 0, 0)
        # Reports whose commit outran the kill were acknowledged as duplicates on the retry.
        duplicates = sum(m._uploader.duplicates for m in monitors)
        assert sum(m._uploader.sent for m in monitors) + duplicates == DEVICES * WINDOWS
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if killer is not None:
            killer.join()
        for m in monitors:
            m.close(timeout_s=1.0)
        raw.close()
    agg.stop()
    rows = stored_reports(agg.db)
    assert rows == [(f"dev-{i:03d}", s, window_base + (s - 1) * WINDOW_S)
                    for i in range(DEVICES) for s in range(1, WINDOWS + 1)]


def test_ack_lost_in_a_kill_is_answered_duplicate_and_leaves_the_spool(
        aggregator_process: AggregatorProcess, spec: Spec, tmp_path: Path, window_base: int,
        cohort_rpc) -> None:
    """The aggregator commits a report and dies before its ack reaches the agent; the retry
    after the restart is acknowledged as a duplicate, merged once, and empties the spool."""
    agg = aggregator_process
    calls = ReportCalls(lose_ack=agg.kill)
    raw = grpc.insecure_channel(agg.target, options=CHANNEL_OPTIONS)
    clock = SimClock(window_base)
    observed = Observed()
    rng = np.random.default_rng(12)
    mon = Monitor(spec.model, spec.model_version, "dev-lost-ack", {"region": "eu", "hw": "pi"},
                  channel=grpc.intercept_channel(raw, calls), spool_dir=tmp_path / "spool",
                  clock=clock, background=False, grace_s=GRACE_S, rpc_timeout_s=5.0)
    try:
        clock.set(window_base + WINDOW_S / 2)
        observe(mon, "hw=pi,region=eu", window_base, rng, observed)
        clock.set(window_base + WINDOW_S + GRACE_S + 1.0)
        assert mon.poll(timeout_s=5.0) is False  # committed, then the kill took the ack
        assert calls.lost_acks == 1
        assert [p.seq for p in mon.spool.pending()] == [1]
        assert agg.proc is not None and agg.proc.poll() is not None  # dead
        assert [s for _, s, _ in stored_reports(agg.db)] == [1]  # yet the report is in

        agg.start()
        deadline = time.monotonic() + 30
        while not mon.poll(timeout_s=5.0):
            assert time.monotonic() < deadline, mon.stats()
            time.sleep(0.1)
        assert mon.stats().spool.pending == 0
        assert (mon._uploader.sent, mon._uploader.duplicates) == (0, 1)
        (h,) = cohort_rpc(agg.target, window_base, window_base + WINDOW_S)
        assert (h.reports, h.events, h.errors) == observed.window(window_base)[
            "hw=pi,region=eu"][1:]
    finally:
        mon.close(timeout_s=1.0)
        raw.close()


def test_background_agents_back_off_while_the_aggregator_is_dead(
        aggregator_process: AggregatorProcess, spec: Spec, tmp_path: Path, window_base: int,
        cohort_rpc) -> None:
    """kill -9, then background agents retry with capped exponential backoff and jitter (the
    gaps between their Report attempts), without burning CPU; after the restart they deliver
    everything, once."""
    agg = aggregator_process
    base_s, cap_s, down_s = 0.05, 0.8, 4.0
    clock = SimClock(window_base)
    observed = Observed()
    rng = np.random.default_rng(13)
    fleet: list[tuple[Monitor, ReportCalls, grpc.Channel]] = []
    try:
        for i in range(4):
            calls = ReportCalls()
            raw = grpc.insecure_channel(agg.target, options=[
                ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 800)])
            fleet.append((Monitor(spec.model, spec.model_version, f"dev-bg-{i}",
                                  {"region": "eu", "hw": "jetson"},
                                  channel=grpc.intercept_channel(raw, calls),
                                  spool_dir=tmp_path / f"spool-{i}", clock=clock,
                                  grace_s=GRACE_S, backoff_base_s=base_s, backoff_cap_s=cap_s,
                                  tick_s=0.05), calls, raw))
        agg.kill()
        windows = 3
        for w in range(windows):
            ws = window_base + w * WINDOW_S
            clock.set(ws + WINDOW_S / 2)
            for mon, _, _ in fleet:
                observe(mon, "hw=jetson,region=eu", ws, rng, observed)
        clock.set(window_base + windows * WINDOW_S + GRACE_S + 1.0)
        cpu, t0 = time.process_time(), time.monotonic()
        time.sleep(down_s)
        cpu, elapsed = time.process_time() - cpu, time.monotonic() - t0
        assert all(m.stats().spool.pending == windows for m, _, _ in fleet)
        # Attempts against elapsed time: a few quick ones, then about one per cap / 2 (a
        # fixed tick would make elapsed / tick_s = 80 of them, a busy loop thousands).
        attempts = [len(c.started) for _, c, _ in fleet]
        assert all(3 <= a <= 5 + 2 * elapsed / (cap_s / 2) for a in attempts), attempts
        check_backoff([c.started for _, c, _ in fleet], base_s, cap_s)
        assert cpu < 0.3 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.1f} s while retrying"

        agg.start()
        restarted = time.monotonic()
        while any(m.stats().spool.pending for m, _, _ in fleet):
            # Back within about one capped delay plus a reconnect, not a minute later.
            assert time.monotonic() - restarted < 10, [m.stats() for m, _, _ in fleet]
            time.sleep(0.05)
        (h,) = cohort_rpc(agg.target, window_base, window_base + windows * WINDOW_S)
        assert (h.devices, h.reports, h.events, h.errors) == (
            len(fleet), len(fleet) * windows, sum(observed.events.values()),
            sum(observed.errors.values()))
    finally:
        for mon, _, raw in fleet:
            mon.close(timeout_s=1.0)
            raw.close()
