"""aggregator.validate on noisy (DP) and withheld reports."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent.errors import ValidationError
from agent.privacy import noise_plan
from agent.spec import (
    BINARY,
    DEVICE_DAY,
    NO_NOISE,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.summary import Summary
from agent.wire import ReportMeta, report_to_proto
from aggregator.validate import validate_report

NOW = 1_700_000_000


def _spec(privacy: PrivacySpec = PrivacySpec()) -> Spec:
    return Spec(model="m", model_version="1",
                features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0),
                                      reference_counts=(0, 5, 5, 0, 0)),),
                prediction=FeatureSpec("p", NUMERIC, edges=(0.0, 1.0),
                                       reference_counts=(0, 10, 0, 0)),
                privacy=privacy)


def _report(spec: Spec, x: list[int], p: list[int], events: int, **meta):
    s = Summary.zero(spec)
    s.features["x"] = np.asarray(x, np.int64)
    s.prediction = np.asarray(p, np.int64)
    s.event_count = events
    m = ReportMeta(device_id="d", model="m", model_version="1", labels={},
                   window_start_unix_s=NOW - NOW % 60, window_length_s=60, seq=1,
                   spec_hash=spec.hash, **meta)
    return report_to_proto(m, s)


def test_noisy_counts_may_be_negative_and_not_add_up() -> None:
    spec = _spec()
    msg = _report(spec, [-3, 7, 2, 1, -1], [1, 9, -2, 0], 10, epsilon_spent=1.0)
    meta, summary = validate_report(msg, spec, now=NOW)
    plan = noise_plan(spec)
    assert plan is not None
    # The variance comes from the spec, whatever the device claims.
    assert summary.noise_variance_per_bin == plan.variance_per_bin
    assert summary.histogram_event_count == 10 and summary.withheld_report_count == 0
    assert list(summary.features["x"]) == [-3, 7, 2, 1, -1]


def test_noisy_counts_beyond_any_plausible_noise_are_refused() -> None:
    spec = _spec()
    plan = noise_plan(spec)
    assert plan is not None
    bound = 50 * math.sqrt(plan.variance_per_bin) + 50
    with pytest.raises(ValidationError, match=r"features\['x'\]"):
        validate_report(_report(spec, [0, int(-bound) - 1, 0, 0, 0], [0, 10, 0, 0], 10),
                        spec, now=NOW)
    with pytest.raises(ValidationError, match="prediction"):
        validate_report(_report(spec, [0, 5, 5, 0, 0], [0, 10 + int(bound) + 1, 0, 0], 10),
                        spec, now=NOW)


def test_exact_specs_keep_exact_checks() -> None:
    spec = _spec(PrivacySpec(mechanism=NO_NOISE))
    with pytest.raises(ValidationError, match="negative"):
        validate_report(_report(spec, [-1, 6, 5, 0, 0], [0, 10, 0, 0], 10), spec, now=NOW)
    with pytest.raises(ValidationError, match="add up"):
        validate_report(_report(spec, [0, 6, 5, 0, 0], [0, 10, 0, 0], 10), spec, now=NOW)


def test_withheld_reports_carry_no_histograms_and_merge_as_zeros() -> None:
    spec = _spec()
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10, private_withheld=True,
                  day_epsilon_spent=3.0)
    assert len(msg.features) == 0 and not msg.HasField("prediction")  # stripped on the wire
    meta, summary = validate_report(msg, spec, now=NOW)
    assert meta.private_withheld and meta.day_epsilon_spent == 3.0
    assert summary.withheld_report_count == 1 and summary.histogram_event_count == 0
    assert summary.event_count == 10  # operational signals still count
    assert all((v == 0).all() for v in summary.features.values())
    assert summary.noise_variance_per_bin == 0.0
    merged = Summary.zero(spec)
    merged.merge_in(summary)  # lines up with released reports' histograms


def test_withheld_report_with_histograms_is_refused() -> None:
    spec = _spec()
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    msg.private_withheld = True
    with pytest.raises(ValidationError, match="private_withheld"):
        validate_report(msg, spec, now=NOW)


def test_withholding_needs_a_noisy_spec() -> None:
    spec = _spec(PrivacySpec(mechanism=NO_NOISE))
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10, private_withheld=True)
    with pytest.raises(ValidationError, match="private_withheld"):
        validate_report(msg, spec, now=NOW)


@pytest.mark.parametrize("field,value", [("epsilon_spent", math.nan),
                                         ("epsilon_spent", -1.0),
                                         ("day_epsilon_spent", math.inf)])
def test_privacy_loss_fields_are_checked(field: str, value: float) -> None:
    spec = _spec()
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    setattr(msg, field, value)
    with pytest.raises(ValidationError, match=field):
        validate_report(msg, spec, now=NOW)


def test_clamped_events_are_checked() -> None:
    spec = _spec(PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=2,
                             max_events_per_window=4))
    msg = _report(spec, [0, 2, 2, 0, 0], [0, 4, 0, 0], 10)
    msg.clamped_event_count = 6
    _, summary = validate_report(msg, spec, now=NOW)
    assert summary.histogram_event_count == 4 and summary.clamped_event_count == 6
    msg.clamped_event_count = 11
    with pytest.raises(ValidationError, match="clamped_event_count"):
        validate_report(msg, spec, now=NOW)
    exact = _spec(PrivacySpec(mechanism=NO_NOISE))
    msg = _report(exact, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    msg.clamped_event_count = 1
    with pytest.raises(ValidationError, match="clamped_event_count"):
        validate_report(msg, exact, now=NOW)


def test_noisy_specs_refuse_exact_input_counters() -> None:
    spec = _spec()
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    msg.invalid_value_count = 3
    with pytest.raises(ValidationError, match="invalid_value_count"):
        validate_report(msg, spec, now=NOW)


# -- ground truth and heartbeats ----------------------------------------------------------------

LABELS = LabelSpec(BINARY, classes=("n", "p"), calibration_edges=(0.0, 0.5, 1.0),
                   latency_edges=(0.0, 10.0, 100.0))


def _labeled_spec(privacy: PrivacySpec = PrivacySpec(mechanism=NO_NOISE),
                  labels: LabelSpec = LABELS) -> Spec:
    return dataclasses.replace(_spec(privacy), labels=labels)


def _labeled_report(spec: Spec, labeled: int = 4, **hists):
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    msg.labeled_count = labeled
    default = {"confusion": [2, 1, 0, 0, 1, 0, 0, 0, 0], "calibration": [1, 0, 0, 2],
               "label_latency": [0, 3, 1, 0, 0]}
    if spec.labels is not None and spec.labels.task == REGRESSION:
        default = {"residuals": [0, 2, 2, 0, 0], "label_latency": [0, 3, 1, 0, 0]}
    default.update(hists)
    for name, counts in default.items():
        msg.ClearField(name)  # _report sent the zero summary's histograms
        if counts is not None:
            getattr(msg, name).counts.extend(counts)
    return msg


def test_label_histograms_are_validated_and_kept() -> None:
    spec = _labeled_spec()
    _, summary = validate_report(_labeled_report(spec), spec, now=NOW)
    assert summary.labeled_count == 4 and summary.label_histogram_count == 4
    assert summary.confusion.tolist() == [2, 1, 0, 0, 1, 0, 0, 0, 0]
    reg = _labeled_spec(labels=LabelSpec(REGRESSION, residual_edges=(-1.0, 0.0, 1.0),
                                         latency_edges=(0.0, 10.0, 100.0)))
    _, summary = validate_report(_labeled_report(reg), reg, now=NOW)
    assert summary.residuals.tolist() == [0, 2, 2, 0, 0] and summary.confusion is None


@pytest.mark.parametrize(("hists", "labeled", "field", "words"), [
    (dict(confusion=None), 4, "confusion", "need a confusion"),
    (dict(label_latency=None), 4, "label_latency", "need a label_latency"),
    (dict(confusion=[2, 1, 0, 0, 1, 0, 0, 0]), 4, "confusion", "expected 9 bins"),
    (dict(confusion=[2, 1, 0, 0, 2, 0, 0, 0, 0]), 4, "confusion", "add up to 5"),
    (dict(confusion=[5, -1, 0, 0, 0, 0, 0, 0, 0]), 4, "confusion", "negative"),
    (dict(label_latency=[0, 3, 0, 0, 0]), 4, "label_latency", "add up to 3"),
    (dict(calibration=[1, 2, 1, 1]), 4, "calibration", "add up to 5"),
    (dict(calibration=[5, 0, 0, 0]), 4, "calibration", "above"),
    (dict(calibration=[1, -1, 0, 0]), 4, "calibration", "negative"),
    (dict(residuals=[0, 4, 0, 0, 0]), 4, "residuals", "no residuals"),
    ({}, 5, "confusion", "add up to 4"),
])
def test_label_histogram_refusals(hists: dict, labeled: int, field: str, words: str) -> None:
    spec = _labeled_spec()
    with pytest.raises(ValidationError, match=words) as e:
        validate_report(_labeled_report(spec, labeled, **hists), spec, now=NOW)
    assert e.value.field == field


def test_calibration_may_count_fewer_labels() -> None:
    spec = _labeled_spec()  # multiclass labels without a confidence have no calibration count
    _, summary = validate_report(_labeled_report(spec, calibration=[1, 0, 0, 0]), spec, now=NOW)
    assert summary.calibration.tolist() == [1, 0, 0, 0]


def test_label_fields_without_labels_in_the_spec_are_refused() -> None:
    spec = _spec(PrivacySpec(mechanism=NO_NOISE))
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    msg.confusion.counts.extend([1])
    with pytest.raises(ValidationError, match="no labels") as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == "confusion"
    msg = _report(spec, [0, 5, 5, 0, 0], [0, 10, 0, 0], 10)
    msg.labeled_count = 1
    with pytest.raises(ValidationError, match="no labels") as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == "labeled_count"


@pytest.mark.parametrize(("field", "value"), [
    ("labeled_count", (1 << 32) + 1), ("labels_unmatched_count", 1 << 40),
    ("label_cache_evicted_count", 1 << 40), ("clamped_label_count", 5)])
def test_label_counts_are_bounded(field: str, value: int) -> None:
    spec = _labeled_spec()
    msg = _labeled_report(spec)
    setattr(msg, field, value)
    with pytest.raises(ValidationError) as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == field


def test_noisy_label_histograms_get_the_noise_bound() -> None:
    privacy = PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=2,
                          max_events_per_window=4)
    spec = _labeled_spec(privacy)
    plan = noise_plan(spec)
    assert plan is not None
    bound = 50 * math.sqrt(plan.variance_per_bin) + 50
    msg = _labeled_report(spec, 6, confusion=[-3, 9, 0, 0, 1, 0, 0, 0, 0],
                          calibration=[7, -2, 0, 0])  # noisy: need not add up
    msg.clamped_label_count = 2
    msg.clamped_event_count = 6
    _, summary = validate_report(msg, spec, now=NOW)
    assert summary.label_histogram_count == 4 and summary.clamped_label_count == 2
    assert summary.noise_variance_per_bin == plan.variance_per_bin
    msg.label_latency.counts[0] = int(-bound) - 1
    with pytest.raises(ValidationError) as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == "label_latency"


def test_withheld_reports_carry_no_label_histograms() -> None:
    spec = _labeled_spec(PrivacySpec())
    msg = _labeled_report(spec)
    msg.private_withheld = True
    del msg.features[:]
    msg.ClearField("prediction")
    with pytest.raises(ValidationError) as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == "confusion"
    for name in ("confusion", "calibration", "label_latency"):
        msg.ClearField(name)
    _, summary = validate_report(msg, spec, now=NOW)
    assert summary.labeled_count == 4 and summary.label_histogram_count == 0
    assert summary.confusion.tolist() == [0] * 9  # merges as zeros


def _heartbeat(spec: Spec):
    m = ReportMeta(device_id="d", model="m", model_version="1", labels={},
                   window_start_unix_s=NOW - NOW % 60, window_length_s=60, seq=3,
                   spec_hash=spec.hash, heartbeat=True)
    return report_to_proto(m, Summary(features={}, prediction=None, report_count=1))


def test_heartbeat_merges_as_zeros_without_variance() -> None:
    spec = _labeled_spec(PrivacySpec())
    meta, summary = validate_report(_heartbeat(spec), spec, now=NOW)
    assert meta.heartbeat and summary.heartbeat_count == 1
    assert summary.noise_variance_per_bin == 0.0
    assert summary.histogram_event_count == 0 and summary.label_histogram_count == 0
    merged = Summary.zero(spec)
    merged.merge_in(summary)
    assert merged.heartbeat_count == 1 and (merged.confusion == 0).all()
    assert all((v == 0).all() for v in merged.features.values())


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: setattr(m, "event_count", 1), "event_count"),
    (lambda m: setattr(m, "labeled_count", 1), "labeled_count"),
    (lambda m: m.features.add(name="x").histogram.counts.extend([0] * 5), "heartbeat"),
    (lambda m: m.prediction.counts.extend([0] * 4), "heartbeat"),
    (lambda m: m.label_latency.counts.extend([0] * 5), "label_latency"),
    (lambda m: setattr(m, "private_withheld", True), "private_withheld"),
    (lambda m: setattr(m, "epsilon_spent", 1.0), "epsilon_spent"),
])
def test_heartbeat_refusals(change, field: str) -> None:
    spec = _labeled_spec(PrivacySpec())
    msg = _heartbeat(spec)
    change(msg)
    with pytest.raises(ValidationError) as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == field


def test_heartbeat_with_latencies_is_refused() -> None:
    spec = _labeled_spec(PrivacySpec())
    msg = _heartbeat(spec)
    sketch = kll_floats_sketch(200)
    sketch.update(3.0)
    msg.latency_kll = sketch.serialize()
    with pytest.raises(ValidationError) as e:
        validate_report(msg, spec, now=NOW)
    assert e.value.field == "latency_kll"
