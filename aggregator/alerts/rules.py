"""Alert rules: threshold rules and SLO rules, read from TOML and validated at load.

Example::

    rules = load_rules_file("alerts.toml", known_label_keys={"region", "hardware"})
    engine = AlertEngine(rules)

A rule file holds ``[[rule]]`` tables (a threshold on an SLI or a drift score, with ``for`` and
hysteresis) and ``[[slo]]`` tables (an objective per window, a target fraction of good windows,
multi-window multi-burn-rate alerting). Every error is a :class:`RuleError` naming the file,
the line and the rule. The format is documented in ``docs/alerts.md``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

__all__ = [
    "DEFAULT_BURN_WINDOWS",
    "DEFAULT_PERIOD_S",
    "OPS",
    "SEVERITIES",
    "SLI_METRICS",
    "BurnWindow",
    "RuleError",
    "RuleSet",
    "Sampling",
    "SloRule",
    "ThresholdRule",
    "compare",
    "format_duration",
    "load_rules",
    "load_rules_file",
    "parse_duration",
]

SLI_METRICS = frozenset({
    "events", "devices", "error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "availability", "accuracy", "precision", "recall", "f1", "brier", "ece", "mae", "rmse",
    "label_latency_p50_s", "label_latency_p95_s", "positive_rate", "labeled", "heartbeats",
    "withheld_reports",
})
"""SLI names a rule may name directly (besides ``psi:FEATURE``, ``psi:*``, ``drifting:…``)."""

DRIFT_PREFIXES = ("psi:", "drifting:")
OPS = (">", ">=", "<", "<=")
SEVERITIES = ("page", "ticket")
DEFAULT_PERIOD_S = 30 * 86400.0
# The alert's own labels: the server adds model and model_version to every alert it raises.
RESERVED_LABELS = frozenset({"alertname", "severity", "model", "model_version"})


def compare(op: str, value: float, threshold: float) -> bool:
    """``value op threshold``; False whenever ``value`` is NaN (unknown never breaches)."""
    if op == ">":
        return value > threshold
    if op == ">=":
        return value >= threshold
    if op == "<":
        return value < threshold
    if op == "<=":
        return value <= threshold
    raise ValueError(f"unknown comparison operator {op!r}")


class RuleError(ConfigError):
    """A rule file that cannot be used (a ``ConfigError``, so a ``ValueError``).

    Names the file, line, rule and key when known: ``.source``, ``.line``, ``.rule``, ``.key``,
    and ``.reason`` (the message without the location).
    """

    def __init__(self, reason: str, *, source: str = "<rules>", line: int | None = None,
                 rule: str | None = None, key: str | None = None) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        self.rule = rule
        self.key = key
        where = f"{source}:{line}" if line is not None else source
        who = f"rule {rule!r}: " if rule else ""
        super().__init__(f"{where}: {who}{reason}")


# -- durations ---------------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"90s"``, ``"5m"``, ``"1h30m"``, ``"30d"`` (``"0"`` is 0).

    >>> parse_duration("1h30m")
    5400.0
    """
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string such as '5m', not {text!r}")
    s = text.strip()
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"bad duration {text!r} (expected e.g. '90s', '5m', '1h30m', '30d')")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError("empty duration")
    return total


def format_duration(seconds: float) -> str:
    """The shortest text for a duration: ``3600`` -> ``"1h"``, ``5400`` -> ``"1h30m"``."""
    if seconds <= 0:
        return "0s"
    parts = []
    rest = float(seconds)
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        n = math.floor(rest / size + 1e-9)
        if n:
            parts.append(f"{n}{unit}")
            rest -= n * size
    if rest > 1e-9:
        parts.append(f"{rest:g}s")
    return "".join(parts)


# -- rule types --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BurnWindow:
    """Alert when the burn rate over both ``long_s`` and ``short_s`` exceeds ``burn_rate``."""

    severity: str
    long_s: float
    short_s: float
    burn_rate: float


DEFAULT_BURN_WINDOWS = (
    BurnWindow("page", long_s=3600.0, short_s=300.0, burn_rate=14.4),
    BurnWindow("ticket", long_s=6 * 3600.0, short_s=1800.0, burn_rate=6.0),
)


@dataclass(frozen=True)
class Sampling:
    """How a rule's metric is sampled: per cohort of the ``by`` keys, over the last ``over_s``
    seconds of windows (0: the window being evaluated alone).

    Short windows make noisy metrics: under privacy noise a one-minute window of a small
    cohort may be too small to judge drift or accuracy at all, while the last 15 minutes can.
    """

    by: tuple[str, ...]
    over_s: float = 0.0


@dataclass(frozen=True)
class ThresholdRule:
    """Alert while ``metric op threshold`` has held for ``for_s`` of event time, per cohort.

    The alert resolves once the value is past ``clear`` (hysteresis: ``value op clear`` is
    false); between ``clear`` and ``threshold`` nothing changes.
    """

    name: str
    metric: str
    op: str
    threshold: float
    clear: float
    for_s: float = 0.0
    by: tuple[str, ...] = ()
    severity: str = "ticket"
    runbook: str | None = None
    summary: str | None = None
    model: str | None = None
    line: int | None = None
    # The metric of the window ending at t is computed over [t - over_s, t) (0: that window).
    over_s: float = 0.0

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.by, self.over_s)


@dataclass(frozen=True)
class SloRule:
    """A window is good when ``metric op objective``; ``target`` of the windows should be good.

    ``windows`` are the burn-rate alert conditions (page first); the error budget is counted
    over ``period_s``.
    """

    name: str
    metric: str
    op: str
    objective: float
    target: float
    by: tuple[str, ...] = ()
    period_s: float = DEFAULT_PERIOD_S
    windows: tuple[BurnWindow, ...] = DEFAULT_BURN_WINDOWS
    runbook: str | None = None
    summary: str | None = None
    model: str | None = None
    line: int | None = None
    over_s: float = 0.0

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.by, self.over_s)

    @property
    def budget_fraction(self) -> float:
        """The fraction of windows allowed to be bad: ``1 - target``."""
        return 1.0 - self.target


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file, in file order."""

    rules: tuple[ThresholdRule, ...] = ()
    slos: tuple[SloRule, ...] = ()

    def for_model(self, model: str) -> RuleSet:
        """The rules that apply to ``model``: those without a ``model`` key, and its own."""
        return RuleSet(rules=tuple(r for r in self.rules if r.model in (None, model)),
                       slos=tuple(s for s in self.slos if s.model in (None, model)))

    @property
    def groupings(self) -> frozenset[tuple[str, ...]]:
        """Every ``by`` the rules use (sorted key tuples): the cohort groupings to sample."""
        return frozenset(r.by for r in (*self.rules, *self.slos))

    @property
    def samplings(self) -> frozenset[Sampling]:
        """Every (``by``, ``over``) the rules use: what to sample for each window."""
        return frozenset(r.sampling for r in (*self.rules, *self.slos))


# -- loading -----------------------------------------------------------------------------------

_THRESHOLD_KEYS = frozenset({"name", "metric", "op", "threshold", "clear", "for", "by",
                             "severity", "runbook", "summary", "model", "over"})
_SLO_KEYS = frozenset({"name", "metric", "objective", "target", "by", "period", "runbook",
                       "summary", "page", "ticket", "model", "over"})
MAX_OVER_S = 7 * 86400.0
_BURN_KEYS = frozenset({"long", "short", "burn"})
_OBJECTIVE = re.compile(r"^\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_HEADER = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.\"'-]+)\s*\]\]")
_ANY_HEADER = re.compile(r"^\s*\[")


class _Lines:
    """Line numbers recovered by scanning the text (tomllib reports no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: dict[str, list[int]] = {}
        self.starts: list[int] = []
        for i, raw in enumerate(self.lines, start=1):
            if _ANY_HEADER.match(raw):
                self.starts.append(i)
            m = _HEADER.match(raw)
            if m:
                self.headers.setdefault(m.group(1).strip("\"'"), []).append(i)

    def table(self, kind: str, index: int) -> int | None:
        found = self.headers.get(kind, [])
        return found[index] if index < len(found) else None

    def key(self, table_line: int | None, key: str) -> int | None:
        if table_line is None:
            return None
        end = next((s for s in self.starts if s > table_line), len(self.lines) + 1)
        pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
                             r"\s*[=.]")
        for i in range(table_line + 1, end):
            if pattern.match(self.lines[i - 1]):
                return i
        return table_line

    def top_level(self, key: str) -> int | None:
        pattern = re.compile(rf"^\s*(?:\[\[?\s*)?[\"']?{re.escape(key)}[\"']?\s*[\]=.]")
        for i, raw in enumerate(self.lines, start=1):
            if pattern.match(raw):
                return i
        return None


class _Table:
    """One ``[[rule]]`` / ``[[slo]]`` table being read, with error helpers."""

    def __init__(self, data: Mapping[str, Any], kind: str, line: int | None, lines: _Lines,
                 source: str) -> None:
        self.data = data
        self.kind = kind
        self.line = line
        self.lines = lines
        self.source = source
        name = data.get("name")
        self.name = name if isinstance(name, str) else None

    def error(self, reason: str, key: str | None = None) -> RuleError:
        line = self.lines.key(self.line, key) if key else self.line
        return RuleError(reason, source=self.source, line=line, rule=self.name, key=key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise self.error(f"missing required key {key!r}")
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value:
            raise self.error(f"{key!r} must be a non-empty string, not {value!r}", key)
        return value

    def number(self, key: str, default: float | None = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise self.error(f"missing required key {key!r}")
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise self.error(f"{key!r} must be a finite number, not {value!r}", key)
        return float(value)

    def duration(self, key: str, default: float) -> float:
        if key not in self.data:
            return default
        try:
            return parse_duration(self.data[key])
        except ValueError as exc:
            raise self.error(str(exc), key) from None


def _check_metric(t: _Table, metric: str, known_features: Collection[str] | None) -> None:
    for prefix in DRIFT_PREFIXES:
        if metric.startswith(prefix):
            feature = metric[len(prefix):]
            if not feature:
                raise t.error(f"metric {metric!r} names no feature (use '{prefix}*' for any)",
                              "metric")
            if feature != "*" and known_features is not None and feature not in known_features:
                raise t.error(f"metric {metric!r}: unknown feature {feature!r} "
                              f"(known: {', '.join(sorted(known_features)) or 'none'})", "metric")
            return
    if metric not in SLI_METRICS:
        raise t.error(f"unknown metric {metric!r} (known: {', '.join(sorted(SLI_METRICS))}, "
                      "psi:FEATURE, psi:*, drifting:FEATURE, drifting:*)", "metric")


def _check_common(t: _Table, allowed: frozenset[str],
                  known_label_keys: Collection[str] | None,
                  known_features: Collection[str] | None) -> tuple[str, str, tuple[str, ...]]:
    name = t.string("name", required=True)
    unknown = sorted(set(t.data) - allowed)
    if unknown:
        raise t.error(f"unknown key {unknown[0]!r} in [[{t.kind}]] "
                      f"(allowed: {', '.join(sorted(allowed))})", unknown[0])
    metric = t.string("metric", required=True)
    _check_metric(t, metric, known_features)
    by_raw = t.data.get("by", [])
    if not isinstance(by_raw, list) or not all(isinstance(k, str) and k for k in by_raw):
        raise t.error(f"'by' must be a list of label keys, not {by_raw!r}", "by")
    if len(set(by_raw)) != len(by_raw):
        raise t.error(f"'by' repeats a key: {by_raw!r}", "by")
    for k in by_raw:
        if k in RESERVED_LABELS:
            raise t.error(f"'by' key {k!r} is reserved for the alert's own labels", "by")
        if known_label_keys is not None and k not in known_label_keys:
            raise t.error(f"cohort key {k!r} is not a label of any device (known: "
                          f"{', '.join(sorted(known_label_keys)) or 'none'})", "by")
    return name, metric, tuple(sorted(by_raw))


def _threshold_rule(t: _Table, known_label_keys: Collection[str] | None,
                    known_features: Collection[str] | None) -> ThresholdRule:
    name, metric, by = _check_common(t, _THRESHOLD_KEYS, known_label_keys, known_features)
    op = t.string("op", required=True)
    if op not in OPS:
        raise t.error(f"bad op {op!r} (one of {', '.join(OPS)})", "op")
    threshold = t.number("threshold", required=True)
    clear = t.number("clear", threshold)
    if op in (">", ">=") and clear > threshold:
        raise t.error(f"clear {clear:g} must not be above threshold {threshold:g} for op {op!r}",
                      "clear")
    if op in ("<", "<=") and clear < threshold:
        raise t.error(f"clear {clear:g} must not be below threshold {threshold:g} for op {op!r}",
                      "clear")
    severity = t.string("severity", "ticket")
    if severity not in SEVERITIES:
        raise t.error(f"bad severity {severity!r} (one of {', '.join(SEVERITIES)})", "severity")
    return ThresholdRule(
        name=name, metric=metric, op=op, threshold=threshold, clear=clear,
        for_s=t.duration("for", 0.0), by=by, severity=severity, runbook=t.string("runbook"),
        summary=t.string("summary"), line=t.line, over_s=_over(t))


def _over(t: _Table) -> float:
    over_s = t.duration("over", 0.0)
    if not 0 <= over_s <= MAX_OVER_S:
        raise t.error(f"over must be between 0 and {format_duration(MAX_OVER_S)}, not "
                      f"{format_duration(over_s)}", "over")
    return over_s


def _burn_window(t: _Table, key: str, default: BurnWindow, period_s: float) -> BurnWindow:
    raw = t.data.get(key)
    if raw is None:
        window = default
    else:
        if not isinstance(raw, dict):
            raise t.error(f"{key!r} must be a table {{long, short, burn}}, not {raw!r}", key)
        unknown = sorted(set(raw) - _BURN_KEYS)
        if unknown:
            raise t.error(f"unknown key {unknown[0]!r} in {key!r} (allowed: burn, long, short)",
                          key)
        try:
            long_s = parse_duration(raw["long"]) if "long" in raw else default.long_s
            short_s = parse_duration(raw["short"]) if "short" in raw else default.short_s
        except ValueError as exc:
            raise t.error(f"{key}: {exc}", key) from None
        burn = raw.get("burn", default.burn_rate)
        if isinstance(burn, bool) or not isinstance(burn, int | float) or not burn > 0:
            raise t.error(f"{key}.burn must be a positive number, not {burn!r}", key)
        window = BurnWindow(key, long_s=long_s, short_s=short_s, burn_rate=float(burn))
    if not 0 < window.short_s < window.long_s:
        raise t.error(f"{key}: short window must be positive and shorter than the long one", key)
    if window.long_s > period_s:
        raise t.error(f"{key}: long window {format_duration(window.long_s)} exceeds the period "
                      f"{format_duration(period_s)}", key if key in t.data else "period")
    return window


def _slo_rule(t: _Table, known_label_keys: Collection[str] | None,
              known_features: Collection[str] | None) -> SloRule:
    name, metric, by = _check_common(t, _SLO_KEYS, known_label_keys, known_features)
    objective_text = t.string("objective", required=True)
    m = _OBJECTIVE.match(objective_text)
    if m is None:
        raise t.error(f"bad objective {objective_text!r} (expected e.g. '< 0.001' or '>= 0.95')",
                      "objective")
    target = t.number("target", required=True)
    if not 0.0 < target < 1.0:
        raise t.error(f"target {target:g} must lie strictly between 0 and 1", "target")
    period_s = t.duration("period", DEFAULT_PERIOD_S)
    if period_s <= 0:
        raise t.error("period must be positive", "period")
    defaults = {w.severity: w for w in DEFAULT_BURN_WINDOWS}
    windows = tuple(_burn_window(t, sev, defaults[sev], period_s) for sev in SEVERITIES)
    return SloRule(
        name=name, metric=metric, op=m.group(1), objective=float(m.group(2)), target=target,
        by=by, period_s=period_s, windows=windows, runbook=t.string("runbook"),
        summary=t.string("summary"), line=t.line, over_s=_over(t))


def load_rules(text: str, *, source: str = "<rules>",
               known_label_keys: Collection[str] | None = None,
               known_features: Collection[str] | None = None,
               known_models: Collection[str] | None = None) -> RuleSet:
    """Parse and validate a rule file's text.

    ``known_label_keys`` (the label keys the fleet's devices have), ``known_features`` (the
    spec's feature names) and ``known_models`` (the registered models) are checked against
    ``by``, ``psi:FEATURE`` and ``model`` when given.
    Raises :class:`RuleError` naming the rule and the line.

    Example::

        rules = load_rules(path.read_text(), source=str(path), known_label_keys={"region"})
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise RuleError(f"not valid TOML: {exc}", source=source,
                        line=int(m.group(1)) if m else None) from None
    lines = _Lines(text)
    for key in doc:
        if key not in ("rule", "slo"):
            raise RuleError(f"unknown top-level key {key!r} (expected [[rule]] or [[slo]] "
                            "tables)", source=source, line=lines.top_level(key))
    names: dict[str, int | None] = {}
    rules: list[ThresholdRule] = []
    slos: list[SloRule] = []
    for kind in ("rule", "slo"):
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise RuleError(f"{kind!r} must be an array of tables ([[{kind}]])", source=source,
                            line=lines.top_level(kind))
        for index, entry in enumerate(entries):
            line = lines.table(kind, index)
            if not isinstance(entry, dict):
                raise RuleError(f"[[{kind}]] entry {index + 1} is not a table", source=source,
                                line=line)
            table = _Table(entry, kind, line, lines, source)
            if kind == "rule":
                rule: ThresholdRule | SloRule = _threshold_rule(table, known_label_keys,
                                                                known_features)
                rules.append(rule)
            else:
                rule = _slo_rule(table, known_label_keys, known_features)
                slos.append(rule)
            model = table.string("model")
            if model is not None:
                if known_models is not None and model not in known_models:
                    raise table.error(f"unknown model {model!r} (registered: "
                                      f"{', '.join(sorted(known_models)) or 'none'})", "model")
                rule = replace(rule, model=model)
                (rules if kind == "rule" else slos)[-1] = rule  # type: ignore[index]
            if rule.name in names:
                first = names[rule.name]
                raise table.error(f"duplicate rule name {rule.name!r} (first defined at line "
                                  f"{first})", "name")
            names[rule.name] = line
    return RuleSet(rules=tuple(rules), slos=tuple(slos))


def load_rules_file(path: str | Path, *, known_label_keys: Collection[str] | None = None,
                    known_features: Collection[str] | None = None,
                    known_models: Collection[str] | None = None) -> RuleSet:
    """:func:`load_rules` on a file; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot read rule file: {exc.strerror or exc}", source=str(p)) from None
    return load_rules(text, source=str(p), known_label_keys=known_label_keys,
                      known_features=known_features, known_models=known_models)
