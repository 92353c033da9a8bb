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
