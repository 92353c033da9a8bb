"""One SQLite write transaction, as the spools and the SQLite store take it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """A cursor in a ``BEGIN IMMEDIATE`` transaction (the write lock taken up front, so it
    cannot fail part-way on a busy upgrade), committed when the block ends, rolled back when
    anything escapes it. ``db`` must be in autocommit (``isolation_level=None``)."""
    cur = db.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        yield cur
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
