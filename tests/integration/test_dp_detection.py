"""Drift detection under differential privacy, end to end (scripts/dp_detection.py).

The claim: with epsilon = 1 per window and the `event` unit, a 5-device cohort without drift
raises no drift flag, and a 200-device cohort whose f0 shifts by +0.5 reference standard
deviations is flagged within the first hour of the shift, with few false flags over the
no-drift (cohort, evaluation) pairs.

One run of the script's `run` at a CI size is shared by every test: a real aggregator process,
one real Monitor per device (production noise source), 4 simulated hours of 5-minute windows
(48 windows, ~10k reports) with the shift at hour 2, a health query over gRPC after every
window over the trailing 15 minutes. Each device sees 300 events per 5-minute window on average,
the 60 events per minute of the script's default: with fewer, the 5-device cohort would be
marked insufficient_data at every evaluation, and "never flagged" would prove nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
from types import ModuleType
from typing import Any

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "dp_detection.py"

HOURS = 4
WINDOW_S = 300
SHIFT_HOUR = 2
LOOKBACK_S = 900
EVENTS_PER_WINDOW = 300
MAX_FALSE_FLAG_RATE = 0.02


def _load_script() -> ModuleType:
    """scripts/ is not a package: load the script as a module (registered, for dataclasses)."""
    name = "dp_detection"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


dp = _load_script()


@pytest.fixture(scope="module")
def run() -> tuple[Any, list[str]]:
    messages: list[str] = []
    config = dp.Config(hours=HOURS, window_s=WINDOW_S, shift_hour=SHIFT_HOUR,
                       lookback_s=LOOKBACK_S, eval_every=1, epsilon=1.0,
                       events_per_window=EVENTS_PER_WINDOW,
                       small_devices=5, medium_devices=0, large_devices=200)
    results = dp.run(config, progress=messages.append)
    print(results.table())  # shown with -s or on failure
    return results, messages


def test_the_setup_is_the_claimed_one(run) -> None:
    results, messages = run
    c = results.config
    assert (c.epsilon, c.small_devices, c.large_devices) == (1.0, 5, 200)
    windows = HOURS * 3600 // WINDOW_S
    assert len(results.evaluations) == windows
    assert results.shift_unix_s - results.start_unix_s == SHIFT_HOUR * 3600
    # Every device delivered a report for every window (the aggregator saw them all).
    assert results.reports == windows * 205
    last = results.evaluations[-1].cohorts
    assert last["large"].devices == 200 and last["small"].devices == 5
    assert last["large"].reports == 200 * LOOKBACK_S // WINDOW_S
    # The reports really are noised: the merged noise sd is sqrt(reports) x one report's.
    per_report = results.noise_sd_per_bin_per_report
    assert per_report > 1
    assert last["small"].noise_sd_per_bin == pytest.approx(
        per_report * math.sqrt(last["small"].reports), rel=1e-6)
    assert sum(m.startswith("hour ") for m in messages) == HOURS


def test_small_cohort_never_flagged(run) -> None:
    results, _ = run
    assert not results.small_ever_flagged
    small = results.cohorts["small"]
    assert small.clean_evaluations == len(results.evaluations)
    assert small.flagged == 0
    # It was evaluated on enough data (not flagged because of no reports, or because every
    # answer was "insufficient data", would prove nothing).
    assert all(e.cohorts["small"].reports > 0 for e in results.evaluations)
    assert small.insufficient_share < 0.5


def test_large_cohort_not_flagged_before_the_shift(run) -> None:
    results, _ = run
    large = results.cohorts["large"]
    assert large.clean_evaluations == SHIFT_HOUR * 3600 // WINDOW_S
    before = [e for e in results.evaluations if e.end_unix_s <= results.shift_unix_s]
    assert len(before) == large.clean_evaluations
    assert not any(e.cohorts["large"].flagged for e in before)
    # Enough data to tell: a no-drift answer here is a real "stable", not "insufficient".
    assert not any(e.cohorts["large"].insufficient for e in before)


def test_large_cohort_flagged_within_the_first_hour(run) -> None:
    results, _ = run
    d = results.detection
    assert d.flagged, results.table()
    assert d.within_hour
    assert 0 < d.minutes_after_shift <= 60
    assert d.windows_after_shift == d.minutes_after_shift * 60 // WINDOW_S
    assert d.psi > 0.1 and d.p_value < 0.01
    # Once the lookback holds shifted windows only, f0 stays flagged.
    assert d.full_lookback_evaluations > 0
    assert d.full_lookback_flag_rate >= 0.9


def test_false_flag_rate_over_no_drift_pairs(run) -> None:
    results, _ = run
    assert results.clean_pairs == len(results.evaluations) + SHIFT_HOUR * 3600 // WINDOW_S
    assert results.false_flag_rate <= MAX_FALSE_FLAG_RATE, results.table()


def test_results_serialize_to_json(run) -> None:
    results, _ = run
    d = json.loads(json.dumps(results.to_dict(), allow_nan=False))
    assert d["detection"]["flagged"] is True
    assert len(d["evaluations"]) == len(results.evaluations)
    assert "small" in dp.render(results)
