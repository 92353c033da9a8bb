"""Faults, over real gRPC against a real aggregator: an aggregator that is down, an agent that
restarts, a full spool, and hostile or broken reports (including corrupt KLL sketch bytes)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from datasketches import kll_floats_sketch

from agent import Monitor
from agent.spec import Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator.server import RunningAggregator
from aggregator.store.base import rollup_resolutions, time_cover
from protos import fleetwatch_pb2 as pb

WINDOW_S = 60
GRACE_S = 2.0
SCENES = np.array(["indoor", "outdoor", "night", "fog"], dtype=object)
Status = grpc.StatusCode


class SimClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def envelope(report: pb.WindowReport) -> bytes:
    return pb.ReportEnvelope(report=report.SerializeToString()).SerializeToString()


# -- what the devices observed -----------------------------------------------------------------


@dataclass
class Tally:
    """Events, errors and the 'temp' histogram fed to monitors, computed independently."""

    edges: tuple[float, ...]
    events: int = 0
    errors: int = 0
    temp: np.ndarray | None = None

    def add(self, temp: np.ndarray, errors: np.ndarray) -> None:
        interior, _ = np.histogram(temp, bins=np.asarray(self.edges))  # last bin closed
        hist = np.concatenate(([np.sum(temp < self.edges[0])], interior,
                               [np.sum(temp > self.edges[-1])], [0])).astype(np.int64)
        self.temp = hist if self.temp is None else self.temp + hist
        self.events += temp.size
        self.errors += int(np.count_nonzero(errors))


def feed_window(mon: Monitor, clock: SimClock, ws: int, rng: np.random.Generator,
                tally: Tally) -> int:
    n = int(rng.integers(50, 200))
    temp = rng.normal(0.0, 1.2, n)
    errors = rng.random(n) < 0.1
    clock.t = ws + 10.0
    mon.observe_batch({"temp": temp, "speed": rng.exponential(20.0, n),
                       "scene": rng.choice(SCENES, n)},
                      predictions=rng.uniform(0.0, 1.0, n),
                      latency_ms=rng.lognormal(3.0, 0.5, n), errors=errors)
    tally.add(temp, errors)
    return n


def store_temp_histogram(agg: RunningAggregator, spec: Spec, start: int, end: int) -> np.ndarray:
    store = agg.store
    ids = [ls.id for ls in store.label_sets(spec.hash)]
    cover = time_cover(start, end, rollup_resolutions(spec.window_length_s))
    total = np.zeros(spec.feature("temp").histogram_length, np.int64)
    for s in store.merged_rollups(spec.hash, ids, cover).values():
        total += s.features["temp"]
    return total


def reports_in_db(db: Path) -> list[tuple[str, int, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT device_id, seq, window_start FROM reports "
                            "ORDER BY device_id, seq").fetchall()


@pytest.fixture
def monitors(spec: Spec) -> Iterator[Callable[..., Monitor]]:
    """Factory of Monitors for the spec's model, closed at teardown (if the test did not)."""
    made: list[Monitor] = []

    def make(device_id: str, target: str, spool_dir: Path, clock: SimClock,
             **kw: object) -> Monitor:
        mon = Monitor(spec.model, spec.model_version, device_id, labels={"region": "eu"},
                      aggregator=target, spool_dir=spool_dir, clock=clock, grace_s=GRACE_S,
                      **kw)  # type: ignore[arg-type]
        made.append(mon)
        return mon

    yield make
    for mon in made:
        mon.close(timeout_s=1.0)


# -- the aggregator goes away ------------------------------------------------------------------


def test_stopped_aggregator_loses_nothing(start_aggregator, spec: Spec, tmp_path: Path,
                                          free_port: int, window_base: int, cohort_rpc,
                                          monitors) -> None:
    db = tmp_path / "aggregator.sqlite"
    target = f"127.0.0.1:{free_port}"
    clock = SimClock(window_base)
    n_windows = 4
    rng = np.random.default_rng(5)
    tally = Tally(spec.feature("temp").edges)
    with start_aggregator(db, port=free_port):
        fleet = [monitors(f"dev-{d}", target, tmp_path / f"spool-{d}", clock,
                          background=True, backoff_base_s=0.05, backoff_cap_s=0.4, tick_s=0.1)
                 for d in range(3)]
        assert all(m.spec is not None and m.spec.hash == spec.hash for m in fleet)
    # The aggregator is down from here on: windows pile up in the spools.
    for w in range(n_windows):
        for m in fleet:
            feed_window(m, clock, window_base + w * WINDOW_S, rng, tally)
    clock.t = window_base + n_windows * WINDOW_S + GRACE_S + 1.0
    assert wait_until(lambda: all(m.stats().spool.pending == n_windows for m in fleet)), \
        [m.stats() for m in fleet]

    # Retries back off: a handful of delivery attempts per second, not a busy loop.
    attempts = [0] * len(fleet)
    lock = threading.Lock()
    for i, m in enumerate(fleet):
        deliver = m._uploader.deliver

        def counting(deadline: float | None = None, deliver=deliver, i: int = i):
            with lock:
                attempts[i] += 1
            return deliver(deadline)

        m._uploader.deliver = counting  # type: ignore[method-assign]
    cpu = time.process_time()
    time.sleep(1.0)
    cpu = time.process_time() - cpu
    assert all(1 <= a <= 30 for a in attempts), attempts
    assert cpu < 0.5, f"{cpu:.2f} s of CPU in 1 s while the aggregator is down"
    for m in fleet:
        stats = m.stats()
        assert stats.spool.pending == n_windows
        assert stats.last_delivery_error and "UNAVAILABLE" in stats.last_delivery_error

    # Restart on the same SQLite file and port: everything arrives, exactly once.
    with start_aggregator(db, port=free_port) as agg:
        assert wait_until(lambda: all(m.stats().spool.pending == 0 for m in fleet)), \
            [m.stats() for m in fleet]
        end = window_base + n_windows * WINDOW_S
        (h,) = cohort_rpc(agg.target, window_base, end)
        assert (h.devices, h.reports, h.events, h.errors) == (
            len(fleet), len(fleet) * n_windows, tally.events, tally.errors)
        np.testing.assert_array_equal(store_temp_histogram(agg, spec, window_base, end),
                                      tally.temp)
        assert agg.ingestor.accepted == len(fleet) * n_windows
        assert agg.ingestor.duplicates == 0
        for m in fleet:
            m.close()
    rows = reports_in_db(db)
    assert len(rows) == len(set((d, s) for d, s, _ in rows)) == len(fleet) * n_windows


def test_agent_restart_resumes_its_spool(start_aggregator, spec: Spec, tmp_path: Path,
                                         free_port: int, window_base: int, cohort_rpc,
                                         report_rpc, monitors) -> None:
    db = tmp_path / "aggregator.sqlite"
    target = f"127.0.0.1:{free_port}"
    spool_dir = tmp_path / "spool"
    clock = SimClock(window_base)
    rng = np.random.default_rng(6)
    tally = Tally(spec.feature("temp").edges)

    # First life: the aggregator is unreachable; the spec is given directly.
    first = monitors("dev-r", target, spool_dir, clock, spec=spec, background=False)
    for w in range(3):
        feed_window(first, clock, window_base + w * WINDOW_S, rng, tally)
        clock.t = window_base + (w + 1) * WINDOW_S + GRACE_S + 1.0
        assert first.poll(timeout_s=2.0) is False
    stats = first.stats()
    assert (stats.spool.pending, stats.spool.next_seq) == (3, 4)
    first.close(timeout_s=1.0)  # nothing delivered

    # Second life on the same spool: the spec comes from the spool's cache, seq continues.
    second = monitors("dev-r", target, spool_dir, clock, background=False)
    assert second.spec is not None and second.spec.hash == spec.hash
    assert second.stats().spool.next_seq == 4
    for w in range(3, 5):
        feed_window(second, clock, window_base + w * WINDOW_S, rng, tally)
        clock.t = window_base + (w + 1) * WINDOW_S + GRACE_S + 1.0
        assert second.poll(timeout_s=2.0) is False
    pending = second.spool.pending()
    assert [p.seq for p in pending] == [1, 2, 3, 4, 5]
    for p in pending:
        report = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(p.payload).report)
        assert report.seq == p.seq
        assert report.window_start_unix_s == window_base + (p.seq - 1) * WINDOW_S

    with start_aggregator(db, port=free_port) as agg:
        assert wait_until(lambda: second.poll(timeout_s=2.0))
        end = window_base + 5 * WINDOW_S
        (h,) = cohort_rpc(agg.target, window_base, end)
        assert (h.devices, h.reports, h.events, h.errors) == (1, 5, tally.events, tally.errors)
        np.testing.assert_array_equal(store_temp_histogram(agg, spec, window_base, end),
                                      tally.temp)
        # The spooled bytes were stored verbatim; sending them again changes nothing.
        send = report_rpc(agg.target)
        for p in pending:
            assert send(p.payload, timeout=10).status == pb.ReportResponse.DUPLICATE
        assert (agg.ingestor.accepted, agg.ingestor.duplicates) == (5, 5)
        (again,) = cohort_rpc(agg.target, window_base, end)
        assert (again.reports, again.events) == (5, tally.events)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        stored = [bytes(b) for (b,) in conn.execute("SELECT envelope FROM reports ORDER BY seq")]
    assert stored == [p.payload for p in pending]
    assert [(s, ws) for _, s, ws in reports_in_db(db)] == [
        (s, window_base + (s - 1) * WINDOW_S) for s in range(1, 6)]


def test_full_spool_drops_oldest_and_says_so(start_aggregator, spec: Spec, tmp_path: Path,
                                             free_port: int, window_base: int, cohort_rpc,
                                             monitors) -> None:
    db = tmp_path / "aggregator.sqlite"
    target = f"127.0.0.1:{free_port}"
    clock = SimClock(window_base)
    rng = np.random.default_rng(7)
    mon = monitors("dev-s", target, tmp_path / "spool", clock, spec=spec,
                   background=False, max_spool_reports=3)
    kept = Tally(spec.feature("temp").edges)  # the windows whose reports survive
    n_windows = 9
    for w in range(n_windows):
        tally = kept if w >= n_windows - 3 else Tally(kept.edges)
        feed_window(mon, clock, window_base + w * WINDOW_S, rng, tally)
        clock.t = window_base + (w + 1) * WINDOW_S + GRACE_S + 1.0
        assert mon.poll(timeout_s=2.0) is False
    stats = mon.stats().spool
    assert (stats.pending, stats.dropped_total, stats.next_seq) == (3, 6, 10)
    pending = mon.spool.pending()
    assert [p.seq for p in pending] == [7, 8, 9]
    carried = [pb.WindowReport.FromString(pb.ReportEnvelope.FromString(p.payload).report)
               .spool_dropped_count for p in pending]
    assert all(c >= 1 for c in carried), carried  # each report carries the drops before it

    with start_aggregator(db, port=free_port) as agg:
        assert wait_until(lambda: mon.poll(timeout_s=2.0))
        # One more window: its report carries the drops not reported yet.
        last = window_base + n_windows * WINDOW_S
        feed_window(mon, clock, last, rng, kept)
        clock.t = last + WINDOW_S + GRACE_S + 1.0
        assert mon.poll(timeout_s=5.0)
        (h,) = cohort_rpc(agg.target, window_base, last + WINDOW_S)
        assert h.spool_dropped == mon.stats().spool.dropped_total == 6
        assert (h.reports, h.events, h.errors) == (4, kept.events, kept.errors)
        np.testing.assert_array_equal(
            store_temp_histogram(agg, spec, window_base, last + WINDOW_S), kept.temp)


# -- hostile or broken reports -----------------------------------------------------------------


def build_report(spec: Spec, ws: int, *, device: str = "dev-x", seq: int = 1, n: int = 64,
                 labels: dict[str, str] | None = None, seed: int = 0) -> pb.WindowReport:
    """A valid report, built with the agent's own window accumulator and wire conversion."""
    rng = np.random.default_rng(seed)
    acc = WindowAccumulator(spec, ws)
    acc.observe_batch({"temp": rng.normal(0.0, 1.0, n), "speed": rng.exponential(20.0, n),
                       "scene": rng.choice(SCENES, n)},
                      rng.uniform(0.0, 1.0, n), rng.lognormal(3.0, 0.5, n),
                      rng.random(n) < 0.1, n)
    meta = ReportMeta(device, spec.model, spec.model_version, labels or {"region": "eu"}, ws,
                      spec.window_length_s, seq, spec.hash, int(time.time() * 1000), "test")
    return report_to_proto(meta, acc.to_summary())


def _kll_items_at(data: bytes) -> int:
    """Offset of the first retained item of a full-form float KLL sketch."""
    assert data[0] == 5
    return 20 + 4 * data[18] + 8


def _flip_item_sign(data: bytes) -> bytes:
    out = bytearray(data)
    out[-1] ^= 0x80  # the sign bit of the last retained item: now below the sketch's min
    return bytes(out)


def _forge_n(data: bytes, n: int) -> bytes:
    return data[:8] + struct.pack("<Q", n) + data[16:]


def _wrap_counts(m: pb.WindowReport) -> None:
    """Two huge counts whose int64 sum wraps around to exactly the event count."""
    counts = m.features[0].histogram.counts
    counts[:] = [2**63 - 1, 2**63 - 1, m.event_count + 2] + [0] * (len(counts) - 3)


def _bigger_sketch(m: pb.WindowReport) -> None:
    sketch = kll_floats_sketch(200)
    sketch.update(np.arange(m.event_count + 5, dtype=np.float32))
    m.latency_kll = sketch.serialize()


def _mutation(change: Callable[[pb.WindowReport], object]) -> Callable[[pb.WindowReport], bytes]:
    def build(m: pb.WindowReport) -> bytes:
        change(m)
        return envelope(m)

    return build


def _shift_count(feature: int | None, delta: int) -> Callable[[pb.WindowReport], bytes]:
    """Add `delta` to the first bin of a feature's histogram (None: the prediction's)."""

    def change(m: pb.WindowReport) -> None:
        counts = m.prediction.counts if feature is None else m.features[feature].histogram.counts
        counts[0] += delta

    return _mutation(change)


def _set(**fields: object) -> Callable[[pb.WindowReport], bytes]:
    return _mutation(lambda m: [setattr(m, k, v) for k, v in fields.items()])


FAR_FUTURE = (int(time.time()) // WINDOW_S + 3 * 1440) * WINDOW_S

# (id, build bytes from a valid report, status code, rejection reason, text the details name)
BAD_REPORTS: list[tuple[str, Callable[[pb.WindowReport], bytes], Status, str | None, str]] = [
    ("garbage-bytes", lambda m: b"\xff\xfe this is not protobuf \x00", Status.INVALID_ARGUMENT,
     "malformed", "envelope"),
    ("garbage-report", lambda m: pb.ReportEnvelope(report=b"\xff\xff\xff\xff")
     .SerializeToString(), Status.INVALID_ARGUMENT, "malformed", "envelope.report"),
    ("empty-envelope", lambda m: b"", Status.INVALID_ARGUMENT, "malformed", "envelope.report"),
    ("unknown-spec-hash", _set(spec_hash="0" * 64), Status.FAILED_PRECONDITION, "unknown_spec",
     "spec_hash"),
    ("histogram-length", _mutation(lambda m: m.features[0].histogram.counts.append(0)),
     Status.INVALID_ARGUMENT, "invalid", "features['temp']"),
    ("negative-count", _shift_count(1, -10**6), Status.INVALID_ARGUMENT, "invalid",
     "features['speed']"),
    ("counts-not-summing", _shift_count(2, 1), Status.INVALID_ARGUMENT, "invalid",
     "features['scene']"),
    ("counts-wrapping-int64", _mutation(_wrap_counts), Status.INVALID_ARGUMENT, "invalid",
     "features['temp']"),
    ("prediction-not-summing", _shift_count(None, 1), Status.INVALID_ARGUMENT, "invalid",
     "prediction"),
    ("prediction-absent", _mutation(lambda m: m.ClearField("prediction")),
     Status.INVALID_ARGUMENT, "invalid", "prediction"),
    ("features-out-of-order", _mutation(lambda m: m.features.reverse()),
     Status.INVALID_ARGUMENT, "invalid", "features"),
    ("errors-above-events", _mutation(lambda m: setattr(m, "error_count", m.event_count + 1)),
     Status.INVALID_ARGUMENT, "invalid", "error_count"),
    ("late-above-events", _mutation(lambda m: setattr(m, "late_event_count",
                                                      m.event_count + 1)),
     Status.INVALID_ARGUMENT, "invalid", "late_event_count"),
    ("seq-zero", _set(seq=0), Status.INVALID_ARGUMENT, "invalid", "seq"),
    ("other-model-version", _set(model_version="2"), Status.INVALID_ARGUMENT, "invalid",
     "model"),
    ("window-not-aligned", _mutation(lambda m: setattr(m, "window_start_unix_s",
                                                       m.window_start_unix_s + 7)),
     Status.INVALID_ARGUMENT, "invalid", "window_start_unix_s"),
    ("window-far-future", _set(window_start_unix_s=FAR_FUTURE), Status.FAILED_PRECONDITION,
     "clock_skew", "window_start_unix_s"),
    ("window-length", _set(window_length_s=30), Status.INVALID_ARGUMENT, "invalid",
     "window_length_s"),
    ("too-many-labels", _mutation(lambda m: m.labels.update({f"k{i}": "v" for i in range(33)})),
     Status.INVALID_ARGUMENT, "invalid", "labels"),
    ("label-with-separator", _mutation(lambda m: m.labels.update({"region": "a=b"})),
     Status.INVALID_ARGUMENT, "invalid", "labels"),
    ("kll-truncated", _mutation(lambda m: setattr(m, "latency_kll", m.latency_kll[:-3])),
     Status.INVALID_ARGUMENT, "bad_sketch", "latency_kll"),
    ("kll-bit-flipped", _mutation(lambda m: setattr(m, "latency_kll",
                                                    _flip_item_sign(m.latency_kll))),
     Status.INVALID_ARGUMENT, "bad_sketch", "latency_kll"),
    ("kll-forged-n", _mutation(lambda m: setattr(m, "latency_kll",
                                                 _forge_n(m.latency_kll, m.event_count - 1))),
     Status.INVALID_ARGUMENT, "bad_sketch", "latency_kll"),
    ("kll-forged-huge-n", _mutation(lambda m: setattr(m, "latency_kll",
                                                      _forge_n(m.latency_kll, 2**63))),
     Status.INVALID_ARGUMENT, "bad_sketch", "latency_kll"),
    ("kll-more-items-than-events", _mutation(_bigger_sketch), Status.INVALID_ARGUMENT,
     "bad_sketch", "latency_kll"),
    ("oversize-message", lambda m: b"\x00" * ((4 << 20) + 1), Status.RESOURCE_EXHAUSTED, None,
     "larger than max"),
]


@pytest.mark.parametrize(("build", "code", "reason", "names"),
                         [case[1:] for case in BAD_REPORTS], ids=[c[0] for c in BAD_REPORTS])
def test_bad_report_is_refused_and_server_keeps_serving(
        aggregator: RunningAggregator, spec: Spec, window_base: int, report_rpc, cohort_rpc,
        build: Callable[[pb.WindowReport], bytes], code: Status, reason: str | None,
        names: str) -> None:
    send = report_rpc(aggregator.target)
    valid = build_report(spec, window_base)
    assert valid.event_count == 64 and len(valid.latency_kll) > 8
    bad = pb.WindowReport()
    bad.CopyFrom(valid)
    with pytest.raises(grpc.RpcError) as refused:
        send(build(bad), timeout=10)
    details = refused.value.details()
    assert refused.value.code() == code, details
    if reason:  # refused by the aggregator's checks: the message opens with the field
        assert details.startswith(f"{names}: "), details
        assert not details.startswith(f"{names}: {names}"), details
    else:  # refused by gRPC itself, before the handler
        assert names in details, details
    ingestor = aggregator.ingestor
    assert dict(ingestor.rejected) == ({reason: 1} if reason else {})
    assert ingestor.accepted == 0
    assert aggregator.store.label_sets(spec.hash) == []  # nothing stored, nothing merged
    assert cohort_rpc(aggregator.target, window_base, window_base + WINDOW_S) == []

    assert send(envelope(valid), timeout=10).status == pb.ReportResponse.ACCEPTED
    (h,) = cohort_rpc(aggregator.target, window_base, window_base + WINDOW_S)
    assert (h.reports, h.events, h.errors) == (1, valid.event_count, valid.error_count)
    assert ingestor.accepted == 1


def test_bad_report_cases_pass_the_client_side_checks(spec: Spec, window_base: int) -> None:
    """The KLL cases really are full-form sketches that protobuf accepts (the refusal comes
    from the aggregator's checks, not from the test building an unparseable message)."""
    valid = build_report(spec, window_base)
    assert _kll_items_at(valid.latency_kll) < len(valid.latency_kll)
    kll_floats_sketch.deserialize(bytes(valid.latency_kll))  # the unmutated bytes are fine


def _mutate_kll(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    items_at = _kll_items_at(data)
    kind = rng.randrange(9)
    if kind == 0:    # one random bit anywhere
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # one bit in the header or the level offsets
        i = rng.randrange(items_at)
        out[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # one byte overwritten
        out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 3:  # truncated
        del out[rng.randrange(len(out)):]
    elif kind == 4:  # trailing junk
        out += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    elif kind == 5:  # forged n
        n = rng.choice([0, 1, 2, 2**32, 2**63, 2**64 - 1, rng.randrange(2**64)])
        out[8:16] = struct.pack("<Q", n)
    elif kind == 6:  # two items swapped
        count = (len(out) - items_at) // 4
        a, b = rng.randrange(count), rng.randrange(count)
        ia, ib = items_at + 4 * a, items_at + 4 * b
        out[ia:ia + 4], out[ib:ib + 4] = out[ib:ib + 4], out[ia:ia + 4]
    elif kind == 7:  # an item replaced by an arbitrary float32 (NaN and infinities included)
        count = (len(out) - items_at) // 4
        i = items_at + 4 * rng.randrange(count)
        out[i:i + 4] = struct.pack("<f", rng.choice(
            [float("nan"), float("inf"), -1.0, 0.0, 1e30, rng.uniform(0, 100)]))
    else:            # a level offset moved
        level = rng.randrange(out[18])
        i = 20 + 4 * level
        out[i:i + 4] = struct.pack("<I", rng.randrange(2 * len(out)))
    return bytes(out)


def test_corrupt_kll_sketches_never_reach_datasketches(aggregator: RunningAggregator,
                                                       spec: Spec, window_base: int,
                                                       report_rpc, cohort_rpc) -> None:
    send = report_rpc(aggregator.target)
    base = build_report(spec, window_base, n=3000, seed=3)
    kll = bytes(base.latency_kll)
    assert kll[0] == 5 and kll[18] > 1  # full form, several levels
    rng = random.Random(20240611)
    accepted = 0
    for i in range(200):
        m = pb.WindowReport()
        m.CopyFrom(base)
        m.seq = 10 + i
        m.latency_kll = _mutate_kll(rng, kll)
        try:
            response = send(envelope(m), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == Status.INVALID_ARGUMENT, (i, e.code(), e.details())
            assert "latency_kll" in e.details(), e.details()
        else:
            assert response.status == pb.ReportResponse.ACCEPTED
            accepted += 1
    ingestor = aggregator.ingestor
    assert ingestor.accepted == accepted
    assert sum(ingestor.rejected.values()) == 200 - accepted
    assert set(ingestor.rejected) <= {"bad_sketch", "invalid"}
    assert ingestor.rejected["bad_sketch"] > 150

    # Still serving; what was accepted merges and answers (a merge is where bad bytes bite).
    base.seq = 1
    assert send(envelope(base), timeout=10).status == pb.ReportResponse.ACCEPTED
    (h,) = cohort_rpc(aggregator.target, window_base, window_base + WINDOW_S)
    assert (h.reports, h.events) == (accepted + 1, (accepted + 1) * base.event_count)
    assert 0 < h.latency_p50_ms <= h.latency_p95_ms <= h.latency_p99_ms < float("inf")


def test_reused_device_id_with_other_labels_does_not_mix_cohorts(
        aggregator: RunningAggregator, spec: Spec, window_base: int, report_rpc,
        cohort_rpc) -> None:
    """A cloned device image: the same device_id and seq arrive with new labels. Not a resend
    (other bytes): never merged, answered STALE_SEQ (an agent renumbers above the mark), and
    the new label set still gets its own cohort later."""
    send = report_rpc(aggregator.target)

    def report(device: str, seq: int, region: str, n: int) -> bytes:
        return envelope(build_report(spec, window_base, device=device, seq=seq, n=n,
                                     labels={"region": region}))

    assert send(report("clone", 1, "a", 10), timeout=10).status == pb.ReportResponse.ACCEPTED
    assert send(report("clone", 1, "b", 20), timeout=10).status == pb.ReportResponse.STALE_SEQ
    assert send(report("clone", 2, "b", 20), timeout=10).status == pb.ReportResponse.ACCEPTED
    assert send(report("other", 1, "c", 40), timeout=10).status == pb.ReportResponse.ACCEPTED
    cohorts = cohort_rpc(aggregator.target, window_base, window_base + WINDOW_S,
                         group_by=("region",))
    assert {h.cohort["region"]: (h.events, h.devices) for h in cohorts} == {
        "a": (10, 1), "b": (20, 1), "c": (40, 1)}
