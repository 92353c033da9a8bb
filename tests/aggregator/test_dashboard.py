"""The dashboard pages' HTML without a browser: status ordering, escaping of device-supplied
labels, and the HTTP status of bad requests, against a real aggregator (gRPC + HTTP on
loopback, real SQLite) fed by real Monitors. The browser tests are in
tests/integration/test_dashboard_browser.py."""

from __future__ import annotations

import contextlib
import html.parser
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent.monitor import Monitor
from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.wire import spec_to_proto
from aggregator import dashboard
from aggregator.http import HttpContext
from aggregator.query import CohortHealth
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from aggregator.simulator import SimClock
from protos import fleetwatch_pb2_grpc as pb_grpc

W = 60
HOSTILE_REGION = "<script>alert('x')</script>"
# Labels may not hold ',' or '=' (they separate selector terms), everything else goes.
HOSTILE_HW = '"><svg onload/alert(1)><img src/x>&amp;'


def _health(cohort: dict[str, str], **kw: object) -> CohortHealth:
    base: dict[str, object] = dict(
        cohort=cohort, model="m", model_version="1", spec_hash="h", start_unix_s=0,
        end_unix_s=60, devices=3, reports=3, events=300, errors=1, error_rate=1 / 300,
        latency_p50_ms=10.0, latency_p95_ms=20.0, latency_p99_ms=30.0, latency_rank_error=0.01,
        reference_latency_ms=(10.0, 20.0, 30.0), devices_last_day=3, availability=1.0)
    base.update(kw)
    return CohortHealth(**base)  # type: ignore[arg-type]


def test_status_words_and_worst_first_ordering():
    ok = _health({"region": "a"})
    slow = _health({"region": "b"}, latency_p95_ms=31.0)          # > 1.5 x 20
    erring = _health({"region": "c"}, errors=30, error_rate=0.1)
    quiet = _health({"region": "d"}, devices=1, availability=1 / 3)
    slow_and_erring = _health({"region": "e"}, latency_p95_ms=50.0, errors=30, error_rate=0.1)
    assert dashboard.health_status(ok) == ["ok"]
    assert dashboard.health_status(slow) == ["latency"]
    assert dashboard.health_status(erring) == ["errors"]
    assert dashboard.health_status(quiet) == ["unavailable"]
    assert dashboard.health_status(slow_and_erring) == ["latency", "errors"]
    ranked = [h.cohort["region"] for h, _ in dashboard._ordered([ok, slow, erring, quiet,
                                                                 slow_and_erring])]
    # unavailable, then errors (two problems before one), then latency, then ok.
    assert ranked == ["d", "e", "c", "b", "a"]
    assert dashboard.status_rank(["drift:brightness"]) < dashboard.status_rank(["ok"])
    assert dashboard.status_rank(["latency"]) < dashboard.status_rank(["drift:x"])


# -- a real aggregator with hostile labels ------------------------------------------------------


def _spec() -> Spec:
    ref = kll_floats_sketch(200)
    ref.update(np.random.default_rng(1).lognormal(2.3, 0.3, 2000).astype(np.float32))
    return Spec(model="cam", model_version="1",
                features=(FeatureSpec("temp", NUMERIC, edges=(-1.0, 0.0, 1.0),
                                      reference_counts=(10, 40, 40, 10, 0)),),
                latency_reference_kll=ref.serialize(), window_length_s=W,
                reference_rows=100, privacy=PrivacySpec(mechanism=NO_NOISE))


class _Elements(html.parser.HTMLParser):
    """Every start tag with its attributes, and the text inside <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self.scripts += 1


def _parse(page: str) -> _Elements:
    p = _Elements()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[RunningAggregator, int, int]]:
    tmp = tmp_path_factory.mktemp("dashboard")
    base = int(time.time()) // W * W - 10 * W
    with serve(AggregatorConfig(db=tmp / "agg.sqlite", listen="127.0.0.1:0",
                                http_listen="127.0.0.1:0")) as agg:
        with grpc.insecure_channel(agg.target) as ch:
            pb_grpc.AdminStub(ch).PushSpec(spec_to_proto(_spec()), timeout=10)
        rng = np.random.default_rng(3)
        for name, labels, latency in (
                ("hostile", {"region": HOSTILE_REGION, "hw": HOSTILE_HW}, 12.0),
                ("slow", {"region": "us", "hw": "pi"}, 80.0),
                ("fine", {"region": "eu", "hw": "pi"}, 10.0)):
            clock = SimClock(base)
            with contextlib.closing(Monitor("cam", "1", name, labels=labels,
                                            aggregator=agg.target, spool_dir=tmp / name,
                                            clock=clock, background=False,
                                            grace_s=0.0)) as mon:
                for w in range(4):
                    clock.set(base + w * W + 1)
                    for x in rng.normal(0, 1, 100):
                        mon.observe({"temp": float(x)}, latency_ms=latency)
                clock.set(base + 4 * W + 1)
                assert mon.flush()
        yield agg, base, base + 4 * W


def _ctx(agg: RunningAggregator) -> HttpContext:
    return HttpContext(agg.store, agg.alerts, agg.ingestor, None)


def test_overview_escapes_device_labels_and_ranks_the_slow_cohort_first(fleet):
    agg, start, end = fleet
    page = dashboard.overview_page(_ctx(agg), {"start": str(start), "end": str(end)})
    assert HOSTILE_REGION not in page and "<img src/x>" not in page and "<svg onload" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&amp;amp;" in page   # the label's own "&amp;" stays text, escaped once more
    parsed = _parse(page)
    assert parsed.scripts == 0
    assert not any(tag == "img" or "onload/alert(1)" in a for tag, a in parsed.tags)
    rows = [a for tag, a in parsed.tags if tag == "tr" and a.get("class") == "cohort"]
    assert [r["data-cohort"] for r in rows][0] == "hw=pi,region=us"
    assert rows[0]["data-status"] == "latency"
    statuses = {r["data-cohort"]: r["data-status"] for r in rows}
    assert statuses["hw=pi,region=eu"] == "ok"
    # The attribute round-trips to the raw label (escaped in the HTML, intact in the DOM).
    assert f"hw={HOSTILE_HW},region={HOSTILE_REGION}" in statuses
    # Every link stays on this server.
    hrefs = [a["href"] for tag, a in parsed.tags if tag == "a"]
    assert hrefs and all(h.startswith("/") for h in hrefs)


def test_cohort_page_of_a_hostile_cohort_is_escaped_and_charts_its_latency(fleet):
    agg, start, end = fleet
    page = dashboard.cohort_page(_ctx(agg), {
        "start": str(start), "end": str(end),
        "cohort": f"region={HOSTILE_REGION},hw={HOSTILE_HW}"})
    assert HOSTILE_REGION not in page and "<img src/x>" not in page and "<svg onload" not in page
    parsed = _parse(page)
    assert parsed.scripts == 0
    points = [a for tag, a in parsed.tags if tag == "circle" and a.get("data-series") == "p95"]
    assert len(points) == 4   # one per window with data
    assert all(float(p["data-value"]) == pytest.approx(12.0, rel=0.05) for p in points)
    cells = [a for tag, a in parsed.tags if tag == "g" and a.get("class") == "cell"]
    assert {c["data-feature"] for c in cells} == {"temp"}


def test_bad_parameters_are_400_and_unknown_things_404_over_http(fleet):
    agg, start, end = fleet

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{agg.http_port}{path}",
                                        timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(f"/?start={start}&end={end}") == 200
    assert status("/alerts") == 200
    assert status("/?since=yesterday") == 400
    assert status("/?by=nosuchkey") == 400
    assert status("/cohort?cohort=justtext") == 400
    assert status("/cohort?cohort=region=mars") == 404
    assert status("/?model=nosuchmodel") == 404
    with pytest.raises(dashboard.BadRequest, match="since"):
        dashboard.overview_page(_ctx(agg), {"since": "0"})


def test_empty_aggregator_pages_say_what_to_do(tmp_path: Path):
    with serve(AggregatorConfig(db=tmp_path / "a.sqlite", listen="127.0.0.1:0")) as agg:
        ctx = _ctx(agg)
        assert "fleetwatch spec push" in dashboard.overview_page(ctx, {})
        assert "without alert rules" in dashboard.alerts_page(ctx, {})
        with pytest.raises(dashboard.NotFound):
            dashboard.cohort_page(ctx, {"cohort": "region=eu"})
