"""gRPC servicers: translate between RPC messages and the domain functions, nothing more.

One table maps domain errors to status codes (`_STATUS`)."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from agent.errors import SpecError, ValidationError
from agent.wire import spec_from_proto, spec_to_proto
from aggregator.ingest import Ingestor, UnknownSpec
from aggregator.query import (
    CohortHealth,
    CohortPrivacy,
    FeatureHealth,
    QueryError,
    cohort_health,
    cohort_privacy,
    list_cohorts,
)
from aggregator.store.base import IngestOutcome, Store, canonical_labels
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

__all__ = ["AdminService", "IngestService", "QueryService", "health_to_proto", "ingest_handler"]

logger = logging.getLogger(__name__)

_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (UnknownSpec, grpc.StatusCode.FAILED_PRECONDITION),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueryError, grpc.StatusCode.NOT_FOUND),
]


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            context.abort(code, str(exc))
    logger.error("internal error: %r", exc, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    raise AssertionError("unreachable: context.abort raises")


class IngestService:
    """Report (raw envelope bytes in, so garbage gets a clear INVALID_ARGUMENT) and GetSpec."""

    def __init__(self, ingestor: Ingestor, store: Store) -> None:
        self.ingestor = ingestor
        self.store = store

    def Report(self, request: bytes, context: grpc.ServicerContext) -> pb.ReportResponse:
        try:
            outcome = self.ingestor.ingest(request)
        except Exception as e:  # mapped to a status; never kills the server
            _abort(context, e)
        status = (pb.ReportResponse.DUPLICATE if outcome is IngestOutcome.DUPLICATE
                  else pb.ReportResponse.ACCEPTED)
        return pb.ReportResponse(status=status)

    def GetSpec(self, request: pb.GetSpecRequest, context: grpc.ServicerContext) -> pb.Spec:
        spec = self.store.get_spec(request.model, request.model_version, request.hash)
        if spec is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no spec for model {request.model!r} version "
                          f"{request.model_version or '(latest)'!r}: push one with "
                          "`fleetwatch spec push`")
        return spec_to_proto(spec)


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
    def __init__(self, store: Store) -> None:
        self.store = store

    def PushSpec(self, request: pb.Spec, context: grpc.ServicerContext) -> pb.PushSpecResponse:
        try:
            spec = spec_from_proto(request)
        except Exception as e:
            _abort(context, e)
        created = self.store.put_spec(spec)
        logger.info("spec %s for %s/%s %s", spec.hash[:12], spec.model, spec.model_version,
                    "registered" if created else "already registered")
        return pb.PushSpecResponse(hash=spec.hash, created=created)

    def ListSpecs(self, request: pb.ListSpecsRequest,
                  context: grpc.ServicerContext) -> pb.ListSpecsResponse:
        return pb.ListSpecsResponse(specs=[spec_to_proto(s)
                                           for s in self.store.list_specs(request.model)])


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
    )
    if h.prediction is not None:
        msg.prediction.CopyFrom(_drift_to_proto(h.prediction))
    return msg


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


class QueryService(pb_grpc.QueryServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    def CohortHealth(self, request: pb.CohortHealthRequest,
                     context: grpc.ServicerContext) -> pb.CohortHealthResponse:
        try:
            result = cohort_health(self.store, *_cohort_query(request))
        except Exception as e:
            _abort(context, e)
        return pb.CohortHealthResponse(cohorts=[health_to_proto(h) for h in result])

    def CohortPrivacy(self, request: pb.CohortHealthRequest,
                      context: grpc.ServicerContext) -> pb.CohortPrivacyResponse:
        try:
            result = cohort_privacy(self.store, *_cohort_query(request))
        except Exception as e:
            _abort(context, e)
        return pb.CohortPrivacyResponse(cohorts=[privacy_to_proto(c) for c in result])

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


