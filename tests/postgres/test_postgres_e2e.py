"""End to end on PostgreSQL: two `fleetwatch serve --db postgresql://...` processes (replicas)
on one database, real agents (`agent.Monitor`) reporting over gRPC, half of them to each; then
every stored envelope is sent again to the other replica (the same report through both: merged
once) and to a `fleetwatch serve --db FILE.sqlite` process, and `fleetwatch health --json` must
read the same from all three: counts, histograms and drift exactly, latency quantiles at the
right ranks of the raw latencies (within the KLL sketch's rank error).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest

from agent import Monitor
from aggregator.simulator import SimClock
from protos import fleetwatch_pb2 as pb

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
sys.path.insert(0, str(INTEGRATION))   # the e2e tests' process helper, shared
from delivery_helpers import REPO, AggregatorProcess  # noqa: E402


def _integration_conftest() -> Any:
    """The integration tests' spec and RPC helpers (their conftest, loaded under its own name:
    this directory has a conftest module of its own)."""
    spec = importlib.util.spec_from_file_location("integration_conftest",
                                                  INTEGRATION / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IT = _integration_conftest()
# Made once: the reference latency sketch (KLL compaction is randomized) is part of its hash.
SPEC = IT.make_spec()
WINDOW_S = IT.WINDOW_S
DEVICES = 24
WINDOWS = 4
COHORTS = [{"region": r, "hw": h} for r in ("eu", "us", "apac") for h in ("jetson", "pi")]
SCENES = np.array(["indoor", "outdoor", "night", "fog"], dtype=object)
RANK_TOLERANCE = 0.035   # KLL k=200: ~1.33% per rank; two merges and slack
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


@pytest.fixture
def servers(tmp_path: Path, pg_dsn: str) -> Iterator[list[AggregatorProcess]]:
    """Two replicas on the test database and one SQLite aggregator, spec pushed to each."""
    procs = [AggregatorProcess(pg_dsn, IT.pick_free_port(), tmp_path / f"pg{i}.log")  # type: ignore[arg-type]
             for i in range(2)]
    procs.append(AggregatorProcess(tmp_path / "a.sqlite", IT.pick_free_port(),
                                   tmp_path / "lite.log"))
    try:
        for p in procs:
            p.start()
            IT.push_spec(p.target, SPEC)
        yield procs
    finally:
        for p in procs:
            try:
                p.stop()
            finally:
                p.kill()


def health(target: str, end: int) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "health", "--aggregator", target, "--model",
         "detector", "--by", "region", "--by", "hw", "--until", str(end), "--since",
         f"{WINDOWS * WINDOW_S}s", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def without_latency(cohorts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in cohorts:
        c = dict(c)
        c["latency_ms"] = {k: v for k, v in c["latency_ms"].items()
                           if k not in ("p50", "p95", "p99")}
        out.append(c)
    return out


def test_replicas_on_postgres_answer_as_sqlite(servers: list[AggregatorProcess],
                                               tmp_path: Path, pg_dsn: str) -> None:
    spec = SPEC
    base = int(time.time()) // WINDOW_S * WINDOW_S - 20 * WINDOW_S
    end = base + WINDOWS * WINDOW_S
    clock = SimClock(base)
    rng = np.random.default_rng(5)
    channels = [grpc.insecure_channel(p.target, options=CHANNEL_OPTIONS) for p in servers]
    latencies: collections.defaultdict[tuple[str, str], list[float]] = \
        collections.defaultdict(list)
    events: collections.Counter[tuple[str, str]] = collections.Counter()
    monitors: list[Monitor] = []
    try:
        for i in range(DEVICES):
            monitors.append(Monitor(
                spec.model, spec.model_version, f"dev-{i:03d}", COHORTS[i % len(COHORTS)],
                channel=channels[i % 2], spool_dir=tmp_path / "spools" / f"{i:03d}",
                clock=clock, background=False, grace_s=2.0, rpc_timeout_s=10.0))
        assert all(m.spec is not None and m.spec.hash == spec.hash for m in monitors)
        for w in range(WINDOWS):
            ws = base + w * WINDOW_S
            clock.set(ws + WINDOW_S / 2)
            for i, m in enumerate(monitors):
                if (i + w) % 7 == 0:
                    continue   # an idle window: a heartbeat
                n = int(rng.integers(5, 40))
                lat = rng.lognormal(3.0 + 0.3 * (i % 2), 0.5, n)
                m.observe_batch({"temp": rng.normal(0.2 * (i % 3), 1.0, n),
                                 "speed": rng.exponential(20.0, n),
                                 "scene": rng.choice(SCENES, n)},
                                predictions=rng.uniform(0.0, 1.0, n), latency_ms=lat,
                                errors=rng.random(n) < 0.05)
                key = (COHORTS[i % len(COHORTS)]["region"], COHORTS[i % len(COHORTS)]["hw"])
                latencies[key] += list(lat)
                events[key] += n
            clock.set(ws + WINDOW_S + 3.0)
            assert all(m.poll(10.0) for m in monitors)
        for m in monitors:
            stats = m.stats()
            assert (stats.spool.pending, stats.spool.dead_letters) == (0, 0)
    finally:
        for m in monitors:
            m.close(timeout_s=1.0)

    with psycopg.connect(pg_dsn) as conn:
        stored = conn.execute("SELECT device_id, seq, envelope FROM reports "
                              "ORDER BY device_id, seq").fetchall()
    assert len(stored) == DEVICES * WINDOWS
    statuses: collections.Counter[tuple[int, int]] = collections.Counter()
    for device_id, _, envelope in stored:
        i = int(device_id.split("-")[1])
        for k, target in enumerate((1 - i % 2, i % 2, 2)):   # other replica, own, SQLite
            call = channels[target].unary_unary(
                IT.REPORT_METHOD, request_serializer=lambda b: b,
                response_deserializer=pb.ReportResponse.FromString)
            statuses[k, call(bytes(envelope), timeout=10).status] += 1
    for c in channels:
        c.close()
    n = len(stored)
    # The other replica and the one it came through: duplicates; SQLite: new.
    assert statuses == {(0, pb.ReportResponse.DUPLICATE): n, (1, pb.ReportResponse.DUPLICATE): n,
                        (2, pb.ReportResponse.ACCEPTED): n}

    answers = [health(p.target, end) for p in servers]
    assert len(answers[0]) == len(COHORTS)
    assert without_latency(answers[0]) == without_latency(answers[1]) == \
        without_latency(answers[2])
    for cohort in answers[0]:
        key = (cohort["cohort"]["region"], cohort["cohort"]["hw"])
        assert cohort["events"] == events[key]
        assert cohort["devices"] == DEVICES // len(COHORTS)
        assert cohort["reports"] == WINDOWS * DEVICES // len(COHORTS)
    # Latency: each server's quantiles sit at the right ranks of the raw latencies.
    for answer in answers:
        for cohort in answer:
            key = (cohort["cohort"]["region"], cohort["cohort"]["hw"])
            raw = np.sort(np.asarray(latencies[key], dtype=np.float32))
            for q in (50, 95, 99):
                rank = np.searchsorted(raw, np.float32(cohort["latency_ms"][f"p{q}"]),
                                       side="right") / raw.size
                assert abs(rank - q / 100) <= max(RANK_TOLERANCE, 1 / raw.size), \
                    (key, q, rank)
