"""The aggregator's HTTP endpoint end to end: a real aggregator (gRPC + HTTP on loopback, real
SQLite) fed by the simulated fleet (16 devices in 8 region x hw cohorts over 10 minutes, a
latency incident in hw=pi,region=us, the demo's alert rules), asked over real HTTP.

The JSON API must answer what the gRPC Query service answers (the `--json` objects), refuse
bad parameters with 400 and a message (never a traceback), and, with TLS, serve HTTPS only to
operator certificates of the fleet CA that are not revoked.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from agent.spec import Spec
from agent.transport import TlsCredentials
from agent.wire import spec_to_proto
from aggregator import certs
from aggregator.baseline import build_spec_from_columns
from aggregator.demo import DEMO_RULES
from aggregator.http import MAX_SERIES_POINTS
from aggregator.render import alerts_json, health_json
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from aggregator.simulator import (
    CATEGORICAL_FEATURES,
    LABEL_COLUMN,
    LATENCY_COLUMN,
    MINUTE_S,
    PREDICTION_COLUMN,
    FleetConfig,
    Incident,
    reference_columns,
    run_fleet,
)
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

FLEET = FleetConfig(devices=16, minutes=10, drift=None, incident=Incident(start_minute=3),
                    device_prefix="http")
INCIDENT = {"region": "us", "hw": "pi"}


def make_spec() -> Spec:
    return build_spec_from_columns(
        reference_columns(10_000, FLEET.seed), model=FLEET.model,
        model_version=FLEET.model_version, prediction_col=PREDICTION_COLUMN,
        latency_col=LATENCY_COLUMN, label_col=LABEL_COLUMN,
        categorical=tuple(CATEGORICAL_FEATURES))


@dataclasses.dataclass(frozen=True)
class Fleet:
    agg: RunningAggregator
    spec: Spec
    start: int
    end: int

    def get(self, path: str) -> tuple[int, Any]:
        return get(f"http://127.0.0.1:{self.agg.http_port}{path}")

    def query(self) -> pb_grpc.QueryStub:
        return pb_grpc.QueryStub(grpc.insecure_channel(self.agg.target))


def get(url: str, context: ssl.SSLContext | None = None, method: str = "GET"
        ) -> tuple[int, Any]:
    """(status, decoded JSON body) of a request, errors included."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            status, body, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers["Content-Type"]
    if kind == "application/json":
        return status, json.loads(body)
    return status, body.decode()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("http")
    spec = make_spec()
    (tmp / "rules.toml").write_text(DEMO_RULES)
    with serve(AggregatorConfig(db=tmp / "aggregator.sqlite", listen="127.0.0.1:0",
                                workers=4, http_listen="127.0.0.1:0",
                                rules_path=tmp / "rules.toml", alert_idle_flush_s=0.5)) as agg:
        with grpc.insecure_channel(agg.target) as channel:
            pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec), timeout=10)
        end = int(time.time()) // MINUTE_S * MINUTE_S
        start = end - FLEET.minutes * MINUTE_S
        run_fleet(FLEET, agg.target, tmp / "spools", start)
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(agg.target) as channel:
            while pb_grpc.QueryStub(channel).ListAlerts(
                    pb.ListAlertsRequest(), timeout=10).evaluated_until.get("detector/1", 0) < end:
                assert time.monotonic() < deadline, "the alert rules never caught up"
                time.sleep(0.2)
        yield Fleet(agg, spec, start, end)


def without_latency(cohorts: list[dict]) -> list[dict]:
    """Health JSON minus the latency quantiles: KLL merges are randomized (datasketches), so
    two queries agree on them within the sketch's rank error, not to the bit."""
    return [{k: v for k, v in c.items() if k not in ("latency_ms", "status")} for c in cohorts]


def test_api_health_equals_the_grpc_answer(fleet: Fleet) -> None:
    status, body = fleet.get(f"/api/health?by=region,hw&since=10m&until={fleet.end}")
    assert status == 200
    grpc_answer = fleet.query().CohortHealth(pb.CohortHealthRequest(
        model="detector", group_by=["region", "hw"], start_unix_s=fleet.end - 600,
        end_unix_s=fleet.end), timeout=30)
    expected = health_json(list(grpc_answer.cohorts))
    assert len(body) == 8 and [c["cohort"] for c in body] == [c["cohort"] for c in expected]
    assert without_latency(body) == without_latency(expected)
    assert all(c["events"] > 0 for c in body)
    for mine, theirs in zip(body, expected, strict=True):
        rank_error = theirs["latency_ms"]["rank_error"]
        # Within a few percent: the same sketches merged twice.
        assert abs(mine["latency_ms"]["p50"] / theirs["latency_ms"]["p50"] - 1) < 10 * rank_error
    slow = next(c for c in body if c["cohort"] == INCIDENT)
    assert "latency" in slow["status"]
    # A selector narrows it to the one cohort.
    status, body = fleet.get(f"/api/health?cohort=region=us,hw=pi&since=10m&until={fleet.end}")
    assert status == 200 and [c["cohort"] for c in body] == [INCIDENT]


def test_api_series_plots_the_incident_step_by_step(fleet: Fleet) -> None:
    status, body = fleet.get(f"/api/series?cohort=region=us,hw=pi&since=10m&until={fleet.end}"
                             "&step=1m")
    assert status == 200
    assert body["step_s"] == 60 and body["cohort"] == INCIDENT
    points = body["points"]
    assert [p["t"] for p in points] == list(range(fleet.start, fleet.end, 60))
    assert set(body["features"]) <= set(points[-1]["psi"]) | {"score"}
    stub = fleet.query()
    for p in points[::3]:  # each point is that step's health query
        (h,) = stub.CohortHealth(pb.CohortHealthRequest(
            model="detector", selector=INCIDENT, start_unix_s=p["t"],
            end_unix_s=p["t"] + 60), timeout=30).cohorts
        assert p["events"] == h.events > 0 and p["devices"] == h.devices
        assert p["error_rate"] == h.error_rate and p["availability"] == h.availability
        assert p["psi"]["brightness"] == next(f.psi for f in h.features
                                              if f.name == "brightness")
    before, after = points[1]["latency_ms"]["p95"], points[-1]["latency_ms"]["p95"]
    assert after > 2.5 * before  # the 4x incident from minute 3 on
    assert body["reference_latency_ms"]["p95"] < before * 1.5
    # Too many points for the step: the step widens to stay within the cap.
    status, body = fleet.get("/api/series?since=1d&step=1m")
    assert status == 200 and len(body["points"]) <= MAX_SERIES_POINTS
    assert body["step_s"] == 720 and body["step_s"] % 60 == 0


def test_api_models_alerts_and_explain(fleet: Fleet) -> None:
    status, body = fleet.get("/api/models")
    assert status == 200
    (model,) = body["models"]
    assert model["model"] == "detector" and model["spec_hash"] == fleet.spec.hash
    assert model["labels"] == {"hw": ["jetson", "pi"], "region": ["apac", "eu", "latam", "us"]}
    status, body = fleet.get("/api/alerts")
    assert status == 200
    assert body == alerts_json(fleet.query().ListAlerts(pb.ListAlertsRequest(), timeout=10))
    firing = [a for a in body["alerts"] if a["state"] == "firing"]
    assert [(a["rule"], a["cohort"]) for a in firing] == [("latency-p95", INCIDENT)]
    status, body = fleet.get(f"/api/explain?metric=latency_p95_ms&since=10m&until={fleet.end}")
    assert status == 200
    top = body["contributions"][0]
    assert (top["key"], top["value"]) in {("hw", "pi"), ("region", "us")}
    status, body = fleet.get("/healthz")
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/api/health?since=soon", 400, "since: 'soon' is not a duration"),
    ("/api/health?since=-5m", 400, "since"),
    ("/api/health?cohort=region", 400, "cohort: 'region' is not of the form key=value"),
    ("/api/health?until=yesterday", 400, "until: 'yesterday' is neither"),
    ("/api/health?by=region=eu", 400, "by: 'region=eu' is not a label key"),
    ("/api/health?cohrt=region=eu", 400, "unknown parameter 'cohrt'"),
    ("/api/health?since=1h&since=2h", 400, "since: given more than once"),
    ("/api/health?model=nope", 404, "no spec registered for model 'nope'"),
    ("/api/series?step=0", 400, "step: must be positive"),
    ("/api/alerts?state=burning", 400, "state: must be pending, firing or resolved"),
    ("/api/alerts?resolved=-1", 400, "resolved: must be an integer"),
    ("/api/explain", 400, "metric: required"),
    ("/api/explain?metric=psi:nosuch", 400, "nosuch"),
    ("/metrics?x=1", 400, "takes no parameters"),
    ("/api/nothing", 404, "no such path"),
    # one request stays one bounded piece of work; absurd numbers are 400s, not 500s
    ("/api/health?since=" + "9" * 400 + "d", 400, "since: at most 366 days"),
    ("/api/series?since=100000d", 400, "since: at most 366 days"),
    ("/api/health?until=" + "9" * 23, 400, "until:"),
])
def test_bad_requests_get_a_status_and_a_message(fleet: Fleet, path: str, status: int,
                                                 message: str) -> None:
    got, body = fleet.get(path)
    assert got == status
    assert set(body) == {"error"} and message in body["error"], body
    assert "Traceback" not in body["error"]


def test_only_get_and_head(fleet: Fleet) -> None:
    url = f"http://127.0.0.1:{fleet.agg.http_port}/api/models"
    status, body = get(url, method="POST")
    assert status == 405 and "GET or HEAD" in body["error"]
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
        assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 0


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_aggregator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    pki = tmp_path_factory.mktemp("pki")
    certs.init_ca(pki)
    certs.issue_operator(pki, "alice")
    certs.issue_operator(pki, "mallory")
    certs.issue_device(pki, "cam-1")
    (pki / "revoked.txt").write_text("mallory\n")
    db = tmp_path_factory.mktemp("tls") / "aggregator.sqlite"
    with serve(AggregatorConfig(db=db, listen="127.0.0.1:0", tls_dir=pki, workers=2,
                                http_listen="127.0.0.1:0", revocation_check_s=0)) as agg:
        alice = TlsCredentials(pki / "ca.pem", pki / "operators" / "alice.pem",
                               pki / "operators" / "alice.key")
        with grpc.secure_channel(agg.target, alice.channel_credentials()) as channel:
            pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(make_spec()), timeout=10)
        yield agg, pki


def client(pki: pathlib.Path, who: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if who is not None:
        role, name = who.split(":")
        folder = pki / ("operators" if role == "operator" else "devices")
        context.load_cert_chain(folder / f"{name}.pem", folder / f"{name}.key")
    return context


def server_stats(agg: RunningAggregator, pki: pathlib.Path) -> pb.ServerStatsResponse:
    alice = TlsCredentials(pki / "ca.pem", pki / "operators" / "alice.pem",
                           pki / "operators" / "alice.key")
    with grpc.secure_channel(agg.target, alice.channel_credentials()) as channel:
        return pb_grpc.AdminStub(channel).ServerStats(pb.ServerStatsRequest(), timeout=10)


def test_https_serves_operators(tls_aggregator: tuple) -> None:
    agg, pki = tls_aggregator
    base = f"https://127.0.0.1:{agg.http_port}"
    status, body = get(f"{base}/api/models", client(pki, "operator:alice"))
    assert status == 200 and [m["model"] for m in body["models"]] == ["detector"]
    status, text = get(f"{base}/metrics", client(pki, "operator:alice"))
    assert status == 200 and "fleetwatch_reports_accepted_total" in text


def test_https_refuses_anyone_else(tls_aggregator: tuple) -> None:
    agg, pki = tls_aggregator
    base = f"https://127.0.0.1:{agg.http_port}"
    before = server_stats(agg, pki).rejected
    # No client certificate: the TLS handshake itself fails.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{base}/api/models", timeout=10,
                               context=client(pki, None)).read()
    # A device certificate: a fleet identity, but not an operator.
    status, body = get(f"{base}/api/models", client(pki, "device:cam-1"))
    assert status == 403 and "operators only" in body["error"]
    # A revoked operator.
    status, body = get(f"{base}/metrics", client(pki, "operator:mallory"))
    assert status == 401 and "revoked" in body["error"]
    # Plain HTTP to the HTTPS port gets nothing.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{agg.http_port}/api/models",
                               timeout=10).read()
    after = server_stats(agg, pki).rejected
    assert after["permission_denied"] == before.get("permission_denied", 0) + 1
    assert after["revoked"] == before.get("revoked", 0) + 1


def test_dashboard_pages_are_mounted(fleet: Fleet) -> None:
    status, page = fleet.get(f"/?since=10m&until={fleet.end}")
    assert status == 200 and page.lstrip().lower().startswith("<!doctype html")
    status, page = fleet.get("/cohort?cohort=region")  # the page's BadRequest: 400, as HTML
    assert status == 400 and "<h1>400</h1>" in page and "Traceback" not in page
    status, page = fleet.get("/alerts")
    assert status == 200 and "latency-p95" in page


def test_plaintext_endpoint_refuses_other_host_names(fleet: Fleet) -> None:
    """DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name in
    Host; without TLS only loopback names are answered."""
    url = f"http://127.0.0.1:{fleet.agg.http_port}/api/models"
    for host, status in ((f"127.0.0.1:{fleet.agg.http_port}", 200),
                         (f"localhost:{fleet.agg.http_port}", 200),
                         ("attacker.example", 403), ("attacker.example:80", 403)):
        request = urllib.request.Request(url, headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == status, host


def test_connections_past_the_bound_are_closed_not_queued(fleet: Fleet) -> None:
    """A thread per connection, at most `max_connections` of them: idle connections that hold
    every slot make the next one close at once (counted), and a freed slot serves again."""
    import socket

    from aggregator.http import HttpContext, HttpServer
    agg = fleet.agg
    server = HttpServer("127.0.0.1", 0, HttpContext(agg.store, None, agg.ingestor), None,
                        max_connections=2)
    server.start()
    before = agg.ingestor.stats().rejected.get("http_connections", 0)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted: their threads wait for a request line
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            extra.sendall(b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = extra.recv(100)
        except (ConnectionResetError, BrokenPipeError):  # closed with our request unread
            answer = b""
        assert answer == b""   # closed without an answer
        extra.close()
        assert agg.ingestor.stats().rejected["http_connections"] == before + 1
        idle.pop().close()
        time.sleep(0.3)
        status, body = get(f"http://127.0.0.1:{server.port}/api/models")
        assert status == 200 and body["models"]
    finally:
        for s in idle:
            s.close()
        server.close()
