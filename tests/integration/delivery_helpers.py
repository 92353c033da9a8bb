"""Pieces the crash and partition tests share: a real `fleetwatch serve` process that can be
killed with SIGKILL and restarted on the same database and port, a client interceptor that
watches (or loses the acknowledgements of) Report RPCs, and a check of the retry timing.

Imported by the tests as `delivery_helpers` (pytest puts tests/integration on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[2]
REPORT_METHOD = "/fleetwatch.v1.Ingest/Report"
STARTUP_TIMEOUT_S = 30.0


class AggregatorProcess:
    """`fleetwatch serve --db DB --listen 127.0.0.1:PORT` as a subprocess.

    `start()` returns once the port accepts connections; `kill()` is kill -9 (no shutdown
    code runs: whatever the server had not committed is gone, and so are its unsent acks);
    `stop()` is SIGTERM. Output goes to `log` (a pipe could fill up and stall the server)."""

    def __init__(self, db: Path, port: int, log: Path, args: Sequence[str] = ()) -> None:
        self.db, self.port, self.log = db, port, log
        self.args = tuple(args)   # more `fleetwatch serve` options (e.g. --upstream)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aggregator.cli", "serve", "--db", str(self.db),
                 "--listen", self.target, *self.args],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleetwatch serve exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-4000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"fleetwatch serve did not listen on {self.target} within "
                           f"{STARTUP_TIMEOUT_S} s")

    def kill(self) -> None:
        """SIGKILL, and reap the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if that takes more than 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def __enter__(self) -> AggregatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


class AckLost(grpc.RpcError):
    """What the agent sees when the aggregator committed a report and died before its ack."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection lost before the response (simulated: the ack was lost in a kill)"


class ReportCalls(grpc.UnaryUnaryClientInterceptor):
    """Watches the Report RPCs through a channel: start times, calls in flight, outcomes.

    With `lose_ack`, the first acknowledged Report calls it (e.g. to kill -9 the aggregator)
    and the agent gets `AckLost` instead of the acknowledgement: the report is committed
    on the aggregator, and the agent does not know."""

    def __init__(self, lose_ack: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.started: list[float] = []  # time.monotonic() of every Report attempt
        self.in_flight = 0
        self.acked = 0
        self.failed = 0
        self.lost_acks = 0
        self._lose_ack = lose_ack

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                              request: Any) -> Any:
        if client_call_details.method != REPORT_METHOD:
            return continuation(client_call_details, request)
        with self._lock:
            self.started.append(time.monotonic())
            self.in_flight += 1
        try:
            outcome = continuation(client_call_details, request)
        finally:
            with self._lock:
                self.in_flight -= 1
        ok = outcome.exception() is None
        with self._lock:
            if not ok:
                self.failed += 1
            elif self._lose_ack is not None:
                lose, self._lose_ack = self._lose_ack, None
                self.lost_acks += 1
            else:
                lose = None
                self.acked += 1
        if ok and lose is not None:
            lose()
            raise AckLost()
        return outcome


def check_backoff(starts: Sequence[Sequence[float]], base_s: float, cap_s: float,
                  slack_s: float = 0.5) -> dict[str, float]:
    """Assert that the Report attempts of each agent (their start times, one list per agent,
    all while the aggregator was unreachable) follow capped exponential backoff with jitter.

    Checked: no gap is shorter than the floor (base/2, less scheduling slop) nor longer than
    the cap (plus `slack_s` of scheduling and wake-up granularity); the first gaps are short
    and the gaps grow (the mean of the gaps once the ceiling reached the cap is well above
    the mean of the first three); those capped gaps spread (jitter), with a mean near cap/2
    (full jitter draws uniformly from [0, cap]). Returns the numbers, for messages."""
    early: list[float] = []
    capped: list[float] = []
    # The ceiling of attempt k is min(cap, base * 2**k): capped from this attempt on.
    at_cap = int(np.ceil(np.log2(cap_s / base_s)))
    for times in starts:
        gaps = np.diff(np.asarray(times))
        assert gaps.size >= at_cap + 3, f"too few attempts to judge: {len(times)}"
        assert gaps.min() >= base_s / 2 * 0.8, f"a gap of {gaps.min():.3f} s: below the floor"
        assert gaps.max() <= cap_s + slack_s, f"a gap of {gaps.max():.3f} s: above the cap"
        early.extend(gaps[:3])
        capped.extend(gaps[at_cap:])
    numbers = {"early_mean_s": float(np.mean(early)), "capped_mean_s": float(np.mean(capped)),
               "capped_sd_s": float(np.std(capped)), "capped_gaps": float(len(capped))}
    # Uniform over [base/2, cap]: mean ~cap/2, sd ~cap/sqrt(12); bounds loose enough for
    # scheduling noise on 2 busy cores and ~30 samples, tight enough to catch a fixed tick,
    # a missing cap or a missing jitter.
    assert numbers["early_mean_s"] < cap_s / 4, numbers
    assert cap_s * 0.3 < numbers["capped_mean_s"] < cap_s * 0.7 + slack_s / 2, numbers
    assert numbers["capped_sd_s"] > cap_s * 0.15, numbers
    return numbers


def tcp_ports(pid: int) -> set[int]:
    """The local ports of a process's TCP sockets (its fds' socket inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def lease_port(dsn: str, role: str) -> int | None:
    """The client port of the session holding ``role``'s advisory lock (`PostgresStore.
    try_lead`) in THIS database (other tests' databases on the server hold the same lock
    ids), None if none."""
    # Imported here: only the PostgreSQL tests call this, the others need no psycopg.
    import psycopg

    from aggregator.store.postgres import LOCK_NAMESPACE

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = %s AND l.objid::bigint = "
            "(hashtext(%s)::bigint + 4294967296) %% 4294967296",
            (LOCK_NAMESPACE % 2**32, role)).fetchall()
    assert len(rows) <= 1, rows   # an exclusive lock: one holder at most
    return rows[0][0] if rows else None


def lease_holder(dsn: str, role: str, replicas: Sequence[Any], timeout_s: float = 15.0) -> Any:
    """The one of ``replicas`` (each with a `proc`) whose process holds ``role``'s lease."""
    deadline = time.monotonic() + timeout_s
    port = None
    while time.monotonic() < deadline:
        port = lease_port(dsn, role)
        holders = [r for r in replicas if port is not None and r.proc is not None
                   and r.proc.poll() is None and port in tcp_ports(r.proc.pid)]
        if holders:
            assert len(holders) == 1
            return holders[0]
        time.sleep(0.1)
    raise AssertionError(f"no replica holds the {role} lease (lock port {port})")
