"""`agent.sqlite_tx.immediate`: one write transaction, all of it or none."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.sqlite_tx import immediate


def _db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    return db


def test_the_block_commits_when_it_ends(tmp_path: Path) -> None:
    db = _db(tmp_path / "a.sqlite")
    with immediate(db) as cur:
        cur.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
        assert db.in_transaction
    assert not db.in_transaction
    other = sqlite3.connect(tmp_path / "a.sqlite")   # another connection sees the commit
    assert other.execute("SELECT k FROM t ORDER BY k").fetchall() == [(1,), (2,)]


def test_an_early_return_commits_too(tmp_path: Path) -> None:
    db = _db(tmp_path / "a.sqlite")

    def write() -> int:
        with immediate(db) as cur:
            cur.execute("INSERT INTO t VALUES (7)")
            return 7
        raise AssertionError("unreachable")

    assert write() == 7 and not db.in_transaction
    assert db.execute("SELECT k FROM t").fetchall() == [(7,)]


def test_anything_escaping_the_block_rolls_all_of_it_back(tmp_path: Path) -> None:
    db = _db(tmp_path / "a.sqlite")
    with pytest.raises(sqlite3.IntegrityError), immediate(db) as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        cur.execute("INSERT INTO t VALUES (1)")   # a duplicate key: the block fails
    with pytest.raises(KeyboardInterrupt), immediate(db) as cur:
        cur.execute("INSERT INTO t VALUES (2)")
        raise KeyboardInterrupt   # not an Exception: rolled back all the same
    assert not db.in_transaction
    assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


def test_the_write_lock_is_taken_at_begin(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: a second writer cannot start while the block runs."""
    db = _db(tmp_path / "a.sqlite")
    other = sqlite3.connect(tmp_path / "a.sqlite", isolation_level=None, timeout=0)
    with immediate(db):
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")   # free again once the block ended
    other.execute("COMMIT")
