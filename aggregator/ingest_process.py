"""Reports checked and stored by a child process with a GIL of its own (``--ingest-process``).

In one process the event loop (gRPC, TLS, envelopes, signatures) and the ingest writer
(parsing, validation, merges, the store's transaction) take turns on one GIL: each report
costs the sum of the two. With the writer's work in a child process they run side by side,
on two cores, and a report costs the larger of the two (docs/performance.md, "ingest").

The parent's writer thread (`aggregator.batch_writer`) sends each batch down a pipe: per
report its envelope, report bytes, signer and peer identities, already authenticated. The
child runs `Ingestor.check_and_store` on its own connection to the database (SQLite file or
PostgreSQL, the parent keeps its own for queries) and answers per report with what the store
made of it (`ingest.Stored`) or the refusal (reason, field, message); the parent counts them
and calls its `on_accepted` hooks, so counters, alerts and forwarding behave as in one
process. The child is a fresh interpreter, ``python -m aggregator.ingest_process FD``, talking
over a socket pair (gRPC's threads do not survive a fork; and unlike multiprocessing's
``spawn`` it does not import the caller's ``__main__`` again, so a script that calls `serve`
needs no ``if __name__ == "__main__"`` guard). If it dies, the batch in flight fails with
UNAVAILABLE (the devices retry; what it had committed is then a duplicate, never merged
twice) and the next batch starts a new child.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from aggregator.validate import Limits

__all__ = ["IngestProcess", "IngestUnavailable"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
# A batch's answer, at most: a child that takes longer (a hung disk or database) is killed
# and replaced, and the batch's reports are retried by their devices, rather than every
# Report call waiting behind it for ever.
ANSWER_TIMEOUT_S = 120.0


class IngestUnavailable(RuntimeError):
    """The ingest process died or could not start: the reports of the batch may be retried."""


def _encode(result: Any) -> tuple[Any, ...]:
    from aggregator.ingest import IngestRejected, Stored

    if isinstance(result, Stored):
        return ("stored", result)
    if isinstance(result, IngestRejected):
        return ("rejected", type(result).__name__, result.reason, result.field, result.message)
    return ("error", f"{type(result).__name__}: {result}")


def _decode(entry: tuple[Any, ...]) -> Any:
    from aggregator import ingest

    kind = entry[0]
    if kind == "stored":
        return entry[1]
    if kind == "rejected":
        cls = getattr(ingest, entry[1], None)
        if not (isinstance(cls, type) and issubclass(cls, ingest.IngestRejected)):
            cls = ingest.IngestRejected
        return cls(entry[2], entry[3], entry[4])
    return RuntimeError(f"ingest process: {entry[1]}")


def _child_main(fd: int) -> None:
    """The child: its settings first, then one Ingestor on its own store, one batch per
    message, until None."""
    # Ctrl-C reaches the whole process group: the server stops, and stops this child after
    # the batch in flight (or this child sees the pipe close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from aggregator.ingest import Ingestor, _Received
    from aggregator.store import open_store

    conn = multiprocessing.connection.Connection(fd)
    db, forwarding, limits = conn.recv()
    store = open_store(db, forwarding=forwarding, readers=2)
    try:
        ingestor = Ingestor(store, limits)  # envelopes arrive authenticated: no keys here
        conn.send(("ready",))
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return  # the parent is gone
            if message is None:
                return
            batch = [_Received(*fields) for fields in message]
            try:
                results = [_encode(r) for r in ingestor.check_and_store(batch)]
            except Exception as e:  # the batch's own failure: every report gets it
                results = [_encode(e)] * len(batch)
            conn.send(results)
    finally:
        store.close()


class IngestProcess:
    """The child process and its pipe; `run` is called by one thread at a time (the
    parent's writer thread)."""

    def __init__(self, db: str | pathlib.Path, *, forwarding: bool = False,
                 limits: Limits = Limits()) -> None:
        self._settings = (str(db), forwarding, limits)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self.starts = 0  # children started so far (tests, logs)
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        # The child imports what this process imports, from where it finds it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "aggregator.ingest_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            ours.close()
            raise IngestUnavailable(f"the ingest process could not start: {e}") from e
        finally:
            theirs.close()
        conn = multiprocessing.connection.Connection(ours.detach())
        try:
            conn.send(self._settings)
            if not conn.poll(START_TIMEOUT_S) or conn.recv() != ("ready",):
                raise IngestUnavailable("the ingest process did not start")
        except (EOFError, OSError) as e:
            conn.close()
            code = _wait(proc, 5)
            raise IngestUnavailable(f"the ingest process exited at start (exit code "
                                    f"{code})") from e
        except BaseException:
            conn.close()
            proc.kill()
            _wait(proc, 5)
            raise
        self._proc, self._conn = proc, conn
        self.starts += 1
        logger.info("ingest process %d started", proc.pid)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def run(self, batch: Sequence[Any]) -> list[Any]:
        """Check and store a batch of `ingest._Received` in the child: per report an
        `ingest.Stored` or its exception. Raises IngestUnavailable when the child is gone."""
        with self._lock:
            if self._conn is None:
                self._start()  # the previous child died: this batch gets a new one
            assert self._conn is not None
            try:
                self._conn.send([(r.envelope, r.report, r.signer, r.peer_device_id,
                                  r.peer_aggregator_id) for r in batch])
                if not self._conn.poll(ANSWER_TIMEOUT_S):
                    self._reap(kill=True)
                    raise IngestUnavailable(f"the ingest process did not answer within "
                                            f"{ANSWER_TIMEOUT_S:g} s: replaced; the reports "
                                            "may be sent again")
                answer = self._conn.recv()
            except (EOFError, OSError) as e:
                self._reap()
                raise IngestUnavailable("the ingest process died; the reports may be sent "
                                        "again") from e
        if len(answer) != len(batch):
            raise RuntimeError(f"ingest process answered {len(answer)} results for "
                               f"{len(batch)} reports")
        return [_decode(entry) for entry in answer]

    def _reap(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if proc is not None:
            if kill:
                proc.kill()
            code = _wait(proc, 5)
            if code is None:
                proc.kill()
                code = _wait(proc, 5)
            logger.error("ingest process %d exited (code %s)", proc.pid, code)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child after the batch in flight (call after the writer's close)."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        if proc is not None and _wait(proc, timeout_s) is None:
            logger.error("ingest process %d did not stop within %ss: killed", proc.pid,
                         timeout_s)
            proc.kill()
            _wait(proc, 5)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit code, or None if it is still running after ``timeout_s``."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
