"""Shared pieces of the integration tests: a small spec, real aggregators on loopback, raw RPCs.

Every aggregator here is the real one (`aggregator.server.serve`) on 127.0.0.1 with a SQLite file
under the test's tmp_path; the spec is registered through the Admin gRPC service, as an operator
would. Everything started here is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent.spec import CATEGORICAL, NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.wire import spec_to_proto
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

WINDOW_S = 60
REPORT_METHOD = "/fleetwatch.v1.Ingest/Report"

TEMP_EDGES = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
SPEED_EDGES = (0.0, 10.0, 20.0, 40.0, 80.0)
SCENES = ("indoor", "outdoor", "night")
SCORE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def make_spec(model: str = "detector", model_version: str = "1") -> Spec:
    """Two numeric features, one categorical, a numeric prediction score, a latency reference."""
    reference_latency = kll_floats_sketch(200)
    reference_latency.update(
        np.random.default_rng(7).lognormal(2.8, 0.4, 5000).astype(np.float32))
    return Spec(
        model=model,
        model_version=model_version,
        features=(
            FeatureSpec("temp", NUMERIC, edges=TEMP_EDGES,
                        reference_counts=(23, 136, 150, 191, 191, 150, 136, 23, 10)),
            FeatureSpec("speed", NUMERIC, edges=SPEED_EDGES,
                        reference_counts=(40, 300, 250, 250, 150, 45, 0)),
            FeatureSpec("scene", CATEGORICAL, vocabulary=SCENES,
                        reference_counts=(500, 400, 80, 20, 0)),
        ),
        prediction=FeatureSpec("score", NUMERIC, edges=SCORE_EDGES,
                               reference_counts=(0, 200, 200, 200, 200, 200, 0, 0)),
        latency_reference_kll=reference_latency.serialize(),
        window_length_s=WINDOW_S,
        reference_rows=1000,
        # Exact counts: these tests check merging to the count; the DP tests add noise.
        privacy=PrivacySpec(mechanism=NO_NOISE),
    )


def pick_free_port() -> int:
    """A loopback port that was free a moment ago (for restarting a server on the same port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def push_spec(target: str, spec: Spec) -> pb.PushSpecResponse:
    with grpc.insecure_channel(target) as channel:
        # wait_for_ready: a restarted server may be behind a subchannel still in backoff.
        return pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec), timeout=10,
                                                   wait_for_ready=True)


@pytest.fixture(scope="session")
def spec() -> Spec:
    return make_spec()


@pytest.fixture
def window_base() -> int:
    """Start of the first simulated window: minute-aligned, 20 minutes ago."""
    return int(time.time()) // WINDOW_S * WINDOW_S - 20 * WINDOW_S


@pytest.fixture
def free_port() -> int:
    return pick_free_port()


@pytest.fixture(scope="session")
def start_aggregator(spec: Spec) -> Callable[..., contextlib.AbstractContextManager]:
    """Factory: `with start_aggregator(db, port=0) as agg:` runs a real aggregator on
    127.0.0.1 with `spec` pushed through the Admin service; it stops when the block ends."""

    @contextlib.contextmanager
    def start(db: Path, port: int = 0, push: bool = True,
              **config: object) -> Iterator[RunningAggregator]:
        with serve(AggregatorConfig(db=db, listen=f"127.0.0.1:{port}", workers=4,
                                    **config)) as running:  # type: ignore[arg-type]
            if push:
                push_spec(running.target, spec)
            yield running

    return start


@pytest.fixture
def aggregator(start_aggregator, tmp_path: Path) -> Iterator[RunningAggregator]:
    """A running aggregator on a free port with the spec registered."""
    with start_aggregator(tmp_path / "aggregator.sqlite") as running:
        yield running


@pytest.fixture
def channels() -> Iterator[Callable[[str], grpc.Channel]]:
    """Factory of insecure channels, all closed at teardown."""
    opened: list[grpc.Channel] = []

    def open_channel(target: str) -> grpc.Channel:
        channel = grpc.insecure_channel(target)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


@pytest.fixture
def report_rpc(channels) -> Callable[[str], Callable[..., pb.ReportResponse]]:
    """`report_rpc(target)(envelope_bytes)`: the Ingest Report RPC with raw request bytes."""

    def make(target: str) -> Callable[..., pb.ReportResponse]:
        return channels(target).unary_unary(
            REPORT_METHOD, request_serializer=lambda b: b,
            response_deserializer=pb.ReportResponse.FromString)

    return make


@pytest.fixture
def cohort_rpc(channels, spec: Spec) -> Callable[..., list[pb.CohortHealth]]:
    """`cohort_rpc(target, start, end, selector=..., group_by=...)`: the Query service's
    CohortHealth for the spec's model, returning the cohorts."""

    def call(target: str, start: int, end: int, selector: dict[str, str] | None = None,
             group_by: tuple[str, ...] = ()) -> list[pb.CohortHealth]:
        stub = pb_grpc.QueryStub(channels(target))
        response = stub.CohortHealth(pb.CohortHealthRequest(
            model=spec.model, model_version=spec.model_version, selector=selector or {},
            group_by=list(group_by), start_unix_s=start, end_unix_s=end), timeout=30,
            wait_for_ready=True)
        return list(response.cohorts)

    return call
