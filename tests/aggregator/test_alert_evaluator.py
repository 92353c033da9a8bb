"""The alert evaluator on a real SQLite store: watermark, lateness, idle flush, persistence.

Reports are built for chosen windows and ingested through the real `Ingestor` (no gRPC here:
that is tests/integration/test_alerts_e2e.py); the idle flush reads a fake monotonic clock.
Latencies are constant per window, so the KLL p95 equals the value sent (exact: a KLL sketch
of identical values returns that value at every rank).
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent.errors import ConfigError, ValidationError
from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator.alerts import RuleError, load_rules
from aggregator.alerts.evaluator import AlertEvaluator, EvaluatorConfig, load_server_rules
from aggregator.alerts.samples import health_metrics
from aggregator.ingest import Ingestor
from aggregator.notify import MemoryNotifier
from aggregator.query import cohort_health
from aggregator.store.sqlite import SqliteStore
from protos import fleetwatch_pb2 as pb

W = 60
BASE = 1_700_000_040 // W * W   # any aligned event time: the evaluator never reads the date

RULES = """
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


def make_spec(model: str = "m", version: str = "1") -> Spec:
    ref = kll_floats_sketch(200)
    ref.update(np.full(100, 20.0, np.float32))
    return Spec(model=model, model_version=version,
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
    """A store, an ingestor wired to an evaluator, and report builders."""

    def __init__(self, db: Path, rules: str = RULES, clock: Clock | None = None,
                 specs: tuple[Spec, ...] = (), **config: object) -> None:
        self.db = db
        self.specs = specs or (make_spec(),)
        self.store = SqliteStore(db)
        for s in self.specs:
            self.store.put_spec(s)
        self.clock = clock or Clock()
        self.notifier = MemoryNotifier()
        self.evaluator = AlertEvaluator(self.store, load_rules(rules), self.notifier,
                                        EvaluatorConfig(**config),  # type: ignore[arg-type]
                                        clock=self.clock)
        self.ingestor = Ingestor(self.store, on_accepted=self.evaluator.on_accepted)
        self.seq = 0

    def send(self, window: int, latency_ms: float, region: str = "eu", spec: Spec | None = None,
             n: int = 50, errors: int = 0) -> None:
        spec = spec or self.specs[0]
        ws = BASE + window * W
        acc = WindowAccumulator(spec, ws)
        err = np.zeros(n, bool)
        err[:errors] = True
        acc.observe_batch({"x": np.full(n, 0.5)}, np.full(n, 0.25), np.full(n, latency_ms),
                          err, n)
        self.seq += 1
        meta = ReportMeta(f"dev-{region}", spec.model, spec.model_version, {"region": region},
                          ws, W, self.seq, spec.hash)
        env = pb.ReportEnvelope(report=report_to_proto(meta, acc.to_summary())
                                .SerializeToString())
        self.ingestor.ingest(env.SerializeToString())

    def drain(self) -> int:
        total = 0
        while (n := self.evaluator.tick()):
            total += n
        return total

    def until(self, model: str = "m", version: str = "1") -> float | None:
        return self.evaluator.view().evaluated_until.get(f"{model}/{version}")

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def fleet(tmp_path: Path):
    made: list[Fleet] = []

    def make(**kw: object) -> Fleet:
        f = Fleet(tmp_path / "agg.sqlite", **kw)  # type: ignore[arg-type]
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def end(window: int) -> float:
    return float(BASE + (window + 1) * W)


def test_watermark_waits_for_one_window_of_lateness(fleet) -> None:
    f = fleet()
    for w in range(3):
        f.send(w, 20.0)
    # the (only) device has delivered window 2; lateness one window: windows ending at or
    # before end(2) - 60 = end(1) are closed
    assert f.drain() == 2
    assert f.until() == end(1)
    f.send(3, 20.0)
    assert f.drain() == 1 and f.until() == end(2)
    assert f.drain() == 0   # evaluated once


def test_idle_flush_evaluates_the_last_windows_and_only_then(fleet) -> None:
    f = fleet(idle_flush_s=30.0)
    for w in range(4):
        f.send(w, 20.0)
    f.drain()
    assert f.until() == end(2)
    f.clock.t += 29.0
    assert f.drain() == 0
    f.clock.t += 1.0          # 30 s of wall clock without a report
    assert f.drain() == 1
    assert f.until() == end(3)


def test_the_slowest_active_device_holds_the_windows_open(fleet) -> None:
    """Two devices: eu has delivered window 5, us only window 2; the windows after us's newest
    stay open until us delivers them (or goes quiet for idle_flush_s)."""
    f = fleet(idle_flush_s=30.0)
    for w in range(6):
        f.send(w, 20.0, region="eu")
        if w <= 2:
            f.send(w, 20.0, region="us")
    f.drain()
    assert f.until() == end(1)   # us's newest is window 2, one window of lateness
    f.send(3, 20.0, region="us")
    f.drain()
    assert f.until() == end(2)
    f.clock.t += 30.0            # nobody reported for 30 s: idle flush, eu's windows close
    f.drain()
    assert f.until() == end(5)


def test_zero_lateness(fleet) -> None:
    f = fleet(lateness_s=0.0)
    for w in range(3):
        f.send(w, 20.0)
    f.drain()
    assert f.until() == end(2)   # every window the device has delivered


def test_breach_fires_once_after_for_and_resolves_below_clear(fleet) -> None:
    f = fleet(idle_flush_s=5.0)
    # p95 per window (constant latencies): 20, 250 x 4, 190 (between clear and threshold:
    # still firing), 170 (past clear: resolves), 20
    series = [20, 250, 250, 250, 250, 190, 170, 20]
    for w, lat in enumerate(series):
        f.send(w, lat)
        f.send(w, 20.0, region="us")
    f.clock.t += 10
    f.drain()
    notes = f.notifier.notifications
    assert [(n.status, n.labels["region"]) for n in notes] == [("firing", "eu"),
                                                              ("resolved", "eu")]
    fired, resolved = notes
    # for = 3m: pending at window 1, fires at the end of window 3 (3 windows of breach)
    assert fired.starts_at_s == BASE + 1 * W
    assert resolved.ends_at_s == BASE + 6 * W
    assert fired.labels["model"] == "m" and fired.labels["model_version"] == "1"
    assert fired.fingerprint == resolved.fingerprint
    assert float(fired.annotations["value"]) == pytest.approx(250.0)
    # one notify() per window with transitions: the firing was not repeated per window
    assert len(f.notifier.batches) == 2
    history = f.store.alert_history()
    assert [(h.previous_state, h.state, h.at_s) for h in reversed(history)] == [
        ("pending", "firing", end(3)), ("firing", "resolved", end(6))]


def test_breach_shorter_than_for_never_fires(fleet) -> None:
    f = fleet(idle_flush_s=5.0)
    for w, lat in enumerate([20, 250, 250, 170, 250, 250, 20]):
        f.send(w, lat)
    f.clock.t += 10
    f.drain()
    assert f.notifier.notifications == []
    assert f.store.alert_history() == []


def test_restart_continues_without_renotifying(tmp_path: Path) -> None:
    db = tmp_path / "agg.sqlite"
    clock = Clock()
    a = Fleet(db, clock=clock, idle_flush_s=5.0)
    for w in range(6):
        a.send(w, 250.0)
    clock.t += 10
    a.drain()
    assert [n.status for n in a.notifier.notifications] == ["firing"]
    a.close()

    b = Fleet(db, clock=clock, idle_flush_s=5.0)
    b.seq = 100
    assert b.drain() == 0                      # nothing new: nothing evaluated twice
    for w in range(6, 9):
        b.send(w, 250.0)
    b.drain()
    clock.t += 10
    b.drain()
    assert b.notifier.notifications == []       # still the same firing alert
    [alert] = b.evaluator.view(state="firing").alerts
    assert alert.starts_at_s == BASE and alert.state == "firing"
    b.send(9, 20.0)
    clock.t += 10
    b.drain()
    assert [n.status for n in b.notifier.notifications] == ["resolved"]
    b.close()


def test_first_start_begins_at_most_a_day_behind(fleet) -> None:
    f = fleet(idle_flush_s=5.0, lookback_s=600.0)
    for w in (0, 100, 101):
        f.send(w, 20.0)
    f.clock.t += 10
    assert f.drain() == 10          # windows 92..101: the last 10 minutes, not 102
    assert f.until() == end(101)


def test_max_windows_per_tick_bounds_one_tick(fleet) -> None:
    f = fleet(idle_flush_s=5.0, max_windows_per_tick=4)
    for w in range(10):
        f.send(w, 20.0)
    f.clock.t += 10
    assert [f.evaluator.tick() for _ in range(4)] == [4, 4, 2, 0]


def test_model_key_restricts_a_rule(fleet) -> None:
    rules = RULES.replace('severity = "page"', 'severity = "page"\nmodel = "other"')
    other = make_spec("other", "7")
    f = fleet(rules=rules, specs=(make_spec(), other), idle_flush_s=5.0)
    for w in range(5):
        f.send(w, 250.0)
        f.send(w, 250.0, spec=other)
    f.clock.t += 10
    f.drain()
    assert {(n.labels["model"], n.labels["model_version"]) for n in f.notifier.notifications} \
        == {("other", "7")}
    assert f.until() is None and f.until("other", "7") == end(4)


def test_a_failing_window_does_not_stop_the_loop(fleet, monkeypatch) -> None:
    f = fleet(idle_flush_s=5.0)
    for w in range(6):
        f.send(w, 250.0)
    f.clock.t += 10
    calls = {"n": 0}
    import aggregator.alerts.evaluator as ev

    real = ev.window_samples

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args, **kw)

    monkeypatch.setattr(ev, "window_samples", flaky)
    assert f.evaluator.tick() == 0 and f.evaluator.errors == 1
    f.drain()
    assert f.until() == end(5)
    assert [n.status for n in f.notifier.notifications] == ["firing"]


def test_view_filters_and_refuses_a_bad_state(fleet) -> None:
    f = fleet(idle_flush_s=5.0)
    for w, lat in enumerate([250, 250, 250, 250, 20, 250]):
        f.send(w, lat)
    f.clock.t += 10
    f.drain()
    v = f.evaluator.view()
    assert [a.state for a in v.alerts] == ["pending", "resolved"]
    assert [a.state for a in f.evaluator.view(state="resolved").alerts] == ["resolved"]
    assert f.evaluator.view(model="nope").alerts == ()
    with pytest.raises(ValidationError, match="state"):
        f.evaluator.view(state="burning")


def test_slo_budget_matches_the_window_count(fleet) -> None:
    rules = """
[[slo]]
name = "errors"
metric = "error_rate"
objective = "< 0.001"
target = 0.9
by = ["region"]
period = "1d"
"""
    f = fleet(rules=rules, idle_flush_s=5.0)
    bad = [0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    for w, b in enumerate(bad):
        f.send(w, 20.0, errors=5 * b)
    f.clock.t += 10
    f.drain()
    [mb] = f.evaluator.view().budgets
    assert (mb.budget.windows, mb.budget.bad) == (10, 2)
    # budget = (1 - 0.9) x 10 windows = 1 bad window allowed; 2 spent: left 1 - 2/1 = -1
    assert mb.budget.left_fraction == pytest.approx(1 - 2 / (0.1 * 10))


def test_health_metrics_reads_every_sli_and_drift(tmp_path: Path) -> None:
    f = Fleet(tmp_path / "agg.sqlite")
    f.send(0, 42.0, errors=5)
    [h] = cohort_health(f.store, "m", "1", start=BASE, end=BASE + W)
    m = health_metrics(h)
    assert m["latency_p95_ms"] == pytest.approx(42.0)
    assert m["error_rate"] == pytest.approx(5 / 50)
    assert m["events"] == 50.0
    assert set(m) >= {"psi:x", "drifting:x", "psi:score", "drifting:score"}
    assert m["drifting:x"] in (0.0, 1.0)
    # an SLI the health query may not compute (yet) is NaN, never a crash
    assert all(isinstance(v, float) for v in m.values())
    assert math.isnan(m.get("heartbeats", math.nan)) or m["heartbeats"] >= 0
    f.close()


def test_server_rules_are_checked_against_the_database(tmp_path: Path) -> None:
    f = Fleet(tmp_path / "agg.sqlite")
    path = tmp_path / "alerts.toml"
    path.write_text(RULES.replace('["region"]', '["hw"]'))
    # no device yet: the key cannot be checked, the file loads (with a warning)
    load_server_rules(path, f.store)
    f.send(0, 20.0)
    with pytest.raises(RuleError) as err:
        load_server_rules(path, f.store)
    assert err.value.line == 9 and "'hw'" in str(err.value) and str(path) in str(err.value)
    path.write_text(RULES.replace("latency_p95_ms", "psi:nosuch"))
    with pytest.raises(RuleError, match=r":4: .*unknown feature 'nosuch'"):
        load_server_rules(path, f.store)
    path.write_text(RULES + 'model = "ghost"\n')
    with pytest.raises(RuleError, match=r":11: .*unknown model 'ghost'"):
        load_server_rules(path, f.store)
    path.write_text(RULES.replace("latency_p95_ms", "psi:score"))  # the prediction's name
    assert load_server_rules(path, f.store).rules[0].metric == "psi:score"
    f.close()


def test_history_and_snapshot_are_in_the_database(fleet) -> None:
    f = fleet(idle_flush_s=5.0)
    for w in range(5):
        f.send(w, 250.0)
    f.clock.t += 10
    f.drain()
    with sqlite3.connect(f.db) as db:
        [(until, snapshot)] = db.execute(
            "SELECT evaluated_until, snapshot FROM alert_engines").fetchall()
        rows = db.execute("SELECT rule, state, cohort, labels FROM alert_history").fetchall()
    assert until == end(4) and json.loads(snapshot)["last_end_s"] == end(4)
    [(rule, state, cohort, labels)] = rows
    assert (rule, state, json.loads(cohort)) == ("latency-p95", "firing", [["region", "eu"]])
    assert json.loads(labels)["model"] == "m"


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="idle_flush_s"):
        EvaluatorConfig(idle_flush_s=0)
    with pytest.raises(ConfigError, match="lateness_s"):
        EvaluatorConfig(lateness_s=-1)
    with pytest.raises(ConfigError, match="max_windows_per_tick"):
        EvaluatorConfig(max_windows_per_tick=0)


def test_model_key_is_validated() -> None:
    with pytest.raises(RuleError, match=r":4: .*'model' must be a non-empty string"):
        load_rules(RULES.replace('name = "latency-p95"', 'name = "latency-p95"\nmodel = 3'))
    with pytest.raises(RuleError, match=r":9: .*reserved"):
        load_rules(RULES.replace('["region"]', '["model"]'))
    rules = load_rules(RULES + 'model = "m"\n')
    assert rules.for_model("m").rules and not rules.for_model("other").rules


def test_over_computes_the_metric_over_the_trailing_windows(fleet) -> None:
    """`over = "3m"`: the window ending at t is judged on the merge of [t - 3m, t).

    Error rates per window (50 events each): 0, 0, 30 %, 0, 0, 0. Alone, window 2 breaches a
    "> 5 %" rule; over three windows its 15 errors of 150 events (10 %) breach in the windows
    ending at end(2), end(3) and end(4) (each merge holds window 2), and end(5) is clean again.
    The same rule without `over` breaches in window 2 only."""
    rules = """
[[rule]]
name = "errors-3m"
metric = "error_rate"
op = ">"
threshold = 0.05
for = "3m"
over = "3m"

[[rule]]
name = "errors-1w"
metric = "error_rate"
op = ">"
threshold = 0.05
for = "3m"
"""
    f = fleet(rules=rules, idle_flush_s=5.0)
    for w, errors in enumerate([0, 0, 15, 0, 0, 0, 0]):
        f.send(w, 20.0, errors=errors)
    f.clock.t += 10
    f.drain()
    notes = [(n.status, n.labels["alertname"]) for n in f.notifier.notifications]
    # errors-3m: pending from window 2's start, fires at end(4) (3 windows), resolves at
    # window 5; errors-1w: pending at window 2 only, never fires.
    assert notes == [("firing", "errors-3m"), ("resolved", "errors-3m")], notes
    fired, resolved = f.notifier.notifications
    assert fired.starts_at_s == BASE + 2 * W
    assert float(fired.annotations["value"]) == pytest.approx(15 / 150)
    assert resolved.ends_at_s == BASE + 5 * W


def test_over_is_validated_with_its_line() -> None:
    bad = """
[[rule]]
name = "x"
metric = "error_rate"
op = ">"
threshold = 0.1
over = "8d"
"""
    with pytest.raises(RuleError) as err:
        load_rules(bad, source="r.toml")
    assert err.value.line == 7 and "over" in str(err.value)
    assert load_rules(bad.replace("8d", "15m")).rules[0].over_s == 900.0
