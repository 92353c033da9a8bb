"""The group-commit loop both SQL stores' `ingest` runs: the report joins a queue; whoever
holds the write lock (the leader) writes everything queued in one transaction and sets every
job's outcome before it lets go of the lock. A caller returns only after the commit that holds
its report; nobody waits for a batch to fill. `commit_many_in_group` queues several reports at
once (the Ingestor's batches, `aggregator.batcher`), so that they share one transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
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
    (result,) = commit_many_in_group([job], queue, queue_lock, write_lock, write_batch,
                                     max_batch)
    if isinstance(result, BaseException):
        raise result
    return result


def commit_many_in_group(jobs: Sequence[J], queue: list[J], queue_lock: threading.Lock,
                         write_lock: threading.Lock, write_batch: Callable[[list[J]], None],
                         max_batch: int) -> list[IngestOutcome | BaseException]:
    """As `commit_in_group`, for several jobs queued together (so that they share a
    transaction when they fit in one): each job's outcome, or the exception it failed with."""
    with queue_lock:
        queue.extend(jobs)
    for job in jobs:
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
    out: list[IngestOutcome | BaseException] = []
    for job in jobs:
        if job.error is not None:
            out.append(job.error)
        else:
            assert job.outcome is not None
            out.append(job.outcome)
    return out
