"""agent.privacy: the noise plan, the contribution clamp and the persisted accountant.

The Monitor tests point at a closed port (nothing listens): reports stay in the spool, where
they are read back.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

from agent.monitor import Monitor
from agent.noise import SecureRandom, SeededRandom, discrete_laplace_variance, zcdp_rho_for
from agent.privacy import (
    PrivacyAccountant,
    clamp_summary,
    noise_plan,
    noise_summary,
)
from agent.spec import (
    BINARY,
    DEVICE_DAY,
    DISCRETE_GAUSSIAN,
    NO_NOISE,
    NUMERIC,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.spool import Spool
from agent.summary import Summary
from protos import fleetwatch_pb2 as pb

NOWHERE = "127.0.0.1:1"
DAY = 86400


def _spec(privacy: PrivacySpec, features: int = 3) -> Spec:
    return Spec(
        model="m", model_version="1",
        features=tuple(FeatureSpec(f"f{i}", NUMERIC, edges=(0.0, 1.0, 2.0))
                       for i in range(features)),
        prediction=FeatureSpec("score", NUMERIC, edges=(0.0, 0.5, 1.0)),
        privacy=privacy,
    )


# -- the plan ------------------------------------------------------------------------------------

def test_event_unit_splits_epsilon_over_the_histograms() -> None:
    plan = noise_plan(_spec(PrivacySpec(epsilon_per_window=0.5), features=3))
    assert plan is not None
    # 3 features + the prediction: one event touches 4 histograms; each gets epsilon/4.
    assert plan.histograms == 4 and plan.sensitivity == 1
    assert plan.scale == Fraction(8)  # H / epsilon = 4 / 0.5
    assert plan.variance_per_bin == pytest.approx(discrete_laplace_variance(Fraction(8)))


def test_device_day_scales_sensitivity_to_the_clamp() -> None:
    privacy = PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=10,
                          max_events_per_window=25)
    plan = noise_plan(_spec(privacy, features=1))
    assert plan is not None
    assert plan.sensitivity == 25 and plan.scale == Fraction(2 * 25)  # H * M / epsilon


def test_gaussian_plan_follows_zcdp() -> None:
    privacy = PrivacySpec(mechanism=DISCRETE_GAUSSIAN, epsilon_per_window=1.0, delta=1e-6)
    plan = noise_plan(_spec(privacy, features=3))
    assert plan is not None
    rho = zcdp_rho_for(1.0, 1e-6)
    assert plan.rho_per_window == pytest.approx(rho)
    # L2 sensitivity over 4 histograms is sqrt(4): sigma^2 = 4 / (2 rho), rounded up.
    assert float(plan.scale) >= 4 / (2 * rho)
    assert float(plan.scale) == pytest.approx(4 / (2 * rho), rel=1e-6)
    assert 0 < plan.variance_per_bin <= float(plan.scale)


def test_no_noise_has_no_plan() -> None:
    assert noise_plan(_spec(PrivacySpec(mechanism=NO_NOISE))) is None


@pytest.mark.parametrize("kwargs,field", [
    ({"epsilon_per_window": 0}, "epsilon_per_window"),
    ({"epsilon_per_window": math.nan}, "epsilon_per_window"),
    ({"mechanism": DISCRETE_GAUSSIAN}, "delta"),
    ({"delta": 1e-6}, "delta"),
    ({"unit": DEVICE_DAY, "daily_epsilon_budget": 5}, "max_events_per_window"),
    ({"unit": DEVICE_DAY, "max_events_per_window": 5, "daily_epsilon_budget": 0.5},
     "daily_epsilon_budget"),
    ({"max_events_per_window": 5}, "unit"),
    ({"unit": "device"}, "unit"),
    ({"mechanism": "laplace"}, "mechanism"),
])
def test_privacy_spec_is_validated_with_the_field_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"privacy.{field}"):
        PrivacySpec(**kwargs)


# -- noise and clamp -----------------------------------------------------------------------------

def _summary(spec: Spec, events: int, rng: np.random.Generator) -> Summary:
    s = Summary.zero(spec)
    for name in s.features:
        s.features[name] = rng.multinomial(events, [0.1, 0.3, 0.3, 0.2, 0.1]).astype(np.int64)
    s.prediction = rng.multinomial(events, [0.0, 0.5, 0.5, 0.0, 0.0]).astype(np.int64)
    s.event_count = events
    return s


def test_noise_summary_noises_every_private_bin_with_the_plan() -> None:
    spec = _spec(PrivacySpec(epsilon_per_window=1.0))
    plan = noise_plan(spec)
    assert plan is not None
    rng = np.random.default_rng(0)
    # Many windows: the noise per bin is a discrete Laplace of the plan's scale.
    diffs = []
    for _ in range(400):
        s = _summary(spec, 50, rng)
        truth = {k: v.copy() for k, v in s.features.items()}
        pred = s.prediction.copy()
        noise_summary(s, plan, SeededRandom(int(rng.integers(1 << 30))))
        diffs.extend(np.concatenate([s.features[k] - truth[k] for k in truth]))
        diffs.extend(s.prediction - pred)
        assert s.noise_variance_per_bin == plan.variance_per_bin
        assert s.event_count == 50  # operational counts are not noised
    d = np.asarray(diffs, dtype=float)
    # 8000 draws: the sample variance's standard error is var * sqrt((kurtosis - 1) / n) with
    # kurtosis ~6 for a Laplace: ~2.5% of var; allow 5 standard errors.
    assert abs(d.mean()) < 5 * math.sqrt(plan.variance_per_bin / d.size)
    assert d.var() == pytest.approx(plan.variance_per_bin, rel=0.125)


def test_clamp_keeps_at_most_the_bound_uniformly() -> None:
    spec = _spec(PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1, daily_epsilon_budget=5,
                             max_events_per_window=30))
    rng = np.random.default_rng(1)
    base = _summary(spec, 100, rng)
    kept = np.zeros(5)
    trials = 2000
    for _ in range(trials):
        s = base.copy()
        s.event_count = 100
        assert clamp_summary(s, 30, rng) == 70
        assert s.clamped_event_count == 70
        for name, counts in s.features.items():
            assert counts.sum() == 30 and (counts <= base.features[name]).all()
        assert s.prediction is not None and s.prediction.sum() == 30
        kept += s.features["f0"]
    # A uniform subsample of 30 of 100 keeps 30% of every bin in expectation; the mean over
    # 2000 trials has sd < 0.06 per bin (hypergeometric sd < 2.3 / sqrt(2000)).
    assert np.allclose(kept / trials, 0.3 * base.features["f0"], atol=0.3)


def test_clamp_leaves_small_windows_alone() -> None:
    spec = _spec(PrivacySpec())
    s = _summary(spec, 10, np.random.default_rng(2))
    before = {k: v.copy() for k, v in s.features.items()}
    assert clamp_summary(s, 30, np.random.default_rng(3)) == 0
    assert all((s.features[k] == before[k]).all() for k in before)


# -- label histograms ----------------------------------------------------------------------------

LABELS = LabelSpec(BINARY, classes=("n", "p"), calibration_edges=(0, 0.5, 1),
                   latency_edges=(0, 10, 100))


def _labeled(privacy: PrivacySpec) -> Spec:
    return dataclasses.replace(_spec(privacy), labels=LABELS)


def test_label_histograms_share_the_window_epsilon() -> None:
    # 3 features + prediction + confusion, calibration, label latency: scale 7/epsilon.
    plan = noise_plan(_labeled(PrivacySpec(epsilon_per_window=0.5)))
    assert plan is not None and plan.histograms == 7
    assert plan.scale == Fraction(14)
    assert noise_plan(_spec(PrivacySpec(epsilon_per_window=0.5))).scale == Fraction(8)


def test_noise_summary_noises_the_label_histograms_with_the_plan() -> None:
    spec = _labeled(PrivacySpec(epsilon_per_window=2.0))
    plan = noise_plan(spec)
    assert plan is not None
    rng = np.random.default_rng(5)
    diffs = []
    for _ in range(300):
        s = _summary(spec, 40, rng)
        s.confusion = rng.multinomial(20, [0.4, 0.1, 0, 0.1, 0.4, 0, 0, 0, 0]).astype(np.int64)
        s.calibration = rng.multinomial(20, [0.3, 0.2, 0.2, 0.3]).astype(np.int64)
        s.label_latency = rng.multinomial(20, [0, 0.5, 0.5, 0, 0]).astype(np.int64)
        s.labeled_count = 20
        truth = {n: v.copy() for n, v in s.label_histograms().items()}
        noise_summary(s, plan, SeededRandom(int(rng.integers(1 << 30))))
        assert s.labeled_count == 20  # operational: released exactly
        for n, before in truth.items():
            diffs.extend(getattr(s, n) - before)
    d = np.asarray(diffs, dtype=float)
    # 5400 draws of a discrete Laplace: the sample variance's standard error is ~3% of the
    # variance (kurtosis ~6); allow about 4 of them. The mean is within 5 standard errors.
    assert abs(d.mean()) < 5 * math.sqrt(plan.variance_per_bin / d.size)
    assert d.var() == pytest.approx(plan.variance_per_bin, rel=0.125)


def test_clamp_bounds_the_labels_of_every_label_histogram() -> None:
    rng = np.random.default_rng(6)
    s = _summary(_labeled(PrivacySpec()), 5, rng)
    s.labeled_count = 50
    s.confusion = np.asarray([20, 5, 0, 5, 20, 0, 0, 0, 0], np.int64)
    s.calibration = np.asarray([10, 10, 10, 10], np.int64)  # 40 of the 50 had a score
    s.label_latency = np.asarray([0, 25, 25, 0, 0], np.int64)
    kept_cal = []
    for _ in range(400):
        c = s.copy()
        assert clamp_summary(c, 10, rng) == 0  # 5 events: the features are not clamped
        assert c.clamped_label_count == 40 and c.clamped_event_count == 0
        assert c.confusion.sum() == 10 and c.label_latency.sum() == 10
        assert (c.confusion <= s.confusion).all() and (c.calibration <= s.calibration).all()
        kept_cal.append(int(c.calibration.sum()))
    # Of a uniform subsample of 10 labels, 40/50 had a score: 8 on average (sd 1.2 per
    # draw, ~0.06 for the mean of 400).
    assert np.mean(kept_cal) == pytest.approx(8.0, abs=0.3)
    small = s.copy()
    small.labeled_count = 8
    small.confusion = np.asarray([8, 0, 0, 0, 0, 0, 0, 0, 0], np.int64)
    clamp_summary(small, 10, rng)
    assert small.clamped_label_count == 0 and small.confusion[0] == 8


# -- the accountant ------------------------------------------------------------------------------

def test_event_unit_spend_per_event_stays_flat(tmp_path) -> None:
    spec = _spec(PrivacySpec(epsilon_per_window=0.7))
    plan = noise_plan(spec)
    assert plan is not None
    spool = Spool(tmp_path / "spool.sqlite")
    accountant = PrivacyAccountant(spool, spec, plan)
    for w in range(500):
        release = accountant.reserve(1_700_000_000 + 60 * w)
        assert release.allowed and release.epsilon == 0.7
    # Windows hold disjoint events: one event's loss is one window's epsilon, not 500 x 0.7.
    assert accountant.per_event_epsilon() == pytest.approx(0.7)
    spool.close()


def test_device_day_withholds_exactly_at_the_window_over_budget_and_survives_restart(
        tmp_path) -> None:
    spec = _spec(PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=0.5, daily_epsilon_budget=2.0,
                             max_events_per_window=10))
    plan = noise_plan(spec)
    assert plan is not None
    day0 = 1_700_006_400  # a UTC midnight (multiple of 86400)
    assert day0 % DAY == 0
    spool = Spool(tmp_path / "spool.sqlite")
    acct = PrivacyAccountant(spool, spec, plan)
    spent = [acct.reserve(day0 + 60 * w) for w in range(3)]
    assert [r.allowed for r in spent] == [True] * 3
    assert [r.day_epsilon for r in spent] == pytest.approx([0.5, 1.0, 1.5])
    spool.close()
    # A restart: a new spool on the same file keeps the ledger.
    spool = Spool(tmp_path / "spool.sqlite")
    acct = PrivacyAccountant(spool, spec, plan)
    fourth, fifth, sixth = (acct.reserve(day0 + 60 * w) for w in range(3, 6))
    assert fourth.allowed and fourth.day_epsilon == pytest.approx(2.0)
    assert not fifth.allowed and fifth.epsilon == 0 and fifth.day_epsilon == pytest.approx(2.0)
    assert not sixth.allowed
    assert acct.day_spend(day0 // DAY) == pytest.approx(2.0)
    # The next UTC day has a fresh budget.
    tomorrow = acct.reserve(day0 + DAY)
    assert tomorrow.allowed and tomorrow.day_epsilon == pytest.approx(0.5)
    spool.close()


def test_device_day_gaussian_composes_rho(tmp_path) -> None:
    spec = _spec(PrivacySpec(unit=DEVICE_DAY, mechanism=DISCRETE_GAUSSIAN,
                             epsilon_per_window=0.5, delta=1e-6, daily_epsilon_budget=2.0,
                             max_events_per_window=10))
    plan = noise_plan(spec)
    assert plan is not None
    spool = Spool(tmp_path / "spool.sqlite")
    acct = PrivacyAccountant(spool, spec, plan)
    releases = [acct.reserve(1_700_006_400 + 60 * w) for w in range(200)]
    allowed = sum(r.allowed for r in releases)
    rho_budget = zcdp_rho_for(2.0, 1e-6)
    # zCDP: rhos add, so the day affords floor(rho_budget / rho_window) releases: more than
    # the 4 that basic composition of epsilon 0.5 against 2.0 would allow.
    assert allowed == math.floor(rho_budget / plan.rho_per_window * (1 + 1e-9))
    assert allowed > 4
    assert all(r.allowed for r in releases[:allowed])
    assert not any(r.allowed for r in releases[allowed:])
    assert max(r.day_epsilon for r in releases) <= 2.0 + 1e-9
    spool.close()


# -- through the Monitor -------------------------------------------------------------------------

def _reports(spool: Spool) -> list[pb.WindowReport]:
    return [pb.WindowReport.FromString(pb.ReportEnvelope.FromString(item.payload).report)
            for item in spool.pending(limit=10_000)]


def test_monitor_withholds_private_histograms_and_keeps_operational_signals(tmp_path) -> None:
    spec = _spec(PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=2.0,
                             max_events_per_window=20))
    t = [1_700_006_400.0]

    def run(windows: int) -> None:
        mon = Monitor("m", "1", "dev", aggregator=NOWHERE, spool_dir=tmp_path, clock=lambda: t[0],
                      spec=spec, background=False, rpc_timeout_s=0.5, backoff_base_s=0.01,
                      noise_rng=SeededRandom(1))
        for _ in range(windows):
            for i in range(30):
                mon.observe({"f0": 0.5, "f1": 1.5, "f2": None}, prediction=0.2,
                            latency_ms=3.0, error=i == 0)
            t[0] += 60
        mon.close(timeout_s=0.5)

    run(3)
    run(1)  # restart: the ledger in the spool remembers the day's spend
    reports = _reports(Spool(tmp_path / "spool.sqlite"))
    assert [r.seq for r in reports] == [1, 2, 3, 4]
    assert [r.private_withheld for r in reports] == [False, False, True, True]
    assert [r.day_epsilon_spent for r in reports] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert [r.epsilon_spent for r in reports] == pytest.approx([1.0, 1.0, 0.0, 0.0])
    for r in reports:
        assert (r.event_count, r.error_count) == (30, 1)  # operational signals continue
        assert r.latency_kll
    for r in reports[:2]:
        assert len(r.features) == 3 and r.HasField("prediction")
        assert r.clamped_event_count == 10
    for r in reports[2:]:
        assert len(r.features) == 0 and not r.HasField("prediction")


def test_monitor_noise_comes_from_the_secure_source_by_default(tmp_path) -> None:
    spec = _spec(PrivacySpec())
    mon = Monitor("m", "1", "dev", aggregator=NOWHERE, spool_dir=tmp_path, clock=lambda: 1e9,
                  spec=spec, background=False, rpc_timeout_s=0.5)
    mon.observe({"f0": 1.0}, prediction=0.1)
    mon.flush(timeout_s=0.5)
    assert isinstance(mon._noise_rng, SecureRandom)
    [report] = _reports(mon.spool)
    assert report.epsilon_spent == 1.0 and not report.private_withheld
    mon.close(timeout_s=0.5)


def test_input_derived_counters_stay_on_the_device_under_noise(tmp_path) -> None:
    spec = _spec(PrivacySpec())
    mon = Monitor("m", "1", "dev", aggregator=NOWHERE, spool_dir=tmp_path, clock=lambda: 1e9,
                  spec=spec, background=False, rpc_timeout_s=0.5, noise_rng=SeededRandom(2))
    mon.observe({"f0": "not a number", "f1": float("inf"), "bogus": 1.0}, prediction=0.1)
    mon.flush(timeout_s=0.5)
    [report] = _reports(mon.spool)
    # Exact counts of invalid values and unknown names would leak what the noise protects.
    assert report.invalid_value_count == 0 and report.unknown_feature_count == 0
    stats = mon.stats()
    assert (stats.invalid_values_kept_local, stats.unknown_features_kept_local) == (2, 1)
    mon.close(timeout_s=0.5)
