"""Conversion between domain types and protobuf messages. Only this module touches `*_pb2`
on the agent side; the aggregator reuses it so each conversion exists once.

`protos.fleetwatch_pb2` (and with it the protobuf runtime, ~2 MB of RSS) is imported only
when one of these functions runs: the agent's send path encodes with `agent.pbwire` instead,
so a device given its spec never loads protobuf (docs/performance.md, "Footprint")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from datasketches import kll_floats_sketch

from agent.errors import SpecError
from agent.spec import (
    BINARY,
    CATEGORICAL,
    DEVICE_DAY,
    DISCRETE_GAUSSIAN,
    DISCRETE_LAPLACE,
    EVENT,
    MULTICLASS,
    NO_NOISE,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.summary import LABEL_HISTOGRAMS, Summary, empty_kll

if TYPE_CHECKING:
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

# The enums' numbers in protos/fleetwatch.proto (wire constants: written out so that this
# module loads without protobuf; tests/agent/test_pbwire.py checks them against fleetwatch_pb2).
_TYPE_TO_PB = {NUMERIC: 1, CATEGORICAL: 2}                              # FeatureType
_TYPE_FROM_PB = {v: k for k, v in _TYPE_TO_PB.items()}
_UNIT_TO_PB = {EVENT: 1, DEVICE_DAY: 2}                                 # PrivacyUnit
_UNIT_FROM_PB = {v: k for k, v in _UNIT_TO_PB.items()}
_MECH_TO_PB = {DISCRETE_LAPLACE: 1, DISCRETE_GAUSSIAN: 2, NO_NOISE: 3}  # NoiseMechanism
_MECH_FROM_PB = {v: k for k, v in _MECH_TO_PB.items()}
_TASK_TO_PB = {BINARY: 1, MULTICLASS: 2, REGRESSION: 3}                 # LabelTask
_TASK_FROM_PB = {v: k for k, v in _TASK_TO_PB.items()}
# Counters a WindowReport and a Summary both carry, under the same names.
_SHARED_COUNTERS = ("event_count", "error_count", "late_event_count", "invalid_value_count",
                    "unknown_feature_count", "spool_dropped_count", "clamped_event_count",
                    "labeled_count", "labels_unmatched_count", "label_cache_evicted_count",
                    "clamped_label_count")


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
    private_withheld: bool = False
    epsilon_spent: float = 0.0
    day_epsilon_spent: float = 0.0
    # An idle window's report: no histograms, no latencies (availability only).
    heartbeat: bool = False


# -- spec ----------------------------------------------------------------------------------------

def _feature_to_proto(f: FeatureSpec) -> pb.FeatureSpec:
    from protos import fleetwatch_pb2 as pb

    return pb.FeatureSpec(name=f.name, type=_TYPE_TO_PB[f.type], edges=f.edges,
                          vocabulary=f.vocabulary, reference_counts=f.reference_counts)


def _feature_from_proto(m: pb.FeatureSpec) -> FeatureSpec:
    if m.type not in _TYPE_FROM_PB:
        raise SpecError(f"features[{m.name!r}].type", f"unknown feature type {m.type}")
    return FeatureSpec(name=m.name, type=_TYPE_FROM_PB[m.type], edges=tuple(m.edges),
                       vocabulary=tuple(m.vocabulary), reference_counts=tuple(m.reference_counts))


def _privacy_to_proto(p: PrivacySpec) -> pb.PrivacySpec:
    from protos import fleetwatch_pb2 as pb

    return pb.PrivacySpec(unit=_UNIT_TO_PB[p.unit], mechanism=_MECH_TO_PB[p.mechanism],
                          epsilon_per_window=p.epsilon_per_window, delta=p.delta,
                          daily_epsilon_budget=p.daily_epsilon_budget,
                          max_events_per_window=p.max_events_per_window)


def _privacy_from_proto(m: pb.PrivacySpec) -> PrivacySpec:
    if m.unit not in _UNIT_FROM_PB:
        raise SpecError("privacy.unit", f"unknown privacy unit {m.unit}")
    if m.mechanism not in _MECH_FROM_PB:
        raise SpecError("privacy.mechanism", f"unknown noise mechanism {m.mechanism}")
    return PrivacySpec(unit=_UNIT_FROM_PB[m.unit], mechanism=_MECH_FROM_PB[m.mechanism],
                       epsilon_per_window=m.epsilon_per_window, delta=m.delta,
                       daily_epsilon_budget=m.daily_epsilon_budget,
                       max_events_per_window=m.max_events_per_window)


def _labels_to_proto(ls: LabelSpec) -> pb.LabelSpec:
    from protos import fleetwatch_pb2 as pb

    return pb.LabelSpec(task=_TASK_TO_PB[ls.task], classes=ls.classes, threshold=ls.threshold,
                        calibration_edges=ls.calibration_edges,
                        residual_edges=ls.residual_edges, latency_edges=ls.latency_edges)


def _labels_from_proto(m: pb.LabelSpec) -> LabelSpec:
    if m.task not in _TASK_FROM_PB:
        raise SpecError("labels.task", f"unknown label task {m.task}")
    return LabelSpec(task=_TASK_FROM_PB[m.task], classes=tuple(m.classes),
                     threshold=m.threshold, calibration_edges=tuple(m.calibration_edges),
                     residual_edges=tuple(m.residual_edges),
                     latency_edges=tuple(m.latency_edges))


def spec_to_proto(spec: Spec) -> pb.Spec:
    from protos import fleetwatch_pb2 as pb

    msg = pb.Spec(
        model=spec.model,
        model_version=spec.model_version,
        features=[_feature_to_proto(f) for f in spec.features],
        latency=pb.LatencySpec(reference_kll=spec.latency_reference_kll),
        window_length_s=spec.window_length_s,
        hash=spec.hash,
        created_unix_s=spec.created_unix_s,
        reference_rows=spec.reference_rows,
        privacy=_privacy_to_proto(spec.privacy),
    )
    if spec.prediction is not None:
        msg.prediction.CopyFrom(_feature_to_proto(spec.prediction))
    if spec.labels is not None:
        msg.labels.CopyFrom(_labels_to_proto(spec.labels))
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
        # A spec pushed by an older client has no privacy message: the default applies.
        privacy=(_privacy_from_proto(msg.privacy) if msg.HasField("privacy")
                 else PrivacySpec()),
        created_unix_s=msg.created_unix_s,
        labels=_labels_from_proto(msg.labels) if msg.HasField("labels") else None,
    )
    if msg.hash and msg.hash != spec.hash:
        raise SpecError("hash", f"claimed {msg.hash}, content hashes to {spec.hash}")
    return spec


# -- summaries -----------------------------------------------------------------------------------

def _fill_summary(msg: pb.WindowReport | pb.Summary, s: Summary) -> None:
    add = msg.features.add
    for name, counts in s.features.items():
        # add() + slice assignment: ~3x faster than building each message and appending it
        # (the aggregator encodes a rollup row per touched bucket per batch: docs/performance.md)
        f = add()
        f.name = name
        f.histogram.counts[:] = counts.tolist()
    if s.prediction is not None:
        msg.prediction.counts.extend(s.prediction.tolist())
    for name, counts in s.label_histograms().items():
        getattr(msg, name).counts.extend(counts.tolist())
    msg.latency_kll = s.latency.serialize()
    for name in _SHARED_COUNTERS:
        setattr(msg, name, getattr(s, name))


def _read_summary(msg: pb.WindowReport | pb.Summary, report_count: int,
                  load_kll: Callable[[bytes], kll_floats_sketch]) -> Summary:
    s = Summary(
        # np.array over a slice: ~5x faster than np.asarray on a protobuf repeated field
        features={f.name: np.array(f.histogram.counts[:], dtype=np.int64) for f in msg.features},
        prediction=(np.array(msg.prediction.counts[:], dtype=np.int64)
                    if msg.HasField("prediction") else None),
        latency=load_kll(msg.latency_kll) if msg.latency_kll else empty_kll(),
        report_count=report_count,
        **{name: getattr(msg, name) for name in _SHARED_COUNTERS},
    )
    for name in LABEL_HISTOGRAMS:
        if msg.HasField(name):
            setattr(s, name, np.array(getattr(msg, name).counts[:], dtype=np.int64))
    return s


def summary_to_proto(s: Summary) -> pb.Summary:
    from protos import fleetwatch_pb2 as pb

    msg = pb.Summary(report_count=s.report_count, noise_variance_per_bin=s.noise_variance_per_bin,
                     withheld_report_count=s.withheld_report_count,
                     histogram_event_count=s.histogram_event_count,
                     heartbeat_count=s.heartbeat_count,
                     label_histogram_count=s.label_histogram_count)
    _fill_summary(msg, s)
    return msg


def summary_from_proto(msg: pb.Summary,
                       load_kll: Callable[[bytes], kll_floats_sketch] = _deserialize_kll
                       ) -> Summary:
    """Trusting conversion: callers holding untrusted bytes pass a checking `load_kll`."""
    s = _read_summary(msg, msg.report_count, load_kll)
    s.noise_variance_per_bin = msg.noise_variance_per_bin
    s.withheld_report_count = msg.withheld_report_count
    s.histogram_event_count = msg.histogram_event_count
    s.heartbeat_count = msg.heartbeat_count
    s.label_histogram_count = msg.label_histogram_count
    return s


# -- reports -------------------------------------------------------------------------------------

def report_to_proto(meta: ReportMeta, summary: Summary) -> pb.WindowReport:
    from protos import fleetwatch_pb2 as pb

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
        private_withheld=meta.private_withheld,
        epsilon_spent=meta.epsilon_spent,
        day_epsilon_spent=meta.day_epsilon_spent,
        heartbeat=meta.heartbeat,
    )
    _fill_summary(msg, summary)
    if meta.private_withheld or meta.heartbeat:  # nothing private leaves the device
        del msg.features[:]
        msg.ClearField("prediction")
        for name in LABEL_HISTOGRAMS:
            msg.ClearField(name)
    if meta.heartbeat:  # no latencies either: an idle window sends no sketch bytes
        msg.latency_kll = b""
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
        private_withheld=msg.private_withheld,
        epsilon_spent=msg.epsilon_spent,
        day_epsilon_spent=msg.day_epsilon_spent,
        heartbeat=msg.heartbeat,
    )
    summary = _read_summary(msg, 1, load_kll)
    summary.withheld_report_count = int(msg.private_withheld)
    summary.heartbeat_count = int(msg.heartbeat)
    released = not (msg.private_withheld or msg.heartbeat)
    summary.histogram_event_count = (
        max(0, msg.event_count - msg.clamped_event_count) if released else 0)
    summary.label_histogram_count = (
        max(0, msg.labeled_count - msg.clamped_label_count) if released else 0)
    return meta, summary
