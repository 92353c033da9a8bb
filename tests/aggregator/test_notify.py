"""Tests for aggregator.notify, against a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent.errors import ConfigError, ValidationError
from aggregator.notify import (
    ZERO_TIME,
    DeliveryStats,
    LogNotifier,
    MemoryNotifier,
    MultiNotifier,
    Notification,
    Notifier,
    WebhookNotifier,
    alertmanager_payload,
    format_timestamp,
    group_key,
)

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


# -- a real receiver --------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """Records every POST; answers scripted status codes, optionally after a delay or a gate."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)   # answered first, in order
    default_code: int = 200
    delay_s: float = 0.0
    gate: threading.Event | None = None
    release: threading.Event = field(default_factory=threading.Event)  # set at teardown
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.requests]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def _handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with rx.lock:
                rx.requests.append(Received(self.path, dict(self.headers), body))
                code = rx.codes.pop(0) if rx.codes else rx.default_code
            if rx.gate is not None:
                rx.gate.wait(5.0)
            if rx.delay_s:
                rx.release.wait(rx.delay_s)
            try:
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass  # the client gave up (timeout): expected in the slow-receiver test

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rx))
    rx.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield rx
    finally:
        rx.release.set()
        if rx.gate is not None:
            rx.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5.0)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_notifier() -> Iterator[Callable[..., WebhookNotifier]]:
    made: list[WebhookNotifier] = []

    def make(urls: list[str], **kwargs: Any) -> WebhookNotifier:
        kwargs.setdefault("timeout_s", 2.0)
        kwargs.setdefault("backoff_s", 0.01)
        n = WebhookNotifier(urls, **kwargs)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close(timeout_s=0.0)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def only_stats(n: WebhookNotifier) -> DeliveryStats:
    (stats,) = n.stats().values()
    return stats


def firing(alertname: str = "ModelDrift", cohort: str = "eu", **labels: str) -> Notification:
    return Notification(
        status="firing",
        labels={"alertname": alertname, "severity": "page", "model": "m1", "cohort": cohort,
                **labels},
        annotations={"summary": f"PSI high in {cohort}", "runbook_url": "https://rb/drift"},
        starts_at_s=T0, ends_at_s=None, fingerprint=f"fp-{alertname}-{cohort}",
        generator_url=f"http://fleetwatch.local/cohorts/{cohort}")


# -- the payload ------------------------------------------------------------------------------


def test_firing_payload_reaches_receiver_in_alertmanager_shape(receiver, make_notifier):
    n = make_notifier([receiver.url], receiver="ml-oncall",
                      external_url="http://fleetwatch.local:8080")
    eu = firing(cohort="eu")
    us = Notification("firing", dict(firing(cohort="us").labels),
                      {"summary": "PSI high in us", "runbook_url": "https://rb/drift",
                       "value": "0.31"}, starts_at_s=T0 + 0.5, ends_at_s=None,
                      fingerprint="fp-us")
    assert n.notify([eu, us]) is True
    wait_for(lambda: only_stats(n).delivered == 1)

    (req,) = receiver.requests
    assert req.path == "/hook"
    assert req.headers["Content-Type"] == "application/json"
    assert req.body == {
        "version": "4",
        "groupKey": '{}:{alertname="ModelDrift"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "ml-oncall",
        "groupLabels": {"alertname": "ModelDrift"},
        "commonLabels": {"alertname": "ModelDrift", "model": "m1", "severity": "page"},
        "commonAnnotations": {"runbook_url": "https://rb/drift"},
        "externalURL": "http://fleetwatch.local:8080",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "ModelDrift", "cohort": "eu", "model": "m1",
                           "severity": "page"},
                "annotations": {"runbook_url": "https://rb/drift",
                                "summary": "PSI high in eu"},
                "startsAt": "2023-11-14T22:13:20Z",
                "endsAt": ZERO_TIME,
                "generatorURL": "http://fleetwatch.local/cohorts/eu",
                "fingerprint": "fp-ModelDrift-eu",
            },
            {
                "status": "firing",
                "labels": {"alertname": "ModelDrift", "cohort": "us", "model": "m1",
                           "severity": "page"},
                "annotations": {"runbook_url": "https://rb/drift",
                                "summary": "PSI high in us", "value": "0.31"},
                "startsAt": "2023-11-14T22:13:20.5Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": "fp-us",
            },
        ],
    }
    for alert in req.body["alerts"]:
        assert RFC3339_Z.match(alert["startsAt"]) and RFC3339_Z.match(alert["endsAt"])


def test_resolved_payload_reaches_receiver(receiver, make_notifier):
    n = make_notifier([receiver.url])
    resolved = Notification("resolved", {"alertname": "SLOBurn", "severity": "ticket"},
                            {"summary": "burn rate back under 1"}, starts_at_s=T0,
                            ends_at_s=T0 + 3600.125, fingerprint="fp-slo")
    assert n.notify([resolved])
    wait_for(lambda: only_stats(n).delivered == 1)

    body = receiver.bodies()[0]
    assert body["version"] == "4"
    assert body["status"] == "resolved"
    assert body["receiver"] == "fleetwatch"
    assert body["externalURL"] == ""
    assert body["groupKey"] == '{}:{alertname="SLOBurn"}'
    assert body["groupLabels"] == {"alertname": "SLOBurn"}
    assert body["commonLabels"] == {"alertname": "SLOBurn", "severity": "ticket"}
    assert body["commonAnnotations"] == {"summary": "burn rate back under 1"}
    (alert,) = body["alerts"]
    assert alert == {
        "status": "resolved",
        "labels": {"alertname": "SLOBurn", "severity": "ticket"},
        "annotations": {"summary": "burn rate back under 1"},
        "startsAt": "2023-11-14T22:13:20Z",
        "endsAt": "2023-11-14T23:13:20.125Z",
        "generatorURL": "",
        "fingerprint": "fp-slo",
    }


def test_one_post_per_alertname_group(receiver, make_notifier):
    n = make_notifier([receiver.url])
    assert n.notify([firing("A", "eu"), firing("B", "eu"), firing("A", "us")])
    wait_for(lambda: only_stats(n).delivered == 2)
    by_key = {b["groupKey"]: b for b in receiver.bodies()}
    assert set(by_key) == {'{}:{alertname="A"}', '{}:{alertname="B"}'}
    assert [a["labels"]["cohort"] for a in by_key['{}:{alertname="A"}']["alerts"]] == ["eu", "us"]
    assert by_key['{}:{alertname="B"}']["groupLabels"] == {"alertname": "B"}


def test_payload_status_is_firing_if_any_alert_fires():
    resolved = Notification("resolved", {"alertname": "A", "severity": "page"}, {}, T0, T0 + 1,
                            "fp2")
    body = alertmanager_payload([resolved, firing("A")], "r", "", {"alertname": "A"})
    assert body["status"] == "firing"
    assert [a["status"] for a in body["alerts"]] == ["resolved", "firing"]
    assert body["commonLabels"] == {"alertname": "A", "severity": "page"}
    assert body["commonAnnotations"] == {}
    assert alertmanager_payload([resolved], "r", "", {})["status"] == "resolved"
    with pytest.raises(ValidationError):
        alertmanager_payload([], "r", "", {})


def test_group_key_and_timestamps():
    assert group_key({}) == "{}:{}"
    assert group_key({"cohort": 'e"u', "alertname": "x"}) == '{}:{alertname="x", cohort="e\\"u"}'
    assert format_timestamp(0) == "1970-01-01T00:00:00Z"
    assert format_timestamp(T0) == "2023-11-14T22:13:20Z"
    assert format_timestamp(T0 + 0.000001) == "2023-11-14T22:13:20.000001Z"
    assert RFC3339_Z.match(format_timestamp(time.time()))


# -- the input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "bad_field"), [
    ({"status": "pending"}, "status"),
    ({"labels": {"alertname": "A"}}, "labels"),
    ({"labels": {"alertname": "", "severity": "page"}}, "labels"),
    ({"labels": {"alertname": "A", "severity": "page", "n": 3}}, "labels"),
    ({"annotations": {"value": 0.3}}, "annotations"),
    ({"starts_at_s": float("nan")}, "starts_at_s"),
    ({"status": "resolved", "ends_at_s": None}, "ends_at_s"),
    ({"ends_at_s": T0 - 1}, "ends_at_s"),
    ({"fingerprint": ""}, "fingerprint"),
])
def test_notification_validates(kwargs, bad_field):
    args = {"status": "firing", "labels": {"alertname": "A", "severity": "page"},
            "annotations": {}, "starts_at_s": T0, "ends_at_s": None, "fingerprint": "fp"}
    with pytest.raises(ValidationError) as e:
        Notification(**{**args, **kwargs})
    assert e.value.field == bad_field


def test_notification_is_frozen_and_copies_its_mappings():
    labels = {"alertname": "A", "severity": "page"}
    n = Notification("firing", labels, {}, T0, None, "fp")
    labels["severity"] = "ticket"
    assert n.labels["severity"] == "page"
    with pytest.raises(TypeError):
        n.labels["severity"] = "x"  # type: ignore[index]
    assert n == Notification("firing", {"alertname": "A", "severity": "page"}, {}, T0, None, "fp")
    assert len({n, n}) == 1


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("urls", [
    [], "http://127.0.0.1/hook", ["ftp://example.com/hook"], ["file:///etc/passwd"],
    ["localhost:9093/hook"], ["http:///nohost"], ["http://example.com:notaport/"],
    ["http://a.example/x", "http://u:p@a.example/x"],
])
def test_bad_urls_are_config_errors(urls):
    with pytest.raises(ConfigError):
        WebhookNotifier(urls)


@pytest.mark.parametrize("kwargs", [
    {"timeout_s": 0}, {"max_queue": 0}, {"retries": -1}, {"backoff_s": -0.1},
])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        WebhookNotifier(["http://127.0.0.1:1/"], **kwargs)


def test_config_error_does_not_echo_credentials():
    with pytest.raises(ConfigError) as e:
        WebhookNotifier(["ftp://alice:hunter2@example.com/hook"])
    assert "hunter2" not in str(e.value) and "alice" not in str(e.value)


def test_basic_auth_is_sent_as_a_header_and_never_shown(receiver, make_notifier, closed_port,
                                                       caplog):
    caplog.set_level(logging.DEBUG, logger="aggregator.notify")
    good = f"http://alice:s3cr%40t@127.0.0.1:{receiver.port}/hook?token=abc"
    down = f"http://bob:hunter2@127.0.0.1:{closed_port}/hook"
    n = make_notifier([good, down], retries=1)
    assert n.notify([firing()])
    wait_for(lambda: sum(s.delivered + s.failed for s in n.stats().values()) == 2)

    (req,) = receiver.requests
    assert req.path == "/hook?token=abc"
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    shown = " ".join(n.stats()) + caplog.text
    assert "gave up after 2 attempts" in caplog.text
    for secret in ("alice", "s3cr", "bob", "hunter2", "token=abc"):
        assert secret not in shown
    assert n.stats()[f"http://127.0.0.1:{closed_port}/hook"].failed == 1


# -- not blocking the caller ------------------------------------------------------------------


def _time_notify_calls(n: WebhookNotifier, count: int) -> float:
    batch = [firing()]
    start = time.perf_counter()
    for _ in range(count):
        n.notify(batch)
    return time.perf_counter() - start


def test_down_receiver_does_not_slow_the_caller(make_notifier, closed_port, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.notify")
    n = make_notifier([f"http://127.0.0.1:{closed_port}/hook"], retries=1, backoff_s=0.001)
    assert _time_notify_calls(n, 200) < 0.2  # enqueue only; a wide margin
    wait_for(lambda: only_stats(n).failed == 200, timeout_s=10.0)
    stats = only_stats(n)
    assert (stats.delivered, stats.dropped, stats.retried, stats.pending) == (0, 0, 200, 0)
    # The failure streak is logged at 1, 2, 4, ..., 128 failures, not 200 times.
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 8
    assert "ConnectionRefusedError" in caplog.text


def test_slow_receiver_does_not_slow_the_caller_and_times_out(receiver, make_notifier):
    receiver.delay_s = 3.0
    n = make_notifier([receiver.url], timeout_s=0.5, retries=0, max_queue=2)
    start = time.monotonic()
    assert _time_notify_calls(n, 200) < 0.2
    wait_for(lambda: only_stats(n).failed >= 1, timeout_s=2.5)
    assert time.monotonic() - start < 2.5  # gave up at the 0.5 s timeout, not after 3 s

    assert n.close(timeout_s=3.0) is True  # the (at most) two queued payloads time out too
    stats = only_stats(n)
    assert stats.delivered == 0 and stats.pending == 0
    # One payload in flight (if the worker took one during the loop) plus the last two.
    assert stats.failed in (2, 3) and stats.failed + stats.dropped == 200
    assert receiver.count() == stats.failed


def test_slow_receiver_does_not_delay_another_url(receiver, make_notifier, closed_port):
    receiver.delay_s = 3.0
    fast = MemoryNotifier()
    n = make_notifier([receiver.url, f"http://127.0.0.1:{closed_port}/"], timeout_s=1.0,
                      retries=0)
    sink = MultiNotifier([n, fast])
    assert sink.notify([firing()]) and sink.notify([firing()])
    wait_for(lambda: n.stats()[f"http://127.0.0.1:{closed_port}/"].failed == 2, timeout_s=0.9)
    assert len(fast.notifications) == 2


# -- retries ----------------------------------------------------------------------------------


def test_5xx_is_retried_then_counted_failed(receiver, make_notifier):
    receiver.default_code = 503
    n = make_notifier([receiver.url], retries=2, backoff_s=0.01)
    assert n.notify([firing()])
    wait_for(lambda: only_stats(n).failed == 1)
    assert receiver.count() == 3
    stats = only_stats(n)
    assert (stats.delivered, stats.retried) == (0, 2)


def test_5xx_then_success_is_delivered(receiver, make_notifier):
    receiver.codes = [500, 502]
    n = make_notifier([receiver.url], retries=3, backoff_s=0.01)
    assert n.notify([firing()])
    wait_for(lambda: only_stats(n).delivered == 1)
    assert receiver.count() == 3
    assert only_stats(n).failed == 0
    bodies = receiver.bodies()
    assert bodies[0] == bodies[1] == bodies[2]


@pytest.mark.parametrize("code", [400, 404, 429, 307])
def test_4xx_and_redirects_are_not_retried(receiver, make_notifier, code, caplog):
    receiver.default_code = code
    # A generous timeout: on a loaded machine a 2 s one can expire and be retried (as it
    # should), which is not what this test is about.
    n = make_notifier([receiver.url], retries=3, backoff_s=0.01, timeout_s=15.0)
    assert n.notify([firing()])
    wait_for(lambda: only_stats(n).failed == 1, timeout_s=20.0)
    assert receiver.count() == 1
    assert only_stats(n).retried == 0
    assert f"HTTP {code}" in caplog.text


# -- the queue and close ----------------------------------------------------------------------


def test_queue_overflow_drops_the_oldest_and_counts_it(receiver, make_notifier):
    receiver.gate = threading.Event()
    n = make_notifier([receiver.url], max_queue=2, timeout_s=5.0, retries=0)
    assert n.notify([firing("A")])
    wait_for(lambda: receiver.count() == 1)  # A is in flight, held at the gate
    for name in "BCDE":
        assert n.notify([firing(name)])
    stats = only_stats(n)
    assert (stats.dropped, stats.pending) == (2, 2)

    receiver.gate.set()
    wait_for(lambda: only_stats(n).delivered == 3)
    names = [b["commonLabels"]["alertname"] for b in receiver.bodies()]
    assert names == ["A", "D", "E"]


def test_close_drains_pending_deliveries(receiver, make_notifier):
    receiver.delay_s = 0.01
    n = make_notifier([receiver.url])
    for i in range(20):
        assert n.notify([firing(f"A{i}")])
    assert n.close(timeout_s=5.0) is True
    assert [b["commonLabels"]["alertname"] for b in receiver.bodies()] == [
        f"A{i}" for i in range(20)]
    assert only_stats(n) == DeliveryStats(delivered=20)
    assert n.notify([firing()]) is False


def test_close_stops_at_its_deadline(receiver, make_notifier):
    receiver.gate = threading.Event()
    n = make_notifier([receiver.url], timeout_s=1.0, retries=0)
    for i in range(5):
        n.notify([firing(f"A{i}")])
    wait_for(lambda: receiver.count() == 1)
    start = time.monotonic()
    assert n.close(timeout_s=0.2) is False
    assert time.monotonic() - start < 0.5
    stats = only_stats(n)
    assert (stats.dropped, stats.pending) == (4, 0)


def test_context_manager_closes(receiver):
    with WebhookNotifier([receiver.url]) as n:
        n.notify([firing()])
    assert receiver.count() == 1
    assert n.notify([firing()]) is False


# -- the other sinks --------------------------------------------------------------------------


def test_log_notifier_logs_each_notification(caplog):
    caplog.set_level(logging.INFO, logger="aggregator.notify")
    resolved = Notification("resolved", {"alertname": "B", "severity": "ticket"}, {}, T0,
                            T0 + 1, "fp-b")
    assert LogNotifier().notify([firing("A", "eu"), resolved])
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    assert "A FIRING severity=page" in caplog.records[0].getMessage()
    assert "cohort=eu" in caplog.records[0].getMessage()
    assert "B RESOLVED severity=ticket" in caplog.records[1].getMessage()


def test_multi_notifier_fans_out_and_isolates_failures(caplog):
    class Broken:
        def notify(self, notifications):
            raise RuntimeError("boom")

        def close(self, timeout_s=5.0):
            return True

    a, b = MemoryNotifier(), MemoryNotifier()
    sink = MultiNotifier([a, Broken(), b])
    assert sink.notify([firing()]) is False
    assert len(a.notifications) == len(b.notifications) == 1
    assert "Broken raised" in caplog.text
    assert sink.close(1.0) is True
    assert a.closed and b.closed


def test_every_sink_satisfies_the_protocol():
    webhook = WebhookNotifier(["http://127.0.0.1:1/"])
    try:
        for sink in (LogNotifier(), MemoryNotifier(), MultiNotifier([]), webhook):
            assert isinstance(sink, Notifier)
    finally:
        webhook.close(0.0)
