"""The server side of alerting: which windows are closed, evaluate them, persist, notify.

Example::

    rules = load_server_rules("alerts.toml", store)        # validated against the database
    evaluator = AlertEvaluator(store, rules, MultiNotifier([LogNotifier()]))
    ingestor = Ingestor(store, on_accepted=evaluator.on_accepted)
    evaluator.start()                                       # a thread, every tick_s
    ...
    evaluator.close()

One :class:`~aggregator.alerts.engine.AlertEngine` per (model, model_version) with reports.
Event time decides what a window holds and when it is closed. Per spec, each device's newest
window start is tracked; the *watermark* is the OLDEST of them among the devices that reported
in the last ``idle_flush_s`` (each device sends every window, heartbeats included, in order),
plus one window, minus ``lateness_s`` (default: one window length); every window whose end is
at or before it is evaluated once, in order. So the slowest active device holds the windows
open until it has delivered them, and a device whose clock runs ahead cannot close them for
the rest of the fleet. A device that stops reporting stops holding them back after
``idle_flush_s``. The only wall-clock input is that idleness: when no report of a spec arrived
for ``idle_flush_s`` at all, its watermark moves to the end of its latest window, so the last
windows of a replay or of a quiet fleet are evaluated too. A report for a window already
evaluated still counts in ``fleetwatch health`` but not in alerts.

After each window, the engine's snapshot and the window's transitions are stored in one
transaction, then the firing / resolved transitions are handed to the notifier (which never
blocks). A restart restores the engine from the snapshot and continues after the last
evaluated window: an alert firing before it is not notified again.

Replicas sharing one database: only the holder of the store's "alerts" lease evaluates (and
checks it still holds it right before each save); the per-sender view behind the watermark is
read from the database (`Store.sender_activity`), so it covers every replica's reports; a
replica that takes the lease reloads the engines and continues after the last saved window.
Semantics and options: ``docs/alerts.md``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError, ValidationError
from aggregator.alerts.engine import Alert, AlertEngine, AlertTransition, BudgetState
from aggregator.alerts.rules import RuleSet, load_rules_file
from aggregator.alerts.samples import window_samples
from aggregator.notify import Notification, Notifier
from aggregator.store.base import AlertRecord, Store

__all__ = ["AlertEvaluator", "AlertsView", "EvaluatorConfig", "ModelBudget",
           "load_server_rules", "target_key"]

logger = logging.getLogger(__name__)

STATES = ("pending", "firing", "resolved")
_NOTIFY = ("firing", "resolved")
# Consecutive failures computing one window's samples before it is evaluated as "no data"
# (so one bad window cannot stop a model's alerting forever).
_MAX_SAMPLE_FAILURES = 3
# Without transitions, the snapshot is written at least every this many windows and whenever
# the engine has caught up; windows evaluated after the last write are evaluated again after
# a restart (same event time, same data: same result, and they had no transitions to repeat).
_SNAPSHOT_EVERY = 30
# Each poll of `Store.sender_activity` rereads this much before the previous one: a report is
# stamped (received_ms) before its transaction commits, and replicas' wall clocks differ a bit.
_POLL_OVERLAP_MS = 10_000
# Ticks between looks for specs with reports on other replicas (and, when not leading,
# between refreshes of the mirrored engines).
_DISCOVER_EVERY = 4


class _LeaseLost(Exception):
    """The alerts lease went to another replica before a window was saved."""


def target_key(model: str, model_version: str) -> str:
    """The key of ``ListAlertsResponse.evaluated_until``: ``MODEL/VERSION``."""
    return f"{model}/{model_version}"


@dataclass(frozen=True)
class EvaluatorConfig:
    """``lateness_s``: None means one window length. ``idle_flush_s``: wall-clock quiet time
    after which a spec's last windows are evaluated. ``lookback_s``: on first start (and after
    a long gap) evaluation begins at most this far behind the watermark."""

    lateness_s: float | None = None
    idle_flush_s: float = 30.0
    tick_s: float = 0.5
    max_windows_per_tick: int = 60
    lookback_s: float = 86400.0
    stale_s: float = 900.0
    external_url: str = ""

    def __post_init__(self) -> None:
        if self.lateness_s is not None and not (math.isfinite(self.lateness_s)
                                                and self.lateness_s >= 0):
            raise ConfigError(f"lateness_s: must be >= 0, got {self.lateness_s!r}")
        for name in ("idle_flush_s", "tick_s", "lookback_s", "stale_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number of seconds, got "
                                  f"{value!r}")
        if not (isinstance(self.max_windows_per_tick, int) and self.max_windows_per_tick >= 1):
            raise ConfigError(f"max_windows_per_tick: must be an int >= 1, got "
                              f"{self.max_windows_per_tick!r}")


@dataclass(frozen=True)
class ModelBudget:
    model: str
    model_version: str
    budget: BudgetState


@dataclass(frozen=True)
class AlertsView:
    """What ``ListAlerts`` answers: alerts (pending and firing first, then resolved ones,
    newest first), SLO budgets, and per ``MODEL/VERSION`` the last evaluated window end."""

    alerts: tuple[AlertRecord, ...]
    budgets: tuple[ModelBudget, ...]
    evaluated_until: Mapping[str, float]


def load_server_rules(path: str | Path, store: Store) -> RuleSet:
    """Load a rule file, validated against what the database knows.

    ``by`` keys are checked against the label keys devices have reported (when any device
    has), ``psi:FEATURE`` / ``drifting:FEATURE`` and ``model`` against the registered specs
    (when there are any). Raises ``RuleError`` (a ``ConfigError``) naming the line.
    """
    keys = store.label_keys()
    specs = store.list_specs()
    if not keys:
        logger.warning("rules %s: no device has reported yet, so the 'by' keys cannot be "
                       "checked against device labels", path)
    features = {f.name for s in specs for f in (*s.features, *([s.prediction]
                                                              if s.prediction else []))}
    models = {s.model for s in specs}
    rules = load_rules_file(path, known_label_keys=keys or None,
                            known_features=features if specs else None,
                            known_models=models if specs else None)
    logger.info("rules %s: %d threshold rules, %d SLOs", path, len(rules.rules), len(rules.slos))
    return rules


@dataclass
class _Target:
    """The alerting state of one (model, model_version)."""

    model: str
    model_version: str
    window_s: int
    rules: RuleSet
    hashes: set[str] = field(default_factory=set)
    engine: AlertEngine | None = None
    next_start: int | None = None     # start of the next window to evaluate
    saved_snapshot: str = ""          # the snapshot last written to the database
    unsaved: int = 0                  # windows evaluated since it was written
    sample_failures: int = 0

    @property
    def key(self) -> str:
        return target_key(self.model, self.model_version)


class AlertEvaluator:
    """Evaluates the rules on closed windows in a background thread; thread-safe.

    ``clock`` (monotonic seconds) is only used for the idle flush; ``wall_clock`` (Unix
    seconds) only to read the ages of the senders' last reports in the database (stamped with
    the receiving replica's wall clock), which become arrival times on ``clock``.

    Several replicas on one database: only the holder of the store's "alerts" lease
    (`Store.try_lead`) evaluates; the others mirror the stored engines for queries.
    """

    def __init__(self, store: Store, rules: RuleSet, notifier: Notifier,
                 config: EvaluatorConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.rules = rules
        self.notifier = notifier
        self.config = config or EvaluatorConfig()
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._max_start: dict[str, int] = {}
        self._min_start: dict[str, int] = {}
        self._last_arrival: dict[str, float] = {}
        # spec hash -> sender -> (newest window start, arrival time on `clock`, wall clock ms
        # its activity is known until): from `on_accepted` and `store.sender_activity`
        self._devices: dict[str, dict[str, tuple[int, float, int]]] = {}
        self._polled_ms: dict[str, int] = {}  # spec hash -> wall clock ms of its last poll
        self._epoch = 0      # of this replica's hold on the alerts lease (`try_lead`); 0: none
        self._ticks = 0
        self.lead_changes = 0                  # times this replica gained the alerts lease
        self._new_hashes: set[str] = set()
        self._seen_hashes: set[str] = set()   # registered (to a target, or no rules apply)
        self._targets: dict[tuple[str, str], _Target] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.windows_evaluated = 0
        self.notifications = 0
        self.errors = 0
        now = self._clock()
        for spec in store.list_specs():
            found = store.window_range(spec.hash)
            if found is not None:
                self._min_start[spec.hash], self._max_start[spec.hash] = found
                self._last_arrival[spec.hash] = now
                self._new_hashes.add(spec.hash)

    # -- the ingest side ------------------------------------------------------------------------

    def on_accepted(self, spec_hash: str, window_start: int, device_id: str = "") -> None:
        """Called by the ingestor for every accepted report; cheap, never raises. (The
        leader's per-sender view also reads the database, which holds every replica's
        reports; a report accepted here is timed here, exactly.)"""
        with self._lock:
            if device_id:
                devices = self._devices.setdefault(spec_hash, {})
                old = devices.get(device_id)
                newest = window_start if old is None else max(old[0], window_start)
                devices[device_id] = (newest, self._clock(), int(self._wall() * 1000))
            if window_start > self._max_start.get(spec_hash, window_start - 1):
                self._max_start[spec_hash] = window_start
            if window_start < self._min_start.get(spec_hash, window_start + 1):
                self._min_start[spec_hash] = window_start
            self._last_arrival[spec_hash] = self._clock()
            if spec_hash not in self._seen_hashes:
                self._new_hashes.add(spec_hash)

    # -- evaluation ------------------------------------------------------------------------------

    def _register_new_hashes(self) -> None:
        with self._lock:
            new, self._new_hashes = self._new_hashes, set()
        for h in sorted(new):
            spec = self.store.get_spec("", spec_hash=h)
            if spec is None:  # cannot happen: ingest refuses unknown specs
                continue
            key = (spec.model, spec.model_version)
            rules = self.rules.for_model(spec.model)
            # The health query reads the latest spec of the version: use its window length.
            latest = self.store.get_spec(spec.model, spec.model_version) or spec
            with self._lock:
                self._seen_hashes.add(h)
                if not rules.rules and not rules.slos:
                    continue
                target = self._targets.get(key)
                if target is None:
                    target = _Target(spec.model, spec.model_version, latest.window_length_s,
                                     rules)
                    self._targets[key] = target
                target.hashes.add(h)

    def _discover_hashes(self) -> None:
        """Specs whose reports reached other replicas only (no `on_accepted` here)."""
        with self._lock:
            known = self._seen_hashes | self._new_hashes
        for spec in self.store.list_specs():
            if spec.hash in known:
                continue
            found = self.store.window_range(spec.hash)
            if found is None:
                continue
            with self._lock:
                lo, hi = found
                self._min_start[spec.hash] = min(lo, self._min_start.get(spec.hash, lo))
                self._max_start[spec.hash] = max(hi, self._max_start.get(spec.hash, hi))
                self._last_arrival.setdefault(spec.hash, self._clock())
                self._new_hashes.add(spec.hash)

    def _poll(self, hashes: Sequence[str], now: float) -> None:
        """Bring the per-sender view up to date from the database. Each poll reads the
        senders received since the previous one minus `_POLL_OVERLAP_MS` (commit lag and
        replica clock skew); the first, those active within ``idle_flush_s``. A sender's
        arrival time is ``now`` minus the age of its last report."""
        wall_ms = int(self._wall() * 1000)
        for h in hashes:
            last = self._polled_ms.get(h)
            since = (wall_ms - int(self.config.idle_flush_s * 1000) - _POLL_OVERLAP_MS
                     if last is None else last - _POLL_OVERLAP_MS)
            rows = self.store.sender_activity(h, since)
            with self._lock:
                self._polled_ms[h] = wall_ms
                devices = self._devices.setdefault(h, {})
                for sender, (newest, received_ms) in rows.items():
                    old = devices.get(sender)
                    if old is not None and newest <= old[0] and received_ms <= old[2]:
                        continue  # nothing new: seen in an earlier poll, or accepted here
                    arrival = now - max(0, wall_ms - received_ms) / 1000.0
                    if old is not None:
                        newest, arrival = max(newest, old[0]), max(arrival, old[1])
                    devices[sender] = (newest, arrival, received_ms)
                    if newest > self._max_start.get(h, newest - 1):
                        self._max_start[h] = newest
                    self._min_start.setdefault(h, newest)
                    if arrival > self._last_arrival.get(h, arrival - 1.0):
                        self._last_arrival[h] = arrival

    def _watermark(self, target: _Target, now: float) -> tuple[int, int] | None:
        """(watermark, earliest window start) of a target, or None without reports."""
        with self._lock:
            hashes = [h for h in target.hashes if h in self._max_start]
            if not hashes:
                return None
            latest = max(self._max_start[h] for h in hashes)
            earliest = min(self._min_start[h] for h in hashes)
            idle = all(now - self._last_arrival[h] >= self.config.idle_flush_s for h in hashes)
            active = self._active_newest(hashes, now)
        if idle:
            return latest + target.window_s, earliest
        lateness = (target.window_s if self.config.lateness_s is None
                    else self.config.lateness_s)
        if active is None:  # no per-device view (just restarted): the newest window of all
            return int(latest - lateness), earliest
        return int(active + target.window_s - lateness), earliest

    def _forget_stale(self, now: float) -> None:
        """Drop senders quiet for an hour (the leader does it in `_active_newest`)."""
        with self._lock:
            for devices in self._devices.values():
                for d in [d for d, (_, t, _) in devices.items() if now - t > 3600.0]:
                    del devices[d]

    def _active_newest(self, hashes: Sequence[str], now: float) -> int | None:
        """The oldest newest-window of the devices that reported within idle_flush_s (lock
        held); devices quiet for an hour are forgotten (memory stays bounded by the fleet
        that is alive)."""
        oldest: int | None = None
        for h in hashes:
            devices = self._devices.get(h)
            if not devices:
                continue
            stale = [d for d, (_, t, _) in devices.items() if now - t > 3600.0]
            for d in stale:
                del devices[d]
            for newest, t, _ in devices.values():
                if now - t < self.config.idle_flush_s and (oldest is None or newest < oldest):
                    oldest = newest
        return oldest

    def _start(self, target: _Target, watermark: int, earliest: int) -> None:
        """Create the target's engine: restored from the database, or fresh."""
        extra = {"model": target.model, "model_version": target.model_version}
        kwargs = {"stale_s": self.config.stale_s, "extra_labels": extra}
        saved = self.store.load_alert_state(target.model, target.model_version)
        engine = None
        if saved is not None:
            until, snapshot = saved
            try:
                engine = AlertEngine.restore(target.rules, json.loads(snapshot), **kwargs)
            except Exception:  # a corrupt or incompatible snapshot: continue without it
                logger.exception("alerts %s: cannot restore the saved engine state; firing "
                                 "alerts will fire (and notify) again", target.key)
            target.next_start = int(until)
            logger.info("alerts %s: continuing after window end %d", target.key, int(until))
        else:
            L = target.window_s
            target.next_start = max(earliest // L * L,
                                    int(watermark - self.config.lookback_s) // L * L)
        target.engine = engine or AlertEngine(target.rules, **kwargs)
        target.saved_snapshot = json.dumps(target.engine.snapshot())

    def _next_window(self, target: _Target, now: float) -> int | None:
        found = self._watermark(target, now)
        if found is None:
            return None
        watermark, earliest = found
        if target.engine is None:
            self._start(target, watermark, earliest)
        assert target.next_start is not None
        L = target.window_s
        floor = int(watermark - self.config.lookback_s) // L * L
        if target.next_start < floor:  # a long gap: do not walk through days of empty windows
            logger.info("alerts %s: skipping windows %d..%d (more than %ds behind the "
                        "watermark)", target.key, target.next_start, floor,
                        self.config.lookback_s)
            target.next_start = floor
        start = target.next_start
        return start if start + L <= watermark else None

    def _try_lead(self) -> int:
        """The store's epoch of this replica's hold on the alerts lease, 0 if not held."""
        try:
            return int(self.store.try_lead("alerts"))
        except Exception:
            self.errors += 1
            if self.errors & (self.errors - 1) == 0:
                logger.exception("alerts: cannot take or check the lease (%d errors so far)",
                                 self.errors)
            return 0

    def _lead(self) -> bool:
        """Whether this replica evaluates this tick. Every new hold of the lease (at start,
        after the previous leader died, or re-taken after this replica lost it: a new epoch)
        reloads every engine from the store, since another leader may have advanced them,
        and rereads the per-sender view; losing it stops evaluation."""
        epoch = self._try_lead()
        if epoch and epoch != self._epoch:
            self.lead_changes += 1
            with self._lock:
                for target in self._targets.values():
                    self._reset(target)
                self._polled_ms.clear()  # the next poll reads every active sender
            logger.info("alerts: this replica leads alert evaluation (lease epoch %d)", epoch)
        elif self._epoch and not epoch:
            logger.warning("alerts: lost the alert lease; another replica evaluates")
        self._epoch = epoch
        return bool(epoch)

    @property
    def leading(self) -> bool:
        """Whether this replica held the alerts lease at its last tick (and has not found it
        lost since)."""
        return bool(self._epoch)

    @staticmethod
    def _reset(target: _Target) -> None:
        """Forget a target's engine: the next use restores it from the store (lock held)."""
        target.engine = None
        target.next_start = None
        target.saved_snapshot = ""
        target.unsaved = 0
        target.sample_failures = 0

    def _follow(self) -> None:
        """Not leading: mirror the leader's stored engines, so that `view()` (ListAlerts,
        /metrics, the dashboard) answers from any replica."""
        with self._lock:
            targets = list(self._targets.values())
        for target in targets:
            try:
                saved = self.store.load_alert_state(target.model, target.model_version)
                if saved is None:
                    continue
                until, snapshot = saved
                engine = target.engine
                if engine is not None and engine.last_window_end_s == until:
                    continue
                extra = {"model": target.model, "model_version": target.model_version}
                restored = AlertEngine.restore(target.rules, json.loads(snapshot),
                                               stale_s=self.config.stale_s, extra_labels=extra)
            except Exception:  # the view stays as it was; evaluation is unaffected
                self.errors += 1
                if self.errors & (self.errors - 1) == 0:
                    logger.exception("alerts %s: cannot mirror the stored engine (%d errors "
                                     "so far)", target.key, self.errors)
                continue
            with self._lock:
                target.engine, target.next_start = restored, int(until)
                target.saved_snapshot, target.unsaved = snapshot, 0

    def tick(self) -> int:
        """Evaluate the closed windows, at most ``max_windows_per_tick``; how many were
        (0 when another replica holds the alerts lease)."""
        self._ticks += 1
        if self._ticks % _DISCOVER_EVERY == 1:
            self._discover_hashes()
        self._register_new_hashes()
        if not self._lead():
            if self._ticks % _DISCOVER_EVERY == 1:
                self._forget_stale(self._clock())
                self._follow()
            return 0
        now = self._clock()
        budget = self.config.max_windows_per_tick
        done = 0
        with self._lock:
            targets = list(self._targets.values())
        self._poll(sorted({h for t in targets for h in t.hashes}), now)
        blocked: set[str] = set()
        progress = True
        while budget > 0 and progress:
            progress = False
            for target in targets:  # one window per target in turn: no model starves
                if budget == 0 or target.key in blocked:
                    continue
                try:
                    start = self._next_window(target, now)
                    if start is None:
                        self._save_if_unsaved(target)
                        continue
                    self._evaluate(target, start, now)
                except _LeaseLost:
                    # Its unsaved windows are the new leader's. Not leading any more: a later
                    # hold is a new one, and reloads every engine from the store.
                    logger.warning("alerts %s: lost the lease before saving; stopping",
                                   target.key)
                    self._epoch = 0
                    return done
                except Exception:
                    self.errors += 1
                    blocked.add(target.key)
                    if self.errors & (self.errors - 1) == 0:  # log at 1, 2, 4, 8, ... errors
                        logger.exception("alerts %s: evaluation failed (%d errors so far)",
                                         target.key, self.errors)
                    continue
                done += 1
                budget -= 1
                progress = True
        return done

    def _evaluate(self, target: _Target, start: int, now: float) -> None:
        engine = target.engine
        assert engine is not None
        end = start + target.window_s
        try:
            samples = window_samples(self.store, target.model, target.model_version,
                                     engine.samplings, start, end)
            target.sample_failures = 0
        except Exception:
            target.sample_failures += 1
            if target.sample_failures < _MAX_SAMPLE_FAILURES:
                raise
            logger.exception("alerts %s: window %d failed %d times; evaluating it as "
                             "without data", target.key, start, target.sample_failures)
            target.sample_failures = 0
            samples = {}
        with self._lock:  # ListAlerts reads the engine from other threads
            transitions = engine.evaluate(start, end, samples)
        records = [self._record(target, t) for t in transitions if t.new_state in _NOTIFY]
        target.next_start = end
        target.unsaved += 1
        if records or target.unsaved >= _SNAPSHOT_EVERY \
                or self._next_window(target, now) is None:
            self._save(target, records)
        self.windows_evaluated += 1
        if records:
            notes = [self._notification(t.alert) for t in transitions
                     if t.new_state in _NOTIFY]
            self.notifications += len(notes)
            self.notifier.notify(notes)

    def _save(self, target: _Target, records: Sequence[AlertRecord]) -> None:
        engine = target.engine
        assert engine is not None and target.next_start is not None
        with self._lock:
            snapshot = json.dumps(engine.snapshot())
        # Still the leader of this tick's epoch right before the save (a round trip on the
        # lease's session): a replica whose lease session broke mid-tick must not store (and
        # then notify) windows the new leader evaluates too -- nor one that took the lease
        # again meanwhile (a new epoch), whose engine may be behind the store.
        epoch = self._try_lead()
        if not epoch or epoch != self._epoch:
            raise _LeaseLost(target.key)
        try:
            self.store.save_alert_window(target.model, target.model_version,
                                         float(target.next_start), snapshot, records)
        except Exception:
            # Back to the last stored state: the windows since are evaluated again next tick,
            # and their transitions are neither lost nor notified twice.
            with self._lock:
                target.engine = AlertEngine.restore(
                    target.rules, json.loads(target.saved_snapshot),
                    stale_s=self.config.stale_s, extra_labels=dict(engine.extra_labels))
                last = target.engine.last_window_end_s
                target.next_start = None if last is None else int(last)
            if target.next_start is None:
                target.engine = None  # no window stored yet: start over from the database
            target.unsaved = 0
            raise
        target.saved_snapshot = snapshot
        target.unsaved = 0

    def _save_if_unsaved(self, target: _Target) -> None:
        if target.unsaved:
            self._save(target, ())

    def _record(self, target: _Target, t: AlertTransition) -> AlertRecord:
        return _alert_record(target, t.alert, t.at_s, t.previous_state)

    def _notification(self, alert: Alert) -> Notification:
        return Notification(
            status="resolved" if alert.state == "resolved" else "firing",
            labels=alert.labels, annotations=alert.annotations,
            starts_at_s=alert.starts_at_s,
            ends_at_s=alert.ends_at_s if alert.state == "resolved" else None,
            fingerprint=alert.fingerprint, generator_url=self.config.external_url)

    # -- queries ---------------------------------------------------------------------------------

    def view(self, model: str = "", state: str = "", resolved_limit: int = 20) -> AlertsView:
        """Current alerts from the engines, resolved ones from the database's history."""
        if state and state not in STATES:
            raise ValidationError("state", f"must be one of {', '.join(STATES)} or empty, got "
                                  f"{state!r}")
        alerts: list[AlertRecord] = []
        budgets: list[ModelBudget] = []
        until: dict[str, float] = {}
        with self._lock:
            targets = sorted(self._targets.values(), key=lambda t: t.key)
            for t in targets:
                if t.engine is None or (model and t.model != model):
                    continue
                if t.engine.last_window_end_s is not None:
                    until[t.key] = t.engine.last_window_end_s
                at = t.engine.last_window_end_s or 0.0
                if state != "resolved":
                    for a in t.engine.alerts():
                        if a.state in ("pending", "firing") and state in ("", a.state):
                            alerts.append(_alert_record(t, a, at, ""))
                budgets.extend(ModelBudget(t.model, t.model_version, b)
                               for b in t.engine.budgets())
        if state in ("", "resolved"):
            alerts.extend(self.store.alert_history(model, "resolved", resolved_limit))
        return AlertsView(tuple(alerts), tuple(budgets), until)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="fleetwatch-alerts")
        self._thread.start()

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                done = self.tick()
            except Exception:  # never let the loop die: count, log, carry on
                self.errors += 1
                logger.exception("alert evaluation tick failed (%d errors so far)", self.errors)
                done = 0
            # A full tick means a backlog: yield briefly so queries get the GIL, then go on.
            delay = (self.config.tick_s / 10 if done >= self.config.max_windows_per_tick
                     else self.config.tick_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, then give the notifier ``timeout_s`` to deliver what is queued."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.notifier.close(max(0.0, deadline - time.monotonic()))


def _alert_record(target: _Target, alert: Alert, at_s: float, previous: str) -> AlertRecord:
    return AlertRecord(
        at_s=at_s, rule=alert.rule, kind=alert.kind, model=target.model,
        model_version=target.model_version, fingerprint=alert.fingerprint,
        previous_state=previous, state=alert.state, cohort=alert.cohort,
        severity=alert.severity, value=alert.value, threshold=alert.threshold,
        starts_at_s=alert.starts_at_s, ends_at_s=alert.ends_at_s,
        labels=dict(alert.labels), annotations=dict(alert.annotations))
