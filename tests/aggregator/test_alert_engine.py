"""The alert engine in event time: lifecycle, hysteresis, dedup, burn rates, budgets, restore.

Window i is [60 i, 60 (i + 1)); the simulated clock is only the window bounds we feed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence

import pytest

from aggregator.alerts import (
    AlertEngine,
    AlertTransition,
    CohortSample,
    load_rules,
    metric_value,
)

W = 60
NAN = float("nan")

LATENCY = """
[[rule]]
name = "latency-p95"
metric = "latency_p95_ms"
op = ">"
threshold = 200
clear = 180
for = "5m"
by = ["region"]
severity = "page"
runbook = "https://runbooks.example/latency"
"""

ERRORS_SLO = """
[[slo]]
name = "errors"
metric = "error_rate"
objective = "< 0.001"
target = 0.99
"""


def step(engine: AlertEngine, i: int, by: tuple[str, ...],
         rows: Mapping[tuple[str, ...], Mapping[str, float]]) -> list[AlertTransition]:
    """Evaluate window i with one sample per cohort (cohort values in `by` order)."""
    samples = [CohortSample(dict(zip(by, values, strict=True)), metrics)
               for values, metrics in rows.items()]
    return engine.evaluate(i * W, (i + 1) * W, {by: samples})


def feed(engine: AlertEngine, metric: str, series: Mapping[str, Sequence[float | None]],
         start: int = 0) -> list[tuple[int, AlertTransition]]:
    """Feed per-region series (None = no sample) from window `start`; (window, transition)s."""
    out = []
    n = max(len(s) for s in series.values())
    for k in range(n):
        rows = {(region,): {metric: s[k]} for region, s in series.items()
                if k < len(s) and s[k] is not None}
        out += [(start + k, t) for t in step(engine, start + k, ("region",), rows)]
    return out


def kinds(found: list[tuple[int, AlertTransition]]) -> list[tuple[int, str, str, str]]:
    return [(i, dict(t.alert.cohort).get("region", ""), t.previous_state, t.new_state)
            for i, t in found]


# -- threshold rules ---------------------------------------------------------------------------


def test_breach_shorter_than_for_never_fires() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    found = feed(engine, "latency_p95_ms", {"eu": [100] * 5 + [250] * 4 + [100] * 5})
    assert kinds(found) == [(5, "eu", "inactive", "pending"), (9, "eu", "pending", "inactive")]
    assert engine.alerts() == []


def test_long_breach_fires_once_stays_and_resolves_past_clear() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    series = [100] * 5 + [250] * 10 + [190, 200, 181] + [180] + [100] * 3
    found = feed(engine, "latency_p95_ms", {"eu": series})
    # pending from window 5; 5 minutes of breach elapse at the end of window 9
    assert kinds(found) == [(5, "eu", "inactive", "pending"), (9, "eu", "pending", "firing"),
                            (18, "eu", "firing", "resolved")]
    fired, resolved = found[1][1].alert, found[2][1].alert
    assert fired.state == "firing" and fired.starts_at_s == 5 * W and fired.ends_at_s is None
    assert fired.value == 250 and fired.threshold == 200 and fired.severity == "page"
    assert dict(fired.labels) == {"alertname": "latency-p95", "severity": "page",
                                  "region": "eu"}
    assert fired.annotations["runbook_url"] == "https://runbooks.example/latency"
    assert fired.annotations["value"] == "250" and fired.annotations["threshold"] == "200"
    assert "latency_p95_ms > 200" in fired.annotations["summary"]
    assert resolved.starts_at_s == 5 * W and resolved.ends_at_s == 18 * W
    assert resolved.value == 180 and resolved.fingerprint == fired.fingerprint
    assert engine.alerts("firing") == [] and engine.alerts("resolved") == [resolved]


def test_hysteresis_band_holds_state() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    # in the band while inactive: nothing; a pending alert needs an unbroken breach (`for`
    # is continuous), so a window back in the band ends it
    found = feed(engine, "latency_p95_ms", {"eu": [190] * 10 + [210, 190, 195, 199, 201, 150]})
    assert kinds(found) == [(10, "eu", "inactive", "pending"), (11, "eu", "pending", "inactive"),
                            (14, "eu", "inactive", "pending"), (15, "eu", "pending", "inactive")]
    # while firing, the band holds it firing for as long as it lasts
    engine = AlertEngine(load_rules(LATENCY))
    found = feed(engine, "latency_p95_ms", {"eu": [300] * 5 + [181] * 50 + [179]})
    assert kinds(found) == [(0, "eu", "inactive", "pending"), (4, "eu", "pending", "firing"),
                            (55, "eu", "firing", "resolved")]
    assert found[-1][1].alert.value == 179


def test_dedup_per_rule_and_cohort_two_cohorts_independent() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    found = feed(engine, "latency_p95_ms", {"eu": [300] * 30 + [100],
                                            "us": [100] * 10 + [300] * 6 + [100]})
    assert kinds(found) == [
        (0, "eu", "inactive", "pending"), (4, "eu", "pending", "firing"),
        (10, "us", "inactive", "pending"), (14, "us", "pending", "firing"),
        (16, "us", "firing", "resolved"),
        (30, "eu", "firing", "resolved")]
    eu, us = found[1][1].alert, found[3][1].alert
    assert eu.fingerprint != us.fingerprint
    assert engine.alerts() == [found[4][1].alert, found[5][1].alert]


def test_refire_after_resolve_is_a_new_alert_with_the_same_fingerprint() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    found = feed(engine, "latency_p95_ms", {"eu": [300] * 6 + [100] * 3 + [300] * 6})
    assert kinds(found) == [(0, "eu", "inactive", "pending"), (4, "eu", "pending", "firing"),
                            (6, "eu", "firing", "resolved"), (9, "eu", "inactive", "pending"),
                            (13, "eu", "pending", "firing")]
    first, second = found[1][1].alert, found[4][1].alert
    assert (first.starts_at_s, second.starts_at_s) == (0, 9 * W)
    assert first.fingerprint == second.fingerprint
    assert [a.starts_at_s for a in engine.alerts()] == [9 * W, 0]   # active first, then history


def test_nan_never_breaches_and_holds_state() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    assert feed(engine, "latency_p95_ms", {"eu": [NAN] * 30}) == []
    # NaN inside a breach neither breaks it nor clears it
    engine = AlertEngine(load_rules(LATENCY))
    found = feed(engine, "latency_p95_ms", {"eu": [300, 300, NAN, NAN, 300, NAN, 100]})
    assert kinds(found) == [(0, "eu", "inactive", "pending"), (4, "eu", "pending", "firing"),
                            (6, "eu", "firing", "resolved")]
    # for "<" rules too: NaN is not below anything
    low = load_rules('[[rule]]\nname = "vol"\nmetric = "events"\nop = "<"\nthreshold = 10\n')
    engine = AlertEngine(low)
    assert step(engine, 0, (), {(): {"events": NAN}}) == []
    assert [t.new_state for t in step(engine, 1, (), {(): {"events": 3}})] == ["firing"]


def test_gaps_hold_state_until_stale() -> None:
    engine = AlertEngine(load_rules(LATENCY), stale_s=600)
    # no sample for windows 2-3: the pending breach continues; absent for 10 min: resolved
    found = feed(engine, "latency_p95_ms", {"eu": [300, 300, None, None, 300] + [None] * 12})
    assert kinds(found) == [(0, "eu", "inactive", "pending"), (4, "eu", "pending", "firing"),
                            (14, "eu", "firing", "resolved")]
    assert found[-1][1].alert.ends_at_s == 5 * W        # the end of the last known window
    engine = AlertEngine(load_rules(LATENCY), stale_s=600)
    found = feed(engine, "latency_p95_ms", {"eu": [300] + [None] * 12})
    assert kinds(found) == [(0, "eu", "inactive", "pending"), (10, "eu", "pending", "inactive")]


def test_for_zero_fires_on_the_first_breaching_window() -> None:
    engine = AlertEngine(load_rules(LATENCY.replace('for = "5m"', 'for = "0s"')))
    found = feed(engine, "latency_p95_ms", {"eu": [100, 300, 300, 100]})
    assert kinds(found) == [(1, "eu", "inactive", "firing"), (3, "eu", "firing", "resolved")]


def test_fingerprint_is_stable() -> None:
    def fire() -> str:
        engine = AlertEngine(load_rules(LATENCY))
        found = feed(engine, "latency_p95_ms", {"eu": [300] * 5}, start=100)
        return found[-1][1].alert.fingerprint

    fp = fire()
    assert fp == fire() and len(fp) == 16 and int(fp, 16) >= 0
    # pinned to its definition: stored fingerprints must survive upgrades
    text = "alertname=latency-p95\x1fregion=eu"
    assert fp == hashlib.sha256(text.encode()).hexdigest()[:16] == "a0fe59f10816ba27"


def test_drift_metrics() -> None:
    metrics = {"psi:f0": 0.05, "psi:f1": 0.3, "psi:f2": NAN, "drifting:f0": 0.0,
               "drifting:f1": 1.0}
    assert metric_value(metrics, "psi:*") == 0.3
    assert metric_value(metrics, "psi:f0") == 0.05
    assert metric_value(metrics, "drifting:*") == 1.0
    assert metric_value({"drifting:f0": 0.0}, "drifting:*") == 0.0
    assert math.isnan(metric_value({"psi:f0": NAN}, "psi:*"))
    assert math.isnan(metric_value({}, "drifting:*"))
    assert math.isnan(metric_value({}, "error_rate"))
    rules = load_rules('[[rule]]\nname = "drift"\nmetric = "drifting:*"\nop = ">"\n'
                       'threshold = 0.5\nfor = "2m"\n')
    engine = AlertEngine(rules)
    states = [[t.new_state for t in step(engine, i, (), {(): m})] for i, m in enumerate([
        {"drifting:f0": 0.0}, {"drifting:f1": 1.0}, {"drifting:f0": 1.0}, {"drifting:f0": 0.0}])]
    assert states == [[], ["pending"], ["firing"], ["resolved"]]


def test_windows_must_advance_and_samples_must_name_the_cohort() -> None:
    engine = AlertEngine(load_rules(LATENCY))
    step(engine, 5, ("region",), {})
    with pytest.raises(ValueError, match="not after"):
        step(engine, 5, ("region",), {})
    with pytest.raises(ValueError, match="lacks label key"):
        engine.evaluate(600, 660, {("region",): [CohortSample({"hw": "x"}, {})]})
    with pytest.raises(ValueError, match="two samples"):
        engine.evaluate(600, 660, {("region",): [CohortSample({"region": "eu"}, {})] * 2})
    assert engine.groupings == frozenset({("region",)})


# -- SLO burn rates ----------------------------------------------------------------------------

GOOD, BAD = 0.0, 0.01      # error_rate per window against the objective "< 0.001"


def ref_burn(bad: Sequence[bool], k: int, window_s: float, budget: float = 0.01) -> float:
    """burn(W) at window k from the definition: windows whose end lies in (now - W, now]."""
    now = (k + 1) * W
    inside = [bad[j] for j in range(k + 1) if (j + 1) * W > now - window_s]
    return (sum(inside) / len(inside)) / budget if inside else 0.0


def ref_first(bad: Sequence[bool], long_s: float, short_s: float, rate: float) -> int | None:
    for k in range(len(bad)):
        if ref_burn(bad, k, long_s) > rate and ref_burn(bad, k, short_s) > rate:
            return k
    return None


def run_slo(engine: AlertEngine, bad: Sequence[bool]) -> list[tuple[int, AlertTransition]]:
    out = []
    for k, b in enumerate(bad):
        out += [(k, t) for t in step(engine, k, (), {(): {"error_rate": BAD if b else GOOD}})]
    return out


def test_fast_burn_pages_at_the_predicted_window() -> None:
    bad = [False] * 400 + [True] * 10 + [False] * 60     # 400 min healthy, 10 min all bad
    engine = AlertEngine(load_rules(ERRORS_SLO))
    found = run_slo(engine, bad)
    expected = ref_first(bad, 3600, 300, 14.4)
    # by hand: burn(1h) = (b / 60) / 0.01 > 14.4 needs b >= 9 bad windows; burn(5m) = 100
    assert expected == 400 + 8
    assert ref_first(bad, 6 * 3600, 1800, 6.0) is None   # 10/360/0.01 = 2.8: no ticket
    assert [(k, t.previous_state, t.new_state, t.alert.severity) for k, t in found] == [
        (expected, "inactive", "firing", "page"),
        # the 5 min window is clean again 5 windows after the last bad one (window 409)
        (414, "firing", "resolved", "page")]
    fired = found[0][1].alert
    assert fired.kind == "slo" and fired.starts_at_s == expected * W
    assert fired.value == pytest.approx(ref_burn(bad, expected, 3600))
    assert fired.threshold == 14.4
    assert dict(fired.labels) == {"alertname": "errors", "severity": "page"}
    assert found[1][1].alert.ends_at_s == 414 * W


def test_slow_burn_tickets_but_never_pages() -> None:
    # 8 % of windows bad, evenly spread (Bresenham), after 400 healthy windows (> 6 h)
    spread = [((r + 1) * 2) // 25 > (r * 2) // 25 for r in range(500)]
    bad = [False] * 400 + spread
    assert sum(spread) == 40
    engine = AlertEngine(load_rules(ERRORS_SLO))
    found = run_slo(engine, bad)
    expected = ref_first(bad, 6 * 3600, 1800, 6.0)
    # by hand: burn(6h) = (b / 360) / 0.01 > 6 needs b >= 22 bad windows, the 22nd of the
    # spread falls on r = 274 ((275 * 2) // 25 = 22); burn(30m) >= (2/30)/0.01 = 6.7 throughout
    assert expected == 400 + 274
    assert ref_first(bad, 3600, 300, 14.4) is None       # (5/60)/0.01 = 8.3 < 14.4
    assert [(k, t.new_state, t.alert.severity) for k, t in found] == [
        (expected, "firing", "ticket")]
    assert engine.alerts("firing")[0].severity == "ticket"
    burns = engine.budgets()[0].burn_rates
    assert set(burns) == {"5m", "30m", "1h", "6h"}
    assert burns["6h"] == pytest.approx(ref_burn(bad, len(bad) - 1, 6 * 3600))
    assert burns["30m"] == pytest.approx(ref_burn(bad, len(bad) - 1, 1800))


def test_ticket_escalates_to_page_as_one_alert() -> None:
    spread = [((r + 1) * 2) // 25 > (r * 2) // 25 for r in range(300)]
    bad = [False] * 400 + spread + [True] * 12
    engine = AlertEngine(load_rules(ERRORS_SLO))
    found = run_slo(engine, bad)
    page_at = ref_first(bad, 3600, 300, 14.4)
    assert [(k, t.previous_state, t.new_state, t.alert.severity) for k, t in found] == [
        (400 + 274, "inactive", "firing", "ticket"),
        (page_at, "firing", "firing", "page")]
    assert len({t.alert.fingerprint for _, t in found}) == 1
    assert found[1][1].alert.starts_at_s == (400 + 274) * W


def test_healthy_cohort_never_alerts() -> None:
    bad = [False] * 400 + [r % 200 == 199 for r in range(3000)]   # 0.5 % bad
    engine = AlertEngine(load_rules(ERRORS_SLO))
    assert run_slo(engine, bad) == []
    (budget,) = engine.budgets()
    assert budget.windows == len(bad) and budget.bad == 15
    assert budget.left_fraction == pytest.approx(1 - 15 / (0.01 * len(bad)))


def test_budget_left_decreases_as_expected() -> None:
    engine = AlertEngine(load_rules(ERRORS_SLO))
    bad = [k % 50 == 7 for k in range(1000)]
    lefts = []
    for k, b in enumerate(bad):
        step(engine, k, (), {(): {"error_rate": BAD if b else GOOD}})
        (budget,) = engine.budgets()
        n, spent = k + 1, sum(bad[: k + 1])
        assert (budget.windows, budget.bad) == (n, spent)
        assert budget.budget == pytest.approx(0.01 * n)
        assert budget.left_fraction == pytest.approx(1 - spent / (0.01 * n))
        lefts.append(budget.left_fraction)
    assert lefts[-1] == pytest.approx(1 - 20 / 10)       # 20 bad of a 10-window budget: -1
    # each bad window lowers what is left; good windows only earn budget back
    assert all(lefts[k] < lefts[k - 1] for k in range(1, 1000) if bad[k])
    assert all(lefts[k] >= lefts[k - 1] for k in range(1, 1000) if not bad[k])


def test_budget_period_drops_old_windows() -> None:
    rules = load_rules(ERRORS_SLO + 'period = "6h"\n')
    engine = AlertEngine(rules, budget_bucket_s=60)   # exact at one-minute windows
    bad = [k < 10 for k in range(800)]
    for k, b in enumerate(bad):
        step(engine, k, (), {(): {"error_rate": BAD if b else GOOD}})
        (budget,) = engine.budgets()
        inside = [bad[j] for j in range(k + 1) if (j + 1) * W > (k + 1) * W - 6 * 3600]
        assert (budget.windows, budget.bad) == (len(inside), sum(inside)), k
    # hourly buckets: a bucket leaves once all its windows are out of the period, so up to one
    # bucket of older windows still counts: at 13:20 the bucket (7h, 8h] holds 7:20-8:00 too
    hourly = AlertEngine(rules)
    for k, b in enumerate(bad):
        step(hourly, k, (), {(): {"error_rate": BAD if b else GOOD}})
    assert (hourly.budgets()[0].windows, hourly.budgets()[0].bad) == (360 + 20, 0)


def test_missing_windows_are_not_counted() -> None:
    engine = AlertEngine(load_rules(ERRORS_SLO))
    for k in range(10):
        rows = {(): {"error_rate": GOOD}} if k % 2 else ({(): {"error_rate": NAN}} if k % 4
                                                          else {})
        step(engine, k, (), rows)
    (budget,) = engine.budgets()
    assert (budget.windows, budget.bad) == (5, 0)


# -- persistence -------------------------------------------------------------------------------


def test_snapshot_restore_mid_incident_keeps_one_alert() -> None:
    rules = load_rules(LATENCY + ERRORS_SLO.replace('target', 'by = ["region"]\ntarget'))
    series = [100] * 130 + [300] * 10 + [100] * 30

    def window(engine: AlertEngine, k: int) -> list[AlertTransition]:
        rows = {("eu",): {"latency_p95_ms": series[k], "error_rate": BAD if series[k] > 200
                          else GOOD}}
        return step(engine, k, ("region",), rows)

    straight = AlertEngine(rules)
    expected = [(k, t) for k in range(len(series)) for t in window(straight, k)]
    assert [t.new_state for _, t in expected] == ["pending", "firing", "firing", "resolved",
                                                  "resolved"]

    engine = AlertEngine(rules)
    found = [(k, t) for k in range(139) for t in window(engine, k)]
    assert {(a.rule, a.state) for a in engine.alerts()} == {("latency-p95", "firing"),
                                                            ("errors", "firing")}
    state = json.loads(json.dumps(engine.snapshot()))
    restored = AlertEngine.restore(rules, state)
    assert restored.alerts() == [a for a in engine.alerts() if a.state != "resolved"]
    assert restored.budgets() == engine.budgets()
    found += [(k, t) for k in range(139, len(series)) for t in window(restored, k)]
    assert found == expected
    assert sum(t.new_state == "firing" for _, t in found if t.alert.rule == "latency-p95") == 1
    with pytest.raises(ValueError, match="not after"):
        window(AlertEngine.restore(rules, state), 138)


def test_restore_drops_state_of_removed_rules() -> None:
    rules = load_rules(LATENCY)
    engine = AlertEngine(rules)
    feed(engine, "latency_p95_ms", {"eu": [300] * 6})
    restored = AlertEngine.restore(load_rules(ERRORS_SLO), engine.snapshot())
    assert restored.alerts() == []
    with pytest.raises(ValueError, match="version"):
        AlertEngine.restore(rules, {"version": 99})
