"""The regional tier (`fleetwatch serve --upstream`, aggregator/forward.py) end to end.

A simulated fleet of real Monitors (DP noise on, ground-truth labels, devices labelled
region=a|b|c and hw=jetson|pi) reports to one aggregator directly (the "single" one). The very
same signed envelopes, read back from its database, are then sent to three regional
aggregators (`fleetwatch serve --upstream` processes, one SQLite file each, routed by the
device's region), which forward merged windows to one central aggregator. The central's answers
must equal the single's: exactly for every count, histogram and device count, to 1e-9 for the
floats computed from them (the noise variance is a sum of the same terms in another order), and
the latency quantiles within the KLL rank error against the true latencies (datasketches'
KLL merge is randomized, so two merge orders agree only within that error). One regional is
killed with SIGKILL mid-run and restarted on its file, and some of its device reports are sent
twice (lost acknowledgements): nothing may be lost or doubled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sqlite3
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import pick_free_port  # at import: tests/postgres has a conftest module too
from delivery_helpers import AggregatorProcess

from agent.signing import ReportSigner
from agent.spec import DEVICE_DAY, PrivacySpec, Spec
from agent.transport import TlsCredentials
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto, spec_to_proto, summary_to_proto
from aggregator import certs
from aggregator.baseline import BaselineOptions, build_spec_from_columns
from aggregator.cli import main as cli_main
from aggregator.server import AggregatorConfig, serve
from aggregator.simulator import (
    CATEGORICAL_FEATURES,
    LABEL_COLUMN,
    LATENCY_COLUMN,
    PREDICTION_COLUMN,
    Drift,
    FleetConfig,
    FleetTruth,
    Incident,
    reference_columns,
    run_fleet,
)
from aggregator.validate import Limits, validate_report
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

MINUTE_S = 60
REGIONS = ("a", "b", "c")
FLEET = FleetConfig(devices=36, regions=REGIONS, hardware=("jetson", "pi"), minutes=6,
                    events_per_minute=60.0, workers=2, label_delay_minutes=2,
                    drift=Drift(selector={"region": "b"}, start_minute=3),
                    incident=Incident(selector={"region": "c", "hw": "pi"}, start_minute=2),
                    device_prefix="cam")
LATENCY_FIELDS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


def demo_spec() -> Spec:
    """The demo's spec (DP noise on, binary labels) with device-day privacy: a daily budget
    that runs out within the run (so some reports are withheld) and a clamp (some events are
    clamped away), so that the privacy table has something to add up."""
    return build_spec_from_columns(
        reference_columns(3000, 7), model=FLEET.model, model_version=FLEET.model_version,
        prediction_col=PREDICTION_COLUMN, latency_col=LATENCY_COLUMN, label_col=LABEL_COLUMN,
        categorical=tuple(CATEGORICAL_FEATURES), options=BaselineOptions(privacy=PrivacySpec(
            unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=4.0,
            max_events_per_window=100)))


def push(target: str, spec: Spec) -> None:
    with grpc.insecure_channel(target) as channel:
        pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec), timeout=30,
                                            wait_for_ready=True)


def stats(target: str) -> pb.ServerStatsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.AdminStub(channel).ServerStats(pb.ServerStatsRequest(), timeout=10,
                                                      wait_for_ready=True)


def send(channel: grpc.Channel, envelope: bytes, deadline_s: float = 60.0) -> int:
    """Deliver like a device does: retry until acknowledged (ACCEPTED or DUPLICATE)."""
    call = channel.unary_unary("/fleetwatch.v1.Ingest/Report",
                               request_serializer=lambda b: b,
                               response_deserializer=pb.ReportResponse.FromString)
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return call(envelope, timeout=5, wait_for_ready=True).status
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            assert time.monotonic() < deadline, f"not delivered: {e}"
            time.sleep(0.1)


def assert_same(central: object, single: object, where: str) -> None:
    """Every field of two messages equal: integers exactly, floats to 1e-9 (latency quantiles
    are checked apart, against the truth)."""
    assert type(central) is type(single), where
    for field in central.DESCRIPTOR.fields:  # type: ignore[attr-defined]
        name, here = field.name, f"{where}.{field.name}"
        a, b = getattr(central, name), getattr(single, name)
        if name in LATENCY_FIELDS:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            assert dict(a) == dict(b), here
        elif field.is_repeated:
            assert len(a) == len(b), here
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if field.message_type is not None:
                    assert_same(x, y, f"{here}[{i}]")
                else:
                    assert x == y, here
        elif field.message_type is not None:
            assert central.HasField(name) == single.HasField(name), here  # type: ignore
            assert_same(a, b, here)
        elif field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(
                a, b, rel_tol=1e-9, abs_tol=1e-12), f"{here}: {a} != {b}"
        else:
            assert a == b, f"{here}: {a!r} != {b!r}"


def truth_latencies(truth: FleetTruth, cohort: Mapping[str, str]) -> np.ndarray:
    parts = [truth.cohort(labels).latencies_ms for labels in FLEET.cohorts()
             if all(labels.get(k) == v for k, v in cohort.items())]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("regional")
    spec = demo_spec()
    assert spec.privacy.mechanism != "none" and spec.labels is not None
    end = int(time.time()) // MINUTE_S * MINUTE_S
    if (end - FLEET.minutes * MINUTE_S) // 86400 != (end - 1) // 86400:
        # A run across UTC midnight would reset the device-day budgets half-way, and then
        # none may run out (the test needs withheld reports): end it at midnight instead.
        end = end // 86400 * 86400
    start = end - FLEET.minutes * MINUTE_S
    with serve(AggregatorConfig(db=tmp / "single.sqlite", listen="127.0.0.1:0",
                                workers=4)) as single, \
            serve(AggregatorConfig(db=tmp / "central.sqlite", listen="127.0.0.1:0",
                                   workers=4)) as central:
        push(single.target, spec)
        push(central.target, spec)
        truth = run_fleet(FLEET, single.target, tmp / "spools", start)
        # The exact envelopes the devices sent, in the order the single aggregator took them.
        with single.store._readers.borrow() as db:  # type: ignore[attr-defined]
            rows = db.execute(
                "SELECT r.envelope, l.canonical FROM reports r JOIN label_sets l "
                "ON l.id = r.label_set ORDER BY r.received_ms, r.device_id, r.seq").fetchall()
        envelopes = [(bytes(e), dict(kv.split("=") for kv in c.split(","))["region"])
                     for e, c in rows]
        regionals = {}
        for region in REGIONS:
            proc = AggregatorProcess(
                tmp / f"regional-{region}.sqlite", _free_port(), tmp / f"regional-{region}.log",
                args=("--upstream", central.target, "--upstream-id", f"region-{region}",
                      "--forward-idle-s", "1"))
            proc.start()
            push(proc.target, spec)
            regionals[region] = proc
        try:
            fed = feed(regionals, envelopes)
            drained = wait_drained(regionals)
            yield {"spec": spec, "single": single, "central": central, "truth": truth,
                   "start": start, "end": end, "envelopes": envelopes, "fed": fed,
                   "drained": drained, "regionals": regionals}
        finally:
            for proc in regionals.values():
                proc.kill()


def _free_port() -> int:
    return pick_free_port()


def feed(regionals: dict[str, AggregatorProcess],
         envelopes: list[tuple[bytes, str]]) -> dict[str, int]:
    """Send each envelope to its region's aggregator; kill -9 region c's halfway (after it had
    time to forward some windows), restart it on its file, and resend its last 5 reports as a
    device whose acknowledgements were lost would."""
    channels = {r: grpc.insecure_channel(p.target) for r, p in regionals.items()}
    outcomes = {"accepted": 0, "duplicate": 0}
    c_total = sum(1 for _, r in envelopes if r == "c")
    c_sent: list[bytes] = []
    try:
        for envelope, region in envelopes:
            status = send(channels[region], envelope)
            outcomes["accepted" if status == pb.ReportResponse.ACCEPTED else "duplicate"] += 1
            if region == "c":
                c_sent.append(envelope)
                if len(c_sent) == c_total // 2:
                    time.sleep(2.5)   # idle windows forwarded, some sent, some maybe not
                    regionals["c"].kill()
                    regionals["c"].start()
                    for again in c_sent[-5:]:
                        assert send(channels["c"], again) == pb.ReportResponse.DUPLICATE
                        outcomes["duplicate"] += 1
    finally:
        for channel in channels.values():
            channel.close()
    return outcomes


def wait_drained(regionals: dict[str, AggregatorProcess], timeout_s: float = 90.0
                 ) -> dict[str, dict[str, int]]:
    """Until every regional has forwarded everything and had it acknowledged."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = {r: dict(stats(p.target).forwarding) for r, p in regionals.items()}
        if all(s.get("pending", 1) == 0 and s.get("outbox", 1) == 0 for s in got.values()):
            return got
        assert time.monotonic() < deadline, f"regionals never drained: {got}"
        time.sleep(0.3)


def health(target: str, start: int, end: int, selector: Mapping[str, str] | None = None,
           group_by: tuple[str, ...] = ()) -> list[pb.CohortHealth]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.QueryStub(channel).CohortHealth(pb.CohortHealthRequest(
            model=FLEET.model, model_version=FLEET.model_version,
            selector=dict(selector or {}), group_by=list(group_by), start_unix_s=start,
            end_unix_s=end), timeout=60).cohorts)


def privacy(target: str, start: int, end: int, group_by: tuple[str, ...] = ()
            ) -> list[pb.CohortPrivacy]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.QueryStub(channel).CohortPrivacy(pb.CohortHealthRequest(
            model=FLEET.model, model_version=FLEET.model_version, group_by=list(group_by),
            start_unix_s=start, end_unix_s=end), timeout=60).cohorts)


QUERIES = [({}, ()), ({}, ("region",)), ({}, ("region", "hw")), ({"hw": "pi"}, ("region",)),
           ({"region": "c"}, ()), ({"region": "b"}, ("hw",))]


def assert_same_health(central: str, single: str, truth: FleetTruth, start: int, end: int,
                       ranges: Iterable[tuple[int, int]]) -> None:
    """`central`'s cohort health equals `single`'s for every query of QUERIES over each
    range; over [start, end) the latency quantiles are within the sketch's rank error of
    the truth (the central merged the same sketches in another, randomized, order)."""
    for lo, hi in ranges:
        for selector, group_by in QUERIES:
            ours = health(central, lo, hi, selector, group_by)
            theirs = health(single, lo, hi, selector, group_by)
            assert ours and len(ours) == len(theirs)
            for mine, expected in zip(ours, theirs, strict=True):
                where = f"[{lo}, {hi}) {selector} by {group_by} {dict(expected.cohort)}"
                assert_same(mine, expected, where)
                assert mine.reports > 0 and mine.devices > 0, where
                if (lo, hi) != (start, end):
                    continue
                lat = np.sort(truth_latencies(truth, {**selector, **dict(mine.cohort)}))
                for q, name in ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"),
                                (0.99, "latency_p99_ms")):
                    rank = np.searchsorted(lat, getattr(mine, name), side="right") / lat.size
                    assert abs(rank - q) <= 3 * mine.latency_rank_error + 1 / lat.size, \
                        (where, name, rank)


def assert_same_privacy(central: str, single: str, start: int, end: int) -> list[Any]:
    """`central`'s privacy answers equal `single`'s by nothing, region, region and hw;
    returns central's rows."""
    rows = []
    for group_by in ((), ("region",), ("region", "hw")):
        ours = privacy(central, start, end, group_by)
        theirs = privacy(single, start, end, group_by)
        assert len(ours) == len(theirs) > 0
        for mine, expected in zip(ours, theirs, strict=True):
            assert_same(mine, expected, f"privacy by {group_by} {dict(expected.cohort)}")
        rows.extend(ours)
    return rows


def test_central_health_equals_a_single_aggregator_fed_every_report(tiers: dict) -> None:
    central, single, truth = tiers["central"], tiers["single"], tiers["truth"]
    start, end = tiers["start"], tiers["end"]
    # Whole range, a range with cut edges (the exact per-window device counts), a day.
    assert_same_health(central.target, single.target, truth, start, end,
                       ((start, end), (start + 2 * MINUTE_S, end - MINUTE_S),
                        (end - 86400, end)))
    fleet = health(central.target, start, end)[0]
    assert fleet.devices == FLEET.devices and fleet.availability == 1.0
    assert 0 < fleet.withheld_reports + fleet.heartbeats < fleet.reports
    assert fleet.noise_sd_per_bin > 0 and fleet.labeled > 0   # DP noise and labels were on
    for mine in assert_same_privacy(central.target, single.target, start, end):
        assert mine.devices > 0 and mine.max_day_epsilon_spent > 0
        assert mine.devices_withholding > 0 and mine.reports_withheld > 0


def test_the_central_received_far_fewer_reports_and_nothing_twice(tiers: dict) -> None:
    sent = len(tiers["envelopes"])
    single = stats(tiers["single"].target)
    central = stats(tiers["central"].target)
    assert single.accepted == sent
    fleet = health(tiers["central"].target, tiers["start"], tiers["end"])[0]
    assert fleet.reports == sent   # every device report counted once, through the regions
    # One forwarded report per (window, label set) and region, a few more for late reports
    # and for the windows split by the kill.
    assert 0 < central.accepted * 3 <= sent, (central.accepted, sent)
    assert not central.rejected, dict(central.rejected)
    assert tiers["fed"]["duplicate"] >= 5 and tiers["regionals"]["c"].starts == 2
    for region, counts in tiers["drained"].items():
        assert counts["dead_letters"] == 0 and counts["dead_letter_rows"] == 0, region


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite file (its WAL included), as the process left it."""
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(
            sqlite3.connect(dst)) as b:
        a.backup(b)


def test_a_down_central_lost_acks_and_late_reports_lose_and_double_nothing(
        tiers: dict, tmp_path: Path) -> None:
    """Region a's reports again, to a fresh regional whose central is down at first: the
    outbox fills and survives a kill -9; once the central is up it drains. Then the regional
    is killed and its file put back as it was before the drain (every acknowledgement of the
    central lost): it sends the same reports again, and the central takes none of them twice.
    Reports held back until the end (late) are forwarded in further reports of their windows."""
    spec, single = tiers["spec"], tiers["single"]
    mine = [e for e, region in tiers["envelopes"] if region == "a"]
    late = mine[:3] + mine[40:42]   # from the first windows and a middle one
    on_time = [e for e in mine if e not in late]
    central_port = _free_port()
    db = tmp_path / "regional.sqlite"
    regional = AggregatorProcess(db, _free_port(), tmp_path / "regional.log", args=(
        "--upstream", f"127.0.0.1:{central_port}", "--upstream-id", "region-a",
        "--forward-idle-s", "0.5"))
    try:
        regional.start()
        push(regional.target, spec)
        with grpc.insecure_channel(regional.target) as channel:
            for envelope in on_time:
                assert send(channel, envelope) == pb.ReportResponse.ACCEPTED
        deadline = time.monotonic() + 30
        while (s := dict(stats(regional.target).forwarding))["pending"] > 0:
            assert time.monotonic() < deadline, s
            time.sleep(0.2)
        built = s["outbox"]
        assert built > 0 and s["sent"] == 0          # nobody to send to
        regional.kill()
        regional.start()                              # the outbox survived the kill
        assert dict(stats(regional.target).forwarding)["outbox"] == built
        regional.kill()
        copy_db(db, tmp_path / "before-drain.sqlite")
        regional.start()
        with serve(AggregatorConfig(db=tmp_path / "central.sqlite",
                                    listen=f"127.0.0.1:{central_port}", workers=2)) as central:
            push(central.target, spec)
            wait_drained({"a": regional})
            assert stats(central.target).accepted == built
            # Every acknowledgement lost: the regional's file as it was before the drain.
            regional.kill()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            copy_db(tmp_path / "before-drain.sqlite", db)
            regional.start()
            wait_drained({"a": regional})
            got = stats(central.target)
            assert (got.accepted, got.duplicates) == (built, built)
            # Late device reports: further forwarded reports for windows already forwarded.
            with grpc.insecure_channel(regional.target) as channel:
                for envelope in late:
                    assert send(channel, envelope) == pb.ReportResponse.ACCEPTED
            wait_drained({"a": regional})
            assert stats(central.target).accepted > built
            start, end = tiers["start"], tiers["end"]
            for selector, group_by in (({"region": "a"}, ()), ({"region": "a"}, ("hw",))):
                ours = health(central.target, start, end, selector, group_by)
                theirs = health(single.target, start, end, selector, group_by)
                assert len(ours) == len(theirs) > 0
                for m, e in zip(ours, theirs, strict=True):
                    assert_same(m, e, f"{selector} by {group_by} {dict(e.cohort)}")
            assert sum(c.reports for c in ours) == len(mine)   # by hw: the whole region
    finally:
        regional.kill()


# -- refusals ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("regional-pki")
    certs.init_ca(d)
    certs.issue_device(d, "cam-1")
    certs.issue_device(d, "cam-2")
    certs.issue_aggregator(d, "region-a")
    certs.issue_operator(d, "alice")
    return d


def creds(pki: Path, folder: str, name: str) -> TlsCredentials:
    return TlsCredentials(pki / "ca.pem", pki / folder / f"{name}.pem",
                          pki / folder / f"{name}.key")


def device_summaries(spec: Spec, ws: int) -> list[tuple[str, object]]:
    """Two devices' validated reports of one window (what a regional would have merged)."""
    out = []
    cols = reference_columns(200, 3)
    for i, device in enumerate(("cam-1", "cam-2")):
        acc = WindowAccumulator(spec, ws)
        n = 80 + 10 * i
        acc.observe_batch({f.name: cols[f.name][:n] for f in spec.features},
                          cols[PREDICTION_COLUMN][:n], cols[LATENCY_COLUMN][:n],
                          np.zeros(n, bool), n)
        meta = ReportMeta(device, spec.model, spec.model_version, {"region": "a"}, ws,
                          spec.window_length_s, 1, spec.hash, int(time.time() * 1000), "t",
                          day_epsilon_spent=0.5 + i)
        out.append((device, validate_report(report_to_proto(meta, acc.to_summary()), spec)))
    return out


def forwarded(spec: Spec, ws: int, seq: int = 1, sender: str = "region-a") -> pb.WindowReport:
    parts = device_summaries(spec, ws)
    merged = parts[0][1][1].merge(parts[1][1][1])
    return pb.WindowReport(
        device_id=sender, model=spec.model, model_version=spec.model_version,
        labels={"region": "a"}, window_start_unix_s=ws, window_length_s=spec.window_length_s,
        seq=seq, spec_hash=spec.hash, created_unix_ms=int(time.time() * 1000),
        merged=summary_to_proto(merged),
        contributions=[pb.Contribution(device_id=d, reports=1, max_day_epsilon=m.day_epsilon_spent)
                       for d, (m, _) in parts])


def signed(pki: Path, folder: str, name: str, key_id: str, report: pb.WindowReport) -> bytes:
    return ReportSigner.from_pem_file(pki / folder / f"{name}.sign.key", key_id).envelope(
        report.SerializeToString())


def report_call(channel: grpc.Channel):  # noqa: ANN201
    return channel.unary_unary("/fleetwatch.v1.Ingest/Report", request_serializer=lambda b: b,
                               response_deserializer=pb.ReportResponse.FromString)


def test_only_an_aggregator_certificate_and_key_may_forward(pki: Path, tmp_path: Path) -> None:
    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 5 * MINUTE_S
    with serve(AggregatorConfig(db=tmp_path / "central.sqlite", listen="127.0.0.1:0",
                                workers=4, tls_dir=pki, signing_keys_dir=pki)) as central:
        alice = grpc.secure_channel(central.target,
                                    creds(pki, "operators", "alice").channel_credentials())
        device = grpc.secure_channel(central.target,
                                     creds(pki, "devices", "cam-1").channel_credentials())
        regional = grpc.secure_channel(central.target,
                                       creds(pki, "aggregators", "region-a").channel_credentials())
        try:
            pb_grpc.AdminStub(alice).PushSpec(spec_to_proto(spec), timeout=30,
                                              wait_for_ready=True)
            # A device certificate (with its own key) sending a merged report: refused.
            as_device = forwarded(spec, ws, sender="cam-1")
            with pytest.raises(grpc.RpcError) as e:
                report_call(device)(signed(pki, "devices", "cam-1", "cam-1", as_device),
                                    timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only a regional aggregator" in e.value.details()
            # The aggregator's certificate but a device's key: refused too.
            report = forwarded(spec, ws)
            with pytest.raises(grpc.RpcError) as e:
                report_call(regional)(signed(pki, "devices", "cam-1", "cam-1", report),
                                      timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # An aggregator certificate may not send a device's own report.
            parts = device_summaries(spec, ws)
            own = report_to_proto(parts[0][1][0], parts[0][1][1])
            with pytest.raises(grpc.RpcError) as e:
                report_call(regional)(signed(pki, "aggregators", "region-a",
                                             "aggregator:region-a", own), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Its certificate and its key: accepted once, then a duplicate.
            env = signed(pki, "aggregators", "region-a", "aggregator:region-a", report)
            assert report_call(regional)(env, timeout=10).status == pb.ReportResponse.ACCEPTED
            assert report_call(regional)(env, timeout=10).status == pb.ReportResponse.DUPLICATE
            got = pb_grpc.AdminStub(alice).ServerStats(pb.ServerStatsRequest(), timeout=10)
            assert got.rejected["forwarded_not_allowed"] == 2
            assert got.rejected["identity_mismatch"] == 1
            assert (got.accepted, got.duplicates) == (1, 1)
            h = pb_grpc.QueryStub(alice).CohortHealth(pb.CohortHealthRequest(
                model=spec.model, start_unix_s=ws, end_unix_s=ws + MINUTE_S), timeout=30)
            # Counted by its contributions: two devices, two reports, their privacy spend.
            assert (h.cohorts[0].devices, h.cohorts[0].reports, h.cohorts[0].events) == (
                2, 2, 80 + 90)
            p = pb_grpc.QueryStub(alice).CohortPrivacy(pb.CohortHealthRequest(
                model=spec.model, start_unix_s=ws, end_unix_s=ws + MINUTE_S), timeout=30)
            assert (p.cohorts[0].devices, p.cohorts[0].reports) == (2, 2)
            assert p.cohorts[0].max_day_epsilon_spent == 1.5
            assert p.cohorts[0].mean_day_epsilon_spent == pytest.approx(1.0, abs=1e-12)
        finally:
            for channel in (alice, device, regional):
                channel.close()


def _broken(spec: Spec, ws: int, seq: int, how: str) -> pb.WindowReport:
    r = forwarded(spec, ws, seq)
    if how == "report_count":
        r.merged.report_count += 1
    elif how == "withheld":
        r.contributions[0].withheld = 1
    elif how == "twice":
        r.contributions[1].device_id = r.contributions[0].device_id
    elif how == "variance":
        r.merged.noise_variance_per_bin *= 0.5   # a sender claiming less noise than it has
    elif how == "per_report":
        r.event_count = 5
    elif how == "histogram":
        del r.merged.features[0].histogram.counts[-1]
    elif how == "kll":
        r.merged.latency_kll = b"\x05\x01\x0f" + bytes(40)
    elif how == "contributions":
        r.contributions.extend(pb.Contribution(device_id=f"x-{i}", reports=1)
                               for i in range(10))
        r.merged.report_count += 10
    return r


@pytest.mark.parametrize("how, field", [
    ("report_count", "merged.report_count"), ("withheld", "merged.withheld_report_count"),
    ("twice", "contributions.device_id"), ("variance", "merged.noise_variance_per_bin"),
    ("per_report", "event_count"), ("histogram", "merged.features"),
    ("kll", "merged.latency_kll"), ("contributions", "contributions")])
def test_inconsistent_forwarded_reports_are_refused_and_counted(
        tmp_path: Path, how: str, field: str) -> None:
    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 5 * MINUTE_S
    with serve(AggregatorConfig(db=tmp_path / "c.sqlite", listen="127.0.0.1:0", workers=2,
                                limits=Limits(max_contributions=5))) as central:
        push(central.target, spec)
        with grpc.insecure_channel(central.target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                report_call(channel)(pb.ReportEnvelope(
                    report=_broken(spec, ws, 1, how).SerializeToString()).SerializeToString(),
                    timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in e.value.details(), e.value.details()
            # The same sender's consistent report still goes through: nothing half-stored.
            ok = pb.ReportEnvelope(report=forwarded(spec, ws, 2).SerializeToString())
            assert report_call(channel)(ok.SerializeToString(), timeout=10).status == \
                pb.ReportResponse.ACCEPTED
        got = stats(central.target)
        assert sum(got.rejected.values()) == 1 and got.accepted == 1
        assert set(got.rejected) <= {"invalid", "bad_sketch"}
        h = health(central.target, ws, ws + MINUTE_S)[0]
        assert (h.reports, h.devices) == (2, 2)


def test_an_oversize_forwarded_report_is_refused_and_counted(tmp_path: Path) -> None:
    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 5 * MINUTE_S
    with serve(AggregatorConfig(db=tmp_path / "c.sqlite", listen="127.0.0.1:0",
                                workers=2)) as central:
        push(central.target, spec)
        r = forwarded(spec, ws)
        r.contributions.extend(pb.Contribution(device_id=f"device-{i:06d}", reports=1)
                               for i in range(20_000))
        big = pb.ReportEnvelope(report=r.SerializeToString()).SerializeToString()
        assert len(big) > 256 << 10
        with grpc.insecure_channel(central.target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                report_call(channel)(big, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "above the limit" in e.value.details()
        assert stats(central.target).rejected["oversize"] == 1


def test_a_regional_forwards_over_mutual_tls_signed(pki: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """`serve(forward=...)` in-process with the aggregator's certificate and signing key."""
    from aggregator.forward import ForwardConfig

    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 5 * MINUTE_S
    with serve(AggregatorConfig(db=tmp_path / "central.sqlite", listen="127.0.0.1:0",
                                workers=2, tls_dir=pki, signing_keys_dir=pki)) as central:
        alice = grpc.secure_channel(central.target,
                                    creds(pki, "operators", "alice").channel_credentials())
        try:
            pb_grpc.AdminStub(alice).PushSpec(spec_to_proto(spec), timeout=30,
                                              wait_for_ready=True)
            fwd = ForwardConfig(upstream=central.target, upstream_id="region-a",
                                tls=creds(pki, "aggregators", "region-a"),
                                signing_key=pki / "aggregators" / "region-a.sign.key",
                                idle_s=0.5, tick_s=0.1)
            with serve(AggregatorConfig(db=tmp_path / "regional.sqlite", listen="127.0.0.1:0",
                                        workers=2, forward=fwd,
                                        http_listen="127.0.0.1:0")) as regional:
                push(regional.target, spec)
                with grpc.insecure_channel(regional.target) as channel:
                    for device, (meta, summary) in device_summaries(spec, ws):
                        env = pb.ReportEnvelope(report=report_to_proto(
                            meta, summary).SerializeToString()).SerializeToString()
                        assert send(channel, env) == pb.ReportResponse.ACCEPTED, device
                deadline = time.monotonic() + 30
                while (s := stats(regional.target).forwarding)["sent"] < 1:
                    assert time.monotonic() < deadline, dict(s)
                    time.sleep(0.1)
                assert (s["pending"], s["outbox"], s["forwarded"]) == (0, 0, 1)
                with urllib.request.urlopen(f"http://127.0.0.1:{regional.http_port}/metrics",
                                            timeout=30) as r:
                    text = r.read().decode()
                assert "fleetwatch_forward_sent_total 1.0" in text
                assert "fleetwatch_forward_outbox 0.0" in text
                assert cli_main(["stats", "--aggregator", regional.target, "--json"]) == 0
                out = json.loads(capsys.readouterr().out)
                assert out["forwarding"]["sent"] == 1 and out["accepted"] == 2
            got = pb_grpc.AdminStub(alice).ServerStats(pb.ServerStatsRequest(), timeout=10)
            assert got.accepted == 1 and not got.rejected
            h = pb_grpc.QueryStub(alice).CohortHealth(pb.CohortHealthRequest(
                model=spec.model, start_unix_s=ws, end_unix_s=ws + MINUTE_S), timeout=30)
            assert (h.cohorts[0].devices, h.cohorts[0].reports, h.cohorts[0].events) == (
                2, 2, 170)
        finally:
            alice.close()


def _wait_forwarding(target: str, done, timeout_s: float = 30.0) -> dict[str, int]:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not done(s := dict(stats(target).forwarding)):
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    return s


def test_unknown_spec_upstream_is_retried_and_a_final_refusal_dead_lettered(
        tmp_path: Path) -> None:
    """The central without the spec: the regional keeps the report and retries until the spec
    is pushed. A central that refuses a report for good (here: more devices than its limit):
    the report moves to the dead-letter table, counted, and the outbox moves on."""
    from aggregator.forward import ForwardConfig

    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 5 * MINUTE_S
    with serve(AggregatorConfig(db=tmp_path / "central.sqlite", listen="127.0.0.1:0",
                                workers=2, limits=Limits(max_contributions=1))) as central:
        fwd = ForwardConfig(upstream=central.target, upstream_id="region-a", idle_s=0.3,
                            tick_s=0.1, backoff_base_s=0.1, backoff_cap_s=0.5)
        with serve(AggregatorConfig(db=tmp_path / "regional.sqlite", listen="127.0.0.1:0",
                                    workers=2, forward=fwd)) as regional:
            push(regional.target, spec)
            parts = device_summaries(spec, ws)
            with grpc.insecure_channel(regional.target) as channel:
                meta, summary = parts[0][1]
                env = pb.ReportEnvelope(report=report_to_proto(meta, summary).SerializeToString())
                assert send(channel, env.SerializeToString()) == pb.ReportResponse.ACCEPTED
                _wait_forwarding(regional.target, lambda s: s["outbox"] == 1)
                deadline = time.monotonic() + 30
                while stats(central.target).rejected["unknown_spec"] < 2:   # retried
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert dict(stats(regional.target).forwarding)["outbox"] == 1  # kept
                push(central.target, spec)
                s = _wait_forwarding(regional.target, lambda s: s["sent"] == 1)
                assert (s["outbox"], s["dead_letters"]) == (0, 0)
                # Two devices of a later window in one forwarded report: over the limit of 1.
                for _device, (meta, summary) in parts:
                    later = dataclasses.replace(meta, window_start_unix_s=ws + MINUTE_S, seq=2)
                    env = pb.ReportEnvelope(report=report_to_proto(
                        later, summary).SerializeToString())
                    assert send(channel, env.SerializeToString()) == pb.ReportResponse.ACCEPTED
                s = _wait_forwarding(regional.target, lambda s: s["dead_letters"] == 1)
                assert (s["outbox"], s["dead_letter_rows"], s["sent"]) == (0, 1, 1)
            assert stats(central.target).rejected["invalid"] == 1
            with regional.store._readers.borrow() as db:  # type: ignore[attr-defined]
                rows = db.execute("SELECT reason FROM forward_dead_letters").fetchall()
            assert len(rows) == 1 and "contributions" in rows[0][0]


def test_forwarding_config_is_checked_before_anything_starts(tmp_path: Path) -> None:
    from agent.errors import ConfigError
    from aggregator.forward import ForwardConfig

    with pytest.raises(ConfigError, match="upstream"):
        ForwardConfig(upstream="central", upstream_id="region-a")
    with pytest.raises(ConfigError, match="upstream_id"):
        ForwardConfig(upstream="127.0.0.1:7070", upstream_id="a/b")
    # A region of PostgreSQL replicas forwards too (tests/postgres/test_regional_replicas.py).
    AggregatorConfig(db="postgresql://u@127.0.0.1/fleet", listen="127.0.0.1:0",
                     forward=ForwardConfig(upstream="127.0.0.1:7070", upstream_id="r"))
    assert cli_main(["serve", "--db", str(tmp_path / "x.sqlite"), "--listen", "127.0.0.1:0",
                     "--upstream-id", "r"]) == 2
    assert not (tmp_path / "x.sqlite").exists()


def test_a_regional_replaced_with_an_empty_database_continues_above_the_mark(
        tmp_path: Path) -> None:
    """A regional whose database was lost restarts empty under the same --upstream-id: its
    outbox numbers from 1 again, the central answers STALE_SEQ (its seq 1 holds other bytes)
    with the region's mark, and the regional renumbers above it: the new window is merged,
    the old ones are not merged twice."""
    from aggregator.forward import ForwardConfig

    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 8 * MINUTE_S
    parts = device_summaries(spec, ws)
    meta, summary = parts[0][1]

    def device_report(minute: int, seq: int) -> bytes:
        m = dataclasses.replace(meta, window_start_unix_s=ws + minute * MINUTE_S, seq=seq)
        return pb.ReportEnvelope(report=report_to_proto(m, summary).SerializeToString()
                                 ).SerializeToString()

    def central_events(central_target: str) -> int:
        rows = health(central_target, ws, ws + 10 * MINUTE_S)
        return sum(int(r.events) for r in rows)

    with serve(AggregatorConfig(db=tmp_path / "central.sqlite", listen="127.0.0.1:0",
                                workers=2)) as central:
        push(central.target, spec)
        for life, minutes in (("first", (0, 1)), ("second", (2,))):
            fwd = ForwardConfig(upstream=central.target, upstream_id="region-a", idle_s=0.3,
                                tick_s=0.1, backoff_base_s=0.1, backoff_cap_s=0.5)
            with serve(AggregatorConfig(db=tmp_path / f"{life}.sqlite", listen="127.0.0.1:0",
                                        workers=2, forward=fwd)) as regional:
                push(regional.target, spec)
                with grpc.insecure_channel(regional.target) as channel:
                    for minute in minutes:
                        assert send(channel, device_report(minute, minute + 1)) == \
                            pb.ReportResponse.ACCEPTED
                _wait_forwarding(regional.target,
                                 lambda s, n=len(minutes): s["sent"] == n and s["outbox"] == 0)
        got = stats(central.target)
        assert got.accepted == 3 and dict(got.rejected) == {"seq_reused": 1}
        assert central.store.high_water_mark("region-a") == 3
        assert central_events(central.target) == 3 * meta_events(summary)


def meta_events(summary: object) -> int:
    return int(summary.event_count)  # type: ignore[attr-defined]


def test_three_tiers_a_regional_forwarding_to_a_regional(tmp_path: Path) -> None:
    """leaf regional -> mid regional -> central: a forwarded report merged again and
    forwarded on keeps every device's contribution, so the central's counts, devices and
    privacy table equal a single aggregator's fed the device reports directly."""
    from aggregator.forward import ForwardConfig

    spec = demo_spec()
    ws = int(time.time()) // MINUTE_S * MINUTE_S - 8 * MINUTE_S
    parts = device_summaries(spec, ws)
    envelopes = []
    for minute in range(3):
        for _device, (meta, summary) in parts:   # two devices
            m = dataclasses.replace(meta, window_start_unix_s=ws + minute * MINUTE_S,
                                    seq=minute + 1)
            envelopes.append(pb.ReportEnvelope(report=report_to_proto(
                m, summary).SerializeToString()).SerializeToString())

    def fwd(target: str, name: str) -> ForwardConfig:
        return ForwardConfig(upstream=target, upstream_id=name, idle_s=0.3, tick_s=0.1,
                             backoff_base_s=0.1, backoff_cap_s=0.5)

    def totals(target: str) -> list[tuple[str, int, int, int, int]]:
        rows = health(target, ws, ws + 3 * MINUTE_S, group_by=("region",))
        return sorted((r.cohort["region"], r.reports, r.events, r.errors, r.devices)
                      for r in rows)

    with serve(AggregatorConfig(db=tmp_path / "central.sqlite", listen="127.0.0.1:0",
                                workers=2)) as central, \
            serve(AggregatorConfig(db=tmp_path / "single.sqlite", listen="127.0.0.1:0",
                                   workers=2)) as single:
        push(central.target, spec)
        push(single.target, spec)
        with serve(AggregatorConfig(db=tmp_path / "mid.sqlite", listen="127.0.0.1:0",
                                    workers=2, forward=fwd(central.target, "mid"))) as mid:
            push(mid.target, spec)
            with serve(AggregatorConfig(db=tmp_path / "leaf.sqlite", listen="127.0.0.1:0",
                                        workers=2, forward=fwd(mid.target, "leaf"))) as leaf:
                push(leaf.target, spec)
                with grpc.insecure_channel(leaf.target) as a, \
                        grpc.insecure_channel(single.target) as b:
                    for env in envelopes:
                        assert send(a, env) == pb.ReportResponse.ACCEPTED
                        assert send(b, env) == pb.ReportResponse.ACCEPTED
                _wait_forwarding(leaf.target, lambda s: s["pending"] == 0 and s["outbox"] == 0
                                 and s["sent"] >= 3)
                _wait_forwarding(mid.target, lambda s: s["pending"] == 0 and s["outbox"] == 0
                                 and s["sent"] >= 3)
        # 6 device reports, 3 forwarded by the leaf (one per window), 3 again by the mid.
        assert stats(central.target).accepted == 3
        assert totals(central.target) == totals(single.target)
        assert totals(central.target)[0][4] == 2   # both devices, counted by contribution
        def privacy_rows(target: str) -> list[tuple]:
            return [(dict(p.cohort), p.devices, p.reports, p.reports_withheld,
                     p.max_day_epsilon_spent, p.mean_day_epsilon_spent)
                    for p in privacy(target, ws, ws + 3 * MINUTE_S, ("region",))]

        assert privacy_rows(central.target) == privacy_rows(single.target)
