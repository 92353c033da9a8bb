"""Tests for agent.upload: Backoff, and the Uploader against a fake channel."""

from __future__ import annotations

import random
import sqlite3
import time

import grpc
import pytest

from agent.spool import Spool
from agent.upload import REPORT_METHOD, Backoff, DeliveryResult, Uploader
from protos import fleetwatch_pb2 as pb

# -- Backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "cap"), [(0.5, 60.0), (0.1, 1.0), (2.0, 2.0), (1.0, 300.0)])
def test_backoff_bounds(base, cap):
    b = Backoff(base_s=base, cap_s=cap, rng=random.Random(1))
    for attempt in range(200):
        d = b.next_delay_s()
        assert base / 2 <= d <= cap
        assert d <= max(base / 2, base * 2**attempt)  # the ceiling grows from base
    assert b.attempt == 200


def test_backoff_matches_full_jitter_formula():
    b = Backoff(base_s=0.5, cap_s=8.0, rng=random.Random(7))
    ref = random.Random(7)
    for attempt in range(40):
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert b.next_delay_s() == max(0.25, ref.uniform(0, ceiling))


def test_backoff_is_jittered():
    b = Backoff(base_s=0.5, cap_s=60.0, rng=random.Random(3))
    for _ in range(10):
        b.next_delay_s()
    delays = [b.next_delay_s() for _ in range(50)]  # all at the cap's ceiling
    assert len(set(delays)) == 50
    assert min(delays) < 30 < max(delays)  # spread over [0, 60], not bunched at the cap


def test_backoff_same_seed_same_delays():
    a = Backoff(rng=random.Random(11))
    b = Backoff(rng=random.Random(11))
    assert [a.next_delay_s() for _ in range(20)] == [b.next_delay_s() for _ in range(20)]


def test_backoff_huge_attempt_does_not_overflow():
    b = Backoff(base_s=0.5, cap_s=60.0, attempt=10_000, rng=random.Random(0))
    assert 0.25 <= b.next_delay_s() <= 60.0


def test_backoff_reset():
    b = Backoff(base_s=1.0, cap_s=1000.0, rng=random.Random(5))
    for _ in range(12):
        b.next_delay_s()
    assert b.attempt == 12
    b.reset()
    assert b.attempt == 0
    assert 0.5 <= b.next_delay_s() <= 1.0  # back to the first ceiling
    assert b.next_delay_s() <= 2.0


def test_backoff_without_rng_uses_module_random():
    random.seed(123)
    want = max(0.25, random.uniform(0, 0.5))
    random.seed(123)
    assert Backoff().next_delay_s() == want


# -- Uploader --------------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "nope") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeChannel:
    """Answers each Report call with the next scripted outcome (a status or an error)."""

    def __init__(self, outcomes) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[bytes] = []
        self.timeouts: list[float] = []

    def unary_unary(self, method, request_serializer, response_deserializer):
        assert method == REPORT_METHOD

        def call(payload, timeout):
            # None: bytes pass through, as grpc does without a (de)serializer
            self.sent.append(request_serializer(payload) if request_serializer else payload)
            self.timeouts.append(timeout)
            outcome = self.outcomes.pop(0) if self.outcomes else pb.ReportResponse.ACCEPTED
            if isinstance(outcome, Exception):
                raise outcome
            data = pb.ReportResponse(status=outcome).SerializeToString()
            return response_deserializer(data) if response_deserializer else data

        return call


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool.sqlite")
    yield s
    s.close()


def _fill(spool: Spool, n: int) -> None:
    for _ in range(n):
        spool.enqueue(0, lambda seq, d: f"report-{seq}".encode())


def test_delivers_in_seq_order_and_acks(spool):
    _fill(spool, 3)
    ch = FakeChannel([pb.ReportResponse.ACCEPTED, pb.ReportResponse.DUPLICATE])
    up = Uploader(spool, ch, rpc_timeout_s=3.0)
    assert up.deliver() is DeliveryResult.EMPTY
    assert ch.sent == [b"report-1", b"report-2", b"report-3"]
    assert ch.timeouts == [3.0, 3.0, 3.0]
    assert (up.sent, up.duplicates, up.refused) == (2, 1, 0)
    assert spool.pending() == []
    assert up.last_error is None


def test_unavailable_keeps_the_report_for_later(spool):
    _fill(spool, 2)
    ch = FakeChannel([pb.ReportResponse.ACCEPTED,
                      FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")])
    up = Uploader(spool, ch)
    assert up.deliver() is DeliveryResult.RETRY_LATER
    assert [r.seq for r in spool.pending()] == [2]
    assert "UNAVAILABLE" in up.last_error and "connection refused" in up.last_error
    assert up.deliver() is DeliveryResult.EMPTY  # the next attempt succeeds
    assert ch.sent == [b"report-1", b"report-2", b"report-2"]
    assert up.last_error is None


def test_invalid_argument_is_dead_lettered(spool, tmp_path):
    _fill(spool, 3)
    ch = FakeChannel([FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad histogram")])
    up = Uploader(spool, ch)
    assert up.deliver() is DeliveryResult.EMPTY
    assert up.refused == 1 and up.sent == 2
    assert spool.stats().dead_letters == 1
    db = sqlite3.connect(tmp_path / "spool.sqlite")
    try:
        [(seq, reason)] = db.execute("SELECT seq, reason FROM dead_letters").fetchall()
    finally:
        db.close()
    assert seq == 1 and "bad histogram" in reason


def test_deadline_stops_delivery(spool):
    _fill(spool, 2)
    up = Uploader(spool, FakeChannel([]))
    assert up.deliver(deadline=time.monotonic() - 1) is DeliveryResult.DEADLINE
    assert len(spool.pending()) == 2


def test_timeout_is_bounded_by_the_deadline(spool):
    _fill(spool, 1)
    ch = FakeChannel([])
    up = Uploader(spool, ch, rpc_timeout_s=100.0)
    assert up.deliver(deadline=time.monotonic() + 5) is DeliveryResult.EMPTY
    assert 0 < ch.timeouts[0] <= 5


def test_many_reports_delivered_past_one_page(spool):
    _fill(spool, 150)  # pending() pages by 64
    ch = FakeChannel([])
    up = Uploader(spool, ch)
    assert up.deliver() is DeliveryResult.EMPTY
    assert ch.sent == [f"report-{i}".encode() for i in range(1, 151)]
