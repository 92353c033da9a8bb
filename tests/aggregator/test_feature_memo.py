"""Feature health remembered by its inputs (aggregator.query._feature_health_memo): a repeated
health query answers what a fresh computation answers, and new data that changes a cohort's
histograms changes its drift at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.window import WindowAccumulator
from agent.wire import ReportMeta
from aggregator import query
from aggregator.baseline import build_spec_from_columns
from aggregator.query import cohort_health
from aggregator.significance import SignificanceCache
from aggregator.store.base import IngestOutcome, rollup_resolutions
from aggregator.store.sqlite import SqliteStore

T0 = 1_700_000_000 // 3600 * 3600


def test_memoized_health_equals_a_fresh_computation_and_follows_new_data(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    spec = build_spec_from_columns({"a": rng.normal(0, 1, 5000), "b": rng.exponential(1, 5000)},
                                   model="m", model_version="1")
    store = SqliteStore(tmp_path / "a.sqlite")
    store.put_spec(spec)
    res = rollup_resolutions(spec.window_length_s)
    seq = 0

    def send(device: str, shift: float, n: int = 400) -> None:
        nonlocal seq
        seq += 1
        ws = T0 + seq * spec.window_length_s
        acc = WindowAccumulator(spec, ws)
        acc.observe_batch({"a": rng.normal(shift, 1, n), "b": rng.exponential(1, n)}, None,
                          np.full(n, 5.0), np.zeros(n, bool), n)
        meta = ReportMeta(device, "m", "1", {"region": "eu"}, ws, spec.window_length_s, seq,
                          spec.hash)
        assert store.ingest(meta, f"{device}/{seq}".encode(), acc.to_summary(), res) \
            is IngestOutcome.ACCEPTED

    cache = SignificanceCache(samples=100)

    def health(significance: SignificanceCache) -> query.CohortHealth:
        (h,) = cohort_health(store, "m", "1", start=T0, end=T0 + 3600, now=T0 + 3600,
                             significance=significance)
        return h

    try:
        for d in range(5):
            send(f"d{d}", 0.0)
        first = health(cache)
        assert len(query._FEATURE_MEMO[cache]) == 2      # a and b, remembered
        assert health(cache) == first                    # from the memo...
        assert health(SignificanceCache(samples=100)) == first  # ...as a fresh computation
        assert not first.features[0].drifting
        for d in range(5):
            send(f"d{d}", 3.0)                           # feature a moves far
        moved = health(cache)
        assert moved.features[0].scores.psi > first.features[0].scores.psi + 0.5
        assert moved.features[0].drifting
        assert moved == health(SignificanceCache(samples=100))
    finally:
        store.close()
