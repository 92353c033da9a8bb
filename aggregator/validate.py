"""Validation of untrusted reports against their spec, before anything is stored or merged.

Every check names the field it refused, and maps to a rejection reason that the ingest path
counts. Nothing here hands untrusted sketch bytes to datasketches: `aggregator.kll_check` reads
the layout first.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass

import numpy as np

from agent.errors import ConfigError, ValidationError
from agent.privacy import NoisePlan, noise_plan
from agent.spec import Spec
from agent.summary import LABEL_HISTOGRAMS, Summary
from agent.wire import ReportMeta, report_from_proto, summary_from_proto
from aggregator.kll_check import load_kll_floats
from aggregator.store.base import Contribution
from protos import fleetwatch_pb2 as pb

__all__ = ["MAX_SEQ", "ClockSkewError", "Limits", "validate_forwarded", "validate_report"]

# _check_meta reads the first three by position.
_COUNT_FIELDS = ("event_count", "error_count", "late_event_count", "invalid_value_count",
                 "unknown_feature_count", "spool_dropped_count", "labeled_count",
                 "labels_unmatched_count", "label_cache_evicted_count", "clamped_label_count",
                 "clamped_event_count")
# SQLite integers are signed 64-bit: a larger uint64 seq could not even be stored.
MAX_SEQ = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on what one report may carry."""

    max_labels: int = 32
    max_label_len: int = 128
    max_device_id_len: int = 256
    max_events_per_report: int = 1 << 32
    # How far a device's clock may run ahead of ours: reports created later than now + skew
    # are refused, and windows starting after now + skew + one window length. Nothing bounds
    # the past: a device offline for hours delivers its old windows late, and they count.
    max_clock_skew_s: int = 300
    max_sketch_bytes: int = 1 << 20
    max_agent_version_len: int = 128
    # Cardinality per model, over every version (checked by the Ingestor against what is
    # stored): a report that would add a value (a key) beyond these is refused, never folded
    # into "other", so the cohorts that exist stay exact and the rollups stay bounded.
    max_label_values_per_key: int = 1000
    max_label_keys_per_model: int = 256
    # Devices in one report forwarded by a regional aggregator (`WindowReport.contributions`);
    # the message size limit (AggregatorConfig.max_message_bytes) usually binds first, and the
    # regional splits a larger window into several reports (`aggregator.forward`).
    max_contributions: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_labels", "max_label_len", "max_device_id_len", "max_agent_version_len",
                     "max_label_values_per_key", "max_label_keys_per_model",
                     "max_contributions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


class ClockSkewError(ValidationError):
    """A timestamp ahead of the aggregator's clock by more than the allowed skew."""


def _fail(field: str, message: str) -> ValidationError:
    return ValidationError(field, message)


def _check_text(field: str, text: str, what: str) -> None:
    """Printable (no control, format or line-separator characters, which would forge log lines
    and cohort names that look alike) and without surrounding whitespace (`parse_labels` strips
    it, so "k= v" would not read back as stored)."""
    if not text.isprintable() or text != text.strip():
        raise _fail(field, f"{what} {text[:40]!r} has control characters or surrounding "
                    "whitespace")


# One C call for the eleven counters instead of eleven getattr calls (_check_meta runs per report).
_get_counts = operator.attrgetter(*_COUNT_FIELDS)


def _check_meta(msg: pb.WindowReport, spec: Spec, limits: Limits, now: float) -> None:
    # Each protobuf attribute read costs a wrapper lookup: read each field once, into locals.
    device_id = msg.device_id
    if not device_id or len(device_id) > limits.max_device_id_len:
        raise _fail("device_id", f"must be 1-{limits.max_device_id_len} characters")
    _check_text("device_id", device_id, "device id")
    agent_version = msg.agent_version
    if len(agent_version) > limits.max_agent_version_len:
        raise _fail("agent_version", f"at most {limits.max_agent_version_len} characters")
    _check_text("agent_version", agent_version, "agent version")
    model, model_version = msg.model, msg.model_version
    if model != spec.model or model_version != spec.model_version:
        raise _fail("model", f"report is for {model}/{model_version} but its spec hash "
                    f"belongs to {spec.model}/{spec.model_version}")
    seq = msg.seq
    if not 1 <= seq <= MAX_SEQ:
        raise _fail("seq", f"must be in [1, 2**63 - 1], got {seq}")
    labels = msg.labels
    if labels:
        if len(labels) > limits.max_labels:
            raise _fail("labels", f"at most {limits.max_labels} labels, got {len(labels)}")
        max_len = limits.max_label_len
        for k in labels:  # not .items(): a Python-level view over the protobuf map
            v = labels[k]
            if not k or len(k) > max_len or len(v) > max_len:
                raise _fail("labels", f"label {k[:40]!r}: key must be 1-{max_len} "
                            f"characters, value at most {max_len}")
            if "," in k or "=" in k or "," in v or "=" in v:
                raise _fail("labels", f"label {k[:40]!r}: ',' and '=' are not allowed")
            _check_text("labels", k, "label key")
            _check_text("labels", v, f"label {k[:40]!r}: value")
    window_length_s, length = msg.window_length_s, spec.window_length_s
    if window_length_s != length:
        raise _fail("window_length_s", f"{window_length_s} does not match the spec's "
                    f"{length}")
    start = msg.window_start_unix_s
    if start % length != 0:
        raise _fail("window_start_unix_s", f"{start} is not aligned to the "
                    f"window length {length}")
    if start < 0:
        raise _fail("window_start_unix_s", "must not be negative")
    skew = limits.max_clock_skew_s
    if start > now + skew + length:
        raise ClockSkewError("window_start_unix_s", f"{start} starts more "
                             f"than {skew} s (the clock skew allowed) plus one window after "
                             f"the aggregator's clock ({int(now)})")
    created = msg.created_unix_ms
    if created > (now + skew) * 1000:  # 0: not set (older agents)
        raise ClockSkewError("created_unix_ms", f"{created} is more than {skew} s "
                             f"ahead of the aggregator's clock ({int(now * 1000)})")
    counts = _get_counts(msg)
    limit = limits.max_events_per_report
    if max(counts) > limit:
        for name, value in zip(_COUNT_FIELDS, counts, strict=True):
            if value > limit:
                raise _fail(name, f"{value} is absurd (limit {limit})")
    event_count, error_count, late_event_count = counts[:3]
    if error_count > event_count:
        raise _fail("error_count", f"{error_count} errors in {event_count} events")
    if late_event_count > event_count:
        raise _fail("late_event_count", "more late events than events")


def _check_histogram(field: str, counts: np.ndarray, length: int, events: int,
                     noise_bound: float | None) -> None:
    if counts.shape[0] != length:
        raise _fail(field, f"expected {length} bins, got {counts.shape[0]}")
    if noise_bound is None:  # exact counts
        if (counts < 0).any():
            raise _fail(field, "negative count")
        # Bound every count first: huge counts could wrap the int64 sum around to `events`.
        if (counts > events).any():
            raise _fail(field, f"a count is above the report's {events} events")
        total = int(counts.sum())
        if total != events:
            raise _fail(field, f"counts add up to {total}, the report has {events} events")
        return
    # Noisy counts: each is a true count in [0, events] plus noise that exceeds the bound
    # with probability far below 1e-20 (the bound is 50 standard deviations).
    if (counts < -noise_bound).any() or (counts > events + noise_bound).any():
        raise _fail(field, f"a count is outside [-{noise_bound:.0f}, {events} + "
                    f"{noise_bound:.0f}], impossible for {events} events with this spec's noise")


def _check_label_histogram(field: str, counts: np.ndarray, length: int, labels: int,
                           noise_bound: float | None, exact_total: bool) -> None:
    """As `_check_histogram`, for a label histogram; calibration counts only the labels that
    had a score, so its exact total is at most the labels (`exact_total` False)."""
    if exact_total or noise_bound is not None:
        _check_histogram(field, counts, length, labels, noise_bound)
        return
    if counts.shape[0] != length:
        raise _fail(field, f"expected {length} bins, got {counts.shape[0]}")
    if (counts < 0).any():
        raise _fail(field, "negative count")
    if (counts > labels).any():
        raise _fail(field, f"a count is above the report's {labels} labels")
    total = int(counts.sum())
    if total > labels:
        raise _fail(field, f"counts add up to {total}, the report has {labels} labels")


def _check_heartbeat(msg: pb.WindowReport) -> None:
    """An idle window's report: alive, and nothing else."""
    for name in ("event_count", "labeled_count", "error_count", "late_event_count",
                 "clamped_event_count", "clamped_label_count"):
        if getattr(msg, name):
            raise _fail(name, "a heartbeat reports an idle window: it must be 0")
    if msg.private_withheld:
        raise _fail("private_withheld", "a heartbeat releases nothing, so withholds nothing")
    if msg.features or msg.HasField("prediction"):
        raise _fail("heartbeat", "a heartbeat must not carry histograms")
    for name in LABEL_HISTOGRAMS:
        if msg.HasField(name):
            raise _fail(name, "a heartbeat must not carry histograms")
    if msg.epsilon_spent:
        raise _fail("epsilon_spent", "a heartbeat spends no privacy budget")


def _check_labels(msg: pb.WindowReport, spec: Spec) -> None:
    """The label fields against the spec's LabelSpec (histogram contents come later)."""
    ls = spec.labels
    if ls is None:
        for name in LABEL_HISTOGRAMS:
            if msg.HasField(name):
                raise _fail(name, "the spec has no labels")
        if msg.labeled_count:
            raise _fail("labeled_count", "the spec has no labels")
        return
    if msg.clamped_label_count > msg.labeled_count:
        raise _fail("clamped_label_count", "more clamped labels than labels")
    if noise_plan(spec) is None and msg.clamped_label_count:
        raise _fail("clamped_label_count", "the spec does not clamp")
    wanted = set(ls.histograms)
    for name in LABEL_HISTOGRAMS:
        if name not in wanted and msg.HasField(name):
            raise _fail(name, f"a {ls.task} task has no {name} histogram")
    if msg.private_withheld or msg.heartbeat:
        for name in LABEL_HISTOGRAMS:
            if msg.HasField(name):
                raise _fail(name, "a withheld report or a heartbeat must not carry histograms")
        return
    for name in ls.histograms:
        if not msg.HasField(name):
            raise _fail(name, f"the spec's {ls.task} labels need a {name} histogram")


@dataclass(frozen=True)
class _Layout:
    """What validate_report needs of a spec, computed once per spec (specs are few)."""

    feature_names: list[str]
    # features then prediction (if any), as validate_report checks them; the starts of each
    # in their concatenation, for np.add.reduceat
    lengths: tuple[int, ...]
    starts: np.ndarray
    label_names: tuple[str, ...]
    label_lengths: tuple[int, ...]
    label_starts: np.ndarray
    label_exact: tuple[bool, ...]
    # False when some histogram has no bins (reduceat cannot sum an empty segment): such a
    # spec takes the per-histogram checks only.
    vectorized: bool


_LAYOUTS: dict[str, _Layout] = {}
_MAX_LAYOUTS = 256
# Beyond this, numpy's comparisons of int64 counts with a Python int are not checked here
# to match the per-histogram ones: such reports take the per-histogram checks.
_FAST_MAX_TOTAL = 1 << 62


def _starts(lengths: tuple[int, ...]) -> np.ndarray:
    """Where each histogram starts in the concatenation (an array: reduceat converts a list
    on every call)."""
    out, at = [], 0
    for n in lengths:
        out.append(at)
        at += n
    return np.array(out, dtype=np.intp)


def _layout(spec: Spec) -> _Layout:
    key = spec.hash  # the hash covers the content: equal hashes, equal layouts
    layout = _LAYOUTS.get(key)
    if layout is None:
        hists = [*spec.features, *([spec.prediction] if spec.prediction is not None else [])]
        lengths = tuple(f.histogram_length for f in hists)
        label_names = spec.labels.histograms if spec.labels is not None else ()
        label_lengths = tuple(spec.labels.histogram_length(n)  # type: ignore[union-attr]
                              for n in label_names)
        layout = _Layout(
            feature_names=list(spec.feature_names), lengths=lengths, starts=_starts(lengths),
            label_names=tuple(label_names), label_lengths=label_lengths,
            label_starts=_starts(label_lengths),
            label_exact=tuple(n != "calibration" for n in label_names),
            vectorized=all(n > 0 for n in (*lengths, *label_lengths)))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:  # bounded, as agent.privacy's plans are
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _histograms_pass(arrays: list[np.ndarray], lengths: tuple[int, ...], starts: np.ndarray,
                     total: int, noise_bound: float | None,
                     exact: tuple[bool, ...] | None = None) -> bool:
    """True only if every histogram would pass `_check_histogram` (or, `exact` given, the
    label checks: exact[i] False is calibration's "at most `total`"), in one vectorized pass
    over their concatenation: a few numpy calls per report instead of several per histogram.
    False says nothing: the per-histogram checks then decide, and name the field."""
    if tuple(map(len, arrays)) != lengths:  # 1-D arrays: len is shape[0]
        return False
    if not 0 <= total <= _FAST_MAX_TOTAL:
        return False
    if not arrays:
        return True
    counts = np.concatenate(arrays)
    # _check_histogram's comparisons on the extremes only: every count passes them if the
    # smallest and the largest do. Python compares int and float exactly, numpy through
    # float64, and rounding to float64 is monotonic: exact passes imply numpy's passes.
    lo, hi = int(counts.min()), int(counts.max())
    if noise_bound is not None:
        return -noise_bound <= lo and hi <= total + noise_bound
    if lo < 0 or hi > total:
        return False
    sums = np.add.reduceat(counts, starts).tolist()  # the int64 sums counts.sum() takes
    if exact is None:
        return all(s == total for s in sums)
    return all(s == total if e else s <= total for s, e in zip(sums, exact, strict=True))


def _check_feature_names(msg: pb.WindowReport, spec: Spec, layout: _Layout) -> None:
    names = [f.name for f in msg.features]
    if names != layout.feature_names:
        missing = sorted(set(spec.feature_names) - set(names))
        extra = sorted(set(names) - set(spec.feature_names))
        raise _fail("features", f"must list the spec's features in spec order "
                    f"(missing {missing[:5]}, unexpected {[e[:40] for e in extra[:5]]})")


def _read_report(msg: pb.WindowReport, spec: Spec, limits: Limits, plan: NoisePlan | None,
                 released: bool) -> tuple[ReportMeta, Summary]:
    """validate_report's checks after the feature names, then the conversion."""
    if released:
        has_prediction = msg.HasField("prediction")
        if spec.prediction is not None and not has_prediction:
            raise _fail("prediction", "the spec has a prediction summary; the report has none")
        if spec.prediction is None and has_prediction:
            raise _fail("prediction", "the spec has no prediction summary")
    for name, value in (("epsilon_spent", msg.epsilon_spent),
                        ("day_epsilon_spent", msg.day_epsilon_spent)):
        if not (math.isfinite(value) and 0 <= value <= 1e6):
            raise _fail(name, f"{value} is not a privacy loss")
    event_count, clamped = msg.event_count, msg.clamped_event_count
    if clamped > event_count:
        raise _fail("clamped_event_count", "more clamped events than events")
    if plan is None and clamped:
        raise _fail("clamped_event_count", "the spec does not clamp")
    if plan is not None and (msg.invalid_value_count or msg.unknown_feature_count):
        # Exact counts derived from the inputs would undo the noise: agents never send them.
        raise _fail("invalid_value_count", "a noisy spec keeps input-derived counters on the "
                    "device")
    max_bytes = limits.max_sketch_bytes
    kll_bytes = len(msg.latency_kll)
    if kll_bytes > max_bytes:
        raise _fail("latency_kll", f"{kll_bytes} bytes is over the limit of {max_bytes}")
    max_n = max(event_count, 1)
    return report_from_proto(
        msg, load_kll=lambda b: load_kll_floats(b, max_bytes=max_bytes, max_n=max_n))


def validate_report(msg: pb.WindowReport, spec: Spec, limits: Limits = Limits(),
                    now: float | None = None) -> tuple[ReportMeta, Summary]:
    """Check a parsed report against its spec and return its domain form.

    Raises ValidationError (or its subclass SketchError) naming the field."""
    now = time.time() if now is None else now
    _check_meta(msg, spec, limits, now)
    plan = noise_plan(spec)
    layout = _layout(spec)
    _check_labels(msg, spec)
    heartbeat, withheld = msg.heartbeat, msg.private_withheld
    released = not (heartbeat or withheld)
    if heartbeat:
        _check_heartbeat(msg)
    elif withheld:
        if plan is None:
            raise _fail("private_withheld", "the spec adds no noise, so nothing is withheld")
        if msg.features or msg.HasField("prediction"):
            raise _fail("private_withheld", "a withheld report must not carry histograms")
    # A released report's feature names come first, but are checked on the converted
    # summary's keys (listing the names separately costs ~5 us more a report): whatever the
    # checks in between raise, a wrong name list raises its own error instead, as first.
    try:
        meta, summary = _read_report(msg, spec, limits, plan, released)
    except Exception:
        if released:
            _check_feature_names(msg, spec, layout)
        raise
    if released and (len(summary.features) != len(msg.features)
                     or list(summary.features) != layout.feature_names):
        _check_feature_names(msg, spec, layout)  # raises: the names differ from the spec's
    event_count = msg.event_count
    if withheld or heartbeat:
        # Zeros merge as nothing: the cohort's histograms stay aligned. No noise was added,
        # so the summary adds no variance (report_from_proto left it 0).
        zero = Summary.zero(spec)
        summary.features, summary.prediction = zero.features, zero.prediction
        for name in LABEL_HISTOGRAMS:
            setattr(summary, name, getattr(zero, name))
        summary.noise_variance_per_bin = 0.0
    else:
        events = event_count - msg.clamped_event_count
        bound = None if plan is None else 50 * math.sqrt(plan.variance_per_bin) + 50
        features = summary.features
        arrays = [features[n] for n in layout.feature_names]
        if spec.prediction is not None and summary.prediction is not None:
            arrays.append(summary.prediction)
        if not (layout.vectorized
                and _histograms_pass(arrays, layout.lengths, layout.starts, events, bound)):
            for f in spec.features:
                _check_histogram(f"features[{f.name!r}]", features[f.name],
                                 f.histogram_length, events, bound)
            if spec.prediction is not None and summary.prediction is not None:
                _check_histogram("prediction", summary.prediction,
                                 spec.prediction.histogram_length, events, bound)
        if spec.labels is not None:
            labels = msg.labeled_count - msg.clamped_label_count
            label_arrays = [getattr(summary, name) for name in layout.label_names]
            if not (layout.vectorized and all(a is not None for a in label_arrays)
                    and _histograms_pass(label_arrays, layout.label_lengths,
                                         layout.label_starts, labels, bound,
                                         layout.label_exact)):
                for name in spec.labels.histograms:
                    _check_label_histogram(name, getattr(summary, name),
                                           spec.labels.histogram_length(name), labels, bound,
                                           exact_total=name != "calibration")
        # The variance follows from the spec: never take the device's word for it.
        summary.noise_variance_per_bin = 0.0 if plan is None else plan.variance_per_bin
    if summary.latency.n > event_count:
        raise _fail("latency_kll", f"sketch holds {summary.latency.n} latencies for "
                    f"{event_count} events")
    return meta, summary


# The fields of a device's own report: a forwarded report leaves them empty (`merged` holds
# the merge), so nothing is counted twice.
_PER_REPORT_FIELDS = (*_COUNT_FIELDS, "epsilon_spent", "day_epsilon_spent", "private_withheld",
                      "heartbeat", "latency_kll")


def validate_forwarded(msg: pb.WindowReport, spec: Spec, limits: Limits = Limits(),
                       now: float | None = None
                       ) -> tuple[ReportMeta, Summary, list[Contribution]]:
    """Check a report forwarded by a regional aggregator (`msg.merged` set) against its spec.

    The sender is trusted no more than a device: `merged` is checked as a device summary is
    (histogram shapes and bounds, the KLL bytes read by `aggregator.kll_check` first), the
    contributions must be unique valid device ids whose report and withheld counts add up to
    the merged ones, and the noise variance is recomputed from the spec and the counts (one
    plan variance per released report): a sender's claim that differs is refused.
    Raises ValidationError (or SketchError) naming the field."""
    now = time.time() if now is None else now
    _check_meta(msg, spec, limits, now)
    for name in _PER_REPORT_FIELDS:
        if getattr(msg, name):
            raise _fail(name, "a forwarded report carries its counts in `merged` only")
    if msg.features or msg.HasField("prediction") or any(
            msg.HasField(n) for n in LABEL_HISTOGRAMS):
        raise _fail("features", "a forwarded report carries its histograms in `merged` only")
    contributions = _check_contributions(msg, limits)
    m = msg.merged
    reports = sum(c.reports for c in contributions)
    withheld = sum(c.withheld for c in contributions)
    if m.report_count != reports:
        raise _fail("merged.report_count", f"{m.report_count}, but the contributions add up "
                    f"to {reports} reports")
    if m.withheld_report_count != withheld:
        raise _fail("merged.withheld_report_count", f"{m.withheld_report_count}, but the "
                    f"contributions add up to {withheld} withheld reports")
    if m.heartbeat_count > reports - withheld:
        raise _fail("merged.heartbeat_count", f"{m.heartbeat_count} heartbeats among "
                    f"{reports - withheld} released reports")
    cap = limits.max_events_per_report * reports
    for name in (*_COUNT_FIELDS, "histogram_event_count", "label_histogram_count"):
        if getattr(m, name) > cap:
            raise _fail(f"merged.{name}", f"{getattr(m, name)} is absurd for {reports} reports")
    for name, bound in (("error_count", "event_count"), ("late_event_count", "event_count"),
                        ("clamped_event_count", "event_count"),
                        ("clamped_label_count", "labeled_count")):
        if getattr(m, name) > getattr(m, bound):
            raise _fail(f"merged.{name}", f"more than merged.{bound}")
    if m.histogram_event_count > m.event_count - m.clamped_event_count:
        raise _fail("merged.histogram_event_count", "more than the unclamped events")
    if m.label_histogram_count > m.labeled_count - m.clamped_label_count:
        raise _fail("merged.label_histogram_count", "more than the unclamped labels")
    plan = noise_plan(spec)
    if plan is None and (m.clamped_event_count or m.clamped_label_count or withheld):
        raise _fail("merged.clamped_event_count", "the spec adds no noise: nothing is clamped "
                    "or withheld")
    if plan is not None and (m.invalid_value_count or m.unknown_feature_count):
        raise _fail("merged.invalid_value_count", "a noisy spec keeps input-derived counters "
                    "on the device")
    if spec.labels is None and m.labeled_count:
        raise _fail("merged.labeled_count", "the spec has no labels")
    if len(m.latency_kll) > limits.max_sketch_bytes:
        raise _fail("merged.latency_kll", f"{len(m.latency_kll)} bytes is over the limit of "
                    f"{limits.max_sketch_bytes}")
    names = [f.name for f in m.features]
    if names != list(spec.feature_names):
        raise _fail("merged.features", "must list the spec's features in spec order")
    if (spec.prediction is not None) != m.HasField("prediction"):
        raise _fail("merged.prediction", "present exactly when the spec has a prediction")
    wanted = set(spec.labels.histograms) if spec.labels is not None else set()
    for name in LABEL_HISTOGRAMS:
        if m.HasField(name) != (name in wanted):
            raise _fail(f"merged.{name}", "present exactly when the spec's labels have it")
    summary = summary_from_proto(m, load_kll=lambda b: load_kll_floats(
        b, max_bytes=limits.max_sketch_bytes, max_n=max(m.event_count, 1),
        field="merged.latency_kll"))
    if summary.latency.n > m.event_count:
        raise _fail("merged.latency_kll", f"sketch holds {summary.latency.n} latencies for "
                    f"{m.event_count} events")
    released = reports - withheld - m.heartbeat_count
    if m.heartbeat_count == reports and (m.event_count or m.labeled_count):
        raise _fail("merged.event_count", f"{m.event_count} events and {m.labeled_count} "
                    f"labels in {reports} heartbeats (an idle window has none)")
    if released == 0 and plan is not None:
        # Withheld reports and heartbeats carry no histograms: with nothing released there is
        # no noise to hide counts under, so any count at all would be an exact one.
        if m.histogram_event_count or m.label_histogram_count or any(
                c for h in (*(f.histogram for f in m.features), m.prediction,
                            *(getattr(m, n) for n in LABEL_HISTOGRAMS)) for c in h.counts):
            raise _fail("merged.features", "histograms in a merge of withheld reports and "
                        "heartbeats only (they carry none)")
    variance = 0.0 if plan is None else released * plan.variance_per_bin
    if not math.isclose(m.noise_variance_per_bin, variance, rel_tol=1e-9, abs_tol=1e-12):
        raise _fail("merged.noise_variance_per_bin", f"{m.noise_variance_per_bin}, but "
                    f"{released} released reports of this spec carry {variance}")
    summary.noise_variance_per_bin = variance  # ours, not the sender's
    # Each of the `released` reports passed a device check within 50 sd + 50 of the truth:
    # their sum stays within the sum of those bounds (a tighter bound would let one device
    # that sends counts near its own bound get the whole region's window refused).
    bound = (None if plan is None
             else released * (50 * math.sqrt(plan.variance_per_bin) + 50))
    events = summary.histogram_event_count
    for f in spec.features:
        _check_histogram(f"merged.features[{f.name!r}]", summary.features[f.name],
                         f.histogram_length, events, bound)
    if spec.prediction is not None and summary.prediction is not None:
        _check_histogram("merged.prediction", summary.prediction,
                         spec.prediction.histogram_length, events, bound)
    if spec.labels is not None:
        for name in spec.labels.histograms:
            _check_label_histogram(f"merged.{name}", getattr(summary, name),
                                   spec.labels.histogram_length(name),
                                   summary.label_histogram_count, bound,
                                   exact_total=name != "calibration")
    meta = ReportMeta(
        device_id=msg.device_id, model=msg.model, model_version=msg.model_version,
        labels=dict(msg.labels), window_start_unix_s=msg.window_start_unix_s,
        window_length_s=msg.window_length_s, seq=msg.seq, spec_hash=msg.spec_hash,
        created_unix_ms=msg.created_unix_ms, agent_version=msg.agent_version)
    return meta, summary, contributions


def _check_contributions(msg: pb.WindowReport, limits: Limits) -> list[Contribution]:
    n = len(msg.contributions)
    if n == 0:
        raise _fail("contributions", "a forwarded report names the devices it merges")
    if n > limits.max_contributions:
        raise _fail("contributions", f"{n} devices, above the limit of "
                    f"{limits.max_contributions}")
    seen: set[str] = set()
    out = []
    for c in msg.contributions:
        if not c.device_id or len(c.device_id) > limits.max_device_id_len:
            raise _fail("contributions.device_id",
                        f"must be 1-{limits.max_device_id_len} characters")
        _check_text("contributions.device_id", c.device_id, "device id")
        if c.device_id in seen:
            raise _fail("contributions.device_id", f"device {c.device_id[:64]!r} listed twice")
        seen.add(c.device_id)
        if c.reports < 1:
            raise _fail("contributions.reports", f"device {c.device_id[:64]!r}: at least 1")
        if c.withheld > c.reports:
            raise _fail("contributions.withheld", f"device {c.device_id[:64]!r}: more withheld "
                        "than reports")
        if not (math.isfinite(c.max_day_epsilon) and 0 <= c.max_day_epsilon <= 1e6):
            raise _fail("contributions.max_day_epsilon", f"{c.max_day_epsilon} is not a "
                        "privacy loss")
        out.append(Contribution(c.device_id, c.reports, c.withheld, c.max_day_epsilon))
    return out
