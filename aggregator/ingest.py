"""The ingest path: parse an envelope, validate the report against its spec, store and merge.

Authenticate before parsing anything: with device keys, the envelope's signature is checked
over the exact report bytes before those bytes are parsed (a sender without a device key
reaches no code beyond the envelope's three fields), then the parsed report must name the
device that signed it.

Domain logic only; `aggregator.service` maps its errors to gRPC status codes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from agent.errors import ConfigError, SketchError, ValidationError
from agent.spec import Spec
from agent.summary import Summary
from agent.upload import LABEL_LIMIT_REFUSAL
from agent.wire import ReportMeta
from aggregator.batch_writer import BatchWriter
from aggregator.batcher import Batcher
from aggregator.ingest_process import IngestProcess
from aggregator.keys import AGGREGATOR_KEY_PREFIX, DeviceKeys
from aggregator.store.base import (
    Contribution,
    IngestOutcome,
    Store,
    canonical_labels,
    rollup_resolutions,
)
from aggregator.validate import ClockSkewError, Limits, validate_forwarded, validate_report
from protos import fleetwatch_pb2 as pb

__all__ = ["ForwardNotAllowed", "IdentityMismatch", "IngestRejected", "IngestStats", "Ingestor",
           "ResourceExhausted", "Unauthenticated", "UnknownSpec"]

logger = logging.getLogger(__name__)

# Reports checked and stored per batch, at most (`aggregator.batcher`): the store's own
# transaction limit, so that one batch is one transaction.
MAX_BATCH = 256
RECEIVED_HOURS = 25  # hourly byte counts kept: a trailing day plus the hour in progress


class IngestRejected(ValidationError):
    """A report refused at ingest; `reason` is the counter it is counted under."""

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(field, message)
        self.reason = reason


class UnknownSpec(IngestRejected):
    """The report's spec hash is not registered (push the spec, then the device retries)."""


class ResourceExhausted(IngestRejected):
    """A server limit refused the report: its size, or the label cardinality of its model."""


@dataclass(frozen=True)
class IngestStats:
    """The Ingestor's counters at one instant (what Admin.ServerStats returns)."""

    accepted: int
    duplicates: int
    rejected: Mapping[str, int]


class IdentityMismatch(IngestRejected):
    """The report's device_id is not the device named by the sender's TLS certificate (or
    not the device whose key signed it)."""


class ForwardNotAllowed(IngestRejected):
    """A forwarded (merged) report from a sender that is not a regional aggregator: a device
    certificate or a device's signing key may only send that device's own reports."""


class Unauthenticated(IngestRejected):
    """No signature, a key id with no key, or a signature that does not verify."""


class ClockAhead(IngestRejected):
    """The report's timestamps are ahead of the aggregator's clock by more than the skew
    allowed. Not final: the device keeps it and retries, and once the real time has caught up
    with its clock the same report is accepted (nothing lost to a fast clock)."""


@dataclass(frozen=True, slots=True)
class _Received:
    """An envelope as the RPC handed it in, its signature checked (``signer``: the key id that
    signed it, None when unsigned and allowed)."""

    envelope: bytes
    report: bytes
    signer: str | None
    peer_device_id: str | None
    peer_aggregator_id: str | None


@dataclass(frozen=True, slots=True)
class Stored:
    """What the store made of a checked report, with what counting it needs (plain values:
    it crosses the pipe from `aggregator.ingest_process`)."""

    outcome: IngestOutcome
    spec_hash: str
    labels: str           # canonical
    window_start: int
    sender: str           # the report's device_id (a regional aggregator's, when forwarded)
    envelope_bytes: int

    @classmethod
    def of(cls, c: _Checked, outcome: IngestOutcome) -> Stored:
        meta = c.meta
        return cls(outcome, meta.spec_hash, canonical_labels(meta.labels),
                   meta.window_start_unix_s, meta.device_id, len(c.envelope))


@dataclass(frozen=True, slots=True)
class _Checked:
    """A report that passed authentication and validation, ready for the store."""

    spec: Spec
    meta: ReportMeta
    envelope: bytes
    summary: Summary
    resolutions: tuple[int, ...]
    contributions: list[Contribution] | None


class Ingestor:
    """Validates and merges reports into a Store; counts what it accepts and refuses.

    ``on_accepted(spec_hash, window_start, device_id)`` is called after each accepted report's
    commit (the alert evaluator's watermark); it must be cheap, and its errors are logged, not
    raised.

    With ``keys`` every signed envelope is verified; ``require_signatures`` (default: whether
    ``keys`` is given) also refuses unsigned ones. Without ``keys`` signatures are not checked.
    """

    def __init__(self, store: Store, limits: Limits = Limits(),
                 on_accepted: Callable[[str, int, str], None] | None = None, *,
                 keys: DeviceKeys | None = None,
                 require_signatures: bool | None = None,
                 process: IngestProcess | None = None) -> None:
        if require_signatures is None:
            require_signatures = keys is not None
        if require_signatures and keys is None:
            raise ConfigError("require_signatures: needs the device keys (signing_keys_dir / "
                              "--tls-dir) to verify them")
        self.store = store
        self.limits = limits
        self.on_accepted = on_accepted
        self.keys = keys
        self.require_signatures = require_signatures
        self._specs: dict[str, Spec] = {}
        self._lock = threading.Lock()
        self.accepted = 0
        self.duplicates = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        # Label cardinality: model -> key -> values stored, loaded from the store on a model's
        # first report (so it survives restarts) and grown only after a commit.
        self._label_values: dict[str, dict[str, set[str]]] = {}
        self._labels_lock = threading.Lock()  # held from the check to the commit of a new value
        # The telemetry's own cost (aggregator.metrics): envelope bytes accepted per (spec hash,
        # canonical label set), per wall-clock hour of arrival, for the last RECEIVED_HOURS.
        # Bounded by label sets x hours; the counters since start are kept apart.
        self._bytes_total: collections.Counter[tuple[str, str]] = collections.Counter()
        self._bytes_hourly: dict[int, collections.Counter[tuple[str, str]]] = {}
        self._batcher: Batcher[_Received, IngestOutcome] = Batcher(self._process, MAX_BATCH)
        # For `ingest_async` (the asyncio server): its batches, on a thread of their own,
        # checked and stored there or, with ``process``, in that child process (it uses its
        # own connection to the same database; `store` is then only read by this one).
        self.process = process
        self._writer: BatchWriter[_Received, IngestOutcome] = BatchWriter(
            self._process if process is None else self._process_remote, MAX_BATCH,
            on_abandoned=self._count_abandoned)

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

    def _authenticate(self, envelope: pb.ReportEnvelope) -> str | None:
        """The key id whose signature over ``envelope.report`` verifies; None for an unsigned
        envelope that is allowed (no keys, or signatures not required). Raises Unauthenticated.
        """
        if self.keys is None:
            return None
        key_id, signature = envelope.key_id, envelope.signature
        if not key_id and not signature and not self.require_signatures:
            return None
        if not key_id or not signature:  # half a signature is never allowed
            missing = "signature" if not signature else "key_id"
            raise self._reject("unsigned", f"envelope.{missing}",
                               f"the envelope has no {missing}: this aggregator requires "
                               "signed reports (Monitor(signing_key=...))", Unauthenticated)
        verified = self.keys.check(key_id, envelope.report, signature)
        if verified is None:
            raise self._reject("unknown_device", "envelope.key_id",
                               f"no signing key for device {key_id[:64]!r} (issue one with "
                               "`fleetwatch certs issue-device`)", Unauthenticated)
        if not verified:
            raise self._reject("bad_signature", "envelope.signature",
                               f"the signature does not verify with device {key_id!r}'s key",
                               Unauthenticated)
        return key_id

    def _count_abandoned(self, items: list[_Received]) -> None:
        """Reports whose callers gave up while they waited for the writer (not stored)."""
        with self._lock:
            self.rejected["deadline_exceeded"] += len(items)

    def count_rejected(self, reason: str) -> None:
        """Count a refusal made outside `ingest` (the TLS interceptor's, `aggregator.auth`)."""
        with self._lock:
            self.rejected[reason] += 1

    def stats(self) -> IngestStats:
        with self._lock:
            return IngestStats(self.accepted, self.duplicates, dict(self.rejected))

    def received_bytes(self, since_unix_s: float | None = None) -> dict[tuple[str, str], int]:
        """Envelope bytes of accepted reports per (spec hash, canonical labels): since the
        Ingestor started, or received since ``since_unix_s`` (hour granularity: the hour that
        holds it counts whole; at most RECEIVED_HOURS back)."""
        with self._lock:
            if since_unix_s is None:
                return dict(self._bytes_total)
            first = int(since_unix_s // 3600)
            out: collections.Counter[tuple[str, str]] = collections.Counter()
            for hour, counts in self._bytes_hourly.items():
                if hour >= first:
                    out.update(counts)
            return dict(out)

    def _count_bytes(self, key: tuple[str, str], n: int) -> None:
        """Hold ``_lock``."""
        hour = int(time.time() // 3600)
        self._bytes_total[key] += n
        bucket = self._bytes_hourly.get(hour)
        if bucket is None:
            bucket = self._bytes_hourly[hour] = collections.Counter()
            for old in [h for h in self._bytes_hourly if h <= hour - RECEIVED_HOURS]:
                del self._bytes_hourly[old]
        bucket[key] += n

    # -- label cardinality ---------------------------------------------------------------------

    def _known_labels(self, model: str) -> dict[str, set[str]]:
        known = self._label_values.get(model)
        if known is None:
            with self._labels_lock:
                known = self._label_values.get(model)
                if known is None:
                    known = {}
                    for ls in self.store.model_label_sets(model):
                        for k, v in ls.labels.items():
                            known.setdefault(k, set()).add(v)
                    self._label_values[model] = known
        return known

    def _adds_labels(self, model: str, labels: Mapping[str, str]) -> bool:
        """Whether a report would add a label key or value to its model (the rare case)."""
        known = self._known_labels(model)
        return any(v not in known.get(k, ()) for k, v in labels.items())

    def _check_cardinality(self, model: str, labels: Mapping[str, str]) -> None:
        """Refuse a report that would push its model past a cardinality limit (hold
        `_labels_lock`: concurrent reports must not both take the last free value)."""
        known = self._known_labels(model)
        # Other replicas on the same database add values too: before taking a new one, learn
        # what is stored now (the rare path: only a report that adds a value comes here).
        # Replicas that add values at the same instant can still pass the limit together,
        # by one value each at most.
        for ls in self.store.model_label_sets(model):
            for k, v in ls.labels.items():
                known.setdefault(k, set()).add(v)
        if not any(v not in known.get(k, ()) for k, v in labels.items()):
            return  # another replica stored these values meanwhile: nothing new
        new_keys = [k for k in labels if k not in known]
        if new_keys and len(known) + len(new_keys) > self.limits.max_label_keys_per_model:
            raise self._reject(
                "too_many_label_keys", "labels",
                f"{LABEL_LIMIT_REFUSAL}: model {model[:64]!r} has {len(known)} label keys (limit "
                f"{self.limits.max_label_keys_per_model}); new key {new_keys[0][:40]!r} refused",
                ResourceExhausted)
        for k, v in labels.items():
            values = known.get(k, set())
            if v not in values and len(values) >= self.limits.max_label_values_per_key:
                raise self._reject(
                    "too_many_label_values", "labels",
                    f"{LABEL_LIMIT_REFUSAL}: label {k[:40]!r} of model {model[:64]!r} has "
                    f"{len(values)} distinct "
                    f"values (limit {self.limits.max_label_values_per_key}); new value "
                    f"{v[:40]!r} refused (not folded into another cohort)", ResourceExhausted)

    def _remember_labels(self, model: str, labels: Mapping[str, str]) -> None:
        known = self._known_labels(model)
        for k, v in labels.items():
            known.setdefault(k, set()).add(v)

    def _check_forwarder(self, report: pb.WindowReport, signer: str | None,
                         peer_device_id: str | None, peer_aggregator_id: str | None) -> None:
        """Who may send a forwarded report: a regional aggregator, as itself."""
        if peer_device_id is not None or (
                signer is not None and not signer.startswith(AGGREGATOR_KEY_PREFIX)):
            who = (f"device certificate {peer_device_id!r}" if peer_device_id is not None
                   else f"device key {signer!r}")
            raise self._reject("forwarded_not_allowed", "merged",
                               f"a forwarded (merged) report sent with the {who}: only a "
                               "regional aggregator's certificate and key may forward "
                               "(`fleetwatch certs issue-aggregator`)", ForwardNotAllowed)
        if signer is not None and signer != AGGREGATOR_KEY_PREFIX + report.device_id:
            raise self._reject("identity_mismatch", "device_id",
                               f"forwarded report of aggregator {report.device_id[:128]!r} is "
                               f"signed by {signer!r}", IdentityMismatch)
        if peer_aggregator_id is not None and report.device_id != peer_aggregator_id:
            raise self._reject("identity_mismatch", "device_id",
                               f"forwarded report of aggregator {report.device_id[:128]!r} sent "
                               f"with the certificate of aggregator {peer_aggregator_id!r}",
                               IdentityMismatch)

    def ingest(self, envelope_bytes: bytes, peer_device_id: str | None = None, *,
               peer_aggregator_id: str | None = None) -> IngestOutcome:
        """Ingest one serialized ReportEnvelope. Raises IngestRejected.

        ``peer_device_id``: the device named by the sender's TLS certificate (None without
        TLS); the report's device_id must be that device, and it may not forward merged
        reports. ``peer_aggregator_id``: the regional aggregator named by the sender's
        certificate; it may send only forwarded reports, as itself. Without TLS (both None,
        loopback only) forwarded reports are taken; with signatures required, a forwarded
        report must be signed by the key of the aggregator it names.

        Concurrent calls are processed in batches by one caller at a time
        (`aggregator.batcher`): each report is checked on its own (a bad one fails alone)
        and the batch's good ones go to the store in one transaction."""
        # Here, in the caller's thread, not in the batch: the signature check releases the
        # GIL, so callers verify in parallel.
        return self._batcher.submit(self._receive(envelope_bytes, peer_device_id,
                                                  peer_aggregator_id))

    async def ingest_async(self, envelope_bytes: bytes, peer_device_id: str | None = None, *,
                           peer_aggregator_id: str | None = None) -> IngestOutcome:
        """`ingest` for a caller on an asyncio event loop: the envelope is parsed and its
        signature checked on the loop, then the report waits for a batch of the writer thread
        (`aggregator.batch_writer`), with the same checks, outcomes and errors."""
        received = self._receive(envelope_bytes, peer_device_id, peer_aggregator_id)
        return await self._writer.submit(received)

    def close(self) -> None:
        """Finish the async writer's queued batches and stop its thread, and the ingest
        process (`ingest` needs no closing). Call before closing the store."""
        self._writer.close()
        if self.process is not None:
            self.process.close()

    def _process_remote(self, batch: list[_Received]) -> list[IngestOutcome | BaseException]:
        """`_process` with the checks and the store's transaction in the ingest process
        (raises IngestUnavailable for the whole batch). Its refusals were counted there, by
        its own Ingestor: they are counted here again, in the counters that are read."""
        assert self.process is not None
        return self._settle(self.process.run(batch), count_refusals=True)

    def _receive(self, envelope_bytes: bytes, peer_device_id: str | None,
                 peer_aggregator_id: str | None) -> _Received:
        """The envelope parsed and its signature checked, before the report bytes are parsed
        (raises IngestRejected)."""
        try:
            envelope = pb.ReportEnvelope.FromString(envelope_bytes)
        except DecodeError as e:
            raise self._reject("malformed", "envelope", f"not a valid ReportEnvelope: {e}"
                               ) from None
        if not envelope.report:
            raise self._reject("malformed", "envelope.report", "empty report")
        signer = self._authenticate(envelope)
        return _Received(envelope_bytes, envelope.report, signer, peer_device_id,
                         peer_aggregator_id)

    def _process(self, batch: list[_Received]) -> list[IngestOutcome | BaseException]:
        """One batch (the leader's call): check each report, store the good ones together,
        count and announce what was stored."""
        return self._settle(self.check_and_store(batch))

    def _settle(self, results: Sequence[Stored | BaseException], *,
                count_refusals: bool = False) -> list[IngestOutcome | BaseException]:
        """Count and announce what was stored (and, with ``count_refusals``, the refusals);
        per report its outcome or its exception."""
        out: list[IngestOutcome | BaseException] = []
        for result in results:
            if isinstance(result, Stored):
                self._count(result)
                out.append(result.outcome)
            else:
                if count_refusals and isinstance(result, IngestRejected):
                    with self._lock:
                        self.rejected[result.reason] += 1
                out.append(result)
        return out

    def check_and_store(self, batch: Sequence[_Received]) -> list[Stored | BaseException]:
        """Check each report and store the good ones together: per report what the store
        made of it, or its exception. Counts refusals (`_reject`), not what was stored (the
        caller's `_count`: `aggregator.ingest_process` runs this in another process)."""
        results: list[Stored | BaseException | None] = [None] * len(batch)
        ready: list[tuple[int, _Checked]] = []
        for i, received in enumerate(batch):
            try:
                checked = self._check(received)
            except Exception as e:
                results[i] = e
                continue
            if self._adds_labels(checked.spec.model, checked.meta.labels):
                # The rare path, one report at a time: a report that adds a label value
                # is checked against the limits and stored under the labels lock.
                try:
                    results[i] = Stored.of(checked, self._store_adding_labels(checked))
                except Exception as e:
                    results[i] = e
                continue
            ready.append((i, checked))
        if ready:
            stored = self.store.ingest_many([
                (c.meta, c.envelope, c.summary, c.resolutions, c.contributions)
                for _, c in ready])
            for (i, checked), outcome in zip(ready, stored, strict=True):
                results[i] = (outcome if isinstance(outcome, BaseException)
                              else Stored.of(checked, outcome))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _store_adding_labels(self, c: _Checked) -> IngestOutcome:
        with self._labels_lock:
            self._check_cardinality(c.spec.model, c.meta.labels)
            outcome = self.store.ingest(c.meta, c.envelope, c.summary, c.resolutions,
                                        c.contributions)
            if outcome is IngestOutcome.ACCEPTED:
                self._remember_labels(c.spec.model, c.meta.labels)
        return outcome

    def _count(self, s: Stored) -> None:
        """Count a stored report's outcome and tell `on_accepted` of an accepted one."""
        outcome = s.outcome
        with self._lock:
            if outcome is IngestOutcome.DUPLICATE:
                self.duplicates += 1
            elif outcome in (IngestOutcome.REPLAYED, IngestOutcome.SEQ_REUSED):
                # Never merged, answered STALE_SEQ (an honest device renumbers): counted with
                # the refusals.
                self.rejected[outcome.value] += 1
            else:
                self.accepted += 1
                self._count_bytes((s.spec_hash, s.labels), s.envelope_bytes)
        if outcome is IngestOutcome.ACCEPTED and self.on_accepted is not None:
            try:
                self.on_accepted(s.spec_hash, s.window_start, s.sender)
            except Exception:  # the report is stored: a hook's bug must not fail the RPC
                logger.exception("on_accepted hook failed")

    def _check(self, received: _Received) -> _Checked:
        """Parse and validate one authenticated envelope's report (raises IngestRejected)."""
        envelope_bytes, signer = received.envelope, received.signer
        peer_device_id, peer_aggregator_id = received.peer_device_id, received.peer_aggregator_id
        try:
            report = pb.WindowReport.FromString(received.report)
        except DecodeError as e:
            raise self._reject("malformed", "envelope.report", f"not a valid WindowReport: "
                               f"{e}") from None
        forwarded = report.HasField("merged")
        if forwarded:
            self._check_forwarder(report, signer, peer_device_id, peer_aggregator_id)
        elif peer_aggregator_id is not None or (
                signer is not None and signer.startswith(AGGREGATOR_KEY_PREFIX)):
            raise self._reject("identity_mismatch", "merged",
                               "a regional aggregator sends only forwarded (merged) reports, "
                               "never a device's", IdentityMismatch)
        elif signer is not None and report.device_id != signer:
            raise self._reject("identity_mismatch", "device_id",
                               f"report for device {report.device_id[:128]!r} is signed by "
                               f"device {signer!r}", IdentityMismatch)
        if not forwarded and peer_device_id is not None and report.device_id != peer_device_id:
            # A device may only report as itself: a stolen key speaks for one device only.
            raise self._reject("identity_mismatch", "device_id",
                               f"report for device {report.device_id[:128]!r} sent with the "
                               f"certificate of device {peer_device_id!r}", IdentityMismatch)
        spec = self._spec(report.spec_hash)
        if spec is None:
            raise self._reject("unknown_spec", "spec_hash",
                               f"unknown spec hash {report.spec_hash[:64]!r} for model "
                               f"{report.model[:64]!r}: push the spec to this aggregator "
                               "(fleetwatch spec push)", UnknownSpec)
        contributions: list[Contribution] | None = None
        try:
            if forwarded:
                meta, summary, contributions = validate_forwarded(report, spec, self.limits)
            else:
                meta, summary = validate_report(report, spec, self.limits)
        except ClockSkewError as e:
            raise self._reject("clock_skew", e.field, e.message, ClockAhead) from None
        except SketchError as e:
            raise self._reject("bad_sketch", e.field, e.message) from None
        except ValidationError as e:
            raise self._reject("invalid", e.field, e.message) from None
        return _Checked(spec, meta, envelope_bytes, summary,
                        rollup_resolutions(spec.window_length_s), contributions)
