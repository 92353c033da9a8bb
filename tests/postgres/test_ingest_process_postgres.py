"""`AggregatorConfig(ingest_process=True)` on PostgreSQL (tests/postgres/conftest.py: a real
server, a fresh database): the child process stores through its own connection, the server
process counts, and the stored rows are exactly the accepted reports."""

from __future__ import annotations

import grpc
import numpy as np
import psycopg

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto, spec_to_proto
from aggregator.server import AggregatorConfig, serve
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

SPEC = Spec(model="m", model_version="1",
            features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0), reference_counts=(1, 8, 1, 0)),),
            window_length_s=60, privacy=PrivacySpec(mechanism=NO_NOISE))
WS = 1_700_000_000 // 3600 * 3600


def envelope(device: str, seq: int) -> bytes:
    ws = WS + 60 * seq
    acc = WindowAccumulator(SPEC, ws)
    acc.observe_batch({"x": np.full(5, 0.5)}, None, np.full(5, 3.0), np.zeros(5, bool), 5)
    meta = ReportMeta(device, "m", "1", {"region": "eu"}, ws, 60, seq, SPEC.hash)
    return pb.ReportEnvelope(report=report_to_proto(meta, acc.to_summary())
                             .SerializeToString()).SerializeToString()


def test_ingest_process_stores_into_postgres(pg_dsn: str) -> None:
    with serve(AggregatorConfig(db=pg_dsn, listen="127.0.0.1:0", workers=2,
                                ingest_process=True)) as agg:
        assert agg.ingestor.process is not None
        with grpc.insecure_channel(agg.target) as channel:
            pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(SPEC), timeout=10,
                                                wait_for_ready=True)
            send = channel.unary_unary("/fleetwatch.v1.Ingest/Report",
                                       request_serializer=lambda b: b,
                                       response_deserializer=pb.ReportResponse.FromString)
            statuses = [send(envelope(f"d{seq % 3}", seq), timeout=30).status
                        for seq in range(1, 10)]
            statuses.append(send(envelope("d1", 4), timeout=30).status)  # a lost ack's resend
            stats = pb_grpc.AdminStub(channel).ServerStats(pb.ServerStatsRequest(), timeout=10)
        assert statuses == [pb.ReportResponse.ACCEPTED] * 9 + [pb.ReportResponse.DUPLICATE]
        assert (stats.accepted, stats.duplicates) == (9, 1)
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT device_id, seq FROM reports ORDER BY seq").fetchall()
    assert rows == [(f"d{seq % 3}", seq) for seq in range(1, 10)]
