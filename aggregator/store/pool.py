"""A small bounded pool of reader connections, shared by the stores' query threads.

A connection per thread would leak one per short-lived thread (the HTTP server runs a thread
per client connection): a PostgreSQL session or a SQLite file handle each, until the store
closes. The pool opens connections lazily up to ``size``; a caller waits while all are
borrowed; a connection found unusable is closed and replaced; `close` closes them all (one
still borrowed when its holder gives it back).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["READERS", "PoolClosed", "ReaderPool"]

logger = logging.getLogger(__name__)

# The default bound: the server passes its gRPC workers + a few (HTTP, alerting, forwarding).
READERS = 8

C = TypeVar("C")


class PoolClosed(RuntimeError):
    """The store was closed: no more reads."""


class ReaderPool(Generic[C]):
    """``connect`` opens a connection, ``usable`` tells whether one can still serve a query
    (not closed, not broken), ``close_conn`` closes one. ``name`` appears in messages."""

    def __init__(self, connect: Callable[[], C], size: int, *, usable: Callable[[C], bool],
                 close_conn: Callable[[C], None], name: str) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"reader pool size: must be a positive integer, got {size!r}")
        self.size = size
        self.name = name
        self._connect = connect
        self._usable = usable
        self._close_conn = close_conn
        self._cond = threading.Condition()
        self._idle: list[C] = []      # LIFO: the most recently used first
        self._open = 0                # idle + borrowed + being opened
        self._closed = False
        self._held = threading.local()   # this thread's borrowed connection, for nesting
        self.opened = 0               # connections opened in all (for tests and operators)
        self.discarded = 0            # connections closed because they were unusable

    @property
    def open_connections(self) -> int:
        with self._cond:
            return self._open

    @contextlib.contextmanager
    def borrow(self) -> Iterator[C]:
        """A connection for one read (or a few in a row); given back on exit. A thread that
        already holds one gets the same one again: nesting never waits on a full pool."""
        held = getattr(self._held, "conn", None)
        if held is not None:
            yield held
            return
        conn = self._acquire()
        self._held.conn = conn
        try:
            yield conn
        finally:
            self._held.conn = None
            self._release(conn)

    def drop_idle(self) -> int:
        """Close the idle connections (reopened when needed): one broke, so the others
        probably did too (a server restart), and a retry must not pick another dead one."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self.discarded += len(idle)
            self._cond.notify_all()
        for conn in idle:
            self._quiet_close(conn)
        return len(idle)

    def _acquire(self) -> C:
        stale: list[C] = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise PoolClosed(f"{self.name}: the store is closed")
                    while self._idle:
                        conn = self._idle.pop()
                        if self._usable(conn):
                            return conn
                        self._open -= 1       # broke while idle (a server restart, say)
                        self.discarded += 1
                        stale.append(conn)
                    if self._open < self.size:
                        self._open += 1       # reserved: opened below, outside the lock
                        break
                    self._cond.wait()
        finally:
            for conn in stale:
                self._quiet_close(conn)
        try:
            conn = self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        with self._cond:
            self.opened += 1
        return conn

    def _release(self, conn: C) -> None:
        with self._cond:
            keep = not self._closed and self._usable(conn)
            if keep:
                self._idle.append(conn)
            else:
                self._open -= 1
                if not self._closed:
                    self.discarded += 1
            self._cond.notify()
        if not keep:
            self._quiet_close(conn)

    def _quiet_close(self, conn: C) -> None:
        try:
            self._close_conn(conn)
        except Exception as e:   # closing a broken connection may fail: it is gone anyway
            logger.debug("%s: closing a reader connection: %s", self.name, e)

    def close(self) -> None:
        """Close the idle connections now, each borrowed one when it is given back; wake the
        waiting callers (they raise `PoolClosed`). Idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            self._quiet_close(conn)
