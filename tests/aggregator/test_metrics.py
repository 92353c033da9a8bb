"""Prometheus /metrics against the Query API: a real aggregator (gRPC + HTTP on loopback, real
SQLite) fed by the simulated fleet (`aggregator.simulator.run_fleet`: 24 devices in 8 region x
hw cohorts over 10 minutes, drift injected in hw=jetson,region=eu and a latency incident in
hw=pi,region=us, the demo's alert rules). The scrape is parsed with prometheus-client's own
parser; every per-cohort value must EQUAL what the gRPC Query service answers for the same
cohort and range (the range the scrape covered is itself exported), but for the latency
quantiles, which agree within the KLL rank error (KLL merges are randomized), and the counters
must equal Admin.ServerStats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import sqlite3
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.errors import ConfigError
from agent.spec import Spec
from agent.wire import spec_to_proto
from aggregator.baseline import build_spec_from_columns
from aggregator.cli import main
from aggregator.demo import DEMO_RULES
from aggregator.metrics import Metrics, MetricsConfig, _label_names, parse_groupings
from aggregator.query import merged_cohorts
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from aggregator.simulator import (
    CATEGORICAL_FEATURES,
    LABEL_COLUMN,
    LATENCY_COLUMN,
    MINUTE_S,
    PREDICTION_COLUMN,
    Drift,
    FleetConfig,
    Incident,
    reference_columns,
    run_fleet,
)
from aggregator.store.base import canonical_labels, parse_labels
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

FLEET = FleetConfig(devices=24, minutes=10, drift=Drift(start_minute=2),
                    incident=Incident(start_minute=3), device_prefix="metrics")
RANGE_S = 600
KEYS = ("hw", "region")
FAMILIES: dict[str, list] = {}  # the scrape `optional` reads


@dataclasses.dataclass(frozen=True)
class Fleet:
    agg: RunningAggregator
    spec: Spec
    db: pathlib.Path
    start: int
    end: int

    def stub(self, channel: grpc.Channel) -> pb_grpc.QueryStub:
        return pb_grpc.QueryStub(channel)


def wait_for_alerts(target: str, spec: Spec, end: int) -> pb.ListAlertsResponse:
    """ListAlerts once the rules were evaluated on every window up to `end`."""
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.QueryStub(channel)
        while True:
            resp = stub.ListAlerts(pb.ListAlertsRequest(model=spec.model), timeout=10)
            if resp.evaluated_until.get(f"{spec.model}/{spec.model_version}", 0) >= end:
                return resp
            assert time.monotonic() < deadline, "the alert rules never reached the last window"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("metrics")
    spec = build_spec_from_columns(
        reference_columns(10_000, FLEET.seed), model=FLEET.model,
        model_version=FLEET.model_version, prediction_col=PREDICTION_COLUMN,
        latency_col=LATENCY_COLUMN, label_col=LABEL_COLUMN,
        categorical=tuple(CATEGORICAL_FEATURES))
    (tmp / "rules.toml").write_text(DEMO_RULES)
    db = tmp / "aggregator.sqlite"
    with serve(AggregatorConfig(db=db, listen="127.0.0.1:0", workers=4,
                                http_listen="127.0.0.1:0", rules_path=tmp / "rules.toml",
                                alert_idle_flush_s=0.5, metrics_range_s=RANGE_S)) as agg:
        with grpc.insecure_channel(agg.target) as channel:
            pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec), timeout=10)
        end = int(time.time()) // MINUTE_S * MINUTE_S
        start = end - FLEET.minutes * MINUTE_S
        run_fleet(FLEET, agg.target, tmp / "spools", start)
        wait_for_alerts(agg.target, spec, end)
        yield Fleet(agg, spec, db, start, end)


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> its samples, parsed by prometheus-client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def one(samples: list, **labels: str) -> float:
    found = [s.value for s in samples
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, found)
    return found[0]


def optional(name: str, where: dict[str, str]) -> float:
    found = [s.value for s in FAMILIES[f"fleetwatch_cohort_{name}"]
             if all(s.labels.get(k) == v for k, v in where.items())]
    assert len(found) <= 1
    return found[0] if found else math.nan


def cohort_of(labels: dict[str, str]) -> dict[str, str]:
    keys = [] if labels["grouping"] == "fleet" else labels["grouping"].split(",")
    return {k: labels[k] for k in keys}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_cohort_values_equal_the_query_api(fleet: Fleet) -> None:
    families = scrape(fleet.agg.http_port)
    FAMILIES.clear()
    FAMILIES.update(families)
    lo = int(one(families["fleetwatch_metrics_range_start_seconds"], model="detector"))
    hi = int(one(families["fleetwatch_metrics_range_end_seconds"], model="detector"))
    assert hi - lo == RANGE_S and hi >= fleet.end
    # Default groupings: the fleet and each label key alone.
    groupings = {s.labels["grouping"] for s in families["fleetwatch_cohort_events"]}
    assert groupings == {"fleet", "hw", "region"}
    compared = 0
    with grpc.insecure_channel(fleet.agg.target) as channel:
        stub = pb_grpc.QueryStub(channel)
        for grouping, by in (("fleet", []), ("hw", ["hw"]), ("region", ["region"])):
            request = pb.CohortHealthRequest(model="detector", group_by=by, start_unix_s=lo,
                                             end_unix_s=hi)
            cohorts = stub.CohortHealth(request, timeout=30).cohorts
            privacy = {canonical_labels(c.cohort): c
                       for c in stub.CohortPrivacy(request, timeout=30).cohorts}
            assert len(cohorts) == {"fleet": 1, "hw": 2, "region": 4}[grouping]
            merged = {canonical_labels(mc.cohort): mc.summary.latency for mc in merged_cohorts(
                fleet.agg.store, fleet.spec, {}, by, lo, hi)}
            for h in cohorts:
                assert h.start_unix_s == lo and h.end_unix_s == hi
                where = {"grouping": grouping, **{k: h.cohort.get(k, "") for k in KEYS}}

                def value(name: str, where: dict[str, str] = where, **extra: str) -> float:
                    return one(families[f"fleetwatch_cohort_{name}"], **where, **extra)

                assert value("devices") == h.devices > 0
                assert value("reports") == h.reports
                assert value("events") == h.events > 0
                assert value("errors") == h.errors
                assert value("error_ratio") == h.error_rate
                # KLL merges are randomized (datasketches compacts with a random bit), so two
                # merges of the same rollups agree within the sketch's rank error, not to the
                # bit: both values must be that quantile of the cohort's merged latencies.
                sketch = merged[canonical_labels(h.cohort)]
                for q, api in ((0.5, h.latency_p50_ms), (0.95, h.latency_p95_ms),
                               (0.99, h.latency_p99_ms)):
                    scraped = value("latency_ms", quantile=str(q))
                    for v in (scraped, api):
                        assert abs(sketch.get_rank(v) - q) <= 2 * h.latency_rank_error, (q, v)
                assert value("availability_ratio") == h.availability
                assert value("spool_dropped") == h.spool_dropped
                for name, api in (("accuracy_ratio", h.accuracy), ("f1_ratio", h.f1),
                                  ("ece_ratio", h.ece), ("labeled", h.labeled)):
                    # NaN (unknown, e.g. noise left too few labels) is left out, not exported.
                    assert same(optional(name, where), api), name
                for f in [*h.features, h.prediction]:
                    assert same(value("feature_psi", feature=f.name), f.psi), f.name
                    assert value("feature_drifting", feature=f.name) == float(f.drifting)
                p = privacy[canonical_labels(h.cohort)]
                assert value("privacy_devices_withholding") == p.devices_withholding
                assert value("privacy_day_epsilon_max") == p.max_day_epsilon_spent
                assert value("privacy_day_epsilon_mean") == p.mean_day_epsilon_spent
                compared += 1
    assert compared == 7
    # The injected problems show where they were injected.
    psi = families["fleetwatch_cohort_feature_psi"]
    eu = one(psi, grouping="region", region="eu", feature="brightness")
    assert eu > 0.1 and all(eu > one(psi, grouping="region", region=r, feature="brightness")
                             for r in ("us", "apac", "latam"))
    p95 = families["fleetwatch_cohort_latency_ms"]
    assert one(p95, grouping="region", region="us", quantile="0.95") > 2 * one(
        p95, grouping="region", region="apac", quantile="0.95")


def test_counters_equal_server_stats(fleet: Fleet) -> None:
    report = "/fleetwatch.v1.Ingest/Report"
    envelope = sqlite3.connect(fleet.db).execute(
        "SELECT envelope FROM reports LIMIT 1").fetchone()[0]
    with grpc.insecure_channel(fleet.agg.target) as channel:
        send = channel.unary_unary(report, request_serializer=lambda b: b,
                                   response_deserializer=pb.ReportResponse.FromString)
        assert send(envelope, timeout=10).status == pb.ReportResponse.DUPLICATE
        with pytest.raises(grpc.RpcError) as refused:
            send(b"\xff garbage", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = pb_grpc.AdminStub(channel).ServerStats(pb.ServerStatsRequest(), timeout=10)
    families = scrape(fleet.agg.http_port)
    assert stats.accepted == FLEET.devices * FLEET.minutes
    assert one(families["fleetwatch_reports_accepted"]) == stats.accepted
    assert one(families["fleetwatch_reports_duplicate"]) == stats.duplicates >= 1
    rejected = {s.labels["reason"]: s.value for s in families["fleetwatch_reports_rejected"]}
    assert rejected == dict(stats.rejected) and rejected["malformed"] >= 1


def test_telemetry_cost_per_cohort_matches_the_stored_envelopes(fleet: Fleet) -> None:
    families = scrape(fleet.agg.http_port)
    rows = sqlite3.connect(fleet.db).execute(
        "SELECT l.canonical, LENGTH(r.envelope), r.device_id FROM reports r "
        "JOIN label_sets l ON l.id = r.label_set").fetchall()
    for s in families["fleetwatch_cohort_received_bytes"]:
        if not s.name.endswith("_total"):
            continue
        cohort = cohort_of(s.labels)
        mine = [(n, d) for canonical, n, d in rows
                if all(parse_labels(canonical).get(k) == v for k, v in cohort.items())]
        assert s.value == sum(n for n, _ in mine) > 0
        per_device = one(families["fleetwatch_cohort_received_bytes_per_device_day"],
                         **{k: s.labels[k] for k in ("grouping", *KEYS)})
        assert per_device == pytest.approx(sum(n for n, _ in mine) / len({d for _, d in mine}))
    total = sum(n for _, n, _ in rows)
    assert one(families["fleetwatch_received_bytes"]) == total


def test_alert_states_and_rates_equal_list_alerts(fleet: Fleet) -> None:
    alerts = wait_for_alerts(fleet.agg.target, fleet.spec, fleet.end)
    families = scrape(fleet.agg.http_port)
    active = {(s.labels["rule"], s.labels["state"], s.labels["region"], s.labels["hw"])
              for s in families["fleetwatch_alert_active"] if s.value == 1}
    expected = {(a.rule, a.state, a.cohort["region"], a.cohort["hw"]) for a in alerts.alerts
                if a.state in ("pending", "firing")}
    assert active == expected
    assert ("latency-p95", "firing", "us", "pi") in active
    firings = families["fleetwatch_alert_firing_notifications"]
    assert one(firings, rule="latency-p95", severity="page") >= 1
    left = {(s.labels["region"], s.labels["hw"]): s.value
            for s in families["fleetwatch_slo_budget_left_ratio"]}
    assert left == {(b.cohort["region"], b.cohort["hw"]): b.left_fraction
                    for b in alerts.budgets if b.slo == "errors"}
    assert len(left) == 8
    assert one(families["fleetwatch_alert_rules_loaded"]) == 1.0


def test_query_latency_is_observed_around_grpc_and_http(fleet: Fleet) -> None:
    def count(families: dict[str, list], api: str, method: str) -> float:
        return sum(s.value for s in families["fleetwatch_query_duration_seconds"]
                   if s.name.endswith("_count") and s.labels == {"api": api, "method": method})

    before = scrape(fleet.agg.http_port)
    with grpc.insecure_channel(fleet.agg.target) as channel:
        pb_grpc.QueryStub(channel).CohortHealth(pb.CohortHealthRequest(model="detector"),
                                                timeout=30)
    urllib.request.urlopen(f"http://127.0.0.1:{fleet.agg.http_port}/api/models",
                           timeout=10).read()
    after = scrape(fleet.agg.http_port)
    assert count(after, "grpc", "CohortHealth") == count(before, "grpc", "CohortHealth") + 1
    assert count(after, "http", "/api/models") == count(before, "http", "/api/models") + 1


def test_the_cohort_bound_keeps_the_worst_and_counts_the_rest(fleet: Fleet) -> None:
    def exposition(max_cohorts: int) -> dict[str, list]:
        # Every grouping of the two keys: 1 + 2 + 4 + 8 = 15 cohorts.
        metrics = Metrics(fleet.agg.store, fleet.agg.ingestor, fleet.agg.alerts, MetricsConfig(
            groupings=parse_groupings(["fleet", "hw", "region", "region,hw"]), range_s=RANGE_S,
            max_cohorts=max_cohorts))
        return {f.name: f.samples for f in text_string_to_metric_families(
            metrics.exposition().decode())}

    def problems(families: dict[str, list]) -> dict[tuple, float]:
        return {tuple(sorted(cohort_of(s.labels).items())): s.value
                for s in families["fleetwatch_cohort_problems"]}

    unbounded = exposition(100)
    everything = problems(unbounded)
    assert len(everything) == 15
    # The injected cohorts stand out: the incident as a problem, the drift as the largest PSI
    # (with 3 devices a cohort under privacy noise, its significance varies from run to run).
    assert everything[(("hw", "pi"), ("region", "us"))] >= 1
    brightness = {tuple(sorted(cohort_of(s.labels).items())): s.value
                  for s in unbounded["fleetwatch_cohort_feature_psi"]
                  if s.labels["feature"] == "brightness" and s.labels["grouping"] == "hw,region"}
    assert max(brightness, key=brightness.__getitem__) == (("hw", "jetson"), ("region", "eu"))
    families = exposition(5)
    kept = problems(families)
    assert len(kept) == 5
    assert one(families["fleetwatch_metrics_cohorts"]) == 5
    assert one(families["fleetwatch_metrics_cohorts_dropped"]) == 10
    assert one(families["fleetwatch_metrics_max_cohorts"]) == 5
    # The fleet first, then the worst: no dropped cohort has more problems than a kept one.
    assert () in kept
    dropped = [v for c, v in everything.items() if c not in kept]
    assert min(v for c, v in kept.items() if c != ()) >= max(dropped)
    # Every per-cohort family stays within the bound, and so does the total (docs/metrics.md).
    series = 0
    for name, samples in families.items():
        if name.startswith("fleetwatch_cohort_"):
            assert len({tuple(sorted(cohort_of(s.labels).items())) for s in samples}) <= 5
            series += len(samples)
    assert series <= 5 * (21 + 2 * (len(fleet.spec.features) + 1))


def test_config_is_validated_naming_the_field(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="max_cohorts"):
        MetricsConfig(max_cohorts=0)
    with pytest.raises(ConfigError, match="range_s"):
        MetricsConfig(range_s=float("nan"))
    with pytest.raises(ConfigError, match="metrics_range_s"):
        AggregatorConfig(db=tmp_path / "a.db", http_listen="127.0.0.1:0", metrics_range_s=0)
    with pytest.raises(ConfigError, match="http_listen.*loopback"):
        AggregatorConfig(db=tmp_path / "a.db", http_listen="0.0.0.0:8080")
    with pytest.raises(ConfigError, match="http_listen"):
        AggregatorConfig(db=tmp_path / "a.db", http_listen="8080")
    assert parse_groupings(["region,hw", "hw, region", "fleet"]) == (("hw", "region"), ())


@pytest.mark.parametrize(("argv", "message"), [
    (["--http", "0.0.0.0:0"], "http_listen: '0.0.0.0:0' is not a loopback address"),
    (["--http", "127.0.0.1:0", "--metrics-by", "region=eu"], "--metrics-by: 'region=eu'"),
    (["--http", "127.0.0.1:0", "--metrics-max-cohorts", "0"], "metrics_max_cohorts"),
])
def test_serve_refuses_bad_http_options(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture,
                                        argv: list[str], message: str) -> None:
    assert main(["serve", "--db", str(tmp_path / "a.db"), "--listen", "127.0.0.1:0", *argv]) == 2
    assert message in capsys.readouterr().err


def test_label_keys_become_valid_distinct_prometheus_names() -> None:
    names = _label_names(["region", "hw-rev", "hw_rev", "model", "9lives", "__x"])
    assert names["region"] == "region"
    assert names["model"] == "label_model"           # ours is not overwritten
    assert names["9lives"] == "label_9lives"
    assert names["__x"] == "label___x"
    assert {names["hw-rev"], names["hw_rev"]} == {"hw_rev", "hw_rev_2"}


def test_the_docs_and_the_grafana_dashboard_name_only_real_metrics(fleet: Fleet) -> None:
    root = pathlib.Path(__file__).resolve().parents[2]
    samples = {s.name for samples in scrape(fleet.agg.http_port).values() for s in samples}
    families = set(scrape(fleet.agg.http_port))
    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if "query" in v
              and isinstance(v["query"], dict)]
    named = {m for e in exprs for m in re.findall(r"fleetwatch_[a-z0-9_]+", e)}
    assert len(named) >= 20
    unknown = [m for m in named if m not in samples and m.removesuffix("_total") not in families
               and m.removesuffix("_bucket") not in families]
    assert not unknown, unknown
    # Every family the scrape holds is documented (in full, or as a `_suffix` of the row's
    # first name).
    doc = (root / "docs" / "metrics.md").read_text()
    undocumented = [f for f in families if f not in doc and not f.endswith("_created")
                    and not any(
        f"`_{f[i:]}`" in doc for i in range(1, len(f)) if f[i - 1] == "_")]
    assert not undocumented, undocumented
