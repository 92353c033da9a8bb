"""scripts/load_test.py, briefly: a few seconds of sustained ingest from a few devices into the
real aggregator it starts, plain and with mutual TLS and signed reports; its JSON says what
happened, and the database holds exactly the reports acknowledged (the 60 s run is manual)."""

from __future__ import annotations

import contextlib
import json
import pathlib
import sqlite3
import subprocess
import sys

import pytest

from protos import fleetwatch_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "load_test.py"


def run_load_test(tmp_path: pathlib.Path, *args: str) -> dict:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "2", "--devices", "3", "--workers", "4",
         "--json", str(out), "--workdir", str(tmp_path / "work"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == {k: v for k, v in result.items() if k != "rss_samples_mb"}
    return result


def check(result: dict, tmp_path: pathlib.Path) -> list[pb.ReportEnvelope]:
    assert result["devices"] == 3 and 2.0 <= result["duration_s"] < 10
    assert result["reports"] > 10 and result["errors"] == 0 and result["errors_by_code"] == {}
    assert result["reports_per_s"] == pytest.approx(result["reports"] / result["duration_s"],
                                                    rel=0.01)
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"] < 10_000
    assert result["server_accepted"] == result["stored_reports"] == result["reports"]
    assert result["server_duplicates"] == result["duplicates"] == 0
    assert result["server_rejected"] == {}
    assert 20 < result["rss_start_mb"] <= result["rss_max_mb"]
    assert result["rss_end_mb"] <= result["rss_max_mb"] < 2000
    assert result["rss_samples_mb"] and all(len(s) == 2 for s in result["rss_samples_mb"])
    db = tmp_path / "work" / "aggregator.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        devices = conn.execute("SELECT device_id, COUNT(*), MIN(seq), MAX(seq) FROM reports "
                               "GROUP BY device_id").fetchall()
        envelopes = [pb.ReportEnvelope.FromString(b) for (b,) in conn.execute(
            "SELECT envelope FROM reports LIMIT 5")]
    # Every device sent its windows in seq order, each acknowledged one stored once.
    assert len(devices) == 3 and all(n == hi and lo == 1 for _, n, lo, hi in devices)
    return envelopes


def test_plain(tmp_path: pathlib.Path) -> None:
    result = run_load_test(tmp_path)
    assert (result["tls"], result["signed"]) == (False, False)
    assert all(not e.signature for e in check(result, tmp_path))


def test_mutual_tls_and_signed_reports(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("agent.signing")
    result = run_load_test(tmp_path, "--tls-dir", str(tmp_path / "pki"), "--sign")
    assert (result["tls"], result["signed"]) == (True, True)
    for e in check(result, tmp_path):
        report = pb.WindowReport.FromString(e.report)
        assert e.signature and e.key_id == report.device_id


def test_sign_without_tls_dir_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sign"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--sign needs --tls-dir" in proc.stderr
