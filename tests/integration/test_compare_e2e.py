"""The canary gate end to end: real Monitors of three versions of one model report over gRPC to
one real aggregator, and `fleetwatch compare` (its `main(argv)`) asks it which version is worse.

Version "1" is the baseline; "2" runs 1.5x slower (same error rate and inputs) and is also on
a region the baseline is not; "3" is statistically identical to "1" (fresh draws from the same
distributions). Each version has its own devices (the aggregator deduplicates on device id and
sequence number, so versions must not share them) and its own spec (same content but the
version: a different spec hash). What compare reports is checked against the raw events.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from conftest import (  # pytest puts tests/integration on sys.path
    SCENES,
    WINDOW_S,
    make_spec,
    push_spec,
)
from scipy.stats import fisher_exact

from agent import Monitor
from aggregator.cli import main
from aggregator.server import RunningAggregator
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

GRACE_S = 2.0
N_WINDOWS = 4
EVENTS_PER_WINDOW = 400
DEVICES_PER_REGION = 3
ERROR_RATE = 0.02
LATENCY_FACTOR = {"1": 1.0, "2": 1.5, "3": 1.0}
REGIONS = {"1": ("eu", "us"), "2": ("eu", "us", "ap"), "3": ("eu", "us")}
RANK_ERROR = 0.0133  # KLL k=200 single-rank error bound (~99%); merges of device sketches too


class SimClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


@dataclass
class Raw:
    """What one version's devices in one region observed."""

    latencies: list[np.ndarray] = field(default_factory=list)
    events: int = 0
    errors: int = 0


@dataclass
class Canary:
    aggregator: RunningAggregator
    start: int
    end: int
    raw: dict[tuple[str, str], Raw]  # (version, region) -> raw events

    def args(self, baseline: str, candidate: str, *extra: str) -> list[str]:
        return ["compare", "--aggregator", self.aggregator.target, "--model", "detector",
                "--baseline", baseline, "--candidate", candidate, "--by", "region",
                "--until", str(self.end), "--since", f"{self.end - self.start}s", *extra]


@pytest.fixture(scope="module")
def canary(start_aggregator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canary]:
    tmp = tmp_path_factory.mktemp("canary")
    rng = np.random.default_rng(4242)
    base = (int(time.time()) // WINDOW_S - 20) * WINDOW_S
    raw: dict[tuple[str, str], Raw] = {}
    with start_aggregator(tmp / "aggregator.sqlite") as agg, contextlib.ExitStack() as stack:
        for version in ("2", "3"):  # "1" is the session spec the fixture pushed
            push_spec(agg.target, make_spec(model_version=version))
        devices = []
        for version, regions in REGIONS.items():
            for region in regions:
                raw[(version, region)] = Raw()
                for i in range(DEVICES_PER_REGION):
                    device_id = f"v{version}-{region}-{i}"
                    clock = SimClock(base)
                    mon = Monitor("detector", version, device_id, labels={"region": region},
                                  aggregator=agg.target, spool_dir=tmp / "spool" / device_id,
                                  clock=clock, background=False, grace_s=GRACE_S)
                    stack.callback(mon.close)
                    devices.append((version, region, mon, clock))
        for w in range(N_WINDOWS):
            ws = base + w * WINDOW_S
            for version, region, mon, clock in devices:
                n = EVENTS_PER_WINDOW
                latency = (LATENCY_FACTOR[version] * rng.lognormal(2.8, 0.5, n)
                           ).astype(np.float32).astype(np.float64)
                errors = rng.random(n) < ERROR_RATE
                clock.t = ws + 10.0
                mon.observe_batch({"temp": rng.normal(0.0, 1.0, n),
                                   "speed": rng.exponential(25.0, n),
                                   "scene": rng.choice(np.array(SCENES, dtype=object), n)},
                                  predictions=rng.beta(2.0, 3.0, n), latency_ms=latency,
                                  errors=errors)
                r = raw[(version, region)]
                r.latencies.append(latency)
                r.events += n
                r.errors += int(errors.sum())
                clock.t = ws + WINDOW_S + GRACE_S + 1.0
                assert mon.poll(), mon.stats()
        end = base + N_WINDOWS * WINDOW_S
        for _, _, mon, clock in devices:
            clock.t = end + GRACE_S + 1.0
            assert mon.flush(), mon.stats()
            assert mon.stats().spool.pending == 0
        yield Canary(agg, base, end, raw)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_slower_candidate_fails_the_gate(canary: Canary, capsys) -> None:
    code, out, err = run(capsys, canary.args("1", "2"))
    assert code == 3, (out, err)
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAIL: ")
    assert "latency_p95_ms in region=eu" in last and "latency_p95_ms in region=us" in last
    # The region only the candidate runs on is shown, but there is nothing to compare it with.
    assert "region=ap" in out and "latency_p95_ms in region=ap" not in last
    assert "error_rate in" not in last  # same error rate: not worse


def test_identical_candidate_passes(canary: Canary, capsys) -> None:
    code, out, err = run(capsys, canary.args("1", "3"))
    assert code == 0, (out, err)
    assert out.strip().splitlines()[-1] == "PASS"
    assert "WORSE" not in out


def test_fail_on_names_the_gated_metrics(canary: Canary, capsys) -> None:
    # Slower, but the gate only looks at errors: it passes; latency still shows as WORSE.
    code, out, _ = run(capsys, canary.args("1", "2", "--fail-on", "error_rate"))
    assert code == 0
    assert "WORSE" in out and out.strip().splitlines()[-1] == "PASS"
    code, out, _ = run(capsys, canary.args("1", "2", "--fail-on", "latency_p50_ms"))
    assert code == 3 and "latency_p50_ms in region=eu" in out


def test_json_agrees_with_the_raw_events(canary: Canary, capsys) -> None:
    code, out, _ = run(capsys, canary.args("1", "2", "--json"))
    assert code == 3
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["verdict"] == "FAIL"
    assert doc["baseline_version"] == "1" and doc["candidate_version"] == "2"
    assert doc["baseline_spec_hash"] != doc["candidate_spec_hash"]
    assert [c["cohort"] for c in doc["cohorts"]] == [{"region": r} for r in ("ap", "eu", "us")]
    # 2 cohorts with both versions x (error rate + 3 latency quantiles) = 8 tests.
    assert doc["tests"] == 8
    assert doc["corrected_alpha"] == pytest.approx(0.01 / 8)
    assert {(f["cohort"]["region"], f["metric"]) for f in doc["failures"]} >= {
        ("eu", "latency_p95_ms"), ("us", "latency_p95_ms")}
    for cohort in doc["cohorts"]:
        region = cohort["cohort"]["region"]
        m = {x["metric"]: x for x in cohort["metrics"]}
        cand = canary.raw[("2", region)]
        assert cohort["candidate_events"] == cand.events == m["events"]["candidate"]
        assert m["devices"]["candidate"] == DEVICES_PER_REGION
        if region == "ap":  # no baseline here: NaN (null) and never worse
            assert cohort["baseline_events"] == 0
            for name in ("error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
                assert m[name]["baseline"] is None and m[name]["p_value"] is None
                assert not m[name]["worse"] and not m[name]["significant"]
            continue
        base = canary.raw[("1", region)]
        assert cohort["baseline_events"] == base.events
        # Error rates from exact counts; the p-value is Fisher's exact test (scipy, doubled
        # one-sided tails) on the raw tallies, to 1e-9.
        assert m["error_rate"]["baseline"] == base.errors / base.events
        assert m["error_rate"]["candidate"] == cand.errors / cand.events
        table = [[cand.errors, cand.events - cand.errors], [base.errors, base.events - base.errors]]
        p = min(1.0, 2 * min(fisher_exact(table, alternative="greater")[1],
                             fisher_exact(table, alternative="less")[1]))
        assert m["error_rate"]["p_value"] == pytest.approx(p, rel=1e-9, abs=1e-12)
        assert not m["error_rate"]["worse"]
        # Quantiles come from the KLL sketches: the raw data's rank of each reported value is
        # within the sketch's rank error bound of q (a rank check: the right one for KLL).
        for name, q in (("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95),
                        ("latency_p99_ms", 0.99)):
            for side, r in (("baseline", base), ("candidate", cand)):
                x = np.sort(np.concatenate(r.latencies))
                rank = np.searchsorted(x, m[name][side], side="right") / x.size
                assert abs(rank - q) <= RANK_ERROR + 1.0 / x.size, (region, name, side)
            assert m[name]["difference"] == pytest.approx(
                m[name]["candidate"] - m[name]["baseline"])
            assert m[name]["higher_is_worse"]
        # 1.5x slower at ~5000 events: p50 and p95 are flagged (p99 rests on the ~1% tail, where
        # the sketches' rank error dominates: it need not be).
        for name in ("latency_p50_ms", "latency_p95_ms"):
            assert m[name]["worse"] and m[name]["gated"] == (name == "latency_p95_ms")
            assert m[name]["p_value"] < doc["corrected_alpha"]
        assert any(k.startswith("psi:") for k in m) and "prediction_psi" in m


@pytest.mark.parametrize("extra, message", [
    (["--fail-on", "latency_p95,error_rate"], "unknown metric 'latency_p95'"),
    (["--fail-on", "psi:nope"], "no feature 'nope'"),
    (["--alpha", "1.5"], "--alpha must be in (0, 1)"),
])
def test_bad_options_are_usage_errors(canary: Canary, capsys, extra, message) -> None:
    code, _, err = run(capsys, canary.args("1", "2", *extra))
    assert code == 2
    assert message in err
    if "unknown metric" in message:
        assert "latency_p95_ms" in err and "psi:FEATURE" in err  # lists the valid ones


def test_same_version_and_unknown_version(canary: Canary, capsys) -> None:
    code, _, err = run(capsys, canary.args("1", "1"))
    assert code == 2 and "itself" in err
    code, _, err = run(capsys, canary.args("1", "9"))
    assert code == 1 and "NOT_FOUND" in err and "detector/9" in err


def test_rpc_names_the_bad_field(canary: Canary) -> None:
    with grpc.insecure_channel(canary.aggregator.target) as channel:
        stub = pb_grpc.QueryStub(channel)
        for request, field_name in (
                (pb.CompareRequest(model="detector", candidate_version="2"), "baseline_version"),
                (pb.CompareRequest(model="detector", baseline_version="1", candidate_version="2",
                                   alpha=3.0), "alpha")):
            with pytest.raises(grpc.RpcError) as info:
                stub.CompareVersions(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field_name in info.value.details()


def test_no_data_in_range_is_an_operation_failure(canary: Canary, capsys) -> None:
    argv = canary.args("1", "2")
    argv[argv.index("--until") + 1] = str(canary.start - 3600)
    code, out, err = run(capsys, argv)
    assert code == 1
    assert "nothing was compared" in err
