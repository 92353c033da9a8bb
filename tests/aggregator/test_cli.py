"""The CLI through `main(argv)`, against a real `fleetwatch serve` process on loopback."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent import Monitor
from agent.spec import Spec
from aggregator.cli import UsageError, main, parse_duration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("1h30m", 5400),
                                          ("2d", 172800), ("1w", 604800), ("500ms", 0.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "h", "1x", "1h 30m", "-5m", "m30"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration(text)


def test_help_lists_workflows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "serve", "health", "baseline", "spec push", "cohorts"):
        assert command in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "workflows" in capsys.readouterr().out


def test_serve_refuses_remote_listen_without_tls(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--db", str(tmp_path / "a.db"), "--listen", "0.0.0.0:7070"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_unreachable_aggregator_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    rc = main(["health", "--aggregator", f"127.0.0.1:{port}", "--model", "m", "--timeout", "5"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"cannot reach an aggregator at 127.0.0.1:{port}" in err
    assert "fleetwatch serve" in err


def test_bad_selector_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--model", "m", "--cohort", "region"]) == 2
    assert "expected k=v" in capsys.readouterr().err


def test_baseline_build_reports_bad_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("a,b\n1,2\n3\n")
    rc = main(["baseline", "build", "--data", str(data), "--model", "m", "--model-version", "1",
               "--out", str(tmp_path / "spec.json")])
    assert rc == 2
    assert "line 3" in capsys.readouterr().err
    assert not (tmp_path / "spec.json").exists()


@pytest.fixture
def server(tmp_path: Path):
    """A real `fleetwatch serve` process; stopped with SIGTERM at teardown."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--db", str(tmp_path / "agg.db"),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("fleetwatch serve did not start listening")
    yield f"127.0.0.1:{port}", proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_workflow_baseline_push_observe_health(tmp_path: Path, server,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    target, proc = server
    rng = np.random.default_rng(3)
    data = tmp_path / "train.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["speed", "scene", "score", "latency_ms"])
        for _ in range(3000):
            w.writerow([rng.normal(50, 10), rng.choice(["day", "night"]), rng.random(),
                        rng.lognormal(3, 0.3)])
    spec_path = tmp_path / "spec.json"
    assert main(["baseline", "build", "--data", str(data), "--model", "cam",
                 "--model-version", "2", "--prediction-col", "score", "--latency-col",
                 "latency_ms", "--bins", "8", "--mechanism", "none",
                 "--out", str(spec_path)]) == 0
    spec = Spec.load(spec_path)
    assert spec.feature_names == ("speed", "scene") and spec.prediction is not None
    assert spec.privacy.mechanism == "none"  # exact counts here; test_privacy_cli adds noise
    assert main(["spec", "push", "--aggregator", target, str(spec_path)]) == 0
    assert "registered" in capsys.readouterr().out
    assert main(["spec", "push", "--aggregator", target, str(spec_path)]) == 0
    assert "already registered" in capsys.readouterr().out

    now = int(time.time()) // 60 * 60
    expected = {}
    for region, shift, n in (("eu", 0.0, 400), ("us", 30.0, 300)):
        t = [now - 600.0]
        with Monitor("cam", "2", f"dev-{region}", {"region": region}, aggregator=target,
                     spool_dir=tmp_path / region, clock=lambda t=t: t[0],
                     background=False) as mon:
            for i in range(n):
                mon.observe({"speed": rng.normal(50 + shift, 10),
                             "scene": str(rng.choice(["day", "night"]))},
                            prediction=rng.random(), latency_ms=20.0, error=i % 100 == 0)
                t[0] += 1.0
            assert mon.flush()
        expected[region] = (n, n // 100)

    assert main(["health", "--aggregator", target, "--model", "cam", "--by", "region",
                 "--since", "1h", "--json"]) == 0
    cohorts = json.loads(capsys.readouterr().out)
    assert [c["cohort"] for c in cohorts] == [{"region": "eu"}, {"region": "us"}]
    for c in cohorts:
        events, errors = expected[c["cohort"]["region"]]
        assert (c["events"], c["errors"], c["devices"]) == (events, errors, 1)
        assert c["latency_ms"]["p50"] == pytest.approx(20.0)
        assert [f["name"] for f in c["features"]] == ["speed", "scene"]
        assert c["prediction"]["name"] == "score"
        assert c["schema"] == 1 and c["spec_hash"] == spec.hash
    speed = {c["cohort"]["region"]: c["features"][0] for c in cohorts}
    assert speed["eu"]["psi"] < 0.1 < 0.25 < speed["us"]["psi"]
    assert speed["us"]["drifting"] and speed["us"]["p_value"] < 0.01
    assert not speed["eu"]["drifting"]
    assert any(s.startswith("drift:speed") for s in cohorts[1]["status"])
    assert not any(s.startswith("drift") for s in cohorts[0]["status"])

    assert main(["health", "--aggregator", target, "--model", "cam", "--cohort", "region=us",
                 "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert "region=us" in table and "region=eu" not in table and "speed" in table

    assert main(["cohorts", "--aggregator", target, "--model", "cam", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["keys"] == {"region": ["eu", "us"]}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_privacy_cli(tmp_path: Path, server, capsys: pytest.CaptureFixture[str]) -> None:
    """A device-day spec with a small daily budget: the device starts withholding, and
    `fleetwatch privacy` shows it with its spend."""
    target, _ = server
    data = tmp_path / "train.csv"
    rng = np.random.default_rng(5)
    data.write_text("x,score\n" + "".join(f"{rng.normal()},{rng.random()}\n"
                                          for _ in range(500)))
    spec_path = tmp_path / "spec.json"
    assert main(["baseline", "build", "--data", str(data), "--model", "p", "--model-version",
                 "1", "--prediction-col", "score", "--unit", "device-day", "--epsilon", "0.5",
                 "--daily-budget", "1.0", "--max-events-per-window", "20",
                 "--out", str(spec_path)]) == 0
    assert main(["spec", "push", "--aggregator", target, str(spec_path)]) == 0
    capsys.readouterr()
    now = int(time.time()) // 60 * 60
    t = [now - 300.0]
    with Monitor("p", "1", "dev-1", {"region": "eu"}, aggregator=target,
                 spool_dir=tmp_path / "spool", clock=lambda: t[0], background=False) as mon:
        for _ in range(4):  # 4 windows at epsilon 0.5 against a daily budget of 1.0
            for _ in range(30):
                mon.observe({"x": rng.normal()}, prediction=rng.random(), latency_ms=5.0)
            t[0] += 60
        assert mon.flush()
    assert main(["privacy", "--aggregator", target, "--model", "p", "--by", "region",
                 "--json"]) == 0
    [c] = json.loads(capsys.readouterr().out)
    assert c["cohort"] == {"region": "eu"} and c["unit"] == "device-day"
    assert (c["devices"], c["devices_withholding"]) == (1, 1)
    assert (c["reports"], c["reports_withheld"]) == (4, 2)
    assert c["max_day_epsilon_spent"] == pytest.approx(1.0)
    assert c["noise_sd_per_bin"] > 0
    assert main(["privacy", "--aggregator", target, "--model", "p"]) == 0
    out = capsys.readouterr().out
    assert "device-day" in out and "withholding" in out
    assert main(["health", "--aggregator", target, "--model", "p", "--json"]) == 0
    [h] = json.loads(capsys.readouterr().out)
    assert h["events"] == 120 and h["withheld_reports"] == 2
    assert h["histogram_events"] == 40  # 2 released windows, clamped to 20 events each
