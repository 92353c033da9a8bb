"""Review of issue 4, end to end: real Monitors reporting over gRPC to a real aggregator.

Tests marked ``xfail(strict=True)`` demonstrate a bug (the reason names it); the others pin
behaviour the review checked and found right. The engine-, SLI- and compare-level findings are
in tests/aggregator/test_review_issue4.py (this file cannot share that basename: pytest
imports both as top-level modules, and the suite would not collect).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import WINDOW_S, make_spec, push_spec  # pytest puts tests/integration on sys.path

from agent import Monitor
from agent.spec import BINARY, LabelSpec, Spec
from aggregator.cli import main
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

GRACE_S = 2.0


class SimClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


def label_spec() -> Spec:
    """The shared spec, another version, with a binary label task on its score."""
    return dataclasses.replace(make_spec(model_version="L"),
                               labels=LabelSpec(BINARY, classes=("neg", "pos")))


def monitor(target: str, spec: Spec, device: str, spool: Path, clock: SimClock,
            region: str = "eu") -> Monitor:
    return Monitor(spec.model, spec.model_version, device, labels={"region": region},
                   aggregator=target, spool_dir=spool, clock=clock, spec=spec,
                   background=False, grace_s=GRACE_S)


def events(mon: Monitor, n: int, request_ids: list[str] | None = None,
           latency_ms: float = 5.0) -> None:
    mon.observe_batch({"temp": np.zeros(n), "speed": np.full(n, 15.0),
                       "scene": np.full(n, "indoor", dtype=object)},
                      predictions=np.full(n, 0.9), latency_ms=np.full(n, latency_ms),
                      request_ids=request_ids)


def health(target: str, spec: Spec, start: int, end: int,
           group_by: tuple[str, ...] = ()) -> list[pb.CohortHealth]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.QueryStub(channel).CohortHealth(pb.CohortHealthRequest(
            model=spec.model, model_version=spec.model_version, group_by=list(group_by),
            start_unix_s=start, end_unix_s=end), timeout=30, wait_for_ready=True).cohorts)


def strict_json(text: str) -> object:
    """json.loads that refuses NaN / Infinity (not JSON: jq and most parsers reject them)."""
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


# -- ground truth across an agent restart ---------------------------------------------------------

def test_labels_join_after_an_agent_restart(start_aggregator, tmp_path: Path) -> None:
    spec = label_spec()
    base = (int(time.time()) // WINDOW_S - 30) * WINDOW_S
    ids = [f"req-{i}" for i in range(20)]
    with start_aggregator(tmp_path / "agg.sqlite") as agg:
        push_spec(agg.target, spec)
        clock = SimClock(base + 5)
        mon = monitor(agg.target, spec, "dev-1", tmp_path / "spool", clock)
        events(mon, 20, ids)
        clock.t = base + WINDOW_S + GRACE_S + 1
        mon.close()
        clock.t += 60  # rebooted a minute later; the labels come after it
        mon = monitor(agg.target, spec, "dev-1", tmp_path / "spool", clock)
        joined = mon.label_batch(ids, [1] * 20)
        clock.t += 2 * WINDOW_S
        assert mon.flush()
        stats = mon.stats()
        mon.close()
        [h] = health(agg.target, spec, base, base + 10 * WINDOW_S)
        assert (joined, stats.labels_unmatched) == (20, 0)
        assert h.labeled == 20 and h.labels_unmatched == 0


# -- heartbeats over a long idle gap ------------------------------------------------------------

def test_a_three_hour_idle_gap_is_covered_by_heartbeats_window_by_window(
        start_aggregator, spec: Spec, tmp_path: Path) -> None:
    """A device with no traffic for 3 hours still reports every window (a heartbeat), so the
    aggregator sees it available throughout; the heartbeats carry no latency and no noise."""
    idle = 180
    base = (int(time.time()) // WINDOW_S - idle - 10) * WINDOW_S
    with start_aggregator(tmp_path / "agg.sqlite") as agg:
        clock = SimClock(base + 5)
        mon = monitor(agg.target, spec, "dev-1", tmp_path / "spool", clock)
        events(mon, 10)
        for w in range(1, idle + 2):          # poll once per window, as the thread would
            clock.t = base + w * WINDOW_S + GRACE_S + 1
            assert mon.poll(), mon.stats().last_delivery_error
        events(mon, 10)                       # traffic again in window idle + 1
        clock.t = base + (idle + 2) * WINDOW_S + GRACE_S + 1
        assert mon.flush()
        assert mon.stats().heartbeats == idle
        mon.close()
        [whole] = health(agg.target, spec, base, base + (idle + 2) * WINDOW_S)
        assert (whole.devices, whole.reports, whole.heartbeats, whole.events) == (
            1, idle + 2, idle, 20)
        assert whole.availability == 1.0
        mid = base + 90 * WINDOW_S
        [quiet] = health(agg.target, spec, mid, mid + WINDOW_S)
        assert (quiet.devices, quiet.heartbeats, quiet.events) == (1, 1, 0)
        assert quiet.availability == 1.0 and quiet.devices_last_day == 1
        assert math.isnan(quiet.latency_p95_ms) and math.isnan(quiet.error_rate)
        assert quiet.noise_sd_per_bin == 0.0


# -- compare: exit codes and --json ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_versions(start_aggregator, spec: Spec, tmp_path_factory: pytest.TempPathFactory):
    """Versions "1" (eu, us) and "2" (eu, us, ap) with the same traffic and no labels."""
    tmp = tmp_path_factory.mktemp("review-compare")
    base = (int(time.time()) // WINDOW_S - 20) * WINDOW_S
    rng = np.random.default_rng(11)
    with start_aggregator(tmp / "agg.sqlite") as agg:
        # A spec's hash covers its reference KLL bytes, which differ from build to build:
        # the monitors take the very objects the aggregator has.
        specs = {"1": spec, "2": make_spec(model_version="2")}
        push_spec(agg.target, specs["2"])
        for version, regions in (("1", ("eu", "us")), ("2", ("eu", "us", "ap"))):
            for region in regions:
                clock = SimClock(base + 5)
                mon = monitor(agg.target, specs[version], f"v{version}-{region}",
                              tmp / version / region, clock, region)
                for w in range(3):
                    clock.t = base + w * WINDOW_S + 5
                    n = 300
                    mon.observe_batch({"temp": rng.normal(0, 1, n)},
                                      predictions=rng.beta(2, 3, n),
                                      latency_ms=rng.lognormal(2.8, 0.4, n),
                                      errors=rng.random(n) < 0.02)
                clock.t = base + 3 * WINDOW_S + GRACE_S + 1
                assert mon.flush()
                mon.close()
        yield agg, base, base + 3 * WINDOW_S


def compare(capsys, agg_base_end, *extra: str) -> tuple[int, str, str]:
    agg, base, end = agg_base_end
    code = main(["compare", "--aggregator", agg.target, "--model", "detector", "--baseline",
                 "1", "--candidate", "2", "--by", "region", "--until", str(end), "--since",
                 f"{end - base}s", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_json_is_strict_json_with_nulls_for_the_missing_side(two_versions,
                                                                      capsys) -> None:
    code, out, _ = compare(capsys, two_versions, "--json", "--fail-on", "latency_p95_ms")
    assert code == 0
    doc = strict_json(out)
    assert isinstance(doc, dict)
    assert [c["cohort"] for c in doc["cohorts"]] == [{"region": r} for r in ("ap", "eu", "us")]
    ap = {m["metric"]: m for m in doc["cohorts"][0]["metrics"]}
    assert ap["latency_p95_ms"]["baseline"] is None and ap["latency_p95_ms"]["worse"] is False
    assert doc["tests"] == 8  # eu and us: error rate and three latency quantiles each
    assert doc["corrected_alpha"] == pytest.approx(doc["alpha"] / 8)


def test_compare_does_not_pass_silently_when_a_gated_metric_was_never_tested(
        two_versions, capsys) -> None:
    code, _, err = compare(capsys, two_versions, "--fail-on", "accuracy")
    assert code != 0 or "accuracy" in err


def test_compare_unknown_version_and_dead_aggregator_are_errors_not_gate_verdicts(
        two_versions, capsys) -> None:
    agg, base, end = two_versions
    code = main(["compare", "--aggregator", agg.target, "--model", "detector", "--baseline",
                 "1", "--candidate", "9", "--until", str(end), "--since", "10m"])
    _, err = capsys.readouterr()
    assert code == 1 and "detector/9" in err
    code = main(["alerts", "--aggregator", "127.0.0.1:1", "--timeout", "2"])
    _, err = capsys.readouterr()
    assert code == 1 and "cannot reach" in err


def test_health_json_of_a_heartbeat_only_window_is_strict_json(start_aggregator, spec: Spec,
                                                               tmp_path: Path, capsys) -> None:
    base = (int(time.time()) // WINDOW_S - 10) * WINDOW_S
    with start_aggregator(tmp_path / "agg.sqlite") as agg:
        clock = SimClock(base + 5)
        mon = monitor(agg.target, spec, "dev-1", tmp_path / "spool", clock)
        clock.t = base + 2 * WINDOW_S + GRACE_S + 1
        assert mon.flush()
        mon.close()
        code = main(["health", "--aggregator", agg.target, "--model", "detector", "--until",
                     str(base + 2 * WINDOW_S), "--since", "2m", "--json"])
        out, _ = capsys.readouterr()
    assert code == 0
    doc = strict_json(out)
    assert isinstance(doc, list) and len(doc) == 1
    assert doc[0]["heartbeats"] == 2 and doc[0]["events"] == 0
