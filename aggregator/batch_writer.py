"""Batches from an asyncio event loop, processed by one thread of their own.

The asyncio gRPC server (`aggregator.rpc_server`) handles every Report call on its event loop:
the loop parses the envelope and checks its signature, then hands the report here and awaits
its future. One writer thread takes everything queued (at most ``max_batch``), processes it in
one call (`Ingestor._process`: check each, one store transaction) and resolves the futures on
their loop. While it commits, the loop goes on taking calls, which form the next batch.

Why a thread and not the loop: the batch's commit waits for the disk (fsync) and its SQLite
calls release the GIL; on the loop that time would stall every call. Why one thread: with a
writer of its own there are two Python threads doing the work (the loop and the writer), not
a pool of RPC threads taking the GIL from each other (docs/performance.md, "ingest").
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["BatchWriter", "WriterClosed"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class WriterClosed(RuntimeError):
    """The writer was closed before the item was processed (the server is stopping)."""


class BatchWriter(Generic[T, R]):
    """``process(items)`` returns one entry per item, in order: its result, or the exception
    for that item's caller; when it raises, every item of the batch gets that exception.

    `submit` is called on an event loop; the thread starts with the first item."""

    def __init__(self, process: Callable[[list[T]], Sequence[R | BaseException]],
                 max_batch: int = 256, name: str = "fleetwatch-ingest", *,
                 on_abandoned: Callable[[list[T]], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self._process = process
        self._on_abandoned = on_abandoned
        self.max_batch = max_batch
        self._name = name
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # calls of `process` so far (tests, docs)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future (of the running loop) gets its result or exception."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._closed:
                raise WriterClosed("the ingest writer is closed (the server is stopping)")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.append((item, future))
            self._cond.notify()
        return future

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Process what is queued, then stop the thread (new items are refused)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("ingest writer did not finish its batch within %ss", timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed, and nothing left
                taken = [self._queue.popleft()
                         for _ in range(min(self.max_batch, len(self._queue)))]
            # A call cancelled while it waited (its deadline passed, or its client gave up):
            # not processed, as a threaded server never runs a call that expired in its
            # queue; the device's retry carries the report. (Reading the state from this
            # thread can be stale: then the report is stored, and the retry is a duplicate.)
            batch = [entry for entry in taken if not entry[1].cancelled()]
            if len(batch) < len(taken) and self._on_abandoned is not None:
                try:
                    self._on_abandoned([item for item, f in taken if f.cancelled()])
                except Exception:
                    logger.exception("on_abandoned hook failed")
            if not batch:
                continue
            self.batches += 1
            try:
                results: Sequence[R | BaseException] = self._process([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for "
                                       f"{len(batch)} items")
            except BaseException as e:  # every caller of the batch gets it; the thread lives on
                logger.exception("ingest batch failed")
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                try:
                    future.get_loop().call_soon_threadsafe(_settle, future, result)
                except RuntimeError:  # its loop is closed: nobody waits for it any more
                    pass


def _settle(future: asyncio.Future[R], result: R | BaseException) -> None:
    if future.cancelled():  # the call was cancelled meanwhile; its report is stored anyway
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
