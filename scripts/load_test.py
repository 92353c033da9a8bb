#!/usr/bin/env python3
"""Sustained ingest on loopback: many concurrent simulated devices against a real aggregator.

    .venv/bin/python scripts/load_test.py --duration 60 --devices 32 --json load.json
    .venv/bin/python scripts/load_test.py --duration 60 --devices 32 --tls-dir /tmp/pki --sign

It starts `fleetwatch serve` itself (a subprocess on a free loopback port; SQLite in WAL mode
with synchronous=FULL, so every acknowledged report is a durable commit) in a temporary
directory, registers a realistic spec (the simulator's edge camera model: 8 numeric and 2
categorical features, DP noise on), and runs one thread per device. Each device sends one
report per simulated 1-minute window, in seq order, waiting for each acknowledgement as the
agent's uploader does. The reports are built by the agent itself: a real `Monitor` per cohort
closes a window of the simulator's events (noise included); each device then re-stamps that
report with its own device id, seq, window and creation time, serializes it, signs the exact
bytes (`--sign`) and ships it in a `ReportEnvelope`. Devices do not spool: the on-device fsyncs
are the device's cost, not the aggregator's; for the same reason the envelopes are built and
signed before the clock starts (enough for PREBUILT_PER_S reports/s; any beyond, as sent), so
that the load generator does not spend the CPU the aggregator shares with it on devices' work.

With `--tls-dir DIR` the aggregator serves mutual TLS from DIR (`fleetwatch certs init`; made
here when DIR has no CA yet, with a certificate per device and one operator certificate) and
every device connects with its own client certificate. `--sign` signs every report with the
device's Ed25519 key (DIR/devices/<ID>.sign.key) and needs `--tls-dir` (the aggregator reads
the public keys from it); without `--sign` a TLS run passes `--no-require-signatures`.

It prints (and writes with `--json PATH`) reports/s, the RPC latency p50/p99, errors by status
code, the aggregator's RSS at the start and the end of the run (sampled every second: flat
memory means no growth after the warm-up), its ServerStats, and the reports stored in the
database afterwards, which must equal the reports acknowledged.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from agent.monitor import Monitor  # noqa: E402
from agent.spec import Spec  # noqa: E402
from agent.wire import spec_to_proto  # noqa: E402
from aggregator.baseline import build_spec_from_columns  # noqa: E402
from aggregator.simulator import (  # noqa: E402
    CATEGORICAL_FEATURES,
    LATENCY_COLUMN,
    PREDICTION_COLUMN,
    SimClock,
    reference_columns,
)
from aggregator.store import is_postgres_dsn  # noqa: E402
from protos import fleetwatch_pb2 as pb  # noqa: E402
from protos import fleetwatch_pb2_grpc as pb_grpc  # noqa: E402

REPORT_METHOD = "/fleetwatch.v1.Ingest/Report"
WINDOW_S = 60
COHORTS = [{"region": r, "hw": h} for r in ("eu", "us", "apac", "latam") for h in ("jetson", "pi")]
EVENTS_PER_WINDOW = 150
STARTUP_TIMEOUT_S = 60.0
RPC_TIMEOUT_S = 10.0
OPERATOR = "load-test"
# Windows are stamped from this far back, one per report and device, so that even the fastest
# device stays in the past (the aggregator refuses windows ahead of its clock).
HISTORY_S = 60 * 86400
PREBUILT_PER_S = 2500  # reports/s the devices' envelopes are built for before the clock


class UsageError(Exception):
    """A bad combination of flags (exit code 2)."""


# -- security, when asked for -------------------------------------------------------------------


@dataclass(frozen=True)
class Security:
    """What `--tls-dir` and `--sign` turn on; None fields mean off."""

    tls_dir: pathlib.Path | None = None
    sign: bool = False

    @classmethod
    def from_args(cls, tls_dir: str | None, sign: bool) -> Security:
        if sign and tls_dir is None:
            raise UsageError("--sign needs --tls-dir DIR: the aggregator verifies signatures with "
                             "the devices' DIR/devices/<ID>.sign.pub keys")
        if tls_dir is not None:
            try:  # the mutual TLS and signature work (docs/security.md)
                import agent.signing  # noqa: F401
                import agent.transport  # noqa: F401
                import aggregator.certs  # noqa: F401
            except ImportError as e:
                raise UsageError(f"--tls-dir/--sign: not available yet in this build ({e})") \
                    from None
        return cls(pathlib.Path(tls_dir) if tls_dir else None, sign)

    def prepare(self, device_ids: list[str]) -> None:
        """Make the CA, the device and operator certificates that DIR does not have yet."""
        if self.tls_dir is None:
            return
        from aggregator import certs

        if not (self.tls_dir / "ca.pem").exists():
            certs.init_ca(self.tls_dir)
        for device_id in device_ids:
            if not certs.device_paths(self.tls_dir, device_id)["cert"].exists():
                certs.issue_device(self.tls_dir, device_id)
        if not (self.tls_dir / "operators" / f"{OPERATOR}.pem").exists():
            certs.issue_operator(self.tls_dir, OPERATOR)

    def serve_args(self) -> list[str]:
        if self.tls_dir is None:
            return []
        return ["--tls-dir", str(self.tls_dir),
                "--require-signatures" if self.sign else "--no-require-signatures"]

    def channel(self, target: str, device_id: str | None) -> grpc.Channel:
        """A device's channel (its own certificate), or the operator's with device_id None."""
        if self.tls_dir is None:
            return grpc.insecure_channel(target)
        from agent.transport import TlsCredentials, make_channel

        if device_id is None:
            d = self.tls_dir
            tls = TlsCredentials(d / "ca.pem", d / "operators" / f"{OPERATOR}.pem",
                                 d / "operators" / f"{OPERATOR}.key")
        else:
            tls = TlsCredentials.for_device(self.tls_dir, device_id)
        return make_channel(target, tls)

    def envelope(self, device_id: str) -> Any:
        """`report bytes -> envelope bytes` for one device."""
        if not self.sign:
            return lambda report: pb.ReportEnvelope(report=report).SerializeToString()
        from agent.signing import ReportSigner
        from aggregator import certs

        return ReportSigner.from_pem_file(certs.device_paths(self.tls_dir, device_id)[
            "sign_key"], device_id).envelope


# -- the aggregator -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process and its live descendants (the aggregator's ingest
    process) have used so far, from /proc (Linux)."""
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        # utime and stime are the 14th and 15th fields; the two after ")" start at the 3rd
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def aggregator_process(db: pathlib.Path, port: int, security: Security, workers: int,
                       log: pathlib.Path, extra_args: Sequence[str] = ()
                       ) -> Iterator[subprocess.Popen[bytes]]:
    """`fleetwatch serve` until the block ends (SIGTERM, then SIGKILL after 15 s)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "serve", "--db", str(db), "--listen",
             f"127.0.0.1:{port}", "--workers", str(workers), *security.serve_args(),
             *extra_args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fleetwatch serve exited with {proc.returncode}:\n"
                                   + log.read_text(errors="replace")[-3000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("fleetwatch serve did not start listening")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- what the devices send ----------------------------------------------------------------------


def build_spec() -> Spec:
    columns = reference_columns(20_000, seed=7)
    return build_spec_from_columns(columns, model="detector", model_version="load",
                                   prediction_col=PREDICTION_COLUMN, latency_col=LATENCY_COLUMN,
                                   categorical=tuple(CATEGORICAL_FEATURES))


def template_reports(spec: Spec, workdir: pathlib.Path) -> list[pb.WindowReport]:
    """One agent-built report per cohort: a real Monitor closes a window of simulated events
    (binned, sketched and noised by the agent) into its spool; nothing is delivered."""
    templates = []
    clock = SimClock(0.0)
    for i, labels in enumerate(COHORTS):
        columns = reference_columns(EVENTS_PER_WINDOW, seed=100 + i)
        clock.now = 30.0
        # Port 9 (discard): the monitor never reaches an aggregator; the spec is given.
        mon = Monitor(spec.model, spec.model_version, f"template-{i}", labels,
                      aggregator="127.0.0.1:9", spool_dir=workdir / f"template-{i}",
                      clock=clock, spec=spec, background=False, heartbeats=False,
                      rpc_timeout_s=0.5)
        try:
            mon.observe_batch({f.name: columns[f.name] for f in spec.features},
                              predictions=columns[PREDICTION_COLUMN],
                              latency_ms=columns[LATENCY_COLUMN],
                              errors=np.zeros(EVENTS_PER_WINDOW, dtype=bool))
            clock.now = WINDOW_S + mon.grace_s + 1.0
            mon.poll(timeout_s=0.5)
            (item,) = mon.spool.pending()
            envelope = pb.ReportEnvelope.FromString(item.payload)
            templates.append(pb.WindowReport.FromString(envelope.report))
        finally:
            mon.close(timeout_s=0.1)
    return templates


@dataclass
class DeviceResult:
    acked: int = 0
    duplicates: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


def device_payloads(device_id: str, template: pb.WindowReport, envelope: Any,
                    first_window: int) -> Iterator[bytes]:
    """The device's signed envelopes, seq 1, 2, ...: one report per window."""
    report = pb.WindowReport()
    report.CopyFrom(template)
    report.device_id = device_id
    seq = 0
    while True:
        seq += 1
        report.seq = seq
        report.window_start_unix_s = first_window + (seq - 1) * WINDOW_S
        report.created_unix_ms = int(time.time() * 1000)
        yield envelope(report.SerializeToString())


def prebuild(payloads: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The first `n` payloads built now, the rest when asked for: building and signing a
    report is the device's work, so the timed run should not spend the machine's CPU (which
    the aggregator under test shares) on it."""
    return itertools.chain([next(payloads) for _ in range(n)], payloads)


def run_device(device_id: str, payloads: Iterator[bytes], channel: grpc.Channel,
               stop_at: float, result: DeviceResult) -> None:
    """Send one report per window, each after the previous one's ack, until `stop_at`."""
    send = channel.unary_unary(REPORT_METHOD, request_serializer=lambda b: b,
                               response_deserializer=pb.ReportResponse.FromString)
    while time.monotonic() < stop_at:
        payload = next(payloads)
        while time.monotonic() < stop_at:  # retry this seq, as the spool would
            t0 = time.perf_counter()
            try:
                response = send(payload, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                result.errors[code.name if code else type(e).__name__] += 1
                time.sleep(0.05)
                continue
            result.latencies_s.append(time.perf_counter() - t0)
            if response.status == pb.ReportResponse.DUPLICATE:
                result.duplicates += 1
            result.acked += 1
            break


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - self._t0, rss_bytes(self.pid)))
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


# -- the run ------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_postgres_database(server_dsn: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_dsn`` (a postgresql:// URL), dropped
    afterwards; yields its URL."""
    import urllib.parse

    import psycopg

    name = f"fw_load_{os.urandom(4).hex()}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urllib.parse.urlsplit(server_dsn)
    try:
        yield urllib.parse.urlunsplit(url._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stored_reports(db: str | pathlib.Path) -> int:
    if is_postgres_dsn(db):
        import psycopg
        with psycopg.connect(str(db)) as conn:
            row = conn.execute("SELECT COUNT(*) FROM reports").fetchone()
            return int(row[0]) if row else 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0])


def run(duration_s: float, devices: int, security: Security, workers: int,
        workdir: pathlib.Path, progress: Any = None, postgres: str | None = None,
        replicas: int = 1, ingest_process: bool = False) -> dict[str, Any]:
    """With ``postgres`` (a server URL) the aggregators share a fresh database there:
    ``replicas`` `fleetwatch serve` processes, the devices spread over them round-robin.
    ``ingest_process``: `fleetwatch serve --ingest-process` (its CPU counted with the
    server's)."""
    with contextlib.ExitStack() as stack:
        db: str | pathlib.Path = workdir / "aggregator.sqlite"
        if postgres:
            db = stack.enter_context(fresh_postgres_database(postgres))
        elif replicas != 1:
            raise UsageError("--replicas needs --postgres (replicas share one database)")
        return _run(duration_s, devices, security, workers, workdir, progress, db, replicas,
                    ingest_process)


def _run(duration_s: float, devices: int, security: Security, workers: int,
         workdir: pathlib.Path, progress: Any, db: str | pathlib.Path,
         replicas: int, ingest_process: bool) -> dict[str, Any]:
    extra_args = ["--ingest-process"] if ingest_process else []
    say = progress or (lambda message: None)
    device_ids = [f"load-{i:04d}" for i in range(devices)]
    security.prepare(device_ids)
    spec = build_spec()
    templates = template_reports(spec, workdir)
    ports = [free_port() for _ in range(replicas)]
    targets = [f"127.0.0.1:{port}" for port in ports]
    target = targets[0]
    with contextlib.ExitStack() as servers:
        procs = [servers.enter_context(aggregator_process(
            db, port, security, workers, workdir / f"serve-{i}.log",  # type: ignore[arg-type]
            extra_args))
            for i, port in enumerate(ports)]
        proc = procs[0]
        with security.channel(target, None) as admin_channel:
            admin = pb_grpc.AdminStub(admin_channel)
            admin.PushSpec(spec_to_proto(spec), timeout=30, wait_for_ready=True)
            channels = [security.channel(targets[i % replicas], d)
                        for i, d in enumerate(device_ids)]
            try:
                for c in channels:  # connect (and handshake) before the clock starts
                    grpc.channel_ready_future(c).result(timeout=30)
                first_window = (int(time.time()) - HISTORY_S) // WINDOW_S * WINDOW_S
                # Enough for ~PREBUILT_PER_S reports/s in all; beyond that, built as sent.
                per_device = max(1, int(duration_s * PREBUILT_PER_S / devices))
                payloads = [prebuild(device_payloads(d, templates[i % len(templates)],
                                                     security.envelope(d), first_window),
                                     per_device) for i, d in enumerate(device_ids)]
                rss_start = rss_bytes(proc.pid)
                cpu_start = [cpu_seconds(p.pid) for p in procs], own_cpu_seconds()
                sampler = RssSampler(proc.pid)
                sampler.start()
                results = [DeviceResult() for _ in device_ids]
                say(f"{devices} devices for {duration_s:g} s against {target}"
                    f"{' (mutual TLS)' if security.tls_dir else ''}"
                    f"{' (signed)' if security.sign else ''}")
                t0 = time.monotonic()
                threads = [threading.Thread(
                    target=run_device, name=d,
                    args=(d, payloads[i], channels[i], t0 + duration_s, results[i]),
                    daemon=True)
                    for i, d in enumerate(device_ids)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.monotonic() - t0
                server_cpu_s = sum(cpu_seconds(p.pid) - c
                                   for p, c in zip(procs, cpu_start[0], strict=True))
                client_cpu_s = own_cpu_seconds() - cpu_start[1]
                sampler.stop()
                rss_end = rss_bytes(proc.pid)
            finally:
                for c in channels:
                    c.close()
            stats = [admin.ServerStats(pb.ServerStatsRequest(), timeout=30)]
            for t in targets[1:]:
                with security.channel(t, None) as other:
                    stats.append(pb_grpc.AdminStub(other).ServerStats(
                        pb.ServerStatsRequest(), timeout=30))
    stored = stored_reports(db)
    rejected: collections.Counter[str] = collections.Counter()
    for st in stats:
        rejected.update(dict(st.rejected))

    latencies = np.concatenate([np.asarray(r.latencies_s) for r in results]) \
        if any(r.latencies_s for r in results) else np.zeros(0)
    acked = sum(r.acked for r in results)
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r.errors)
    samples = sampler.samples
    # Flat memory: compare the end with the RSS once the first 20 % of the run warmed up.
    warm = [rss for t, rss in samples if t >= 0.2 * elapsed] or [rss_end]
    mb = 1 << 20
    return {
        "duration_s": round(elapsed, 3),
        "devices": devices,
        "tls": security.tls_dir is not None,
        "signed": security.sign,
        "workers": workers,
        "ingest_process": ingest_process,
        "reports": acked,
        "reports_per_s": round(acked / elapsed, 1) if elapsed > 0 else 0.0,
        "duplicates": sum(r.duplicates for r in results),
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        # CPU per report: what contention on a shared machine moves least (docs/performance.md)
        "server_cpu_ms_per_report": round(server_cpu_s * 1000 / acked, 3) if acked else None,
        "client_cpu_ms_per_report": round(client_cpu_s * 1000 / acked, 3) if acked else None,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3)
        if latencies.size else None,
        "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 3)
        if latencies.size else None,
        "report_bytes": len(templates[0].SerializeToString()),
        "rss_start_mb": round(rss_start / mb, 1),
        "rss_warm_mb": round(warm[0] / mb, 1),
        "rss_end_mb": round(rss_end / mb, 1),
        # the end reading is taken after the last sample, so it counts toward the maximum
        "rss_max_mb": round(max([rss for _, rss in samples] + [rss_end]) / mb, 1),
        "rss_samples_mb": [[round(t, 1), round(rss / mb, 1)] for t, rss in samples],
        "replicas": replicas,
        "database": "postgresql" if is_postgres_dsn(db) else "sqlite",
        "server_accepted": sum(st.accepted for st in stats),
        "server_accepted_by_replica": [st.accepted for st in stats],
        "server_duplicates": sum(st.duplicates for st in stats),
        "server_rejected": dict(rejected),
        "stored_reports": int(stored),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="seconds of sustained load (default: %(default)s)")
    p.add_argument("--devices", type=int, default=32, metavar="N",
                   help="concurrent simulated devices, one thread each (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8,
                   help="the aggregator's RPC worker threads (default: %(default)s)")
    p.add_argument("--tls-dir", metavar="DIR",
                   help="mutual TLS from DIR (made when it has no CA yet)")
    p.add_argument("--sign", action="store_true",
                   help="sign every report with the device's Ed25519 key (needs --tls-dir)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--workdir", metavar="DIR",
                   help="keep the database, the log and the template spools here (default: a "
                   "temporary directory, deleted afterwards)")
    p.add_argument("--postgres", metavar="URL",
                   help="store in a fresh database on this PostgreSQL server (e.g. "
                   "postgresql://postgres@127.0.0.1:5432/postgres), dropped afterwards; "
                   "default: a SQLite file")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="aggregator processes on the one database, devices spread over them "
                   "(needs --postgres; default: %(default)s)")
    p.add_argument("--ingest-process", action="store_true",
                   help="serve with --ingest-process (reports checked and stored in a child "
                   "process)")
    ns = p.parse_args(argv)
    if not ns.duration > 0 or ns.devices < 1 or ns.workers < 1:
        p.error("--duration must be > 0, --devices and --workers at least 1")
    try:
        security = Security.from_args(ns.tls_dir, ns.sign)
    except UsageError as e:
        print(f"load_test: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if ns.workdir:
            workdir = pathlib.Path(ns.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = pathlib.Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fleetwatch-load-")))
        try:
            result = run(ns.duration, ns.devices, security, ns.workers, workdir,
                         progress=lambda m: print(m, file=sys.stderr, flush=True),
                         postgres=ns.postgres, replicas=ns.replicas,
                         ingest_process=ns.ingest_process)
        except UsageError as e:
            print(f"load_test: {e}", file=sys.stderr)
            return 2
    samples = result.pop("rss_samples_mb")
    print(json.dumps(result, indent=2))
    if ns.json:
        pathlib.Path(ns.json).write_text(json.dumps({**result, "rss_samples_mb": samples},
                                                    indent=2) + "\n")
    ok = result["errors"] == 0 and result["stored_reports"] == result["server_accepted"] \
        == result["reports"] - result["duplicates"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
