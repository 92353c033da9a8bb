"""Leader batching: concurrent callers hand in items, and one of them at a time (the leader)
processes everything queued in a single call, while the others sleep until their result is
ready.

Why: the ingest path's CPU work (signature, parsing, validation, the store's transaction) is
Python holding the GIL. Done by every RPC thread for its own report, the threads take the GIL
from each other thousands of times a second, and every handoff costs a futex wake-up and a
cold cache; done by one thread for a batch, the work runs back to back and each waiting
thread is woken once, when its result is ready. A lone caller leads at once: nobody waits for
a batch to fill.

Leadership passes from caller to caller (the leader of a batch wakes the first caller still
queued to lead the next), so there is no thread of its own to start or stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("error", "event", "item", "result", "settled")

    def __init__(self, item: T) -> None:
        self.item = item
        self.event = threading.Event()
        self.settled = False
        self.result: R | None = None
        self.error: BaseException | None = None


class Batcher(Generic[T, R]):
    """``process(items)`` returns one entry per item, in order: its result, or the exception
    to raise in that item's caller. When ``process`` itself raises, every caller of the batch
    gets that exception. At most ``max_batch`` items go to one call."""

    def __init__(self, process: Callable[[list[T]], Sequence[R | BaseException]],
                 max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self._process = process
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Slot[T, R]] = []
        self._leading = False   # invariant: False only while the queue is empty
        self.batches = 0        # calls of `process` so far (tests, docs)

    def submit(self, item: T) -> R:
        """Process ``item`` (in some batch) and return its result, or raise its exception."""
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.event.wait()
            if slot.settled:
                return self._outcome(slot)
            # Woken to lead: this slot is first in the queue, so the batch holds it.
        self._lead()
        assert slot.settled
        return self._outcome(slot)

    @staticmethod
    def _outcome(slot: _Slot[T, R]) -> R:
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self) -> None:
        """Process one batch, then hand leadership to the first caller still queued."""
        with self._lock:
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
        results: Sequence[R | BaseException] = ()
        try:
            results = self._process([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except BaseException as e:
            results = [e] * len(batch)
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt and the like; the callers still get it (finally)
        finally:
            self.batches += 1
            for slot, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    slot.error = result
                else:
                    slot.result = result
                slot.settled = True
            with self._lock:
                nxt = self._queue[0] if self._queue else None
                if nxt is None:
                    self._leading = False
            for slot in batch:
                slot.event.set()
            if nxt is not None:
                nxt.event.set()  # not settled: it wakes to lead
