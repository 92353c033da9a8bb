"""`--ingest-process` (aggregator.ingest_process) against a real aggregator over gRPC: the same
reports get the same answers, counters and health as in one process, and a killed ingest
process is replaced with nothing lost and nothing merged twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from test_limits_e2e import envelope, stats, stored  # tests/integration is on sys.path

from aggregator.validate import Limits
from protos import fleetwatch_pb2 as pb

Status = grpc.StatusCode
pytestmark = pytest.mark.timeout(180)


def scenario(send, spec, ws: int) -> list[object]:
    """Accepted, duplicate, reused seq, invalid, unknown spec, label limits: what came back."""
    out: list[object] = []

    def call(env: bytes) -> None:
        try:
            response = send(env, timeout=30)
            out.append((response.status, response.high_water_mark))
        except grpc.RpcError as e:
            out.append(e.code())

    for seq in range(1, 6):
        call(envelope(spec, seq, ws + 60 * seq, device="cam-1"))
    call(envelope(spec, 3, ws + 180, device="cam-1"))            # lost ack: duplicate
    call(envelope(spec, 3, ws + 240, device="cam-1"))            # other bytes: STALE_SEQ
    bad = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(
        envelope(spec, 6, ws + 360, device="cam-1")).report)
    bad.error_count = 99                                           # more errors than events
    call(pb.ReportEnvelope(report=bad.SerializeToString()).SerializeToString())
    unknown = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(
        envelope(spec, 7, ws + 420, device="cam-1")).report)
    unknown.spec_hash = "0" * 64
    call(pb.ReportEnvelope(report=unknown.SerializeToString()).SerializeToString())
    for i, region in enumerate(("us", "apac", "mars")):           # limit: 3 regions
        call(envelope(spec, 1, ws, {"region": region}, device=f"cam-{10 + i}"))
    call(b"\x0a\x05garbage")                                       # not an envelope
    return out


def test_the_same_reports_get_the_same_answers_counters_and_health(
        start_aggregator, tmp_path: Path, spec, window_base: int, report_rpc,
        cohort_rpc) -> None:
    results = []
    for ingest_process in (False, True):
        with start_aggregator(tmp_path / f"{ingest_process}.sqlite",
                              limits=Limits(max_label_values_per_key=3),
                              ingest_process=ingest_process) as agg:
            answers = scenario(report_rpc(agg.target), spec, window_base)
            s = stats(agg.target)
            health = cohort_rpc(agg.target, window_base, window_base + 3600)
            results.append((answers, s.accepted, s.duplicates, dict(s.rejected),
                            [(c.devices, c.reports, c.events, c.errors) for c in health],
                            agg.ingestor.received_bytes()))
    assert results[0] == results[1]
    answers, accepted, duplicates, rejected, health, received = results[1]
    ok = (pb.ReportResponse.ACCEPTED, 0)
    assert answers[:5] == [ok] * 5 and answers[5] == (pb.ReportResponse.DUPLICATE, 0)
    assert answers[6] == (pb.ReportResponse.STALE_SEQ, 5)
    assert answers[7:] == [Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION, ok, ok,
                           Status.RESOURCE_EXHAUSTED, Status.INVALID_ARGUMENT]
    assert (accepted, duplicates) == (7, 1)
    assert rejected == {"seq_reused": 1, "invalid": 1, "unknown_spec": 1,
                        "too_many_label_values": 1, "malformed": 1}
    assert sum(received.values()) > 0  # counted in the server process, from the child's answers


def test_a_killed_ingest_process_is_replaced_and_nothing_is_lost_or_doubled(
        start_aggregator, tmp_path: Path, spec, window_base: int, report_rpc) -> None:
    db = tmp_path / "agg.sqlite"
    with start_aggregator(db, ingest_process=True) as agg:
        send = report_rpc(agg.target)
        process = agg.ingestor.process
        assert process is not None and process.starts == 1
        assert send(envelope(spec, 1, window_base), timeout=30).status == \
            pb.ReportResponse.ACCEPTED
        os.kill(process.pid, signal.SIGKILL)
        time.sleep(0.2)
        codes = []
        for seq in (2, 3):
            env = envelope(spec, seq, window_base + 60 * seq)
            deadline = time.monotonic() + 60
            while True:  # as a device's spool retries
                try:
                    assert send(env, timeout=30).status == pb.ReportResponse.ACCEPTED
                    break
                except grpc.RpcError as e:
                    codes.append(e.code())
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
        assert set(codes) <= {Status.UNAVAILABLE}  # the batch in flight: retried, not lost
        assert process.starts == 2
        assert stats(agg.target).accepted == 3
    assert stored(db) == [("dev-1", 1), ("dev-1", 2), ("dev-1", 3)]


def test_an_ingest_process_that_does_not_answer_is_replaced(
        start_aggregator, tmp_path: Path, spec, window_base: int, report_rpc,
        monkeypatch) -> None:
    """A child stuck on the database (here: a lock held by another connection) is killed after
    ANSWER_TIMEOUT_S and its batch answered UNAVAILABLE; the retry is stored, once."""
    import sqlite3

    from aggregator import ingest_process

    db = tmp_path / "agg.sqlite"
    with start_aggregator(db, ingest_process=True) as agg:
        send = report_rpc(agg.target)
        assert send(envelope(spec, 1, window_base), timeout=30).status == \
            pb.ReportResponse.ACCEPTED
        monkeypatch.setattr(ingest_process, "ANSWER_TIMEOUT_S", 1.0)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the child's next commit waits behind it
        try:
            with pytest.raises(grpc.RpcError) as e:
                send(envelope(spec, 2, window_base + 60), timeout=30)
            assert e.value.code() == Status.UNAVAILABLE
            assert "did not answer" in e.value.details()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert send(envelope(spec, 2, window_base + 60), timeout=30).status == \
            pb.ReportResponse.ACCEPTED
        assert agg.ingestor.process.starts == 2
    assert stored(db) == [("dev-1", 1), ("dev-1", 2)]
