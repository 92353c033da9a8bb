"""Ground truth, availability and the fairness delta end to end: real Monitors on a simulated
clock observe predictions with request ids and label them later; a real aggregator (gRPC on
loopback, SQLite file) merges the reports; CohortHealth over gRPC must equal the independent
computation on the raw events.

The spec adds no noise here (the DP tolerances are tested in tests/aggregator/test_slis.py),
so classification scores must match exactly; calibration and label latency carry their
binning bounds (stated where they are used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import WINDOW_S, make_spec, push_spec  # pytest puts tests/integration on sys.path

from agent.monitor import Monitor
from agent.spec import BINARY, LabelSpec, Spec
from aggregator.cli import main as cli_main
from aggregator.slis import MIN_FAIRNESS_LABELS
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

CAL_EDGES = tuple(np.linspace(0.0, 1.0, 11))   # width 0.1
LAT_EDGES = (0.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ACTIVE_WINDOWS = 12
RANGE_WINDOWS = 16          # labels arrive up to 200 s after the last observation
EVENTS_PER_WINDOW = 40
UNKNOWN_LABELS = 3          # label() calls with ids no device cached


def labeled_spec() -> Spec:
    return dataclasses.replace(
        make_spec(model="inspector"),
        labels=LabelSpec(BINARY, classes=("ok", "defect"), threshold=0.5,
                         calibration_edges=CAL_EDGES, latency_edges=LAT_EDGES))


class SimClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


@dataclasses.dataclass
class Raw:
    """The raw labeled events, as the host code saw them."""

    region: list[str] = dataclasses.field(default_factory=list)
    score: list[float] = dataclasses.field(default_factory=list)
    y: list[int] = dataclasses.field(default_factory=list)
    latency_s: list[float] = dataclasses.field(default_factory=list)

    def arrays(self, region: str | None = None):
        sel = np.array([region is None or r == region for r in self.region])
        return (np.asarray(self.score)[sel], np.asarray(self.y)[sel],
                np.asarray(self.latency_s)[sel])


def run_fleet(target: str, spool: Path, base: int, seed: int = 5) -> Raw:
    """eu-a and us-a predict and get labels; eu-idle only sends heartbeats; us-gone reports in
    the first two windows and then goes silent for good."""
    rng = np.random.default_rng(seed)
    raw = Raw()
    # eu's model is confident (scores near 0 or 1), us's is not: different accuracies.
    draw = {"eu": lambda n: rng.beta(0.4, 0.4, n), "us": lambda n: rng.beta(3.0, 2.0, n)}
    with contextlib.ExitStack() as stack:
        def monitor(name: str, region: str) -> tuple[Monitor, SimClock]:
            clock = SimClock(base)
            mon = Monitor("inspector", "1", name, labels={"region": region},
                          aggregator=target, spool_dir=spool / name, clock=clock,
                          background=False, grace_s=0.0)
            stack.callback(mon.close)
            return mon, clock

        idle, idle_clock = monitor("eu-idle", "eu")
        gone, gone_clock = monitor("us-gone", "us")
        for w in range(2):
            gone_clock.t = base + w * WINDOW_S + 1
            for _ in range(10):
                gone.observe({"temp": 0.1}, prediction=0.3, latency_ms=5.0)
        gone_clock.t = base + 2 * WINDOW_S + 1
        assert gone.flush()
        gone.close()

        for region in ("eu", "us"):
            mon, clock = monitor(f"{region}-a", region)
            actions: list[tuple[float, int, str, object]] = []  # (time, order, id, what)
            for w in range(ACTIVE_WINDOWS):
                scores = draw[region](EVENTS_PER_WINDOW)
                for i, s in enumerate(scores):
                    t = base + w * WINDOW_S + 5 + 0.5 * i
                    rid = f"{region}-{w}-{i}"
                    actions.append((t, 0, rid, float(s)))
                    if rng.random() < 0.8:  # a fifth of the predictions never get a label
                        y = int(rng.random() < s)
                        delay = float(rng.uniform(1.0, 200.0))
                        actions.append((t + delay, 1, rid, y))
                        raw.region.append(region)
                        raw.score.append(float(s))
                        raw.y.append(y)
                        raw.latency_s.append(delay)
            actions.sort(key=lambda a: (a[0], a[1]))
            window = base
            for t, kind, rid, what in actions:
                clock.t = t
                if t >= window + WINDOW_S:  # a window closed: ship it
                    window = int(t) // WINDOW_S * WINDOW_S
                    mon.poll()
                if kind == 0:
                    mon.observe({"temp": float(rng.normal()), "scene": "indoor"},
                                prediction=what, latency_ms=12.0, request_id=rid)
                else:
                    assert mon.label(rid, ("ok", "defect")[what])
            if region == "us":
                for j in range(UNKNOWN_LABELS):
                    assert not mon.label(f"never-seen-{j}", "ok")
            clock.t = base + RANGE_WINDOWS * WINDOW_S + 1
            assert mon.flush()

        for w in range(1, RANGE_WINDOWS + 1):
            idle_clock.t = base + w * WINDOW_S + 1
            idle.poll()
        assert idle.flush()
        assert idle.stats().heartbeats >= RANGE_WINDOWS - 1
    return raw


def health(target: str, start: int, end: int, group_by: tuple[str, ...] = (),
           fairness_key: str = "") -> pb.CohortHealthResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.QueryStub(channel).CohortHealth(pb.CohortHealthRequest(
            model="inspector", selector={}, group_by=list(group_by), start_unix_s=start,
            end_unix_s=end, fairness_key=fairness_key), timeout=30, wait_for_ready=True)


def raw_binary(score: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = score >= 0.5
    tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
    fn = np.sum(~pred & (y == 1))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"accuracy": float(np.mean(pred == (y == 1))), "precision": float(precision),
            "recall": float(recall), "f1": float(2 * precision * recall / (precision + recall)),
            "positive_rate": float(np.mean(pred))}


def raw_ece(score: np.ndarray, y: np.ndarray) -> float:
    edges = np.asarray(CAL_EDGES)
    b = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, edges.size - 2)
    return float(sum(np.sum(b == i) * abs(y[b == i].mean() - score[b == i].mean())
                     for i in range(edges.size - 1) if np.any(b == i)) / score.size)


def bin_width_at(x: float) -> float:
    e = np.asarray(LAT_EDGES)
    i = int(np.clip(np.searchsorted(e, x, side="right") - 1, 0, e.size - 2))
    return float(e[i + 1] - e[i])


@pytest.fixture
def fleet(start_aggregator, tmp_path, window_base):
    with start_aggregator(tmp_path / "agg.sqlite", push=False) as agg:
        push_spec(agg.target, labeled_spec())
        raw = run_fleet(agg.target, tmp_path / "spool", window_base)
        yield agg, raw, window_base


def test_label_slis_over_grpc_equal_the_raw_events(fleet):
    agg, raw, base = fleet
    end = base + RANGE_WINDOWS * WINDOW_S
    (h,) = health(agg.target, base, end).cohorts
    score, y, latency = raw.arrays()
    assert h.task == "binary"
    assert h.labeled == len(raw.y)
    assert h.labels_unmatched == UNKNOWN_LABELS
    # No noise, and the confusion matrix loses nothing: exact.
    for name, value in raw_binary(score, y).items():
        assert getattr(h, name) == pytest.approx(value, rel=1e-9), name
    # Binning bounds (aggregator/slis.py): Brier within the bin width 0.1, ECE within 0.05.
    assert abs(h.brier - float(np.mean((y - score) ** 2))) <= 0.1
    assert abs(h.ece - raw_ece(score, y)) <= 0.05
    # Label latency: interpolated inside the bin that holds the raw quantile.
    for q, got in ((0.5, h.label_latency_p50_s), (0.95, h.label_latency_p95_s)):
        want = float(np.quantile(latency, q))
        assert abs(got - want) <= bin_width_at(want), q
    assert math.isnan(h.mae) and math.isnan(h.rmse)


def test_availability_counts_heartbeats_and_misses_the_silent_device(fleet):
    agg, _raw, base = fleet
    end = base + RANGE_WINDOWS * WINDOW_S
    # From window 3 on, us-gone is silent; eu-idle is alive through its heartbeats.
    late = {h.cohort["region"]: h
            for h in health(agg.target, base + 3 * WINDOW_S, end, ("region",)).cohorts}
    eu, us = late["eu"], late["us"]
    assert (eu.devices, eu.devices_last_day, eu.availability) == (2, 2, 1.0)
    assert (us.devices, us.devices_last_day, us.availability) == (1, 2, 0.5)
    # eu-idle sent one per window; us-a only for its idle tail after the last label.
    assert eu.heartbeats >= RANGE_WINDOWS - 4 and us.heartbeats < eu.heartbeats - 8
    # Over the whole range every device reported at least once.
    (whole,) = health(agg.target, base, end).cohorts
    assert (whole.devices, whole.devices_last_day, whole.availability) == (4, 4, 1.0)


def test_fairness_delta_by_region_equals_the_raw_gap(fleet):
    agg, raw, base = fleet
    end = base + RANGE_WINDOWS * WINDOW_S
    resp = health(agg.target, base, end, fairness_key="region")
    d = resp.fairness
    want = {r: raw_binary(*raw.arrays(r)[:2]) for r in ("eu", "us")}
    acc = {r: w["accuracy"] for r, w in want.items()}
    pos = {r: w["positive_rate"] for r, w in want.items()}
    assert d.key == "region"
    assert [g.value for g in d.groups] == ["eu", "us"]
    assert [g.labeled for g in d.groups] == [raw.region.count("eu"), raw.region.count("us")]
    assert all(g.labeled >= MIN_FAIRNESS_LABELS for g in d.groups)
    assert d.accuracy_gap == pytest.approx(abs(acc["eu"] - acc["us"]), rel=1e-9)
    assert (d.accuracy_best, d.accuracy_worst) == (max(acc, key=acc.get), min(acc, key=acc.get))
    assert d.accuracy_best == "eu"  # the confident model
    assert d.positive_rate_gap == pytest.approx(abs(pos["eu"] - pos["us"]), rel=1e-9)
    assert d.positive_rate_highest == max(pos, key=pos.get)
    # Without the key the response has no fairness part.
    assert not health(agg.target, base, end).HasField("fairness")


def test_unknown_fairness_key_is_refused_naming_the_known_keys(fleet):
    agg, _raw, base = fleet
    with pytest.raises(grpc.RpcError) as e:
        health(agg.target, base, base + RANGE_WINDOWS * WINDOW_S, fairness_key="hw")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "fairness_key 'hw'" in e.value.details() and "region" in e.value.details()


def test_cli_health_with_fairness_key_prints_cohorts_and_fairness(fleet, capsys):
    agg, raw, base = fleet
    end = base + RANGE_WINDOWS * WINDOW_S
    args = ["health", "--aggregator", agg.target, "--model", "inspector", "--by", "region",
            "--until", str(end), "--since", f"{RANGE_WINDOWS}m"]
    assert cli_main(args + ["--fairness-key", "region", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"cohorts", "fairness"}
    eu = next(c for c in out["cohorts"] if c["cohort"] == {"region": "eu"})
    assert eu["availability"] == 1.0 and eu["ground_truth"]["task"] == "binary"
    assert eu["ground_truth"]["labeled"] == raw.region.count("eu")
    assert out["fairness"]["accuracy_best"] == "eu"
    # Without the key: the documented bare list.
    assert cli_main(args + ["--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert cli_main(args + ["--fairness-key", "region"]) == 0
    text = capsys.readouterr().out
    assert "ground truth (binary" in text and "fairness by region" in text
    assert "accuracy gap" in text
