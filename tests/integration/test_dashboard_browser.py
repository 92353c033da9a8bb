"""The web dashboard in a real headless Chromium (Debian's /usr/bin/chromium), served by the
real aggregator's HTTP endpoint on loopback, fed by the simulated fleet (`run_fleet`: 40
devices in 8 region x hw cohorts over 15 minutes, covariate drift in hw=jetson,region=eu from
minute 3, a 4x latency incident in hw=pi,region=us from minute 4) with the demo's alert rules.

Assertions read the DOM as Chromium rendered it (`--dump-dom`). Screenshots (1400x1000) of
every page are saved in test-artifacts/dashboard/ at the repository root (git-ignored) for a
human to look at.

Without /usr/bin/chromium the tests SKIP, unless FLEETWATCH_REQUIRE_BROWSER=1 (set by .ci/run,
which installs it): then they FAIL.
"""

from __future__ import annotations

import dataclasses
import html.parser
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from agent.wire import spec_to_proto
from aggregator.baseline import build_spec_from_columns
from aggregator.demo import DEMO_RULES
from aggregator.server import AggregatorConfig, serve
from aggregator.simulator import (
    CATEGORICAL_FEATURES,
    LABEL_COLUMN,
    LATENCY_COLUMN,
    MINUTE_S,
    PREDICTION_COLUMN,
    FleetConfig,
    reference_columns,
    run_fleet,
)
from protos import fleetwatch_pb2_grpc as pb_grpc

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
DRIFTED = "hw=jetson,region=eu"
INCIDENT = "hw=pi,region=us"
CLEAN = "hw=pi,region=eu"
MINUTES = 15
DRIFT_START = 3
INCIDENT_START = 4
BROWSER_TIMEOUT_S = 60


def _require_browser() -> None:
    if os.access(CHROMIUM, os.X_OK):
        return
    message = (f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y "
               "chromium chromium-driver) to run the dashboard's browser tests")
    if os.environ.get("FLEETWATCH_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (FLEETWATCH_REQUIRE_BROWSER=1: required here)")
    pytest.skip(message)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-proxy-server", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=True)


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], ""

    def all(self, tag: str, **attrs: str) -> list[Node]:
        out = []
        for c in self.children:
            if c.tag == tag and all(c.attrs.get(k.rstrip("_")) == v for k, v in attrs.items()):
                out.append(c)
            out.extend(c.all(tag, **attrs))
        return out

    def one(self, tag: str, **attrs: str) -> Node:
        (found,) = self.all(tag, **attrs)
        return found

    def text_content(self) -> str:
        return self.text + "".join(c.text_content() for c in self.children)


_VOID = {"meta", "input", "br", "img", "link", "hr", "rect", "line", "polyline", "circle"}


class _Tree(html.parser.HTMLParser):
    """The rendered DOM as a tree (Chromium's serialization closes every element)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        node = self.stack[-1]
        if node.children:
            node.children[-1].text += data  # tail text: close enough for text_content
        else:
            node.text += data


def _dom(text: str) -> Node:
    tree = _Tree()
    tree.feed(text)
    return tree.root


@dataclasses.dataclass
class Rendered:
    start: int
    end: int
    doms: dict[str, Node]
    shots: Path   # this run's own copies (ARTIFACTS may be rewritten by another run)


PAGES = {
    "overview": ("/", {"explain": "latency_p95_ms"}),
    "cohort-drifted": ("/cohort", {"cohort": DRIFTED, "drift_window": "10m"}),
    "cohort-incident": ("/cohort", {"cohort": INCIDENT, "drift_window": "10m"}),
    "cohort-clean": ("/cohort", {"cohort": CLEAN, "drift_window": "10m"}),
    "alerts": ("/alerts", {}),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Iterator[Rendered]:
    _require_browser()
    tmp = tmp_path_factory.mktemp("dashboard-browser")
    (tmp / "rules.toml").write_text(DEMO_RULES)
    base = FleetConfig()
    # 5 devices per cohort: enough to judge drift over 10 minutes under the privacy noise.
    config = dataclasses.replace(
        base, devices=40, minutes=MINUTES, seed=11,
        drift=dataclasses.replace(base.drift, start_minute=DRIFT_START),
        incident=dataclasses.replace(base.incident, start_minute=INCIDENT_START,
                                     end_minute=None))
    with serve(AggregatorConfig(db=tmp / "agg.sqlite", listen="127.0.0.1:0",
                                http_listen="127.0.0.1:0", rules_path=tmp / "rules.toml",
                                alert_idle_flush_s=1.0)) as agg:
        spec = build_spec_from_columns(
            reference_columns(20_000, 11), model=config.model,
            model_version=config.model_version, prediction_col=PREDICTION_COLUMN,
            latency_col=LATENCY_COLUMN, label_col=LABEL_COLUMN,
            categorical=tuple(CATEGORICAL_FEATURES))
        with grpc.insecure_channel(agg.target) as channel:
            pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec), timeout=30)
        end = int(time.time()) // MINUTE_S * MINUTE_S
        start = end - MINUTES * MINUTE_S
        run_fleet(config, agg.target, tmp / "spools", start)
        key = f"{spec.model}/{spec.model_version}"
        deadline = time.monotonic() + 60
        assert agg.alerts is not None
        while agg.alerts.view().evaluated_until.get(key, 0) < end:
            assert time.monotonic() < deadline, "alert rules did not reach the last window"
            time.sleep(0.2)
        shots = tmp / "shots"
        shots.mkdir()

        def load(name: str) -> tuple[str, str]:
            path, params = PAGES[name]
            url = (f"http://127.0.0.1:{agg.http_port}{path}?"
                   + urllib.parse.urlencode({**params, "start": start, "end": end}))
            dom = _chromium(tmp / f"profile-{name}", "--dump-dom", url).stdout
            (shots / f"{name}.html").write_text(dom)
            _chromium(tmp / f"profile-{name}-shot", f"--screenshot={shots / name}.png",
                      "--window-size=1400,1000", "--hide-scrollbars", url)
            return name, dom

        with ThreadPoolExecutor(max_workers=3) as pool:
            doms = dict(pool.map(load, PAGES))
        # Published for people to look at; overwritten (not deleted first), so two runs at
        # once cannot pull the files from under each other.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for f in shots.iterdir():
            shutil.copyfile(f, ARTIFACTS / f.name)
    yield Rendered(start, end, {k: _dom(v) for k, v in doms.items()}, shots)


def test_overview_ranks_the_drifted_and_slow_cohorts_above_the_clean_ones(rendered):
    dom = rendered.doms["overview"]
    rows = dom.one("table", id="cohorts").all("tr", class_="cohort")
    assert len(rows) == 8
    status = {r.attrs["data-cohort"]: r.attrs["data-status"].split() for r in rows}
    rank = {r.attrs["data-cohort"]: int(r.attrs["data-rank"]) for r in rows}
    assert "drift" in status[DRIFTED]
    assert status[INCIDENT] == ["latency"]
    clean = [c for c in status if c not in (DRIFTED, INCIDENT)]
    assert all(status[c] == ["ok"] for c in clean), status
    assert max(rank[DRIFTED], rank[INCIDENT]) < min(rank[c] for c in clean)
    # Colour is not the only signal: the status is written in the row.
    incident_row = next(r for r in rows if r.attrs["data-cohort"] == INCIDENT)
    assert "latency" in incident_row.text_content()
    assert any("ok" == b.text_content().strip() for r in rows for b in r.all("span"))
    # Each row links to its cohort page.
    link = next(a for a in incident_row.all("a"))
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(link.attrs["href"]).query)["cohort"] \
        == [INCIDENT]
    # The firing alerts come first, above the table.
    active = dom.one("div", id="active-alerts")
    firing = {(a.attrs["data-rule"], a.attrs["data-cohort"])
              for a in active.all("tr", class_="alert") if a.attrs["data-state"] == "firing"}
    assert ("latency-p95", INCIDENT) in firing


def test_overview_root_cause_names_the_incident(rendered):
    explain = rendered.doms["overview"].one("div", id="explain")
    top = explain.all("tr", class_="contribution")
    assert top, "no contribution ranked"
    # The incident is hw=pi AND region=us: along either key it is the largest contributor.
    assert top[0].attrs["data-cohort"] in ("hw=pi", "region=us")
    assert {t.attrs["data-cohort"] for t in top[:2]} == {"hw=pi", "region=us"}


def _points(dom: Node, series: str) -> list[tuple[int, float]]:
    chart = dom.one("svg", id="latency-chart")
    return [(int(c.attrs["data-t"]), float(c.attrs["data-value"]))
            for c in chart.all("circle", class_="point") if c.attrs["data-series"] == series]


def _cells(dom: Node) -> list[dict[str, str]]:
    return [c.attrs for c in dom.one("svg", id="drift-heatmap").all("g", class_="cell")]


def test_incident_cohort_page_shows_latency_over_its_reference(rendered):
    dom = rendered.doms["cohort-incident"]
    assert dom.one("p", id="cohort-status").attrs["data-status"] == "latency"
    reference = float(dom.one("svg", id="latency-chart").attrs["data-reference"])
    p95 = _points(dom, "p95")
    assert len(p95) == MINUTES
    before = [v for t, v in p95 if t < rendered.start + INCIDENT_START * MINUTE_S]
    after = [v for t, v in p95 if t >= rendered.start + (INCIDENT_START + 1) * MINUTE_S]
    assert before and after
    assert all(v < 1.5 * reference for v in before), (before, reference)
    assert all(v > 1.5 * reference for v in after), (after, reference)
    # The reference is drawn as a dashed line.
    line = dom.one("svg", id="latency-chart").one("line", class_="reference")
    assert line.attrs["stroke-dasharray"]
    alerts = dom.all("tr", class_="alert")
    assert any(a.attrs["data-rule"] == "latency-p95" and a.attrs["data-state"] == "firing"
               for a in alerts)
    assert dom.one("table", id="privacy")


def test_drifted_cohort_page_marks_drift_after_it_began(rendered):
    dom = rendered.doms["cohort-drifted"]
    assert "drift" in dom.one("p", id="cohort-status").attrs["data-status"].split()
    cells = _cells(dom)
    drifting = [c for c in cells if c["data-drifting"] == "1"]
    assert any(c["data-feature"] == "brightness" for c in drifting)
    onset = rendered.start + DRIFT_START * MINUTE_S
    # A cell covers the trailing range up to its step's end: before the onset nothing drifts.
    assert all(int(c["data-t"]) + MINUTE_S > onset for c in drifting)
    # Accuracy is charted (the fleet sends late labels).
    assert dom.one("svg", id="accuracy-chart").all("circle", class_="point")


def test_clean_cohort_page_is_ok(rendered):
    dom = rendered.doms["cohort-clean"]
    assert dom.one("p", id="cohort-status").attrs["data-status"] == "ok"
    assert not [c for c in _cells(dom) if c["data-drifting"] == "1"]
    assert not dom.all("tr", class_="alert")


def test_alerts_page_lists_the_firing_alerts_with_runbooks(rendered):
    dom = rendered.doms["alerts"]
    rows = dom.all("tr", class_="alert")
    firing = {(r.attrs["data-rule"], r.attrs["data-cohort"]) for r in rows
              if r.attrs["data-state"] == "firing"}
    assert ("latency-p95", INCIDENT) in firing
    assert ("feature-drift", DRIFTED) in firing
    assert all(c == INCIDENT or c == DRIFTED for _, c in firing), firing
    latency = next(r for r in rows if r.attrs["data-rule"] == "latency-p95")
    assert [a.attrs["href"] for a in latency.all("a") if a.text_content() == "runbook"] == \
        ["https://runbooks.example/fleetwatch/latency"]
    assert dom.all("tr", class_="budget"), "the errors SLO's budgets are listed"


def test_screenshots_are_saved(rendered):
    for name in PAGES:
        png = rendered.shots / f"{name}.png"
        assert png.stat().st_size > 10_000, png
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (ARTIFACTS / f"{name}.png").is_file()
