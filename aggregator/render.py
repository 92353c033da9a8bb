"""Human and machine output for the CLI: aligned tables (colored on a terminal) and the stable
JSON schema of cohort health (documented in docs/health-json.md)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from protos import fleetwatch_pb2 as pb

__all__ = ["PSI_MAJOR", "PSI_MODERATE", "SLOW_FACTOR", "cohort_label", "cohort_status",
           "health_json", "health_tables", "table", "use_color"]

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
SLOW_FACTOR = 1.5     # p95 over 1.5x the reference p95 counts as a latency problem
ERROR_RATE_HIGH = 0.05

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


def cohort_label(h: pb.CohortHealth) -> str:
    return ",".join(f"{k}={v or '(none)'}" for k, v in sorted(h.cohort.items())) or "(all)"


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
        })
    return out


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
    headers = ["cohort", "devices", "events", "err%", "p50ms", "p95ms", "p99ms", "max psi",
               "p", "feature", "status"]
    rows, colors = [], []
    drift_rows, drift_colors = [], []
    for h in cohorts:
        # The worst drifting feature, else the largest PSI.
        worst = max(h.features, key=lambda d: (d.drifting,
                                               d.psi if math.isfinite(d.psi) else -1.0),
                    default=None)
        status = cohort_status(h)
        label = cohort_label(h)
        rows.append([label, str(h.devices), str(h.events), _f(100 * h.error_rate, ".2f"),
                     _f(h.latency_p50_ms), _f(h.latency_p95_ms), _f(h.latency_p99_ms),
                     _f(worst.psi, ".3f") if worst else "-",
                     _p(worst.p_value) if worst else "-", worst.name if worst else "-",
                     " ".join(status) or "ok"])
        slow = "latency" in status
        psi_color = (_RED if worst and worst.drifting else
                     _YELLOW if worst and worst.psi > PSI_MODERATE else None)
        colors.append([None, None, None, _RED if "errors" in status else None, None,
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
