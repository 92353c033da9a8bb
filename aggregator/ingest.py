"""The ingest path: parse an envelope, validate the report against its spec, store and merge.

Domain logic only; `aggregator.service` maps its errors to gRPC status codes.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from google.protobuf.message import DecodeError

from agent.errors import SketchError, ValidationError
from agent.spec import Spec
from aggregator.store.base import IngestOutcome, Store, rollup_resolutions
from aggregator.validate import Limits, validate_report
from protos import fleetwatch_pb2 as pb

__all__ = ["IngestRejected", "Ingestor", "UnknownSpec"]

logger = logging.getLogger(__name__)


class IngestRejected(ValidationError):
    """A report refused at ingest; `reason` is the counter it is counted under."""

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(field, message)
        self.reason = reason


class UnknownSpec(IngestRejected):
    """The report's spec hash is not registered (push the spec, then the device retries)."""


class Ingestor:
    """Validates and merges reports into a Store; counts what it accepts and refuses.

    ``on_accepted(spec_hash, window_start)`` is called after each accepted report's commit
    (the alert evaluator's watermark); it must be cheap, and its errors are logged, not raised.
    """

    def __init__(self, store: Store, limits: Limits = Limits(),
                 on_accepted: Callable[[str, int], None] | None = None) -> None:
        self.store = store
        self.limits = limits
        self.on_accepted = on_accepted
        self._specs: dict[str, Spec] = {}
        self._lock = threading.Lock()
        self.accepted = 0
        self.duplicates = 0
        self.rejected: collections.Counter[str] = collections.Counter()

    def _spec(self, spec_hash: str) -> Spec | None:
        spec = self._specs.get(spec_hash)
        if spec is None and spec_hash:
            spec = self.store.get_spec("", spec_hash=spec_hash)
            if spec is not None:
                self._specs[spec_hash] = spec
        return spec

    def _reject(self, reason: str, field: str, message: str,
                cls: type[IngestRejected] = IngestRejected) -> IngestRejected:
        with self._lock:
            self.rejected[reason] += 1
        return cls(reason, field, message)

    def ingest(self, envelope_bytes: bytes) -> IngestOutcome:
        """Ingest one serialized ReportEnvelope. Raises IngestRejected."""
        try:
            envelope = pb.ReportEnvelope.FromString(envelope_bytes)
            report = pb.WindowReport.FromString(envelope.report)
        except DecodeError as e:
            raise self._reject("malformed", "envelope", f"not a valid ReportEnvelope "
                               f"carrying a WindowReport: {e}") from None
        if not envelope.report:
            raise self._reject("malformed", "envelope.report", "empty report")
        spec = self._spec(report.spec_hash)
        if spec is None:
            raise self._reject("unknown_spec", "spec_hash",
                               f"unknown spec hash {report.spec_hash[:64]!r} for model "
                               f"{report.model[:64]!r}: push the spec to this aggregator "
                               "(fleetwatch spec push)", UnknownSpec)
        try:
            meta, summary = validate_report(report, spec, self.limits)
        except SketchError as e:
            raise self._reject("bad_sketch", e.field, e.message) from None
        except ValidationError as e:
            raise self._reject("invalid", e.field, e.message) from None
        outcome = self.store.ingest(meta, envelope_bytes, summary,
                                    rollup_resolutions(spec.window_length_s))
        with self._lock:
            if outcome is IngestOutcome.DUPLICATE:
                self.duplicates += 1
            else:
                self.accepted += 1
        if outcome is IngestOutcome.ACCEPTED and self.on_accepted is not None:
            try:
                self.on_accepted(meta.spec_hash, meta.window_start_unix_s)
            except Exception:  # the report is stored: a hook's bug must not fail the RPC
                logger.exception("on_accepted hook failed")
        return outcome
