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
            "js_distance": _num(d.js_distance), "ks": _num(d.ks),
            "wasserstein": _num(d.wasserstein), "wasserstein_norm": _num(d.wasserstein_norm),
            "missing_rate": _num(d.missing_rate)}


def cohort_label(h: pb.CohortHealth) -> str:
    return ",".join(f"{k}={v or '(none)'}" for k, v in sorted(h.cohort.items())) or "(all)"


def cohort_status(h: pb.CohortHealth) -> list[str]:
    """Problems worth a look, from the scores alone (alert rules come later)."""
    out = []
    drifted = [d.name for d in h.features if math.isfinite(d.psi) and d.psi > PSI_MAJOR]
    if drifted:
        out.append("drift:" + "+".join(drifted[:3]) + ("+..." if len(drifted) > 3 else ""))
    if h.HasField("prediction") and math.isfinite(h.prediction.psi) and \
            h.prediction.psi > PSI_MAJOR:
        out.append("prediction-drift")
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


def health_tables(cohorts: Sequence[pb.CohortHealth], color: bool = False,
                  drift_threshold: float = PSI_MODERATE) -> str:
    """The cohort table, then the features whose PSI is at least `drift_threshold`."""
    if not cohorts:
        return "no data for this selection and time range"
    headers = ["cohort", "devices", "events", "err%", "p50ms", "p95ms", "p99ms", "max psi",
               "feature", "status"]
    rows, colors = [], []
    drift_rows, drift_colors = [], []
    for h in cohorts:
        worst = max(h.features, key=lambda d: d.psi if math.isfinite(d.psi) else -1.0,
                    default=None)
        status = cohort_status(h)
        label = cohort_label(h)
        rows.append([label, str(h.devices), str(h.events), _f(100 * h.error_rate, ".2f"),
                     _f(h.latency_p50_ms), _f(h.latency_p95_ms), _f(h.latency_p99_ms),
                     _f(worst.psi, ".3f") if worst else "-", worst.name if worst else "-",
                     " ".join(status) or "ok"])
        slow = "latency" in status
        psi_color = (_RED if worst and worst.psi > PSI_MAJOR else
                     _YELLOW if worst and worst.psi > PSI_MODERATE else None)
        colors.append([None, None, None, _RED if "errors" in status else None, None,
                       _RED if slow else None, _RED if slow else None, psi_color, psi_color,
                       _RED if status else _GREEN])
        for d in list(h.features) + ([h.prediction] if h.HasField("prediction") else []):
            if math.isfinite(d.psi) and d.psi >= drift_threshold:
                drift_rows.append([label, d.name, _f(d.psi, ".3f"), _f(d.js_distance, ".3f"),
                                   _f(d.ks, ".3f"), _f(d.wasserstein_norm, ".3f"),
                                   _f(100 * d.missing_rate, ".1f")])
                c = _RED if d.psi > PSI_MAJOR else _YELLOW
                drift_colors.append([None, None, c, None, None, None, None])
    out = table(headers, rows, color, colors)
    if drift_rows:
        out += (f"\n\nfeatures with PSI >= {drift_threshold} (PSI > {PSI_MAJOR} is major "
                "drift):\n")
        out += table(["cohort", "feature", "psi", "js", "ks", "w/sd", "miss%"], drift_rows,
                     color, drift_colors)
    else:
        out += f"\n\nno feature has PSI >= {drift_threshold}"
    return out
