"""The alert engine: evaluates a :class:`RuleSet` once per closed window, in event time.

Example::

    engine = AlertEngine(load_rules_file("alerts.toml"))
    for start, end in closed_windows:
        samples = {by: cohort_samples(by, start, end) for by in engine.groupings}
        for t in engine.evaluate(start, end, samples):
            notify(t)                      # pending / firing / resolved changes only
    state = engine.snapshot()              # JSON-able; AlertEngine.restore(rules, state) later

Time is only what the caller passes (window bounds), never the wall clock, so replayed or
simulated traffic yields the same alerts as live traffic. Semantics: ``docs/alerts.md``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from aggregator.alerts.rules import (
    RuleSet,
    Sampling,
    SloRule,
    ThresholdRule,
    compare,
    format_duration,
)

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertState",
    "AlertTransition",
    "BudgetState",
    "CohortSample",
    "metric_value",
]

logger = logging.getLogger(__name__)

AlertState = Literal["inactive", "pending", "firing", "resolved"]
Cohort = tuple[tuple[str, str], ...]
SNAPSHOT_VERSION = 1
_SEVERITY_RANK = {"ticket": 1, "page": 2}
_NAN = float("nan")


@dataclass(frozen=True)
class CohortSample:
    """One cohort's SLIs for one window: ``cohort`` maps the grouping's keys to values.

    ``metrics`` maps SLI names (``"latency_p95_ms"``), ``"psi:FEATURE"`` scores and
    ``"drifting:FEATURE"`` flags (1.0 / 0.0) to values; NaN or absent means unknown.
    """

    cohort: Mapping[str, str]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Alert:
    """One alert of a rule for one cohort, as it stands (a frozen view of engine state)."""

    rule: str
    kind: Literal["threshold", "slo"]
    cohort: Cohort
    severity: str
    state: AlertState
    value: float
    threshold: float
    starts_at_s: float
    ends_at_s: float | None
    fingerprint: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class AlertTransition:
    """A change of an alert: ``previous_state -> new_state`` at event time ``at_s``.

    ``firing -> firing`` is a severity escalation (an SLO alert going from ticket to page).
    ``pending -> inactive`` is a breach that ended before ``for`` elapsed (nothing to notify).
    """

    alert: Alert
    previous_state: AlertState
    new_state: AlertState
    at_s: float


@dataclass(frozen=True)
class BudgetState:
    """An SLO's error budget and burn rates for one cohort, as of the last evaluated window."""

    slo: str
    cohort: Cohort
    windows: int
    bad: int
    budget: float
    left_fraction: float
    burn_rates: Mapping[str, float]
    period_s: float


def metric_value(metrics: Mapping[str, float], metric: str) -> float:
    """The value of ``metric`` in a sample; NaN when unknown.

    ``psi:*`` is the largest known ``psi:FEATURE``; ``drifting:*`` is 1.0 when any
    ``drifting:FEATURE`` flag is set, 0.0 when flags are known and none is set. A sample may
    also carry ``psi:*`` / ``drifting:*`` itself, which then wins.
    """
    if metric in metrics:
        value = metrics[metric]
        return _NAN if value is None else float(value)
    if metric in ("psi:*", "drifting:*"):
        prefix = metric[:-1]
        known = [float(v) for k, v in metrics.items()
                 if k.startswith(prefix) and v is not None and not math.isnan(float(v))]
        if not known:
            return _NAN
        if metric == "psi:*":
            return max(known)
        return 1.0 if any(v > 0.0 for v in known) else 0.0
    return _NAN


def _fingerprint(rule: str, cohort: Cohort, extra: Cohort = ()) -> str:
    """Stable per (rule, cohort): hash of alertname, cohort and extra labels, not of severity.

    ``extra`` (the engine's own labels, e.g. model) is hashed after the cohort, so an engine
    without extra labels keeps the fingerprints of earlier releases.
    """
    text = "\x1f".join([f"alertname={rule}", *(f"{k}={v}" for k, v in cohort),
                        *(f"{k}={v}" for k, v in extra)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.6g}"


# -- per (rule, cohort) state ------------------------------------------------------------------


@dataclass
class _Active:
    """A pending or firing alert."""

    state: AlertState
    severity: str
    since_s: float
    value: float
    threshold: float
    last_known_s: float


class _Ring:
    """(window_end, bad) pairs for the last ``span_s``, with O(log n) window counts."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.ends: list[float] = []
        self.cum: list[int] = []   # cumulative bad count through each entry
        self.lo = 0

    def add(self, end_s: float, bad: bool) -> None:
        self.ends.append(end_s)
        self.cum.append((self.cum[-1] if self.cum else 0) + int(bad))

    def prune(self, now_s: float) -> None:
        self.lo = bisect_right(self.ends, now_s - self.span_s, lo=self.lo)
        if self.lo > 256 and 2 * self.lo > len(self.ends):
            base = self.cum[self.lo - 1]
            self.ends = self.ends[self.lo:]
            self.cum = [c - base for c in self.cum[self.lo:]]
            self.lo = 0

    def counts(self, now_s: float, window_s: float) -> tuple[int, int]:
        """(windows, bad windows) with end in ``(now - window_s, now]``."""
        i = bisect_right(self.ends, now_s - window_s, lo=self.lo)
        n = len(self.ends) - i
        if n <= 0:
            return 0, 0
        before = self.cum[i - 1] if i > 0 else 0
        return n, self.cum[-1] - before

    def __len__(self) -> int:
        return len(self.ends) - self.lo

    def dump(self) -> dict[str, Any]:
        ends = self.ends[self.lo:]
        bad = [self.cum[i] - (self.cum[i - 1] if i > 0 else 0)
               for i in range(self.lo, len(self.ends))]
        return {"ends": ends, "bad": bad}

    @classmethod
    def load(cls, span_s: float, data: Mapping[str, Any]) -> _Ring:
        ring = cls(span_s)
        for end, bad in zip(data["ends"], data["bad"], strict=True):
            ring.add(float(end), bool(bad))
        return ring


@dataclass
class _Budget:
    """Window counts over an SLO period in fixed buckets: deque of [bucket, windows, bad]."""

    bucket_s: float
    buckets: deque[list[int]] = field(default_factory=deque)

    def add(self, end_s: float, bad: bool) -> None:
        b = math.ceil(end_s / self.bucket_s)   # bucket b holds ends in ((b-1)*B, b*B]
        if self.buckets and self.buckets[-1][0] == b:
            self.buckets[-1][1] += 1
            self.buckets[-1][2] += int(bad)
        else:
            self.buckets.append([b, 1, int(bad)])

    def prune(self, now_s: float, period_s: float) -> None:
        # drop a bucket once all the ends it may hold are at or before now - period
        while self.buckets and self.buckets[0][0] * self.bucket_s <= now_s - period_s:
            self.buckets.popleft()

    def totals(self) -> tuple[int, int]:
        return sum(b[1] for b in self.buckets), sum(b[2] for b in self.buckets)


@dataclass
class _SloCohort:
    ring: _Ring
    budget: _Budget
    active: _Active | None = None


# -- the engine --------------------------------------------------------------------------------


class AlertEngine:
    """Threshold and SLO alerting over closed windows, one alert per (rule, cohort).

    ``stale_s``: a threshold rule's cohort with no known value for this long (event time)
    drops its pending alert and resolves its firing one. ``budget_bucket_s``: granularity of
    the error-budget counts (the period's oldest bucket is dropped whole). ``keep_resolved``:
    how many resolved alerts :meth:`alerts` remembers. ``extra_labels``: added to every
    alert's labels and fingerprint (the server passes ``model`` and ``model_version``, one
    engine per model version); they may not clash with a rule's ``by`` keys.
    """

    def __init__(self, rules: RuleSet, *, stale_s: float = 900.0,
                 budget_bucket_s: float = 3600.0, keep_resolved: int = 1000,
                 extra_labels: Mapping[str, str] | None = None) -> None:
        if stale_s <= 0 or budget_bucket_s <= 0:
            raise ValueError("stale_s and budget_bucket_s must be positive")
        extra = tuple(sorted((extra_labels or {}).items()))
        clash = {k for k, _ in extra} & {k for by in rules.groupings for k in by} \
            | {k for k, _ in extra} & {"alertname", "severity"}
        if clash:
            raise ValueError(f"extra_labels {sorted(clash)} clash with the alerts' own labels")
        self.extra_labels: Cohort = extra
        self.rules = rules
        self.stale_s = stale_s
        self.budget_bucket_s = budget_bucket_s
        self._threshold: dict[str, dict[Cohort, _Active]] = {r.name: {} for r in rules.rules}
        self._slo: dict[str, dict[Cohort, _SloCohort]] = {s.name: {} for s in rules.slos}
        self._resolved: deque[Alert] = deque(maxlen=keep_resolved)
        self._last_end_s: float | None = None
        self._window_s: float = 0.0   # the evaluated windows' length (burn-rate spans)

    @property
    def groupings(self) -> frozenset[tuple[str, ...]]:
        """The ``by`` tuples :meth:`evaluate` wants samples for (sorted label keys)."""
        return self.rules.groupings

    @property
    def samplings(self) -> frozenset[Sampling]:
        """What :meth:`evaluate` wants samples for: each (``by``, ``over``) the rules use."""
        return self.rules.samplings

    @property
    def last_window_end_s(self) -> float | None:
        return self._last_end_s

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, window_start_s: float, window_end_s: float,
                 samples: Mapping[Any, Iterable[CohortSample]]
                 ) -> list[AlertTransition]:
        """Evaluate every rule on one closed window ``[window_start_s, window_end_s)``.

        ``samples`` maps each :class:`Sampling` in :attr:`samplings` to its cohort samples for
        this window (computed over the window, or over the last ``over_s`` of windows up to its
        end); a sampling with ``over_s`` 0 may instead be keyed by its ``by`` tuple alone. A
        missing sampling or cohort means no data. Windows must come in increasing end order.
        Returns the alert state changes, in rule order.
        """
        if not window_start_s < window_end_s:
            raise ValueError(f"window start {window_start_s} is not before end {window_end_s}")
        if self._last_end_s is not None and window_end_s <= self._last_end_s:
            raise ValueError(f"window end {window_end_s} is not after the last evaluated "
                             f"window end {self._last_end_s}")
        rows: dict[Sampling, dict[Cohort, Mapping[str, float]]] = {}
        for sampling in self.samplings:
            by = sampling.by
            group: dict[Cohort, Mapping[str, float]] = {}
            given = samples.get(sampling)  # type: ignore[call-overload]
            if given is None and sampling.over_s == 0:
                given = samples.get(by)  # keyed by the grouping alone: the window itself
            for sample in given or ():
                try:
                    cohort = tuple((k, str(sample.cohort[k])) for k in by)
                except KeyError as exc:
                    raise ValueError(f"sample for grouping {by} lacks label key {exc}") from None
                if cohort in group:
                    raise ValueError(f"two samples for cohort {dict(cohort)} in one window")
                group[cohort] = sample.metrics
            rows[sampling] = group
        self._window_s = window_end_s - window_start_s
        out: list[AlertTransition] = []
        for rule in self.rules.rules:
            self._eval_threshold(rule, rows[rule.sampling], window_start_s, window_end_s, out)
        for slo in self.rules.slos:
            self._eval_slo(slo, rows[slo.sampling], window_start_s, window_end_s, out)
        self._last_end_s = window_end_s
        for t in out:
            if t.new_state in ("firing", "resolved"):
                logger.info("alert %s %s -> %s (%s)", t.alert.rule, t.previous_state,
                            t.new_state, t.alert.fingerprint)
        return out

    def _eval_threshold(self, rule: ThresholdRule, group: Mapping[Cohort, Mapping[str, float]],
                        start_s: float, end_s: float, out: list[AlertTransition]) -> None:
        states = self._threshold[rule.name]
        for cohort in sorted(set(group) | set(states)):
            value = metric_value(group[cohort], rule.metric) if cohort in group else _NAN
            st = states.get(cohort)
            if math.isnan(value):
                if st is not None and end_s - st.last_known_s >= self.stale_s:
                    del states[cohort]
                    if st.state == "firing":
                        self._resolve(rule, cohort, st, st.last_known_s, end_s, out)
                    else:
                        self._emit(rule, cohort, st, "pending", "inactive", None, end_s, out)
                continue
            breach = compare(rule.op, value, rule.threshold)
            past_clear = not compare(rule.op, value, rule.clear)
            previous: AlertState = "inactive"
            if st is None:
                if not breach:
                    continue
                st = _Active("pending", rule.severity, start_s, value, rule.threshold, end_s)
                states[cohort] = st
            else:
                previous = st.state
                st.value, st.last_known_s = value, end_s
            if st.state == "pending":
                # `for` asks for a continuous breach: any window that does not breach ends a
                # pending alert (hysteresis only keeps a FIRING alert from flapping).
                if not breach:
                    del states[cohort]
                    self._emit(rule, cohort, st, "pending", "inactive", None, end_s, out)
                elif breach and end_s - st.since_s >= rule.for_s:
                    st.state = "firing"
                    self._emit(rule, cohort, st, previous, "firing", None, end_s, out)
                elif previous == "inactive":
                    self._emit(rule, cohort, st, "inactive", "pending", None, end_s, out)
            elif past_clear:   # firing
                del states[cohort]
                self._resolve(rule, cohort, st, start_s, end_s, out)

    def _eval_slo(self, slo: SloRule, group: Mapping[Cohort, Mapping[str, float]],
                  start_s: float, end_s: float, out: list[AlertTransition]) -> None:
        states = self._slo[slo.name]
        span_s = max(w.long_s for w in slo.windows)
        for cohort in sorted(set(group) | set(states)):
            st = states.get(cohort)
            value = metric_value(group[cohort], slo.metric) if cohort in group else _NAN
            if not math.isnan(value):
                if st is None:
                    st = states[cohort] = _SloCohort(_Ring(span_s), _Budget(self.budget_bucket_s))
                bad = not compare(slo.op, value, slo.objective)
                st.ring.add(end_s, bad)
                st.budget.add(end_s, bad)
            if st is None:
                continue
            st.ring.prune(end_s)
            st.budget.prune(end_s, slo.period_s)
            holding = self._burning(slo, st.ring, end_s)
            if holding is not None:
                severity, burn, rate = holding
                if st.active is None:
                    st.active = _Active("firing", severity, start_s, burn, rate, end_s)
                    self._emit(slo, cohort, st.active, "inactive", "firing", None, end_s, out)
                else:
                    escalate = _SEVERITY_RANK[severity] > _SEVERITY_RANK[st.active.severity]
                    st.active.value, st.active.threshold = burn, rate
                    st.active.last_known_s = end_s
                    if escalate:
                        st.active.severity = severity
                        self._emit(slo, cohort, st.active, "firing", "firing", None, end_s, out)
            elif st.active is not None:
                active, st.active = st.active, None
                self._resolve(slo, cohort, active, start_s, end_s, out)
            if st.active is None and len(st.ring) == 0 and not st.budget.buckets:
                del states[cohort]

    def _burn(self, slo: SloRule, ring: _Ring, now_s: float, window_s: float) -> float:
        """(bad windows / the windows the burn window spans) / budget fraction.

        The span, not just the windows seen: a new cohort (or a new engine) whose first window
        is bad has burned one window of an hour's budget, not 100 % of it, and must not page
        at once. Windows without a known value count as good here (at least the windows
        counted are used, should a span hold more of them)."""
        n, bad = ring.counts(now_s, window_s)
        span = window_s / self._window_s if self._window_s else 0.0
        denominator = max(float(n), span)
        return 0.0 if denominator <= 0 else (bad / denominator) / slo.budget_fraction

    def _burning(self, slo: SloRule, ring: _Ring, now_s: float
                 ) -> tuple[str, float, float] | None:
        """(severity, long-window burn, burn threshold) of the most severe condition holding."""
        best: tuple[str, float, float] | None = None
        for w in slo.windows:
            long_burn = self._burn(slo, ring, now_s, w.long_s)
            if long_burn > w.burn_rate and self._burn(slo, ring, now_s, w.short_s) > w.burn_rate:
                if best is None or _SEVERITY_RANK[w.severity] > _SEVERITY_RANK[best[0]]:
                    best = (w.severity, long_burn, w.burn_rate)
        return best

    # -- alerts --------------------------------------------------------------------------------

    def _alert(self, rule: ThresholdRule | SloRule, cohort: Cohort, st: _Active,
               state: AlertState, ends_at_s: float | None) -> Alert:
        labels = {"alertname": rule.name, "severity": st.severity, **dict(cohort),
                  **dict(self.extra_labels)}
        where = ", ".join(f"{k}={v}" for k, v in cohort) or "fleet"
        if isinstance(rule, ThresholdRule):
            kind: Literal["threshold", "slo"] = "threshold"
            default = f"{rule.metric} {rule.op} {rule.threshold:g} ({where})"
        else:
            kind = "slo"
            default = (f"SLO {rule.name} ({rule.metric} {rule.op} {rule.objective:g} in "
                       f"{rule.target:.4g} of windows) burning its budget at "
                       f"{st.value:.3g}x ({where})")
        annotations = {"summary": rule.summary or default, "value": _fmt(st.value),
                       "threshold": _fmt(st.threshold)}
        if rule.runbook:
            annotations["runbook_url"] = rule.runbook
        return Alert(rule=rule.name, kind=kind, cohort=cohort, severity=st.severity,
                     state=state, value=st.value, threshold=st.threshold,
                     starts_at_s=st.since_s, ends_at_s=ends_at_s,
                     fingerprint=_fingerprint(rule.name, cohort, self.extra_labels),
                     labels=MappingProxyType(labels), annotations=MappingProxyType(annotations))

    def _emit(self, rule: ThresholdRule | SloRule, cohort: Cohort, st: _Active,
              previous: AlertState, new: AlertState, ends_at_s: float | None, at_s: float,
              out: list[AlertTransition]) -> None:
        alert = self._alert(rule, cohort, st, new, ends_at_s)
        out.append(AlertTransition(alert, previous, new, at_s))

    def _resolve(self, rule: ThresholdRule | SloRule, cohort: Cohort, st: _Active,
                 ends_at_s: float, at_s: float, out: list[AlertTransition]) -> None:
        self._emit(rule, cohort, st, "firing", "resolved", ends_at_s, at_s, out)
        self._resolved.append(out[-1].alert)

    def alerts(self, state: AlertState | None = None) -> list[Alert]:
        """Pending and firing alerts, then remembered resolved ones; or only those in ``state``."""
        found: list[Alert] = []
        for rule in self.rules.rules:
            for cohort, st in sorted(self._threshold[rule.name].items()):
                found.append(self._alert(rule, cohort, st, st.state, None))
        for slo in self.rules.slos:
            for cohort, sc in sorted(self._slo[slo.name].items()):
                if sc.active is not None:
                    found.append(self._alert(slo, cohort, sc.active, "firing", None))
        found.extend(self._resolved)
        return [a for a in found if state is None or a.state == state]

    def budgets(self) -> list[BudgetState]:
        """Error budget and burn rates per (SLO, cohort) as of the last evaluated window."""
        out = []
        now = self._last_end_s
        for slo in self.rules.slos:
            spans = sorted({s for w in slo.windows for s in (w.short_s, w.long_s)})
            for cohort, sc in sorted(self._slo[slo.name].items()):
                windows, bad = sc.budget.totals()
                budget = slo.budget_fraction * windows
                left = 1.0 if windows == 0 else 1.0 - bad / budget
                burns = {format_duration(s): (self._burn(slo, sc.ring, now, s)
                                              if now is not None else 0.0) for s in spans}
                out.append(BudgetState(slo.name, cohort, windows, bad, budget, left,
                                       MappingProxyType(burns), slo.period_s))
        return out

    # -- persistence ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The engine's state as a JSON-able dict (for the server's database)."""

        def active(st: _Active | None) -> dict[str, Any] | None:
            if st is None:
                return None
            return {"state": st.state, "severity": st.severity, "since_s": st.since_s,
                    "value": None if math.isnan(st.value) else st.value,
                    "threshold": st.threshold, "last_known_s": st.last_known_s}

        return {
            "version": SNAPSHOT_VERSION,
            "last_end_s": self._last_end_s,
            "window_s": self._window_s,
            "budget_bucket_s": self.budget_bucket_s,
            "threshold": {name: [{"cohort": [list(p) for p in c], "active": active(st)}
                                 for c, st in sorted(states.items())]
                          for name, states in self._threshold.items()},
            "slo": {name: [{"cohort": [list(p) for p in c], "active": active(sc.active),
                            "ring": sc.ring.dump(),
                            "buckets": [list(b) for b in sc.budget.buckets]}
                           for c, sc in sorted(states.items())]
                    for name, states in self._slo.items()},
        }

    @classmethod
    def restore(cls, rules: RuleSet, data: Mapping[str, Any], **kwargs: Any) -> AlertEngine:
        """An engine for ``rules`` continuing from :meth:`snapshot` output.

        State of rules no longer in ``rules`` is dropped (logged); rules new in ``rules``
        start empty.
        """
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported alert engine snapshot version {data.get('version')!r}")
        engine = cls(rules, **kwargs)
        engine._last_end_s = data.get("last_end_s")
        engine._window_s = float(data.get("window_s") or 0.0)

        def active(raw: Mapping[str, Any] | None) -> _Active | None:
            if raw is None:
                return None
            value = _NAN if raw["value"] is None else float(raw["value"])
            return _Active(raw["state"], raw["severity"], float(raw["since_s"]), value,
                           float(raw["threshold"]), float(raw["last_known_s"]))

        def cohort(raw: list[list[str]]) -> Cohort:
            return tuple((str(k), str(v)) for k, v in raw)

        for name, entries in data.get("threshold", {}).items():
            if name not in engine._threshold:
                logger.warning("alert snapshot: dropping state of unknown rule %r", name)
                continue
            for e in entries:
                st = active(e["active"])
                if st is not None:
                    engine._threshold[name][cohort(e["cohort"])] = st
        slos = {s.name: s for s in rules.slos}
        for name, entries in data.get("slo", {}).items():
            if name not in slos:
                logger.warning("alert snapshot: dropping state of unknown SLO %r", name)
                continue
            span_s = max(w.long_s for w in slos[name].windows)
            for e in entries:
                budget = _Budget(float(data.get("budget_bucket_s", engine.budget_bucket_s)),
                                 deque([int(x) for x in b] for b in e["buckets"]))
                engine._slo[name][cohort(e["cohort"])] = _SloCohort(
                    _Ring.load(span_s, e["ring"]), budget, active(e["active"]))
        return engine
