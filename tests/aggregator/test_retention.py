"""`fleetwatch serve --retain-raw`: the option's parsing and the pruner inside a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from aggregator.cli import UsageError, _retain_raw, main
from aggregator.retention import RawRetention
from aggregator.server import AggregatorConfig, serve
from aggregator.store.sqlite import SqliteStore


def test_the_option_takes_a_duration_or_forever() -> None:
    assert _retain_raw("7d") == 7 * 86400
    assert _retain_raw("36h") == 36 * 3600
    assert _retain_raw("forever") is None
    for bad in ("0s", "soon", ""):
        with pytest.raises(UsageError):
            _retain_raw(bad)


def test_serve_refuses_a_bad_retention(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    code = main(["serve", "--db", str(tmp_path / "a.sqlite"), "--listen", "127.0.0.1:0",
                 "--retain-raw", "0s"])
    assert code == 2 and "--retain-raw" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="retain_raw_s"):
        AggregatorConfig(db=tmp_path / "a.sqlite", listen="127.0.0.1:0", retain_raw_s=-1)


def test_a_server_with_retention_runs_its_pruner(tmp_path: Path) -> None:
    with serve(AggregatorConfig(db=tmp_path / "a.sqlite", listen="127.0.0.1:0",
                                retain_raw_s=3600.0)) as agg:
        assert agg.retention is not None and agg.retention.retain_s == 3600.0
        assert agg.retention._thread is not None and agg.retention._thread.is_alive()
        thread = agg.retention._thread
    assert not thread.is_alive()  # stopped with the server
    with serve(AggregatorConfig(db=tmp_path / "b.sqlite", listen="127.0.0.1:0")) as agg:
        assert agg.retention is None  # the library default keeps everything


def test_a_store_without_reports_is_left_alone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.sqlite")
    try:
        assert RawRetention(store, 60.0).run_once() == 0
        with pytest.raises(ValueError):
            RawRetention(store, 0)
    finally:
        store.close()


def test_the_pruner_takes_a_backlog_in_batches(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import aggregator.retention as retention
    from agent.spec import NUMERIC, FeatureSpec, Spec
    from agent.window import WindowAccumulator
    from agent.wire import ReportMeta
    from aggregator.store.base import rollup_resolutions

    monkeypatch.setattr(retention, "BATCH", 2)
    spec = Spec("m", "1", (FeatureSpec("x", NUMERIC, edges=(0.0, 1.0),
                                       reference_counts=(1, 1, 1, 1)),), reference_rows=4)
    store = SqliteStore(tmp_path / "a.sqlite")
    calls: list[int] = []
    real = store.prune_raw

    def counting(*args: object) -> int:
        n = real(*args)  # type: ignore[arg-type]
        calls.append(n)
        return n

    try:
        store.put_spec(spec)
        ws = 1_700_000_000 // 3600 * 3600
        acc = WindowAccumulator(spec, ws)
        acc.observe_batch({"x": np.array([0.5])}, None, np.array([1.0]), np.zeros(1, bool), 1)
        for seq in range(1, 6):
            meta = ReportMeta(f"d{seq}", "m", "1", {}, ws, 60, seq, spec.hash)
            store.ingest(meta, b"raw", acc.to_summary(), rollup_resolutions(60))
        store.prune_raw = counting  # type: ignore[method-assign]
        pruner = RawRetention(store, 60.0, clock=lambda: ws + 7200.0)
        assert pruner.run_once() == 5
        assert calls == [2, 2, 1]   # three short transactions, not one long one
    finally:
        store.close()
