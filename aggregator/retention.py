"""How long the raw report envelopes are kept (`fleetwatch serve --retain-raw`).

An aggregator keeps every accepted report's envelope, the exact bytes the device signed (for
forensics and for telling a resend from a new report under a used seq). They are most of its
disk: ~1.5 KB per device per window, ~2 GB per 1,000 devices per day at one report a minute.
Everything queries read is derived from them at ingest and kept (rollups, device counts,
privacy sums), so dropping old envelopes loses no answer. The report's row stays, without its
bytes: its (device_id, seq) still deduplicates, so a resend of a pruned report is still a
DUPLICATE and never merged twice.

The pruner works through each spec's windows an hour at a time, oldest first, in
transactions of at most 5,000 reports (a short write lock each, so ingest is not held up),
remembering how far it got.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from aggregator.store.base import Store

__all__ = ["DEFAULT_RETAIN_S", "RawRetention"]

logger = logging.getLogger(__name__)

DEFAULT_RETAIN_S = 7 * 86400
CHUNK_S = 3600            # window starts pruned per pass
BATCH = 5000              # envelopes per transaction: keeps each write lock short
DEFAULT_EVERY_S = 600.0   # how often the pruner looks


class RawRetention:
    """Drops raw envelopes of reports whose window started more than ``retain_s`` ago."""

    def __init__(self, store: Store, retain_s: float, *, every_s: float = DEFAULT_EVERY_S,
                 clock: Callable[[], float] = time.time) -> None:
        if not retain_s > 0:
            raise ValueError(f"retain_s: must be positive, got {retain_s!r}")
        self.store = store
        self.retain_s = retain_s
        self.every_s = every_s
        self.clock = clock
        self.pruned = 0                  # envelopes dropped since start
        self._done_until: dict[str, int] = {}   # spec hash -> window starts below are pruned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Prune everything due now; returns the envelopes dropped."""
        cutoff = int(self.clock() - self.retain_s) // CHUNK_S * CHUNK_S
        dropped = 0
        for spec in self.store.list_specs():
            if self._stop.is_set():
                break
            start = self._done_until.get(spec.hash)
            if start is None:
                found = self.store.window_range(spec.hash)
                if found is None:
                    continue
                start = found[0] // CHUNK_S * CHUNK_S
            while start < cutoff and not self._stop.is_set():
                n = self.store.prune_raw(spec.hash, start, start + CHUNK_S, BATCH)
                dropped += n
                if n < BATCH:  # this hour is done (a full batch: more of it to go)
                    start += CHUNK_S
                    self._done_until[spec.hash] = start
        self.pruned += dropped
        if dropped:
            logger.info("retention: dropped the raw envelopes of %d reports older than %.0f s "
                        "(their rows, rollups and counts stay)", dropped, self.retain_s)
        return dropped

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="fleetwatch-retention")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.run_once()
            except Exception:  # a failed pass is retried at the next one
                logger.exception("retention: pruning failed; retrying in %.0f s", self.every_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
