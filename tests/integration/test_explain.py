"""`fleetwatch explain` end to end: the demo's kind of fleet against a real aggregator.

A simulated fleet (`aggregator.simulator.run_fleet`: 40 devices in 8 region x hw cohorts over
12 minutes, the demo's spec and privacy noise) reports over gRPC on loopback to a real
aggregator with a real SQLite file; covariate drift hits hw=jetson,region=eu from minute 3 and a
4x latency incident hw=pi,region=us from minute 4. The Query service's Explain must rank the
injected cohort first along each key, and its numbers must match an independent computation on
the fleet's truth (`FleetTruth`: raw latencies and exact histograms per cohort):

- latency: the leave-one-out p95 from numpy on the raw latencies of every other cohort, within
  the KLL sketch's rank error;
- PSI: the histograms are noisy (discrete Laplace per report), so the truth's exact counts are
  pushed through the same noise many times (Gaussian with the noise plan's variance times the
  reports, which is what a sum of hundreds of discrete Laplace draws is) and scored as the
  health query scores a merge; the aggregator's value must lie within 4.5 sd of that spread
  (the overlapping "fleet without" sets share one realization of the noise; over repeated
  runs their z-scores stayed within +-2.2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import aggregator.explain
from agent.privacy import noise_plan
from agent.spec import Spec
from agent.wire import spec_to_proto
from aggregator.baseline import build_spec_from_columns
from aggregator.cli import main
from aggregator.drift import feature_drift, psi, suppress_noise
from aggregator.explain import explain
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from aggregator.simulator import (
    CATEGORICAL_FEATURES,
    LABEL_COLUMN,
    LATENCY_COLUMN,
    MINUTE_S,
    PREDICTION_COLUMN,
    Drift,
    FleetConfig,
    FleetTruth,
    Incident,
    reference_columns,
    run_fleet,
)
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

CONFIG = FleetConfig(devices=40, minutes=12, drift=Drift(start_minute=3),
                     incident=Incident(start_minute=4), device_prefix="explain")
REFERENCE_ROWS = 20_000
# KLL k=200 single-rank error (~99%), plus the rank of one item among ~60k and float32 ties.
RANK_ERROR = 0.0133 + 0.002
NOISE_DRAWS = 300


@dataclasses.dataclass(frozen=True)
class Fleet:
    aggregator: RunningAggregator
    spec: Spec
    truth: FleetTruth
    start: int
    end: int

    def explain(self, metric: str, **kwargs: object) -> pb.ExplainResponse:
        with grpc.insecure_channel(self.aggregator.target) as channel:
            return pb_grpc.QueryStub(channel).Explain(pb.ExplainRequest(
                model=self.spec.model, metric=metric, start_unix_s=self.start,
                end_unix_s=self.end, **kwargs), timeout=30)

    def cohorts_without(self, key: str, value: str) -> list:
        return [c for c in self.truth.cohorts.values() if c.labels[key] != value]

    def cohorts_with(self, key: str, value: str) -> list:
        return [c for c in self.truth.cohorts.values() if c.labels[key] == value]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("explain")
    spec = build_spec_from_columns(
        reference_columns(REFERENCE_ROWS, CONFIG.seed), model=CONFIG.model,
        model_version=CONFIG.model_version, prediction_col=PREDICTION_COLUMN,
        latency_col=LATENCY_COLUMN, label_col=LABEL_COLUMN,
        categorical=tuple(CATEGORICAL_FEATURES))
    assert spec.privacy.noisy  # the demo's privacy: the PSI check below must face the noise
    with serve(AggregatorConfig(db=tmp / "aggregator.sqlite", listen="127.0.0.1:0",
                                workers=4)) as agg:
        with grpc.insecure_channel(agg.target) as channel:
            pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec), timeout=10)
        end = int(time.time()) // MINUTE_S * MINUTE_S
        start = end - CONFIG.minutes * MINUTE_S
        truth = run_fleet(CONFIG, agg.target, pathlib.Path(tmp / "spools"), start)
        yield Fleet(agg, spec, truth, start, end)


def _by_key(resp: pb.ExplainResponse) -> dict[str, list[pb.CohortContribution]]:
    out: dict[str, list[pb.CohortContribution]] = {}
    for c in resp.contributions:
        out.setdefault(c.key, []).append(c)
    return out


def _within_rank(raw: np.ndarray, value: float, q: float) -> bool:
    ordered = np.sort(raw)
    lo = np.searchsorted(ordered, np.float32(value), side="left") / ordered.size
    hi = np.searchsorted(ordered, np.float32(value), side="right") / ordered.size
    return lo - RANK_ERROR <= q <= hi + RANK_ERROR


def test_the_latency_incident_is_ranked_first_along_each_key(fleet: Fleet) -> None:
    resp = fleet.explain("latency_p95_ms")
    assert resp.higher_is_worse and resp.metric == "latency_p95_ms"
    by_key = _by_key(resp)
    assert set(by_key) == {"region", "hw"}
    assert (by_key["hw"][0].value, by_key["region"][0].value) == ("pi", "us")
    # Across keys, removing hw=pi and removing region=us both remove the whole incident and
    # leave clean cohorts only: their p95s differ by less than the KLL rank error, so which
    # of the two ranks first is a coin toss (it was asserted once and failed 1 run in ~10).
    assert (resp.contributions[0].key, resp.contributions[0].value) in {("hw", "pi"),
                                                                        ("region", "us")}
    assert len(by_key["region"]) == len(CONFIG.regions) and len(by_key["hw"]) == 2
    # The fleet is well past its reference, and removing the incident's cohort brings most of
    # it back: the share of the regression is large and positive.
    assert resp.fleet_value > 1.5 * resp.reference_value
    assert by_key["hw"][0].contribution_share > 0.5
    assert by_key["region"][0].contribution_share > 0.5
    for rows in by_key.values():
        assert all(r.contribution < rows[0].contribution for r in rows[1:])


def test_latency_numbers_match_the_raw_latencies(fleet: Fleet) -> None:
    resp = fleet.explain("latency_p95_ms")
    everything = np.concatenate([c.latencies_ms for c in fleet.truth.cohorts.values()])
    assert _within_rank(everything, resp.fleet_value, 0.95)
    reference = reference_columns(REFERENCE_ROWS, CONFIG.seed)[LATENCY_COLUMN]
    assert _within_rank(np.asarray(reference, np.float32), resp.reference_value, 0.95)
    regression = resp.fleet_value - resp.reference_value
    for c in resp.contributions:
        mine, others = fleet.cohorts_with(c.key, c.value), fleet.cohorts_without(c.key, c.value)
        assert _within_rank(np.concatenate([t.latencies_ms for t in others]),
                            c.fleet_without, 0.95), (c.key, c.value)
        assert _within_rank(np.concatenate([t.latencies_ms for t in mine]),
                            c.cohort_value, 0.95), (c.key, c.value)
        events = sum(t.events for t in mine)
        assert c.events == events
        assert c.event_share == pytest.approx(events / fleet.truth.events)
        assert c.contribution == pytest.approx(resp.fleet_value - c.fleet_without)
        assert c.contribution_share == pytest.approx(c.contribution / regression)
    # numpy's own leave-one-out agrees on the order within each key.
    for key in ("region", "hw"):
        values = sorted({c.labels[key] for c in fleet.truth.cohorts.values()})
        exact = {v: np.quantile(np.concatenate([t.latencies_ms for t in
                                                fleet.cohorts_without(key, v)]), 0.95)
                 for v in values}
        assert min(exact, key=exact.get) == _by_key(resp)[key][0].value


def _noisy_psi(fleet: Fleet, cohorts: list, name: str,
               rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """The exact PSI of the cohorts' merged truth, and NOISE_DRAWS scores of it under noise."""
    feature = next(f for f in fleet.spec.features if f.name == name)
    counts = np.sum([c.feature_counts[name] for c in cohorts], axis=0)
    plan = noise_plan(fleet.spec)
    assert plan is not None
    # One report per device and minute: every device has events every minute.
    variance = plan.variance_per_bin * sum(c.devices for c in cohorts) * CONFIG.minutes
    draws = counts + np.rint(rng.normal(0.0, math.sqrt(variance),
                                        (NOISE_DRAWS, counts.size))).astype(np.int64)
    scores = np.array([feature_drift(feature, suppress_noise(d, variance,
                                                             feature.reference_counts)).psi
                       for d in draws])
    return psi(np.asarray(feature.reference_counts), counts), scores


def test_the_drift_is_ranked_first_and_matches_the_exact_histograms(fleet: Fleet) -> None:
    resp = fleet.explain("psi:brightness")
    by_key = _by_key(resp)
    assert (by_key["region"][0].value, by_key["hw"][0].value) == ("eu", "jetson")
    assert resp.reference_value == 0.0 and resp.higher_is_worse
    rng = np.random.default_rng(11)
    exact_without = {}
    for c in resp.contributions:
        exact, noisy = _noisy_psi(fleet, fleet.cohorts_without(c.key, c.value), "brightness",
                                  rng)
        exact_without[(c.key, c.value)] = exact
        assert abs(c.fleet_without - noisy.mean()) <= 4.5 * noisy.std(), \
            (c.key, c.value, c.fleet_without, noisy.mean(), noisy.std(), exact)
        _, own = _noisy_psi(fleet, fleet.cohorts_with(c.key, c.value), "brightness", rng)
        assert abs(c.cohort_value - own.mean()) <= 4.5 * own.std(), (c.key, c.value)
        assert c.contribution == pytest.approx(resp.fleet_value - c.fleet_without)
    # Without noise the same cohorts come first: removing them leaves the least drift.
    for key in ("region", "hw"):
        rows = by_key[key]
        assert min(rows, key=lambda r: exact_without[(key, r.value)]).value == rows[0].value
    # The drifted cohort's own PSI is the highest of its key. (No fixed factor: region=eu is
    # half drifted (jetson) and half clean (pi), ~0.1, while a clean region's PSI under this
    # fleet's privacy noise reaches ~0.05: a 3x margin failed once in CI.)
    assert by_key["region"][0].cohort_value > max(r.cohort_value
                                                   for r in by_key["region"][1:])


def test_a_selector_and_keys_narrow_the_question(fleet: Fleet) -> None:
    resp = fleet.explain("latency_p95_ms", selector={"region": "us"}, keys=["hw"])
    assert [(c.key, c.value) for c in resp.contributions][0] == ("hw", "pi")
    assert {c.key for c in resp.contributions} == {"hw"}
    # The selection is region=us alone: its events are the shares' whole.
    us = fleet.cohorts_with("region", "us")
    assert sum(c.events for c in resp.contributions) == sum(t.events for t in us)
    # Default keys leave out the one the selector fixes.
    assert {c.key for c in fleet.explain("error_rate", selector={"region": "us"}).contributions
            } == {"hw"}
    assert len(fleet.explain("latency_p95_ms", limit=1).contributions) == 2  # one per key


def test_the_domain_function_and_the_rpc_agree(fleet: Fleet) -> None:
    direct = explain(fleet.aggregator.store, fleet.spec.model, metric="error_rate",
                     start=fleet.start, end=fleet.end)
    assert direct.fleet_value == pytest.approx(fleet.truth.errors / fleet.truth.events)
    assert direct == fleet.explain("error_rate")   # additive metrics: exactly the same
    for c in direct.contributions:   # exact counts: leave-one-out by subtraction is exact
        others, mine = (fleet.cohorts_without(c.key, c.value),
                        fleet.cohorts_with(c.key, c.value))
        assert c.fleet_without == pytest.approx(sum(t.errors for t in others)
                                                / sum(t.events for t in others), rel=1e-12)
        assert c.cohort_value == pytest.approx(sum(t.errors for t in mine)
                                               / sum(t.events for t in mine), rel=1e-12)


def test_latency_work_is_bounded_to_the_largest_cohorts(fleet: Fleet,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_SKETCH_COHORTS values a key's smallest cohorts are not ranked for latency; the
    largest still get an exact leave-one-out (the rest folded into one sketch)."""
    monkeypatch.setattr(aggregator.explain, "MAX_SKETCH_COHORTS", 2)
    resp = explain(fleet.aggregator.store, fleet.spec.model, metric="latency_p95_ms",
                   start=fleet.start, end=fleet.end, keys=["region"])
    events = {r: sum(t.events for t in fleet.cohorts_with("region", r)) for r in CONFIG.regions}
    largest = sorted(events, key=events.get, reverse=True)[:2]
    assert sorted(c.value for c in resp.contributions) == sorted(largest)
    for c in resp.contributions:
        others = np.concatenate([t.latencies_ms for t in fleet.cohorts_without("region", c.value)])
        assert _within_rank(others, c.fleet_without, 0.95), c.value
    # Additive metrics subtract: every value is ranked whatever the bound.
    assert len(explain(fleet.aggregator.store, fleet.spec.model, metric="error_rate",
                       start=fleet.start, end=fleet.end, keys=["region"]).contributions) == 4


@pytest.mark.parametrize("metric,keys,needle", [
    ("psi:nope", [], "no feature 'nope'"),
    ("events", [], "cannot explain 'events'"),
    ("latency_p95_ms", ["site"], "'site' is not a label"),
])
def test_what_cannot_be_explained_is_refused(fleet: Fleet, metric: str, keys: list[str],
                                             needle: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        fleet.explain(metric, keys=keys)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def _cli(fleet: Fleet, *extra: str) -> list[str]:
    return ["explain", "--aggregator", fleet.aggregator.target, "--model", "detector",
            "--until", str(fleet.end), "--since", f"{fleet.end - fleet.start}s", *extra]


def test_the_cli_prints_a_ranked_table_and_a_verdict(fleet: Fleet,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_cli(fleet, "--metric", "latency_p95_ms")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("key "))
    for column in ("value", "cohort", "fleet without", "contribution", "of regression",
                   "events"):
        assert column in lines[header]
    first = lines[header + 2].split()
    assert first[:2] in (["hw", "pi"], ["region", "us"])  # a tie within the rank error
    top, other = ("hw=pi", "region=us") if first[:2] == ["hw", "pi"] else ("region=us", "hw=pi")
    verdict = lines[-1]
    assert verdict.startswith("latency_p95_ms: ") and f"of the regression comes from {top}" \
        in verdict and f"({other}: " in verdict, verdict
    assert "\033[" not in out  # captured output is no terminal: no color

    assert main(_cli(fleet, "--metric", "psi:brightness", "--by", "region", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metric"] == "psi:brightness" and data["schema"] == 1
    top = data["contributions"][0]
    assert top["value"] == "eu"
    assert {c["key"] for c in data["contributions"]} == {"region"}
    if top["contribution"] is not None and top["contribution"] > 0:
        assert "region=eu" in data["verdict"]
    else:
        # This small fleet's privacy noise can leave the fleet's PSI no higher than the
        # fleet's without eu (seen once in ~20 full runs): the verdict must then say so.
        assert "no single cohort explains it" in data["verdict"]


def test_the_cli_says_what_to_do_with_a_bad_metric(fleet: Fleet,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_cli(fleet, "--metric", "latency_p95")) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "explainable: latency_p50_ms" in err
