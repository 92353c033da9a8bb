"""Replay protection in aggregator.store.sqlite: the per-device high-water mark of seq."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator.store.base import IngestOutcome
from aggregator.store.sqlite import SqliteStore

W = 60
SPEC = Spec(model="m", model_version="1", features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
            window_length_s=W, privacy=PrivacySpec(mechanism=NO_NOISE))


def ingest(store: SqliteStore, seq: int, device: str = "d1") -> IngestOutcome:
    ws = (int(time.time()) // W - 10) * W
    acc = WindowAccumulator(SPEC, ws)
    acc.observe_batch({"x": np.full(3, 0.5)}, None, np.full(3, 5.0), np.zeros(3, bool), 3)
    meta = ReportMeta(device, "m", "1", {"r": "eu"}, ws, W, seq, SPEC.hash)
    return store.ingest(meta, b"envelope", acc.to_summary(), (W,))


def test_high_water_mark_window_and_duplicates(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite", reorder_window=100)
    try:
        assert ingest(store, 500) is IngestOutcome.ACCEPTED
        assert ingest(store, 500) is IngestOutcome.DUPLICATE      # stored: a duplicate
        assert ingest(store, 400) is IngestOutcome.ACCEPTED       # exactly at the window edge
        assert ingest(store, 399) is IngestOutcome.REPLAYED       # below it, never stored
        assert ingest(store, 400) is IngestOutcome.DUPLICATE      # stored ones stay duplicates
        assert ingest(store, 399, device="d2") is IngestOutcome.ACCEPTED  # marks are per device
        assert ingest(store, 700) is IngestOutcome.ACCEPTED
        assert ingest(store, 550) is IngestOutcome.REPLAYED
        assert store.high_water_mark("d1") == 700 and store.high_water_mark("nobody") is None
    finally:
        store.close()


def test_a_database_from_before_the_devices_table_takes_its_mark_from_reports(
        tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite"
    store = SqliteStore(db, reorder_window=100)
    assert ingest(store, 1000) is IngestOutcome.ACCEPTED
    store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TABLE devices")  # as an earlier build left it
        conn.commit()
    store = SqliteStore(db, reorder_window=100)
    try:
        assert store.high_water_mark("d1") == 1000
        assert ingest(store, 10) is IngestOutcome.REPLAYED
        assert ingest(store, 1001) is IngestOutcome.ACCEPTED
        assert store.high_water_mark("d1") == 1001
    finally:
        store.close()


def test_reorder_window_must_be_a_non_negative_integer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reorder_window"):
        SqliteStore(tmp_path / "a.sqlite", reorder_window=-1)
