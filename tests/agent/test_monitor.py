"""Tests for agent.monitor without a server.

The aggregator address points at a closed port (127.0.0.1:1): every delivery fails at once
and the reports stay in the spool, where the tests read them back.
"""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent.errors import ConfigError, SpecError
from agent.monitor import Monitor
from agent.spec import CATEGORICAL, NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.spool import Spool
from protos import fleetwatch_pb2 as pb

NOWHERE = "127.0.0.1:1"
LABELS = {"region": "eu", "hw": "jetson"}


def _spec(**overrides) -> Spec:
    fields = dict(
        model="detector",
        model_version="3",
        features=(
            FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),  # [under, 2 bins, over, missing]
            FeatureSpec("scene", CATEGORICAL, vocabulary=("day", "night")),
        ),
        prediction=FeatureSpec("label", CATEGORICAL, vocabulary=("cat", "dog")),
        window_length_s=60,
        # These tests read exact histograms back: no differential-privacy noise.
        privacy=PrivacySpec(mechanism=NO_NOISE),
    )
    fields.update(overrides)
    return Spec(**fields)


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

    def make(**kwargs) -> Monitor:
        kwargs.setdefault("spec", _spec())
        kwargs.setdefault("spool_dir", tmp_path / "spool")
        kwargs.setdefault("labels", LABELS)
        kwargs.setdefault("clock", clock)
        mon = Monitor("detector", "3", "cam-0042", aggregator=NOWHERE, background=False,
                      backoff_base_s=0.01, backoff_cap_s=0.02, rpc_timeout_s=2.0, **kwargs)
        monitors.append(mon)
        return mon

    yield make
    for mon in monitors:
        mon.close(timeout_s=1.0)


def _reports(spool: Spool) -> list[pb.WindowReport]:
    out = []
    for item in spool.pending(limit=10_000):
        report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(item.payload).report)
        assert report.seq == item.seq
        assert report.window_start_unix_s == item.window_start
        out.append(report)
    return out


def _hist(report: pb.WindowReport, name: str) -> list[int]:
    [f] = [f for f in report.features if f.name == name]
    return list(f.histogram.counts)


def _totals_match(report: pb.WindowReport) -> None:
    for f in report.features:
        assert sum(f.histogram.counts) == report.event_count, f.name
    assert sum(report.prediction.counts) == report.event_count


# -- windows -------------------------------------------------------------------------------------

def test_windows_follow_the_clock(make, clock):
    mon = make()
    spec = mon.spec
    for t, x in [(1000.0, 0.5), (1010.0, 1.5), (1070.0, 5.0), (1150.0, -1.0), (1151.0, None)]:
        clock.t = t
        mon.observe({"x": x, "scene": "day"}, prediction="cat", latency_ms=t - 990)
    assert mon.flush(timeout_s=2.0) is False  # nothing listens: everything stays spooled
    reports = _reports(mon.spool)
    # 1080 saw no event: a heartbeat, in its place in the sequence.
    assert [r.window_start_unix_s for r in reports] == [960, 1020, 1080, 1140]
    assert [r.seq for r in reports] == [1, 2, 3, 4]
    assert [r.heartbeat for r in reports] == [False, False, True, False]
    assert [r.event_count for r in reports] == [2, 1, 0, 2]
    heartbeat = reports.pop(2)
    assert not heartbeat.features and not heartbeat.HasField("prediction")
    assert _hist(reports[0], "x") == [0, 1, 1, 0, 0]
    assert _hist(reports[1], "x") == [0, 0, 0, 1, 0]
    assert _hist(reports[2], "x") == [1, 0, 0, 0, 1]
    for r in reports:
        assert r.window_length_s == 60
        assert r.device_id == "cam-0042"
        assert (r.model, r.model_version) == ("detector", "3")
        assert dict(r.labels) == LABELS
        assert r.spec_hash == spec.hash
        assert r.agent_version
        assert r.late_event_count == 0 and r.invalid_value_count == 0
        _totals_match(r)
    latency = kll_floats_sketch.deserialize(reports[0].latency_kll)
    assert latency.n == 2 and latency.get_max_value() == 20.0
    stats = mon.stats()
    assert stats.events == 5 and stats.windows_closed == 3 and stats.heartbeats == 1
    assert stats.spool.pending == 4
    assert stats.last_delivery_error and "UNAVAILABLE" in stats.last_delivery_error


def test_poll_closes_only_expired_windows(make, clock):
    mon = make(grace_s=2.0)
    mon.observe({"x": 0.5})  # window 960, ends at 1020
    clock.t = 1021.0
    mon.observe({"x": 0.5})  # window 1020 opens; 960 is still within grace
    assert mon.poll(timeout_s=1.0) is True  # nothing to deliver yet
    assert _reports(mon.spool) == []
    clock.t = 1022.0  # 1020 + grace
    assert mon.poll(timeout_s=1.0) is False  # spooled, not delivered
    assert [r.window_start_unix_s for r in _reports(mon.spool)] == [960]
    clock.t = 1500.0
    mon.poll(timeout_s=1.0)
    reports = _reports(mon.spool)
    # 1080 .. 1380 were idle and have ended (1440 has not, with grace): heartbeats.
    assert [r.window_start_unix_s for r in reports] == list(range(960, 1440, 60))
    assert [r.heartbeat for r in reports] == [False, False] + [True] * 6


def test_grace_period(make, clock):
    mon = make(grace_s=2.0)
    clock.t = 1000.0
    mon.observe({"x": 0.5})  # window 960
    clock.t = 1021.0
    mon.observe({"x": 0.5})  # window 1020 opens; 960 still takes events until 1022
    clock.t = 1019.5
    mon.observe({"x": 1.5})  # out of order, within grace: its own window
    clock.t = 1085.0
    mon.observe({"x": 0.5})  # window 1080 opens; 960 and 1020 are past grace and close
    clock.t = 1010.0
    mon.observe({"x": 5.0})  # its window closed: counted late, in the newest window
    clock.t = 1030.0
    mon.observe({"x": 5.0})  # likewise
    mon.flush(timeout_s=1.0)
    reports = {r.window_start_unix_s: r for r in _reports(mon.spool)}
    assert sorted(reports) == [960, 1020, 1080]
    assert reports[960].event_count == 2 and reports[960].late_event_count == 0
    assert _hist(reports[960], "x") == [0, 1, 1, 0, 0]
    assert reports[1020].event_count == 1 and reports[1020].late_event_count == 0
    assert reports[1080].event_count == 3 and reports[1080].late_event_count == 2
    assert _hist(reports[1080], "x") == [0, 1, 0, 2, 0]


def test_late_batch_counts_every_event(make, clock):
    mon = make(grace_s=0.0)
    clock.t = 1000.0
    mon.observe({"x": 0.5})
    clock.t = 1100.0
    mon.observe({"x": 0.5})  # closes 960
    clock.t = 1001.0
    mon.observe_batch({"x": np.array([0.5, 1.5, 9.0])})
    mon.flush(timeout_s=1.0)
    reports = {r.window_start_unix_s: r for r in _reports(mon.spool)}
    assert reports[1080].event_count == 4 and reports[1080].late_event_count == 3


def test_observe_batch(make, clock):
    mon = make()
    mon.observe_batch({"x": np.array([0.5, 1.5, np.nan, np.inf]),
                       "scene": np.array(["day", "night", "fog", "day"]),
                       "extra": np.zeros(4)},
                      predictions=np.array(["cat", "dog", "dog", "owl"]),
                      latency_ms=np.array([1.0, 2.0, -1.0, 3.0]),
                      errors=np.array([0, 1, 0, 1]))
    mon.observe_batch({"x": np.ones(2)})  # no predictions: counted missing
    mon.flush(timeout_s=1.0)
    [r] = _reports(mon.spool)
    assert r.event_count == 6 and r.error_count == 2
    assert _hist(r, "x") == [0, 1, 3, 0, 2]
    assert _hist(r, "scene") == [2, 1, 1, 2]
    assert list(r.prediction.counts) == [1, 2, 1, 2]
    assert r.invalid_value_count == 2  # inf, the negative latency
    assert r.unknown_feature_count == 4
    assert kll_floats_sketch.deserialize(r.latency_kll).n == 3
    _totals_match(r)
    assert mon.stats().events == 6


# -- garbage in ----------------------------------------------------------------------------------

@pytest.mark.parametrize("features", [None, [1, 2], "x=1", 42, object()])
def test_observe_never_raises_on_bad_features(make, features):
    mon = make()
    mon.observe(features, prediction="cat", latency_ms=1.0)
    mon.observe({"x": 0.5}, prediction="cat")
    stats = mon.stats()
    assert stats.internal_errors == 1
    assert stats.events == 1
    mon.flush(timeout_s=1.0)
    [r] = _reports(mon.spool)
    assert r.event_count == 1
    _totals_match(r)


def test_observe_counts_weird_values(make):
    mon = make()
    weird = [
        ({"x": "abc", "scene": 3.5}, "cat", 1.0),
        ({"x": {"a": 1}, "scene": ["day"]}, ["cat", "dog"], "fast"),
        ({"x": math.inf, "scene": None}, object(), math.nan),
        ({"x": 10**400, "scene": b"day"}, 1.5, -3.0),
        ({"x": np.float32(0.5), "scene": np.str_("night")}, np.str_("dog"), np.float64(2.0)),
    ]
    for features, prediction, latency in weird:
        mon.observe(features, prediction=prediction, latency_ms=latency)
    mon.observe({"x": 1.0}, prediction="cat", latency_ms=object(), error="yes")
    stats = mon.stats()
    assert stats.internal_errors == 0
    assert stats.events == 6
    mon.flush(timeout_s=1.0)
    [r] = _reports(mon.spool)
    assert r.event_count == 6 and r.error_count == 1
    # invalid: "abc", 3.5 | dict, list, list prediction, "fast" | inf, object prediction, nan |
    # bytes, 1.5 prediction, -3.0 | (none) | the object latency
    assert r.invalid_value_count == 13
    assert _hist(r, "x") == [0, 1, 1, 1, 3]
    assert _hist(r, "scene") == [0, 1, 0, 5]
    assert list(r.prediction.counts) == [2, 1, 0, 3]
    assert kll_floats_sketch.deserialize(r.latency_kll).n == 2
    _totals_match(r)


def test_observe_batch_mismatched_lengths_counted_not_raised(make):
    mon = make()
    mon.observe_batch({"x": np.ones(3), "scene": np.array(["day"] * 2)})
    mon.observe_batch({"x": np.ones(3)}, predictions=np.array(["cat"] * 4))
    mon.observe_batch({"x": np.ones(3)}, latency_ms=np.ones(2))
    mon.observe_batch({"x": np.ones(3)}, errors=[1])
    mon.observe_batch(None)
    mon.observe_batch({"x": [[1, 2], [3]]})  # ragged
    stats = mon.stats()
    assert stats.internal_errors == 6
    assert stats.events == 0
    mon.flush(timeout_s=1.0)
    assert _reports(mon.spool) == []


def test_observe_batch_garbage_values(make):
    mon = make()
    mon.observe_batch({"x": ["a", None, 0.5], "scene": [1, {"k": 2}, "day"]},
                      predictions=[object(), "dog", None],
                      latency_ms=["slow", None, 4.0])
    mon.observe_batch({})  # no event
    stats = mon.stats()
    assert stats.internal_errors == 0 and stats.events == 3
    mon.flush(timeout_s=1.0)
    [r] = _reports(mon.spool)
    assert r.event_count == 3
    assert r.invalid_value_count == 4  # "a", the dict, the object, "slow"
    assert _hist(r, "x") == [0, 1, 0, 0, 2]
    _totals_match(r)


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "labels",
    [
        {"region": 1},
        {1: "eu"},
        {"": "eu"},
        {"k" * 129: "v"},
        {"k": "v" * 129},
        {"a,b": "c"},
        {"a": "b=c"},
        {"a=b": "c"},
        {"a": "b,c"},
        {f"k{i}": "v" for i in range(33)},
        [("region", "eu")],
        "region=eu",
    ],
)
def test_bad_labels(tmp_path, labels):
    with pytest.raises(ConfigError, match="labels"):
        Monitor("detector", "3", "dev", labels=labels, aggregator=NOWHERE,
                spool_dir=tmp_path, spec=_spec(), background=False)


def test_good_labels_edge_cases(make):
    labels = {"k" * 128: "v" * 128, **{f"k{i}": "" for i in range(31)}}
    mon = make(labels=labels)
    assert mon.labels == labels


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(model="", model_version="3", device_id="d", aggregator=NOWHERE),
        dict(model="m", model_version="", device_id="d", aggregator=NOWHERE),
        dict(model="m", model_version="3", device_id="", aggregator=NOWHERE),
        dict(model="m", model_version="3", device_id="d" * 257, aggregator=NOWHERE),
        dict(model="m", model_version="3", device_id="d"),  # no aggregator
        dict(model="m", model_version="3", device_id="d", aggregator=NOWHERE, grace_s=-1),
    ],
)
def test_bad_configuration(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        Monitor(spool_dir=tmp_path, spec=_spec(model="m"), background=False, **kwargs)


def test_spec_for_another_model_refused(make):
    with pytest.raises(SpecError):
        make(spec=_spec(model_version="4"))


def test_spec_from_a_path(make, tmp_path):
    path = tmp_path / "spec.json"
    _spec().save(path)
    mon = make(spec=str(path))
    assert mon.spec == _spec() and mon.spec.hash == _spec().hash


# -- persistence ---------------------------------------------------------------------------------

def test_reopened_monitor_continues_seq(make, clock):
    mon = make()
    mon.observe({"x": 0.5})
    clock.t += 60
    mon.observe({"x": 0.5})
    mon.close(timeout_s=1.0)
    mon = make()
    clock.t += 60
    mon.observe({"x": 0.5})
    mon.flush(timeout_s=1.0)
    reports = _reports(mon.spool)
    assert [r.seq for r in reports] == [1, 2, 3, 4]
    # The second monitor started in 1020 and saw nothing there: its heartbeat (the first
    # monitor's report for 1020 holds the events; the aggregator merges a heartbeat as zeros).
    assert [r.window_start_unix_s for r in reports] == [960, 1020, 1020, 1080]
    assert [r.heartbeat for r in reports] == [False, False, True, False]
    assert mon.stats().spool.next_seq == 5


def test_context_manager_closes(make, tmp_path, clock):
    with make() as mon:
        mon.observe({"x": 0.5}, prediction="dog")
    with pytest.raises(sqlite3.ProgrammingError):
        mon.spool.stats()  # the spool is closed
    mon.close()  # idempotent
    spool = Spool(tmp_path / "spool" / "spool.sqlite")
    try:
        [r] = _reports(spool)  # the open window was flushed to the spool on close
        assert r.event_count == 1 and list(r.prediction.counts) == [0, 1, 0, 0]
    finally:
        spool.close()


def test_context_manager_closes_on_error(make):
    with pytest.raises(RuntimeError), make() as mon:
        mon.observe({"x": 0.5})
        raise RuntimeError("model crashed")
    with pytest.raises(sqlite3.ProgrammingError):
        mon.spool.stats()


def test_spec_cached_and_reused_when_aggregator_unreachable(make, tmp_path):
    spec = _spec(created_unix_s=123)
    mon = make(spec=spec)
    cached = mon.spool.cached_spec("detector", "3")
    assert Spec.from_json(cached) == spec
    mon.close(timeout_s=1.0)
    mon = make(spec=None)  # no spec given, nothing listens: the cached copy is used
    assert mon.spec == spec
    assert mon.spec.hash == spec.hash
    mon.observe({"x": 1.5})
    mon.flush(timeout_s=1.0)
    [r] = _reports(mon.spool)
    assert r.spec_hash == spec.hash and _hist(r, "x") == [0, 0, 1, 0, 0]


def test_without_any_spec_events_are_counted(make, tmp_path):
    mon = make(spec=None, spool_dir=tmp_path / "fresh")
    assert mon.spec is None
    mon.observe({"x": 1.0})
    mon.observe_batch({"x": np.ones(3)})
    stats = mon.stats()
    assert stats.events == 0 and stats.events_without_spec == 4
    assert stats.internal_errors == 0
    mon.flush(timeout_s=1.0)
    assert _reports(mon.spool) == []


def test_spool_bound_drop_count_travels_in_the_next_report(make, clock):
    mon = make(max_spool_reports=2)
    for _ in range(4):
        mon.observe({"x": 0.5})
        clock.t += 60
    mon.flush(timeout_s=1.0)
    reports = _reports(mon.spool)
    assert [r.seq for r in reports] == [3, 4]
    assert [r.spool_dropped_count for r in reports] == [0, 1]
    assert mon.stats().spool.dropped_total == 2


def test_events_after_a_flush_in_the_same_window_are_reported(make, clock):
    """The hot path reuses the window of the previous event; a flush closes that window, and
    later events of the same window go to a new report, not into the closed one."""
    mon = make()
    mon.observe({"x": 0.5}, prediction="cat")
    mon.observe({"x": 0.5}, prediction="cat")
    mon.flush(timeout_s=0.1)
    mon.observe({"x": 1.5}, prediction="dog")
    mon.flush(timeout_s=0.1)
    reports = sorted(_reports(mon.spool), key=lambda r: r.seq)
    assert [r.event_count for r in reports] == [2, 1]
    assert reports[0].window_start_unix_s == reports[1].window_start_unix_s
    assert mon.stats().events == 3
