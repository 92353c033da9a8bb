"""Spool.renumber_above: a lost spool's device continues above the aggregator's mark."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.spool import Spool


def _fill(spool: Spool, n: int) -> list[int]:
    return [spool.enqueue(100 + i, lambda seq, _d: f"report {seq}".encode()) for i in range(n)]


def test_pending_reports_are_renumbered_in_order_and_rebuilt(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    assert _fill(spool, 3) == [1, 2, 3]
    n = spool.renumber_above(500, lambda payload, seq: payload + f" -> {seq}".encode())
    assert n == 3
    items = spool.pending()
    assert [i.seq for i in items] == [501, 502, 503]
    assert [i.payload for i in items] == [b"report 1 -> 501", b"report 2 -> 502",
                                          b"report 3 -> 503"]
    assert [i.window_start for i in items] == [100, 101, 102]
    assert spool.enqueue(200, lambda seq, _d: b"next") == 504   # continues after them
    spool.close()


def test_renumbering_never_goes_backwards_and_survives_a_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    _fill(spool, 2)
    spool.ack(1)
    # A mark below what the spool already handed out: the numbers still only grow.
    assert spool.renumber_above(0, lambda p, s: p) == 1
    assert [i.seq for i in spool.pending()] == [3]
    spool.close()
    reopened = Spool(tmp_path / "s.sqlite")
    assert [i.seq for i in reopened.pending()] == [3]
    assert reopened.enqueue(300, lambda seq, _d: b"x") == 4
    reopened.close()


def test_a_failing_rebuild_leaves_the_old_numbers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    _fill(spool, 3)

    def rebuild(payload: bytes, seq: int) -> bytes:
        if seq == 102:
            raise RuntimeError("signing key unreadable")
        return payload

    with pytest.raises(RuntimeError):
        spool.renumber_above(100, rebuild)
    assert [i.seq for i in spool.pending()] == [1, 2, 3]   # one transaction: all or nothing
    assert spool.enqueue(1, lambda seq, _d: b"y") == 4
    spool.close()
