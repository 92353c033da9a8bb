"""Device counts kept across commits (SqliteStore._bucket_devices): interleaved with ingest,
late reports into closed buckets, and writes by another connection to the same file, every
count equals the one computed from the raw reports sent (an independent set computation)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator.store import sqlite as sqlite_store
from aggregator.store.base import HOUR_S, IngestOutcome, canonical_labels, rollup_resolutions
from aggregator.store.sqlite import SqliteStore

W = 60
SPEC = Spec(model="m", model_version="1", features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
            window_length_s=W, privacy=PrivacySpec(mechanism=NO_NOISE))
T0 = 1_700_000_000 // 86400 * 86400
RES = rollup_resolutions(W)
LABELS = [{"region": "eu"}, {"region": "us"}, {"region": "apac"}]


def summary() -> Summary:
    acc = WindowAccumulator(SPEC, T0)
    acc.observe_batch({"x": np.full(2, 0.5)}, None, np.full(2, 5.0), np.zeros(2, bool), 2)
    return acc.to_summary()


class Sent:
    """What was accepted: (device, canonical labels, window start)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int]] = []
        self.seq: dict[str, int] = {}

    def send(self, store: SqliteStore, device: str, labels: dict[str, str], ws: int) -> None:
        self.seq[device] = self.seq.get(device, 0) + 1
        m = ReportMeta(device, "m", "1", labels, ws, W, self.seq[device], SPEC.hash)
        assert store.ingest(m, f"{device}/{self.seq[device]}".encode(), summary(), RES) \
            is IngestOutcome.ACCEPTED
        self.rows.append((device, canonical_labels(labels), ws))

    def devices(self, labels: set[str], start: int, end: int) -> int:
        return len({d for d, c, ws in self.rows if c in labels and start <= ws < end})


def ids_of(store: SqliteStore, chosen: list[str]) -> list[int]:
    by = {canonical_labels(ls.labels): ls.id for ls in store.label_sets(SPEC.hash)}
    return [by[c] for c in chosen if c in by]


def test_counts_stay_exact_while_reports_arrive_late_and_from_another_writer(
        tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite"
    store, other = SqliteStore(db), SqliteStore(db)  # `other`: a second writer, same file
    store.put_spec(SPEC)
    rng = random.Random(5)
    sent = Sent()
    span = 30 * HOUR_S
    # Ranges that cover whole days, whole hours and partial-hour edges.
    ranges = [(T0, T0 + span), (T0 + 1234, T0 + span - 777), (T0 + HOUR_S, T0 + 5 * HOUR_S),
              (T0 + 90, T0 + 150), (T0 + 23 * HOUR_S + 59, T0 + 26 * HOUR_S + 1)]
    try:
        for step in range(240):
            writer = other if step % 7 == 0 else store
            device = f"d{rng.randrange(40)}"
            # Mostly recent windows, sometimes a late one into an old, closed bucket.
            ws = T0 + (rng.randrange(span // W) if rng.random() < 0.3
                       else min(span // W - 1, step * 4 + rng.randrange(8))) * W
            sent.send(writer, device, rng.choice(LABELS), ws)
            if step % 5 == 0:
                for start, end in ranges:
                    for chosen in ([canonical_labels(x) for x in LABELS],
                                   [canonical_labels(LABELS[step % 3])]):
                        ids = ids_of(store, chosen)
                        if ids:
                            assert store.device_count(SPEC.hash, ids, start, end) == \
                                sent.devices(set(chosen), start, end), (step, start, end)
        # A commit that adds no device row (an alert state) keeps every count as it is.
        store.save_alert_window("m", "1", 1.0, "{}", [])
        all_ids = ids_of(store, [canonical_labels(x) for x in LABELS])
        for start, end in ranges:
            assert store.device_count(SPEC.hash, all_ids, start, end) == \
                sent.devices({canonical_labels(x) for x in LABELS}, start, end)
        assert len(store._device_sets) > 0  # the sets were kept and reused
    finally:
        other.close()
        store.close()


def test_ranges_too_large_to_keep_are_counted_in_sql(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store, "DEVICE_SET_MAX_ROWS", 3)
    store = SqliteStore(tmp_path / "a.sqlite")
    store.put_spec(SPEC)
    sent = Sent()
    try:
        for i in range(12):
            sent.send(store, f"d{i}", LABELS[0], T0 + i * 600)
        ids = ids_of(store, [canonical_labels(LABELS[0])])
        for start, end in [(T0, T0 + 2 * HOUR_S), (T0 + 100, T0 + HOUR_S + 100)]:
            assert store.device_count(SPEC.hash, ids, start, end) == \
                sent.devices({canonical_labels(LABELS[0])}, start, end)
        assert len(store._device_sets) == 0 or all(
            len(v[1]) <= 3 for v in store._device_sets._data.values())
    finally:
        store.close()
