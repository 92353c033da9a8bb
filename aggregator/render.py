"""Human and machine output for the CLI: aligned tables (colored on a terminal) and the stable
JSON schema of cohort health (documented in docs/health-json.md)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from aggregator.slis import MIN_FAIRNESS_LABELS
from protos import fleetwatch_pb2 as pb

__all__ = ["COMPARE_TESTED", "PSI_MAJOR", "PSI_MODERATE", "SLOW_FACTOR", "cohort_label",
           "cohort_status", "compare_failures", "compare_json", "compare_tables",
           "compare_tests", "compare_verdict_line", "fairness_json", "fairness_table",
           "explain_json", "explain_table", "explain_verdict", "health_json", "health_tables",
           "table", "use_color"]

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
SLOW_FACTOR = 1.5     # p95 over 1.5x the reference p95 counts as a latency problem
ERROR_RATE_HIGH = 0.05
AVAILABILITY_LOW = 0.9  # shown red below it: a tenth of the day's devices went quiet

HEALTH_SCHEMA_VERSION = 1


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _drift_json(d: pb.FeatureDrift) -> dict[str, Any]:
    return {"name": d.name, "count": d.count, "psi": _num(d.psi),
            "js": _num(d.js_distance), "ks": _num(d.ks),
            "wasserstein": _num(d.wasserstein), "wasserstein_norm": _num(d.wasserstein_norm),
            "missing_rate": _num(d.missing_rate), "p_value": _num(d.p_value),
            "drifting": d.drifting, "insufficient_data": d.insufficient_data,
            "expected_null_psi": _num(d.expected_null_psi)}


def _cohort_text(cohort: Any) -> str:
    return ",".join(f"{k}={v or '(none)'}" for k, v in sorted(cohort.items())) or "(all)"


def cohort_label(h: pb.CohortHealth) -> str:
    return _cohort_text(h.cohort)


def cohort_status(h: pb.CohortHealth) -> list[str]:
    """Problems worth a look: drifting features (PSI over the threshold and significant under
    the cohort's noise), too little data to judge drift, slow latency, high error rate."""
    out = []
    drifted = [d.name for d in h.features if d.drifting]
    if drifted:
        out.append("drift:" + "+".join(drifted[:3]) + ("+..." if len(drifted) > 3 else ""))
    if h.HasField("prediction") and h.prediction.drifting:
        out.append("prediction-drift")
    if h.features and all(d.insufficient_data for d in h.features):
        out.append("insufficient-data")
    ref = h.reference_latency_p95_ms
    if math.isfinite(ref) and ref > 0 and math.isfinite(h.latency_p95_ms) and \
            h.latency_p95_ms > SLOW_FACTOR * ref:
        out.append("latency")
    if math.isfinite(h.error_rate) and h.error_rate > ERROR_RATE_HIGH:
        out.append("errors")
    return out


def _ground_truth_json(h: pb.CohortHealth) -> dict[str, Any] | None:
    if not h.task:
        return None
    out: dict[str, Any] = {"task": h.task, "labeled": h.labeled,
                           "labels_unmatched": h.labels_unmatched,
                           "label_cache_evicted": h.label_cache_evicted,
                           "label_latency_s": {"p50": _num(h.label_latency_p50_s),
                                               "p95": _num(h.label_latency_p95_s)}}
    if h.task == "regression":
        out.update(mae=_num(h.mae), rmse=_num(h.rmse))
    else:
        out.update(accuracy=_num(h.accuracy), precision=_num(h.precision),
                   recall=_num(h.recall), f1=_num(h.f1), brier=_num(h.brier),
                   ece=_num(h.ece), positive_rate=_num(h.positive_rate))
    return out


def health_json(cohorts: Sequence[pb.CohortHealth]) -> list[dict[str, Any]]:
    """The stable JSON form: a list of cohort objects (schema in docs/health-json.md)."""
    out = []
    for h in cohorts:
        out.append({
            "schema": HEALTH_SCHEMA_VERSION,
            "cohort": dict(sorted(h.cohort.items())),
            "model": h.model,
            "model_version": h.model_version,
            "spec_hash": h.spec_hash,
            "start_unix_s": h.start_unix_s,
            "end_unix_s": h.end_unix_s,
            "devices": h.devices,
            "reports": h.reports,
            "events": h.events,
            "errors": h.errors,
            "error_rate": _num(h.error_rate),
            "latency_ms": {"p50": _num(h.latency_p50_ms), "p95": _num(h.latency_p95_ms),
                           "p99": _num(h.latency_p99_ms),
                           "rank_error": _num(h.latency_rank_error)},
            "reference_latency_ms": {"p50": _num(h.reference_latency_p50_ms),
                                     "p95": _num(h.reference_latency_p95_ms),
                                     "p99": _num(h.reference_latency_p99_ms)},
            "features": [_drift_json(d) for d in h.features],
            "prediction": _drift_json(h.prediction) if h.HasField("prediction") else None,
            "late_events": h.late_events,
            "invalid_values": h.invalid_values,
            "unknown_features": h.unknown_features,
            "spool_dropped": h.spool_dropped,
            "withheld_reports": h.withheld_reports,
            "histogram_events": h.histogram_events,
            "noise_sd_per_bin": h.noise_sd_per_bin,
            "status": cohort_status(h),
            "devices_last_day": h.devices_last_day,
            "availability": _num(h.availability),
            "heartbeats": h.heartbeats,
            "ground_truth": _ground_truth_json(h),
        })
    return out


def fairness_json(d: pb.FairnessDelta) -> dict[str, Any]:
    """The `fairness` object of `fleetwatch health --fairness-key K --json`."""
    return {"key": d.key,
            "accuracy_gap": _num(d.accuracy_gap), "accuracy_best": d.accuracy_best or None,
            "accuracy_worst": d.accuracy_worst or None,
            "positive_rate_gap": _num(d.positive_rate_gap),
            "positive_rate_highest": d.positive_rate_highest or None,
            "positive_rate_lowest": d.positive_rate_lowest or None,
            "groups": [{"value": g.value, "labeled": g.labeled, "accuracy": _num(g.accuracy),
                        "positive_rate": _num(g.positive_rate)} for g in d.groups]}


# -- tables ----------------------------------------------------------------------------------

_RED, _YELLOW, _GREEN, _BOLD, _RESET = "\033[31m", "\033[33m", "\033[32m", "\033[1m", "\033[0m"


def use_color(stream: TextIO = sys.stdout) -> bool:
    """Color only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], color: bool = False,
          colors: Sequence[Sequence[str | None]] | None = None) -> str:
    """Left-aligned text, right-aligned numbers; optional per-cell ANSI colors."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def is_num(s: str) -> bool:
        return bool(s) and (s[0].isdigit() or (s[0] in "-+." and s[1:2].isdigit()))

    def fmt(row: Sequence[str], cell_colors: Sequence[str | None] | None) -> str:
        cells = []
        for i, (c, w) in enumerate(zip(row, widths, strict=True)):
            text = c.rjust(w) if is_num(c) else c.ljust(w)
            if color and cell_colors and cell_colors[i]:
                text = f"{cell_colors[i]}{text}{_RESET}"
            cells.append(text)
        return "  ".join(cells).rstrip()

    head = fmt(headers, None)
    if color:
        head = f"{_BOLD}{head}{_RESET}"
    lines = [head, fmt(["-" * w for w in widths], None)]
    for i, row in enumerate(rows):
        lines.append(fmt(row, colors[i] if colors else None))
    return "\n".join(lines)


def _f(x: float, spec: str = ".1f") -> str:
    return "-" if not math.isfinite(x) else format(x, spec)


def _p(x: float) -> str:
    """A p-value: fixed point down to 0.001, then scientific (never a bare 0.000)."""
    if not math.isfinite(x):
        return "-"
    return format(x, ".3f") if x >= 0.001 else format(x, ".1e")


def health_tables(cohorts: Sequence[pb.CohortHealth], color: bool = False,
                  drift_threshold: float = PSI_MODERATE) -> str:
    """The cohort table, then the features whose PSI is at least `drift_threshold`."""
    if not cohorts:
        return "no data for this selection and time range"
    headers = ["cohort", "devices", "avail%", "events", "err%", "p50ms", "p95ms", "p99ms",
               "max psi", "p", "feature", "status"]
    rows, colors = [], []
    drift_rows, drift_colors = [], []
    for h in cohorts:
        # The worst drifting feature, else the largest PSI.
        worst = max(h.features, key=lambda d: (d.drifting,
                                               d.psi if math.isfinite(d.psi) else -1.0),
                    default=None)
        status = cohort_status(h)
        label = cohort_label(h)
        rows.append([label, str(h.devices), _f(100 * h.availability, ".0f"), str(h.events),
                     _f(100 * h.error_rate, ".2f"),
                     _f(h.latency_p50_ms), _f(h.latency_p95_ms), _f(h.latency_p99_ms),
                     _f(worst.psi, ".3f") if worst else "-",
                     _p(worst.p_value) if worst else "-", worst.name if worst else "-",
                     " ".join(status) or "ok"])
        slow = "latency" in status
        psi_color = (_RED if worst and worst.drifting else
                     _YELLOW if worst and worst.psi > PSI_MODERATE else None)
        low = math.isfinite(h.availability) and h.availability < AVAILABILITY_LOW
        colors.append([None, None, _RED if low else None, None,
                       _RED if "errors" in status else None, None,
                       _RED if slow else None, _RED if slow else None, psi_color, psi_color,
                       psi_color, _RED if status else _GREEN])
        for d in list(h.features) + ([h.prediction] if h.HasField("prediction") else []):
            if d.drifting or (math.isfinite(d.psi) and d.psi >= drift_threshold):
                verdict = ("DRIFT" if d.drifting else
                           "insufficient data" if d.insufficient_data else "not significant")
                drift_rows.append([label, d.name, _f(d.psi, ".3f"), _p(d.p_value),
                                   _f(d.js_distance, ".3f"), _f(d.ks, ".3f"),
                                   _f(d.wasserstein_norm, ".3f"), _f(100 * d.missing_rate, ".1f"),
                                   verdict])
                c = _RED if d.drifting else _YELLOW
                drift_colors.append([None, None, c, c, None, None, None, None, c])
    out = table(headers, rows, color, colors)
    if drift_rows:
        out += (f"\n\nfeatures with PSI >= {drift_threshold} (DRIFT: significant at p < 1e-5 "
                "over the cohort's features, under its sampling and privacy noise):\n")
        out += table(["cohort", "feature", "psi", "p", "js", "ks", "w/sd", "miss%", "verdict"],
                     drift_rows, color, drift_colors)
    else:
        out += f"\n\nno feature has PSI >= {drift_threshold}"
    truth = _ground_truth_table(cohorts, color)
    if truth:
        out += "\n\n" + truth
    return out


def _ground_truth_table(cohorts: Sequence[pb.CohortHealth], color: bool) -> str:
    """Label SLIs of the cohorts that got ground truth: accuracy / F1 / ECE for classifiers,
    MAE / RMSE for regressors, and label latency p95 (empty when no cohort has labels)."""
    labeled = [h for h in cohorts if h.task]
    if not labeled:
        return ""
    regression = labeled[0].task == "regression"  # one spec per query: one task
    if regression:
        headers = ["cohort", "labeled", "mae", "rmse", "label p95 s", "unmatched", "evicted"]
    else:
        headers = ["cohort", "labeled", "acc%", "f1", "prec", "recall", "ece", "brier",
                   "label p95 s", "unmatched", "evicted"]
    rows = []
    for h in labeled:
        if regression:
            scores = [_f(h.mae, ".3g"), _f(h.rmse, ".3g")]
        else:
            scores = [_f(100 * h.accuracy, ".1f"), _f(h.f1, ".3f"), _f(h.precision, ".3f"),
                      _f(h.recall, ".3f"), _f(h.ece, ".3f"), _f(h.brier, ".3f")]
        rows.append([cohort_label(h), str(h.labeled), *scores, _f(h.label_latency_p95_s, ".0f"),
                     str(h.labels_unmatched), str(h.label_cache_evicted)])
    noisy = any(h.noise_sd_per_bin > 0 for h in labeled)
    title = (f"ground truth ({labeled[0].task}; labels counted in the window they arrived in"
             + (", scores from privacy-noised histograms" if noisy else "") + "):\n")
    return title + table(headers, rows, color)


def fairness_table(d: pb.FairnessDelta, color: bool = False) -> str:
    """Per value of the fairness key: labels, accuracy, positive rate; then the gaps."""
    # Values with fewer than MIN_FAIRNESS_LABELS labels are listed but take no part in the gaps.
    rows = [[g.value, str(g.labeled), _f(100 * g.accuracy, ".1f"),
             _f(100 * g.positive_rate, ".1f")] for g in d.groups]
    out = f"fairness by {d.key}:\n" + table([d.key, "labeled", "acc%", "pos%"], rows, color)
    if math.isfinite(d.accuracy_gap):
        out += (f"\naccuracy gap {100 * d.accuracy_gap:.1f} points: best {d.accuracy_best}, "
                f"worst {d.accuracy_worst}")
    else:
        out += (f"\naccuracy gap: - (fewer than two values with at least {MIN_FAIRNESS_LABELS} "
                "labels)")
    if math.isfinite(d.positive_rate_gap):
        out += (f"\npositive-rate gap {100 * d.positive_rate_gap:.1f} points: highest "
                f"{d.positive_rate_highest}, lowest {d.positive_rate_lowest}")
    return out


def privacy_json(cohorts: Sequence[pb.CohortPrivacy]) -> list[dict[str, Any]]:
    """`fleetwatch privacy --json`: a list of cohort objects (docs/privacy.md)."""
    return [{
        "cohort": dict(sorted(c.cohort.items())),
        "model": c.model, "model_version": c.model_version, "spec_hash": c.spec_hash,
        "start_unix_s": c.start_unix_s, "end_unix_s": c.end_unix_s,
        "unit": c.unit, "mechanism": c.mechanism,
        "epsilon_per_window": c.epsilon_per_window, "delta": c.delta,
        "daily_epsilon_budget": _num(c.daily_epsilon_budget) if c.unit == "device-day" else None,
        "noise_sd_per_bin": c.noise_sd_per_bin,
        "devices": c.devices, "devices_withholding": c.devices_withholding,
        "reports": c.reports, "reports_withheld": c.reports_withheld,
        "max_day_epsilon_spent": c.max_day_epsilon_spent if c.unit == "device-day" else None,
        "mean_day_epsilon_spent": c.mean_day_epsilon_spent if c.unit == "device-day" else None,
        "per_event_epsilon": _num(c.per_event_epsilon),
    } for c in cohorts]


def privacy_table(cohorts: Sequence[pb.CohortPrivacy], color: bool = False) -> str:
    if not cohorts:
        return "no data for this selection and time range"
    first = cohorts[0]
    if first.mechanism == "none":
        head = "spec adds NO noise: histograms are not private"
    else:
        head = (f"{first.mechanism}, unit {first.unit}, epsilon {first.epsilon_per_window:g} "
                f"per window" + (f", delta {first.delta:g}" if first.delta else "")
                + (f", daily budget {first.daily_epsilon_budget:g}"
                   if first.unit == "device-day" else "")
                + f"; noise sd per bin per report {first.noise_sd_per_bin:.1f}")
    rows, colors = [], []
    for c in cohorts:
        day = c.unit == "device-day"
        rows.append([",".join(f"{k}={v or '(none)'}" for k, v in sorted(c.cohort.items()))
                     or "(all)", str(c.devices), str(c.devices_withholding), str(c.reports),
                     str(c.reports_withheld),
                     f"{c.max_day_epsilon_spent:.3g}" if day else "-",
                     f"{c.mean_day_epsilon_spent:.3g}" if day else "-",
                     _f(c.per_event_epsilon, ".3g")])
        colors.append([None, None, _RED if c.devices_withholding else None] + [None] * 5)
    return head + "\n\n" + table(["cohort", "devices", "withholding", "reports", "withheld",
                                  "max day eps", "mean day eps", "eps/event"], rows, color,
                                 colors)


# -- alerts (fleetwatch alerts) ----------------------------------------------------------------

ALERTS_SCHEMA_VERSION = 1


def _alert_json(a: pb.AlertInfo) -> dict[str, Any]:
    return {
        "rule": a.rule, "kind": a.kind, "model": a.model,
        "model_version": a.labels.get("model_version", ""),
        "cohort": dict(sorted(a.cohort.items())), "severity": a.severity, "state": a.state,
        "value": _num(a.value), "threshold": _num(a.threshold),
        "starts_at_unix_s": a.starts_at_unix_s,
        "ends_at_unix_s": a.ends_at_unix_s or None,
        "fingerprint": a.fingerprint,
        "labels": dict(sorted(a.labels.items())),
        "annotations": dict(sorted(a.annotations.items())),
    }


def alerts_json(resp: pb.ListAlertsResponse) -> dict[str, Any]:
    """`fleetwatch alerts --json`: the stable object documented in docs/alerts.md."""
    return {
        "schema": ALERTS_SCHEMA_VERSION,
        "rules_loaded": resp.rules_loaded,
        "alerts": [_alert_json(a) for a in resp.alerts],
        "budgets": [{
            "slo": b.slo, "model": b.model, "model_version": b.model_version,
            "cohort": dict(sorted(b.cohort.items())),
            "windows": b.windows, "bad_windows": b.bad_windows, "budget": b.budget,
            "left_fraction": _num(b.left_fraction),
            "burn_rates": {k: _num(v) for k, v in sorted(b.burn_rates.items())},
        } for b in resp.budgets],
        "evaluated_until": dict(sorted(resp.evaluated_until.items())),
    }


def _when(unix_s: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def alerts_table(resp: pb.ListAlertsResponse, color: bool = False) -> str:
    """Alerts (rule, severity, state, cohort, value, threshold, since), then SLO budgets.

    "since" is when the alert started (pending or firing) or ended (resolved), in UTC."""
    if not resp.rules_loaded:
        return "the aggregator runs without alert rules (start it with `fleetwatch serve " \
               "--rules FILE`)"
    state_color = {"firing": _RED, "pending": _YELLOW, "resolved": _GREEN}
    rows, colors = [], []
    for a in resp.alerts:
        version = a.labels.get("model_version", "")
        since = a.ends_at_unix_s if a.state == "resolved" else a.starts_at_unix_s
        rows.append([a.rule, f"{a.model}/{version}" if version else a.model, a.severity,
                     a.state, _cohort_text(a.cohort), f"{a.value:.4g}", f"{a.threshold:.4g}",
                     _when(since)])
        c = state_color.get(a.state)
        colors.append([None, None, _RED if a.severity == "page" and a.state == "firing"
                       else None, c, None, c, None, None])
    out = (table(["rule", "model", "severity", "state", "cohort", "value", "threshold",
                  "since"], rows, color, colors) if rows else "no alerts")
    if resp.budgets:
        brows, bcolors = [], []
        for b in resp.budgets:
            burns = " ".join(f"{k}={v:.3g}" for k, v in sorted(
                b.burn_rates.items(), key=lambda kv: _duration_key(kv[0])))
            brows.append([b.slo, f"{b.model}/{b.model_version}" if b.model_version
                          else b.model, _cohort_text(b.cohort),
                          f"{100 * b.left_fraction:.1f}%", str(b.bad_windows), str(b.windows),
                          burns])
            bcolors.append([None, None, None, _RED if b.left_fraction < 0 else
                            _YELLOW if b.left_fraction < 0.5 else None, None, None, None])
        out += "\n\nSLO error budgets:\n" + table(
            ["slo", "model", "cohort", "budget left", "bad", "windows", "burn rates"], brows,
            color, bcolors)
    if resp.evaluated_until:
        out += "\n\nevaluated until: " + ", ".join(
            f"{k} {_when(v)}" for k, v in sorted(resp.evaluated_until.items()))
    return out


def _duration_key(text: str) -> float:
    from aggregator.alerts.rules import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        return math.inf


# -- compare (the canary gate; docs/compare.md) ----------------------------------------------

COMPARE_SCHEMA_VERSION = 1


def gated(metric: str, fail_on: Sequence[str]) -> bool:
    """Whether --fail-on names this metric ("psi:*" names every feature's drift)."""
    return metric in fail_on or ("psi:*" in fail_on and metric.startswith("psi:"))


def compare_failures(resp: pb.CompareResponse, fail_on: Sequence[str]
                     ) -> list[tuple[pb.CohortComparison, pb.MetricComparison]]:
    """The (cohort, metric) pairs on which the candidate is significantly worse and that the
    gate names: a non-empty list fails the gate."""
    return [(c, m) for c in resp.cohorts for m in c.metrics
            if m.worse and gated(m.metric, fail_on)]


# The metrics the server tests and counts in its Bonferroni correction (as
# aggregator.compare.TESTED_METRICS; drift keeps its own level and is not counted).
COMPARE_TESTED = ("error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "accuracy")


def compare_tests(resp: pb.CompareResponse) -> int:
    """The number of comparisons the Bonferroni correction was over: the tested metrics with a
    p-value (both sides had the data)."""
    return sum(1 for c in resp.cohorts for m in c.metrics
               if m.metric in COMPARE_TESTED and math.isfinite(m.p_value))


def compare_json(resp: pb.CompareResponse, *, model: str, baseline_version: str,
                 candidate_version: str, alpha: float, fail_on: Sequence[str]
                 ) -> dict[str, Any]:
    """`fleetwatch compare --json`: one object (schema in docs/compare.md)."""
    failures = compare_failures(resp, fail_on)
    tests = compare_tests(resp)

    def metric(m: pb.MetricComparison) -> dict[str, Any]:
        return {"metric": m.metric, "baseline": _num(m.baseline), "candidate": _num(m.candidate),
                "difference": _num(m.difference), "p_value": _num(m.p_value),
                "significant": m.significant, "worse": m.worse,
                "higher_is_worse": m.higher_is_worse, "gated": gated(m.metric, fail_on)}

    return {
        "schema": COMPARE_SCHEMA_VERSION,
        "model": model,
        "baseline_version": baseline_version,
        "candidate_version": candidate_version,
        "baseline_spec_hash": resp.baseline_spec_hash,
        "candidate_spec_hash": resp.candidate_spec_hash,
        "start_unix_s": resp.start_unix_s,
        "end_unix_s": resp.end_unix_s,
        "alpha": alpha,
        "tests": tests,
        "corrected_alpha": _num(resp.corrected_alpha),
        "fail_on": list(fail_on),
        "cohorts": [{"cohort": dict(sorted(c.cohort.items())),
                     "baseline_events": c.baseline_events,
                     "candidate_events": c.candidate_events,
                     "metrics": [metric(m) for m in c.metrics]} for c in resp.cohorts],
        "failures": [{"cohort": dict(sorted(c.cohort.items())), "metric": m.metric,
                      "baseline": _num(m.baseline), "candidate": _num(m.candidate),
                      "difference": _num(m.difference), "p_value": _num(m.p_value)}
                     for c, m in failures],
        "verdict": "FAIL" if failures else "PASS" if tests else "NO_DATA",
    }


def _metric_format(metric: str) -> tuple[str, str]:
    """Format of a value and of a difference of this metric."""
    if metric in ("events", "devices"):
        return ",.0f", "+,.0f"
    if metric.startswith("latency_"):
        return ".1f", "+.1f"
    if metric.startswith("psi:") or metric == "prediction_psi":
        return ".3f", "+.3f"
    return ".4f", "+.4f"   # error rate, accuracy: shares


def compare_verdict_line(resp: pb.CompareResponse, fail_on: Sequence[str]) -> str:
    """The last line of the table output: PASS, FAIL: <what>, or NO DATA."""
    failures = compare_failures(resp, fail_on)
    if failures:
        parts = []
        for c, m in failures:
            _, dspec = _metric_format(m.metric)
            parts.append(f"{m.metric} in {_cohort_text(c.cohort)} ({format(m.difference, dspec)}, "
                         f"p={_p(m.p_value)})")
        return "FAIL: " + "; ".join(parts)
    if not compare_tests(resp):
        return "NO DATA: no cohort has data of both versions in this range; nothing compared"
    return "PASS"


def compare_tables(resp: pb.CompareResponse, *, baseline_version: str,
                   candidate_version: str, alpha: float, fail_on: Sequence[str],
                   color: bool = False) -> str:
    """Per cohort an aligned table (metric, baseline, candidate, diff, p, verdict), then the
    verdict line. Gated metrics (--fail-on) are marked with '*'. Verdicts: WORSE, better
    (significant the other way), same (not significant), for drift rows ok (the candidate is
    not newly drifting), and - where a side has no data."""
    tests = compare_tests(resp)
    out = [f"baseline {baseline_version} (spec {resp.baseline_spec_hash[:12]}) vs candidate "
           f"{candidate_version} (spec {resp.candidate_spec_hash[:12]}); alpha {alpha:g} over "
           f"{tests} tests (Bonferroni: each at {resp.corrected_alpha:.3g}); * = --fail-on"]
    if not resp.cohorts:
        out.append("\nno data for this selection and time range")
    for c in resp.cohorts:
        out.append(f"\n{_cohort_text(c.cohort)}: baseline {c.baseline_events:,} events, "
                   f"candidate {c.candidate_events:,} events")
        rows, colors = [], []
        for m in c.metrics:
            vspec, dspec = _metric_format(m.metric)
            tested = math.isfinite(m.p_value)
            drift = m.metric.startswith("psi:") or m.metric == "prediction_psi"
            if m.worse:
                verdict, tint = "WORSE", _RED
            elif drift:  # p is the candidate's against its reference: not a test of the diff
                verdict, tint = "ok" if tested else "-", None
            elif m.significant:
                verdict, tint = "better", _GREEN
            elif tested:
                verdict, tint = "same", None
            else:
                verdict, tint = "-", None
            rows.append([m.metric + (" *" if gated(m.metric, fail_on) else ""),
                         _f(m.baseline, vspec), _f(m.candidate, vspec), _f(m.difference, dspec),
                         _p(m.p_value), verdict])
            colors.append([None, None, None, tint, None, tint])
        out.append(table(["metric", "baseline", "candidate", "diff", "p", "verdict"], rows,
                         color, colors))
    line = compare_verdict_line(resp, fail_on)
    if color:
        line = f"{_RED if not line.startswith('PASS') else _GREEN}{line}{_RESET}"
    out.append("\n" + line)
    return "\n".join(out)


# -- explain -----------------------------------------------------------------------------------

EXPLAIN_SCHEMA_VERSION = 1
# Below this share of the regression the top cohort is not called its source: the regression
# is spread over the fleet (or is noise).
EXPLAIN_STANDS_OUT = 0.25


def _value_text(key: str, value: str) -> str:
    return f"{key}={value or '(none)'}"


def _share_text(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.0%}"


def explain_verdict(resp: pb.ExplainResponse) -> str:
    """One line: how much of the regression the top cohort explains, and the top of each
    other key, e.g. "latency_p95_ms: 68% of the regression comes from hw=pi (region=us: 71%)"."""
    name = resp.metric
    top = [c for c in resp.contributions if math.isfinite(c.contribution) and c.contribution > 0]
    vspec, dspec = _metric_format(name)
    regressed = math.isfinite(resp.reference_value) and (
        (resp.fleet_value - resp.reference_value) * (1 if resp.higher_is_worse else -1) > 0)
    if not top:
        return (f"{name}: no single cohort explains it (removing any one leaves the fleet "
                "as it is or worse)")
    best = top[0]
    others: list[str] = []
    for c in top[1:]:
        if c.key != best.key and all(not o.startswith(c.key + "=") for o in others):
            part = (_share_text(c.contribution_share) if regressed
                    else format(c.contribution, dspec))
            others.append(f"{_value_text(c.key, c.value)}: {part}")
    tail = f" ({'; '.join(others)})" if others else ""
    where = _value_text(best.key, best.value)
    if regressed and math.isfinite(best.contribution_share):
        if best.contribution_share < EXPLAIN_STANDS_OUT:
            return (f"{name}: no cohort stands out; the largest share of the regression is "
                    f"{where}'s {best.contribution_share:.0%}{tail}")
        return f"{name}: {best.contribution_share:.0%} of the regression comes from {where}{tail}"
    reason = ("no reference to measure a regression against"
              if not math.isfinite(resp.reference_value)
              else f"the fleet ({_f(resp.fleet_value, vspec)}) is no worse than its reference "
              f"({_f(resp.reference_value, vspec)})")
    return (f"{name}: {reason}; the largest contribution is {where} "
            f"({format(best.contribution, dspec)}){tail}")


def explain_table(resp: pb.ExplainResponse, color: bool = False) -> str:
    """A header line, the ranked contributions as an aligned table, and the verdict line."""
    vspec, dspec = _metric_format(resp.metric)
    worse = "higher" if resp.higher_is_worse else "lower"
    out = [f"{resp.metric} of {resp.model}/{resp.model_version} from "
           f"{_when(resp.start_unix_s)} to {_when(resp.end_unix_s)}: fleet "
           f"{_f(resp.fleet_value, vspec)}, reference {_f(resp.reference_value, vspec)} "
           f"({worse} is worse)",
           "contribution: how much better the fleet is without the cohort (its value minus "
           "the value without it, sign-flipped where lower is worse)", ""]
    rows, colors = [], []
    for c in resp.contributions:
        rows.append([c.key, c.value or "(none)", _f(c.cohort_value, vspec),
                     _f(c.fleet_without, vspec), _f(c.contribution, dspec),
                     _share_text(c.contribution_share), _share_text(c.event_share)])
        tint = None
        if math.isfinite(c.contribution) and c.contribution > 0:
            share = c.contribution_share
            tint = _RED if math.isfinite(share) and share >= 0.5 else _YELLOW
        colors.append([None, tint, None, None, tint, tint, None])
    if rows:
        out.append(table(["key", "value", "cohort", "fleet without", "contribution",
                          "of regression", "events"], rows, color, colors))
    else:
        out.append("no label key to rank cohorts along in this selection")
    line = explain_verdict(resp)
    out.append("\n" + (f"{_BOLD}{line}{_RESET}" if color else line))
    return "\n".join(out)


def explain_json(resp: pb.ExplainResponse) -> dict[str, Any]:
    """The stable JSON form of `fleetwatch explain --json`."""
    return {
        "schema": EXPLAIN_SCHEMA_VERSION, "metric": resp.metric, "model": resp.model,
        "model_version": resp.model_version, "start_unix_s": resp.start_unix_s,
        "end_unix_s": resp.end_unix_s, "fleet_value": _num(resp.fleet_value),
        "reference_value": _num(resp.reference_value),
        "higher_is_worse": resp.higher_is_worse, "verdict": explain_verdict(resp),
        "contributions": [{"key": c.key, "value": c.value, "cohort_value": _num(c.cohort_value),
                           "fleet_without": _num(c.fleet_without),
                           "contribution": _num(c.contribution),
                           "contribution_share": _num(c.contribution_share),
                           "event_share": _num(c.event_share), "events": c.events}
                          for c in resp.contributions],
    }
