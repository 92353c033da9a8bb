"""gRPC servicers: translate between RPC messages and the domain functions, nothing more.

One table maps domain errors to status codes (`_STATUS`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NoReturn

import grpc

from agent.errors import SpecError, ValidationError
from agent.wire import spec_from_proto, spec_to_proto
from aggregator.alerts.evaluator import AlertEvaluator, ModelBudget
from aggregator.auth import peer_identity
from aggregator.batch_writer import WriterClosed
from aggregator.certs import AGGREGATOR, DEVICE
from aggregator.compare import Comparison, compare_versions
from aggregator.explain import explain
from aggregator.ingest import (
    ClockAhead,
    ForwardNotAllowed,
    IdentityMismatch,
    Ingestor,
    ResourceExhausted,
    Unauthenticated,
    UnknownSpec,
)
from aggregator.ingest_process import IngestUnavailable
from aggregator.kll_check import check_kll_floats
from aggregator.query import (
    CohortHealth,
    CohortPrivacy,
    FeatureHealth,
    QueryError,
    cohort_fairness,
    cohort_health,
    cohort_privacy,
    list_cohorts,
)
from aggregator.slis import PROTO_FIELDS, FairnessDelta
from aggregator.store.base import AlertRecord, IngestOutcome, Store, canonical_labels
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

__all__ = ["AdminService", "IngestService", "QueryService", "fairness_to_proto", "health_to_proto",
           "ingest_handler"]

logger = logging.getLogger(__name__)

_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (UnknownSpec, grpc.StatusCode.FAILED_PRECONDITION),
    (ClockAhead, grpc.StatusCode.FAILED_PRECONDITION),   # retried by the device, not dropped
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (IdentityMismatch, grpc.StatusCode.PERMISSION_DENIED),
    (ForwardNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueryError, grpc.StatusCode.NOT_FOUND),
    (WriterClosed, grpc.StatusCode.UNAVAILABLE),  # the server is stopping: the device retries
    (IngestUnavailable, grpc.StatusCode.UNAVAILABLE),  # the ingest process died: retried
]


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    logger.error("internal error: %r", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    context.abort(*_status_of(exc))
    raise AssertionError("unreachable: context.abort raises")


class IngestService:
    """Report (raw envelope bytes in, so garbage gets a clear INVALID_ARGUMENT) and GetSpec."""

    def __init__(self, ingestor: Ingestor, store: Store,
                 max_message_bytes: int | None = None) -> None:
        self.ingestor = ingestor
        self.store = store
        # Our own limit, below gRPC's receive limit: refusals up to gRPC's are counted here.
        self.max_message_bytes = max_message_bytes

    async def Report(self, request: bytes, context: grpc.aio.ServicerContext
                     ) -> pb.ReportResponse:
        """On the server's event loop (`aggregator.rpc_server`): the report waits for the
        ingest writer's batch without holding a thread (`Ingestor.ingest_async`)."""
        if self.max_message_bytes is not None and len(request) > self.max_message_bytes:
            self.ingestor.count_rejected("oversize")
            # Final, not RESOURCE_EXHAUSTED (which tells a device to retry, as for overload):
            # the same bytes will never fit, and retrying would block the device's spool.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"envelope: {len(request)} bytes, above the limit of "
                                f"{self.max_message_bytes}")
        left = context.time_remaining()
        if left is not None and left <= 0:
            # The caller has given up (it waited in the queue): its retry will carry the report.
            self.ingestor.count_rejected("deadline_exceeded")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                "the call's deadline passed before it was handled")
        try:
            outcome = await self.ingestor.ingest_async(
                request, _peer_device_id(context), peer_aggregator_id=_peer_aggregator_id(context))
        except Exception as e:  # mapped to a status; never kills the server
            await context.abort(*_status_of(e))
        if outcome in (IngestOutcome.REPLAYED, IngestOutcome.SEQ_REUSED):
            # Never merged. The mark tells an honest device that lost its spool where to
            # continue (a replayer learns nothing it could use: the mark only grows).
            mark = await asyncio.to_thread(self._high_water_mark, request)  # a store read
            return pb.ReportResponse(status=pb.ReportResponse.STALE_SEQ, high_water_mark=mark)
        status = (pb.ReportResponse.ACCEPTED if outcome is IngestOutcome.ACCEPTED
                  else pb.ReportResponse.DUPLICATE)
        return pb.ReportResponse(status=status)

    def _high_water_mark(self, envelope_bytes: bytes) -> int:
        # The envelope parsed and verified in `ingest`: parsing it again is cheaper than
        # threading the device id through, and replays are rare.
        report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(envelope_bytes).report)
        return self.store.high_water_mark(report.device_id) or 0

    def GetSpec(self, request: pb.GetSpecRequest, context: grpc.ServicerContext) -> pb.Spec:
        spec = self.store.get_spec(request.model, request.model_version, request.hash)
        if spec is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no spec for model {request.model!r} version "
                          f"{request.model_version or '(latest)'!r}: push one with "
                          "`fleetwatch spec push`")
        return spec_to_proto(spec)


def _peer_device_id(context: grpc.ServicerContext) -> str | None:
    """The device named by the peer's certificate; None without TLS (loopback only). Under
    TLS the interceptor (`aggregator.auth`) lets only device certificates call Report."""
    identity = peer_identity(context)
    return identity.name if identity is not None and identity.role == DEVICE else None


def _peer_aggregator_id(context: grpc.ServicerContext) -> str | None:
    """The regional aggregator named by the peer's certificate; None otherwise."""
    identity = peer_identity(context)
    return identity.name if identity is not None and identity.role == AGGREGATOR else None


def ingest_handler(service: IngestService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("fleetwatch.v1.Ingest", {
        "Report": grpc.unary_unary_rpc_method_handler(
            service.Report, request_deserializer=None,
            response_serializer=pb.ReportResponse.SerializeToString),
        "GetSpec": grpc.unary_unary_rpc_method_handler(
            service.GetSpec, request_deserializer=pb.GetSpecRequest.FromString,
            response_serializer=pb.Spec.SerializeToString),
    })


class AdminService(pb_grpc.AdminServicer):
    """PushSpec, ListSpecs and ServerStats (the Ingestor's counters; zeros without one)."""

    def __init__(self, store: Store, ingestor: Ingestor | None = None, *,
                 forwarding: Callable[[], dict[str, int]] | None = None) -> None:
        self.store = store
        self.ingestor = ingestor
        self.forwarding = forwarding   # a regional aggregator's counters (aggregator.forward)
        self.started_unix_s = int(time.time())

    def PushSpec(self, request: pb.Spec, context: grpc.ServicerContext) -> pb.PushSpecResponse:
        try:
            spec = spec_from_proto(request)
            if spec.latency_reference_kll:
                # Untrusted bytes that the query path hands to datasketches: check them now.
                check_kll_floats(spec.latency_reference_kll,
                                 field="latency.reference_kll")
        except Exception as e:
            if self.ingestor is not None:
                self.ingestor.count_rejected("invalid_spec")
            _abort(context, e)
        created = self.store.put_spec(spec)
        logger.info("spec %s for %s/%s %s", spec.hash[:12], spec.model, spec.model_version,
                    "registered" if created else "already registered")
        return pb.PushSpecResponse(hash=spec.hash, created=created)

    def ListSpecs(self, request: pb.ListSpecsRequest,
                  context: grpc.ServicerContext) -> pb.ListSpecsResponse:
        return pb.ListSpecsResponse(specs=[spec_to_proto(s)
                                           for s in self.store.list_specs(request.model)])

    def ServerStats(self, request: pb.ServerStatsRequest,
                    context: grpc.ServicerContext) -> pb.ServerStatsResponse:
        response = pb.ServerStatsResponse(started_unix_s=self.started_unix_s)
        if self.ingestor is not None:
            stats = self.ingestor.stats()
            response.accepted, response.duplicates = stats.accepted, stats.duplicates
            response.rejected.update(stats.rejected)
        if self.forwarding is not None:
            response.forwarding.update(self.forwarding())
        return response


def _drift_to_proto(f: FeatureHealth) -> pb.FeatureDrift:
    d = f.scores
    return pb.FeatureDrift(name=f.name, count=d.count, psi=d.psi, js_distance=d.js_distance,
                           ks=d.ks, wasserstein=d.wasserstein,
                           wasserstein_norm=d.wasserstein_norm, missing_rate=d.missing_rate,
                           p_value=f.significance.p_value, drifting=f.drifting,
                           insufficient_data=f.insufficient_data,
                           expected_null_psi=f.significance.expected_null_psi)


def health_to_proto(h: CohortHealth) -> pb.CohortHealth:
    msg = pb.CohortHealth(
        cohort=dict(h.cohort), model=h.model, model_version=h.model_version,
        spec_hash=h.spec_hash, start_unix_s=h.start_unix_s, end_unix_s=h.end_unix_s,
        devices=h.devices, reports=h.reports, events=h.events, errors=h.errors,
        error_rate=h.error_rate, latency_p50_ms=h.latency_p50_ms,
        latency_p95_ms=h.latency_p95_ms, latency_p99_ms=h.latency_p99_ms,
        latency_rank_error=h.latency_rank_error,
        features=[_drift_to_proto(f) for f in h.features],
        late_events=h.late_events, invalid_values=h.invalid_values,
        unknown_features=h.unknown_features, spool_dropped=h.spool_dropped,
        reference_latency_p50_ms=h.reference_latency_ms[0],
        reference_latency_p95_ms=h.reference_latency_ms[1],
        reference_latency_p99_ms=h.reference_latency_ms[2],
        withheld_reports=h.withheld_reports, histogram_events=h.histogram_events,
        noise_sd_per_bin=h.noise_sd_per_bin,
        devices_last_day=h.devices_last_day, availability=h.availability,
        heartbeats=h.heartbeats,
        **{name: getattr(h.ground_truth, name) for name in PROTO_FIELDS},
    )
    if h.prediction is not None:
        msg.prediction.CopyFrom(_drift_to_proto(h.prediction))
    return msg


def fairness_to_proto(d: FairnessDelta) -> pb.FairnessDelta:
    return pb.FairnessDelta(
        key=d.key, accuracy_gap=d.accuracy_gap, accuracy_best=d.accuracy_best,
        accuracy_worst=d.accuracy_worst, positive_rate_gap=d.positive_rate_gap,
        positive_rate_highest=d.positive_rate_highest,
        positive_rate_lowest=d.positive_rate_lowest,
        groups=[pb.FairnessGroup(value=g.value, labeled=g.labeled, accuracy=g.accuracy,
                                 positive_rate=g.positive_rate) for g in d.groups])


def privacy_to_proto(c: CohortPrivacy) -> pb.CohortPrivacy:
    p, st = c.spec.privacy, c.stats
    return pb.CohortPrivacy(
        cohort=dict(c.cohort), model=c.spec.model, model_version=c.spec.model_version,
        spec_hash=c.spec.hash, start_unix_s=c.start_unix_s, end_unix_s=c.end_unix_s,
        unit=p.unit, mechanism=p.mechanism, epsilon_per_window=p.epsilon_per_window,
        delta=p.delta, daily_epsilon_budget=p.daily_epsilon_budget,
        noise_sd_per_bin=c.noise_sd_per_bin, devices=st.devices,
        devices_withholding=st.devices_withholding, reports=st.reports,
        reports_withheld=st.reports_withheld, max_day_epsilon_spent=st.max_day_epsilon,
        mean_day_epsilon_spent=st.mean_day_epsilon, per_event_epsilon=c.per_event_epsilon)


def _cohort_query(request: pb.CohortHealthRequest) -> tuple:
    """The positional arguments cohort_health and cohort_privacy share."""
    return (request.model, request.model_version, dict(request.selector),
            list(request.group_by), request.start_unix_s, request.end_unix_s)


def comparison_to_proto(c: Comparison) -> pb.CompareResponse:
    return pb.CompareResponse(
        cohorts=[pb.CohortComparison(
            cohort=dict(cc.cohort), baseline_events=cc.baseline_events,
            candidate_events=cc.candidate_events,
            metrics=[pb.MetricComparison(
                metric=m.metric, baseline=m.baseline, candidate=m.candidate,
                difference=m.difference, p_value=m.p_value, significant=m.significant,
                worse=m.worse, higher_is_worse=m.higher_is_worse) for m in cc.metrics])
            for cc in c.cohorts],
        baseline_spec_hash=c.baseline_spec_hash, candidate_spec_hash=c.candidate_spec_hash,
        start_unix_s=c.start_unix_s, end_unix_s=c.end_unix_s, corrected_alpha=c.corrected_alpha)


class QueryService(pb_grpc.QueryServicer):
    def __init__(self, store: Store, alerts: AlertEvaluator | None = None) -> None:
        self.store = store
        self.alerts = alerts  # None: the server runs without --rules

    def CohortHealth(self, request: pb.CohortHealthRequest,
                     context: grpc.ServicerContext) -> pb.CohortHealthResponse:
        try:
            result = cohort_health(self.store, *_cohort_query(request))
            fairness = (cohort_fairness(self.store, request.model, request.model_version,
                                        dict(request.selector), request.fairness_key,
                                        request.start_unix_s, request.end_unix_s)
                        if request.fairness_key else None)
        except Exception as e:
            _abort(context, e)
        response = pb.CohortHealthResponse(cohorts=[health_to_proto(h) for h in result])
        if fairness is not None:
            response.fairness.CopyFrom(fairness_to_proto(fairness))
        return response

    def CohortPrivacy(self, request: pb.CohortHealthRequest,
                      context: grpc.ServicerContext) -> pb.CohortPrivacyResponse:
        try:
            result = cohort_privacy(self.store, *_cohort_query(request))
        except Exception as e:
            _abort(context, e)
        return pb.CohortPrivacyResponse(cohorts=[privacy_to_proto(c) for c in result])

    def CompareVersions(self, request: pb.CompareRequest,
                        context: grpc.ServicerContext) -> pb.CompareResponse:
        try:
            result = compare_versions(
                self.store, request.model, request.baseline_version, request.candidate_version,
                dict(request.selector), list(request.group_by), request.start_unix_s,
                request.end_unix_s, request.alpha)
        except Exception as e:
            _abort(context, e)
        return comparison_to_proto(result)

    def Explain(self, request: pb.ExplainRequest,
                context: grpc.ServicerContext) -> pb.ExplainResponse:
        try:
            return explain(self.store, request.model, request.model_version,
                           dict(request.selector), request.metric, request.start_unix_s,
                           request.end_unix_s, list(request.keys), request.limit)
        except Exception as e:
            _abort(context, e)

    def ListCohorts(self, request: pb.ListCohortsRequest,
                    context: grpc.ServicerContext) -> pb.ListCohortsResponse:
        try:
            sets = list_cohorts(self.store, request.model, request.model_version)
        except Exception as e:
            _abort(context, e)
        keys: dict[str, set[str]] = {}
        for ls in sets:
            for k, v in ls.labels.items():
                keys.setdefault(k, set()).add(v)
        return pb.ListCohortsResponse(
            label_sets=[canonical_labels(ls.labels) for ls in sets],
            keys=[pb.LabelValues(key=k, values=sorted(v)) for k, v in sorted(keys.items())])

    def ListAlerts(self, request: pb.ListAlertsRequest,
                   context: grpc.ServicerContext) -> pb.ListAlertsResponse:
        if self.alerts is None:
            return pb.ListAlertsResponse(rules_loaded=False)
        try:
            view = self.alerts.view(request.model, request.state,
                                    request.resolved_limit or DEFAULT_RESOLVED_LIMIT)
        except Exception as e:
            _abort(context, e)
        return pb.ListAlertsResponse(
            alerts=[alert_to_proto(a) for a in view.alerts],
            budgets=[budget_to_proto(b) for b in view.budgets],
            evaluated_until={k: int(v) for k, v in view.evaluated_until.items()},
            rules_loaded=True)


DEFAULT_RESOLVED_LIMIT = 20


def alert_to_proto(a: AlertRecord) -> pb.AlertInfo:
    return pb.AlertInfo(
        rule=a.rule, kind=a.kind, model=a.model, cohort=dict(a.cohort), severity=a.severity,
        state=a.state, value=a.value, threshold=a.threshold,
        starts_at_unix_s=int(a.starts_at_s),
        ends_at_unix_s=0 if a.ends_at_s is None else int(a.ends_at_s),
        fingerprint=a.fingerprint, labels=dict(a.labels), annotations=dict(a.annotations))


def budget_to_proto(mb: ModelBudget) -> pb.BudgetInfo:
    b = mb.budget
    return pb.BudgetInfo(slo=b.slo, model=mb.model, model_version=mb.model_version,
                         cohort=dict(b.cohort), windows=b.windows,
                         bad_windows=b.bad, budget=b.budget, left_fraction=b.left_fraction,
                         burn_rates=dict(b.burn_rates))


