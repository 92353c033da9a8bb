"""Server limits against a real aggregator over gRPC on loopback: message size, concurrency,
deadlines, label cardinality (also across a restart), the spec's reference sketch, and the
counters that Admin.ServerStats and `fleetwatch stats` expose.

Slow calls are made by holding the store's write lock from the test: a report then blocks in
its commit exactly as it would behind a slow disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import pick_free_port, push_spec  # pytest puts tests/integration on sys.path
from datasketches import kll_floats_sketch

from agent.spec import MULTICLASS, NUMERIC, FeatureSpec, LabelSpec, Spec
from agent.summary import Summary
from agent.upload import is_permanent
from agent.wire import ReportMeta, report_to_proto, spec_to_proto
from aggregator.cli import main
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from aggregator.validate import Limits
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

Status = grpc.StatusCode
pytestmark = pytest.mark.timeout(120)


def envelope(spec: Spec, seq: int, ws: int, labels: dict[str, str] | None = None,
             device: str = "dev-1", n: int = 20, pad_key_id: int = 0) -> bytes:
    """A valid report of `n` events (every value in the first inner bin) for `spec`."""
    s = Summary.zero(spec)
    for f in spec.features:
        s.features[f.name][1] = n
    if s.prediction is not None:
        s.prediction[1] = n
    kll = kll_floats_sketch(200)
    kll.update(np.linspace(1.0, 50.0, n).astype(np.float32))
    s.latency, s.event_count = kll, n
    meta = ReportMeta(device_id=device, model=spec.model, model_version=spec.model_version,
                      labels={"region": "eu"} if labels is None else labels,
                      window_start_unix_s=ws, window_length_s=spec.window_length_s, seq=seq,
                      spec_hash=spec.hash)
    return pb.ReportEnvelope(report=report_to_proto(meta, s).SerializeToString(),
                             key_id="k" * pad_key_id).SerializeToString()


def stats(target: str) -> pb.ServerStatsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.AdminStub(channel).ServerStats(pb.ServerStatsRequest(), timeout=10)


def stored(db: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT device_id, seq FROM reports ORDER BY device_id, seq"
                            ).fetchall()


@contextlib.contextmanager
def commits_blocked(agg: RunningAggregator) -> Iterator[None]:
    """Every report blocks in its commit until the block ends (a very slow disk)."""
    lock = agg.store._write_lock
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def code_of(future: grpc.Future) -> Status:
    try:
        future.result()
    except grpc.RpcError as e:
        return e.code()
    return Status.OK


# -- size ------------------------------------------------------------------------------------

def large_realistic_envelope() -> tuple[Spec, bytes]:
    """50 features x 20 bins of noisy counts, a prediction, 10-class labels, a KLL of 10k
    latencies, 32 labels of 64 characters and a signature: a large report as devices send."""
    rng = np.random.default_rng(5)
    edges = tuple(float(x) for x in np.linspace(0.0, 1.0, 21))
    features = tuple(FeatureSpec(f"feature_{i:02d}_with_a_longish_name", NUMERIC, edges=edges,
                                 reference_counts=(5,) * 23) for i in range(50))
    spec = Spec(model="big", model_version="1", features=features,
                prediction=FeatureSpec("score", NUMERIC, edges=edges,
                                       reference_counts=(5,) * 23),
                labels=LabelSpec(task=MULTICLASS, classes=tuple(f"c{i}" for i in range(10))))
    s = Summary.zero(spec)
    for f in features:
        s.features[f.name] = rng.integers(-50, 2000, f.histogram_length)
    s.prediction = rng.integers(-50, 2000, spec.prediction.histogram_length)  # type: ignore
    assert spec.labels is not None
    for name in spec.labels.histograms:
        setattr(s, name, rng.integers(-50, 2000, spec.labels.histogram_length(name)))
    s.latency.update(rng.lognormal(3.0, 1.0, 10_000).astype(np.float32))
    s.event_count = 10_000
    meta = ReportMeta(device_id="spiffe-device-" + "x" * 100, model="big", model_version="1",
                      labels={f"label_key_{i:02d}": "v" * 64 for i in range(32)},
                      window_start_unix_s=0, window_length_s=60, seq=1, spec_hash=spec.hash)
    report = report_to_proto(meta, s).SerializeToString()
    return spec, pb.ReportEnvelope(report=report, signature=bytes(64),
                                   key_id="k" * 64).SerializeToString()


def test_default_size_limit_has_a_wide_margin_over_a_large_report(tmp_path: Path) -> None:
    _, env = large_realistic_envelope()
    limit = AggregatorConfig(db=tmp_path / "x.db").max_message_bytes
    print(f"\nlarge realistic envelope: {len(env)} bytes; limit {limit} ({limit / len(env):.0f}x)")
    assert 5_000 < len(env) < limit // 20
    assert limit < (4 << 20) // 8  # far below gRPC's 4 MiB default


def test_oversize_reports_are_refused_and_counted(start_aggregator, tmp_path: Path, spec,
                                                  window_base: int, report_rpc) -> None:
    with start_aggregator(tmp_path / "agg.sqlite", max_message_bytes=64 << 10) as agg:
        send = report_rpc(agg.target)
        assert send(envelope(spec, 1, window_base), timeout=10).status == pb.ReportResponse.ACCEPTED
        just_over = envelope(spec, 2, window_base, pad_key_id=(64 << 10))
        receive_limit = AggregatorConfig(db=tmp_path / "x.db",
                                         max_message_bytes=64 << 10).grpc_receive_limit
        assert (64 << 10) < len(just_over) < receive_limit
        with pytest.raises(grpc.RpcError) as info:
            send(just_over, timeout=10)
        # final (the device dead-letters it and its spool moves on), not "retry later"
        assert info.value.code() == Status.INVALID_ARGUMENT
        assert "above the limit of 65536" in info.value.details()
        assert is_permanent(info.value.code(), info.value.details())
        # Absurd sizes are cut by gRPC before any of our code runs: refused, not counted;
        # the agent's uploader still reads that refusal as final.
        with pytest.raises(grpc.RpcError) as info:
            send(envelope(spec, 3, window_base, pad_key_id=1 << 20), timeout=10)
        assert info.value.code() == Status.RESOURCE_EXHAUSTED
        assert is_permanent(info.value.code(), info.value.details())
        assert not is_permanent(Status.RESOURCE_EXHAUSTED, "too many concurrent RPCs")
        got = stats(agg.target)
        assert (got.accepted, dict(got.rejected)) == (1, {"oversize": 1})
    assert stored(tmp_path / "agg.sqlite") == [("dev-1", 1)]


def test_grpc_receive_limit_sits_above_ours(tmp_path: Path) -> None:
    config = AggregatorConfig(db=tmp_path / "x.db", max_message_bytes=64 << 10)
    assert config.grpc_receive_limit > config.max_message_bytes
    for bad in (0, 100, 1 << 30, "1"):
        with pytest.raises(ValueError, match="max_message_bytes"):
            AggregatorConfig(db=tmp_path / "x.db", max_message_bytes=bad)  # type: ignore
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        AggregatorConfig(db=tmp_path / "x.db", max_concurrent_rpcs=0)


# -- concurrency and deadlines ---------------------------------------------------------------

def test_overload_is_refused_at_once_not_queued(start_aggregator, tmp_path: Path, spec,
                                                window_base: int, report_rpc) -> None:
    db = tmp_path / "agg.sqlite"
    with start_aggregator(db, max_concurrent_rpcs=2) as agg:
        send = report_rpc(agg.target)
        with commits_blocked(agg):
            futures = [send.future(envelope(spec, seq, window_base), timeout=60)
                       for seq in range(1, 13)]
            # The refusals come back while the two admitted calls are still blocked.
            done, _ = concurrent.futures.wait(
                [_as_concurrent(f) for f in futures], timeout=30,
                return_when=concurrent.futures.FIRST_COMPLETED)
            assert done
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futures) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            codes = [code_of(f) for f in futures if f.done()]
            assert codes.count(Status.RESOURCE_EXHAUSTED) == 10, codes
        codes = [code_of(f) for f in futures]
    assert codes.count(Status.OK) == 2 and codes.count(Status.RESOURCE_EXHAUSTED) == 10
    assert len(stored(db)) == 2


def _as_concurrent(f: grpc.Future) -> concurrent.futures.Future:
    out: concurrent.futures.Future = concurrent.futures.Future()
    f.add_done_callback(lambda _: out.set_result(None))
    return out


def test_calls_whose_deadline_passed_in_the_queue_are_not_merged(
        tmp_path: Path, spec, window_base: int, report_rpc) -> None:
    db = tmp_path / "agg.sqlite"
    with serve(AggregatorConfig(db=db, listen="127.0.0.1:0", workers=1)) as agg:
        push_spec(agg.target, spec)
        send = report_rpc(agg.target)
        with commits_blocked(agg):
            first = send.future(envelope(spec, 1, window_base), timeout=60)
            time.sleep(0.3)  # the only worker is now blocked in the first call's commit
            queued = send.future(envelope(spec, 2, window_base), timeout=0.5)
            assert code_of(queued) == Status.DEADLINE_EXCEEDED
        assert first.result(timeout=30).status == pb.ReportResponse.ACCEPTED
        # The worker is free again: a later call goes through, the expired one never ran.
        assert send(envelope(spec, 3, window_base), timeout=10).status == \
            pb.ReportResponse.ACCEPTED
    assert stored(db) == [("dev-1", 1), ("dev-1", 3)]


@pytest.mark.parametrize("ingest_process", [False, True], ids=["writer-thread",
                                                                 "ingest-process"])
def test_concurrent_devices_each_get_their_own_answer_and_share_commits(
        start_aggregator, tmp_path: Path, spec, window_base: int, report_rpc,
        ingest_process: bool) -> None:
    """24 devices at once over gRPC (the asyncio server's Report, the writer's batches, in
    this process or in the ingest process): every good report is stored exactly once in
    shared transactions, a lost acknowledgement's resend is DUPLICATE, a bad report fails
    alone, and the counters say so."""
    with start_aggregator(tmp_path / "agg.sqlite", ingest_process=ingest_process) as agg:
        assert (agg.ingestor.process is not None) is ingest_process
        _concurrent_devices(agg, spec, window_base, report_rpc)


def _concurrent_devices(aggregator: RunningAggregator, spec, window_base: int,
                        report_rpc) -> None:
    send = report_rpc(aggregator.target)
    send(envelope(spec, 1, window_base, device="warm"), timeout=10)  # labels known
    batches = aggregator.ingestor._writer.batches

    def device(i: int) -> dict[int, object]:
        out: dict[int, object] = {}
        for seq in range(1, 11):
            env = envelope(spec, seq, window_base + 60 * seq, device=f"dev-{i:02d}")
            if (i, seq) == (5, 4):  # more errors than events: invalid
                report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(env).report)
                report.error_count = 99
                env = pb.ReportEnvelope(report=report.SerializeToString()).SerializeToString()
            try:
                out[seq] = send(env, timeout=30).status
                if seq == 7:
                    out[-seq] = send(env, timeout=30).status
            except grpc.RpcError as e:
                out[seq] = e.code()
        return out

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(device, range(24)))
    ok, dup = pb.ReportResponse.ACCEPTED, pb.ReportResponse.DUPLICATE
    for i, out in enumerate(results):
        expected = {seq: ok for seq in range(1, 11)} | {-7: dup}
        if i == 5:
            expected[4] = Status.INVALID_ARGUMENT
        assert out == expected, i
    rows = stored(aggregator_db(aggregator))
    assert len(rows) == 1 + 24 * 10 - 1 and len(set(rows)) == len(rows)
    assert aggregator.ingestor._writer.batches - batches < 24 * 10  # batched, not one each
    # Other bytes under a stored seq: refused (STALE_SEQ), and the device learns its mark.
    response = send(envelope(spec, 1, window_base, device="dev-00"), timeout=10)
    assert (response.status, response.high_water_mark) == (pb.ReportResponse.STALE_SEQ, 10)
    s = stats(aggregator.target)
    assert (s.accepted, s.duplicates) == (1 + 24 * 10 - 1, 24)
    assert dict(s.rejected) == {"invalid": 1, "seq_reused": 1}


def aggregator_db(agg: RunningAggregator) -> Path:
    return Path(agg.store.path)


# -- label cardinality -----------------------------------------------------------------------

def test_label_values_beyond_the_limit_are_refused_across_restarts(
        start_aggregator, tmp_path: Path, spec, window_base: int, report_rpc) -> None:
    db = tmp_path / "agg.sqlite"
    limits = Limits(max_label_values_per_key=3, max_label_keys_per_model=2)
    seq = iter(range(1, 100))

    def send_labels(send, labels: dict[str, str]) -> Status:
        try:
            send(envelope(spec, next(seq), window_base, labels), timeout=10)
        except grpc.RpcError as e:
            assert e.code() != Status.RESOURCE_EXHAUSTED or "refused" in e.details()
            return e.code()
        return Status.OK

    with start_aggregator(db, limits=limits) as agg:
        send = report_rpc(agg.target)
        for region in ("eu", "us", "apac"):
            assert send_labels(send, {"region": region}) == Status.OK
        assert send_labels(send, {"region": "mars"}) == Status.RESOURCE_EXHAUSTED
        assert send_labels(send, {"region": "us"}) == Status.OK  # known values keep working
        assert send_labels(send, {"region": "eu", "hw": "jetson"}) == Status.OK
        assert send_labels(send, {"region": "eu", "os": "linux"}) == Status.RESOURCE_EXHAUSTED
        assert dict(stats(agg.target).rejected) == {"too_many_label_values": 1,
                                                    "too_many_label_keys": 1}
    with start_aggregator(db, limits=limits) as agg:  # the limits hold after a restart
        send = report_rpc(agg.target)
        assert send_labels(send, {"region": "mars"}) == Status.RESOURCE_EXHAUSTED
        assert send_labels(send, {"region": "apac", "hw": "jetson"}) == Status.OK
        assert send_labels(send, {"os": "linux"}) == Status.RESOURCE_EXHAUSTED
        got = stats(agg.target)
        assert (got.accepted, dict(got.rejected)) == (1, {"too_many_label_values": 1,
                                                          "too_many_label_keys": 1})
    with contextlib.closing(sqlite3.connect(db)) as conn:
        canon = {c for (c,) in conn.execute("SELECT canonical FROM label_sets")}
    assert canon == {"region=eu", "region=us", "region=apac", "hw=jetson,region=eu",
                     "hw=jetson,region=apac"}


# -- the spec's reference sketch, and the counters ---------------------------------------------

def test_push_spec_checks_the_reference_sketch(aggregator: RunningAggregator, spec) -> None:
    good = spec_to_proto(dataclasses.replace(spec, model_version="2"))
    raw = bytearray(good.latency.reference_kll)
    raw[8] ^= 0x40  # forge n: the layout no longer adds up
    bad = spec_to_proto(dataclasses.replace(spec, model_version="3",
                                            latency_reference_kll=bytes(raw)))
    with grpc.insecure_channel(aggregator.target) as channel:
        admin = pb_grpc.AdminStub(channel)
        assert admin.PushSpec(good, timeout=10).created
        with pytest.raises(grpc.RpcError) as info:
            admin.PushSpec(bad, timeout=10)
        assert info.value.code() == Status.INVALID_ARGUMENT
        assert "latency.reference_kll" in info.value.details()
        assert [s.model_version for s in admin.ListSpecs(pb.ListSpecsRequest(), timeout=10)
                .specs] == ["1", "2"]
    assert dict(stats(aggregator.target).rejected) == {"invalid_spec": 1}


def test_stats_rpc_and_cli(aggregator: RunningAggregator, spec, window_base: int, report_rpc,
                           capsys) -> None:
    send = report_rpc(aggregator.target)
    before = int(time.time())
    for seq in (1, 2, 2):
        send(envelope(spec, seq, window_base), timeout=10)
    for bad in (b"\xff garbage", envelope(spec, 3, window_base + 7)):
        with pytest.raises(grpc.RpcError):
            send(bad, timeout=10)
    got = stats(aggregator.target)
    assert (got.accepted, got.duplicates) == (2, 1)
    assert dict(got.rejected) == {"malformed": 1, "invalid": 1}
    assert before - 600 < got.started_unix_s <= before

    assert main(["stats", "--aggregator", aggregator.target, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"accepted": 2, "duplicates": 1, "rejected": {"invalid": 1, "malformed": 1},
                   "started_unix_s": got.started_unix_s}
    assert main(["stats", "--aggregator", aggregator.target]) == 0
    text = capsys.readouterr().out
    assert "2 reports accepted, 1 duplicate acknowledged, 2 refused" in text
    assert "malformed" in text and "invalid" in text


def test_stats_cli_unreachable(capsys) -> None:
    assert main(["stats", "--aggregator", f"127.0.0.1:{pick_free_port()}",
                 "--timeout", "1"]) == 1
    assert "cannot reach an aggregator" in capsys.readouterr().err


def test_a_report_refused_for_its_labels_does_not_block_the_spool_behind_it(
        start_aggregator, tmp_path: Path, spec, window_base: int) -> None:
    """The label-cardinality refusal is RESOURCE_EXHAUSTED (retried: raising the limit lets
    it through), but it concerns that report's labels only: the uploader keeps it and sends
    the reports queued behind it, instead of waiting head-of-line."""
    from agent.spool import Spool
    from agent.upload import DeliveryResult, Uploader

    limits = Limits(max_label_values_per_key=1)
    spool = Spool(tmp_path / "spool.sqlite")
    # The device's labels changed while reports were queued: seq 2 has a new region.
    for labels in ({"region": "eu"}, {"region": "mars"}, {"region": "eu"}, {"region": "eu"}):
        spool.enqueue(window_base, lambda s, _d, labels=labels: envelope(
            spec, s, window_base, labels))
    with start_aggregator(tmp_path / "agg.sqlite", limits=limits) as agg, \
            grpc.insecure_channel(agg.target) as channel:
        up = Uploader(spool, channel)
        assert up.deliver() is DeliveryResult.RETRY_LATER   # one is still refused
        assert [i.seq for i in spool.pending()] == [2]      # ... and kept, not dead-lettered
        assert (up.sent, spool.stats().dead_letters) == (3, 0)
        assert dict(stats(agg.target).rejected) == {"too_many_label_values": 1}
    # The operator raises the limit: the kept report goes through on the next attempt.
    with start_aggregator(tmp_path / "agg.sqlite", limits=Limits(max_label_values_per_key=2),
                          push=False) as agg, grpc.insecure_channel(agg.target) as channel:
        up = Uploader(spool, channel)
        assert up.deliver() is DeliveryResult.EMPTY
        assert up.sent == 1 and spool.stats().pending == 0
    spool.close()
