"""scripts/load_test.py against PostgreSQL: several `fleetwatch serve` replicas on one fresh
database (the capacity figures of docs/scaling.md come from this script)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import psycopg

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_two_replicas_take_the_load_and_store_every_report_once(
        pg_server: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--duration", "2",
         "--devices", "4", "--workers", "4", "--postgres", pg_server, "--replicas", "2",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["database"], result["replicas"]) == ("postgresql", 2)
    assert result["reports"] > 10 and result["errors"] == 0
    # Acknowledged = accepted over both replicas = stored once each.
    assert result["server_accepted"] == result["stored_reports"] == result["reports"]
    assert result["server_duplicates"] == 0 and result["server_rejected"] == {}
    # Both replicas took reports (the devices are spread round-robin).
    assert len(result["server_accepted_by_replica"]) == 2
    assert all(n > 0 for n in result["server_accepted_by_replica"])
    # The temporary database is gone again.
    with psycopg.connect(pg_server, autocommit=True) as conn:
        left = conn.execute("SELECT COUNT(*) FROM pg_database WHERE datname LIKE "
                            "'fw_load_%'").fetchone()
    assert left is not None and left[0] == 0


def test_replicas_need_postgres(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--duration", "1",
         "--replicas", "2", "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--replicas needs --postgres" in proc.stderr
