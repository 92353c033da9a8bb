"""Device counts and privacy stats by contribution (aggregator.store.sqlite): a report forwarded
by a regional aggregator counts each of its devices, never its sender, at whole hours and days
(`device_activity`) and at the cut edges of a range (`window_contributions`) alike; a database
from before `window_contributions` gets it filled from its reports once, at open."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import pytest

from agent.wire import ReportMeta
from aggregator.store.base import DAY_S, HOUR_S, Contribution, IngestOutcome, PrivacyStats
from aggregator.store.sqlite import SqliteStore
from tests.aggregator.test_store_activity import SPEC, W, one_summary

T0 = 1_700_006_400   # a day boundary
LABELS = {"region": "eu"}


def ranges() -> list[tuple[int, int]]:
    # A cut range (edges only), one spanning whole hours with edges, a whole day.
    return [(T0 + W, T0 + 3 * W), (T0 + W, T0 + 2 * HOUR_S + W), (T0, T0 + DAY_S)]


def test_a_forwarded_report_counts_its_devices_not_its_sender(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite")
    try:
        store.put_spec(SPEC)
        merged = one_summary().merge(one_summary()).merge(one_summary())
        merged.withheld_report_count = 1
        fwd = ReportMeta("region-x", "m", "1", LABELS, T0 + W, W, 1, SPEC.hash)
        contributions = [Contribution("dev-1", 2, 1, 1.25), Contribution("dev-2", 1, 0, 0.5)]
        assert store.ingest(fwd, b"e", merged, (W,), contributions) is IngestOutcome.ACCEPTED
        # The same forwarded report again: a duplicate, nothing counted twice.
        assert store.ingest(fwd, b"e", merged, (W,), contributions) is IngestOutcome.DUPLICATE
        # dev-1 also reported directly in a later window (it moved to this aggregator).
        own = ReportMeta("dev-1", "m", "1", LABELS, T0 + 2 * W, W, 1, SPEC.hash,
                         day_epsilon_spent=2.0)
        assert store.ingest(own, b"e", one_summary(), (W,)) is IngestOutcome.ACCEPTED
        ids = [ls.id for ls in store.label_sets(SPEC.hash)]
        for lo, hi in ranges():
            assert store.device_count(SPEC.hash, ids, lo, hi) == 2, (lo, hi)
            assert store.privacy_stats(SPEC.hash, ids, lo, hi) == PrivacyStats(
                devices=2, devices_withholding=1, reports=4, reports_withheld=1,
                max_day_epsilon=2.0, mean_day_epsilon=1.25), (lo, hi)
        # Only the forwarded window: dev-1's spend there is its contribution's.
        assert store.privacy_stats(SPEC.hash, ids, T0 + W, T0 + 2 * W) == PrivacyStats(
            2, 1, 3, 1, 1.25, 0.875)
        assert store.device_count(SPEC.hash, ids, T0 + W, T0 + 2 * W) == 2   # not 1 sender
        assert store.device_count(SPEC.hash, ids, T0 + 2 * W, T0 + 3 * W) == 1
        assert store.device_count(SPEC.hash, ids, T0 + 3 * W, T0 + DAY_S) == 0
    finally:
        store.close()


def test_a_database_from_before_window_contributions_is_filled_once_at_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "a.sqlite"
    store = SqliteStore(db)
    store.put_spec(SPEC)
    for d in range(4):
        for i in range(6):
            meta = ReportMeta(f"dev-{d}", "m", "1", LABELS, T0 + (d + i) * W, W, i + 1,
                              SPEC.hash, private_withheld=i == 2, day_epsilon_spent=0.1 * i)
            store.ingest(meta, b"e", one_summary(), (W,))
    ids = [ls.id for ls in store.label_sets(SPEC.hash)]
    before = [(store.device_count(SPEC.hash, ids, lo, hi),
               store.privacy_stats(SPEC.hash, ids, lo, hi)) for lo, hi in ranges()]
    store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT * FROM window_contributions ORDER BY 1, 2").fetchall()
        conn.execute("DROP TABLE window_contributions")   # as an earlier build left the file
        conn.commit()
    with caplog.at_level(logging.INFO, logger="aggregator.store.sqlite"):
        store = SqliteStore(db)
    try:
        assert [r for r in caplog.records if "window_contributions filled" in r.message]
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT * FROM window_contributions ORDER BY 1, 2"
                                ).fetchall() == rows
        after = [(store.device_count(SPEC.hash, ids, lo, hi),
                  store.privacy_stats(SPEC.hash, ids, lo, hi)) for lo, hi in ranges()]
        assert after == before and before[0][0] > 0
    finally:
        store.close()
