"""Review of issue 4 (labels, availability, alerts, compare): findings proven by tests.

Tests marked ``xfail(strict=True)`` demonstrate a bug (the reason names it); they start
passing, and so fail as xfail, once the bug is fixed. The others pin behaviour the review
checked and found right, where the existing tests did not cover it.

Alert tests run the real evaluator on a real SQLite store, reports going through the real
`Ingestor` (as in test_alert_evaluator.py); the idle flush reads a fake monotonic clock.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent.spec import BINARY, NO_NOISE, NUMERIC, FeatureSpec, LabelSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator.alerts import load_rules
from aggregator.alerts.engine import AlertEngine, CohortSample
from aggregator.alerts.evaluator import AlertEvaluator, EvaluatorConfig
from aggregator.compare import CohortData, compare_cohorts
from aggregator.ingest import Ingestor
from aggregator.notify import MemoryNotifier
from aggregator.query import cohort_health
from aggregator.slis import label_slis
from aggregator.store.sqlite import SqliteStore
from protos import fleetwatch_pb2 as pb

W = 60
# Recent enough for ingest's "not more than a day ahead" check to be about our clock.
NOW_BASE = int(time.time()) // W * W - 40 * W
OLD_BASE = 1_700_000_040 // W * W


def make_spec() -> Spec:
    ref = kll_floats_sketch(200)
    ref.update(np.full(100, 20.0, np.float32))
    return Spec(model="m", model_version="1",
                features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0),
                                      reference_counts=(0, 50, 50, 0, 0)),),
                prediction=FeatureSpec("score", NUMERIC, edges=(0.0, 0.5, 1.0),
                                       reference_counts=(0, 50, 50, 0, 0)),
                latency_reference_kll=ref.serialize(), window_length_s=W, reference_rows=100,
                privacy=PrivacySpec(mechanism=NO_NOISE))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Fleet:
    """A store, an ingestor feeding an evaluator, and a report builder (one device per call)."""

    def __init__(self, db: Path, rules: str, base: int = OLD_BASE, **config: object) -> None:
        self.spec = make_spec()
        self.base = base
        self.store = SqliteStore(db)
        self.store.put_spec(self.spec)
        self.clock = Clock()
        self.notifier = MemoryNotifier()
        self.evaluator = AlertEvaluator(self.store, load_rules(rules), self.notifier,
                                        EvaluatorConfig(**config),  # type: ignore[arg-type]
                                        clock=self.clock)
        self.ingestor = Ingestor(self.store, on_accepted=self.evaluator.on_accepted)
        self.seq = 0

    def send(self, window: int, device: str, region: str, latency_ms: float = 20.0,
             n: int = 50, errors: int = 0) -> None:
        ws = self.base + window * W
        acc = WindowAccumulator(self.spec, ws)
        err = np.zeros(n, bool)
        err[:errors] = True
        acc.observe_batch({"x": np.full(n, 0.5)}, np.full(n, 0.25), np.full(n, latency_ms),
                          err, n)
        self.seq += 1
        meta = ReportMeta(device, "m", "1", {"region": region}, ws, W, self.seq,
                          self.spec.hash)
        env = pb.ReportEnvelope(report=report_to_proto(meta, acc.to_summary())
                                .SerializeToString())
        self.ingestor.ingest(env.SerializeToString())

    def drain(self) -> int:
        total = 0
        while (n := self.evaluator.tick()):
            total += n
        return total

    def flush(self) -> int:
        """The idle flush: no report for longer than idle_flush_s (wall clock)."""
        self.clock.t += 3600
        return self.drain()

    def transitions(self) -> list[tuple[str, str, str]]:
        """(region, status, severity) of every notification so far, in order."""
        return [(n.labels.get("region", ""), n.status, n.labels["severity"])
                for n in self.notifier.notifications]

    def end(self, window: int) -> float:
        return float(self.base + (window + 1) * W)


@pytest.fixture
def fleet(tmp_path: Path):
    made: list[Fleet] = []

    def make(rules: str, **kw: object) -> Fleet:
        f = Fleet(tmp_path / f"agg{len(made)}.sqlite", rules, **kw)  # type: ignore[arg-type]
        made.append(f)
        return f

    yield make
    for f in made:
        f.store.close()


AVAILABILITY_RULE = """
[[rule]]
name = "availability"
metric = "availability"
op = "<"
threshold = 0.9
by = ["region"]
severity = "page"
"""

LATENCY_RULE = """
[[rule]]
name = "latency-p95"
metric = "latency_p95_ms"
op = ">"
threshold = 200
clear = 180
for = "3m"
by = ["region"]
severity = "page"
"""

ERROR_SLO = """
[[slo]]
name = "errors"
metric = "error_rate"
objective = "< 0.001"
target = 0.99
by = ["region"]
"""


# -- availability: a cohort that went silent ------------------------------------------------------

def test_availability_alert_fires_when_one_device_of_a_region_is_silent(fleet) -> None:
    f = fleet(AVAILABILITY_RULE)
    for w in range(6):
        f.send(w, "eu-a", "eu")
        f.send(w, "us-a", "us")
        if w < 3:
            f.send(w, "eu-b", "eu")
    f.flush()
    # eu-b stopped after window 2: eu is at 1/2 from window 3 on; us stays at 1/1.
    assert f.transitions() == [("eu", "firing", "page")]
    assert f.notifier.notifications[0].starts_at_s == f.base + 3 * W


def test_health_lists_a_fully_silent_cohort_with_availability_zero(fleet) -> None:
    f = fleet(AVAILABILITY_RULE)
    for w in range(5):
        f.send(w, "eu-a", "eu")
        f.send(w, "us-a", "us")
    for w in range(5, 10):
        f.send(w, "us-a", "us")
    found = {h.cohort["region"]: h for h in cohort_health(
        f.store, "m", "1", group_by=["region"], start=f.base + 6 * W, end=f.base + 9 * W,
        now=f.base + 9 * W)}
    assert set(found) == {"eu", "us"}
    assert found["eu"].availability == 0.0 and found["eu"].devices_last_day == 1


def test_availability_alert_keeps_firing_when_the_whole_region_dies(fleet) -> None:
    f = fleet(AVAILABILITY_RULE, stale_s=600)
    for w in range(40):
        f.send(w, "us-a", "us")
        if w < 5:
            f.send(w, "eu-b", "eu")
        if w < 10:
            f.send(w, "eu-a", "eu")   # eu at 1/2 from window 5, at 0/2 from window 10
    f.flush()
    assert f.transitions() == [("eu", "firing", "page")]
    firing = [a for a in f.evaluator.view(state="firing").alerts if a.rule == "availability"]
    assert [dict(a.cohort)["region"] for a in firing] == ["eu"]


# -- the watermark and a device with a skewed clock ------------------------------------------------

def test_one_device_with_a_clock_ahead_does_not_stop_alerting(fleet) -> None:
    f = fleet(LATENCY_RULE, base=NOW_BASE, stale_s=600)
    for w in range(8):
        f.send(w, "eu-a", "eu", latency_ms=300.0)
        f.drain()
    assert f.transitions() == [("eu", "firing", "page")]
    for w in range(8, 30):
        f.send(w + 6, "us-ahead", "us")       # its clock runs 6 windows ahead
        f.send(w, "eu-a", "eu", latency_ms=300.0)
        f.drain()
    # eu breached in every window: its alert is still firing.
    assert f.transitions() == [("eu", "firing", "page")]


def test_without_the_skewed_device_the_same_traffic_keeps_firing(fleet) -> None:
    """The control for the test above: same fleet, no device ahead."""
    f = fleet(LATENCY_RULE, base=NOW_BASE, stale_s=600)
    for w in range(30):
        f.send(w, "eu-a", "eu", latency_ms=300.0)
        f.send(w, "us-a", "us")
        f.drain()
    assert f.transitions() == [("eu", "firing", "page")]


# -- threshold `for` with hysteresis ---------------------------------------------------------------

def _threshold_engine() -> AlertEngine:
    return AlertEngine(load_rules(LATENCY_RULE.replace('"3m"', '"5m"')))


def _run(engine: AlertEngine, values: list[float]) -> list[tuple[int, str]]:
    out = []
    for i, v in enumerate(values):
        start = OLD_BASE + i * W
        for t in engine.evaluate(start, start + W, {("region",): [
                CohortSample({"region": "eu"}, {"latency_p95_ms": v})]}):
            out.append((i, t.new_state))
    return out


def test_two_breaching_minutes_do_not_fire_a_five_minute_rule() -> None:
    states = _run(_threshold_engine(), [250, 190, 190, 190, 190, 250, 190])
    assert "firing" not in [s for _, s in states]


def test_five_consecutive_breaching_minutes_fire_once_at_the_fifth() -> None:
    states = _run(_threshold_engine(), [250, 250, 250, 250, 250, 250, 250, 170])
    assert states == [(0, "pending"), (4, "firing"), (7, "resolved")]


# -- SLO burn rates end to end through the evaluator -----------------------------------------------

def _burn_reference(bad: list[bool], now: int, span: int) -> float:
    """burn(span windows) = (bad windows among the last `span`) / span / (1 - target): the
    span, not the windows seen, so a young cohort's few bad windows weigh what they would
    in a full window (docs/alerts.md)."""
    window = bad[max(0, now - span + 1):now + 1]
    return (sum(window) / span) / 0.01


def test_fast_burn_pages_at_the_9th_bad_minute(fleet) -> None:
    """After a healthy hour every window turns bad: the arithmetic of docs/alerts.md gives
    burn(1h) = b/60/0.01 > 14.4 at b = 9 (and burn(5m) = 100): a page. burn(6h) = b/360/0.01
    stays under 6 for b < 22, so no ticket comes first."""
    f = fleet(ERROR_SLO)
    bad = [False] * 60 + [True] * 12
    for w, b in enumerate(bad):
        f.send(w, "eu-a", "eu", errors=5 if b else 0, n=500)
    f.flush()
    page_at = 60 + 8
    assert _burn_reference(bad, page_at, 60) > 14.4 >= _burn_reference(bad, page_at - 1, 60)
    assert all(_burn_reference(bad, i, 360) <= 6 for i in range(len(bad)))
    assert f.transitions() == [("eu", "firing", "page")]
    assert f.notifier.notifications[0].starts_at_s == f.base + page_at * W
    history = f.store.alert_history("m", limit=10)[::-1]
    assert [(r.at_s, r.previous_state, r.state, r.severity) for r in history] == [
        (f.end(page_at), "inactive", "firing", "page")]
    budget = next(b for b in f.evaluator.view().budgets if b.budget.slo == "errors").budget
    assert (budget.windows, budget.bad) == (72, 12)
    assert budget.left_fraction == pytest.approx(1 - 12 / (0.01 * 72))


def test_slow_burn_tickets_and_never_pages(fleet) -> None:
    """One bad window in twelve (8.3 %) after a healthy hour: burn(1h) <= 5/60/0.01 = 8.3
    never reaches 14.4; the ticket fires at the first window where burn(6h) > 6 and
    burn(30m) > 6, computed here independently of the engine."""
    f = fleet(ERROR_SLO)
    bad = [False] * 60 + [(i % 12) == 11 for i in range(420)]
    for w, b in enumerate(bad):
        f.send(w, "eu-a", "eu", errors=5 if b else 0, n=500)
    f.drain()
    expected = next(i for i in range(len(bad))
                    if _burn_reference(bad, i, 360) > 6 and _burn_reference(bad, i, 30) > 6)
    assert all(_burn_reference(bad, i, 60) <= 14.4 or _burn_reference(bad, i, 5) <= 14.4
               for i in range(len(bad)))
    assert [s for _, s, _ in f.transitions()][:1] == ["firing"]
    assert {sev for _, _, sev in f.transitions()} == {"ticket"}
    assert f.notifier.notifications[0].starts_at_s == f.base + expected * W


def test_one_bad_first_window_of_a_new_cohort_does_not_page(fleet) -> None:
    f = fleet(ERROR_SLO)
    f.send(0, "eu-a", "eu", errors=1, n=500)
    for w in range(1, 30):
        f.send(w, "eu-a", "eu", n=500)
    f.flush()
    assert ("eu", "firing", "page") not in f.transitions()


# -- over sampling and several model versions ------------------------------------------------------

def test_slo_over_judges_each_window_on_the_trailing_span(fleet) -> None:
    """over = 3m: window w is bad when the error rate over windows w-2..w is >= 0.001."""
    f = fleet(ERROR_SLO.replace('by = ["region"]', 'by = ["region"]\nover = "3m"'))
    for w in range(20):
        f.send(w, "eu-a", "eu", errors=2 if w == 10 else 0, n=500)
    f.flush()
    budget = next(b for b in f.evaluator.view().budgets).budget
    assert (budget.windows, budget.bad) == (20, 3)   # windows 10, 11 and 12 see the error


# -- DP noise in the label SLIs --------------------------------------------------------------------

LATENCY_EDGES = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                 7200.0, 21600.0, 86400.0)
LABEL_SPEC = Spec(model="m", model_version="1",
                  features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
                  prediction=FeatureSpec("score", NUMERIC, edges=(0.0, 0.5, 1.0)),
                  labels=LabelSpec(BINARY, classes=("neg", "pos"),
                                   latency_edges=LATENCY_EDGES),
                  privacy=PrivacySpec(mechanism=NO_NOISE))


def _labeled(confusion: list[list[float]], labels: int, noise_sd: float,
             latency: list[float] | None = None) -> Summary:
    s = Summary.zero(LABEL_SPEC)
    s.confusion = np.asarray(confusion, dtype=np.int64).reshape(-1)
    s.labeled_count = s.label_histogram_count = labels
    s.noise_variance_per_bin = noise_sd ** 2
    s.report_count = 1
    if latency is not None:
        s.label_latency = np.asarray(latency, dtype=np.int64)
    return s


def test_label_latency_p95_with_a_spread_tail_is_not_read_in_the_head() -> None:
    # 2000 labels in [1, 2) s, 1000 spread evenly over the five bins from 600 s to 86400 s:
    # the true p95 (rank 2850) lies in the last of them. Noise sd 50 per cell (a few merged
    # reports), here with zero noise drawn: what the counts read on average.
    latency = [0, 0, 2000] + [0] * 7 + [200] * 5 + [0, 0]
    s = _labeled([[1200, 300, 0], [300, 1200, 0], [0, 0, 0]], 3000, 50.0, latency)
    slis = label_slis(LABEL_SPEC, s)
    assert not slis.insufficient_labels
    assert math.isnan(slis.label_latency_p95_s) or slis.label_latency_p95_s >= 600.0


def test_label_slis_are_unbiased_when_noise_pushes_empty_cells_both_ways() -> None:
    noise = [[0, 0, 40], [0, 0, -35], [30, -30, -5]]
    true = [[400, 100, 0], [50, 450, 0], [0, 0, 0]]
    s = _labeled(np.add(true, noise).tolist(), 1000, 20.0)
    assert label_slis(LABEL_SPEC, s).accuracy == pytest.approx(0.85)


# -- compare: accuracy under DP noise -------------------------------------------------------------

def _accuracy_row(result) -> object:
    return next(m for m in result[0][0].metrics if m.metric == "accuracy")


def test_compare_accuracy_equals_the_health_accuracy_of_the_same_data() -> None:
    noisy = np.add([[400, 100, 0], [50, 450, 0], [0, 0, 0]],
                   [[0, 0, 40], [0, 0, -35], [30, -30, 25]]).tolist()
    s = _labeled(noisy, 1000, 20.0)
    row = _accuracy_row(compare_cohorts(LABEL_SPEC, LABEL_SPEC,
                                        [CohortData({}, baseline=s, candidate=s.copy())]))
    assert row.baseline == pytest.approx(label_slis(LABEL_SPEC, s).accuracy, abs=0.005)


def _null_confusion(rng: np.random.Generator, reports: int, per_report: int,
                    sd: float) -> Summary:
    n = reports * per_report
    y = rng.random(n) < 0.5
    pred = np.where(rng.random(n) < 0.8, y, ~y)
    c = np.zeros((3, 3))
    for t in (0, 1):
        for p in (0, 1):
            c[t, p] = np.sum((y == t) & (pred == p))
    # The sum of `reports` independent per-report noises (near normal at these counts).
    c += np.rint(rng.normal(0.0, sd * math.sqrt(reports), size=(3, 3)))
    return _labeled(c.tolist(), n, sd * math.sqrt(reports))


def test_compare_accuracy_type_one_error_with_a_small_canary() -> None:
    rng = np.random.default_rng(2)
    trials, worse = 2000, 0
    for _ in range(trials):
        base = _null_confusion(rng, 1000, 100, 20.0)
        cand = _null_confusion(rng, 40, 100, 20.0)
        row = _accuracy_row(compare_cohorts(LABEL_SPEC, LABEL_SPEC,
                                            [CohortData({}, base, cand)], alpha=0.01))
        worse += row.worse
    assert worse / trials <= 0.008
