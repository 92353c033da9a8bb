"""scripts/bench.py still works: a `--quick` run of every sub-benchmark writes the figures in
the documented shape (no timing is asserted; benchmarks do not run in CI)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench.py"
KEYS = {"name", "value", "unit", "baseline", "ratio", "goal", "met"}
EXPECTED = {"agent-batch", "agent-event", "agent-rss", "agent-start", "report-size", "ingest",
            "query-p50", "query-p99", "central-devices"}


def run_bench(tmp_path: pathlib.Path, *args: str) -> tuple[list[dict], str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out),
                           "--workdir", str(tmp_path / "work"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_run_writes_every_figure(tmp_path: pathlib.Path) -> None:
    figures, stdout = run_bench(tmp_path)
    assert [f["name"] for f in figures] and {f["name"] for f in figures} == EXPECTED
    for f in figures:
        assert set(f) == KEYS, f
        assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] > 0
        assert f["name"] in stdout  # the table shows it too
        if f["name"] == "report-size":  # its baseline is the peer's profile (not given here)
            continue
        # Every other figure has its baseline from the same run.
        assert isinstance(f["baseline"], float) and f["baseline"] > 0, f
        assert abs(f["ratio"] - f["value"] / f["baseline"]) <= 1e-5 * f["ratio"], f
        assert f["met"] is None if not f["goal"] else isinstance(f["met"], bool), f
    by_name = {f["name"]: f for f in figures}
    assert by_name["agent-batch"]["unit"] == "events/s"
    assert by_name["agent-batch"]["goal"] == "ratio >= 0.5"
    assert by_name["agent-event"]["goal"] == "ratio <= 3"
    assert by_name["agent-rss"]["goal"] == "ratio <= 1.2"
    assert by_name["ingest"]["goal"] == "ratio >= 0.5"
    assert by_name["query-p99"]["goal"] == "value < 200"
    assert by_name["query-p99"]["met"] == (by_name["query-p99"]["value"] < 200)
    # The tier bench: per device, a forwarded report costs the central less than a report.
    central = by_name["central-devices"]
    assert central["unit"] == "device-windows/s" and central["met"] is None
    assert central["value"] > central["baseline"] > 0
    assert by_name["query-p50"]["value"] <= by_name["query-p99"]["value"]
    # met follows from the figures (a ratio goal read the right way round).
    batch = by_name["agent-batch"]
    assert batch["met"] == (batch["ratio"] >= 0.5)


def test_only_selects_and_peerless_report_has_no_verdict(tmp_path: pathlib.Path) -> None:
    figures, _ = run_bench(tmp_path, "--only", "report-size,agent-event")
    assert [f["name"] for f in figures] == ["report-size", "agent-event"]
    report = figures[0]
    # A window's report is compared with the peer's profile only when the peer ran.
    assert report["unit"] == "bytes" and 100 < report["value"] < 100_000
    assert report["baseline"] is None and report["ratio"] is None and report["met"] is None


def test_unknown_bench_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "agent-batch,nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr
