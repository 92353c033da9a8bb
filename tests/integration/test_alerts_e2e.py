"""Alerting end to end: the real aggregator with `rules_path`, reports over gRPC on loopback for
chosen windows (event time), a real SQLite file, a real HTTP webhook receiver on 127.0.0.1.

Expected alerts are derived from the raw values sent (numpy), not from the server: per window
and region the p95 latency and the error rate, then the rule's `for` / burn-rate arithmetic.
Latencies are drawn far from the thresholds (p95 below 150 ms or above 240 ms against
180 / 200 ms), a margin far wider than the KLL sketch's rank error (about 1.65 % at k = 200),
so the server's sketch and numpy agree on every breach; error counts are exact (no noise).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent.spec import Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator import cli
from aggregator.server import RunningAggregator
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

W = 60
SCENES = np.array(["indoor", "outdoor", "night"], dtype=object)
EXTERNAL = "http://fleetwatch.example:8080"

LATENCY_RULE = """\
[[rule]]
name = "latency-p95"
metric = "latency_p95_ms"
op = ">"
threshold = 200
clear = 180
for = "{for_}"
by = ["region"]
severity = "page"
runbook = "https://runbooks.example/latency"
"""


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- a webhook receiver ------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 keeping every POSTed JSON body; optionally hangs."""

    def __init__(self, hang_s: float = 0.0) -> None:
        self.payloads: list[dict] = []
        self.requests = 0
        self.release = threading.Event()
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    outer.requests += 1
                if hang_s:
                    outer.release.wait(hang_s)
                with lock:
                    outer.payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def alerts(self) -> list[dict]:
        return [a for p in self.payloads for a in p["alerts"]]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kw: float) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# -- reports for chosen windows ----------------------------------------------------------------


class Sender:
    """Builds and sends reports; keeps the raw latencies and errors per (window, region)."""

    def __init__(self, spec: Spec, base: int, rng: np.random.Generator) -> None:
        self.spec = spec
        self.base = base
        self.rng = rng
        self.seq: dict[str, int] = {}
        self.latency: dict[tuple[int, str], list[np.ndarray]] = {}
        self.errors: dict[tuple[int, str], list[tuple[int, int]]] = {}

    def start(self, window: int) -> int:
        return self.base + window * W

    def envelope(self, window: int, region: str, device: int, median_ms: float,
                 error_rate: float = 0.0, n: int = 150) -> bytes:
        ws = self.start(window)
        latency = self.rng.lognormal(np.log(median_ms), 0.25, n)
        errors = np.zeros(n, bool)
        errors[: int(round(error_rate * n))] = True
        acc = WindowAccumulator(self.spec, ws)
        acc.observe_batch({"temp": self.rng.normal(0, 1, n), "speed": self.rng.exponential(20, n),
                           "scene": self.rng.choice(SCENES, n)},
                          self.rng.uniform(0, 1, n), latency, errors, n)
        dev = f"{region}-{device}"
        self.seq[dev] = self.seq.get(dev, 0) + 1
        meta = ReportMeta(dev, self.spec.model, self.spec.model_version, {"region": region},
                          ws, W, self.seq[dev], self.spec.hash, int(time.time() * 1000), "test")
        self.latency.setdefault((window, region), []).append(latency)
        self.errors.setdefault((window, region), []).append((int(errors.sum()), n))
        report = report_to_proto(meta, acc.to_summary())
        return pb.ReportEnvelope(report=report.SerializeToString()).SerializeToString()

    def p95(self, window: int, region: str) -> float:
        return float(np.percentile(np.concatenate(self.latency[(window, region)]), 95))

    def error_rate(self, window: int, region: str) -> float:
        e, n = np.sum(self.errors[(window, region)], axis=0)
        return e / n


def send_windows(rpc: Callable, sender: Sender, plan: dict[str, list[float]], first: int = 0,
                 devices: int = 2, error_plan: dict[str, list[float]] | None = None) -> None:
    """plan: per region, the median latency of each window from `first` on."""
    for i in range(max(len(v) for v in plan.values())):
        for region, medians in plan.items():
            rate = (error_plan or {}).get(region, [0.0] * len(medians))[i]
            for d in range(devices):
                assert rpc(sender.envelope(first + i, region, d, medians[i], rate),
                           timeout=10).status == pb.ReportResponse.ACCEPTED


def list_alerts(target: str, **kw: object) -> pb.ListAlertsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.QueryStub(channel).ListAlerts(pb.ListAlertsRequest(**kw), timeout=10,
                                                     wait_for_ready=True)


def wait_evaluated(target: str, spec: Spec, until: int, timeout_s: float = 60.0) -> None:
    key = f"{spec.model}/{spec.model_version}"
    assert wait_until(lambda: list_alerts(target).evaluated_until.get(key) == until,
                      timeout_s), list_alerts(target)


def expected_fire(flags: list[bool], windows_for: int) -> int | None:
    """Index of the window at whose end a breach of `windows_for` windows fires."""
    run = 0
    for i, f in enumerate(flags):
        run = run + 1 if f else 0
        if run == windows_for:
            return i
    return None


@pytest.fixture
def base() -> int:
    return int(time.time()) // W * W - 60 * W


@pytest.fixture
def alerting(start_aggregator, tmp_path: Path, receivers):
    """`with alerting(rules_text, **config) as (agg, receiver)`: an aggregator with the rule
    file and a webhook to a fresh receiver, idle flush 0.5 s."""

    @contextlib.contextmanager
    def start(rules: str, receiver: Receiver | None = None, db: Path | None = None,
              **config: object) -> Iterator[tuple[RunningAggregator, Receiver]]:
        path = tmp_path / "alerts.toml"
        path.write_text(rules)
        receiver = receiver or receivers()
        hooks = config.pop("webhooks", (receiver.url,))
        with start_aggregator(db or tmp_path / "agg.sqlite", rules_path=path,
                              webhooks=hooks, external_url=EXTERNAL,
                              alert_idle_flush_s=0.5, alert_tick_s=0.1, **config) as agg:
            yield agg, receiver

    return start


# -- tests -------------------------------------------------------------------------------------


def test_threshold_alert_fires_once_resolves_and_reaches_the_webhook(
        alerting, spec: Spec, report_rpc, base: int, tmp_path: Path) -> None:
    sender = Sender(spec, base, np.random.default_rng(1))
    slow, fast = 300.0, 25.0
    eu = [fast] * 3 + [slow] * 3 + [fast] * 8         # 3 minutes over: shorter than for=5m
    us = [fast] * 3 + [slow] * 7 + [fast] * 4         # 7 minutes over: fires, then clears
    n = len(eu)
    with alerting(LATENCY_RULE.format(for_="5m")) as (agg, receiver):
        send_windows(report_rpc(agg.target), sender, {"eu": eu, "us": us})
        wait_evaluated(agg.target, spec, base + n * W)
        resolved = list_alerts(agg.target, state="resolved").alerts
    # the server is stopped: the notifier has drained its queue

    p95 = {r: [sender.p95(w, r) for w in range(n)] for r in ("eu", "us")}
    for values in p95.values():
        assert all(v > 240 or v < 150 for v in values)   # margin over the sketch's error
    flags = {r: [v > 200 for v in p95[r]] for r in p95}
    assert expected_fire(flags["eu"], 5) is None
    fire = expected_fire(flags["us"], 5)
    assert fire is not None
    start = flags["us"].index(True)
    clear = next(i for i in range(fire, n) if p95["us"][i] <= 180)

    alerts = receiver.alerts()
    assert [(a["status"], a["labels"]["region"]) for a in alerts] == [("firing", "us"),
                                                                     ("resolved", "us")]
    fired, ended = alerts
    assert fired["startsAt"] == ended["startsAt"] == rfc3339(sender.start(start))
    assert fired["endsAt"] == "0001-01-01T00:00:00Z"
    assert ended["endsAt"] == rfc3339(sender.start(clear))
    assert fired["labels"] == {"alertname": "latency-p95", "severity": "page", "region": "us",
                               "model": spec.model, "model_version": spec.model_version}
    assert fired["annotations"]["runbook_url"] == "https://runbooks.example/latency"
    assert float(fired["annotations"]["value"]) > 200
    assert float(fired["annotations"]["threshold"]) == 200
    assert fired["fingerprint"] == ended["fingerprint"] and len(fired["fingerprint"]) == 16
    assert fired["generatorURL"] == EXTERNAL
    first = receiver.payloads[0]
    assert first["version"] == "4" and first["status"] == "firing"
    assert first["receiver"] == "fleetwatch" and first["externalURL"] == EXTERNAL
    assert first["groupLabels"] == {"alertname": "latency-p95"}
    assert first["commonLabels"]["region"] == "us"

    [r] = resolved
    assert (r.rule, r.state, dict(r.cohort)) == ("latency-p95", "resolved", {"region": "us"})
    assert r.ends_at_unix_s == sender.start(clear)
    with contextlib.closing(sqlite3.connect(tmp_path / "agg.sqlite")) as db:
        history = db.execute("SELECT previous_state, state, at FROM alert_history "
                             "ORDER BY id").fetchall()
    assert history == [("pending", "firing", sender.start(fire) + W),
                       ("firing", "resolved", sender.start(clear) + W)]


def test_slo_pages_on_a_fast_burn_with_the_budget_per_cohort(
        alerting, spec: Spec, report_rpc, base: int) -> None:
    rules = """\
[[slo]]
name = "errors"
metric = "error_rate"
objective = "< 0.001"
target = 0.99
by = ["region"]
period = "1d"
page = { long = "20m", short = "5m", burn = 14.4 }
ticket = { long = "6h", short = "30m", burn = 50 }
"""
    sender = Sender(spec, base, np.random.default_rng(2))
    healthy, burning = 20, 6
    n = healthy + burning
    errors = {"eu": [0.0] * healthy + [0.1] * burning, "us": [0.0] * n}
    with alerting(rules) as (agg, receiver):
        send_windows(report_rpc(agg.target), sender, {"eu": [25.0] * n, "us": [25.0] * n},
                     error_plan=errors, devices=1)
        wait_evaluated(agg.target, spec, base + n * W)
        resp = list_alerts(agg.target)

    # The burn-rate arithmetic on the raw error rates: bad windows and both burn windows.
    bad = {r: np.array([sender.error_rate(w, r) >= 0.001 for w in range(n)]) for r in errors}

    def burn(r: str, i: int, span_windows: int) -> float:
        lo = max(0, i - span_windows + 1)
        return bad[r][lo:i + 1].mean() / 0.01

    page_at = [i for i in range(n) if burn("eu", i, 20) > 14.4 and burn("eu", i, 5) > 14.4]
    assert not any(burn("us", i, 5) > 14.4 for i in range(n))
    alerts = receiver.alerts()
    assert [(a["status"], a["labels"]["severity"], a["labels"]["region"]) for a in alerts] \
        == [("firing", "page", "eu")]
    assert alerts[0]["startsAt"] == rfc3339(sender.start(page_at[0]))
    [firing] = [a for a in resp.alerts if a.state == "firing"]
    assert (firing.kind, firing.severity) == ("slo", "page")
    assert firing.value == pytest.approx(burn("eu", n - 1, 20))
    budgets = {b.cohort["region"]: b for b in resp.budgets}
    for region in ("eu", "us"):
        b = budgets[region]
        assert (b.slo, b.windows, b.bad_windows) == ("errors", n, int(bad[region].sum()))
        assert b.left_fraction == pytest.approx(1 - bad[region].sum() / (0.01 * n))
        assert b.burn_rates["5m"] == pytest.approx(burn(region, n - 1, 5))
        assert b.burn_rates["20m"] == pytest.approx(burn(region, n - 1, 20))


def test_a_hung_or_dead_receiver_does_not_slow_ingest(
        alerting, spec: Spec, report_rpc, base: int, receivers, free_port: int) -> None:
    hung = receivers(hang_s=30.0)
    dead = f"http://127.0.0.1:{free_port}/nobody-listens"
    sender = Sender(spec, base, np.random.default_rng(3))
    with alerting(LATENCY_RULE.format(for_="0s"), receiver=hung,
                  webhooks=(hung.url, dead)) as (agg, _):
        rpc = report_rpc(agg.target)
        send_windows(rpc, sender, {"eu": [300.0] * 3})
        assert wait_until(lambda: hung.requests >= 1)      # the receiver now hangs 30 s
        # 100 reports flipping the alert every window: a notification per window queues
        # behind the hung receiver while ingest and evaluation go on.
        t0 = time.monotonic()
        send_windows(rpc, sender, {"eu": [25.0, 300.0] * 12 + [25.0]}, first=3, devices=4)
        elapsed = time.monotonic() - t0
        assert elapsed < 15.0, f"100 reports took {elapsed:.1f} s"   # ~1 s unhindered
        t0 = time.monotonic()
        wait_evaluated(agg.target, spec, sender.start(28), timeout_s=20)
        assert time.monotonic() - t0 < 20.0
        assert hung.payloads == []                            # still hanging
    assert agg.alerts is not None and agg.alerts.notifications == 26


def test_restart_keeps_firing_alerts_without_renotifying(
        alerting, spec: Spec, report_rpc, base: int, receivers, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    receiver = receivers()
    db = tmp_path / "agg.sqlite"
    rules = LATENCY_RULE.format(for_="5m")
    sender = Sender(spec, base, np.random.default_rng(4))
    with alerting(rules, receiver=receiver, db=db) as (agg, _):
        send_windows(report_rpc(agg.target), sender, {"eu": [300.0] * 7})
        wait_evaluated(agg.target, spec, sender.start(7))
    assert [a["status"] for a in receiver.alerts()] == ["firing"]

    with alerting(rules, receiver=receiver, db=db) as (agg, _):
        rpc = report_rpc(agg.target)
        send_windows(rpc, sender, {"eu": [300.0] * 3}, first=7)
        wait_evaluated(agg.target, spec, sender.start(10))
        capsys.readouterr()
        assert cli.main(["alerts", "--aggregator", agg.target, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert cli.main(["alerts", "--aggregator", agg.target]) == 0
        table = capsys.readouterr().out
        send_windows(rpc, sender, {"eu": [25.0]}, first=10)
        wait_evaluated(agg.target, spec, sender.start(11))
    assert [a["status"] for a in receiver.alerts()] == ["firing", "resolved"]

    assert set(out) == {"schema", "rules_loaded", "alerts", "budgets", "evaluated_until"}
    assert out["rules_loaded"] is True and out["budgets"] == []
    assert out["evaluated_until"] == {f"{spec.model}/{spec.model_version}": sender.start(10)}
    [alert] = out["alerts"]
    assert alert["rule"] == "latency-p95" and alert["state"] == "firing"
    assert alert["starts_at_unix_s"] == sender.start(0)      # the alert from before restart
    assert alert["ends_at_unix_s"] is None
    assert alert["cohort"] == {"region": "eu"} and alert["model"] == spec.model
    assert alert["model_version"] == spec.model_version
    assert alert["value"] == pytest.approx(sender.p95(9, "eu"), rel=0.05)
    header, *rows = [line for line in table.splitlines() if line.strip()]
    assert header.split()[:8] == ["rule", "model", "severity", "state", "cohort", "value",
                                  "threshold", "since"]
    assert "firing" in rows[1] and "region=eu" in rows[1]


def test_bad_rule_file_is_refused_at_serve_start(
        start_aggregator, spec: Spec, report_rpc, base: int, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "agg.sqlite"
    sender = Sender(spec, base, np.random.default_rng(5))
    with start_aggregator(db) as agg:  # no --rules: ListAlerts says so
        send_windows(report_rpc(agg.target), sender, {"eu": [25.0]}, devices=1)
        assert list_alerts(agg.target).rules_loaded is False
        capsys.readouterr()
        assert cli.main(["alerts", "--aggregator", agg.target]) == 0
        assert "without alert rules" in capsys.readouterr().out
    rules = tmp_path / "alerts.toml"
    rules.write_text(LATENCY_RULE.format(for_="5m").replace('["region"]', '["hw"]'))
    argv = ["serve", "--db", str(db), "--listen", "127.0.0.1:0", "--rules", str(rules)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{rules}:8:" in err and "'hw'" in err and "region" in err
    rules.write_text(LATENCY_RULE.format(for_="5m").replace("latency_p95_ms", "psi:nosuch"))
    assert cli.main(argv) == 2
    assert f"{rules}:3:" in capsys.readouterr().err
    rules.write_text(LATENCY_RULE.format(for_="5 minutes"))
    assert cli.main(argv) == 2
    assert f"{rules}:7:" in capsys.readouterr().err
