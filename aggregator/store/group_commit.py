"""The group-commit loop both SQL stores' `ingest` runs: the report joins a queue; whoever
holds the write lock (the leader) writes everything queued in one transaction and sets every
job's outcome before it lets go of the lock. A caller returns only after the commit that holds
its report; nobody waits for a batch to fill."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from aggregator.store.base import IngestOutcome


class Job(Protocol):
    done: bool
    outcome: IngestOutcome | None
    error: BaseException | None


J = TypeVar("J", bound=Job)


def commit_in_group(job: J, queue: list[J], queue_lock: threading.Lock,
                    write_lock: threading.Lock, write_batch: Callable[[list[J]], None],
                    max_batch: int) -> IngestOutcome:
    """Queue ``job``, lead batches (``write_batch``, under ``write_lock``, at most
    ``max_batch`` jobs each) until it is done, and return its outcome (or raise its error)."""
    with queue_lock:
        queue.append(job)
    while not job.done:
        with write_lock:
            # A leader finishes its batch (outcomes set) before it lets go of the lock:
            # the job is now either done or still queued.
            if job.done:
                break
            with queue_lock:
                batch = queue[:max_batch]
                del queue[:max_batch]
            write_batch(batch)
    if job.error is not None:
        raise job.error
    assert job.outcome is not None
    return job.outcome
