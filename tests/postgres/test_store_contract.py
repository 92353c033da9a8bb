"""The `Store` contract, on both stores: every test here runs on SqliteStore and on
PostgresStore (a fresh database on the test server), and the last ones feed the same reports to
both and compare what they answer.

Expected values come from the reports as the test made them (Python sums and sets), not from
either store; KLL quantiles are compared by rank, within the sketch's rank error (datasketches'
KLL merge is randomized, so two stores merging the same sketches differ within it).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator.store.base import (
    DAY_S,
    HOUR_S,
    AlertRecord,
    Contribution,
    IngestOutcome,
    PrivacyStats,
    Store,
    canonical_labels,
    rollup_resolutions,
    time_cover,
)
from aggregator.store.sqlite import SqliteStore

W = 60
EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
SPEC = Spec(model="m", model_version="1",
            features=(FeatureSpec("x", NUMERIC, edges=EDGES),), window_length_s=W,
            privacy=PrivacySpec(mechanism=NO_NOISE))
SPEC2 = Spec(model="m", model_version="2",
             features=(FeatureSpec("x", NUMERIC, edges=EDGES),), window_length_s=W,
             privacy=PrivacySpec(mechanism=NO_NOISE))
RES = rollup_resolutions(W)
assert RES == (W, HOUR_S, DAY_S)
# Two hours before a day boundary, off the hour: the reports cross hours and a day.
T0 = 1_700_006_400 - 2 * HOUR_S - 7 * W
LABELS = ({"region": "eu"}, {"region": "us"}, {"hw": "pi", "region": "eu"})
# KLL k=200: ~1.33% normalized rank error for one rank; 3.5% leaves room for two sketches.
RANK_TOLERANCE = 0.035


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path
               ) -> Iterator[Callable[..., Store]]:
    """Factory of stores of the parametrized kind; every call opens another store on the
    same database (as another replica would), all closed at teardown."""
    opened: list[Any] = []
    if request.param == "sqlite":
        def make(**kw: Any) -> Store:
            s = SqliteStore(tmp_path / "a.sqlite", **kw)
            opened.append(s)
            return s
    else:
        from aggregator.store.postgres import PostgresStore

        dsn = request.getfixturevalue("pg_dsn")

        def make(**kw: Any) -> Store:
            s = PostgresStore(dsn, **kw)
            opened.append(s)
            return s
    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    s = make_store()
    s.put_spec(SPEC)
    return s


def make_summary(rng: np.random.Generator, events: int, spec: Spec = SPEC,
                 ws: int = T0) -> tuple[Summary, np.ndarray, np.ndarray]:
    """A report's summary, with the raw values it was made of (x, latencies)."""
    x = rng.uniform(-0.2, 1.2, events)
    lat = rng.lognormal(3.0, 0.5, events)
    acc = WindowAccumulator(spec, ws)
    acc.observe_batch({"x": x}, None, lat, rng.random(events) < 0.1, events)
    return acc.to_summary(), x, lat


def meta(device: str, seq: int, ws: int = T0, labels: dict[str, str] | None = None,
         spec: Spec = SPEC, withheld: bool = False, day_eps: float = 0.0) -> ReportMeta:
    return ReportMeta(device, spec.model, spec.model_version, labels or dict(LABELS[0]), ws, W,
                      seq, spec.hash, private_withheld=withheld, day_epsilon_spent=day_eps)


def ids_of(store: Store, *labels: dict[str, str]) -> list[int]:
    by = {canonical_labels(ls.labels): ls.id for ls in store.label_sets(SPEC.hash)}
    return [by[canonical_labels(lb)] for lb in labels]


def all_ids(store: Store) -> list[int]:
    return [ls.id for ls in store.label_sets(SPEC.hash)]


def events_in(store: Store, cover: list[tuple[int, int, int]],
              labels: tuple[dict[str, str], ...] = LABELS) -> int:
    ids = [i for lb in labels for i in ids_of(store, lb)] if labels else all_ids(store)
    return sum(s.event_count for s in store.merged_rollups(SPEC.hash, ids, cover).values())


# -- what the test sent, for the expected side ------------------------------------------------

@dataclass
class Sent:
    """The accepted reports, as the test made them."""

    windows: list[tuple[str, int, int, np.ndarray, np.ndarray, int]] = field(
        default_factory=list)   # (canonical labels, window start, events, x, latencies, errors)
    contributions: list[tuple[str, int, Contribution]] = field(default_factory=list)

    def events(self, canonicals: set[str], lo: int, hi: int) -> int:
        return sum(n for c, ws, n, *_ in self.windows if c in canonicals and lo <= ws < hi)

    def histogram(self, canonicals: set[str], lo: int, hi: int) -> np.ndarray:
        xs = [x for c, ws, _, x, *_ in self.windows if c in canonicals and lo <= ws < hi]
        x = np.concatenate(xs) if xs else np.zeros(0)
        # Bins (agent.binning): below the first edge, one per interval, above the last, and
        # missing (none here; the uniform draws never hit the last edge exactly).
        idx = np.searchsorted(np.asarray(EDGES), x, side="right")
        return np.bincount(idx, minlength=len(EDGES) + 2)

    def latencies(self, canonicals: set[str], lo: int, hi: int) -> np.ndarray:
        parts = [lat for c, ws, _, _, lat, _ in self.windows
                 if c in canonicals and lo <= ws < hi]
        return np.concatenate(parts) if parts else np.zeros(0)

    def devices(self, canonicals: set[str], lo: int, hi: int) -> int:
        return len({c.device_id for lb, ws, c in self.contributions
                    if lb in canonicals and lo <= ws < hi})

    def privacy(self, canonicals: set[str], lo: int, hi: int) -> PrivacyStats:
        per: dict[str, list[float]] = {}
        for lb, ws, c in self.contributions:
            if lb in canonicals and lo <= ws < hi:
                acc = per.setdefault(c.device_id, [0, 0, 0.0])
                acc[0] += c.reports
                acc[1] += c.withheld
                acc[2] = max(acc[2], c.max_day_epsilon)
        if not per:
            return PrivacyStats(0, 0, 0, 0, 0.0, 0.0)
        v = list(per.values())
        return PrivacyStats(len(v), sum(1 for a in v if a[1] > 0), int(sum(a[0] for a in v)),
                            int(sum(a[1] for a in v)), max(a[2] for a in v),
                            sum(a[2] for a in v) / len(v))


def fill(store: Store, seed: int = 3, devices: int = 10, span_s: int = 5 * HOUR_S,
         density: float = 0.08, forwarded: bool = True) -> Sent:
    """Sparse irregular reports over hours and a day boundary: devices move between label sets,
    some withhold, daily epsilons vary; with `forwarded`, a regional sender's reports each
    carry several devices' contributions."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    sent = Sent()
    seqs: dict[str, int] = {}
    for ws in range(T0, T0 + span_s, W):
        senders = [f"dev-{d:02d}" for d in range(devices) if rng.random() < density]
        if forwarded and rng.random() < 0.1:
            senders.append("region-a")
        for sender in senders:
            seqs[sender] = seqs.get(sender, 0) + 1
            labels = dict(rng.choice(LABELS))
            n = rng.randrange(1, 8)
            s, x, lat = make_summary(nrng, n, ws=ws)
            if sender == "region-a":
                contribs = [Contribution(f"fwd-{k:02d}", rng.randrange(1, 4), rng.randrange(2),
                                         round(rng.uniform(0, 3), 3))
                            for k in rng.sample(range(12), rng.randrange(1, 5))]
                m = meta(sender, seqs[sender], ws, labels)
                out = store.ingest(m, b"env", s, RES, contribs)
            else:
                m = meta(sender, seqs[sender], ws, labels, withheld=rng.random() < 0.1,
                         day_eps=round(rng.uniform(0, 3), 3))
                contribs = [Contribution.of(m)]
                out = store.ingest(m, b"env", s, RES)
            assert out is IngestOutcome.ACCEPTED
            canonical = canonical_labels(labels)
            sent.windows.append((canonical, ws, n, x, lat, s.error_count))
            sent.contributions += [(canonical, ws, c) for c in contribs]
    return sent


def random_ranges(rng: random.Random, n: int, span_s: int) -> list[tuple[int, int]]:
    out = [(T0, T0 + span_s), (T0 - DAY_S, T0 + 2 * DAY_S), (T0, T0 + W), (T0 + W, T0 + W)]
    for _ in range(n):
        grain = rng.choice((1, W, HOUR_S))
        lo = T0 - HOUR_S + rng.randrange(span_s + 2 * HOUR_S) // grain * grain
        length = rng.choice((rng.randrange(1, 2 * HOUR_S), rng.randrange(1, span_s)))
        out.append((lo, lo + max(grain, length // grain * grain)))
    return out


def assert_ranks_close(got: Any, values: np.ndarray) -> None:
    """The sketch's quantiles sit at the right ranks of the raw values."""
    assert got.n == values.size
    values = values.astype(np.float32)   # what the sketch holds
    # A rank is only defined to within one value of a small sample.
    tolerance = max(RANK_TOLERANCE, 1.0 / values.size)
    for q in (0.1, 0.5, 0.9, 0.95, 0.99):
        v = got.get_quantile(q)
        rank = np.count_nonzero(values <= v) / values.size
        assert abs(rank - q) <= tolerance, (q, rank, values.size)


# -- dedup and replay ---------------------------------------------------------------------------

def test_a_report_is_merged_once(store: Store) -> None:
    rng = np.random.default_rng(1)
    s, _, _ = make_summary(rng, 5)
    assert store.ingest(meta("d1", 1), b"e", s, RES) is IngestOutcome.ACCEPTED
    assert store.ingest(meta("d1", 1), b"e", s, RES) is IngestOutcome.DUPLICATE
    assert store.ingest(meta("d2", 1), b"e", s, RES) is IngestOutcome.ACCEPTED
    # The duplicate carries other labels and a later window: still the same report.
    assert store.ingest(meta("d2", 1, T0 + W, dict(LABELS[1])), b"e", s, RES) \
        is IngestOutcome.DUPLICATE
    assert events_in(store, [(W, T0 - DAY_S, T0 + DAY_S)], ()) == 10
    assert [ls.labels for ls in store.label_sets(SPEC.hash)] == [LABELS[0]]
    assert store.device_count(SPEC.hash, all_ids(store), T0, T0 + W) == 2


def test_other_bytes_under_a_stored_seq_are_not_a_duplicate(store: Store) -> None:
    """A resend is byte-identical; a different envelope under a stored (device, seq) is a new
    report under a used seq (a device that lost its spool): never merged, and told apart
    from a duplicate so that the device renumbers instead of letting its data go."""
    rng = np.random.default_rng(4)
    s, _, _ = make_summary(rng, 5)
    assert store.ingest(meta("d1", 1), b"first life", s, RES) is IngestOutcome.ACCEPTED
    assert store.ingest(meta("d1", 1), b"second life", s, RES) is IngestOutcome.SEQ_REUSED
    assert store.ingest(meta("d1", 1), b"first life", s, RES) is IngestOutcome.DUPLICATE
    assert store.ingest(meta("d1", 2), b"second life", s, RES) is IngestOutcome.ACCEPTED
    assert events_in(store, [(W, T0 - DAY_S, T0 + DAY_S)], ()) == 10


def test_replay_rule(make_store: Callable[..., Store]) -> None:
    store = make_store(reorder_window=100)
    store.put_spec(SPEC)
    rng = np.random.default_rng(2)
    s, _, _ = make_summary(rng, 1)

    def ingest(seq: int, device: str = "d1") -> IngestOutcome:
        return store.ingest(meta(device, seq), b"e", s, RES)

    assert ingest(1000) is IngestOutcome.ACCEPTED
    assert ingest(900) is IngestOutcome.ACCEPTED       # exactly at the window's edge
    assert ingest(899) is IngestOutcome.REPLAYED       # one below it
    assert ingest(899) is IngestOutcome.REPLAYED       # not stored, so still a replay
    assert ingest(1000) is IngestOutcome.DUPLICATE
    assert ingest(5000) is IngestOutcome.ACCEPTED
    assert ingest(4950) is IngestOutcome.ACCEPTED
    assert ingest(1000) is IngestOutcome.DUPLICATE     # stored: a duplicate, not a replay
    assert ingest(950) is IngestOutcome.REPLAYED
    assert ingest(1, device="d2") is IngestOutcome.ACCEPTED   # marks are per device
    assert store.high_water_mark("d1") == 5000  # type: ignore[attr-defined]
    assert store.high_water_mark("d2") == 1  # type: ignore[attr-defined]
    assert store.high_water_mark("nobody") is None  # type: ignore[attr-defined]
    assert events_in(store, [(W, T0, T0 + W)], ()) == 5   # only the accepted ones
    # The mark outlives the store: a new one on the same database refuses the replay too.
    again = make_store(reorder_window=100)
    assert again.ingest(meta("d1", 10), b"e", s, RES) is IngestOutcome.REPLAYED


# -- rollups ----------------------------------------------------------------------------------

def test_rollups_at_every_resolution_hold_their_windows(store: Store) -> None:
    sent = fill(store, seed=5)
    canon = {canonical_labels(lb) for lb in LABELS}
    ids = all_ids(store)
    for res in RES:
        first = T0 // res * res
        for bucket in range(first, T0 + 5 * HOUR_S, res):
            got = store.merged_rollups(SPEC.hash, ids, [(res, bucket, bucket + 1)])
            want = sent.events(canon, bucket, bucket + res)
            assert sum(s.event_count for s in got.values()) == want, (res, bucket)
            if want:
                hist = sum(s.features["x"] for s in got.values())
                np.testing.assert_array_equal(hist, sent.histogram(canon, bucket, bucket + res))


def test_merged_rollups_over_a_cover_equal_the_reports(store: Store) -> None:
    sent = fill(store, seed=6)
    for start, end in [(T0 - DAY_S, T0 + DAY_S), (T0 // HOUR_S * HOUR_S, T0 + 4 * HOUR_S),
                       (T0 + 3 * W, T0 + 3 * HOUR_S + 5 * W)]:
        cover = time_cover(start, end, RES)
        assert len({r for r, *_ in cover}) > 1 or end - start < HOUR_S
        for labels in (LABELS, LABELS[:1], (LABELS[0], LABELS[2])):
            canon = {canonical_labels(lb) for lb in labels}
            ids = ids_of(store, *labels)
            got = store.merged_rollups(SPEC.hash, ids, cover)
            assert set(got) <= set(ids)
            total = sum(s.event_count for s in got.values())
            assert total == sent.events(canon, start, end)
            per = {i: store.merged_rollups(SPEC.hash, [i], cover).get(i) for i in ids}
            assert {i: s.event_count for i, s in got.items()} == \
                {i: s.event_count for i, s in per.items() if s is not None}
            np.testing.assert_array_equal(sum(s.features["x"] for s in got.values()),
                                          sent.histogram(canon, start, end))
            assert sum(s.error_count for s in got.values()) == sum(
                e for c, ws, _, _, _, e in sent.windows if c in canon and start <= ws < end)
            parts = list(got.values())
            lat = parts[0].latency
            for s in parts[1:]:
                lat.merge(s.latency)
            assert_ranks_close(lat, sent.latencies(canon, start, end))
    assert store.merged_rollups(SPEC.hash, [], time_cover(T0, T0 + HOUR_S, RES)) == {}
    assert store.merged_rollups(SPEC.hash, all_ids(store),
                                [(W, T0 - 2 * DAY_S, T0 - DAY_S)]) == {}


# -- device counts and privacy by contribution ------------------------------------------------

def test_device_count_and_privacy_by_contribution_are_exact(store: Store) -> None:
    span = 5 * HOUR_S
    sent = fill(store, seed=8, span_s=span)
    assert any(c.device_id.startswith("fwd-") for _, _, c in sent.contributions)
    rng = random.Random(8)
    by = {canonical_labels(ls.labels): ls.id for ls in store.label_sets(SPEC.hash)}
    for start, end in random_ranges(rng, 60, span):
        chosen = rng.sample(sorted(by), rng.randrange(1, len(by) + 1))
        ids = [by[c] for c in chosen]
        got = store.device_count(SPEC.hash, ids, start, end)
        assert got == sent.devices(set(chosen), start, end), (chosen, start, end)
        stats, want = store.privacy_stats(SPEC.hash, ids, start, end), \
            sent.privacy(set(chosen), start, end)
        assert stats.mean_day_epsilon == pytest.approx(want.mean_day_epsilon, abs=1e-9)
        assert stats.max_day_epsilon == pytest.approx(want.max_day_epsilon, abs=1e-9)
        assert (stats.devices, stats.devices_withholding, stats.reports,
                stats.reports_withheld) == (want.devices, want.devices_withholding,
                                            want.reports, want.reports_withheld)
    # The sender of forwarded reports is not a device of theirs.
    ids = list(by.values())
    assert store.device_count(SPEC.hash, ids, T0 - DAY_S, T0 + DAY_S) == \
        sent.devices(set(by), T0 - DAY_S, T0 + DAY_S)
    assert store.device_count(SPEC.hash, [], T0, T0 + DAY_S) == 0
    assert store.device_count(SPEC.hash, ids, T0 + W, T0 + W) == 0


def test_device_count_edges(store: Store) -> None:
    """A device counted once however many windows, label sets and resolutions it spans; the
    range is half-open at window starts."""
    rng = np.random.default_rng(9)
    s, _, _ = make_summary(rng, 1)
    hour = (T0 // HOUR_S + 1) * HOUR_S
    for seq, ws in enumerate((hour - W, hour, hour + HOUR_S - W, hour + HOUR_S), 1):
        assert store.ingest(meta("d1", seq, ws, dict(LABELS[seq % 2])), b"e", s, RES) \
            is IngestOutcome.ACCEPTED
    ids = all_ids(store)
    assert store.device_count(SPEC.hash, ids, hour - W, hour + HOUR_S + W) == 1
    assert store.device_count(SPEC.hash, ids, hour, hour + HOUR_S) == 1
    assert store.device_count(SPEC.hash, ids, hour + W, hour + HOUR_S - W) == 0
    assert store.device_count(SPEC.hash, ids, hour - W, hour) == 1
    assert store.device_count(SPEC.hash, ids, hour + HOUR_S + W, hour + DAY_S) == 0
    p = store.privacy_stats(SPEC.hash, ids, hour - W, hour + HOUR_S + W)
    assert (p.devices, p.reports) == (1, 4)


# -- label sets, specs, ranges ----------------------------------------------------------------

def test_label_sets_specs_and_window_range(store: Store) -> None:
    rng = np.random.default_rng(10)
    assert store.put_spec(SPEC) is False          # already there
    assert store.put_spec(SPEC2) is True
    assert store.get_spec("m").hash == SPEC2.hash   # the latest registered
    assert store.get_spec("m", "1").hash == SPEC.hash
    assert store.get_spec("", spec_hash=SPEC2.hash).model_version == "2"
    assert store.get_spec("other") is None
    assert [s.hash for s in store.list_specs("m")] == [SPEC.hash, SPEC2.hash]
    assert store.window_range(SPEC.hash) is None
    s, _, _ = make_summary(rng, 2)
    s2, _, _ = make_summary(rng, 2, spec=SPEC2)
    store.ingest(meta("d1", 1, T0 + 5 * W, dict(LABELS[2])), b"e", s, RES)
    store.ingest(meta("d1", 2, T0, dict(LABELS[0])), b"e", s, RES)
    store.ingest(meta("d1", 3, T0 + 9 * W, {"region": "us", "os": "x"}, spec=SPEC2), b"e", s2,
                 RES)
    assert [ls.labels for ls in store.label_sets(SPEC.hash)] == [LABELS[2], LABELS[0]]
    assert [ls.labels for ls in store.label_sets(SPEC2.hash)] == [{"os": "x", "region": "us"}]
    assert len(store.model_label_sets("m")) == 3
    assert store.model_label_sets("other") == []
    assert store.label_keys() == {"hw", "region", "os"}
    assert store.window_range(SPEC.hash) == (T0, T0 + 5 * W)
    assert store.window_range(SPEC2.hash) == (T0 + 9 * W, T0 + 9 * W)


# -- several replicas -------------------------------------------------------------------------

def test_sender_activity(store: Store) -> None:
    rng = np.random.default_rng(11)
    s, _, _ = make_summary(rng, 1)
    before = int(time.time() * 1000)
    store.ingest(meta("d1", 1, T0 + 3 * W), b"e", s, RES)
    store.ingest(meta("d1", 2, T0 + W), b"e", s, RES)    # an older window, later: newest stays
    store.ingest(meta("d1", 2, T0 + 9 * W), b"e", s, RES)   # a duplicate: not activity
    store.ingest(meta("region-a", 1, T0 + 2 * W), b"e", s, RES,
                 [Contribution("x1"), Contribution("x2")])
    after = int(time.time() * 1000)
    got = store.sender_activity(SPEC.hash, before)
    assert set(got) == {"d1", "region-a"}
    assert got["d1"][0] == T0 + 3 * W and got["region-a"][0] == T0 + 2 * W
    assert all(before <= ms <= after for _, ms in got.values())
    assert store.sender_activity(SPEC.hash, after + 60_000) == {}
    assert store.sender_activity(SPEC2.hash, 0) == {}


def test_try_lead(make_store: Callable[..., Store], request: pytest.FixtureRequest) -> None:
    """The answer is an epoch: positive and unchanged while a hold lasts, 0 when another
    replica holds the lease (a new hold's epoch differs: test_postgres_store)."""
    a, b = make_store(), make_store()
    epoch = a.try_lead("alerts")
    assert isinstance(epoch, int) and epoch > 0
    assert a.try_lead("alerts") == epoch         # held: still ours, the same hold
    if isinstance(a, SqliteStore):
        assert b.try_lead("alerts") > 0          # one process per file: always leads
        return
    assert b.try_lead("alerts") == 0             # another replica holds it
    assert b.try_lead("other-role") > 0          # roles are independent
    assert a.try_lead("other-role") == 0
    a.close()                                    # the holder goes away ...
    deadline = time.monotonic() + 10
    while not (taken := b.try_lead("alerts")):   # ... and the lease is free within moments
        assert time.monotonic() < deadline, "the lease of a closed store was never released"
        time.sleep(0.05)
    assert taken > 0 and b.try_lead("alerts") == taken


# -- alerts -----------------------------------------------------------------------------------

def record(at: float, state: str, rule: str = "r1", model: str = "m", value: float = 1.5,
           previous: str = "inactive") -> AlertRecord:
    return AlertRecord(at_s=at, rule=rule, kind="threshold", model=model, model_version="1",
                       fingerprint=f"{rule}-fp", previous_state=previous, state=state,
                       cohort=(("hw", "pi"), ("region", "eu")), severity="page", value=value,
                       threshold=1.0, starts_at_s=at - 60, ends_at_s=None if state != "resolved"
                       else at, labels={"team": "ml"}, annotations={"summary": "slow"})


def test_alert_state_and_history(store: Store) -> None:
    assert store.load_alert_state("m", "1") is None
    store.save_alert_window("m", "1", 100.0, '{"a": 1}', [record(90, "pending")])
    store.save_alert_window("m", "1", 160.0, '{"a": 2}', [
        record(150, "firing", previous="pending"),
        record(155, "pending", rule="r2", value=math.nan)])
    store.save_alert_window("other", "1", 10.0, "{}", [record(5, "firing", model="other")])
    store.save_alert_window("m", "1", 220.0, '{"a": 3}', [])
    assert store.load_alert_state("m", "1") == (220.0, '{"a": 3}')
    assert store.load_alert_state("other", "1") == (10.0, "{}")
    history = store.alert_history()
    assert [(h.model, h.rule, h.state) for h in history] == [
        ("other", "r1", "firing"), ("m", "r2", "pending"), ("m", "r1", "firing"),
        ("m", "r1", "pending")]
    assert history[2] == record(150, "firing", previous="pending")
    assert math.isnan(history[1].value)
    assert [h.at_s for h in store.alert_history(model="m")] == [155, 150, 90]
    assert [h.at_s for h in store.alert_history(model="m", state="firing")] == [150]
    assert [h.at_s for h in store.alert_history(limit=2)] == [5, 155]
    assert store.alert_history(limit=0) == []


# -- the same reports through both stores -----------------------------------------------------

def test_both_stores_answer_the_same(tmp_path: Path, pg_dsn: str) -> None:
    from aggregator.store.postgres import PostgresStore

    lite, pg = SqliteStore(tmp_path / "a.sqlite"), PostgresStore(pg_dsn)
    try:
        sents = []
        for s in (lite, pg):
            s.put_spec(SPEC)
            sents.append(fill(s, seed=12, span_s=6 * HOUR_S))
        assert [w[:3] for w in sents[0].windows] == [w[:3] for w in sents[1].windows]
        by = [{canonical_labels(ls.labels): ls.id for ls in s.label_sets(SPEC.hash)}
              for s in (lite, pg)]
        assert sorted(by[0]) == sorted(by[1])
        assert lite.window_range(SPEC.hash) == pg.window_range(SPEC.hash)
        assert lite.label_keys() == pg.label_keys()
        rng = random.Random(12)
        for start, end in random_ranges(rng, 25, 6 * HOUR_S):
            start, end = start // W * W, -(-end // W) * W
            cover = time_cover(start, end, RES)
            for chosen in (sorted(by[0]), [sorted(by[0])[0]]):
                ids = [[b[c] for c in chosen] for b in by]
                assert lite.device_count(SPEC.hash, ids[0], start, end) == \
                    pg.device_count(SPEC.hash, ids[1], start, end)
                p0, p1 = (s.privacy_stats(SPEC.hash, i, start, end)
                          for s, i in zip((lite, pg), ids, strict=True))
                assert p0.mean_day_epsilon == pytest.approx(p1.mean_day_epsilon, abs=1e-9)
                assert p0.__dict__ | {"mean_day_epsilon": 0} == \
                    p1.__dict__ | {"mean_day_epsilon": 0}
                m0, m1 = (s.merged_rollups(SPEC.hash, i, cover)
                          for s, i in zip((lite, pg), ids, strict=True))
                names = {v: k for k, v in by[0].items()}, {v: k for k, v in by[1].items()}
                m0 = {names[0][k]: v for k, v in m0.items()}
                m1 = {names[1][k]: v for k, v in m1.items()}
                assert m0.keys() == m1.keys()
                for k in m0:
                    a, b = m0[k], m1[k]
                    assert (a.event_count, a.error_count, a.report_count) == \
                        (b.event_count, b.error_count, b.report_count)
                    np.testing.assert_array_equal(a.features["x"], b.features["x"])
                    assert_ranks_close(b.latency, sents[0].latencies({k}, start, end))
                    assert_ranks_close(a.latency, sents[0].latencies({k}, start, end))
    finally:
        lite.close()
        pg.close()


# -- retention ---------------------------------------------------------------------------------


def test_pruned_envelopes_still_deduplicate_and_keep_every_answer(store: Store) -> None:
    """prune_raw drops the bytes of old reports, nothing else: the rollups, device counts and
    privacy sums stay, a resend of a pruned report is still a duplicate (never merged twice),
    and reports outside the range keep their bytes (other bytes there are SEQ_REUSED)."""
    from aggregator.retention import RawRetention

    store.put_spec(SPEC)
    rng = np.random.default_rng(9)
    s, _, _ = make_summary(rng, 4)
    hours = [T0 // HOUR_S * HOUR_S + h * HOUR_S for h in range(3)]
    for i, ws in enumerate(hours):
        for d in range(3):
            assert store.ingest(meta(f"d{d}", i + 1, ws), f"env {d} {i}".encode(), s, RES) \
                is IngestOutcome.ACCEPTED
    cover = [(W, hours[0], hours[-1] + HOUR_S)]
    before = (events_in(store, cover, ()),
              store.device_count(SPEC.hash, all_ids(store), hours[0], hours[-1] + HOUR_S),
              store.privacy_stats(SPEC.hash, all_ids(store), hours[0], hours[-1] + HOUR_S))
    # The pruner, with its clock 1 h past the retention of the first hour's windows.
    clock = [hours[1] + 3600 * 24 + 1]
    pruner = RawRetention(store, 24 * 3600, clock=lambda: clock[0])
    assert pruner.run_once() == 3 and pruner.pruned == 3     # the first hour only
    assert pruner.run_once() == 0                             # nothing new is due
    assert (events_in(store, cover, ()),
            store.device_count(SPEC.hash, all_ids(store), hours[0], hours[-1] + HOUR_S),
            store.privacy_stats(SPEC.hash, all_ids(store), hours[0], hours[-1] + HOUR_S)) \
        == before
    # Pruned: a resend is a duplicate (its bytes cannot be compared any more).
    assert store.ingest(meta("d0", 1, hours[0]), b"env 0 0", s, RES) is IngestOutcome.DUPLICATE
    # Kept: byte-identical is a duplicate, other bytes a reused seq.
    assert store.ingest(meta("d0", 2, hours[1]), b"env 0 1", s, RES) is IngestOutcome.DUPLICATE
    assert store.ingest(meta("d0", 2, hours[1]), b"other", s, RES) is IngestOutcome.SEQ_REUSED
    assert events_in(store, cover, ()) == before[0]
    clock[0] += 2 * HOUR_S                                    # two more hours are due
    assert pruner.run_once() == 6
    assert store.prune_raw(SPEC.hash, hours[0], hours[-1] + HOUR_S) == 0   # all gone already


def test_pruning_goes_in_bounded_batches(store: Store) -> None:
    """A big backlog is pruned a batch at a time (each a short transaction), never more."""
    store.put_spec(SPEC)
    rng = np.random.default_rng(10)
    s, _, _ = make_summary(rng, 2)
    ws = T0 // HOUR_S * HOUR_S
    for seq in range(1, 8):
        store.ingest(meta("d1", seq, ws + (seq % 3) * W), f"e{seq}".encode(), s, RES)
    assert [store.prune_raw(SPEC.hash, ws, ws + HOUR_S, limit=3) for _ in range(4)] == \
        [3, 3, 1, 0]
    assert store.ingest(meta("d1", 5, ws + 2 * W), b"other", s, RES) is IngestOutcome.DUPLICATE
