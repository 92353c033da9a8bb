"""Two `fleetwatch serve` replicas on one PostgreSQL database, the alert leader killed mid-run.

Real processes on free loopback ports with `--rules` (a p95 latency rule by region) and
`--webhook` to an HTTP receiver in this test; real agents (`Monitor`, spools, simulated clock)
spread over both replicas: each device's channel lists both replicas (gRPC pick_first), its
own first, so when its replica dies it fails over to the other and retries what was not
acknowledged. A quarter of the devices also send every report to the other replica at the
same time (cross-replica dedup). Region eu has a latency incident in windows 1-3, so the rule
(for = 2m) fires at the end of window 2 and resolves at the end of window 4. The replica that
holds the alert lease (found through `pg_locks`), or in the second run the other one, is
killed with SIGKILL in the middle of the uploads of window 4, after the leader notified the
firing; the survivor takes (or keeps) the lease, continues after the last saved window and
sends the resolution. At the end the killed replica is started again (as a follower) and both
are asked the same questions; `/metrics` shows which replica leads and that only it evaluated.

Checked against the ground truth the test kept: per cohort and window, devices, reports,
events and errors exactly; `fleetwatch health --json` equal from either replica (exact for
counts, histograms, drift, error rate, devices), latency quantiles within twice the KLL
sketch's normalized rank error of the exact quantiles of the latencies sent: datasketches'
KLL merge is randomized, so two merges of the same rows (the two replicas' queries) may differ
in the last compaction, but not beyond that bound. Every stored (device, seq) exactly once.
One firing and one resolved transition in the history, one firing and one resolved
notification at the receiver, ListAlerts equal from both replicas.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import Monitor
from aggregator.simulator import SimClock, cohort_key
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    """The integration tests' helpers, under names of their own (both directories have a
    conftest.py, so a plain import could find the wrong one)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_integration = REPO / "tests" / "integration"
_conftest = _load("fleetwatch_integration_conftest", _integration / "conftest.py")
_delivery = _load("fleetwatch_delivery_helpers", _integration / "delivery_helpers.py")
_alerts_e2e = _load("fleetwatch_alerts_e2e", _integration / "test_alerts_e2e.py")
make_spec, pick_free_port, push_spec = (_conftest.make_spec, _conftest.pick_free_port,
                                        _conftest.push_spec)
ReportCalls, Receiver = _delivery.ReportCalls, _alerts_e2e.Receiver

W = _conftest.WINDOW_S
DEVICES = 40
WINDOWS = 7
INCIDENT = range(1, 4)          # windows with region=eu's latency incident
KILL_ROUND = 4                  # the leader dies during the uploads of this window
GRACE_S = 2.0
IDLE_FLUSH_S = 3.0
COHORTS = [{"region": r, "hw": h} for r in ("eu", "us") for h in ("jetson", "pi")]
SCENES = np.array(["indoor", "outdoor", "night"], dtype=object)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]
RULES = """\
[[rule]]
name = "latency-p95"
metric = "latency_p95_ms"
op = ">"
threshold = 200
clear = 180
for = "2m"
by = ["region"]
severity = "page"
"""
STARTUP_TIMEOUT_S = 30.0


class Replica:
    """`fleetwatch serve --db DSN --rules --webhook` as a subprocess; `kill()` is kill -9."""

    def __init__(self, name: str, dsn: str, rules: Path, webhook: str, log: Path) -> None:
        self.name, self.dsn, self.rules, self.webhook, self.log = name, dsn, rules, webhook, log
        self.port, self.http_port = pick_free_port(), pick_free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aggregator.cli", "-v", "serve", "--db", self.dsn,
                 "--listen", self.target, "--rules", str(self.rules), "--webhook",
                 self.webhook, "--alert-idle-flush", f"{IDLE_FLUSH_S:g}s",
                 "--http", f"127.0.0.1:{self.http_port}"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-4000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.name} did not listen within {STARTUP_TIMEOUT_S} s")

    def metric(self, name: str) -> float:
        """One unlabelled sample of the replica's /metrics."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        raise AssertionError(f"{self.name}: no {name} in /metrics")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def leader(dsn: str, replicas: list[Replica], timeout_s: float = 15.0) -> Replica:
    leading: Replica = _delivery.lease_holder(dsn, "alerts", replicas, timeout_s)
    return leading


class Mirror(grpc.UnaryUnaryClientInterceptor):
    """Sends every Report also to another replica, at the same moment (its answer is
    ignored: it may be dead, or win the race and make the primary answer DUPLICATE)."""

    def __init__(self, other: str) -> None:
        self.channel = grpc.insecure_channel(other, options=CHANNEL_OPTIONS)
        self.report = self.channel.unary_unary(
            _delivery.REPORT_METHOD, request_serializer=lambda b: b,  # the spool's bytes
            response_deserializer=pb.ReportResponse.FromString)
        self.answers: collections.Counter[str] = collections.Counter()  # status names

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method != _delivery.REPORT_METHOD:
            return continuation(details, request)
        copy = self.report.future(request, timeout=5.0)
        outcome = continuation(details, request)
        with contextlib.suppress(grpc.RpcError):
            self.answers[pb.ReportResponse.Status.Name(copy.result().status)] += 1
        return outcome


class Truth:
    """What the agents observed, per (cohort, window start)."""

    def __init__(self) -> None:
        self.events: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[tuple[str, int]] = collections.Counter()
        self.devices: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, list[np.ndarray]] = collections.defaultdict(list)

    def observe(self, mon: Monitor, labels: dict[str, str], ws: int, incident: bool,
                rng: np.random.Generator) -> None:
        cohort = cohort_key(labels)
        n = int(rng.integers(5, 20))
        errors = rng.random(n) < 0.1
        # p95 ~ 46 ms normally, ~ 690 ms in the incident: far from 180 / 200 ms either way.
        latency = rng.lognormal(6.2 if incident else 3.0, 0.25 if incident else 0.5, n)
        mon.observe_batch({"temp": rng.normal(0.0, 1.0, n), "speed": rng.exponential(20.0, n),
                           "scene": rng.choice(SCENES, n)},
                          predictions=rng.uniform(0.0, 1.0, n), latency_ms=latency,
                          errors=errors)
        self.events[cohort, ws] += n
        self.errors[cohort, ws] += int(np.count_nonzero(errors))
        self.devices[cohort, ws] += 1
        self.latency[cohort].append(latency)

    def window(self, ws: int) -> dict[str, tuple[int, int, int, int]]:
        """cohort -> (devices, reports, events, errors): one report per device and window."""
        return {c: (self.devices[c, w], self.devices[c, w], self.events[c, w],
                    self.errors[c, w]) for c, w in self.events if w == ws}


def cohort_health(target: str, model: str, start: int, end: int,
                  group_by: tuple[str, ...] = ("region", "hw")) -> list[pb.CohortHealth]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.QueryStub(channel).CohortHealth(pb.CohortHealthRequest(
            model=model, group_by=list(group_by), start_unix_s=start, end_unix_s=end),
            timeout=30, wait_for_ready=True).cohorts)


def list_alerts(target: str) -> pb.ListAlertsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.QueryStub(channel).ListAlerts(pb.ListAlertsRequest(), timeout=30,
                                                      wait_for_ready=True)


def health_cli(target: str, model: str, start: int, end: int) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "health", "--aggregator", target, "--model",
         model, "--by", "region", "--by", "hw", "--since", f"{end - start}s", "--until",
         str(end), "--json"], cwd=REPO, capture_output=True, text=True, timeout=60,
        check=True).stdout
    return json.loads(out)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Any]:
    r = Receiver()
    yield r
    r.close()


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_two_replicas_one_killed_totals_exact_queries_equal_alerts_once(
        victim: str, pg_dsn: str, tmp_path: Path, receiver: Any) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(RULES)
    a, b = (Replica(n, pg_dsn, rules, receiver.url, tmp_path / f"{n}.log") for n in "ab")
    replicas = [a, b]
    spec = make_spec()
    window_base = int(time.time()) // W * W - 20 * W
    clock = SimClock(window_base)
    rng = np.random.default_rng(8)
    truth = Truth()
    calls = ReportCalls()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    opened: list[grpc.Channel] = []
    monitors: list[Monitor] = []
    mirrors: list[Mirror] = []
    try:
        for r in replicas:
            r.start()
        push_spec(a.target, spec)
        first = leader(pg_dsn, replicas)

        # Device i reports to replicas[i % 2] first, the other one when that is down; a
        # quarter of them (i % 8 < 2: as many per replica) also copy each report to the other.
        def channel(own: Replica, other: Replica, mirror: bool) -> grpc.Channel:
            raw = grpc.insecure_channel(f"ipv4:{own.target},{other.target}",
                                        options=CHANNEL_OPTIONS)
            opened.append(raw)
            interceptors: list[grpc.UnaryUnaryClientInterceptor] = [calls]
            if mirror:
                mirrors.append(Mirror(other.target))
                interceptors.append(mirrors[-1])
            return grpc.intercept_channel(raw, *interceptors)

        channels = {(i, m): channel(replicas[i], replicas[1 - i], m)
                    for i in (0, 1) for m in (False, True)}
        labels = [COHORTS[i % len(COHORTS)] for i in range(DEVICES)]
        monitors = list(pool.map(lambda i: Monitor(
            spec.model, spec.model_version, f"dev-{i:03d}", labels[i],
            channel=channels[i % 2, i % 8 < 2],
            spool_dir=tmp_path / "spools" / f"dev-{i:03d}", clock=clock, background=False,
            grace_s=GRACE_S, rpc_timeout_s=5.0), range(DEVICES)))
        mirrored = sum(1 for i in range(DEVICES) if i % 8 < 2)

        def deliver(timeout_s: float = 30.0) -> None:
            """Poll every spool until all are empty (retries go to whichever replica is up)."""
            left, deadline = monitors, time.monotonic() + timeout_s
            while left:
                assert time.monotonic() < deadline, [m.stats() for m in left[:3]]
                done = list(pool.map(lambda m: m.poll(5.0), left))
                left = [m for m, ok in zip(left, done, strict=True) if not ok]

        kill: dict[str, Any] = {}
        for w in range(WINDOWS):
            ws = window_base + w * W
            clock.set(ws + W / 2)
            for m, lab in zip(monitors, labels, strict=True):
                truth.observe(m, lab, ws, lab["region"] == "eu" and w in INCIDENT, rng)
            clock.set(ws + W + GRACE_S + 1.0)   # past the end and the grace: it closes
            if w == KILL_ROUND:
                # The leader notified the firing (window 2, closed once window 3 was in);
                # the lease holder (or the other one) is killed halfway through this
                # round's uploads.
                wait_until(lambda: receiver.alerts(), 20, "the firing notification")
                holder = leader(pg_dsn, replicas)
                kill["victim"] = holder if victim == "leader" else replicas[
                    1 - replicas.index(holder)]
                kill["notified_before"] = list(receiver.alerts())
                # Only the lease holder evaluates (the other replica saw every report too).
                follower = replicas[1 - replicas.index(holder)]
                assert (holder.metric("fleetwatch_alert_leader"),
                        follower.metric("fleetwatch_alert_leader")) == (1.0, 0.0)
                assert holder.metric("fleetwatch_alert_windows_evaluated_total") >= 3
                assert follower.metric("fleetwatch_alert_windows_evaluated_total") == 0
                at = calls.acked + DEVICES // 2

                def killer(at: int = at) -> None:
                    deadline = time.monotonic() + 20
                    while (calls.acked < at or calls.in_flight == 0) \
                            and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    kill["in_flight"] = calls.in_flight
                    kill["victim"].kill()

                thread = threading.Thread(target=killer)
                thread.start()
                deliver()
                thread.join()
            else:
                deliver()
        survivor = b if kill["victim"] is a else a
        assert (kill["victim"] is first) == (victim == "leader") and kill["in_flight"] >= 1
        # The survivor holds (or took) the lease; it evaluates the rest, the last windows by
        # idle flush.
        assert leader(pg_dsn, [survivor]) is survivor
        last_end = window_base + WINDOWS * W
        wait_until(lambda: list_alerts(survivor.target).evaluated_until.get(
            f"{spec.model}/{spec.model_version}") == last_end, 30, "the last window")
        for m in monitors:
            s = m.stats()
            assert (s.windows_closed, s.spool.pending, s.spool.dead_letters,
                    s.spool.dropped_total) == (WINDOWS, 0, 0, 0)
        assert calls.failed >= 1                     # the kill cut uploads off; retried
        # Merged once: of the two copies of a mirrored report, one is ACCEPTED, the other
        # DUPLICATE (both replicas were up before the kill); ACCEPTED answers never exceed
        # the reports (fewer by the acks the kill cut off).
        copies = sum((x.answers for x in mirrors), collections.Counter())
        agent_dup = sum(m._uploader.duplicates for m in monitors)
        assert copies["DUPLICATE"] + agent_dup >= mirrored * KILL_ROUND, (copies, agent_dup)
        accepted = copies["ACCEPTED"] + sum(m._uploader.sent for m in monitors)
        assert DEVICES * WINDOWS - 40 <= accepted <= DEVICES * WINDOWS, (copies, accepted)

        # The killed replica comes back as a follower: every question to both replicas.
        kill["victim"].start()
        assert leader(pg_dsn, replicas) is survivor
        assert survivor.metric("fleetwatch_alert_leader") == 1.0
        assert kill["victim"].metric("fleetwatch_alert_windows_evaluated_total") == 0
        for w in range(WINDOWS):
            ws = window_base + w * W
            for r in replicas:
                got = {cohort_key(h.cohort): (h.devices, h.reports, h.events, h.errors)
                       for h in cohort_health(r.target, spec.model, ws, ws + W)}
                assert got == truth.window(ws), (r.name, w)
        for r in replicas:
            (total,) = cohort_health(r.target, spec.model, window_base, last_end, ())
            assert (total.devices, total.reports, total.events, total.errors) == (
                DEVICES, DEVICES * WINDOWS, sum(truth.events.values()),
                sum(truth.errors.values()))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT device_id, seq, window_start FROM reports "
                                "ORDER BY device_id, seq").fetchall()
            history = conn.execute(
                "SELECT rule, previous_state, state, cohort, at FROM alert_history "
                "ORDER BY id").fetchall()
        assert rows == [(f"dev-{i:03d}", s, window_base + (s - 1) * W)
                        for i in range(DEVICES) for s in range(1, WINDOWS + 1)]

        health = [health_cli(r.target, spec.model, window_base, last_end) for r in replicas]
        quantiles = ("p50", "p95", "p99")
        for cohort_a, cohort_b in zip(*health, strict=True):
            key = cohort_key(cohort_a["cohort"])
            sent = np.concatenate(truth.latency[key])
            eps = 2 * cohort_a["latency_ms"]["rank_error"]
            for c in (cohort_a, cohort_b):
                for q, p in zip(quantiles, (0.50, 0.95, 0.99), strict=True):
                    lo, hi = np.quantile(sent, [max(0.0, p - eps), min(1.0, p + eps)])
                    assert lo <= c["latency_ms"][q] <= hi, (key, q, c["latency_ms"], lo, hi)
                c["latency_ms"] = {k: v for k, v in c["latency_ms"].items()
                                   if k not in quantiles}
            assert cohort_a == cohort_b, key
        assert [c["events"] for c in health[0]] == [
            sum(v for (c, _), v in truth.events.items() if c == cohort_key(h["cohort"]))
            for h in health[0]]

        # Each alert once: one firing and one resolved transition, one notification each.
        assert [(r, p, s, json.loads(c), at) for r, p, s, c, at in history] == [
            ("latency-p95", "pending", "firing", [["region", "eu"]], window_base + 3 * W),
            ("latency-p95", "firing", "resolved", [["region", "eu"]], window_base + 5 * W)]
        wait_until(lambda: len(receiver.alerts()) >= 2, 10, "the resolved notification")
        time.sleep(1.0)   # nothing else arrives (a second firing would be here by now)
        notes = [(n["status"], n["labels"]["alertname"], n["labels"]["region"])
                 for n in receiver.alerts()]
        assert notes == [("firing", "latency-p95", "eu"), ("resolved", "latency-p95", "eu")]
        assert [n["status"] for n in kill["notified_before"]] == ["firing"]
        views = [list_alerts(r.target) for r in replicas]
        assert views[0].evaluated_until == views[1].evaluated_until
        assert [(x.rule, x.state, dict(x.cohort)) for x in views[0].alerts] == [
            (x.rule, x.state, dict(x.cohort)) for x in views[1].alerts]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for m in monitors:
            m.close(timeout_s=1.0)
        for x in mirrors:
            x.channel.close()
        for ch in opened:
            ch.close()
        for r in replicas:
            r.stop()
