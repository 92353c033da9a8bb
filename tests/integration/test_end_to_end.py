"""End to end: 30 real Monitors in three cohorts report over gRPC to one real aggregator.

What the aggregator answers (the Query service, and the rollups in its store) must equal what the
agents observed, computed here independently from the raw values and the spec's bin edges: counts
and histograms exactly, drift scores to 1e-9 against scipy, latency quantiles within the KLL
sketch's stated rank error. Resending every report changes nothing.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from agent import Monitor
from agent.spec import NUMERIC, FeatureSpec, Spec
from agent.summary import Summary
from aggregator import drift
from aggregator.server import RunningAggregator
from aggregator.store.base import rollup_resolutions, time_cover
from protos import fleetwatch_pb2 as pb

WINDOW_S = 60
N_DEVICES = 30
REGIONS = ("a", "b", "c")
N_WINDOWS = 4
GRACE_S = 2.0
EPS = 1e-4  # the project's proportion floor before logarithms
TOL = 1e-9

TEMP_MEAN = {"a": 0.0, "b": 0.4, "c": -0.9}
SCORE_BETA = {"a": 2.0, "b": 3.0, "c": 5.0}
LATENCY_MU = {"a": 2.8, "b": 3.1, "c": 3.5}
ERROR_RATE = {"a": 0.01, "b": 0.03, "c": 0.08}
SCENE_VALUES = np.array(["indoor", "outdoor", "night", "fog", None], dtype=object)
SCENE_P = {"a": [0.5, 0.3, 0.1, 0.05, 0.05], "b": [0.3, 0.5, 0.1, 0.05, 0.05],
           "c": [0.1, 0.2, 0.5, 0.15, 0.05]}

ABSENT = object()  # a feature left out of an event


class SimClock:
    """The simulated event-time clock a Monitor reads."""

    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


# -- the expected side, computed from raw values with explicit loops ---------------------------


def numeric_bin(value: object, edges: tuple[float, ...]) -> tuple[int, bool]:
    """Bin index in [underflow, [e0,e1), ..., [e_{m-1},e_m], overflow, missing] and whether the
    value is invalid (not a number, or infinite)."""
    m = len(edges)
    missing = m + 1
    if value is ABSENT or value is None:
        return missing, False
    if isinstance(value, str):
        return missing, True
    x = float(value)  # type: ignore[arg-type]
    if math.isnan(x):
        return missing, False
    if math.isinf(x):
        return missing, True
    if x < edges[0]:
        return 0, False
    if x > edges[-1]:
        return m, False
    for i in range(1, m):
        if edges[i - 1] <= x < edges[i]:
            return i, False
    return m - 1, False  # x == e_m: the last interior bin is closed on the right


def categorical_bin(value: object, vocabulary: tuple[str, ...]) -> int:
    """Index in [vocabulary..., other, missing] (only strings and None are fed here)."""
    k = len(vocabulary)
    if value is ABSENT or value is None:
        return k + 1
    for i, v in enumerate(vocabulary):
        if value == v:
            return i
    return k


@dataclass
class Expected:
    """What a set of devices observed, tallied event by event from the raw values."""

    spec: Spec
    hists: dict[str, np.ndarray] = field(default_factory=dict)
    prediction: np.ndarray | None = None
    latencies: list[float] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    reports: int = 0
    events: int = 0
    errors: int = 0
    invalid: int = 0
    unknown: int = 0
    late: int = 0

    def __post_init__(self) -> None:
        self.hists = {f.name: np.zeros(f.histogram_length, np.int64) for f in self.spec.features}
        assert self.spec.prediction is not None
        self.prediction = np.zeros(self.spec.prediction.histogram_length, np.int64)

    def _bin(self, feature: FeatureSpec, value: object) -> tuple[int, bool]:
        if feature.type == NUMERIC:
            return numeric_bin(value, feature.edges)
        return categorical_bin(value, feature.vocabulary), False

    def add_event(self, features: dict[str, object], score: float, latency: float | None,
                  error: bool, late: bool = False) -> None:
        for f in self.spec.features:
            i, bad = self._bin(f, features.get(f.name, ABSENT))
            self.hists[f.name][i] += 1
            self.invalid += bad
        self.unknown += sum(1 for k in features if k not in self.spec.feature_names)
        assert self.spec.prediction is not None and self.prediction is not None
        i, bad = self._bin(self.spec.prediction, score)
        self.prediction[i] += 1
        self.invalid += bad
        if latency is not None:
            if math.isfinite(latency) and latency >= 0:
                self.latencies.append(latency)
            else:
                self.invalid += 1
        self.events += 1
        self.errors += bool(error)
        self.late += late

    def absorb(self, other: Expected) -> None:
        for name in self.hists:
            self.hists[name] += other.hists[name]
        assert self.prediction is not None and other.prediction is not None
        self.prediction += other.prediction
        self.latencies += other.latencies
        self.devices |= other.devices
        for name in ("reports", "events", "errors", "invalid", "unknown", "late"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def combine(spec: Spec, parts: Iterable[Expected]) -> Expected:
    out = Expected(spec)
    for p in parts:
        out.absorb(p)
    return out


# -- the fleet ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    aggregator: RunningAggregator
    db: Path
    spec: Spec
    start: int  # first window start
    end: int    # end of the last window
    by_labels: dict[tuple[str, str], Expected]  # (region, hw) -> what those devices saw

    def expected(self, region: str | None = None, hw: str | None = None) -> Expected:
        return combine(self.spec, (e for (r, h), e in self.by_labels.items()
                                   if region in (None, r) and hw in (None, h)))


def window_values(rng: np.random.Generator, region: str, n: int) -> dict[str, np.ndarray]:
    """One window of one device's raw inputs, with edge cases sprinkled in: NaN (missing),
    infinities (invalid), values exactly on edges (the last edge included), out-of-range."""
    temp = rng.normal(TEMP_MEAN[region], 1.0, n)
    special = rng.choice(n, 12, replace=False)
    temp[special[:3]] = np.nan
    temp[special[3]] = np.inf
    temp[special[4]] = -np.inf
    temp[special[5:10]] = (-2.0, -0.5, 0.0, 1.0, 2.0)  # on edges; 2.0 is the last one
    temp[special[10:12]] = (7.5, -9.0)                 # overflow, underflow
    speed = rng.exponential(25.0, n) - 2.0             # some below 0, some above 80
    speed[special[:2]] = (80.0, 0.0)
    score = rng.beta(2.0, SCORE_BETA[region], n)
    score[special[2:4]] = (1.0, 0.0)
    latency = rng.lognormal(LATENCY_MU[region], 0.5, n).astype(np.float32).astype(np.float64)
    latency[special[6]] = -1.0                         # invalid: negative
    return {
        "temp": temp,
        "speed": speed,
        "scene": rng.choice(SCENE_VALUES, n, p=SCENE_P[region]),
        "score": score,
        "latency": latency,
        "error": rng.random(n) < ERROR_RATE[region],
    }


def run_event_device(mon: Monitor, clock: SimClock, rng: np.random.Generator, ws: int,
                     v: dict[str, np.ndarray], exp: Expected, first_window: bool) -> None:
    """Feed one window event by event; per-event oddities: absent and unknown features, a
    string where a number belongs, no latency, and (after the first window) two late events."""
    n = len(v["score"])
    times = np.sort(rng.uniform(3.0, WINDOW_S - 1.0, n))
    odd = rng.random((4, n))
    for i in range(n):
        features: dict[str, object] = {"temp": float(v["temp"][i]),
                                       "speed": float(v["speed"][i]), "scene": v["scene"][i]}
        if odd[0, i] < 0.03:
            del features["speed"]
        if odd[1, i] < 0.02:
            features["extra"] = 1.0
        if odd[2, i] < 0.01:
            features["temp"] = "hot"
        latency = None if odd[3, i] < 0.05 else float(v["latency"][i])
        late = not first_window and i in (1, 2)
        # Events 1 and 2 carry a time in the previous window, which event 0 (3 s or more into
        # this window, past the grace) has closed: they count in this window, as late.
        clock.t = ws - WINDOW_S + 30.0 if late else ws + float(times[i])
        score, error = float(v["score"][i]), bool(v["error"][i])
        mon.observe(features, prediction=score, latency_ms=latency, error=error)
        exp.add_event(features, score, latency, error, late)


def run_batch_device(mon: Monitor, clock: SimClock, ws: int, v: dict[str, np.ndarray],
                     exp: Expected, drop_speed: bool, add_unknown: bool) -> None:
    """Feed one window as three numpy batches."""
    n = len(v["score"])
    for k, part in enumerate(np.array_split(np.arange(n), 3)):
        clock.t = ws + 5.0 + 15.0 * k
        features: dict[str, object] = {"temp": v["temp"][part], "scene": v["scene"][part]}
        if not drop_speed:
            features["speed"] = v["speed"][part]
        if add_unknown:
            features["extra"] = np.zeros(len(part))
        mon.observe_batch(features, predictions=v["score"][part],
                          latency_ms=v["latency"][part], errors=v["error"][part])
    for i in range(n):
        features = {"temp": float(v["temp"][i]), "scene": v["scene"][i]}
        if not drop_speed:
            features["speed"] = float(v["speed"][i])
        if add_unknown:
            features["extra"] = 0.0
        exp.add_event(features, float(v["score"][i]), float(v["latency"][i]),
                      bool(v["error"][i]))


@pytest.fixture(scope="module")
def fleet(start_aggregator, spec: Spec, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    db = tmp / "aggregator.sqlite"
    rng = np.random.default_rng(20240611)
    base = (int(time.time()) // WINDOW_S - 20) * WINDOW_S
    with start_aggregator(db) as agg, contextlib.ExitStack() as stack:
        devices = []
        by_labels: dict[tuple[str, str], Expected] = {}
        for d in range(N_DEVICES):
            region = REGIONS[d % 3]
            hw = "jetson" if (d // 3) % 2 else "pi"
            clock = SimClock(base)
            mon = Monitor(spec.model, spec.model_version, f"dev-{d:02d}",
                          labels={"region": region, "hw": hw}, aggregator=agg.target,
                          spool_dir=tmp / "spool" / f"dev-{d:02d}", clock=clock,
                          background=False, grace_s=GRACE_S)
            stack.callback(mon.close)
            assert mon.spec is not None and mon.spec.hash == spec.hash  # fetched by GetSpec
            exp = by_labels.setdefault((region, hw), Expected(spec))
            exp.devices.add(mon.device_id)
            devices.append((d, region, mon, clock, exp))
        for w in range(N_WINDOWS):
            ws = base + w * WINDOW_S
            for d, region, mon, clock, exp in devices:
                v = window_values(rng, region, int(rng.integers(150, 350)))
                if d % 4 in (1, 2):
                    run_batch_device(mon, clock, ws, v, exp, drop_speed=(w == 1 and d % 2 == 0),
                                     add_unknown=(w == 2))
                else:
                    run_event_device(mon, clock, rng, ws, v, exp, first_window=(w == 0))
                exp.reports += 1
                if d % 2 == 0:  # half the fleet ships every window, the rest all at the end
                    clock.t = ws + WINDOW_S + GRACE_S + 1.0
                    assert mon.poll(), mon.stats()
        end = base + N_WINDOWS * WINDOW_S
        for _, _, mon, clock, _ in devices:
            clock.t = end + GRACE_S + 1.0
            assert mon.flush(), mon.stats()
            stats = mon.stats()
            assert stats.spool.pending == 0 and stats.internal_errors == 0, stats
            assert stats.windows_closed == N_WINDOWS
        yield Fleet(agg, db, spec, base, end, by_labels)


# -- helpers on the aggregator side ---------------------------------------------------------


def store_histograms(fleet: Fleet, region: str | None, start: int, end: int
                     ) -> tuple[Summary, set[int]]:
    """Merge the store's rollups of a region over [start, end), and say which resolutions the
    cover used."""
    store = fleet.aggregator.store
    ids = [ls.id for ls in store.label_sets(fleet.spec.hash)
           if region is None or ls.labels.get("region") == region]
    cover = time_cover(start, end, rollup_resolutions(fleet.spec.window_length_s))
    merged = Summary.zero(fleet.spec)
    for s in store.merged_rollups(fleet.spec.hash, ids, cover).values():
        merged.merge_in(s)
    return merged, {res for res, _, _ in cover}


def expected_scores(feature: FeatureSpec, counts: np.ndarray) -> dict[str, float]:
    """Drift scores from the definitions in aggregator/drift.py, written with numpy/scipy."""
    r = np.asarray(feature.reference_counts, dtype=np.float64)
    c = counts.astype(np.float64)
    fr = np.maximum(r / r.sum(), EPS)
    fr /= fr.sum()
    fc = np.maximum(c / c.sum(), EPS)
    fc /= fc.sum()
    out = {
        "count": float(c.sum()),
        "psi": float(np.sum((fc - fr) * np.log(fc / fr))),
        "js_distance": float(jensenshannon(fr, fc, base=2)),
        "missing_rate": float(c[-1] / c.sum()),
        "ks": math.nan, "wasserstein": math.nan, "wasserstein_norm": math.nan,
    }
    if feature.type == NUMERIC:
        ro, co = r[:-1] / r[:-1].sum(), c[:-1] / c[:-1].sum()
        edges = np.asarray(feature.edges)
        points = np.concatenate(([edges[0]], (edges[:-1] + edges[1:]) / 2, [edges[-1]]))
        out["ks"] = float(np.max(np.abs(np.cumsum(ro) - np.cumsum(co))))
        out["wasserstein"] = float(wasserstein_distance(points, points, ro, co))
        mean = float(np.sum(ro * points))
        out["wasserstein_norm"] = out["wasserstein"] / math.sqrt(
            float(np.sum(ro * (points - mean) ** 2)))
    return out


def assert_drift(got: pb.FeatureDrift, feature: FeatureSpec, counts: np.ndarray) -> None:
    want = expected_scores(feature, counts)
    for name, value in want.items():
        actual = float(getattr(got, name))
        if math.isnan(value):
            assert math.isnan(actual), (feature.name, name, actual)
        else:
            assert math.isclose(actual, value, rel_tol=TOL, abs_tol=TOL), \
                (feature.name, name, actual, value)


def assert_latency_ranks(h: pb.CohortHealth, latencies: list[float]) -> None:
    """Each reported quantile q must sit within the sketch's rank error of rank q among the
    raw latencies (fraction of raw values <= the reported value, with 1/n slack)."""
    raw = np.sort(np.asarray(latencies))
    n = raw.size
    assert n > 2000
    eps = h.latency_rank_error
    assert 0 < eps < 0.02  # k=200: about 1.33%
    for q, value in ((0.5, h.latency_p50_ms), (0.95, h.latency_p95_ms),
                     (0.99, h.latency_p99_ms)):
        rank = np.searchsorted(raw, value, side="right") / n
        assert abs(rank - q) <= eps + 1.0 / n, (q, value, rank, eps)
        assert raw[0] <= value <= raw[-1]


def assert_cohort(h: pb.CohortHealth, exp: Expected, spec: Spec) -> None:
    assert h.model == spec.model and h.model_version == spec.model_version
    assert h.spec_hash == spec.hash
    assert h.devices == len(exp.devices)
    assert h.reports == exp.reports
    assert h.events == exp.events
    assert h.errors == exp.errors
    assert h.error_rate == pytest.approx(exp.errors / exp.events, rel=1e-12)
    assert h.late_events == exp.late
    assert h.invalid_values == exp.invalid
    assert h.unknown_features == exp.unknown
    assert h.spool_dropped == 0
    assert [f.name for f in h.features] == list(spec.feature_names)
    for got, feature in zip(h.features, spec.features, strict=True):
        assert got.count == exp.events
        assert_drift(got, feature, exp.hists[feature.name])
    assert spec.prediction is not None and exp.prediction is not None
    assert_drift(h.prediction, spec.prediction, exp.prediction)
    assert_latency_ranks(h, exp.latencies)
    assert all(math.isfinite(x) for x in (h.reference_latency_p50_ms,
                                          h.reference_latency_p95_ms,
                                          h.reference_latency_p99_ms))


def snapshot(cohort_rpc, fleet: Fleet) -> list[bytes]:
    """Every field of a few queries' answers, except the latency quantiles: KLL merges are
    randomized, so two merges of the same sketches may pick slightly different quantiles
    (each within the rank error, which `assert_latency_ranks` checks)."""
    out = []
    for selector, group_by in (({}, ()), ({}, ("region",)), ({}, ("region", "hw")),
                               ({"region": "a"}, ())):
        for h in cohort_rpc(fleet.aggregator.target, fleet.start, fleet.end, selector, group_by):
            h.ClearField("latency_p50_ms")
            h.ClearField("latency_p95_ms")
            h.ClearField("latency_p99_ms")
            out.append(h.SerializeToString(deterministic=True))
    return out


# -- the tests ---------------------------------------------------------------------------------


def test_every_report_is_accepted_once(fleet: Fleet) -> None:
    ingestor = fleet.aggregator.ingestor
    assert ingestor.accepted == N_DEVICES * N_WINDOWS
    assert ingestor.duplicates == 0
    assert sum(ingestor.rejected.values()) == 0
    with contextlib.closing(sqlite3.connect(f"file:{fleet.db}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT device_id, COUNT(*), MIN(seq), MAX(seq) FROM reports "
                          "GROUP BY device_id").fetchall()
    assert len(rows) == N_DEVICES
    assert all(count == N_WINDOWS and lo == 1 and hi == N_WINDOWS for _, count, lo, hi in rows)


@pytest.mark.parametrize("region", [None, *REGIONS])
@pytest.mark.parametrize("wide", [False, True], ids=["minute-rollups", "hour-rollups"])
def test_merged_histograms_equal_the_raw_values(fleet: Fleet, region: str | None,
                                                wide: bool) -> None:
    if wide:  # whole hours around the data: answered from the hourly rollups
        start = fleet.start // 3600 * 3600 - 3600
        end = (fleet.end // 3600 + 2) * 3600
    else:
        start, end = fleet.start, fleet.end
    merged, resolutions = store_histograms(fleet, region, start, end)
    assert resolutions == ({3600} if wide else {WINDOW_S})
    exp = fleet.expected(region)
    for name, counts in exp.hists.items():
        np.testing.assert_array_equal(merged.features[name], counts, err_msg=name)
    np.testing.assert_array_equal(merged.prediction, exp.prediction)
    assert merged.event_count == exp.events
    assert merged.error_count == exp.errors
    assert merged.report_count == exp.reports
    assert merged.latency.n == len(exp.latencies)
    assert merged.late_event_count == exp.late
    assert merged.invalid_value_count == exp.invalid
    assert merged.unknown_feature_count == exp.unknown


def test_expected_side_exercises_every_bin_kind(fleet: Fleet) -> None:
    """The raw data hit underflow, overflow, missing and 'other' bins, late events, invalid
    values and unknown features, so the exact comparisons above cover them."""
    exp = fleet.expected()
    for name in ("temp", "speed"):
        h = exp.hists[name]
        assert h[0] > 0 and h[-2] > 0 and h[-1] > 0, (name, h)
    assert exp.hists["scene"][-2] > 0 and exp.hists["scene"][-1] > 0
    assert exp.late > 0 and exp.invalid > 0 and exp.unknown > 0 and exp.errors > 0
    assert 20_000 < len(exp.latencies) < 100_000


def test_group_by_region_over_grpc(fleet: Fleet, cohort_rpc) -> None:
    cohorts = cohort_rpc(fleet.aggregator.target, fleet.start, fleet.end, group_by=("region",))
    assert [dict(h.cohort) for h in cohorts] == [{"region": r} for r in REGIONS]
    for h, region in zip(cohorts, REGIONS, strict=True):
        assert h.devices == N_DEVICES // 3
        assert h.start_unix_s == fleet.start and h.end_unix_s == fleet.end
        assert_cohort(h, fleet.expected(region), fleet.spec)


def test_whole_fleet_over_grpc(fleet: Fleet, cohort_rpc) -> None:
    (h,) = cohort_rpc(fleet.aggregator.target, fleet.start, fleet.end)
    assert dict(h.cohort) == {}
    assert h.devices == N_DEVICES
    assert_cohort(h, fleet.expected(), fleet.spec)


def test_selectors_and_grouping(fleet: Fleet, cohort_rpc) -> None:
    target = fleet.aggregator.target
    (only_a,) = cohort_rpc(target, fleet.start, fleet.end, selector={"region": "a"})
    assert dict(only_a.cohort) == {"region": "a"}
    assert_cohort(only_a, fleet.expected("a"), fleet.spec)

    by_hw = cohort_rpc(target, fleet.start, fleet.end, selector={"region": "b"},
                       group_by=("hw",))
    assert [dict(h.cohort) for h in by_hw] == [{"region": "b", "hw": "jetson"},
                                               {"region": "b", "hw": "pi"}]
    for h in by_hw:
        exp = fleet.expected("b", h.cohort["hw"])
        assert (h.devices, h.reports, h.events, h.errors) == (
            len(exp.devices), exp.reports, exp.events, exp.errors)

    both = cohort_rpc(target, fleet.start, fleet.end, group_by=("region", "hw"))
    assert len(both) == 6
    assert sum(h.devices for h in both) == N_DEVICES
    for h in both:
        exp = fleet.expected(h.cohort["region"], h.cohort["hw"])
        assert (h.devices, h.events, h.late_events) == (len(exp.devices), exp.events, exp.late)

    assert cohort_rpc(target, fleet.start, fleet.end, selector={"region": "zz"}) == []
    assert cohort_rpc(target, fleet.start, fleet.end,
                      selector={"region": "a", "hw": "tpu"}) == []
    # A range before any data: no cohort at all.
    assert cohort_rpc(target, fleet.start - 7200, fleet.start - 3600) == []
    # One window only: a quarter of the reports, every device.
    (one,) = cohort_rpc(target, fleet.start, fleet.start + WINDOW_S)
    assert one.reports == N_DEVICES and one.devices == N_DEVICES


def test_resending_every_report_changes_nothing(fleet: Fleet, cohort_rpc, report_rpc) -> None:
    before = snapshot(cohort_rpc, fleet)
    accepted = fleet.aggregator.ingestor.accepted
    with contextlib.closing(sqlite3.connect(f"file:{fleet.db}?mode=ro", uri=True)) as db:
        envelopes = [(device, seq, bytes(blob)) for device, seq, blob in db.execute(
            "SELECT device_id, seq, envelope FROM reports ORDER BY device_id, seq")]
    assert len(envelopes) == N_DEVICES * N_WINDOWS
    send = report_rpc(fleet.aggregator.target)
    for device, seq, blob in envelopes:
        report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(blob).report)
        assert (report.device_id, report.seq) == (device, seq)
        assert send(blob, timeout=10).status == pb.ReportResponse.DUPLICATE
    assert fleet.aggregator.ingestor.accepted == accepted
    assert fleet.aggregator.ingestor.duplicates == len(envelopes)
    assert snapshot(cohort_rpc, fleet) == before
    (h,) = cohort_rpc(fleet.aggregator.target, fleet.start, fleet.end)
    assert_cohort(h, fleet.expected(), fleet.spec)
    merged, _ = store_histograms(fleet, None, fleet.start, fleet.end)
    assert merged.event_count == fleet.expected().events
    assert merged.report_count == N_DEVICES * N_WINDOWS


def test_drift_module_constants_match_this_test() -> None:
    assert drift.EPS == EPS
