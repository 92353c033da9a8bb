"""validate_report against the implementation it replaced (tests/aggregator/reference_validate.py,
the pre-vectorization code frozen verbatim): on valid reports and on mutated ones (counts
perturbed, histogram lengths wrong, KLL bytes mutated, meta fields out of range, structure
changed), for exact and noisy specs with and without labels and prediction, both must accept
with equal (meta, summary) or refuse with the same exception type, field and message."""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from typing import Any

import numpy as np
from datasketches import kll_floats_sketch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.privacy import noise_plan
from agent.spec import (
    BINARY,
    CATEGORICAL,
    DEVICE_DAY,
    NO_NOISE,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.summary import KLL_K, LABEL_HISTOGRAMS, Summary
from agent.wire import ReportMeta, report_to_proto
from aggregator import validate as new
from aggregator.kll_check import check_kll_floats
from protos import fleetwatch_pb2 as pb
from tests.aggregator import reference_validate as old

NOW = 1_700_000_000
WINDOW_S = 60

PRIVACY = {
    "exact": PrivacySpec(mechanism=NO_NOISE),
    "laplace": PrivacySpec(),
    "clamped": PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=2,
                           max_events_per_window=50),
}
LABEL_SPECS = {
    "none": None,
    "binary": LabelSpec(BINARY, classes=("n", "p"), calibration_edges=(0.0, 0.5, 1.0),
                        latency_edges=(0.0, 10.0, 100.0)),
    "regression": LabelSpec(REGRESSION, residual_edges=(-1.0, 0.0, 1.0),
                            latency_edges=(0.0, 10.0, 100.0)),
}
LIMITS = [new.Limits(), new.Limits(max_events_per_report=3000, max_sketch_bytes=400,
                                   max_labels=2, max_clock_skew_s=10)]


@functools.cache
def _spec(privacy: str, labels: str, prediction: bool) -> Spec:
    features = (FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),
                FeatureSpec("wide", NUMERIC, edges=tuple(float(e) for e in range(20))),
                FeatureSpec("c", CATEGORICAL, vocabulary=("a", "b", "c")))
    return Spec(model="m", model_version="1", features=features,
                prediction=(FeatureSpec("p", NUMERIC, edges=(0.0, 1.0)) if prediction
                            else None),
                privacy=PRIVACY[privacy], labels=LABEL_SPECS[labels],
                window_length_s=WINDOW_S)


@functools.cache
def _kll_bytes(k: int, seed: int, n: int) -> bytes:
    """A sketch of n latencies. Cached: KLL compaction draws random bits, and hypothesis needs
    the same example to give the same bytes (the mutations draw positions from them)."""
    sketch = kll_floats_sketch(k)
    if n:
        sketch.update(np.random.default_rng(seed).gamma(2.0, 20.0, n).astype(np.float32))
    return sketch.serialize()


def _spread(rng: np.random.Generator, total: int, length: int) -> np.ndarray:
    return rng.multinomial(total, np.full(length, 1.0 / length)).astype(np.int64)


def _valid_report(spec: Spec, seed: int, events: int, latencies: int, labeled: int,
                  clamp: bool) -> pb.WindowReport:
    """A report both implementations accept (noisy specs: counts off by a little noise)."""
    rng = np.random.default_rng(seed)
    noisy = noise_plan(spec) is not None
    clamped = min(events, 7) if clamp and noisy else 0
    clamped_labels = min(labeled, 2) if clamp and noisy else 0
    s = Summary.zero(spec)
    s.event_count, s.clamped_event_count = events, clamped
    hists = [f.name for f in spec.features] + (["prediction"] if spec.prediction else [])
    for name in hists:
        length = (spec.prediction.histogram_length if name == "prediction"  # type: ignore
                  else spec.feature(name).histogram_length)
        counts = _spread(rng, events - clamped, length)
        if noisy:
            counts += rng.integers(-3, 4, length)
        if name == "prediction":
            s.prediction = counts
        else:
            s.features[name] = counts
    if spec.labels is not None:
        s.labeled_count, s.clamped_label_count = labeled, clamped_labels
        for name in spec.labels.histograms:
            total = labeled - clamped_labels
            if name == "calibration":
                total = int(rng.integers(0, total + 1))
            counts = _spread(rng, total, spec.labels.histogram_length(name))
            if noisy:
                counts += rng.integers(-3, 4, counts.shape[0])
            setattr(s, name, counts)
    s.latency = kll_floats_sketch.deserialize(_kll_bytes(KLL_K, seed, min(latencies, events)))
    meta = ReportMeta(device_id="dev-1", model="m", model_version="1",
                      labels={"region": "eu", "hw": "jetson"},
                      window_start_unix_s=NOW - NOW % WINDOW_S - 600,
                      window_length_s=WINDOW_S, seq=1, spec_hash=spec.hash,
                      created_unix_ms=NOW * 1000, agent_version="1.2.3",
                      epsilon_spent=1.0 if noisy else 0.0, day_epsilon_spent=1.0 if noisy else 0.0)
    return report_to_proto(meta, s)


# -- mutations ------------------------------------------------------------------------------

_HUGE = [-(1 << 63), (1 << 63) - 1, 1 << 62, -(1 << 62), 1 << 53, (1 << 53) + 1, 1 << 32]
_COUNTERS = [*new._COUNT_FIELDS]


def _histograms(msg: pb.WindowReport) -> list[Any]:
    out = [f.histogram for f in msg.features]
    if msg.HasField("prediction"):
        out.append(msg.prediction)
    out += [getattr(msg, n) for n in LABEL_HISTOGRAMS if msg.HasField(n)]
    return out


def _mutate_count(data: st.DataObject, msg: pb.WindowReport, spec: Spec) -> None:
    hists = [h for h in _histograms(msg) if len(h.counts)]
    if not hists:
        return
    h = data.draw(st.sampled_from(hists))
    i = data.draw(st.integers(0, len(h.counts) - 1))
    plan = noise_plan(spec)
    bound = 0 if plan is None else 50 * math.sqrt(plan.variance_per_bin) + 50
    events = msg.event_count - msg.clamped_event_count
    labels = msg.labeled_count - msg.clamped_label_count
    c = h.counts[i]
    near = [c - 1, c + 1, -1, 0, events, events + 1, labels, labels + 1,
            math.floor(-bound), math.ceil(-bound) - 1, math.floor(events + bound),
            math.floor(events + bound) + 1, math.floor(labels + bound) + 1]
    value = data.draw(st.sampled_from(near + _HUGE) | st.integers(-(1 << 63), (1 << 63) - 1))
    h.counts[i] = max(-(1 << 63), min((1 << 63) - 1, value))
    if data.draw(st.booleans()):  # keep the total: a count moved between bins
        j = data.draw(st.integers(0, len(h.counts) - 1))
        h.counts[j] = max(-(1 << 63), min((1 << 63) - 1, h.counts[j] - (value - c)))


def _mutate_length(data: st.DataObject, msg: pb.WindowReport, spec: Spec) -> None:
    hists = _histograms(msg)
    if not hists:
        return
    h = data.draw(st.sampled_from(hists))
    if len(h.counts) and data.draw(st.booleans()):
        del h.counts[-1]
    else:
        h.counts.append(data.draw(st.sampled_from([0, 1, -1])))


def _mutate_kll(data: st.DataObject, msg: pb.WindowReport, spec: Spec) -> None:
    b = bytearray(msg.latency_kll)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "swap", "nan", "inf",
                                      "big", "n", "levels", "empty", "zero_sorted",
                                      "unsort_level", "minmax"]))
    items_at = 20 + 4 * b[18] + 8 if len(b) > 18 else len(b)
    item_slots = list(range(items_at, len(b) - 3, 4)) or [0]
    # A full-form layout whose size matches its levels (so the offsets can be read back).
    full = (b[:1] == b"\x05" and len(b) > 18 and b[18] >= 1
            and len(b) == items_at + 4 * len(item_slots))
    if kind == "flip" and b:
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate" and b:
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    elif kind == "append":
        b += bytes(data.draw(st.integers(1, 8)))
    elif kind == "swap" and len(b) >= 8:
        i, j = data.draw(st.sampled_from(item_slots)), data.draw(st.sampled_from(item_slots))
        b[i:i + 4], b[j:j + 4] = b[j:j + 4], b[i:i + 4]
    elif kind in ("nan", "inf", "big") and len(b) >= 12:
        i = data.draw(st.sampled_from([*item_slots, 8, 20]))
        if i + 4 <= len(b):
            value = {"nan": math.nan, "inf": -math.inf, "big": 3e38}[kind]
            b[i:i + 4] = struct.pack("<f", value)
    elif kind == "n" and len(b) >= 16:
        b[8:16] = struct.pack("<Q", data.draw(st.sampled_from(
            [0, 1, 2, min(int.from_bytes(b[8:16], "little") + 1, (1 << 64) - 1), 1 << 40,
             (1 << 64) - 1])))
    elif kind == "levels" and len(b) >= 19:
        b[18] = data.draw(st.sampled_from([0, 1, 2, min(b[18] + 1, 255), 61, 62, 255]))
    elif kind == "zero_sorted" and len(b) >= 4:
        b[3] ^= 2
    elif kind == "empty":
        b = bytearray()
    elif kind == "unsort_level" and full:
        # Swap two neighbours inside one level only: a violation no other check sees.
        num_levels = b[18]
        offsets = list(struct.unpack_from(f"<{num_levels}I", b, 20))
        offsets.append(offsets[0] + len(item_slots))  # the capacity, as the size implies
        levels = [h for h in range(num_levels) if offsets[h + 1] - offsets[h] >= 2]
        if levels:
            h = data.draw(st.sampled_from(levels))
            last = offsets[h + 1] - offsets[h] - 2  # the level's ends, next to its neighbours
            at = data.draw(st.sampled_from([0, last]) | st.integers(0, last))
            i = items_at + 4 * (offsets[h] - offsets[0] + at)
            b[i:i + 8] = b[i + 4:i + 8] + b[i:i + 4]
    elif kind == "minmax" and len(b) >= items_at >= 28:
        i = data.draw(st.sampled_from([items_at - 8, items_at - 4]))
        (current,) = struct.unpack_from("<f", b, i)
        value = data.draw(st.sampled_from([current - 1.0, current + 1.0, 0.0, math.nan]))
        b[i:i + 4] = struct.pack("<f", value)
    msg.latency_kll = bytes(b)


_META_VALUES: dict[str, list[Any]] = {
    "seq": [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1],
    "device_id": ["", "x" * 256, "x" * 257, "a\nb", " d", "d\u200b", "dev-2"],
    "agent_version": ["", "v" * 128, "v" * 129, "v\x00", "v "],
    "model": ["other", ""],
    "model_version": ["2"],
    "window_length_s": [0, WINDOW_S - 1, WINDOW_S + 1, 3600],
    "window_start_unix_s": [NOW - NOW % WINDOW_S + 1, -WINDOW_S, 0,
                            NOW - NOW % WINDOW_S + 300, NOW - NOW % WINDOW_S + 360,
                            NOW - NOW % WINDOW_S + 420, (1 << 62) - (1 << 62) % WINDOW_S],
    "created_unix_ms": [0, (NOW + 299) * 1000, (NOW + 301) * 1000, (NOW + 9) * 1000,
                        (NOW + 11) * 1000, -1],
    "epsilon_spent": [math.nan, -1.0, math.inf, 0.0, 1e6, 1e6 + 1, 0.5],
    "day_epsilon_spent": [math.nan, -0.0, -1e-9, math.inf, 1e6, 2.0],
    "heartbeat": [True, False],
    "private_withheld": [True, False],
}
_COUNT_VALUES = [0, 1, 2, 10, 2999, 3000, 3001, 1 << 32, (1 << 32) + 1, (1 << 64) - 1]


def _mutate_meta(data: st.DataObject, msg: pb.WindowReport, spec: Spec) -> None:
    name = data.draw(st.sampled_from([*_META_VALUES, *_COUNTERS, "labels"]))
    if name == "labels":
        change = data.draw(st.sampled_from([
            {"k=v": "x"}, {"": "v"}, {"k": "a,b"}, {"k": "x" * 129}, {"k" * 129: "v"},
            {"k": " v"}, {"k": "\x1b[0m"}, {"k": ""}, {f"k{i}": "v" for i in range(33)},
            {"third": "v"}, {}]))
        if not change:
            msg.ClearField("labels")
        msg.labels.update(change)
        return
    values = _META_VALUES.get(name, _COUNT_VALUES)
    value = data.draw(st.sampled_from(values))
    if name in _COUNTERS and data.draw(st.booleans()):  # relative to the events
        value = max(0, min((1 << 64) - 1, msg.event_count + data.draw(st.integers(-2, 2))))
    setattr(msg, name, value)


def _mutate_structure(data: st.DataObject, msg: pb.WindowReport, spec: Spec) -> None:
    kind = data.draw(st.sampled_from(["drop", "swap", "rename", "duplicate", "clear_features",
                                      "clear_prediction", "add_prediction", "clear_label",
                                      "add_label"]))
    feats = msg.features
    if kind == "drop" and len(feats):
        del feats[data.draw(st.integers(0, len(feats) - 1))]
    elif kind == "swap" and len(feats) >= 2:
        a, b = pb.FeatureHistogram(), pb.FeatureHistogram()
        a.CopyFrom(feats[0])
        b.CopyFrom(feats[1])
        feats[0].CopyFrom(b)
        feats[1].CopyFrom(a)
    elif kind == "rename" and len(feats):
        feats[data.draw(st.integers(0, len(feats) - 1))].name = data.draw(
            st.sampled_from(["y", "x", "c", ""]))
    elif kind == "duplicate" and len(feats):
        feats.add().CopyFrom(feats[0])
    elif kind == "clear_features":
        del feats[:]
    elif kind == "clear_prediction":
        msg.ClearField("prediction")
    elif kind == "add_prediction":
        msg.prediction.counts.extend([0, 1, 0, 0])
    elif kind == "clear_label":
        msg.ClearField(data.draw(st.sampled_from(LABEL_HISTOGRAMS)))
    elif kind == "add_label":
        getattr(msg, data.draw(st.sampled_from(LABEL_HISTOGRAMS))).counts.extend([0, 0, 0])


MUTATIONS = [_mutate_count, _mutate_length, _mutate_kll, _mutate_meta, _mutate_structure]


# -- comparison -----------------------------------------------------------------------------

def _state(value: Any) -> Any:
    """A comparable form of a result: arrays by dtype and contents, sketches by their bytes."""
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tolist())
    if isinstance(value, kll_floats_sketch):
        return ("kll", value.serialize())
    if isinstance(value, dict):
        return ("dict", [(k, _state(v)) for k, v in value.items()])
    if dataclasses.is_dataclass(value):
        return (type(value).__name__,
                [(f.name, _state(getattr(value, f.name))) for f in dataclasses.fields(value)])
    return (type(value).__name__, value)


def _outcome(validate: Any, raw: bytes, spec: Spec, limits: new.Limits) -> tuple[Any, ...]:
    msg = pb.WindowReport.FromString(raw)
    try:
        meta, summary = validate(msg, spec, limits, now=NOW)
    except Exception as e:  # noqa: BLE001 - any exception must be the same one
        return ("refused", type(e).__name__, getattr(e, "field", None), str(e))
    return ("accepted", _state(meta), _state(summary))


def _check_agree(msg: pb.WindowReport, spec: Spec, limits: new.Limits) -> tuple[Any, ...]:
    raw = msg.SerializeToString()
    expected = _outcome(old.validate_report, raw, spec, limits)
    got = _outcome(new.validate_report, raw, spec, limits)
    assert got == expected
    return expected


specs = st.builds(_spec, st.sampled_from(list(PRIVACY)), st.sampled_from(list(LABEL_SPECS)),
                  st.booleans())
reports = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 5, 40, 400, 2500]),
                    st.sampled_from([0, 1, 2, 150, 199, 201, 1000, 2500]),
                    st.integers(0, 30), st.booleans())


@settings(max_examples=150, deadline=None)
@given(specs, reports)
def test_valid_reports_are_accepted_alike(spec: Spec, report: tuple) -> None:
    seed, events, latencies, labeled, clamp = report
    outcome = _check_agree(_valid_report(spec, seed, events, latencies, labeled, clamp), spec,
                           new.Limits())
    assert outcome[0] == "accepted", outcome  # the base reports are valid: a useful oracle


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs, reports, st.sampled_from(LIMITS), st.data())
def test_mutated_reports_get_the_same_decision(spec: Spec, report: tuple, limits: new.Limits,
                                               data: st.DataObject) -> None:
    msg = _valid_report(spec, *report)
    for mutate in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutate(data, msg, spec)
    _check_agree(msg, spec, limits)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([2, 3, 50, 199, 200, 201, 600, 5000, 100_000]), st.integers(0, 2**32 - 1),
       st.data())
def test_mutated_kll_bytes_get_the_same_decision(n: int, seed: int, data: st.DataObject) -> None:
    """The KLL check alone, on sketches of every depth (the reports above carry few levels)."""
    msg = pb.WindowReport(latency_kll=_kll_bytes(data.draw(st.sampled_from([8, 20, KLL_K])),
                                                 seed, n))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate_kll(data, msg, _spec("exact", "none", False))
    raw, max_n = msg.latency_kll, data.draw(st.sampled_from([n, n - 1, 1 << 40]))

    def run(check: Any) -> tuple[Any, ...]:
        try:
            check(raw)
        except Exception as e:  # noqa: BLE001 - any exception must be the same one
            return ("refused", type(e).__name__, getattr(e, "field", None), str(e))
        return ("accepted",)

    expected = run(lambda b: old._check_kll(b, old._FLOATS, max_n, 1 << 20, "latency_kll"))
    assert run(lambda b: check_kll_floats(b, max_n=max_n)) == expected
