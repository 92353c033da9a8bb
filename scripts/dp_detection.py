#!/usr/bin/env python3
"""Drift detection under differential privacy, end to end: how fast, how many false flags.

Usage: python scripts/dp_detection.py [--hours 24] [--window 60] [--json results.json]

The claim it checks: with epsilon = 1 per window and the `event` unit (discrete Laplace noise
on every private histogram of every device report), over a simulated day

- a 5-device cohort without drift (`small`) raises no drift flag, and
- a 200-device cohort (`large`) whose feature `f0` shifts by +0.5 reference standard
  deviations from `--shift-hour` on is flagged within the first hour of the shift;

and it measures how many windows the detection took and the false-flag rate over the cohorts
(and times) without drift, optionally with a third no-drift cohort of 50 devices (`medium`).

How: a real aggregator runs in a child process (as `fleetwatch demo` does: SQLite in /dev/shm
when there is one). A spec is built with `build_spec_from_columns` from generated reference
data (numeric features `f0`.. from normal and lognormal distributions plus a numeric prediction
`score`, equal-mass bins) with PrivacySpec(unit="event", mechanism="discrete_laplace",
epsilon_per_window=...), and pushed over gRPC. Every device is one real `Monitor` (shared gRPC
channel, no background thread, a simulated clock, the production noise source unless
`--seeded-noise`) that fetches the spec over gRPC, observes one batch per window and is polled
after each window closes, so every report is noised, spooled and delivered exactly as in
production. After every `--eval-every` windows the script asks the aggregator's Query service
for CohortHealth grouped by `cohort` over the trailing `--lookback` ending at the current
window's end, and records per cohort which signals are flagged drifting (features and the
prediction), f0's PSI and p-value, and which signals are marked insufficient_data.

Results:
- detection: the first evaluation after the shift at which `large`'s f0 is flagged, as windows
  (and minutes) after the shift (the number of shifted windows in the aggregator by then);
- false flags: any flag in a (cohort, evaluation) pair whose lookback holds no shifted data
  (`small` and `medium` always, `large` before the shift), as a rate over those pairs, and per
  signal;
- whether `small` ever raised a flag (the claim says it must not), and how often `small` was
  marked insufficient_data (a flag is never raised on insufficient data).

Cost: the aggregator ingests a report in ~2-3 ms, so a day of 60 s windows with 255 devices
(~370k reports) takes 15+ minutes; `--window 300` makes it ~75k reports.

`run(Config(...)) -> Results` is the library entry point (the integration test imports it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from agent.errors import ConfigError
from agent.monitor import Monitor
from agent.noise import SeededRandom
from agent.privacy import noise_plan
from agent.spec import DISCRETE_LAPLACE, EVENT, PrivacySpec, Spec
from agent.wire import spec_to_proto
from aggregator.baseline import BaselineOptions, build_spec_from_columns

# The demo's child-process aggregator and RAM scratch directory, reused rather than copied.
from aggregator.demo import _aggregator_process, _scratch_parent
from aggregator.simulator import SimClock
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

__all__ = ["Cohort", "CohortEvaluation", "CohortStats", "Config", "Detection", "Evaluation",
           "Results", "main", "reference_columns", "run"]

Progress = Callable[[str], None]

MODEL = "dp-detector"
MODEL_VERSION = "1"
PREDICTION = "score"
SHIFTED_FEATURE = "f0"
GROUP_BY = "cohort"
HOUR_S = 3600
RPC_TIMEOUT_S = 30.0
DELIVERY_ATTEMPTS = 5
DB_NAME = "aggregator.sqlite"

# Numeric features: name -> draw(rng, n). f0 is the one that shifts.
_DRAWS: tuple[tuple[str, Callable[[np.random.Generator, int], np.ndarray]], ...] = (
    ("f0", lambda rng, n: rng.normal(50.0, 10.0, n)),
    ("f1", lambda rng, n: rng.lognormal(1.0, 0.5, n)),
    ("f2", lambda rng, n: rng.normal(0.0, 1.0, n)),
    ("f3", lambda rng, n: rng.lognormal(3.0, 0.25, n)),
    ("f4", lambda rng, n: rng.normal(-2.0, 0.5, n)),
    ("f5", lambda rng, n: rng.lognormal(0.0, 0.75, n)),
)
MIN_FEATURES, MAX_FEATURES = 4, len(_DRAWS)


def _generate(rng: np.random.Generator, n: int, features: int,
              f0_offset: float = 0.0) -> dict[str, np.ndarray]:
    """n rows: the numeric features, f0 moved by `f0_offset`, and the model's score.

    The score is a logistic function of f0, f1 and f2 plus noise, so a shift of f0 moves the
    prediction too (as it would for a real model).
    """
    columns = {name: draw(rng, n) for name, draw in _DRAWS[:features]}
    if f0_offset:
        columns["f0"] = columns["f0"] + f0_offset
    z = (0.6 * (columns["f0"] - 50.0) / 10.0 - 0.5 * (np.log(columns["f1"]) - 1.0) / 0.5
         + 0.4 * columns["f2"] + rng.normal(0.0, 1.0, n))
    columns[PREDICTION] = 1.0 / (1.0 + np.exp(-z))
    return columns


def reference_columns(rows: int, features: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    """The reference (training) data: `features` numeric columns f0.. and the `score`."""
    return _generate(np.random.default_rng([seed, 0]), rows, features)


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cohort:
    """One cohort of devices (label cohort=<name>); `drifts`: f0 shifts from the shift on."""

    name: str
    devices: int
    drifts: bool = False


@dataclass(frozen=True)
class Config:
    """What to simulate. Durations in seconds except `hours` and `shift_hour`.

    `medium_devices` 0 leaves the medium cohort out. `workdir` None: a temporary directory (in
    /dev/shm when it exists), deleted at the end unless `keep`.
    """

    hours: float = 24.0
    window_s: int = 60
    events_per_window: float = 60.0  # mean per device (Poisson, times a per-device rate)
    eval_every: int = 1              # windows between health queries
    lookback_s: int = 900            # the health query covers [now - lookback, now)
    shift_hour: float = 12.0
    shift_sd: float = 0.5            # f0's shift, in reference standard deviations
    epsilon: float = 1.0             # per window, unit "event", discrete Laplace
    small_devices: int = 5
    medium_devices: int = 50
    large_devices: int = 200
    features: int = 5
    reference_rows: int = 50_000
    bins: int = 10
    seed: int = 1
    seeded_noise: bool = False       # SeededRandom per device instead of the OS's source
    workers: int = 8                 # threads that poll (spool and deliver) the monitors
    workdir: pathlib.Path | None = None
    keep: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {message}, got {getattr(self, name)!r}")

        need(self.window_s >= 10, "window_s", "must be at least 10 seconds")
        need(math.isfinite(self.hours) and self.hours > 0, "hours", "must be positive")
        total = self.hours * HOUR_S
        need(total == int(total) and int(total) % self.window_s == 0, "hours",
             f"must be a whole number of {self.window_s} s windows")
        need(math.isfinite(self.events_per_window) and self.events_per_window > 0,
             "events_per_window", "must be positive")
        need(self.eval_every >= 1, "eval_every", "must be at least 1")
        need(self.lookback_s >= self.window_s and self.lookback_s % self.window_s == 0,
             "lookback_s", f"must be a positive multiple of the window ({self.window_s} s)")
        shift = self.shift_hour * HOUR_S
        need(0 < self.shift_hour < self.hours, "shift_hour", f"must be in (0, {self.hours})")
        need(shift == int(shift) and int(shift) % self.window_s == 0, "shift_hour",
             f"must fall on a {self.window_s} s window boundary")
        need(math.isfinite(self.shift_sd) and self.shift_sd != 0, "shift_sd",
             "must be a non-zero number")
        need(math.isfinite(self.epsilon) and 0 < self.epsilon <= 100, "epsilon",
             "must be in (0, 100]")
        need(self.small_devices >= 1, "small_devices", "must be at least 1")
        need(self.medium_devices >= 0, "medium_devices", "must not be negative (0: none)")
        need(self.large_devices >= 1, "large_devices", "must be at least 1")
        need(MIN_FEATURES <= self.features <= MAX_FEATURES, "features",
             f"must be between {MIN_FEATURES} and {MAX_FEATURES}")
        need(self.reference_rows >= 1000, "reference_rows", "must be at least 1000")
        need(2 <= self.bins <= 100, "bins", "must be between 2 and 100")
        need(self.workers >= 1, "workers", "must be at least 1")
        if self.workdir is not None:
            object.__setattr__(self, "workdir", pathlib.Path(self.workdir))

    @property
    def windows(self) -> int:
        return int(self.hours * HOUR_S) // self.window_s

    @property
    def shift_window(self) -> int:
        """Index of the first window with shifted data."""
        return int(self.shift_hour * HOUR_S) // self.window_s

    def cohorts(self) -> tuple[Cohort, ...]:
        out = [Cohort("small", self.small_devices)]
        if self.medium_devices:
            out.append(Cohort("medium", self.medium_devices))
        out.append(Cohort("large", self.large_devices, drifts=True))
        return tuple(out)


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortEvaluation:
    """One cohort's health at one evaluation, as the aggregator answered it."""

    cohort: str
    shifted_data: bool             # the lookback holds shifted windows
    drifting: tuple[str, ...]      # signals flagged drifting (features, then the prediction)
    insufficient: tuple[str, ...]  # signals marked insufficient_data
    f0_psi: float
    f0_p_value: float
    f0_expected_null_psi: float
    devices: int
    reports: int
    events: int
    noise_sd_per_bin: float

    @property
    def flagged(self) -> bool:
        return bool(self.drifting)


@dataclass(frozen=True)
class Evaluation:
    """One health query: after `windows` windows, range [end - lookback, end)."""

    windows: int
    end_unix_s: int
    minutes_after_shift: float  # negative before the shift
    cohorts: Mapping[str, CohortEvaluation]


@dataclass(frozen=True)
class CohortStats:
    """A cohort's flags over its no-drift ("clean") evaluations."""

    cohort: str
    devices: int
    drifts: bool
    evaluations: int              # all evaluations
    clean_evaluations: int        # the lookback holds no shifted data
    flagged: int                  # clean evaluations with any signal flagged
    false_flag_rate: float
    per_signal_rate: Mapping[str, float]  # per signal, over clean evaluations
    insufficient: int             # evaluations (all) with any signal insufficient
    insufficient_share: float
    f0_insufficient_share: float
    f0_psi_clean_median: float
    f0_psi_clean_max: float


@dataclass(frozen=True)
class Detection:
    """When the drifting cohort's f0 was first flagged after the shift."""

    flagged: bool
    windows_after_shift: int | None   # shifted windows in the aggregator at the first flag
    minutes_after_shift: float | None
    psi: float | None
    p_value: float | None
    within_hour: bool
    # Once the lookback holds shifted windows only: how often f0 was flagged, and which other
    # signals were (the prediction follows f0; any other feature would be a false flag).
    full_lookback_evaluations: int
    full_lookback_flag_rate: float
    other_signal_flags: Mapping[str, int]


@dataclass(frozen=True)
class Results:
    config: Config
    spec_hash: str
    noise_sd_per_bin_per_report: float
    f0_reference_sd: float
    start_unix_s: int
    shift_unix_s: int
    end_unix_s: int
    reports: int
    events: int
    elapsed_s: float
    evaluations: Sequence[Evaluation]
    cohorts: Mapping[str, CohortStats]
    detection: Detection
    clean_pairs: int       # no-drift (cohort, evaluation) pairs
    false_flags: int       # of those, flagged
    false_flag_rate: float
    small_ever_flagged: bool

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def table(self) -> str:
        return render(self)


def _jsonable(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, paths become strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Device:
    cohort: Cohort
    device_id: str
    rate: float
    monitor: Monitor | None = None


@dataclass
class _Fleet:
    devices: list[_Device] = field(default_factory=list)

    @property
    def monitors(self) -> list[Monitor]:
        return [d.monitor for d in self.devices if d.monitor is not None]

    def close(self) -> None:
        for m in self.monitors:
            try:
                m.close(timeout_s=5.0)
            except Exception as e:  # closing must not hide the error that got us here
                print(f"warning: closing monitor {m.device_id}: {e!r}", file=sys.stderr)


def _workdir(config: Config) -> tuple[pathlib.Path, bool]:
    if config.workdir is None:
        parent = None if config.keep else _scratch_parent()
        return pathlib.Path(tempfile.mkdtemp(prefix="fleetwatch-dp-", dir=parent)), True
    config.workdir.mkdir(parents=True, exist_ok=True)
    if any(config.workdir.iterdir()):
        raise ConfigError(f"workdir: {config.workdir} is not empty: give a fresh directory")
    return config.workdir, False


def build_spec(config: Config) -> tuple[Spec, float]:
    """The spec from the reference data, and f0's reference standard deviation."""
    reference = reference_columns(config.reference_rows, config.features, config.seed)
    privacy = PrivacySpec(unit=EVENT, mechanism=DISCRETE_LAPLACE,
                          epsilon_per_window=config.epsilon)
    spec = build_spec_from_columns(
        reference, model=MODEL, model_version=MODEL_VERSION, prediction_col=PREDICTION,
        options=BaselineOptions(bins=config.bins, window_length_s=config.window_s,
                                privacy=privacy))
    return spec, float(np.std(reference[SHIFTED_FEATURE]))


def _deliver(pool: concurrent.futures.ThreadPoolExecutor, monitors: list[Monitor]) -> None:
    """Poll every monitor (close, noise, spool, send) until every spool is empty."""
    todo = monitors
    for _ in range(DELIVERY_ATTEMPTS):
        done = list(pool.map(lambda m: m.poll(), todo))
        todo = [m for m, ok in zip(todo, done, strict=True) if not ok]
        if not todo:
            return
        time.sleep(0.2)
    stats = todo[0].stats()
    raise RuntimeError(f"{len(todo)} device(s) could not deliver, e.g. {todo[0].device_id}: "
                       f"{stats.last_delivery_error}")


def _cohort_evaluation(h: pb.CohortHealth | None, name: str,
                       shifted: bool) -> CohortEvaluation:
    nan = math.nan
    if h is None:  # no report in range: nothing to flag, nothing to tell
        return CohortEvaluation(name, shifted, (), ("*",), nan, nan, nan, 0, 0, 0, nan)
    signals = list(h.features) + ([h.prediction] if h.HasField("prediction") else [])
    f0 = next(f for f in h.features if f.name == SHIFTED_FEATURE)
    return CohortEvaluation(
        cohort=name, shifted_data=shifted,
        drifting=tuple(f.name for f in signals if f.drifting),
        insufficient=tuple(f.name for f in signals if f.insufficient_data),
        f0_psi=f0.psi, f0_p_value=f0.p_value, f0_expected_null_psi=f0.expected_null_psi,
        devices=h.devices, reports=h.reports, events=h.events,
        noise_sd_per_bin=h.noise_sd_per_bin)


def run(config: Config = Config(), progress: Progress | None = None) -> Results:
    """Run the experiment (see the module docstring); progress lines go to `progress`.

    Raises ConfigError for a bad workdir and RuntimeError when the fleet cannot deliver.
    """
    t0 = time.perf_counter()

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    spec, f0_sd = build_spec(config)
    plan = noise_plan(spec)
    assert plan is not None
    noise_sd = math.sqrt(plan.variance_per_bin)
    cohorts = config.cohorts()
    w = config.window_s
    # The simulated range ends at the last whole hour (then window), so it is in the past.
    end = int(time.time()) // HOUR_S * HOUR_S // w * w
    start = end - config.windows * w
    shift_at = start + config.shift_window * w
    rng = np.random.default_rng([config.seed, 1])
    fleet = _Fleet([_Device(c, f"{c.name}-{i:04d}", float(rng.uniform(0.5, 1.5)))
                    for c in cohorts for i in range(c.devices)])
    members = {c.name: [d for d in fleet.devices if d.cohort.name == c.name] for c in cohorts}
    clock = SimClock(start)
    evaluations: list[Evaluation] = []
    workdir, ours = _workdir(config)
    try:
        with _aggregator_process(workdir / DB_NAME) as target, \
                grpc.insecure_channel(target) as channel, \
                concurrent.futures.ThreadPoolExecutor(
                    config.workers, thread_name_prefix="dp-detection") as pool:
            pushed = pb_grpc.AdminStub(channel).PushSpec(spec_to_proto(spec),
                                                         timeout=RPC_TIMEOUT_S)
            say(f"aggregator on {target} (database {workdir / DB_NAME}); spec "
                f"{pushed.hash[:12]}: {len(spec.features)} features + {PREDICTION}, "
                f"{config.bins} bins, epsilon {config.epsilon:g}/window (event unit, discrete "
                f"Laplace, noise sd {noise_sd:.1f} per bin per report)")
            query = pb_grpc.QueryStub(channel)

            def make(i: int, d: _Device) -> Monitor:
                rng_noise = SeededRandom(config.seed * 1_000_003 + i) if config.seeded_noise \
                    else None
                return Monitor(MODEL, MODEL_VERSION, d.device_id, {GROUP_BY: d.cohort.name},
                               spool_dir=workdir / "spools" / d.device_id, clock=clock,
                               channel=channel, background=False, noise_rng=rng_noise)

            try:
                made = [pool.submit(make, i, d) for i, d in enumerate(fleet.devices)]
                for d, f in zip(fleet.devices, made, strict=True):
                    d.monitor = f.result()
                monitors = fleet.monitors
                if any(m.spec is None or m.spec.hash != pushed.hash for m in monitors):
                    raise RuntimeError("a monitor did not get the pushed spec over gRPC")
                names = spec.feature_names
                say(f"simulating {config.hours:g} h of {w} s windows ({config.windows} "
                    f"windows): " + ", ".join(f"{c.name} {c.devices} devices" for c in cohorts)
                    + f"; f0 of large +{config.shift_sd:g} sd from hour {config.shift_hour:g}")
                for k in range(config.windows):
                    ws = start + k * w
                    clock.set(ws + w / 2)
                    for c in cohorts:
                        group = members[c.name]
                        offset = config.shift_sd * f0_sd if c.drifts and ws >= shift_at else 0.0
                        counts = rng.poisson([config.events_per_window * d.rate for d in group])
                        cols = _generate(rng, int(counts.sum()), config.features, offset)
                        bounds = np.concatenate(([0], np.cumsum(counts)))
                        for d, lo, hi in zip(group, bounds[:-1], bounds[1:], strict=True):
                            if hi > lo and d.monitor is not None:
                                d.monitor.observe_batch({n: cols[n][lo:hi] for n in names},
                                                        predictions=cols[PREDICTION][lo:hi])
                    clock.set(ws + w + monitors[0].grace_s + 1.0)
                    _deliver(pool, monitors)
                    now = ws + w
                    if (k + 1) % config.eval_every == 0 or k + 1 == config.windows:
                        response = query.CohortHealth(pb.CohortHealthRequest(
                            model=MODEL, model_version=MODEL_VERSION, group_by=[GROUP_BY],
                            start_unix_s=now - config.lookback_s, end_unix_s=now),
                            timeout=RPC_TIMEOUT_S)
                        by_name = {h.cohort[GROUP_BY]: h for h in response.cohorts}
                        evaluations.append(Evaluation(
                            windows=k + 1, end_unix_s=now,
                            minutes_after_shift=(now - shift_at) / 60.0,
                            cohorts={c.name: _cohort_evaluation(
                                by_name.get(c.name), c.name, c.drifts and now > shift_at)
                                for c in cohorts}))
                    if (now - start) // HOUR_S != (ws - start) // HOUR_S:
                        say(_hour_line(config, evaluations, (now - start) / HOUR_S,
                                       time.perf_counter() - t0))
                stats = [m.stats() for m in monitors]
                bad = [s for s in stats if s.internal_errors or s.spool.pending
                       or s.spool.dead_letters]
                if bad:
                    raise RuntimeError(f"{len(bad)} device(s) had errors or undelivered "
                                       f"reports, e.g. {bad[0]}")
                reports = sum(s.windows_closed for s in stats)
                events = sum(s.events for s in stats)
            finally:
                fleet.close()
    finally:
        if ours and not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    results = _results(config, cohorts, spec, noise_sd, f0_sd, start, shift_at, end, reports,
                       events, elapsed, evaluations)
    say(f"done: {reports:,} reports, {events:,} events, {elapsed:.1f} s"
        + (f"; files kept in {workdir}" if config.keep or not ours else ""))
    return results


def _hour_line(config: Config, evaluations: Sequence[Evaluation], hour: float,
               elapsed_s: float) -> str:
    if not evaluations:
        return f"hour {hour:g}/{config.hours:g}: no evaluation yet, {elapsed_s:.1f} s"
    last = evaluations[-1]
    parts = []
    for name, ce in last.cohorts.items():
        flags = sum(1 for e in evaluations if e.cohorts[name].flagged
                    and not e.cohorts[name].shifted_data)
        text = f"{name}: f0 psi {ce.f0_psi:.3f} p {ce.f0_p_value:.2g}"
        if ce.drifting:
            text += f" DRIFTING {','.join(ce.drifting)}"
        elif ce.insufficient:
            text += " insufficient"
        text += f", false flags {flags}"
        parts.append(text)
    return f"hour {hour:g}/{config.hours:g} ({elapsed_s:.0f} s): " + "; ".join(parts)


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def _results(config: Config, cohorts: Sequence[Cohort], spec: Spec, noise_sd: float,
             f0_sd: float, start: int, shift_at: int, end: int, reports: int, events: int,
             elapsed_s: float, evaluations: list[Evaluation]) -> Results:
    signals = [*spec.feature_names, PREDICTION]
    stats: dict[str, CohortStats] = {}
    for c in cohorts:
        mine = [e.cohorts[c.name] for e in evaluations]
        clean = [ce for ce in mine if not ce.shifted_data]
        flagged = sum(1 for ce in clean if ce.flagged)
        insufficient = sum(1 for ce in mine if ce.insufficient)
        stats[c.name] = CohortStats(
            cohort=c.name, devices=c.devices, drifts=c.drifts, evaluations=len(mine),
            clean_evaluations=len(clean), flagged=flagged,
            false_flag_rate=flagged / len(clean) if clean else math.nan,
            per_signal_rate={s: (sum(1 for ce in clean if s in ce.drifting) / len(clean)
                                 if clean else math.nan) for s in signals},
            insufficient=insufficient,
            insufficient_share=insufficient / len(mine) if mine else math.nan,
            f0_insufficient_share=(sum(1 for ce in mine if SHIFTED_FEATURE in ce.insufficient
                                       or "*" in ce.insufficient) / len(mine)
                                   if mine else math.nan),
            f0_psi_clean_median=_median([ce.f0_psi for ce in clean]),
            f0_psi_clean_max=max((ce.f0_psi for ce in clean if math.isfinite(ce.f0_psi)),
                                 default=math.nan))
    drifting = next(c for c in cohorts if c.drifts)
    after = [e for e in evaluations if e.cohorts[drifting.name].shifted_data]
    first = next((e for e in after if SHIFTED_FEATURE in e.cohorts[drifting.name].drifting),
                 None)
    full = [e for e in after if e.end_unix_s - config.lookback_s >= shift_at]
    others: dict[str, int] = {}
    for e in after:
        for s in e.cohorts[drifting.name].drifting:
            if s != SHIFTED_FEATURE:
                others[s] = others.get(s, 0) + 1
    if first is None:
        detection = Detection(False, None, None, None, None, False, len(full),
                              _full_rate(full, drifting.name), others)
    else:
        ce = first.cohorts[drifting.name]
        minutes = first.minutes_after_shift
        detection = Detection(True, (first.end_unix_s - shift_at) // config.window_s, minutes,
                              ce.f0_psi, ce.f0_p_value, minutes <= 60.0, len(full),
                              _full_rate(full, drifting.name), others)
    clean_pairs = sum(s.clean_evaluations for s in stats.values())
    false_flags = sum(s.flagged for s in stats.values())
    return Results(
        config=config, spec_hash=spec.hash, noise_sd_per_bin_per_report=noise_sd,
        f0_reference_sd=f0_sd, start_unix_s=start, shift_unix_s=shift_at, end_unix_s=end,
        reports=reports, events=events, elapsed_s=elapsed_s, evaluations=evaluations,
        cohorts=stats, detection=detection, clean_pairs=clean_pairs, false_flags=false_flags,
        false_flag_rate=false_flags / clean_pairs if clean_pairs else math.nan,
        small_ever_flagged=any(e.cohorts["small"].flagged for e in evaluations))


def _full_rate(full: Sequence[Evaluation], name: str) -> float:
    if not full:
        return math.nan
    return sum(1 for e in full if SHIFTED_FEATURE in e.cohorts[name].drifting) / len(full)


# -- output -----------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.2f}%"


def render(r: Results) -> str:
    c = r.config
    lines = [
        f"DP drift detection: epsilon {c.epsilon:g} per window, unit event, discrete Laplace "
        f"(noise sd {r.noise_sd_per_bin_per_report:.1f} per bin per report), "
        f"{c.features} features + {PREDICTION}, {c.bins} bins",
        f"{c.hours:g} simulated hours of {c.window_s} s windows, {c.events_per_window:g} events "
        f"per window per device, evaluated every {c.eval_every} window(s) over the trailing "
        f"{c.lookback_s // 60:g} min; {r.reports:,} reports, {r.events:,} events, "
        f"{r.elapsed_s:.0f} s",
        "",
        f"{'cohort':<8} {'devices':>7}  {'drift':<16} {'clean evals':>11} {'flagged':>7} "
        f"{'false-flag rate':>15} {'insufficient':>12} {'f0 PSI clean med/max':>21}",
    ]
    for s in r.cohorts.values():
        drift = (f"f0 +{c.shift_sd:g} sd @{c.shift_hour:g}h" if s.drifts else "none")
        lines.append(
            f"{s.cohort:<8} {s.devices:>7}  {drift:<16} {s.clean_evaluations:>11} "
            f"{s.flagged:>7} {_pct(s.false_flag_rate):>15} {_pct(s.insufficient_share):>12} "
            f"{s.f0_psi_clean_median:>10.4f}/{s.f0_psi_clean_max:.4f}")
    lines.append("")
    d = r.detection
    if d.flagged:
        lines.append(f"detection (large, f0): flagged {d.windows_after_shift} window(s) = "
                     f"{d.minutes_after_shift:g} min after the shift (PSI {d.psi:.3f}, "
                     f"p {d.p_value:.2g}); within the first hour: "
                     f"{'yes' if d.within_hour else 'NO'}")
    else:
        lines.append("detection (large, f0): NEVER flagged after the shift")
    lines.append(f"  once the lookback held shifted data only: f0 flagged in "
                 f"{_pct(d.full_lookback_flag_rate)} of {d.full_lookback_evaluations} "
                 f"evaluations; other signals flagged after the shift: "
                 + (", ".join(f"{k} {v}x" for k, v in sorted(d.other_signal_flags.items()))
                    or "none"))
    lines.append(f"false-flag rate over no-drift (cohort, evaluation) pairs: {r.false_flags} / "
                 f"{r.clean_pairs} = {_pct(r.false_flag_rate)}")
    per_signal = [f"{s.cohort}:{k} {_pct(v)}" for s in r.cohorts.values()
                  for k, v in s.per_signal_rate.items() if v]
    lines.append("  per signal: " + (", ".join(per_signal) or "no signal ever flagged"))
    small = r.cohorts["small"]
    lines.append(f"small cohort ever flagged: {'YES' if r.small_ever_flagged else 'no'}; "
                 f"marked insufficient_data in {_pct(small.insufficient_share)} of "
                 f"{small.evaluations} evaluations (f0: {_pct(small.f0_insufficient_share)})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        description="Drift detection under differential privacy, end to end: a real "
        "aggregator, one real Monitor per simulated device, epsilon per window with the "
        "event unit. Cohort 'small' (5 devices) and 'medium' (50) never drift; 'large' "
        "(200) has f0 shifted by --shift-sd reference standard deviations from "
        "--shift-hour on. Prints a line per simulated hour and a final table.",
        epilog="A full day at 60 s windows is ~370k reports (15+ min); --window 300 makes it "
        "~75k. Example: python scripts/dp_detection.py --hours 24 --window 300 --json r.json")
    p.add_argument("--hours", type=float, default=d.hours,
                   help=f"simulated hours (default {d.hours:g})")
    p.add_argument("--window", type=int, default=d.window_s, metavar="SECONDS",
                   help=f"window length in seconds (default {d.window_s})")
    p.add_argument("--events-per-window", type=float, default=d.events_per_window,
                   metavar="N", help="mean events per device per window (default "
                   f"{d.events_per_window:g}; each device has its own rate factor in [0.5, 1.5])")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="WINDOWS",
                   help="query cohort health every this many windows (default: every window)")
    p.add_argument("--lookback", type=int, default=d.lookback_s // 60, metavar="MINUTES",
                   help="the health query covers the trailing MINUTES ending at the current "
                   f"window's end (default {d.lookback_s // 60})")
    p.add_argument("--shift-hour", type=float, default=d.shift_hour,
                   help=f"hour at which large's f0 shifts (default {d.shift_hour:g})")
    p.add_argument("--shift-sd", type=float, default=d.shift_sd,
                   help=f"f0's shift in reference standard deviations (default {d.shift_sd:g})")
    p.add_argument("--epsilon", type=float, default=d.epsilon,
                   help=f"epsilon per window, event unit (default {d.epsilon:g})")
    p.add_argument("--small", type=int, default=d.small_devices, metavar="DEVICES",
                   help=f"devices in the small no-drift cohort (default {d.small_devices})")
    p.add_argument("--medium", type=int, default=d.medium_devices, metavar="DEVICES",
                   help="devices in the medium no-drift cohort, 0 for none "
                   f"(default {d.medium_devices})")
    p.add_argument("--large", type=int, default=d.large_devices, metavar="DEVICES",
                   help=f"devices in the drifting cohort (default {d.large_devices})")
    p.add_argument("--features", type=int, default=d.features,
                   help=f"numeric features, {MIN_FEATURES}-{MAX_FEATURES} (default {d.features})")
    p.add_argument("--reference-rows", type=int, default=d.reference_rows,
                   help=f"reference rows for the spec (default {d.reference_rows:,})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the simulated data (default {d.seed})")
    p.add_argument("--seeded-noise", action="store_true",
                   help="draw the DP noise from a seeded source (reproducible; NOT private) "
                   "instead of the OS's secure one")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"threads delivering reports (default {d.workers})")
    p.add_argument("--workdir", type=pathlib.Path, default=None,
                   help="keep the aggregator database and spools here (an empty directory)")
    p.add_argument("--json", type=pathlib.Path, default=None, metavar="PATH",
                   help="also write the results (config, every evaluation, summary) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config(hours=args.hours, window_s=args.window,
                        events_per_window=args.events_per_window, eval_every=args.eval_every,
                        lookback_s=args.lookback * 60, shift_hour=args.shift_hour,
                        shift_sd=args.shift_sd, epsilon=args.epsilon,
                        small_devices=args.small, medium_devices=args.medium,
                        large_devices=args.large, features=args.features,
                        reference_rows=args.reference_rows, seed=args.seed,
                        seeded_noise=args.seeded_noise, workers=args.workers,
                        workdir=args.workdir)
        results = run(config, progress=None if args.quiet else
                      (lambda m: print(m, flush=True)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(results.table())
    if args.json is not None:
        args.json.write_text(json.dumps(results.to_dict(), indent=1) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
