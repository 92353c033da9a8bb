"""Device counts and privacy stats from `device_activity` (aggregator.store.sqlite): exact,
equal to a brute-force scan of the raw reports over any range, partial hours included, and
the same for a database filled before the table existed."""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator.store.base import DAY_S, HOUR_S, IngestOutcome, PrivacyStats
from aggregator.store.sqlite import SqliteStore

W = 900
SPEC = Spec(model="m", model_version="1", features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
            window_length_s=W, privacy=PrivacySpec(mechanism=NO_NOISE))
T0 = 1_700_006_400 - 3 * HOUR_S - 2 * W   # not on an hour or a day: ranges cross both
SPAN_S = 3 * DAY_S
LABELS = ({"region": "eu"}, {"region": "us"}, {"region": "eu", "hw": "pi"})


def one_summary() -> Summary:
    acc = WindowAccumulator(SPEC, 0)
    acc.observe_batch({"x": np.full(2, 0.5)}, None, np.full(2, 5.0), np.zeros(2, bool), 2)
    return acc.to_summary()


def fill(store: SqliteStore, rng: random.Random, devices: int = 16, density: float = 0.12
         ) -> None:
    """Sparse, irregular reports: devices come and go, some move between label sets, some
    withhold, daily epsilons vary."""
    summary = one_summary()
    store.put_spec(SPEC)
    for d in range(devices):
        seq = 0
        home = rng.randrange(len(LABELS))
        for ws in range(T0, T0 + SPAN_S, W):
            if rng.random() >= density:
                continue
            seq += 1
            labels = LABELS[home if rng.random() < 0.9 else rng.randrange(len(LABELS))]
            meta = ReportMeta(f"dev-{d:02d}", "m", "1", labels, ws, W, seq, SPEC.hash,
                              private_withheld=rng.random() < 0.1,
                              day_epsilon_spent=round(rng.uniform(0, 3), 3))
            assert store.ingest(meta, b"e", summary, (W,)) is IngestOutcome.ACCEPTED


def brute_count(db: sqlite3.Connection, ids: list[int], start: int, end: int) -> int:
    marks = ",".join("?" * len(ids))
    return db.execute(
        f"SELECT COUNT(DISTINCT device_id) FROM reports NOT INDEXED WHERE spec_hash = ? "
        f"AND window_start >= ? AND window_start < ? AND label_set IN ({marks})",
        (SPEC.hash, start, end, *ids)).fetchone()[0]


def brute_privacy(db: sqlite3.Connection, ids: list[int], start: int, end: int
                  ) -> PrivacyStats:
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"SELECT device_id, COUNT(*), SUM(withheld), MAX(day_epsilon) FROM reports NOT INDEXED "
        f"WHERE spec_hash = ? AND window_start >= ? AND window_start < ? "
        f"AND label_set IN ({marks}) GROUP BY device_id", (SPEC.hash, start, end, *ids)
    ).fetchall()
    if not rows:
        return PrivacyStats(0, 0, 0, 0, 0.0, 0.0)
    return PrivacyStats(len(rows), sum(1 for r in rows if r[2] > 0), sum(r[1] for r in rows),
                        sum(r[2] for r in rows), max(r[3] for r in rows),
                        sum(r[3] for r in rows) / len(rows))


def random_ranges(rng: random.Random, n: int) -> list[tuple[int, int]]:
    out = [(T0, T0 + SPAN_S), (T0 - DAY_S, T0 + 2 * SPAN_S)]
    for _ in range(n):
        # Aligned to windows, hours or days, or to nothing (any second): every kind of edge.
        grain = rng.choice((1, W, HOUR_S, DAY_S))
        lo = T0 - HOUR_S + rng.randrange(SPAN_S + 2 * HOUR_S) // grain * grain
        length = rng.choice((rng.randrange(1, 2 * HOUR_S), rng.randrange(1, SPAN_S)))
        out.append((lo, lo + max(grain, length // grain * grain)))
    return out


def check_against_brute_force(store: SqliteStore, db_path: Path, rng: random.Random,
                              n: int) -> None:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        all_ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        assert len(all_ids) == len(LABELS)
        for start, end in random_ranges(rng, n):
            ids = rng.sample(all_ids, rng.randrange(1, len(all_ids) + 1))
            got = store.device_count(SPEC.hash, ids, start, end)
            assert got == brute_count(db, ids, start, end), (ids, start, end)
            stats, want = store.privacy_stats(SPEC.hash, ids, start, end), \
                brute_privacy(db, ids, start, end)
            assert stats.mean_day_epsilon == pytest.approx(want.mean_day_epsilon)
            assert stats == PrivacyStats(**{**want.__dict__,
                                            "mean_day_epsilon": stats.mean_day_epsilon})


def test_counts_and_privacy_equal_a_scan_of_the_reports_over_random_ranges(
        tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite"
    rng = random.Random(7)
    store = SqliteStore(db)
    try:
        fill(store, rng)
        check_against_brute_force(store, db, rng, 300)
        assert store.device_count(SPEC.hash, [], T0, T0 + DAY_S) == 0
        assert store.device_count(SPEC.hash, [1], T0 + DAY_S, T0) == 0
    finally:
        store.close()


def test_a_database_from_before_device_activity_is_filled_once_at_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "a.sqlite"
    rng = random.Random(11)
    store = SqliteStore(db)
    fill(store, rng, devices=10)
    store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        before = conn.execute("SELECT * FROM device_activity ORDER BY 1, 2, 3, 4, 5").fetchall()
        conn.execute("DROP TABLE device_activity")   # as an earlier build left the file
        conn.execute("DROP INDEX reports_by_device")
        conn.commit()
    with caplog.at_level(logging.INFO, logger="aggregator.store.sqlite"):
        store = SqliteStore(db)
    try:
        assert [r for r in caplog.records if "filled from the stored reports" in r.message]
        with contextlib.closing(sqlite3.connect(db)) as conn:
            after = conn.execute("SELECT * FROM device_activity ORDER BY 1, 2, 3, 4, 5"
                                 ).fetchall()
        assert after == before   # the backfill writes what ingest wrote
        check_against_brute_force(store, db, rng, 60)
        caplog.clear()
    finally:
        store.close()
    with caplog.at_level(logging.INFO, logger="aggregator.store.sqlite"):
        SqliteStore(db).close()
    assert not [r for r in caplog.records if "filled" in r.message]   # once only


def test_a_fully_reporting_fleet_counts_every_device_over_unaligned_ranges(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite")
    summary = one_summary()
    try:
        for d in range(5):
            for i, ws in enumerate(range(T0, T0 + 27 * HOUR_S, W)):
                meta = ReportMeta(f"dev-{d}", "m", "1", LABELS[0], ws, W, i + 1, SPEC.hash)
                store.ingest(meta, b"e", summary, (W,))
        ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        for start in (T0, T0 + 7 * W, T0 + 2 * HOUR_S + 1):
            for length in (W, HOUR_S + W, DAY_S):
                assert store.device_count(SPEC.hash, ids, start, start + length) == 5
        assert store.privacy_stats(SPEC.hash, ids, T0 + W, T0 + W + DAY_S).reports \
            == 5 * DAY_S // W
    finally:
        store.close()


def test_a_remembered_count_is_forgotten_at_the_next_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite")
    summary = one_summary()
    try:
        store.ingest(ReportMeta("a", "m", "1", LABELS[0], T0, W, 1, SPEC.hash), b"e", summary,
                     (W,))
        ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        assert store.device_count(SPEC.hash, ids, T0, T0 + DAY_S) == 1
        assert store.device_count(SPEC.hash, ids, T0, T0 + DAY_S) == 1
        store.ingest(ReportMeta("b", "m", "1", LABELS[0], T0 + W, W, 1, SPEC.hash), b"e",
                     summary, (W,))
        assert store.device_count(SPEC.hash, ids, T0, T0 + DAY_S) == 2
    finally:
        store.close()
