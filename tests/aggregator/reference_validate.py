"""The report validation as it was before the vectorized checks (commit a03b858), frozen
here as the oracle for tests/aggregator/test_validate_oracle.py: validate_report, its _check_*
helpers, agent.wire's report_from_proto / _read_summary and aggregator.kll_check's _check_kll,
copied verbatim (only the imports differ). Do not "fix" this file: it is the reference."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NoReturn

import datasketches
import numpy as np

from agent.errors import ConfigError, ValidationError
from agent.privacy import noise_plan
from agent.spec import Spec
from agent.summary import LABEL_HISTOGRAMS, Summary, empty_kll
from agent.wire import _SHARED_COUNTERS, ReportMeta
from aggregator.kll_check import (
    _FLOATS,
    _FULL_HEADER,
    _HEADER,
    DEFAULT_M,
    FAMILY_KLL,
    FLAG_EMPTY,
    FLAG_LEVEL_ZERO_SORTED,
    FLAG_SINGLE_ITEM,
    FULL_HEADER_BYTES,
    HARD_MAX_N,
    HEADER_BYTES,
    KNOWN_FLAGS,
    MAX_K,
    MAX_LEVELS,
    MIN_K,
    PREAMBLE_INTS_FULL,
    PREAMBLE_INTS_SHORT,
    SERIAL_VERSION_1,
    SERIAL_VERSION_2,
    _ItemKind,
    kll_capacity,
)
from aggregator.kll_check import (
    _fail as _kll_fail,
)
from aggregator.validate import _COUNT_FIELDS, MAX_SEQ, ClockSkewError, Limits
from protos import fleetwatch_pb2 as pb

# -- aggregator/kll_check.py --------------------------------------------------------------------

def _check_kll(data: bytes, kind: _ItemKind, max_n: int, max_bytes: int, field: str) -> None:
    if not isinstance(max_n, int) or not 1 <= max_n <= HARD_MAX_N:
        raise ConfigError(f"max_n must be an int in [1, 2**62], got {max_n!r}")
    if not isinstance(max_bytes, int) or max_bytes < HEADER_BYTES:
        raise ConfigError(f"max_bytes must be an int >= {HEADER_BYTES}, got {max_bytes!r}")

    def fail(message: str) -> NoReturn:
        _kll_fail(field, kind, message)

    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        fail(f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        fail("no bytes (an empty sketch still has an 8-byte header)")
    if size > max_bytes:
        fail(f"{size} bytes, above the limit of {max_bytes}")
    if size < HEADER_BYTES:
        fail(f"truncated: {size} bytes, shorter than the 8-byte header")

    pre_ints, serial_version, family, flags, k, m, unused = _HEADER.unpack_from(data, 0)
    if family != FAMILY_KLL:
        fail(f"family id {family} is not KLL ({FAMILY_KLL}); not a KLL sketch")
    if flags & ~KNOWN_FLAGS:
        fail(f"unknown flag bits set in flags byte 0x{flags:02x}")
    if m != DEFAULT_M:
        fail(f"m is {m}, expected {DEFAULT_M}")
    if not MIN_K <= k <= MAX_K:
        fail(f"k is {k}, outside [{MIN_K}, {MAX_K}]")
    if unused != 0:
        fail(f"unused header byte 7 is {unused}, expected 0")
    is_empty = bool(flags & FLAG_EMPTY)
    is_single = bool(flags & FLAG_SINGLE_ITEM)
    if is_empty and is_single:
        fail("flags say both empty and single item")

    if is_empty or is_single:
        form = "empty" if is_empty else "single-item"
        if pre_ints != PREAMBLE_INTS_SHORT:
            fail(f"preamble size {pre_ints} for the {form} form, expected {PREAMBLE_INTS_SHORT}")
        expected_version = SERIAL_VERSION_1 if is_empty else SERIAL_VERSION_2
        if serial_version != expected_version:
            fail(f"serial version {serial_version} for the {form} form, "
                 f"expected {expected_version}")
        expected_size = HEADER_BYTES + (0 if is_empty else kind.size)
        if size != expected_size:
            fail(f"{size} bytes for the {form} form, expected exactly {expected_size}")
        if is_single:
            item = float(np.frombuffer(data, dtype=kind.dtype, count=1, offset=HEADER_BYTES)[0])
            if not math.isfinite(item):
                fail(f"single item {item!r} is not finite")
        return

    if pre_ints != PREAMBLE_INTS_FULL:
        fail(f"preamble size {pre_ints} for the full form, expected {PREAMBLE_INTS_FULL}")
    if serial_version != SERIAL_VERSION_1:
        fail(f"serial version {serial_version} for the full form, expected {SERIAL_VERSION_1}")
    if size < FULL_HEADER_BYTES:
        fail(f"truncated: {size} bytes, shorter than the {FULL_HEADER_BYTES}-byte full header")
    n, min_k, num_levels, unused = _FULL_HEADER.unpack_from(data, HEADER_BYTES)
    if unused != 0:
        fail(f"unused header byte 19 is {unused}, expected 0")
    if n < 2:
        fail(f"n is {n} in the full form (0 and 1 use the short forms)")
    if n > max_n:
        fail(f"n is {n}, above the limit of {max_n}")
    if not MIN_K <= min_k <= k:
        fail(f"min_k is {min_k}, outside [{MIN_K}, k={k}]")
    if not 1 <= num_levels <= MAX_LEVELS:
        fail(f"number of levels is {num_levels}, outside [1, {MAX_LEVELS}]")
    if num_levels > n.bit_length():
        # merge() sizes its level arrays for 1 + floor(log2(n)) levels; more overflows the heap.
        fail(f"{num_levels} levels for n={n}; at most 1 + floor(log2(n)) = {n.bit_length()}")

    items_at = FULL_HEADER_BYTES + 4 * num_levels
    if size < items_at + 2 * kind.size:
        fail(f"truncated: {size} bytes, shorter than the {items_at + 2 * kind.size} bytes of "
             f"header, {num_levels} level offsets, min and max")
    capacity = kll_capacity(k, num_levels)
    offsets = np.frombuffer(data, dtype="<u4", count=num_levels, offset=FULL_HEADER_BYTES)
    bounds = np.append(offsets.astype(np.int64), capacity)
    populations = np.diff(bounds)
    if (populations < 0).any():
        h = int(np.flatnonzero(populations < 0)[0])
        fail(f"level offsets {bounds.tolist()} decrease at level {h} "
             f"(capacity {capacity} for k={k} and {num_levels} levels)")
    retained = capacity - int(bounds[0])
    expected_size = items_at + (2 + retained) * kind.size
    if size != expected_size:
        fail(f"{size} bytes, but {num_levels} levels holding {retained} items need exactly "
             f"{expected_size}")
    weighted = sum(int(pop) << h for h, pop in enumerate(populations.tolist()))
    if weighted != n:
        fail(f"n is {n}, but the levels' items weigh {weighted} "
             f"(populations {populations.tolist()})")

    lo, hi = np.frombuffer(data, dtype=kind.dtype, count=2, offset=items_at).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        fail(f"min {lo!r} or max {hi!r} is not finite")
    if not lo <= hi:
        fail(f"min {lo!r} is above max {hi!r}")
    items = np.frombuffer(data, dtype=kind.dtype, count=retained, offset=items_at + 2 * kind.size)
    finite = np.isfinite(items)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        fail(f"item {i} is {float(items[i])!r}, not finite")
    outside = (items < lo) | (items > hi)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        fail(f"item {i} is {float(items[i])!r}, outside [min {lo!r}, max {hi!r}]")
    starts = (bounds - bounds[0]).tolist()
    first_sorted = 0 if flags & FLAG_LEVEL_ZERO_SORTED else 1
    for h in range(first_sorted, num_levels):
        level = items[starts[h]:starts[h + 1]]
        descents = level[1:] < level[:-1]
        if descents.any():
            i = int(np.flatnonzero(descents)[0])
            fail(f"level {h} is not sorted (item {i + 1} of the level, {float(level[i + 1])!r}, "
                 f"follows {float(level[i])!r})")
    if num_levels == 1 and (float(items.min()) != lo or float(items.max()) != hi):
        fail(f"exact-mode min {lo!r} / max {hi!r} differ from the items' "
             f"{float(items.min())!r} / {float(items.max())!r}")



def load_kll_floats(data: bytes, *, max_n: int, max_bytes: int,
                    field: str = "latency_kll") -> datasketches.kll_floats_sketch:
    _check_kll(data, _FLOATS, max_n, max_bytes, field)
    return datasketches.kll_floats_sketch.deserialize(bytes(data))


# -- agent/wire.py ------------------------------------------------------------------------------

def _read_summary(msg: pb.WindowReport | pb.Summary, report_count: int,
                  load_kll: Callable[[bytes], datasketches.kll_floats_sketch]) -> Summary:
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


def report_from_proto(msg: pb.WindowReport,
                      load_kll: Callable[[bytes], datasketches.kll_floats_sketch]
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


# -- aggregator/validate.py ---------------------------------------------------------------------

def _fail(field: str, message: str) -> ValidationError:
    return ValidationError(field, message)


def _check_text(field: str, text: str, what: str) -> None:
    """Printable (no control, format or line-separator characters, which would forge log lines
    and cohort names that look alike) and without surrounding whitespace (`parse_labels` strips
    it, so "k= v" would not read back as stored)."""
    if not text.isprintable() or text != text.strip():
        raise _fail(field, f"{what} {text[:40]!r} has control characters or surrounding "
                    "whitespace")


def _check_meta(msg: pb.WindowReport, spec: Spec, limits: Limits, now: float) -> None:
    if not msg.device_id or len(msg.device_id) > limits.max_device_id_len:
        raise _fail("device_id", f"must be 1-{limits.max_device_id_len} characters")
    _check_text("device_id", msg.device_id, "device id")
    if len(msg.agent_version) > limits.max_agent_version_len:
        raise _fail("agent_version", f"at most {limits.max_agent_version_len} characters")
    _check_text("agent_version", msg.agent_version, "agent version")
    if msg.model != spec.model or msg.model_version != spec.model_version:
        raise _fail("model", f"report is for {msg.model}/{msg.model_version} but its spec hash "
                    f"belongs to {spec.model}/{spec.model_version}")
    if not 1 <= msg.seq <= MAX_SEQ:
        raise _fail("seq", f"must be in [1, 2**63 - 1], got {msg.seq}")
    if len(msg.labels) > limits.max_labels:
        raise _fail("labels", f"at most {limits.max_labels} labels, got {len(msg.labels)}")
    for k, v in msg.labels.items():
        if not k or len(k) > limits.max_label_len or len(v) > limits.max_label_len:
            raise _fail("labels", f"label {k[:40]!r}: key must be 1-{limits.max_label_len} "
                        f"characters, value at most {limits.max_label_len}")
        if "," in k or "=" in k or "," in v or "=" in v:
            raise _fail("labels", f"label {k[:40]!r}: ',' and '=' are not allowed")
        _check_text("labels", k, "label key")
        _check_text("labels", v, f"label {k[:40]!r}: value")
    if msg.window_length_s != spec.window_length_s:
        raise _fail("window_length_s", f"{msg.window_length_s} does not match the spec's "
                    f"{spec.window_length_s}")
    if msg.window_start_unix_s % spec.window_length_s != 0:
        raise _fail("window_start_unix_s", f"{msg.window_start_unix_s} is not aligned to the "
                    f"window length {spec.window_length_s}")
    if msg.window_start_unix_s < 0:
        raise _fail("window_start_unix_s", "must not be negative")
    skew = limits.max_clock_skew_s
    if msg.window_start_unix_s > now + skew + spec.window_length_s:
        raise ClockSkewError("window_start_unix_s", f"{msg.window_start_unix_s} starts more "
                             f"than {skew} s (the clock skew allowed) plus one window after "
                             f"the aggregator's clock ({int(now)})")
    if msg.created_unix_ms > (now + skew) * 1000:  # 0: not set (older agents)
        raise ClockSkewError("created_unix_ms", f"{msg.created_unix_ms} is more than {skew} s "
                             f"ahead of the aggregator's clock ({int(now * 1000)})")
    for name in _COUNT_FIELDS:
        if getattr(msg, name) > limits.max_events_per_report:
            raise _fail(name, f"{getattr(msg, name)} is absurd (limit "
                        f"{limits.max_events_per_report})")
    if msg.error_count > msg.event_count:
        raise _fail("error_count", f"{msg.error_count} errors in {msg.event_count} events")
    if msg.late_event_count > msg.event_count:
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


def validate_report(msg: pb.WindowReport, spec: Spec, limits: Limits = Limits(),
                    now: float | None = None) -> tuple[ReportMeta, Summary]:
    """Check a parsed report against its spec and return its domain form.

    Raises ValidationError (or its subclass SketchError) naming the field."""
    now = time.time() if now is None else now
    _check_meta(msg, spec, limits, now)
    plan = noise_plan(spec)
    _check_labels(msg, spec)
    if msg.heartbeat:
        _check_heartbeat(msg)
    elif msg.private_withheld:
        if plan is None:
            raise _fail("private_withheld", "the spec adds no noise, so nothing is withheld")
        if msg.features or msg.HasField("prediction"):
            raise _fail("private_withheld", "a withheld report must not carry histograms")
    else:
        names = [f.name for f in msg.features]
        if names != list(spec.feature_names):
            missing = sorted(set(spec.feature_names) - set(names))
            extra = sorted(set(names) - set(spec.feature_names))
            raise _fail("features", f"must list the spec's features in spec order "
                        f"(missing {missing[:5]}, unexpected {[e[:40] for e in extra[:5]]})")
        if spec.prediction is not None and not msg.HasField("prediction"):
            raise _fail("prediction", "the spec has a prediction summary; the report has none")
        if spec.prediction is None and msg.HasField("prediction"):
            raise _fail("prediction", "the spec has no prediction summary")
    for name in ("epsilon_spent", "day_epsilon_spent"):
        value = getattr(msg, name)
        if not (math.isfinite(value) and 0 <= value <= 1e6):
            raise _fail(name, f"{value} is not a privacy loss")
    if msg.clamped_event_count > msg.event_count:
        raise _fail("clamped_event_count", "more clamped events than events")
    if plan is None and msg.clamped_event_count:
        raise _fail("clamped_event_count", "the spec does not clamp")
    if plan is not None and (msg.invalid_value_count or msg.unknown_feature_count):
        # Exact counts derived from the inputs would undo the noise: agents never send them.
        raise _fail("invalid_value_count", "a noisy spec keeps input-derived counters on the "
                    "device")
    if len(msg.latency_kll) > limits.max_sketch_bytes:
        raise _fail("latency_kll", f"{len(msg.latency_kll)} bytes is over the limit of "
                    f"{limits.max_sketch_bytes}")
    meta, summary = report_from_proto(
        msg, load_kll=lambda b: load_kll_floats(b, max_bytes=limits.max_sketch_bytes,
                                                max_n=max(msg.event_count, 1)))
    if msg.private_withheld or msg.heartbeat:
        # Zeros merge as nothing: the cohort's histograms stay aligned. No noise was added,
        # so the summary adds no variance (report_from_proto left it 0).
        zero = Summary.zero(spec)
        summary.features, summary.prediction = zero.features, zero.prediction
        for name in LABEL_HISTOGRAMS:
            setattr(summary, name, getattr(zero, name))
        summary.noise_variance_per_bin = 0.0
    else:
        events = msg.event_count - msg.clamped_event_count
        bound = None if plan is None else 50 * math.sqrt(plan.variance_per_bin) + 50
        for f in spec.features:
            _check_histogram(f"features[{f.name!r}]", summary.features[f.name],
                             f.histogram_length, events, bound)
        if spec.prediction is not None and summary.prediction is not None:
            _check_histogram("prediction", summary.prediction, spec.prediction.histogram_length,
                             events, bound)
        if spec.labels is not None:
            labels = msg.labeled_count - msg.clamped_label_count
            for name in spec.labels.histograms:
                _check_label_histogram(name, getattr(summary, name),
                                       spec.labels.histogram_length(name), labels, bound,
                                       exact_total=name != "calibration")
        # The variance follows from the spec: never take the device's word for it.
        summary.noise_variance_per_bin = 0.0 if plan is None else plan.variance_per_bin
    if summary.latency.n > msg.event_count:
        raise _fail("latency_kll", f"sketch holds {summary.latency.n} latencies for "
                    f"{msg.event_count} events")
    return meta, summary
