"""aggregator.validate on noisy (DP) and withheld reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.errors import ValidationError
from agent.privacy import noise_plan
from agent.spec import DEVICE_DAY, NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
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
