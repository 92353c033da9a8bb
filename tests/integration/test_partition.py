"""Partitions: the aggregator is unreachable for a simulated hour of 1-minute windows while the
agents keep observing; when it is back, every window arrives in its own time bucket. A spool
big enough for the hour keeps everything; spools too small for it (by count and by bytes) stay
within their bound by dropping the oldest reports first, and the drop count reaches the
aggregator. Background agents back off (capped exponential backoff with jitter) against a port
nobody listens on, and deliver once an aggregator appears there.
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
from conftest import WINDOW_S
from delivery_helpers import ReportCalls, check_backoff

from agent import Monitor
from agent.spec import Spec
from aggregator.simulator import SimClock

HOUR_WINDOWS = 60
GRACE_S = 2.0
SCENES = np.array(["indoor", "outdoor", "night", "fog"], dtype=object)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50),
                   ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 800)]


def hour_base() -> int:
    """An hour-aligned start three hours ago: the outage's hour is one hourly rollup bucket."""
    return int(time.time()) // 3600 * 3600 - 3 * 3600


def observe(mon: Monitor, ws: int, rng: np.random.Generator) -> tuple[int, int]:
    """Events at the window's middle (the caller set the clock there); (events, errors)."""
    n = int(rng.integers(10, 40))
    errors = rng.random(n) < 0.1
    mon.observe_batch({"temp": rng.normal(0.0, 1.2, n), "speed": rng.exponential(20.0, n),
                       "scene": rng.choice(SCENES, n)},
                      predictions=rng.uniform(0.0, 1.0, n),
                      latency_ms=rng.lognormal(3.0, 0.5, n), errors=errors)
    return n, int(np.count_nonzero(errors))


def stored(db: Path) -> dict[str, list[tuple[int, int]]]:
    """device -> [(seq, window_start)] in the aggregator's raw store."""
    out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for device, seq, ws in conn.execute("SELECT device_id, seq, window_start FROM reports "
                                            "ORDER BY device_id, seq"):
            out[device].append((seq, ws))
    return out


def test_an_hour_cut_off_arrives_in_its_own_windows(start_aggregator, spec: Spec, tmp_path: Path,
                                                     free_port: int, cohort_rpc) -> None:
    db = tmp_path / "aggregator.sqlite"
    base = hour_base()
    clock = SimClock(base)
    rng = np.random.default_rng(21)
    calls = ReportCalls()
    raw = grpc.insecure_channel(f"127.0.0.1:{free_port}", options=CHANNEL_OPTIONS)
    channel = grpc.intercept_channel(raw, calls)
    # unit -> spool bounds: one roomy enough for the hour, one too small by count, one by bytes.
    bounds = {"roomy": {"max_spool_reports": HOUR_WINDOWS + 20},
              "count": {"max_spool_reports": 20},
              "bytes": {"max_spool_bytes": 16 << 10}}
    fleet: dict[str, Monitor] = {}
    truth: dict[tuple[str, int], tuple[int, int]] = {}  # (unit, window) -> (events, errors)
    try:
        with start_aggregator(db, port=free_port):
            for unit, kw in bounds.items():
                fleet[unit] = Monitor(spec.model, spec.model_version, f"dev-{unit}",
                                      {"region": "eu", "unit": unit}, channel=channel,
                                      spool_dir=tmp_path / unit, clock=clock, background=False,
                                      grace_s=GRACE_S, rpc_timeout_s=5.0,
                                      **kw)  # type: ignore[arg-type]
            assert all(m.spec is not None and m.spec.hash == spec.hash for m in fleet.values())

        # The hour without an aggregator: every window closes into the spool, none leaves.
        polls = 0
        for w in range(HOUR_WINDOWS):
            ws = base + w * WINDOW_S
            clock.set(ws + WINDOW_S / 2)
            for unit, m in fleet.items():
                truth[unit, ws] = observe(m, ws, rng)
            clock.set(ws + WINDOW_S + GRACE_S + 1.0)
            for m in fleet.values():
                assert m.poll(timeout_s=2.0) is False
                polls += 1
                s = m.stats().spool
                assert s.pending <= m.spool.max_reports and s.pending_bytes <= m.spool.max_bytes
                # The oldest go first: what is left is the newest run of windows.
                assert [p.seq for p in m.spool.pending()] == list(
                    range(w + 2 - s.pending, w + 2))
                assert s.dropped_total == w + 1 - s.pending
        # One attempt per delivery round, failing fast: no spinning inside a round.
        assert (calls.failed, calls.acked) == (polls, 0)
        spools = {unit: m.stats().spool for unit, m in fleet.items()}
        assert spools["roomy"].pending == HOUR_WINDOWS and spools["roomy"].dropped_total == 0
        assert spools["count"].pending == 20 and spools["count"].dropped_total == 40
        assert 0 < spools["bytes"].pending < HOUR_WINDOWS and spools["bytes"].dropped_total > 0
        survivors = {unit: {p.window_start for p in m.spool.pending()}
                     for unit, m in fleet.items()}

        with start_aggregator(db, port=free_port, push=False) as agg:
            deadline = time.monotonic() + 30
            while not all([m.poll(timeout_s=5.0) for m in fleet.values()]):
                assert time.monotonic() < deadline, [m.stats() for m in fleet.values()]
                time.sleep(0.1)
            # One more window: its report carries the drops that the last drop left unreported.
            ws = base + HOUR_WINDOWS * WINDOW_S
            clock.set(ws + WINDOW_S / 2)
            for unit, m in fleet.items():
                truth[unit, ws] = observe(m, ws, rng)
                survivors[unit].add(ws)
            clock.set(ws + WINDOW_S + GRACE_S + 1.0)
            assert all([m.poll(timeout_s=5.0) for m in fleet.values()])

            # Every window in its own bucket: health per window is what was observed in it.
            for w in range(HOUR_WINDOWS + 1):
                ws = base + w * WINDOW_S
                got = {h.cohort["unit"]: (h.reports, h.events, h.errors) for h in
                       cohort_rpc(agg.target, ws, ws + WINDOW_S, group_by=("unit",))}
                want = {unit: (1, *truth[unit, ws]) for unit in fleet if ws in survivors[unit]}
                assert got == want, f"window {w}"
            # The hour as a whole (its hourly rollup) holds the same, and every drop is known.
            end = base + (HOUR_WINDOWS + 1) * WINDOW_S
            for h in cohort_rpc(agg.target, base, end, group_by=("unit",)):
                unit = h.cohort["unit"]
                kept = [truth[unit, ws] for ws in sorted(survivors[unit])]
                assert (h.reports, h.events, h.errors) == (
                    len(kept), sum(e for e, _ in kept), sum(r for _, r in kept)), unit
                assert h.spool_dropped == fleet[unit].stats().spool.dropped_total, unit
            (hour,) = cohort_rpc(agg.target, base, base + 3600)
            assert hour.events == sum(truth[u, ws][0] for u in fleet for ws in survivors[u]
                                      if ws < base + 3600)
            assert agg.ingestor.duplicates == 0
        rows = stored(db)
        for unit in fleet:
            assert [ws for _, ws in rows[f"dev-{unit}"]] == sorted(survivors[unit])
            assert all(ws == base + (seq - 1) * WINDOW_S for seq, ws in rows[f"dev-{unit}"])
    finally:
        for m in fleet.values():
            m.close(timeout_s=1.0)
        raw.close()


def test_agents_back_off_against_a_port_nobody_listens_on(start_aggregator, spec: Spec,
                                                          tmp_path: Path, free_port: int,
                                                          cohort_rpc) -> None:
    base_s, cap_s, down_s = 0.05, 0.8, 4.0
    base = hour_base()
    clock = SimClock(base)
    rng = np.random.default_rng(22)
    fleet: list[tuple[Monitor, ReportCalls, grpc.Channel]] = []
    events = errors = 0
    windows = 3
    try:
        for i in range(3):
            calls = ReportCalls()
            raw = grpc.insecure_channel(f"127.0.0.1:{free_port}", options=CHANNEL_OPTIONS)
            fleet.append((Monitor(spec.model, spec.model_version, f"dev-p{i}", {"region": "eu"},
                                  channel=grpc.intercept_channel(raw, calls),
                                  spool_dir=tmp_path / f"spool-{i}", clock=clock, spec=spec,
                                  grace_s=GRACE_S, backoff_base_s=base_s, backoff_cap_s=cap_s,
                                  tick_s=0.05), calls, raw))
        for w in range(windows):
            ws = base + w * WINDOW_S
            clock.set(ws + WINDOW_S / 2)
            for mon, _, _ in fleet:
                e, r = observe(mon, ws, rng)
                events, errors = events + e, errors + r
        clock.set(base + windows * WINDOW_S + GRACE_S + 1.0)
        cpu, t0 = time.process_time(), time.monotonic()
        time.sleep(down_s)
        cpu, elapsed = time.process_time() - cpu, time.monotonic() - t0
        assert all(m.stats().spool.pending == windows for m, _, _ in fleet)
        assert all("UNAVAILABLE" in (m.stats().last_delivery_error or "") for m, _, _ in fleet)
        attempts = [len(c.started) for _, c, _ in fleet]
        assert all(3 <= a <= 5 + 2 * elapsed / (cap_s / 2) for a in attempts), attempts
        check_backoff([c.started for _, c, _ in fleet], base_s, cap_s)
        assert cpu < 0.3 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.1f} s while retrying"

        with start_aggregator(tmp_path / "aggregator.sqlite", port=free_port) as agg:
            restarted = time.monotonic()
            while any(m.stats().spool.pending for m, _, _ in fleet):
                assert time.monotonic() - restarted < 10, [m.stats() for m, _, _ in fleet]
                time.sleep(0.05)
            (h,) = cohort_rpc(agg.target, base, base + windows * WINDOW_S)
            assert (h.devices, h.reports, h.events, h.errors) == (
                len(fleet), len(fleet) * windows, events, errors)
    finally:
        for mon, _, raw in fleet:
            mon.close(timeout_s=1.0)
            raw.close()
