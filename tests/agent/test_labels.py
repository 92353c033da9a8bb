"""Ground truth and heartbeats through agent.monitor: label joins, the prediction cache, idle
windows.

No server: the aggregator address is a closed port, the reports stay in the spool and the tests
read them back (and run them through the aggregator's own validation). Expected bins are
computed with numpy from the raw events, independently of the agent's binning code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.monitor import Monitor
from agent.spec import (
    BINARY,
    CATEGORICAL,
    DEVICE_DAY,
    MULTICLASS,
    NO_NOISE,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.spool import Spool
from agent.summary import Summary
from aggregator.validate import validate_report
from protos import fleetwatch_pb2 as pb

NOWHERE = "127.0.0.1:1"
SCORE = FeatureSpec("score", NUMERIC, edges=(0.0, 0.5, 1.0))
CLASS = FeatureSpec("cls", CATEGORICAL, vocabulary=("cat", "dog", "owl"))
VALUE = FeatureSpec("value", NUMERIC, edges=(-10.0, 0.0, 10.0))
LATENCY_EDGES = (0.0, 30.0, 60.0, 120.0, 600.0)


def _spec(labels: LabelSpec | None, prediction: FeatureSpec = SCORE,
          privacy: PrivacySpec = PrivacySpec(mechanism=NO_NOISE)) -> Spec:
    return Spec(model="m", model_version="1",
                features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
                prediction=prediction, labels=labels, privacy=privacy)


BINARY_SPEC = _spec(LabelSpec(BINARY, classes=("neg", "pos"), threshold=0.6,
                              latency_edges=LATENCY_EDGES))
MULTICLASS_SPEC = _spec(LabelSpec(MULTICLASS, classes=("cat", "dog", "owl"),
                                  calibration_edges=(0.0, 0.5, 0.8, 1.0),
                                  latency_edges=LATENCY_EDGES), prediction=CLASS)
RESIDUAL_EDGES = (-2.0, -1.0, 0.0, 1.0, 2.0)
REGRESSION_SPEC = _spec(LabelSpec(REGRESSION, residual_edges=RESIDUAL_EDGES,
                                  latency_edges=LATENCY_EDGES), prediction=VALUE)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock(1000.0)


@pytest.fixture
def make(tmp_path, clock):
    monitors: list[Monitor] = []

    def make(spec: Spec, name: str = "spool", **kwargs) -> Monitor:
        kwargs.setdefault("clock", clock)
        mon = Monitor("m", "1", "dev-1", aggregator=NOWHERE, spool_dir=tmp_path / name,
                      spec=spec, background=False, backoff_base_s=0.01, backoff_cap_s=0.02,
                      rpc_timeout_s=1.0, **kwargs)
        monitors.append(mon)
        return mon

    yield make
    for mon in monitors:
        mon.close(timeout_s=0.5)


def _reports(spool: Spool) -> list[pb.WindowReport]:
    return [pb.WindowReport.FromString(pb.ReportEnvelope.FromString(item.payload).report)
            for item in spool.pending(limit=100_000)]


def _validated(reports: list[pb.WindowReport], spec: Spec) -> list[Summary]:
    """Every report passes the aggregator's validation; their domain summaries."""
    # The aggregator receives a report after its window and after the agent built it.
    return [validate_report(r, spec, now=max(r.window_start_unix_s + 120,
                                             r.created_unix_ms / 1000))[1] for r in reports]


def _numeric_layout(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """[under, bins (last closed), over, missing], computed independently with np.histogram."""
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    inner, _ = np.histogram(v[finite], bins=np.asarray(edges))
    under = int((v[finite] < edges[0]).sum())
    over = int((v[finite] > edges[-1]).sum())
    return np.concatenate([[under], inner, [over, int((~finite).sum())]])


def _calibration(p: np.ndarray, outcome: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    bins = len(edges) - 1
    counts, _, _ = np.histogram2d(np.clip(p, 0, 1), outcome, bins=[np.asarray(edges),
                                                                    [-0.5, 0.5, 1.5]])
    assert counts.shape == (bins, 2)
    return counts.reshape(-1).astype(np.int64)  # [bin: outcome 0, bin: outcome 1] per bin


# -- label joins, per task -----------------------------------------------------------------------

def test_binary_labels_join_in_the_window_they_arrive_in(make, clock) -> None:
    spec = BINARY_SPEC
    mon = make(spec)
    rng = np.random.default_rng(1)
    n = 300
    scores = rng.random(n)
    scores[:5] = [0.0, 0.6, 1.0, 0.5999, 1.0]  # at the threshold and the edges
    truth = rng.random(n) < scores
    seen_at = 1000.0 + rng.random(n) * 19  # all in the window [960, 1020)
    order = np.argsort(seen_at)
    for i in order:
        clock.t = seen_at[i]
        mon.observe({"x": 0.5}, prediction=float(scores[i]), request_id=f"r{i}")
    # Labels arrive in [1080, 1140), in every accepted form: names, bools, 0/1.
    labeled = rng.random(n) < 0.7
    arrive = 1085.0 + rng.random(n) * 50
    forms = [lambda y: "pos" if y else "neg", bool, int, lambda y: float(int(y)),
             lambda y: np.bool_(y)]
    ids = np.flatnonzero(labeled)
    for j, i in enumerate(ids[np.argsort(arrive[ids])]):
        clock.t = arrive[i]
        assert mon.label(f"r{i}", forms[j % len(forms)](truth[i])) is True
    clock.t = 1130.0
    assert mon.label("r-unknown", "pos") is False
    assert mon.label(f"r{ids[0]}", "pos") is False  # labeled already: the entry was popped
    assert mon.label(f"r{np.flatnonzero(~labeled)[0]}", "martian") is True  # class "other"
    mon.flush(timeout_s=0.5)

    reports = _reports(mon.spool)
    assert [r.window_start_unix_s for r in reports] == [960, 1020, 1080]
    assert [r.heartbeat for r in reports] == [False, True, False]
    first, _, arrival = reports
    assert first.event_count == n and first.labeled_count == 0
    assert sum(first.confusion.counts) == 0
    assert arrival.event_count == 0 and arrival.labeled_count == labeled.sum() + 1
    assert arrival.labels_unmatched_count == 2

    # Independent computation: rows true class (neg, pos, other), columns predicted.
    other = np.flatnonzero(~labeled)[0]
    y = truth[labeled].astype(int)
    pred = (scores[labeled] >= 0.6).astype(int)
    expected = np.zeros((3, 3), np.int64)
    np.add.at(expected, (y, pred), 1)
    expected[2, int(scores[other] >= 0.6)] += 1
    assert list(arrival.confusion.counts) == expected.reshape(-1).tolist()
    cal_scores = np.append(scores[labeled], scores[other])
    cal_outcome = np.append(y, 0)  # "other" is not the positive class
    edges = spec.labels.calibration_edges
    assert list(arrival.calibration.counts) == _calibration(cal_scores, cal_outcome,
                                                            edges).tolist()
    latency = np.append(arrive[labeled] - seen_at[labeled], 1130.0 - seen_at[other])
    assert list(arrival.label_latency.counts) == _numeric_layout(latency,
                                                                 LATENCY_EDGES).tolist()
    assert not arrival.HasField("residuals")

    summaries = _validated(reports, spec)
    assert summaries[2].label_histogram_count == labeled.sum() + 1
    stats = mon.stats()
    assert stats.labels_joined == labeled.sum() + 1 and stats.labels_unmatched == 2
    assert stats.label_cache_size == n - labeled.sum() - 1


def test_multiclass_calibration_counts_confidence_against_correctness(make, clock) -> None:
    spec = MULTICLASS_SPEC
    mon = make(spec)
    rng = np.random.default_rng(2)
    n = 200
    classes = np.array(["cat", "dog", "owl", "fox"])  # "fox" is not in the spec: "other"
    predicted = classes[rng.integers(0, 4, n)]
    truth = np.where(rng.random(n) < 0.6, predicted, classes[rng.integers(0, 4, n)])
    confidence = rng.random(n)
    has_conf = rng.random(n) < 0.8
    confidence[:3] = [0.5, 1.0, 0.8]  # on the edges
    has_conf[:3] = True
    mon.observe_batch({"x": np.zeros(n)}, predictions=predicted,
                      request_ids=[f"q{i}" for i in range(n)],
                      confidences=[float(c) if h else None for c, h in zip(confidence, has_conf,
                                                                           strict=True)])
    clock.t = 1030.0  # the next window
    assert mon.label_batch([f"q{i}" for i in range(n)], truth) == n
    mon.flush(timeout_s=0.5)
    first, arrival = _reports(mon.spool)
    assert (first.window_start_unix_s, arrival.window_start_unix_s) == (960, 1020)
    assert arrival.labeled_count == n

    index = {"cat": 0, "dog": 1, "owl": 2, "fox": 3}
    t_idx = np.array([index[c] for c in truth])
    p_idx = np.array([index[c] for c in predicted])
    expected = np.zeros((4, 4), np.int64)
    np.add.at(expected, (t_idx, p_idx), 1)
    assert list(arrival.confusion.counts) == expected.reshape(-1).tolist()
    correct = ((t_idx == p_idx) & (p_idx != 3)).astype(int)  # "other" is never correct
    assert list(arrival.calibration.counts) == _calibration(
        confidence[has_conf], correct[has_conf], spec.labels.calibration_edges).tolist()
    assert sum(arrival.calibration.counts) == has_conf.sum()
    assert list(arrival.label_latency.counts) == _numeric_layout(np.full(n, 30.0),
                                                                 LATENCY_EDGES).tolist()
    _validated([first, arrival], spec)


def test_regression_residuals(make, clock) -> None:
    spec = REGRESSION_SPEC
    mon = make(spec)
    rng = np.random.default_rng(3)
    n = 250
    pred = rng.normal(0, 3, n)
    y = pred - rng.normal(0, 1.2, n)
    y_given = y.astype(object)
    y_given[:4] = ["n/a", None, math.nan, b"7"]  # not numbers: the missing bin
    pred[4] = pred[4] - y[4] + 2.0 - 2.0  # keep a plain value
    y_given[5] = pred[5] - 2.0  # exactly on the last edge (closed)
    for i in range(n):
        mon.observe({"x": 0.1}, prediction=float(pred[i]), request_id=i)  # int ids
    clock.t = 1200.0
    joined = mon.label_batch(np.arange(n), y_given)
    assert joined == n
    mon.flush(timeout_s=0.5)
    reports = _reports(mon.spool)
    arrival = reports[-1]
    assert arrival.window_start_unix_s == 1200 and arrival.labeled_count == n
    residual = np.array([p - float(v) if isinstance(v, float) else math.nan
                         for p, v in zip(pred, y_given, strict=True)])
    assert list(arrival.residuals.counts) == _numeric_layout(residual, RESIDUAL_EDGES).tolist()
    assert arrival.residuals.counts[-1] == 4
    assert not arrival.HasField("confusion") and not arrival.HasField("calibration")
    assert arrival.invalid_value_count == 2  # the string and the bytes
    _validated(reports, spec)


def test_label_batch_equals_one_label_at_a_time(make, clock, tmp_path) -> None:
    rng = np.random.default_rng(4)
    scores, truth = rng.random(50), rng.random(50) < 0.5
    out = []
    for name, batched in (("one", False), ("batch", True)):
        clock.t = 1000.0
        mon = make(BINARY_SPEC, name=name)
        mon.observe_batch({"x": np.zeros(50)}, predictions=scores,
                          request_ids=np.array([f"r{i}" if i % 5 else None for i in range(50)],
                                               dtype=object))
        clock.t = 1010.0
        ids = [f"r{i}" for i in range(50)]
        if batched:
            joined = mon.label_batch(ids, truth)
        else:
            joined = sum(mon.label(i, bool(t)) for i, t in zip(ids, truth, strict=True))
        assert joined == 40  # every fifth event had no request id
        mon.flush(timeout_s=0.5)
        [report] = _reports(mon.spool)
        assert report.labels_unmatched_count == 10
        out.append((list(report.confusion.counts), list(report.calibration.counts)))
    assert out[0] == out[1]


# -- the prediction cache ------------------------------------------------------------------------

def test_ttl_evictions_are_counted_and_the_label_unmatched(make, clock) -> None:
    mon = make(BINARY_SPEC, label_ttl_s=100.0)
    for i in range(10):
        clock.t = 1000.0 + i  # ids 0..9 seen at 1000..1009
        mon.observe({"x": 0.5}, prediction=0.9, request_id=f"r{i}")
    clock.t = 1104.5  # r0..r4 are older than 100 s
    assert mon.label("r7", "pos") is True  # evicts r0..r4 from the front on the way
    assert mon.stats().label_cache_evicted == 5
    assert mon.label("r2", "pos") is False
    assert mon.label("r9", 1) is True
    stats = mon.stats()
    assert (stats.labels_joined, stats.labels_unmatched, stats.label_cache_evicted,
            stats.label_cache_size) == (2, 1, 5, 3)
    mon.flush(timeout_s=0.5)
    reports = _reports(mon.spool)
    assert [r.window_start_unix_s for r in reports] == [960, 1020, 1080]
    assert reports[-1].label_cache_evicted_count == 5 and reports[-1].labels_unmatched_count == 1
    assert sum(r.label_cache_evicted_count for r in reports) == 5  # each eviction reported once
    _validated(reports, BINARY_SPEC)


def test_capacity_evicts_the_oldest(make, clock) -> None:
    mon = make(BINARY_SPEC, label_cache_size=3)
    for i in range(5):
        mon.observe({"x": 0.5}, prediction=0.1, request_id=f"r{i}")
    mon.observe({"x": 0.5}, prediction=0.9, request_id="r3")  # a repeat replaces, no eviction
    assert mon.stats().label_cache_evicted == 2
    assert [mon.label(f"r{i}", "neg") for i in range(5)] == [False, False, True, True, True]
    mon.flush(timeout_s=0.5)
    [report] = _reports(mon.spool)
    assert report.label_cache_evicted_count == 2 and report.labels_unmatched_count == 2
    # r3 was labeled with its newer prediction (0.9: predicted positive, truly negative).
    assert list(report.confusion.counts) == [2, 1, 0, 0, 0, 0, 0, 0, 0]


def test_without_labels_in_the_spec_nothing_is_cached(make) -> None:
    spec = _spec(None)
    mon = make(spec)
    mon.observe({"x": 0.5}, prediction=0.3, request_id="r1")
    assert mon.label("r1", "pos") is False
    stats = mon.stats()
    assert stats.label_cache_size == 0 and stats.labels_unmatched == 1
    mon.flush(timeout_s=0.5)
    [report] = _reports(mon.spool)
    assert report.labeled_count == 0 and not report.HasField("confusion")
    _validated([report], spec)


@pytest.mark.parametrize("request_id", [[1], {"a": 1}, object(), 1.5, True, "", "x" * 300])
def test_bad_request_ids_never_raise(make, request_id) -> None:
    mon = make(BINARY_SPEC)
    mon.observe({"x": 0.5}, prediction=0.3, request_id=request_id)
    assert mon.label(request_id, "pos") is False
    assert mon.label_batch([request_id, "nope"], ["pos"]) == 0  # lengths differ: counted
    stats = mon.stats()
    assert stats.events == 1 and stats.label_cache_size == 0
    assert stats.internal_errors == 1 and stats.labels_unmatched == 1
    mon.flush(timeout_s=0.5)
    [report] = _reports(mon.spool)
    assert report.invalid_value_count == 1 and report.labeled_count == 0


# -- heartbeats ----------------------------------------------------------------------------------

def test_idle_windows_are_heartbeats_from_the_start_window(make, clock) -> None:
    spec = _spec(BINARY_SPEC.labels, privacy=PrivacySpec(epsilon_per_window=1.0))
    mon = make(spec, grace_s=2.0)
    clock.t = 1201.0  # 960 .. 1080 have ended, grace included; 1140 has not (1200 + 2 s)
    mon.poll(timeout_s=0.5)
    assert [r.window_start_unix_s for r in _reports(mon.spool)] == [960, 1020, 1080]
    clock.t = 1262.0  # 1140 and 1200 too
    mon.poll(timeout_s=0.5)
    reports = _reports(mon.spool)
    assert [r.window_start_unix_s for r in reports] == [960, 1020, 1080, 1140, 1200]
    assert [r.seq for r in reports] == [1, 2, 3, 4, 5]
    for r in reports:
        assert r.heartbeat and r.event_count == 0 and r.labeled_count == 0
        assert not r.features and not r.HasField("prediction")
        assert not r.HasField("confusion") and not r.HasField("label_latency")
        assert r.latency_kll == b""  # no sketch bytes at all
        assert r.epsilon_spent == 0.0 and not r.private_withheld
    assert mon.spool.ledger_max_epsilon() == 0.0  # no privacy spend for heartbeats
    assert mon.stats().heartbeats == 5 and mon.stats().windows_closed == 0
    summaries = _validated(reports, spec)
    merged = Summary.zero(spec)
    for s in summaries:
        assert s.heartbeat_count == 1 and s.noise_variance_per_bin == 0.0
        merged.merge_in(s)
    assert merged.heartbeat_count == 5 and merged.report_count == 5
    assert merged.noise_variance_per_bin == 0.0 and merged.event_count == 0


def test_heartbeats_fill_gaps_between_data_windows_in_order(make, clock) -> None:
    mon = make(BINARY_SPEC, grace_s=0.0)
    mon.observe({"x": 0.5}, prediction=0.2)  # 960
    clock.t = 1200.0
    mon.observe({"x": 0.5}, prediction=0.2)  # 1200: closes 960, 1020..1140 were idle
    clock.t = 1205.0
    mon.label("nothing", "pos")  # unmatched: reported by the window it happened in
    mon.flush(timeout_s=0.5)
    reports = _reports(mon.spool)
    assert [(r.window_start_unix_s, r.heartbeat) for r in reports] == [
        (960, False), (1020, True), (1080, True), (1140, True), (1200, False)]
    assert [r.seq for r in reports] == [1, 2, 3, 4, 5]
    assert reports[-1].labels_unmatched_count == 1


def test_labels_alone_make_a_window_no_heartbeat(make, clock) -> None:
    mon = make(BINARY_SPEC, grace_s=0.0)
    mon.observe({"x": 0.5}, prediction=0.8, request_id="a")
    clock.t = 1030.0
    mon.label("a", "pos")
    clock.t = 1090.0
    mon.poll(timeout_s=0.5)
    first, second = _reports(mon.spool)
    assert not second.heartbeat and second.event_count == 0 and second.labeled_count == 1
    assert len(second.features) == 1 and sum(second.confusion.counts) == 1
    _validated([first, second], BINARY_SPEC)


def test_a_restart_does_not_backfill(make, clock) -> None:
    mon = make(BINARY_SPEC, grace_s=0.0)
    mon.observe({"x": 0.5}, prediction=0.2)  # 960
    clock.t = 1020.0
    mon.close(timeout_s=0.5)
    clock.t = 2000.0  # down from 1020 to 2000
    mon = make(BINARY_SPEC, grace_s=0.0)
    clock.t = 2050.0  # 1980 (where it started) has ended
    mon.poll(timeout_s=0.5)
    reports = _reports(mon.spool)
    assert [(r.window_start_unix_s, r.heartbeat) for r in reports] == [
        (960, False), (1980, True)]
    assert [r.seq for r in reports] == [1, 2]


def test_a_gap_is_bounded(make, clock, caplog) -> None:
    mon = make(BINARY_SPEC, grace_s=0.0, max_heartbeat_windows=5)
    mon.observe({"x": 0.5}, prediction=0.2)  # 960
    clock.t = 960.0 + 101 * 60  # 100 idle windows, then one with an event
    with caplog.at_level("WARNING", logger="agent.monitor"):
        mon.observe({"x": 0.5}, prediction=0.2)
    assert sum("heartbeats for the last 5" in m for m in caplog.messages) == 1
    mon.flush(timeout_s=0.5)
    reports = _reports(mon.spool)
    starts = [r.window_start_unix_s for r in reports]
    assert starts == [960] + [960 + 60 * k for k in range(96, 101)] + [960 + 101 * 60]
    assert [r.heartbeat for r in reports] == [False] + [True] * 5 + [False]


def test_heartbeats_can_be_turned_off(make, clock) -> None:
    mon = make(BINARY_SPEC, heartbeats=False)
    clock.t = 2000.0
    mon.observe({"x": 0.5}, prediction=0.2)
    mon.flush(timeout_s=0.5)
    assert [r.window_start_unix_s for r in _reports(mon.spool)] == [1980]


# -- privacy -------------------------------------------------------------------------------------

def test_device_day_clamps_labels_and_withholds_them(make, clock) -> None:
    privacy = PrivacySpec(unit=DEVICE_DAY, epsilon_per_window=1.0, daily_epsilon_budget=1.0,
                          max_events_per_window=10)
    spec = _spec(BINARY_SPEC.labels, privacy=privacy)
    clock.t = 86400.0 * 20 + 5  # the start of a UTC day
    mon = make(spec, grace_s=0.0)
    for i in range(30):
        mon.observe({"x": 0.5}, prediction=0.9, request_id=f"r{i}")
    for i in range(25):
        mon.label(f"r{i}", "pos")
    clock.t += 60
    mon.observe({"x": 0.5}, prediction=0.9, request_id="late")
    mon.label("late", "pos")
    mon.flush(timeout_s=0.5)
    released, withheld = _reports(mon.spool)
    assert released.labeled_count == 25 and released.clamped_label_count == 15
    assert released.clamped_event_count == 20 and not released.private_withheld
    assert len(released.confusion.counts) == 9 and len(released.calibration.counts) == 20
    # The day's budget is spent: no label histogram leaves the device, the counts still do.
    assert withheld.private_withheld and withheld.labeled_count == 1
    for name in ("confusion", "calibration", "label_latency"):
        assert not withheld.HasField(name)
    summaries = _validated([released, withheld], spec)
    assert summaries[0].label_histogram_count == 10
    assert summaries[1].label_histogram_count == 0
    assert (summaries[1].confusion == 0).all()  # merges as zeros
