"""`fleetwatch demo`: a whole fleet against a real aggregator, in well under a minute.

    result = run_demo(DemoOptions(), progress=print)
    print(result.table)

Starts an aggregator (in a child process, as in production: ingest then runs on its own core)
on a free loopback port with a fresh SQLite file, builds a spec from generated reference data,
registers it over gRPC, runs a simulated fleet (see `aggregator.simulator`: 200 devices in 8
region x hardware cohorts over 30 simulated minutes, with covariate drift and wrong answers in
one cohort and a latency incident in another, ground-truth labels arriving minutes late) whose
last window ends at the current wall-clock minute, then asks the aggregator over gRPC for the
health of every cohort over exactly the simulated range and renders the table. The aggregator
runs the alert rules of `DEMO_RULES` on every closed window (event time); once it has evaluated
the last one, the demo lists the alerts. Progress goes to a callback (the CLI prints it);
nothing here prints.

The throwaway files live in RAM (/dev/shm) when it exists; see `_scratch_parent`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from agent.errors import ConfigError
from agent.spec import Spec
from agent.wire import spec_to_proto
from aggregator.baseline import build_spec_from_columns
from aggregator.render import alerts_table, health_tables
from aggregator.server import AggregatorConfig, serve
from aggregator.simulator import (
    CATEGORICAL_FEATURES,
    LABEL_COLUMN,
    LATENCY_COLUMN,
    MINUTE_S,
    PREDICTION_COLUMN,
    Drift,
    FleetConfig,
    FleetTruth,
    Incident,
    reference_columns,
    run_fleet,
)
from aggregator.store.base import canonical_labels
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

__all__ = ["DEMO_RULES", "GROUP_BY", "DemoOptions", "DemoResult", "demo_report", "fleet_config",
           "run_demo", "serve_until_stdin_closes"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

GROUP_BY = ("region", "hw")
DB_NAME = "aggregator.sqlite"
RPC_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SHM_DIR = "/dev/shm"
RULES_NAME = "rules.toml"
ALERT_WAIT_S = 60.0
# The demo's fleet is done when its last report is in: evaluate the last windows 1 s later.
DEMO_IDLE_FLUSH_S = 1.0

# The rules the demo's aggregator runs (docs/alerts.md). Thresholds sit far from the clean
# cohorts' values (p95 ~45-60 ms, accuracy ~0.78, error rate 0.5 %) so that only the injected
# incidents fire. Drift is judged over 5 minutes and accuracy over 15, where one minute of 25
# devices under privacy noise is too little to tell: over 15 minutes a cohort's accuracy has a
# noise sd of ~0.016 (two confusion cells of sd ~380 over ~34,000 labels), so 0.68 is 6 sd
# below the clean cohorts' (~0.78) and 6 sd above the drifted one's (~0.58).
DEMO_RULES = """\
[[rule]]
name = "latency-p95"
metric = "latency_p95_ms"
op = ">"
threshold = 150
clear = 120
for = "3m"
by = ["region", "hw"]
severity = "page"
summary = "p95 latency above 150 ms"
runbook = "https://runbooks.example/fleetwatch/latency"

[[rule]]
name = "feature-drift"
metric = "drifting:*"
op = ">="
threshold = 1
for = "5m"
over = "5m"
by = ["region", "hw"]
severity = "ticket"
summary = "input features drift from the reference"

[[rule]]
name = "accuracy"
metric = "accuracy"
op = "<"
threshold = 0.68
clear = 0.7
for = "3m"
over = "15m"
by = ["region", "hw"]
severity = "ticket"
summary = "accuracy below 68 % against late ground truth"

[[slo]]
name = "errors"
metric = "error_rate"
objective = "< 0.02"
target = 0.99
by = ["region", "hw"]
"""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo simulates and where it keeps its files.

    `workdir` None: a temporary directory (in RAM when /dev/shm exists and `keep` is
    false), deleted at the end unless `keep`. A given
    `workdir` is created if needed, must not hold an earlier demo's database, and is never
    deleted.
    """

    devices: int = 200
    minutes: int = 30
    seed: int = 7
    workdir: pathlib.Path | None = None
    keep: bool = False
    reference_rows: int = 50_000

    def __post_init__(self) -> None:
        cohorts = FleetConfig().cohort_count
        if self.devices < cohorts:
            raise ConfigError(f"devices must be at least {cohorts} (one per cohort), got "
                              f"{self.devices}")
        if not 1 <= self.minutes <= 24 * 60:
            raise ConfigError(f"minutes must be between 1 and 1440, got {self.minutes}")
        if self.reference_rows < 1000:
            raise ConfigError(f"reference_rows must be at least 1000, got "
                              f"{self.reference_rows}")
        if self.workdir is not None:
            object.__setattr__(self, "workdir", pathlib.Path(self.workdir))


@dataclass(frozen=True)
class DemoResult:
    """The aggregator's answer, the rendered table and what the fleet really observed."""

    cohorts: list[pb.CohortHealth]
    alerts: pb.ListAlertsResponse
    table: str
    truth: FleetTruth
    spec: Spec
    target: str
    start_unix_s: int
    end_unix_s: int
    elapsed_s: float
    workdir: pathlib.Path | None  # None when the temporary directory was deleted
    config: FleetConfig


def fleet_config(options: DemoOptions) -> FleetConfig:
    """The demo's fleet: drift from 1/6 of the run on, the incident over the last 2/3."""
    base = FleetConfig()
    drift = dataclasses.replace(base.drift or Drift(), start_minute=options.minutes // 6)
    incident = dataclasses.replace(base.incident or Incident(),
                                   start_minute=options.minutes // 3, end_minute=None)
    return dataclasses.replace(base, devices=options.devices, minutes=options.minutes,
                               seed=options.seed, drift=drift, incident=incident)


def serve_until_stdin_closes(db: str, rules: str | None = None) -> None:
    """Entry point of the demo's aggregator process.

    Serves on a free loopback port (with the alert rules in the file `rules`, if given),
    writes the port number as one line to stdout, and stops when stdin reaches end of file
    (the demo closed it, or the demo process died).
    """
    logging.basicConfig(level=logging.WARNING, format="aggregator: %(levelname)s %(message)s")
    # The demo reports the address itself; the loopback-without-TLS notice is expected here.
    logging.getLogger("aggregator.server").setLevel(logging.ERROR)
    config = AggregatorConfig(db=db, listen="127.0.0.1:0", rules_path=rules,
                              alert_idle_flush_s=DEMO_IDLE_FLUSH_S)
    with serve(config) as agg:
        sys.stdout.write(f"{agg.port}\n")
        sys.stdout.flush()
        sys.stdin.read()


@contextlib.contextmanager
def _aggregator_process(db: pathlib.Path,
                        rules: pathlib.Path | None = None) -> Iterator[str]:
    """Run an aggregator in a child process and yield its "host:port".

    A process of its own (its own interpreter, so its own GIL) lets ingest run on one core
    while the simulated fleet runs on another, as it would in production.
    """
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parents[1])  # so the child imports this tree
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = ("import sys; from aggregator.demo import serve_until_stdin_closes as s; "
            "s(*sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db),
                             *([str(rules)] if rules is not None else [])],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            if not ready:
                raise RuntimeError(f"the aggregator did not start within "
                                   f"{STARTUP_TIMEOUT_S:.0f} s")
            try:
                code = proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            raise RuntimeError(f"the aggregator process failed to start (exit code {code}; "
                               "its error is above)")
        yield f"127.0.0.1:{int(line)}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("the aggregator process did not stop; terminating it")
            proc.terminate()
            proc.wait(STOP_TIMEOUT_S)
        proc.stdout.close()


def _scratch_parent() -> str | None:
    """Where the throwaway workdir goes: RAM (/dev/shm) when there is one, else the default.

    The demo's databases are deleted at the end, so their durability is moot, while their
    fsyncs (one per spooled report and per acknowledgement on each device, one per ingested
    report on the aggregator: some 18,000 for the default fleet) would otherwise dominate the
    run time on a slow disk. A given `DemoOptions.workdir` is used as is.
    """
    shm = pathlib.Path(SHM_DIR)
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return str(shm)
    return None


def _workdir(options: DemoOptions) -> tuple[pathlib.Path, bool]:
    """The directory to use and whether it is ours to delete."""
    if options.workdir is None:
        parent = None if options.keep else _scratch_parent()  # kept files belong on disk
        return pathlib.Path(tempfile.mkdtemp(prefix="fleetwatch-demo-", dir=parent)), True
    options.workdir.mkdir(parents=True, exist_ok=True)
    if (options.workdir / DB_NAME).exists():
        raise ConfigError(f"{options.workdir} already holds a demo database ({DB_NAME}); "
                          "give an empty directory")
    return options.workdir, False


def _alerts_after(stub: pb_grpc.QueryStub, spec: Spec, end: int,
                  report: Progress) -> pb.ListAlertsResponse:
    """The aggregator's alerts once its rules have been evaluated on every window up to `end`
    (the last windows wait for the idle flush: DEMO_IDLE_FLUSH_S after the last report)."""
    report("waiting for the alert rules to reach the last window")
    key = f"{spec.model}/{spec.model_version}"
    deadline = time.monotonic() + ALERT_WAIT_S
    while True:
        resp = stub.ListAlerts(pb.ListAlertsRequest(model=spec.model), timeout=RPC_TIMEOUT_S)
        if resp.evaluated_until.get(key, 0) >= end:
            return resp
        if time.monotonic() > deadline:
            raise RuntimeError(f"the alert rules were evaluated up to "
                               f"{resp.evaluated_until.get(key, 0)}, not {end}, within "
                               f"{ALERT_WAIT_S:.0f} s")
        time.sleep(0.2)


def run_demo(options: DemoOptions = DemoOptions(),
             progress: Progress | None = None) -> DemoResult:
    """Run the demo end to end (see the module docstring); progress messages go to `progress`.

    Raises ConfigError for bad options and RuntimeError when the fleet could not deliver.
    """
    t0 = time.perf_counter()

    def report(message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(message)

    config = fleet_config(options)
    workdir, ours = _workdir(options)
    kept: pathlib.Path | None = workdir
    try:
        db = workdir / DB_NAME
        rules = workdir / RULES_NAME
        rules.write_text(DEMO_RULES)
        with _aggregator_process(db, rules) as target:
            report(f"started aggregator on {target} (database {db})")
            report(f"building spec from {options.reference_rows:,} reference rows")
            columns = reference_columns(options.reference_rows, options.seed)
            spec = build_spec_from_columns(
                columns, model=config.model, model_version=config.model_version,
                prediction_col=PREDICTION_COLUMN, latency_col=LATENCY_COLUMN,
                label_col=LABEL_COLUMN, categorical=tuple(CATEGORICAL_FEATURES))
            with grpc.insecure_channel(target) as channel:
                pushed = pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec),
                                                             timeout=RPC_TIMEOUT_S)
                report(f"registered spec {pushed.hash[:12]} for {spec.model}/"
                       f"{spec.model_version} ({len(spec.features)} features)")
                # The simulated range ends at the current wall-clock minute, so that
                # `fleetwatch health --since 1h` against this aggregator would see it.
                end = int(time.time()) // MINUTE_S * MINUTE_S
                start = end - config.minutes * MINUTE_S
                truth = run_fleet(config, target, workdir / "spools", start, progress)
                report("querying cohort health")
                response = pb_grpc.QueryStub(channel).CohortHealth(
                    pb.CohortHealthRequest(model=config.model,
                                           model_version=config.model_version,
                                           group_by=list(GROUP_BY), start_unix_s=start,
                                           end_unix_s=end),
                    timeout=RPC_TIMEOUT_S)
                alerts = _alerts_after(pb_grpc.QueryStub(channel), spec, end, report)
            cohorts = list(response.cohorts)
        table = health_tables(cohorts, color=False)
        elapsed = time.perf_counter() - t0
        report(f"done in {elapsed:.1f} s")
    finally:
        if ours and not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            kept = None
    if kept is not None:
        report(f"files kept in {kept}")
    return DemoResult(cohorts=cohorts, alerts=alerts, table=table, truth=truth, spec=spec,
                      target=target, start_unix_s=start, end_unix_s=end, elapsed_s=elapsed,
                      workdir=kept,
                      config=config)


def demo_report(result: DemoResult, color: bool = False) -> str:
    """What `fleetwatch demo` prints: cohort health, the alerts firing at the end, and what
    was injected."""
    firing = pb.ListAlertsResponse(
        rules_loaded=True, alerts=[a for a in result.alerts.alerts if a.state == "firing"])
    cfg = result.config
    lines = [health_tables(result.cohorts, color=color), "",
             "alerts firing at the end (the rules: fleetwatch demo --print-rules):",
             alerts_table(firing, color=color) if firing.alerts else "  none", "",
             f"{result.truth.events:,} events from {cfg.devices} devices over {cfg.minutes} "
             f"simulated minutes, {result.elapsed_s:.1f} s. Injected:"]
    if cfg.drift is not None:
        shifts = ", ".join(f"{k} {v:+.1f} sd" for k, v in cfg.drift.numeric_shift.items())
        lines.append(f"  covariate drift in {canonical_labels(cfg.drift.selector)} from minute "
                     f"{cfg.drift.start_minute} ({shifts}; "
                     f"{', '.join(cfg.drift.category_mix)} mix; "
                     f"{cfg.drift.label_flip:.0%} of labels contradict the model)")
    if cfg.incident is not None:
        until = f"to minute {cfg.incident.end_minute}" if cfg.incident.end_minute else "on"
        lines.append(f"  latency incident in {canonical_labels(cfg.incident.selector)} from "
                     f"minute {cfg.incident.start_minute} {until} "
                     f"({cfg.incident.factor:g}x latency)")
    return "\n".join(lines)
