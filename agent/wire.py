"""Conversion between domain types and protobuf messages. Only this module touches `*_pb2`
on the agent side; the aggregator reuses it so each conversion exists once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from datasketches import kll_floats_sketch

from agent.errors import SpecError
from agent.spec import CATEGORICAL, NUMERIC, FeatureSpec, Spec
from agent.summary import Summary, empty_kll
from protos import fleetwatch_pb2 as pb

_deserialize_kll = kll_floats_sketch.deserialize

__all__ = [
    "ReportMeta",
    "report_from_proto",
    "report_to_proto",
    "spec_from_proto",
    "spec_to_proto",
    "summary_from_proto",
    "summary_to_proto",
]

_TYPE_TO_PB = {NUMERIC: pb.FEATURE_TYPE_NUMERIC, CATEGORICAL: pb.FEATURE_TYPE_CATEGORICAL}
_TYPE_FROM_PB = {v: k for k, v in _TYPE_TO_PB.items()}


@dataclass(frozen=True)
class ReportMeta:
    """Everything in a WindowReport besides the summary itself."""

    device_id: str
    model: str
    model_version: str
    labels: Mapping[str, str]
    window_start_unix_s: int
    window_length_s: int
    seq: int
    spec_hash: str
    created_unix_ms: int = 0
    agent_version: str = ""
    extra: Mapping[str, int] = field(default_factory=dict)


# -- spec ----------------------------------------------------------------------------------------

def _feature_to_proto(f: FeatureSpec) -> pb.FeatureSpec:
    return pb.FeatureSpec(name=f.name, type=_TYPE_TO_PB[f.type], edges=f.edges,
                          vocabulary=f.vocabulary, reference_counts=f.reference_counts)


def _feature_from_proto(m: pb.FeatureSpec) -> FeatureSpec:
    if m.type not in _TYPE_FROM_PB:
        raise SpecError(f"features[{m.name!r}].type", f"unknown feature type {m.type}")
    return FeatureSpec(name=m.name, type=_TYPE_FROM_PB[m.type], edges=tuple(m.edges),
                       vocabulary=tuple(m.vocabulary), reference_counts=tuple(m.reference_counts))


def spec_to_proto(spec: Spec) -> pb.Spec:
    msg = pb.Spec(
        model=spec.model,
        model_version=spec.model_version,
        features=[_feature_to_proto(f) for f in spec.features],
        latency=pb.LatencySpec(reference_kll=spec.latency_reference_kll),
        window_length_s=spec.window_length_s,
        hash=spec.hash,
        created_unix_s=spec.created_unix_s,
        reference_rows=spec.reference_rows,
    )
    if spec.prediction is not None:
        msg.prediction.CopyFrom(_feature_to_proto(spec.prediction))
    return msg


def spec_from_proto(msg: pb.Spec) -> Spec:
    """Build and validate a Spec; a claimed hash that does not match the content is an error."""
    spec = Spec(
        model=msg.model,
        model_version=msg.model_version,
        features=tuple(_feature_from_proto(f) for f in msg.features),
        prediction=_feature_from_proto(msg.prediction) if msg.HasField("prediction") else None,
        latency_reference_kll=msg.latency.reference_kll,
        window_length_s=msg.window_length_s,
        reference_rows=msg.reference_rows,
        created_unix_s=msg.created_unix_s,
    )
    if msg.hash and msg.hash != spec.hash:
        raise SpecError("hash", f"claimed {msg.hash}, content hashes to {spec.hash}")
    return spec


# -- summaries -----------------------------------------------------------------------------------

def _fill_summary(msg: pb.WindowReport | pb.Summary, s: Summary) -> None:
    for name, counts in s.features.items():
        msg.features.append(pb.FeatureHistogram(name=name,
                                                histogram=pb.Histogram(counts=counts.tolist())))
    if s.prediction is not None:
        msg.prediction.counts.extend(s.prediction.tolist())
    msg.latency_kll = s.latency.serialize()
    msg.event_count = s.event_count
    msg.error_count = s.error_count
    msg.late_event_count = s.late_event_count
    msg.invalid_value_count = s.invalid_value_count
    msg.unknown_feature_count = s.unknown_feature_count
    msg.spool_dropped_count = s.spool_dropped_count


def _read_summary(msg: pb.WindowReport | pb.Summary, report_count: int,
                  load_kll: Callable[[bytes], kll_floats_sketch]) -> Summary:
    return Summary(
        # np.array over a slice: ~5x faster than np.asarray on a protobuf repeated field
        features={f.name: np.array(f.histogram.counts[:], dtype=np.int64) for f in msg.features},
        prediction=(np.array(msg.prediction.counts[:], dtype=np.int64)
                    if msg.HasField("prediction") else None),
        latency=load_kll(msg.latency_kll) if msg.latency_kll else empty_kll(),
        report_count=report_count,
        event_count=msg.event_count,
        error_count=msg.error_count,
        late_event_count=msg.late_event_count,
        invalid_value_count=msg.invalid_value_count,
        unknown_feature_count=msg.unknown_feature_count,
        spool_dropped_count=msg.spool_dropped_count,
    )


def summary_to_proto(s: Summary) -> pb.Summary:
    msg = pb.Summary(report_count=s.report_count)
    _fill_summary(msg, s)
    return msg


def summary_from_proto(msg: pb.Summary,
                       load_kll: Callable[[bytes], kll_floats_sketch] = _deserialize_kll
                       ) -> Summary:
    """Trusting conversion: callers holding untrusted bytes pass a checking `load_kll`."""
    return _read_summary(msg, msg.report_count, load_kll)


# -- reports -------------------------------------------------------------------------------------

def report_to_proto(meta: ReportMeta, summary: Summary) -> pb.WindowReport:
    msg = pb.WindowReport(
        device_id=meta.device_id,
        model=meta.model,
        model_version=meta.model_version,
        labels=dict(meta.labels),
        window_start_unix_s=meta.window_start_unix_s,
        window_length_s=meta.window_length_s,
        seq=meta.seq,
        spec_hash=meta.spec_hash,
        created_unix_ms=meta.created_unix_ms,
        agent_version=meta.agent_version,
    )
    _fill_summary(msg, summary)
    return msg


def report_from_proto(msg: pb.WindowReport,
                      load_kll: Callable[[bytes], kll_floats_sketch] = _deserialize_kll
                      ) -> tuple[ReportMeta, Summary]:
    """Split a report into its metadata and summary (no validation against the spec here)."""
    meta = ReportMeta(
        device_id=msg.device_id,
        model=msg.model,
        model_version=msg.model_version,
        labels=dict(msg.labels),
        window_start_unix_s=msg.window_start_unix_s,
        window_length_s=msg.window_length_s,
        seq=msg.seq,
        spec_hash=msg.spec_hash,
        created_unix_ms=msg.created_unix_ms,
        agent_version=msg.agent_version,
    )
    return meta, _read_summary(msg, 1, load_kll)
