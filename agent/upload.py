"""Deliver spooled report envelopes to the aggregator, oldest first, with capped backoff.

The uploader only moves bytes: the spool decides what is pending, the aggregator decides what
is a duplicate. A report leaves the spool when the aggregator answered ACCEPTED or DUPLICATE
(both mean "durably merged"), or when it refused the report for good (INVALID_ARGUMENT: moved
to the dead-letter table, kept for inspection). Anything else is retried later.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from agent.pbwire import DUPLICATE, STALE_SEQ, WireError, decode_report_response
from agent.spool import Spool

__all__ = ["LABEL_LIMIT_REFUSAL", "REPORT_METHOD", "Backoff", "DeliveryResult", "Uploader"]

logger = logging.getLogger(__name__)

REPORT_METHOD = "/fleetwatch.v1.Ingest/Report"

# Refusals that no retry can fix: the report itself is malformed (or too large).
_PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT}
# gRPC's own size limit answers RESOURCE_EXHAUSTED, like overload; only its text tells them
# apart. A report over it will never get through: retrying would block the spool behind it.
_TOO_LARGE = "larger than max"
# The aggregator's refusal of a label value (or key) past its model's cardinality limit:
# RESOURCE_EXHAUSTED, so raising the limit lets the report through later; but it concerns
# this report's labels only, so the reports behind it (other label sets) are sent meanwhile.
LABEL_LIMIT_REFUSAL = "label cardinality limit"


def is_permanent(code: grpc.StatusCode | None, detail: str | None) -> bool:
    """Whether a refusal is final for this report (dead-letter it) rather than for now."""
    if code in _PERMANENT:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in (detail or "")


class DeliveryResult(enum.Enum):
    EMPTY = "empty"          # nothing left to send
    RETRY_LATER = "retry"    # the aggregator is unreachable or refused for now
    DEADLINE = "deadline"    # the caller's deadline ran out with reports left


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter (AWS architecture blog, 2015)."""

    base_s: float = 0.5
    cap_s: float = 60.0
    attempt: int = 0
    rng: random.Random | None = None

    def next_delay_s(self) -> float:
        rng = self.rng or random
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        # Never zero: a zero delay would make a down aggregator a busy loop.
        return max(self.base_s / 2, rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0


class Uploader:
    """Sends pending envelopes over one gRPC channel."""

    def __init__(self, spool: Spool, channel: grpc.Channel, *, rpc_timeout_s: float = 10.0,
                 rebuild: Callable[[bytes, int], bytes] | None = None) -> None:
        """``rebuild(payload, seq)``: the payload renumbered (and signed again), for the
        aggregator's STALE_SEQ answer; without it such a report is let go, as before."""
        self.spool = spool
        self.rebuild = rebuild
        self.rpc_timeout_s = rpc_timeout_s
        # Bytes both ways: the spool holds serialized envelopes, and the answer is parsed by
        # agent.pbwire (no protobuf runtime on a device: docs/performance.md, "Footprint").
        self._send = channel.unary_unary(REPORT_METHOD, request_serializer=None,
                                         response_deserializer=None)
        self.sent = 0
        self.duplicates = 0
        self.refused = 0
        self.renumbered = 0
        self.last_error: str | None = None

    def deliver(self, deadline: float | None = None) -> DeliveryResult:
        """Send pending reports in seq order until none is left, one fails, or the deadline
        (a `time.monotonic()` value) passes."""
        skipped: set[int] = set()  # refused for their labels in this pass: retried later
        while True:
            batch = [item for item in self.spool.pending(limit=64 + len(skipped))
                     if item.seq not in skipped]
            if not batch:
                return DeliveryResult.RETRY_LATER if skipped else DeliveryResult.EMPTY
            for item in batch:
                timeout = self.rpc_timeout_s
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return DeliveryResult.DEADLINE
                    timeout = min(timeout, left)
                try:
                    raw = self._send(item.payload, timeout=timeout)
                except grpc.RpcError as e:
                    code = e.code() if hasattr(e, "code") else None
                    detail = e.details() if hasattr(e, "details") else str(e)
                    if is_permanent(code, detail):
                        self.refused += 1
                        logger.error("aggregator refused report seq=%d for good (%s): %s; "
                                     "kept in the dead-letter table", item.seq, code, detail)
                        self.spool.dead_letter(item.seq, f"{code}: {detail}")
                        continue
                    self.last_error = f"{code}: {detail}"
                    logger.info("delivery of seq=%d failed (%s: %s); will retry", item.seq,
                                code, detail)
                    if (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                            and LABEL_LIMIT_REFUSAL in (detail or "")):
                        skipped.add(item.seq)  # not head-of-line: the rest may go through
                        continue
                    return DeliveryResult.RETRY_LATER
                try:
                    resp = decode_report_response(raw)
                except WireError as e:
                    # What grpc's deserializer failing did before (INTERNAL): retried later.
                    self.last_error = f"undecodable ReportResponse: {e}"
                    logger.warning("delivery of seq=%d: %s; will retry", item.seq,
                                   self.last_error)
                    return DeliveryResult.RETRY_LATER
                if (resp.status == STALE_SEQ and self.rebuild is not None
                        and resp.high_water_mark >= item.seq):
                    # Our seqs restarted below our earlier life's (a lost spool): nothing of
                    # this report was merged. Renumber everything pending and start over.
                    self.renumbered += self.spool.renumber_above(resp.high_water_mark,
                                                                 self.rebuild)
                    break
                if resp.status == DUPLICATE:
                    self.duplicates += 1
                else:
                    self.sent += 1
                self.spool.ack(item.seq)
                self.last_error = None
