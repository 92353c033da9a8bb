"""The web dashboard: server-rendered HTML pages with inline CSS and inline SVG charts.

    html = overview_page(ctx, {"model": "detector", "since": "1h"})   # "/"
    html = cohort_page(ctx, {"cohort": "region=eu,hw=jetson"})       # "/cohort"
    html = alerts_page(ctx, {})                                       # "/alerts"

`aggregator.http` mounts the pages and maps `BadRequest` to 400 and `NotFound` to 404. Every
page reads the store directly through the query library (`aggregator.query`), the alert
evaluator's `view()` and the explain library, never through HTTP. Nothing is fetched from
elsewhere: no script, font or stylesheet outside the page, and the page's own
Content-Security-Policy forbids it. Every label and value comes from devices, so every one is
escaped (`html.escape`); colour is never the only signal (each status is written out too).

Query parameters (all optional):
- `model`, `version`: the model (default: the context's default model, else the most
  recently registered one) and version (default: its newest);
- `since` (a duration such as `15m`, `1h`; default 1h) or `start`, and `end` (alias `until`),
  in Unix seconds (default: now);
- overview: `by` (comma-separated label keys; default every label key with at most
  `MAX_DEFAULT_GROUP_VALUES` values), `explain` (a metric: `latency_p95_ms`,
  `psi:FEATURE`, ...);
- cohort page: `cohort` (a selector, `region=eu,hw=jetson`), `drift_window` (the trailing
  range each heatmap cell judges drift over; default 5m: see DRIFT_WINDOW_S).
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.spec import Spec
from aggregator.alerts.evaluator import AlertEvaluator, AlertsView
from aggregator.alerts.rules import parse_duration
from aggregator.query import CohortHealth, QueryError, cohort_health, cohort_privacy, resolve_spec
from aggregator.render import AVAILABILITY_LOW, PSI_MAJOR, PSI_MODERATE, cohort_status
from aggregator.service import health_to_proto
from aggregator.store.base import AlertRecord, Store, parse_labels

__all__ = ["MAX_STEPS", "BadRequest", "DashboardContext", "NotFound", "alerts_page",
           "cohort_page", "health_status", "overview_page", "status_rank"]

logger = logging.getLogger(__name__)

DEFAULT_SINCE = "1h"
MAX_RANGE_S = 31 * 86400
MAX_STEPS = 60            # time steps of a cohort page's charts (one cohort_health each)
MAX_DEFAULT_GROUP_VALUES = 20  # a label key with more values (device ids) is not a default group
RESOLVED_SHOWN = 20
# Drift in the heatmap is judged over the trailing DRIFT_WINDOW_S up to each step's end (or
# the step, when longer): one minute of a few devices under privacy noise is too little to
# tell drift from noise (every cell would read "insufficient data"); the demo's drift rule
# judges over 5 minutes for the same reason.
DRIFT_WINDOW_S = 300

# Worst first. "unavailable": devices went quiet (availability below AVAILABILITY_LOW);
# the rest are render.cohort_status's words ("drift:FEATURE+..." ranks as "drift").
STATUS_ORDER = ("unavailable", "errors", "latency", "drift", "prediction-drift",
                "insufficient-data", "ok")


class BadRequest(ValueError):
    """A request the pages cannot answer as asked (a malformed parameter): HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(LookupError):
    """A model or cohort the aggregator does not know: HTTP 404."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DashboardContext(Protocol):
    """What the pages need (aggregator.http's HttpContext has it)."""

    store: Store
    alerts: AlertEvaluator | None
    default_model: str | None


# -- parameters -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Query:
    spec: Spec
    start: int       # as asked (cohort_health aligns it to windows)
    end: int
    since: str       # as given (kept in links), "" when start/end were given
    explicit_version: str

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def version(self) -> str:
        return self.spec.model_version

    def link_params(self) -> dict[str, str]:
        out = {"model": self.model}
        if self.explicit_version:
            out["version"] = self.explicit_version
        if self.since:
            out["since"] = self.since
        else:
            out.update(start=str(self.start), end=str(self.end))
        return out


def _int_param(params: Mapping[str, str], name: str) -> int:
    text = params.get(name, "").strip()
    if not text:
        return 0
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}: expected Unix seconds, got {text!r}") from None
    if value < 0:
        raise BadRequest(f"{name}: must be >= 0, got {value}")
    return value


def _query(ctx: DashboardContext, params: Mapping[str, str]) -> _Query | None:
    """The model and range asked for; None when no model is registered at all."""
    model = params.get("model", "").strip() or ctx.default_model
    version = params.get("version", "").strip()
    if not model:
        specs = ctx.store.list_specs()
        if not specs:
            return None
        model = max(specs, key=lambda s: s.created_unix_s).model
    try:
        spec = resolve_spec(ctx.store, model, version)
    except QueryError as e:
        raise NotFound(str(e)) from None
    end = _int_param(params, "end") or _int_param(params, "until") or int(time.time())
    start = _int_param(params, "start")
    since = ""
    if not start:
        since = params.get("since", "").strip() or DEFAULT_SINCE
        try:
            span = parse_duration(since)
        except ValueError as e:
            raise BadRequest(f"since: {e}") from None
        if not 0 < span <= MAX_RANGE_S:
            raise BadRequest(f"since: must be between 1s and 31d, got {since!r}")
        start = end - int(span)
    if start >= end:
        raise BadRequest(f"start: {start} is not before end {end}")
    if end - start > MAX_RANGE_S:
        raise BadRequest(f"start: the range is longer than 31 days ({end - start} s)")
    return _Query(spec, start, end, since, version)


def _selector(text: str, what: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except ValueError as e:
        raise BadRequest(f"{what}: {e} (expected e.g. region=eu,hw=jetson)") from None


def _known_keys(store: Store, spec: Spec) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for ls in store.label_sets(spec.hash):
        for k, v in ls.labels.items():
            keys.setdefault(k, set()).add(v)
    return keys


def _group_by(ctx: DashboardContext, q: _Query, params: Mapping[str, str]) -> list[str]:
    known = _known_keys(ctx.store, q.spec)
    if "by" not in params:
        return sorted(k for k, values in known.items()
                      if len(values) <= MAX_DEFAULT_GROUP_VALUES)
    by = [k.strip() for k in params["by"].split(",") if k.strip()]
    unknown = [k for k in by if k not in known]
    if unknown:
        raise BadRequest(f"by: {', '.join(unknown)} is not a label key of any device "
                         f"(known keys: {', '.join(sorted(known)) or 'none'})")
    return by


# -- status -----------------------------------------------------------------------------------

def health_status(h: CohortHealth) -> list[str]:
    """`render.cohort_status`, with "unavailable" first when the cohort's devices went quiet;
    ["ok"] when nothing is wrong."""
    out = cohort_status(health_to_proto(h))
    if h.devices == 0 or (math.isfinite(h.availability) and h.availability < AVAILABILITY_LOW):
        out.insert(0, "unavailable")
    return out or ["ok"]


def _kind(status: str) -> str:
    return status.split(":", 1)[0]


def status_rank(statuses: Sequence[str]) -> int:
    """Index in STATUS_ORDER of the worst of the statuses (0 is the worst)."""
    return min((STATUS_ORDER.index(_kind(s)) if _kind(s) in STATUS_ORDER else 0
                for s in statuses), default=len(STATUS_ORDER) - 1)


def _max_psi(h: CohortHealth) -> tuple[float, str, bool]:
    """(largest PSI, its feature, drifting) over the features; drifting ones first."""
    best: tuple[float, str, bool] = (math.nan, "", False)
    for f in (*h.features, *([h.prediction] if h.prediction else [])):
        psi = f.scores.psi
        if not math.isfinite(psi):
            continue
        if not math.isfinite(best[0]) or (f.drifting, psi) > (best[2], best[0]):
            best = (psi, f.name, f.drifting)
    return best


def _ordered(cohorts: Sequence[CohortHealth]) -> list[tuple[CohortHealth, list[str]]]:
    """Worst first: by the worst status, then the number of problems, then the largest PSI."""
    rows = [(h, health_status(h)) for h in cohorts]

    def key(row: tuple[CohortHealth, list[str]]) -> tuple:
        h, st = row
        psi = _max_psi(h)[0]
        problems = 0 if st == ["ok"] else len(st)
        return (status_rank(st), -problems, -(psi if math.isfinite(psi) else -1.0),
                _cohort_text(h.cohort))

    return sorted(rows, key=key)


# -- formatting -------------------------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cohort_text(cohort: Mapping[str, str] | Sequence[tuple[str, str]]) -> str:
    items = cohort.items() if isinstance(cohort, Mapping) else cohort
    return ",".join(f"{k}={v}" for k, v in sorted(items)) or "(all)"


def _fmt(x: float, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec) + suffix


def _when(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _hhmm(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%H:%M")


def _url(path: str, params: Mapping[str, str]) -> str:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v != ""})
    return path + ("?" + query if query else "")


def _safe_href(url: str) -> str | None:
    """Only http(s) links leave the page (a runbook URL comes from the rule file)."""
    return url if urllib.parse.urlsplit(url).scheme in ("http", "https") else None


def _badges(statuses: Sequence[str]) -> str:
    return " ".join(f'<span class="badge s-{_e(_kind(s))}">{_e(s)}</span>' for s in statuses)


def _state_badge(state: str) -> str:
    return f'<span class="badge a-{_e(state)}">{_e(state)}</span>'


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header a:hover{text-decoration:underline}
header .brand{font-weight:700;color:#fff}
main{max-width:1320px;margin:0 auto;padding:16px 24px}
h1{font-size:20px;margin:8px 0 4px}h2{font-size:16px;margin:22px 0 8px}
.muted{color:#5b6472}.error{color:#a3122a}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0002}
th,td{padding:5px 8px;border-bottom:1px solid #e3e6eb;text-align:left;white-space:nowrap}
td.wrap{white-space:normal;max-width:260px}
th{background:#eceff3;font-weight:600}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}
tr:hover td{background:#f8fafc}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600;
border:1px solid transparent}
.s-ok{background:#e3f5e8;color:#17652f;border-color:#9fd7ae}
.s-drift,.s-prediction-drift{background:#fff1dc;color:#8a4b00;border-color:#f3c07a}
.s-latency,.s-errors{background:#fde4e6;color:#a3122a;border-color:#f1a3ab}
.s-unavailable{background:#5c0b16;color:#fff}
.s-insufficient-data{background:#eceff3;color:#4a5261;border-color:#c9ced6}
.a-firing{background:#fde4e6;color:#a3122a;border-color:#f1a3ab}
.a-pending{background:#fff1dc;color:#8a4b00;border-color:#f3c07a}
.a-resolved{background:#e3f5e8;color:#17652f;border-color:#9fd7ae}
.bad{color:#a3122a;font-weight:600}.warn{color:#8a4b00}
.box{background:#fff;padding:10px 14px;box-shadow:0 1px 2px #0002;margin:8px 0}
.alertbox{border-left:5px solid #a3122a}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;padding:8px 14px;
box-shadow:0 1px 2px #0002;min-width:120px}.card b{display:block;font-size:18px}
form.controls{display:flex;gap:10px;flex-wrap:wrap;align-items:end;margin:6px 0 10px}
form.controls label{display:flex;flex-direction:column;font-size:12px;color:#5b6472}
form.controls input{font:inherit;padding:3px 6px;width:140px}
svg text{font:11px system-ui,sans-serif;fill:#3b4350}
.chart{background:#fff;box-shadow:0 1px 2px #0002;margin:6px 0}
"""

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "form-action 'self'; base-uri 'none'")


def _page(title: str, body: str, q: _Query | None = None) -> str:
    nav_params = q.link_params() if q else {}
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)} · fleetwatch</title><style>{_CSS}</style></head><body>"
            f"<header><span class=\"brand\">fleetwatch</span>"
            f"<a href=\"{_e(_url('/', nav_params))}\">Fleet overview</a>"
            f"<a href=\"{_e(_url('/alerts', nav_params))}\">Alerts</a>"
            + (f"<span class=\"muted\" style=\"color:#aab3c2\">{_e(q.model)}/{_e(q.version)} "
               f"· {_e(_when(q.start))} to {_e(_when(q.end))}</span>" if q else "")
            + f"</header><main>{body}</main></body></html>\n")


def _no_model_page(title: str) -> str:
    return _page(title, f"<h1>{_e(title)}</h1><p class=\"muted\">No model is registered yet: "
                        "push a spec with <code>fleetwatch spec push</code>.</p>")


def _controls(path: str, q: _Query, extra: Mapping[str, str]) -> str:
    fields = [("model", q.model), ("version", q.explicit_version), *extra.items(),
              ("since", q.since or "")]
    inputs = "".join(f"<label>{_e(name)}<input name=\"{_e(name)}\" value=\"{_e(value)}\">"
                     "</label>" for name, value in fields)
    return (f"<form class=\"controls\" method=\"get\" action=\"{_e(path)}\">{inputs}"
            "<button type=\"submit\">Show</button></form>")


# -- alerts -----------------------------------------------------------------------------------

def _alerts_view(ctx: DashboardContext, model: str, state: str = "") -> AlertsView | None:
    if ctx.alerts is None:
        return None
    return ctx.alerts.view(model, state, RESOLVED_SHOWN)


def _alert_matches(a: AlertRecord, selector: Mapping[str, str]) -> bool:
    """The alert's cohort agrees with the selector on every key both name."""
    return all(selector.get(k, v) == v for k, v in a.cohort)


def _alerts_table(alerts: Sequence[AlertRecord], q: _Query | None) -> str:
    if not alerts:
        return "<p class=\"muted\">No alerts.</p>"
    rows = []
    for a in alerts:
        since = a.ends_at_s if a.state == "resolved" and a.ends_at_s else a.starts_at_s
        runbook = _safe_href(a.annotations.get("runbook_url", ""))
        link_params = {**(q.link_params() if q else {}), "model": a.model,
                       "version": a.model_version, "cohort": _cohort_text(a.cohort)}
        cohort = (f"<a href=\"{_e(_url('/cohort', link_params))}\">"
                  f"{_e(_cohort_text(a.cohort))}</a>")
        sev = _e(a.severity)
        runbook_cell = (f"<a href=\"{_e(runbook)}\" rel=\"noreferrer\">runbook</a>" if runbook
                        else "-")
        rows.append(
            f"<tr class=\"alert\" data-state=\"{_e(a.state)}\" data-rule=\"{_e(a.rule)}\" "
            f"data-cohort=\"{_e(_cohort_text(a.cohort))}\">"
            f"<td>{_state_badge(a.state)}</td>"
            f"<td class=\"{'bad' if a.severity == 'page' else ''}\">{sev}</td>"
            f"<td>{_e(a.rule)}</td><td>{_e(a.model)}/{_e(a.model_version)}</td><td>{cohort}</td>"
            f"<td class=\"num\">{_e(_fmt(a.value, '.4g'))}</td>"
            f"<td class=\"num\">{_e(_fmt(a.threshold, '.4g'))}</td><td>{_e(_when(since))}</td>"
            f"<td>{_e(a.annotations.get('summary', ''))}</td>"
            f"<td>{runbook_cell}</td>"
            "</tr>")
    return ("<table class=\"alerts\"><thead><tr><th>state</th><th>severity</th><th>rule</th>"
            "<th>model</th><th>cohort</th><th class=\"num\">value</th>"
            "<th class=\"num\">threshold</th><th>since (UTC)</th><th>summary</th>"
            "<th>runbook</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def alerts_page(ctx: DashboardContext, params: Mapping[str, str]) -> str:
    """`/alerts`: pending and firing alerts, recent resolved ones, SLO error budgets."""
    model = params.get("model", "").strip()
    state = params.get("state", "").strip()
    if state and state not in ("pending", "firing", "resolved"):
        raise BadRequest(f"state: must be pending, firing or resolved, got {state!r}")
    q = _query(ctx, params) if model else None
    title = "Alerts"
    if ctx.alerts is None:
        return _page(title, "<h1>Alerts</h1><p class=\"muted\">The aggregator runs without "
                            "alert rules (start it with <code>fleetwatch serve --rules FILE"
                            "</code>).</p>", q)
    view = ctx.alerts.view(model, state, RESOLVED_SHOWN)
    order = {"firing": 0, "pending": 1, "resolved": 2}
    alerts = sorted(view.alerts, key=lambda a: (order.get(a.state, 3),
                                               a.severity != "page", -a.starts_at_s))
    counts = {s: sum(1 for a in alerts if a.state == s) for s in order}
    body = [f"<h1>Alerts</h1><p>{counts['firing']} firing, {counts['pending']} pending, "
            f"{counts['resolved']} recently resolved"
            + (f" for model {_e(model)}" if model else "") + ".</p>",
            _alerts_table(alerts, q), "<h2>SLO error budgets</h2>"]
    if view.budgets:
        rows = []
        for mb in view.budgets:
            b = mb.budget
            left = b.left_fraction
            cls = "bad" if left < 0 else "warn" if left < 0.5 else ""
            burns = " ".join(f"{_e(k)}={_e(_fmt(v, '.3g'))}"
                             for k, v in sorted(b.burn_rates.items()))
            rows.append(f"<tr class=\"budget\" data-slo=\"{_e(b.slo)}\"><td>{_e(b.slo)}</td>"
                        f"<td>{_e(mb.model)}/{_e(mb.model_version)}</td>"
                        f"<td>{_e(_cohort_text(b.cohort))}</td>"
                        f"<td class=\"num {cls}\">{_e(_fmt(100 * left, '.1f', '%'))}"
                        f"{' (spent)' if left < 0 else ''}</td>"
                        f"<td class=\"num\">{b.bad}</td><td class=\"num\">{b.windows}</td>"
                        f"<td>{burns}</td></tr>")
        body.append("<table class=\"budgets\"><thead><tr><th>slo</th><th>model</th>"
                    "<th>cohort</th><th class=\"num\">budget left</th><th class=\"num\">bad "
                    "windows</th><th class=\"num\">windows</th><th>burn rates</th></tr></thead>"
                    "<tbody>" + "".join(rows) + "</tbody></table>")
    else:
        body.append("<p class=\"muted\">No SLO has been evaluated yet.</p>")
    if view.evaluated_until:
        body.append("<p class=\"muted\">Evaluated until: " + ", ".join(
            f"{_e(k)} {_e(_when(v))}" for k, v in sorted(view.evaluated_until.items()))
            + "</p>")
    return _page(title, "".join(body), q)


# -- overview ---------------------------------------------------------------------------------

def _explain_metrics(spec: Spec) -> list[str]:
    out = ["latency_p95_ms", "error_rate"]
    if spec.labels is not None:
        out.append("accuracy")
    out += [f"psi:{f.name}" for f in spec.features]
    return out


def _explain_section(ctx: DashboardContext, q: _Query, metric: str) -> str:
    links = " · ".join(
        f"<a href=\"{_e(_url('/', {**q.link_params(), 'explain': m}))}\">{_e(m)}</a>"
        for m in _explain_metrics(q.spec))
    head = ("<h2>Root cause</h2><p class=\"muted\">Rank cohorts by their contribution to: "
            f"{links}</p>")
    if not metric:
        return head
    try:
        from aggregator import explain as explain_lib
    except ModuleNotFoundError as e:
        if e.name != "aggregator.explain":
            raise
        return head + "<p class=\"box\" id=\"explain\">Root cause: not available (this " \
                      "aggregator has no explain library).</p>"
    try:
        resp = explain_lib.explain(ctx.store, q.model, q.version, {}, metric, q.start, q.end,
                                   keys=(), limit=10)
    except QueryError as e:  # no data in the range: say so where the answer would be
        return head + f"<p class=\"box\" id=\"explain\">Root cause of {_e(metric)}: {_e(e)}</p>"
    except ValueError as e:  # ValidationError: a metric that cannot be explained
        raise BadRequest(f"explain: {e}") from None
    rows = []
    for i, c in enumerate(resp.contributions, 1):
        link = _url("/cohort", {**q.link_params(), "cohort": f"{c.key}={c.value}"})
        rows.append(f"<tr class=\"contribution\" data-rank=\"{i}\" "
                    f"data-cohort=\"{_e(c.key)}={_e(c.value)}\"><td class=\"num\">{i}</td>"
                    f"<td><a href=\"{_e(link)}\">{_e(c.key)}={_e(c.value)}</a></td>"
                    f"<td class=\"num\">{_e(_fmt(c.cohort_value, '.4g'))}</td>"
                    f"<td class=\"num\">{_e(_fmt(c.fleet_without, '.4g'))}</td>"
                    f"<td class=\"num\">{_e(_fmt(100 * c.event_share, '.1f', '%'))}</td>"
                    f"<td class=\"num\">{_e(_fmt(c.contribution, '+.4g'))}</td>"
                    f"<td class=\"num\">{_e(_fmt(100 * c.contribution_share, '.0f', '%'))}</td>"
                    f"<td class=\"num\">{c.events:,}</td></tr>")
    summary = (f"<p>{_e(metric)} over the fleet: <b>{_e(_fmt(resp.fleet_value, '.4g'))}</b>"
               f" (reference {_e(_fmt(resp.reference_value, '.4g'))}; "
               f"{'higher' if resp.higher_is_worse else 'lower'} is worse). Cohorts ranked by "
               "how much better the fleet would be without them:</p>")
    table = ("<table class=\"explain\"><thead><tr><th class=\"num\">#</th><th>cohort</th>"
             "<th class=\"num\">cohort value</th><th class=\"num\">fleet without</th>"
             "<th class=\"num\">event share</th><th class=\"num\">contribution</th>"
             "<th class=\"num\">share of regression</th><th class=\"num\">events</th></tr>"
             "</thead><tbody>" + "".join(rows) + "</tbody></table>" if rows else
             "<p class=\"muted\">No cohort contributes.</p>")
    return head + f"<div id=\"explain\" data-metric=\"{_e(metric)}\">{summary}{table}</div>"


def _cohort_row(rank: int, h: CohortHealth, status: list[str], q: _Query) -> str:
    link = _url("/cohort", {**q.link_params(), "cohort": _cohort_text(h.cohort)})
    ref = h.reference_latency_ms[1]
    p95 = h.latency_p95_ms
    slow = any(_kind(s) == "latency" for s in status)
    ratio = f" ({p95 / ref:.1f}x)" if math.isfinite(ref) and ref > 0 and math.isfinite(p95) \
        else ""
    psi, feature, drifting = _max_psi(h)
    psi_cls = "bad" if drifting else "warn" if math.isfinite(psi) and psi > PSI_MODERATE else ""
    low = math.isfinite(h.availability) and h.availability < AVAILABILITY_LOW
    err = any(_kind(s) == "errors" for s in status)
    label = _cohort_text(h.cohort)
    return (f"<tr class=\"cohort\" data-rank=\"{rank}\" data-cohort=\"{_e(label)}\" "
            f"data-status=\"{_e(' '.join(_kind(s) for s in status))}\">"
            f"<td class=\"num\">{rank}</td><td class=\"wrap\">{_badges(status)}</td>"
            f"<td><a href=\"{_e(link)}\">{_e(label)}</a></td>"
            f"<td class=\"num\">{h.devices}</td>"
            f"<td class=\"num{' bad' if low else ''}\">"
            f"{_e(_fmt(100 * h.availability, '.0f', '%'))}</td>"
            f"<td class=\"num\">{h.events:,}</td>"
            f"<td class=\"num{' bad' if err else ''}\">"
            f"{_e(_fmt(100 * h.error_rate, '.2f', '%'))}</td>"
            f"<td class=\"num{' bad' if slow else ''}\">{_e(_fmt(p95))} / {_e(_fmt(ref))}"
            f"{_e(ratio)}</td>"
            f"<td class=\"num {psi_cls}\">{_e(_fmt(psi, '.3f'))}"
            f"{' ' + _e(feature) if feature else ''}{' (drifting)' if drifting else ''}</td>"
            f"<td class=\"num\">{_e(_fmt(100 * h.accuracy, '.1f', '%'))}</td></tr>")


def overview_page(ctx: DashboardContext, params: Mapping[str, str]) -> str:
    """`/`: firing alerts, every cohort with its health status (worst first), root cause."""
    q = _query(ctx, params)
    if q is None:
        return _no_model_page("Fleet overview")
    by = _group_by(ctx, q, params)
    cohorts = cohort_health(ctx.store, q.model, q.version, {}, by, q.start, q.end)
    ordered = _ordered(cohorts)
    body = [f"<h1>Fleet overview: {_e(q.model)}/{_e(q.version)}</h1>",
            _controls("/", q, {"by": ",".join(by)})]
    view = _alerts_view(ctx, q.model)
    if view is not None:
        active = [a for a in view.alerts if a.state in ("firing", "pending")
                  and a.model_version == q.version]
        active.sort(key=lambda a: (a.state != "firing", a.severity != "page", a.rule))
        if active:
            body.append("<div class=\"box alertbox\" id=\"active-alerts\"><b>"
                        f"{sum(a.state == 'firing' for a in active)} firing, "
                        f"{sum(a.state == 'pending' for a in active)} pending</b>"
                        + _alerts_table(active, q) + "</div>")
        else:
            body.append("<p class=\"box\" id=\"active-alerts\">No alert is firing.</p>")
    problems = sum(1 for _, st in ordered if st != ["ok"])
    body.append(f"<h2>Cohorts by {_e(', '.join(by) or '(the whole fleet)')}</h2>"
                f"<p class=\"muted\">{len(ordered)} cohorts, {problems} with a problem; worst "
                f"first. Latency problem: p95 over 1.5x the reference; drift: PSI over "
                f"{PSI_MODERATE} and significant under the cohort's noise (PSI over "
                f"{PSI_MAJOR} is major).</p>")
    if ordered:
        body.append("<table class=\"cohorts\" id=\"cohorts\"><thead><tr>"
                    "<th class=\"num\">#</th><th>status</th><th>cohort</th>"
                    "<th class=\"num\">devices</th><th class=\"num\">availability</th>"
                    "<th class=\"num\">events</th><th class=\"num\">error rate</th>"
                    "<th class=\"num\">p95 / reference ms</th><th class=\"num\">max PSI</th>"
                    "<th class=\"num\">accuracy</th></tr></thead><tbody>"
                    + "".join(_cohort_row(i, h, st, q) for i, (h, st) in enumerate(ordered, 1))
                    + "</tbody></table>")
    else:
        body.append("<p class=\"muted\">No data for this selection and time range.</p>")
    body.append(_explain_section(ctx, q, params.get("explain", "").strip()))
    return _page("Fleet overview", "".join(body), q)


# -- charts -----------------------------------------------------------------------------------

_W, _H = 1000, 240
_ML, _MR, _MT, _MB = 56, 120, 14, 28
_SERIES_COLORS = {"p50": "#4c78a8", "p95": "#e45756", "p99": "#9d6ab8", "accuracy": "#2f8f5b"}


def _nice_max(x: float) -> float:
    if not math.isfinite(x) or x <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if x <= m * mag:
            return m * mag
    return 10 * mag


def _line_chart(chart_id: str, title: str, times: Sequence[int], step_s: int,
                series: Mapping[str, Sequence[float]], reference: float = math.nan,
                reference_label: str = "", unit: str = "", y_max: float | None = None) -> str:
    """An SVG line chart; NaN breaks a line. Each point is a circle carrying its value
    (data-series, data-t, data-value) and a tooltip."""
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    top = y_max if y_max is not None else _nice_max(max(values + ([reference] if math.isfinite(
        reference) else []), default=1.0) * 1.05)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB
    t0, t1 = times[0], times[-1] + step_s if times else 1

    def x(t: float) -> float:
        return _ML + pw * ((t + step_s / 2) - t0) / max(1, t1 - t0)

    def y(v: float) -> float:
        return _MT + ph * (1 - min(v, top) / top)

    parts = [f"<svg class=\"chart\" id=\"{_e(chart_id)}\" viewBox=\"0 0 {_W} {_H}\" "
             f"width=\"{_W}\" height=\"{_H}\" role=\"img\" aria-label=\"{_e(title)}\" "
             f"data-reference=\"{_e(_fmt(reference, '.6g'))}\" data-y-max=\"{top:.6g}\">"
             f"<title>{_e(title)}</title>"]
    for i in range(5):
        v = top * i / 4
        parts.append(f"<line x1=\"{_ML}\" x2=\"{_ML + pw}\" y1=\"{y(v):.1f}\" y2=\"{y(v):.1f}\""
                     " stroke=\"#e3e6eb\"/>"
                     f"<text x=\"{_ML - 6}\" y=\"{y(v) + 4:.1f}\" text-anchor=\"end\">"
                     f"{_e(format(v, '.3g'))}</text>")
    stride = max(1, len(times) // 8)
    for t in times[::stride]:
        parts.append(f"<text x=\"{x(t):.1f}\" y=\"{_H - 8}\" text-anchor=\"middle\">"
                     f"{_e(_hhmm(t))}</text>")
    if unit:
        parts.append(f"<text x=\"6\" y=\"{_MT + 4}\">{_e(unit)}</text>")
    if math.isfinite(reference):
        parts.append(f"<line class=\"reference\" x1=\"{_ML}\" x2=\"{_ML + pw}\" "
                     f"y1=\"{y(reference):.1f}\" y2=\"{y(reference):.1f}\" stroke=\"#333\" "
                     f"stroke-dasharray=\"6 4\" stroke-width=\"1.5\"/>"
                     f"<text x=\"{_ML + pw + 6}\" y=\"{y(reference) + 4:.1f}\">"
                     f"{_e(reference_label)} {_e(format(reference, '.3g'))}</text>")
    for n, (name, vals) in enumerate(series.items()):
        color = _SERIES_COLORS.get(name, "#555")
        segment: list[str] = []
        paths = []
        for t, v in zip(times, vals, strict=True):
            if math.isfinite(v):
                segment.append(f"{x(t):.1f},{y(v):.1f}")
            elif segment:
                paths.append(segment)
                segment = []
        if segment:
            paths.append(segment)
        for seg in paths:
            parts.append(f"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" "
                         f"points=\"{' '.join(seg)}\"/>")
        for t, v in zip(times, vals, strict=True):
            if math.isfinite(v):
                parts.append(f"<circle class=\"point\" data-series=\"{_e(name)}\" "
                             f"data-t=\"{t}\" data-value=\"{v:.6g}\" cx=\"{x(t):.1f}\" "
                             f"cy=\"{y(v):.1f}\" r=\"2.5\" fill=\"{color}\"><title>"
                             f"{_e(name)} {_e(_hhmm(t))}: {_e(format(v, '.4g'))}</title>"
                             "</circle>")
        parts.append(f"<line x1=\"{_ML + pw + 6}\" x2=\"{_ML + pw + 22}\" "
                     f"y1=\"{_MT + 10 + 16 * n}\" y2=\"{_MT + 10 + 16 * n}\" stroke=\"{color}\" "
                     f"stroke-width=\"3\"/><text x=\"{_ML + pw + 26}\" "
                     f"y=\"{_MT + 14 + 16 * n}\">{_e(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _psi_color(psi: float) -> str:
    """White (0) through amber (PSI_MODERATE) to red (2 x PSI_MAJOR and more); grey for none."""
    if not math.isfinite(psi):
        return "#d9dce1"
    stops = [(0.0, (255, 255, 255)), (PSI_MODERATE, (255, 214, 140)),
             (PSI_MAJOR, (240, 120, 60)), (2 * PSI_MAJOR, (170, 20, 40))]
    psi = max(0.0, psi)
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):
        if psi <= b:
            f = (psi - a) / (b - a)
            rgb = tuple(round(u + (w - u) * f) for u, w in zip(ca, cb, strict=True))
            return "#" + "".join(f"{c:02x}" for c in rgb)
    return "#" + "".join(f"{c:02x}" for c in stops[-1][1])


_INSUFFICIENT = "#eef0f3"


def _heatmap(times: Sequence[int], rows: Mapping[str, Sequence[tuple[float, bool, bool]]]
             ) -> str:
    """Features x time steps, coloured by PSI; drifting cells carry a heavy border and a
    "!" (so that the mark does not rely on colour); insufficient-data cells (too few events
    for the privacy noise) are pale grey with a "?", whatever their PSI (mostly noise)."""
    label_w, cell_h = 150, 22
    cell_w = max(8.0, min(40.0, (_W - label_w - 20) / max(1, len(times))))
    width = max(label_w + cell_w * len(times) + 20, 900)
    height = cell_h * len(rows) + 60
    parts = [f"<svg class=\"chart\" id=\"drift-heatmap\" viewBox=\"0 0 {width:.0f} {height}\" "
             f"width=\"{width:.0f}\" height=\"{height}\" role=\"img\" "
             "aria-label=\"drift per feature over time (PSI)\">"
             "<title>drift per feature over time (PSI)</title>"]
    for r, (name, cells) in enumerate(rows.items()):
        yy = 8 + r * cell_h
        parts.append(f"<text x=\"{label_w - 8}\" y=\"{yy + 15}\" text-anchor=\"end\">"
                     f"{_e(name)}</text>")
        for i, (psi, drifting, insufficient) in enumerate(cells):
            xx = label_w + i * cell_w
            mark = "!" if drifting else "?" if insufficient else ""
            fill = _INSUFFICIENT if insufficient and not drifting else _psi_color(psi)
            tip = (f"{name} {_hhmm(times[i])}: PSI {_fmt(psi, '.3f')}"
                   + (" DRIFTING" if drifting else " (insufficient data)" if insufficient
                      else ""))
            parts.append(f"<g class=\"cell\" data-feature=\"{_e(name)}\" data-t=\"{times[i]}\" "
                         f"data-psi=\"{_e(_fmt(psi, '.4f'))}\" "
                         f"data-drifting=\"{'1' if drifting else '0'}\"><title>{_e(tip)}</title>"
                         f"<rect x=\"{xx:.1f}\" y=\"{yy}\" width=\"{cell_w - 1:.1f}\" "
                         f"height=\"{cell_h - 2}\" "
                         f"fill=\"{fill}\""
                         + (" stroke=\"#1d2330\" stroke-width=\"2\"" if drifting else "")
                         + "/>"
                         + (f"<text x=\"{xx + cell_w / 2:.1f}\" y=\"{yy + 15}\" "
                            f"text-anchor=\"middle\" style=\"font-weight:700;fill:"
                            f"{'#fff' if drifting and psi >= PSI_MAJOR else '#1d2330'}\">"
                            f"{mark}</text>"
                            if mark and cell_w >= 10 else "")
                         + "</g>")
    base = 8 + len(rows) * cell_h
    stride = max(1, len(times) // 8)
    for i in range(0, len(times), stride):
        parts.append(f"<text x=\"{label_w + (i + 0.5) * cell_w:.1f}\" y=\"{base + 14}\" "
                     f"text-anchor=\"middle\">{_e(_hhmm(times[i]))}</text>")
    legend_y = base + 26
    for j, (v, text) in enumerate([(0.0, "0"), (PSI_MODERATE, f"{PSI_MODERATE}"),
                                   (PSI_MAJOR, f"{PSI_MAJOR}"), (2 * PSI_MAJOR, "0.5+"),
                                   (math.nan, "no data")]):
        lx = label_w + j * 90
        parts.append(f"<rect x=\"{lx}\" y=\"{legend_y}\" width=\"14\" height=\"14\" "
                     f"fill=\"{_psi_color(v)}\" stroke=\"#999\"/><text x=\"{lx + 18}\" "
                     f"y=\"{legend_y + 11}\">{_e(text)}</text>")
    parts.append(f"<rect x=\"{label_w + 5 * 90}\" y=\"{legend_y}\" width=\"14\" height=\"14\" "
                 f"fill=\"{_INSUFFICIENT}\" stroke=\"#999\"/><text x=\"{label_w + 5 * 90 + 18}\" "
                 f"y=\"{legend_y + 11}\">? insufficient data · ! drifting (significant)</text>"
                 "</svg>")
    return "".join(parts)


# -- cohort page ------------------------------------------------------------------------------

def _steps(lo: int, hi: int, window_s: int) -> tuple[list[int], int]:
    """Step starts over [lo, hi) (aligned to windows) and the step length: at most MAX_STEPS."""
    windows = max(1, -(-(hi - lo) // window_s))
    step = window_s * -(-windows // MAX_STEPS)
    return list(range(lo, hi, step)), step


def _drift_window(params: Mapping[str, str], window_s: int) -> int:
    text = params.get("drift_window", "").strip()
    if not text:
        return DRIFT_WINDOW_S
    try:
        value = int(parse_duration(text))
    except ValueError as e:
        raise BadRequest(f"drift_window: {e}") from None
    if not window_s <= value <= MAX_RANGE_S:
        raise BadRequest(f"drift_window: must be between one window ({window_s} s) and 31d, "
                         f"got {text!r}")
    return value


def _card(label: str, value: str, cls: str = "") -> str:
    return (f"<div class=\"card\"><span class=\"muted\">{_e(label)}</span>"
            f"<b class=\"{cls}\">{value}</b></div>")


def cohort_page(ctx: DashboardContext, params: Mapping[str, str]) -> str:
    """`/cohort?cohort=k=v,...`: status, latency quantiles and drift per feature over time,
    accuracy over time when labels exist, the cohort's alerts and its privacy budget."""
    q = _query(ctx, params)
    if q is None:
        raise NotFound("no model is registered yet")
    text = params.get("cohort", "").strip()
    selector = _selector(text, "cohort")
    (whole,) = cohort_health(ctx.store, q.model, q.version, selector, (), q.start, q.end) or (
        None,)
    if whole is None:
        raise NotFound(f"cohort {_cohort_text(selector)!r}: no device of {q.model}/{q.version} "
                       "matches it (or none reported in the last day)")
    status = health_status(whole)
    lo, hi = whole.start_unix_s, whole.end_unix_s
    times, step = _steps(lo, hi, q.spec.window_length_s)
    drift_window = _drift_window(params, q.spec.window_length_s)
    per_step: list[CohortHealth | None] = []
    drift_step: list[CohortHealth | None] = []
    for t in times:
        t_end = min(t + step, hi)
        found = cohort_health(ctx.store, q.model, q.version, selector, (), t, t_end, now=hi)
        per_step.append(found[0] if found else None)
        if t_end - drift_window < t:  # a longer trailing range than the step
            found = cohort_health(ctx.store, q.model, q.version, selector, (),
                                  max(lo, t_end - drift_window), t_end, now=hi)
        drift_step.append(found[0] if found else None)
    label = _cohort_text(selector)
    body = [f"<h1>Cohort {_e(label)}</h1>",
            f"<p id=\"cohort-status\" data-status=\"{_e(' '.join(_kind(s) for s in status))}\">"
            f"Status: {_badges(status)}</p>",
            _controls("/cohort", q, {"cohort": text})]
    ref = whole.reference_latency_ms
    slow = any(_kind(s) == "latency" for s in status)
    psi, feature, drifting = _max_psi(whole)
    body.append("<div class=\"cards\">"
                + _card("devices", f"{whole.devices}")
                + _card("availability", _e(_fmt(100 * whole.availability, ".0f", "%")))
                + _card("events", f"{whole.events:,}")
                + _card("error rate", _e(_fmt(100 * whole.error_rate, ".2f", "%")),
                        "bad" if any(_kind(s) == "errors" for s in status) else "")
                + _card("p95 / reference ms", f"{_e(_fmt(whole.latency_p95_ms))} / "
                        f"{_e(_fmt(ref[1]))}", "bad" if slow else "")
                + _card("max PSI", f"{_e(_fmt(psi, '.3f'))} {_e(feature)}",
                        "bad" if drifting else "")
                + _card("accuracy", _e(_fmt(100 * whole.accuracy, ".1f", "%")))
                + "</div>")

    def metric(name: str) -> list[float]:
        return [getattr(h, name) if h is not None else math.nan for h in per_step]

    step_text = f"{step // 60} min" if step % 60 == 0 else f"{step} s"
    body.append(f"<h2>Latency (per {step_text})</h2>")
    body.append(_line_chart("latency-chart", "latency quantiles over time (ms)", times, step,
                            {"p50": metric("latency_p50_ms"), "p95": metric("latency_p95_ms"),
                             "p99": metric("latency_p99_ms")},
                            reference=ref[1], reference_label="ref p95", unit="ms"))
    span = max(step, drift_window)
    drift_text = f"{span // 60} min" if span % 60 == 0 else f"{span} s"
    body.append(f"<h2>Drift per feature (PSI over the {drift_text} up to each step's end)</h2>")
    prediction = q.spec.prediction.name + " (prediction)" if q.spec.prediction else ""
    names = [f.name for f in q.spec.features] + ([prediction] if prediction else [])
    rows: dict[str, list[tuple[float, bool, bool]]] = {n: [] for n in names}
    for h in drift_step:
        feats = {f.name: f for f in h.features} if h is not None else {}
        if h is not None and h.prediction is not None:
            feats[prediction] = h.prediction
        for n in names:
            f = feats.get(n)
            rows[n].append((f.scores.psi, f.drifting, f.insufficient_data) if f is not None
                           else (math.nan, False, False))
    body.append(_heatmap(times, rows))
    if q.spec.labels is not None:
        # Over the trailing range, as drift: label scores are left unknown while the privacy
        # noise dominates (aggregator.slis.MAX_NOISE_SHARE), as it does over a minute or two.
        accuracy = [h.accuracy if h is not None else math.nan for h in drift_step]
        body.append(f"<h2>Accuracy (over the {drift_text} up to each step's end; labels "
                    "counted when they arrive)</h2>")
        body.append(_line_chart("accuracy-chart", "accuracy over time", times, step,
                                {"accuracy": accuracy}, y_max=1.0))
        if not any(math.isfinite(v) for v in accuracy):
            body.append("<p class=\"muted\">Too few labels to score under the privacy noise "
                        "at this resolution: widen drift_window.</p>")
    body.append("<h2>Alerts</h2>")
    view = _alerts_view(ctx, q.model)
    if view is None:
        body.append("<p class=\"muted\">The aggregator runs without alert rules.</p>")
    else:
        mine = [a for a in view.alerts if a.model_version == q.version
                and _alert_matches(a, selector)]
        body.append(_alerts_table(mine, q))
    body.append("<h2>Privacy budget</h2>")
    body.append(_privacy_section(ctx, q, selector, lo, hi))
    return _page(f"Cohort {label}", "".join(body), q)


def _privacy_section(ctx: DashboardContext, q: _Query, selector: Mapping[str, str],
                     lo: int, hi: int) -> str:
    found = cohort_privacy(ctx.store, q.model, q.version, selector, (), lo, hi)
    if not found:
        return "<p class=\"muted\">No report in this range.</p>"
    c = found[0]
    p, st = c.spec.privacy, c.stats
    day = p.unit == "device-day"
    cells: list[tuple[str, Any]] = [
        ("unit", p.unit), ("mechanism", p.mechanism),
        ("epsilon per window", _fmt(p.epsilon_per_window, ".3g")),
        ("daily epsilon budget", _fmt(p.daily_epsilon_budget, ".3g")),
        ("noise sd per bin", _fmt(c.noise_sd_per_bin, ".3g")),
        ("devices", st.devices), ("devices withholding", st.devices_withholding),
        ("reports", st.reports), ("reports withheld", st.reports_withheld),
        ("max day epsilon spent", _fmt(st.max_day_epsilon, ".3g") if day else "-"),
        ("mean day epsilon spent", _fmt(st.mean_day_epsilon, ".3g") if day else "-"),
        ("epsilon per event", _fmt(c.per_event_epsilon, ".3g")),
    ]
    withholding = st.devices_withholding > 0
    rows = "".join(f"<tr><th>{_e(k)}</th><td class=\"num"
                   f"{' bad' if k == 'devices withholding' and withholding else ''}\">"
                   f"{_e(v)}</td></tr>" for k, v in cells)
    note = ("<p class=\"bad\">Some devices spent their privacy budget: their private signals "
            "are withheld for the rest of the period.</p>" if withholding else "")
    return f"<table class=\"privacy\" id=\"privacy\" style=\"width:auto\">{rows}</table>{note}"
