"""A simulated fleet: many `Monitor`s on a simulated clock, with drift and incidents injected.

    truth = run_fleet(FleetConfig(devices=200, minutes=30), target="127.0.0.1:7070",
                      spool_root=Path("/tmp/spools"), start_unix_s=start, progress=print)
    truth.cohort({"region": "eu", "hw": "jetson"}).events

The simulated model is an edge camera detector. Its reference (training) data and the live
traffic of every device come from one generator (`reference_columns` and the fleet share it),
so a cohort without injected changes looks exactly like the reference, up to sampling noise.
Two changes can be injected, each into the devices matching a label selector:

- `Drift`: from a given minute on, numeric features shift by a number of their standard
  deviations and categorical features follow another mix (a camera firmware update, say).
- `Incident`: over a range of minutes, latencies are multiplied by a factor (thermal
  throttling, say).

`run_fleet` drives one real `Monitor` per device (all sharing one gRPC channel, no background
threads) against a live aggregator and returns a `FleetTruth`: exactly what the fleet observed
per cohort, so tests and benchmarks can compare the aggregator's answers with it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from agent.errors import ConfigError
from agent.monitor import Monitor
from agent.spec import CATEGORICAL, FeatureSpec, Spec
from aggregator.baseline import bin_numeric

__all__ = [
    "CATEGORICAL_FEATURES",
    "LATENCY_COLUMN",
    "NUMERIC_FEATURES",
    "PREDICTION_COLUMN",
    "CohortTruth",
    "Drift",
    "FleetConfig",
    "FleetTruth",
    "Incident",
    "SimClock",
    "cohort_key",
    "reference_columns",
    "run_fleet",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

PREDICTION_COLUMN = "score"
LATENCY_COLUMN = "latency_ms"
# Ground truth: 1 when the camera really saw an object. Drawn as Bernoulli(score), so the
# simulated model is calibrated on clean traffic; `Drift.label_flip` makes it wrong.
LABEL_COLUMN = "label"
MINUTE_S = 60
# Reference latency: lognormal with this median (ms) and log-space sigma; p95 is about 46 ms.
LATENCY_MEDIAN_MS = 26.0
LATENCY_SIGMA = 0.35


# -- the generator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _NumericFeature:
    """How one numeric input feature is drawn, and the unit and bounds of a drift shift."""

    name: str
    draw: Callable[[np.random.Generator, int], np.ndarray]
    sd: float  # about one standard deviation: the unit of `Drift.numeric_shift`
    low: float = -math.inf
    high: float = math.inf
    integer: bool = False


NUMERIC_FEATURES: tuple[_NumericFeature, ...] = (
    _NumericFeature("brightness", lambda rng, n: rng.beta(5.0, 4.0, n), 0.157, 0.0, 1.0),
    _NumericFeature("contrast", lambda rng, n: rng.beta(4.0, 6.0, n), 0.148, 0.0, 1.0),
    _NumericFeature("sharpness", lambda rng, n: rng.lognormal(4.5, 0.4, n), 39.0, 0.0),
    _NumericFeature("noise_sigma", lambda rng, n: rng.gamma(2.0, 1.5, n), 2.12, 0.0),
    _NumericFeature("exposure_ms", lambda rng, n: rng.lognormal(2.0, 0.5, n), 4.4, 0.0),
    _NumericFeature("motion", lambda rng, n: rng.exponential(0.3, n), 0.3, 0.0),
    _NumericFeature("edge_density", lambda rng, n: rng.normal(0.3, 0.06, n), 0.06, 0.0, 1.0),
    _NumericFeature("object_count", lambda rng, n: rng.poisson(3.0, n).astype(np.float64),
                    1.73, 0.0, integer=True),
)

# Categorical features: value -> probability in the reference.
CATEGORICAL_FEATURES: Mapping[str, Mapping[str, float]] = {
    "scene": {"day": 0.5, "night": 0.2, "indoor": 0.2, "dusk": 0.1},
    "lens": {"standard": 0.6, "wide": 0.3, "fisheye": 0.1},
}

_NUMERIC_BY_NAME = {f.name: f for f in NUMERIC_FEATURES}


def _mix(probabilities: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Values (an object array of str, for Monitor's categorical binner) and probabilities."""
    values = np.empty(len(probabilities), dtype=object)
    values[:] = list(probabilities)
    p = np.asarray(list(probabilities.values()), dtype=np.float64)
    return values, p / p.sum()


@dataclass
class _Batch:
    """Generated rows: the columns a model sees, plus how the categorical ones were coded."""

    columns: dict[str, np.ndarray]
    codes: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (values, code per row)
    errors: np.ndarray
    labels: np.ndarray  # bool ground truth per row

    def __len__(self) -> int:
        return int(self.errors.size)


def _generate(rng: np.random.Generator, n: int, *,
              numeric_shift: Mapping[str, float] | None = None,
              category_mix: Mapping[str, Mapping[str, float]] | None = None,
              latency_factor: float = 1.0, error_rate: float = 0.0,
              label_flip: float = 0.0) -> _Batch:
    """n rows of features, prediction score and latency; the same code for reference and fleet.

    With no shift, no mix and latency_factor 1, the rows follow the reference distribution.
    """
    numeric_shift = numeric_shift or {}
    category_mix = category_mix or {}
    columns: dict[str, np.ndarray] = {}
    codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in NUMERIC_FEATURES:
        x = f.draw(rng, n)
        shift = numeric_shift.get(f.name, 0.0)
        if shift:
            x = x + shift * f.sd
            if f.integer:
                x = np.round(x)
            x = np.clip(x, f.low, f.high)
        columns[f.name] = x
    for name, reference_mix in CATEGORICAL_FEATURES.items():
        values, p = _mix(category_mix.get(name, reference_mix))
        code = rng.choice(values.size, size=n, p=p)
        columns[name] = values[code]
        codes[name] = (values, code)
    # The model's score: a logistic function of a few features plus noise.
    z = (1.2 * (columns["brightness"] - 0.55) / 0.157
         + 0.8 * np.log(np.maximum(columns["sharpness"], 1e-3) / 90.0) / 0.4
         + 0.5 * (columns["object_count"] - 3.0) / 1.73
         - 0.6 * (columns["noise_sigma"] - 3.0) / 2.12
         + rng.normal(0.0, 0.8, n))
    columns[PREDICTION_COLUMN] = 1.0 / (1.0 + np.exp(-z))
    latency = rng.lognormal(math.log(LATENCY_MEDIAN_MS), LATENCY_SIGMA, n) * latency_factor
    columns[LATENCY_COLUMN] = latency.astype(np.float32)
    errors = rng.random(n) < error_rate if error_rate > 0 else np.zeros(n, dtype=bool)
    labels = rng.random(n) < columns[PREDICTION_COLUMN]
    if label_flip > 0:
        labels ^= rng.random(n) < label_flip
    return _Batch(columns, codes, errors, labels)


def reference_columns(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Reference (training) data of the simulated edge camera model.

    Columns: 8 numeric features (brightness and contrast in [0, 1], lognormal sharpness and
    exposure_ms, gamma noise_sigma, exponential motion, normal edge_density, integer
    object_count), 2 categorical ones (scene, lens: object arrays of str), the prediction
    `score` in (0, 1) and `latency_ms` (lognormal, median 26 ms). Build a spec with
    ``prediction_col=PREDICTION_COLUMN, latency_col=LATENCY_COLUMN``.
    """
    if rows < 1:
        raise ConfigError(f"rows must be at least 1, got {rows}")
    batch = _generate(np.random.default_rng([seed, 0]), rows)
    return {**batch.columns, LABEL_COLUMN: batch.labels.astype(np.int64)}


# -- configuration ----------------------------------------------------------------------------


def _check_selector(what: str, selector: Mapping[str, str],
                    known: Mapping[str, tuple[str, ...]]) -> None:
    if not selector:
        raise ConfigError(f"{what}.selector must name at least one label")
    for key, value in selector.items():
        if key not in known:
            raise ConfigError(f"{what}.selector: unknown label {key!r} (labels are "
                              f"{', '.join(sorted(known))})")
        if value not in known[key]:
            raise ConfigError(f"{what}.selector: {key}={value!r} matches no device ({key} is "
                              f"one of {', '.join(known[key])})")


@dataclass(frozen=True)
class Drift:
    """Covariate drift in the devices matching `selector`, from `start_minute` to the end.

    The default tells of a camera firmware update on the eu/jetson units whose auto-exposure
    regressed: darker images, longer exposures, and more scenes classified as night; the
    model's answers go wrong too (`label_flip`: that share of ground-truth labels disagrees
    with what a calibrated model would expect), so its accuracy drops.

    `numeric_shift` moves numeric features by that many of their standard deviations (then
    clips them to their natural range); `category_mix` replaces a categorical feature's
    value probabilities (values outside the reference vocabulary are allowed).
    """

    selector: Mapping[str, str] = field(
        default_factory=lambda: {"region": "eu", "hw": "jetson"})
    start_minute: int = 5
    numeric_shift: Mapping[str, float] = field(
        default_factory=lambda: {"brightness": -1.2, "exposure_ms": 0.6})
    category_mix: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: {"scene": {"day": 0.2, "night": 0.5, "indoor": 0.2,
                                           "dusk": 0.1}})
    label_flip: float = 0.35

    def __post_init__(self) -> None:
        if self.start_minute < 0:
            raise ConfigError(f"Drift.start_minute must not be negative, got {self.start_minute}")
        if not 0 <= self.label_flip <= 1:
            raise ConfigError(f"Drift.label_flip must be in [0, 1], got {self.label_flip}")
        for name, shift in self.numeric_shift.items():
            if name not in _NUMERIC_BY_NAME:
                raise ConfigError(f"Drift.numeric_shift: unknown numeric feature {name!r} "
                                  f"(known: {', '.join(_NUMERIC_BY_NAME)})")
            if not math.isfinite(shift):
                raise ConfigError(f"Drift.numeric_shift[{name!r}] must be finite")
        for name, mix in self.category_mix.items():
            if name not in CATEGORICAL_FEATURES:
                raise ConfigError(f"Drift.category_mix: unknown categorical feature {name!r} "
                                  f"(known: {', '.join(CATEGORICAL_FEATURES)})")
            if not mix or any(not (p >= 0 and math.isfinite(p)) for p in mix.values()) \
                    or sum(mix.values()) <= 0:
                raise ConfigError(f"Drift.category_mix[{name!r}] needs non-negative, finite "
                                  "probabilities with a positive sum")


@dataclass(frozen=True)
class Incident:
    """Latencies multiplied by `factor` in the devices matching `selector`, for the minutes
    in [start_minute, end_minute) (`end_minute` None: until the end).

    The default tells of thermal throttling on the us/pi units: 4x latency from minute 10.
    """

    selector: Mapping[str, str] = field(default_factory=lambda: {"region": "us", "hw": "pi"})
    start_minute: int = 10
    end_minute: int | None = None
    factor: float = 4.0

    def __post_init__(self) -> None:
        if self.start_minute < 0:
            raise ConfigError(f"Incident.start_minute must not be negative, got "
                              f"{self.start_minute}")
        if self.end_minute is not None and self.end_minute <= self.start_minute:
            raise ConfigError(f"Incident.end_minute ({self.end_minute}) must be after "
                              f"start_minute ({self.start_minute})")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"Incident.factor must be a positive number, got {self.factor}")

    def active(self, minute: int) -> bool:
        return self.start_minute <= minute and (self.end_minute is None
                                                or minute < self.end_minute)


@dataclass(frozen=True)
class FleetConfig:
    """A simulated fleet: devices spread evenly over regions x hardware cohorts.

    Each device sees Poisson(`events_per_minute` x its own rate factor) events per minute;
    all but `single_events_per_window` of them go through `Monitor.observe_batch`, the rest
    through `Monitor.observe` one by one. `hw_latency_factor` scales latencies per hardware
    (keep it under 1.5, the slow threshold, or that hardware looks slow everywhere).

    Ground truth: a share `label_rate` of the events is observed with a request id and gets
    its label `label_delay_minutes` later (uniform over 1..that many minutes) through
    `Monitor.label_batch`; labels due after the last minute never arrive. Device ids are
    `{device_prefix}-{region}-{hw}-{index}`: give each fleet of one aggregator its own prefix
    (the aggregator deduplicates on device id and sequence number).
    """

    devices: int = 200
    regions: tuple[str, ...] = ("eu", "us", "apac", "latam")
    hardware: tuple[str, ...] = ("jetson", "pi")
    minutes: int = 30
    events_per_minute: float = 150.0
    single_events_per_window: int = 3
    error_rate: float = 0.005
    hw_latency_factor: Mapping[str, float] = field(
        default_factory=lambda: {"jetson": 0.9, "pi": 1.2})
    drift: Drift | None = field(default_factory=Drift)
    incident: Incident | None = field(default_factory=Incident)
    model: str = "detector"
    model_version: str = "1"
    seed: int = 7
    workers: int = 8  # threads that spool and deliver closed windows
    label_rate: float = 0.6
    label_delay_minutes: int = 3
    device_prefix: str = "cam"

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "hardware", tuple(self.hardware))
        if not self.regions or not self.hardware:
            raise ConfigError("FleetConfig.regions and FleetConfig.hardware must not be empty")
        for what, values in (("regions", self.regions), ("hardware", self.hardware)):
            if len(set(values)) != len(values) or not all(values):
                raise ConfigError(f"FleetConfig.{what} must be distinct non-empty names")
        if self.devices < self.cohort_count:
            raise ConfigError(f"FleetConfig.devices ({self.devices}) must be at least the "
                              f"number of cohorts ({self.cohort_count})")
        if self.minutes < 1:
            raise ConfigError(f"FleetConfig.minutes must be at least 1, got {self.minutes}")
        if not (math.isfinite(self.events_per_minute) and self.events_per_minute > 0):
            raise ConfigError("FleetConfig.events_per_minute must be positive")
        if self.single_events_per_window < 0:
            raise ConfigError("FleetConfig.single_events_per_window must not be negative")
        if not 0 <= self.error_rate < 1:
            raise ConfigError(f"FleetConfig.error_rate must be in [0, 1), got {self.error_rate}")
        for hw, factor in self.hw_latency_factor.items():
            if not (math.isfinite(factor) and factor > 0):
                raise ConfigError(f"FleetConfig.hw_latency_factor[{hw!r}] must be positive")
        if self.workers < 1:
            raise ConfigError("FleetConfig.workers must be at least 1")
        if not 0 <= self.label_rate <= 1:
            raise ConfigError(f"FleetConfig.label_rate must be in [0, 1], got {self.label_rate}")
        if self.label_delay_minutes < 1:
            raise ConfigError("FleetConfig.label_delay_minutes must be at least 1")
        if not self.device_prefix or any(c in self.device_prefix for c in ",= "):
            raise ConfigError(f"FleetConfig.device_prefix {self.device_prefix!r} must be a "
                              "non-empty name without ',', '=' or spaces")
        known = {"region": self.regions, "hw": self.hardware}
        if self.drift is not None:
            _check_selector("drift", self.drift.selector, known)
            if self.drift.start_minute >= self.minutes:
                raise ConfigError(f"drift.start_minute ({self.drift.start_minute}) must be "
                                  f"before the end ({self.minutes} minutes)")
        if self.incident is not None:
            _check_selector("incident", self.incident.selector, known)
            if self.incident.start_minute >= self.minutes:
                raise ConfigError(f"incident.start_minute ({self.incident.start_minute}) "
                                  f"must be before the end ({self.minutes} minutes)")

    @property
    def cohort_count(self) -> int:
        return len(self.regions) * len(self.hardware)

    def cohorts(self) -> list[dict[str, str]]:
        """The label sets of the cohorts, regions outer, hardware inner."""
        return [{"region": r, "hw": h} for r in self.regions for h in self.hardware]


# -- the truth --------------------------------------------------------------------------------


def cohort_key(labels: Mapping[str, str]) -> str:
    """Canonical "k1=v1,k2=v2" form (keys sorted), as the aggregator interns label sets."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


@dataclass
class CohortTruth:
    """Exactly what the devices of one cohort observed.

    `feature_counts` and `prediction_counts` are histograms in the spec's layouts (see
    `agent.spec`), counted here independently of the agent's binning; `latencies_ms` holds
    every latency observed (float32, as the agent's sketch takes them). `ground_truth()` gives
    every label delivered: its ground truth, the prediction score it joins, its latency and the
    minute it arrived in.
    """

    labels: dict[str, str]
    devices: int = 0
    events: int = 0
    errors: int = 0
    feature_counts: dict[str, np.ndarray] = field(default_factory=dict)
    prediction_counts: np.ndarray | None = None
    _latency_parts: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _label_parts: list[tuple[int, np.ndarray, np.ndarray, float]] = field(
        default_factory=list, init=False, repr=False)

    def add_labels(self, minute: int, y_true: np.ndarray, scores: np.ndarray,
                   latency_s: float) -> None:
        self._label_parts.append((minute, np.asarray(y_true, bool),
                                  np.asarray(scores, np.float64), float(latency_s)))

    def ground_truth(self, first_minute: int = 0, end_minute: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y_true, score, label latency in s) of the labels that arrived in the minutes
        [first_minute, end_minute)."""
        parts = [p for p in self._label_parts
                 if p[0] >= first_minute and (end_minute is None or p[0] < end_minute)]
        if not parts:
            return np.empty(0, bool), np.empty(0), np.empty(0)
        return (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                np.concatenate([np.full(p[1].size, p[3]) for p in parts]))

    def add_latencies(self, latencies_ms: np.ndarray) -> None:
        self._latency_parts.append(np.asarray(latencies_ms, dtype=np.float32))

    @property
    def latencies_ms(self) -> np.ndarray:
        if len(self._latency_parts) != 1:
            self._latency_parts = [np.concatenate(self._latency_parts)
                                   if self._latency_parts else np.empty(0, np.float32)]
        return self._latency_parts[0]

    @property
    def error_rate(self) -> float:
        return self.errors / self.events if self.events else math.nan


@dataclass
class FleetTruth:
    """What the whole fleet observed, per cohort (keyed by `cohort_key`)."""

    cohorts: dict[str, CohortTruth]
    spec_hash: str
    start_unix_s: int
    end_unix_s: int
    devices: int
    events: int = 0
    errors: int = 0
    reports: int = 0
    elapsed_s: float = 0.0

    def cohort(self, labels: Mapping[str, str]) -> CohortTruth:
        """The truth of the cohort with exactly these labels (KeyError when unknown)."""
        return self.cohorts[cohort_key(labels)]


class _TruthCounter:
    """Counts generated rows into spec-layout histograms, without the agent's binners."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._vocab_index = {f.name: {v: i for i, v in enumerate(f.vocabulary)}
                             for f in spec.features if f.type == CATEGORICAL}

    def _count(self, feature: FeatureSpec, batch: _Batch) -> np.ndarray:
        if feature.type != CATEGORICAL:
            return bin_numeric(np.asarray(feature.edges), batch.columns[feature.name])
        values, code = batch.codes[feature.name]
        per_value = np.bincount(code, minlength=values.size)
        counts = np.zeros(feature.histogram_length, dtype=np.int64)
        index = self._vocab_index[feature.name]
        other = feature.histogram_length - 2
        for value, n in zip(values, per_value, strict=True):
            counts[index.get(value, other)] += int(n)
        return counts

    def add(self, truth: CohortTruth, batch: _Batch) -> None:
        truth.events += len(batch)
        truth.errors += int(np.count_nonzero(batch.errors))
        for f in self.spec.features:
            counts = self._count(f, batch)
            if f.name in truth.feature_counts:
                truth.feature_counts[f.name] += counts
            else:
                truth.feature_counts[f.name] = counts
        if self.spec.prediction is not None:
            counts = self._count(self.spec.prediction, batch)
            if truth.prediction_counts is None:
                truth.prediction_counts = counts
            else:
                truth.prediction_counts += counts
        truth.add_latencies(batch.columns[LATENCY_COLUMN])


# -- the simulation ---------------------------------------------------------------------------


class SimClock:
    """A clock the simulator moves; every Monitor reads it (`clock=sim_clock`)."""

    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def set(self, t: float) -> None:
        if t < self.now:
            raise ValueError(f"the simulated clock only moves forward ({t} < {self.now})")
        self.now = float(t)


@dataclass
class _Device:
    device_id: str
    labels: dict[str, str]
    cohort: str
    rate: float
    events: int = 0
    monitor: Monitor | None = None
    # arrival minute -> (request ids, ground truth, scores, delay in minutes) of labels due
    pending_labels: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]] = field(
        default_factory=dict)


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _observe(monitor: Monitor, batch: _Batch, lo: int, hi: int, singles: int,
             names: tuple[str, ...], request_ids: np.ndarray) -> None:
    """Rows [lo, hi) of the batch: the bulk through observe_batch, the tail one by one.

    `request_ids` holds one entry per row of [lo, hi): an id, or None for no label."""
    cut = max(lo, hi - singles)
    cols = batch.columns
    if cut > lo:
        monitor.observe_batch({name: cols[name][lo:cut] for name in names},
                              predictions=cols[PREDICTION_COLUMN][lo:cut],
                              latency_ms=cols[LATENCY_COLUMN][lo:cut],
                              errors=batch.errors[lo:cut],
                              request_ids=request_ids[:cut - lo])
    if hi > cut:
        rows = {name: cols[name][cut:hi].tolist() for name in names}
        scores = cols[PREDICTION_COLUMN][cut:hi].tolist()
        latencies = cols[LATENCY_COLUMN][cut:hi].tolist()
        errors = batch.errors[cut:hi].tolist()
        ids = request_ids[cut - lo:].tolist()
        for i in range(hi - cut):
            monitor.observe({name: rows[name][i] for name in names}, prediction=scores[i],
                            latency_ms=latencies[i], error=errors[i], request_id=ids[i])


def _plan_labels(d: _Device, batch: _Batch, lo: int, hi: int, minute: int,
                 config: FleetConfig, rng: np.random.Generator) -> np.ndarray:
    """Pick the rows of [lo, hi) that will get a label, schedule their labels on the device,
    and return the request ids to observe them with (None for the other rows)."""
    ids = np.full(hi - lo, None, dtype=object)
    if config.label_rate <= 0:
        return ids
    chosen = np.flatnonzero(rng.random(hi - lo) < config.label_rate)
    if chosen.size == 0:
        return ids
    ids[chosen] = [f"{d.device_id}:{minute}:{j}" for j in chosen.tolist()]
    delays = rng.integers(1, config.label_delay_minutes + 1, size=chosen.size)
    for delay in np.unique(delays).tolist():
        pick = chosen[delays == delay]
        d.pending_labels.setdefault(minute + delay, []).append(
            (ids[pick], batch.labels[lo + pick], batch.columns[PREDICTION_COLUMN][lo + pick],
             delay))
    return ids


def _deliver_labels(d: _Device, minute: int, truth: CohortTruth) -> None:
    """The labels due in this minute, through Monitor.label_batch; recorded in the truth."""
    for ids, y_true, scores, delay in d.pending_labels.pop(minute, ()):
        if d.monitor is not None:
            d.monitor.label_batch(ids, y_true)
            truth.add_labels(minute, y_true, scores, delay * MINUTE_S)


def run_fleet(config: FleetConfig, target: str, spool_root: pathlib.Path, start_unix_s: int,
              progress: Progress | None = None) -> FleetTruth:
    """Simulate `config` against the aggregator at `target` ("host:port").

    The aggregator must already hold the spec for config.model/model_version (the monitors
    fetch it). Minute m covers [start_unix_s + 60 m, start_unix_s + 60 (m + 1)); start_unix_s
    should be a multiple of 60 so that minutes are the spec's windows. Every device's events
    of a minute are observed at the middle of the minute; then the clock moves past the
    window's end and its grace period, and the devices spool and deliver the closed window
    (on `config.workers` threads, overlapping the next minute's generation). At the end every
    monitor is flushed and closed. Each device spools under `spool_root / device_id`;
    `spool_root` must be empty or absent (leftover reports would be delivered too).

    Raises ConfigError for a non-empty spool_root and RuntimeError when a monitor has no spec
    or could not deliver everything.
    """
    t0 = time.perf_counter()
    spool_root = pathlib.Path(spool_root)
    if spool_root.exists() and any(spool_root.iterdir()):
        raise ConfigError(f"spool_root {spool_root} is not empty: give a fresh directory")

    def report(message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(message)

    rng = np.random.default_rng([config.seed, 1])
    cohorts = {cohort_key(labels): labels for labels in config.cohorts()}
    keys = list(cohorts)
    devices: list[_Device] = []
    for i in range(config.devices):
        key = keys[i % len(keys)]
        labels = dict(cohorts[key])
        device_id = f"{config.device_prefix}-{labels['region']}-{labels['hw']}-{i:04d}"
        devices.append(_Device(device_id, labels, key, float(rng.uniform(0.5, 1.5))))
    members: dict[str, list[_Device]] = {k: [d for d in devices if d.cohort == k] for k in keys}

    clock = SimClock(start_unix_s)
    channel = grpc.insecure_channel(target)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers,
                                                 thread_name_prefix="fleet-sim")
    try:
        def make(d: _Device) -> Monitor:
            return Monitor(config.model, config.model_version, d.device_id, d.labels,
                           spool_dir=spool_root / d.device_id, clock=clock, channel=channel,
                           background=False)

        failures = []
        for d, created in zip(devices, [pool.submit(make, d) for d in devices], strict=True):
            try:
                d.monitor = created.result()
            except Exception as e:  # keep the others, so that they are closed below
                failures.append(e)
        if failures:
            raise failures[0]
        monitors = [d.monitor for d in devices if d.monitor is not None]
        spec = monitors[0].spec
        if spec is None or any(m.spec is None or m.spec.hash != spec.hash for m in monitors):
            raise RuntimeError(f"the aggregator at {target} has no (single) spec for "
                               f"{config.model}/{config.model_version}: push the spec first")
        if spec.window_length_s != MINUTE_S:
            raise RuntimeError(f"the simulator works in 60 s windows; the spec has "
                               f"{spec.window_length_s} s")
        names = spec.feature_names
        counter = _TruthCounter(spec)
        truth = FleetTruth(
            cohorts={k: CohortTruth(dict(cohorts[k])) for k in keys},
            spec_hash=spec.hash, start_unix_s=start_unix_s,
            end_unix_s=start_unix_s + config.minutes * MINUTE_S, devices=len(devices))
        report(f"simulating {len(devices)} devices in {len(keys)} cohorts over "
               f"{config.minutes} minutes (spec {spec.hash[:12]})")

        every = max(1, config.minutes // 10)
        pending: list[concurrent.futures.Future[bool]] = []
        for minute in range(config.minutes):
            window_start = start_unix_s + minute * MINUTE_S
            clock.set(window_start + MINUTE_S / 2)
            for key in keys:
                for d in members[key]:
                    _deliver_labels(d, minute, truth.cohorts[key])
            for key in keys:
                labels = cohorts[key]
                drift = config.drift if (config.drift is not None
                                         and _matches(labels, config.drift.selector)
                                         and minute >= config.drift.start_minute) else None
                factor = config.hw_latency_factor.get(labels["hw"], 1.0)
                if (config.incident is not None and config.incident.active(minute)
                        and _matches(labels, config.incident.selector)):
                    factor *= config.incident.factor
                group = members[key]
                counts = rng.poisson([config.events_per_minute * d.rate for d in group])
                batch = _generate(rng, int(counts.sum()),
                                  numeric_shift=drift.numeric_shift if drift else None,
                                  category_mix=drift.category_mix if drift else None,
                                  latency_factor=factor, error_rate=config.error_rate,
                                  label_flip=drift.label_flip if drift else 0.0)
                bounds = np.concatenate(([0], np.cumsum(counts)))
                for d, lo, hi in zip(group, bounds[:-1], bounds[1:], strict=True):
                    if hi > lo and d.monitor is not None:
                        d.events += int(hi - lo)
                        ids = _plan_labels(d, batch, int(lo), int(hi), minute, config, rng)
                        _observe(d.monitor, batch, int(lo), int(hi),
                                 config.single_events_per_window, names, ids)
                counter.add(truth.cohorts[key], batch)
                truth.events += len(batch)
                truth.errors += int(np.count_nonzero(batch.errors))
            # Past the window's end and the grace period: poll closes, spools and delivers it.
            for f in pending:
                f.result()
            clock.set(window_start + MINUTE_S + monitors[0].grace_s + 1.0)
            pending = [pool.submit(m.poll) for m in monitors]
            if (minute + 1) % every == 0 or minute + 1 == config.minutes:
                report(f"minute {minute + 1}/{config.minutes}: {truth.events:,} events, "
                       f"{time.perf_counter() - t0:.1f} s")
        for f in pending:
            f.result()
        for key in keys:
            truth.cohorts[key].devices = sum(1 for d in members[key] if d.events)
        report(f"flushing {len(monitors)} devices")
        delivered = list(pool.map(lambda m: m.flush(), monitors))
        stats = [m.stats() for m in monitors]
        truth.reports = sum(s.windows_closed for s in stats)
        problems = [(d.device_id, s) for d, s, ok in zip(devices, stats, delivered, strict=True)
                    if not ok or s.internal_errors or s.spool.pending or s.spool.dead_letters]
        if problems:
            device_id, s = problems[0]
            raise RuntimeError(f"{len(problems)} device(s) did not deliver everything, e.g. "
                               f"{device_id}: {s}")
        observed = sum(s.events for s in stats)
        if observed != truth.events:
            raise RuntimeError(f"monitors counted {observed} events, the simulator made "
                               f"{truth.events}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no poll may run on a closed monitor
        for d in devices:
            if d.monitor is not None:
                _close_quietly(d.monitor)
        channel.close()
    truth.elapsed_s = time.perf_counter() - t0
    report(f"fleet done: {truth.events:,} events in {truth.reports:,} reports, "
           f"{truth.elapsed_s:.1f} s")
    return truth


def _close_quietly(monitor: Monitor) -> None:
    try:
        monitor.close(timeout_s=5.0)
    except Exception as e:  # closing must not hide the error that got us here
        logger.warning("closing monitor %s: %r", monitor.device_id, e)
