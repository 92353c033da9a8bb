"""Decoded rollup rows kept in memory, for the SQLite store's read and write paths.

Decoding a stored rollup (`summary_from_proto`) and merging it cost ~30 us a row, and a day's
health query merges ~80 rows per cohort: most of its time (docs/performance.md). Rows of closed
buckets never change, so both caches here keep what was decoded or merged; entries are never
mutated (merges make new summaries), so a cached summary may be shared by threads.

- `ReadCache` (queries): a row's decoded summary, and a run of rows' merge, each checked against
  the stored bytes read in the same query: coherent whoever writes the file (another process
  included), with no invalidation to get wrong. Bytes compare at memcmp speed.
- `WriteCache` (ingest): the latest decoded summary per rollup key as this store committed it,
  so a report's merge needs no read or decode. Only valid while this store's writer is the only
  one writing: the owner clears it when the file's `PRAGMA data_version` moved (another
  connection committed) or a transaction rolled back.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from agent.summary import Summary

__all__ = ["BatchRollups", "Lru", "ReadCache", "WriteCache"]

RowKey = tuple[str, int, int, int]  # (spec_hash, resolution, window_start, label_set)


class Lru:
    """A bounded mapping that forgets the least recently used entries (thread-safe)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries: must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: object) -> None:
        if not self.max_entries:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class ReadCache:
    """Decoded rows keyed by their position, valid while their stored bytes are the same; and
    merges of runs of rows keyed by the run, valid while every row's bytes are the same."""

    # ~10 KB a row (bytes, arrays, sketch) at the bench's 12 features: ~40 MB at most. A day's
    # health of 20 cohorts holds ~1,700 rows and ~80 runs.
    def __init__(self, max_rows: int = 4096, max_runs: int = 1024) -> None:
        self._rows = Lru(max_rows)
        self._runs = Lru(max_runs)
        self.hits = self.misses = 0  # rows decoded from the cache / from bytes (tests, docs)

    def row(self, key: RowKey, blob: bytes, decode: Callable[[bytes], Summary]) -> Summary:
        """The decoded summary of the row stored at `key` with bytes `blob` (do not mutate)."""
        hit = self._rows.get(key)
        if hit is not None and hit[0] == blob:  # type: ignore[index]
            self.hits += 1
            return hit[1]  # type: ignore[index,no-any-return]
        self.misses += 1
        summary = decode(blob)
        self._rows.put(key, (blob, summary))
        return summary

    def run(self, key: Hashable, blobs: Sequence[tuple[int, bytes]],
            merge: Callable[[], Summary]) -> Summary:
        """The merge of a run of rows, `blobs` their (window_start, bytes) as just read: the
        cached merge when the run read the same bytes, else `merge()` (do not mutate)."""
        blobs = tuple(blobs)  # (a list never equals a tuple)
        hit = self._runs.get(key)
        if hit is not None and hit[0] == blobs:  # type: ignore[index]
            return hit[1]  # type: ignore[index,no-any-return]
        merged = merge()
        self._runs.put(key, (blobs, merged))
        return merged

    def clear(self) -> None:
        self._rows.clear()
        self._runs.clear()


class WriteCache:
    """The decoded summary of each rollup key as last committed by this store's writer."""

    def __init__(self, max_keys: int = 4096) -> None:
        self._keys = Lru(max_keys)

    def get(self, key: RowKey) -> Summary | None:
        return self._keys.get(key)  # type: ignore[return-value]

    def put(self, key: RowKey, summary: Summary) -> None:
        self._keys.put(key, summary)

    def clear(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


class BatchRollups:
    """One group-commit batch's rollup merges: each key read (or taken from the `WriteCache`)
    once, merged in memory report by report, and written once when the batch ends.

    A report's summaries are staged (`stage`, inside its savepoint: the read of a key not seen
    yet happens there) and merged into the batch only once its savepoint is released (`keep`);
    `drop` forgets them when it rolls back, so a failed report leaves no trace. `keep` merges
    in place, into the batch's own copies and into the write cache's summaries: the owner must
    clear the write cache whenever the batch does not commit.

    ``eager`` (the slow path, after a failure): every merge makes a new summary and `staged`
    holds the current report's merged rows, for the owner to write inside its savepoint."""

    def __init__(self, committed: WriteCache, load: Callable[[RowKey], Summary | None],
                 eager: bool = False) -> None:
        self._committed = committed
        self._load = load
        self._eager = eager
        self.pending: dict[RowKey, Summary] = {}   # kept reports' merges, to write
        self.staged: dict[RowKey, Summary] = {}    # the current report's (eager: merged)
        self._base: dict[RowKey, Summary | None] = {}  # keys read this batch, before merging

    def _start(self, key: RowKey) -> Summary | None:
        """What the key held before this batch's merges (read once)."""
        if key in self._base:
            return self._base[key]
        base = self._committed.get(key)
        if base is None:
            base = self._load(key)
        self._base[key] = base
        return base

    def stage(self, key: RowKey, summary: Summary) -> None:
        if not self._eager:
            self._start(key)
            self.staged[key] = summary
            return
        base = self.staged.get(key)
        if base is None:
            base = self.pending.get(key)
        if base is None:
            base = self._start(key)
        self.staged[key] = summary.copy() if base is None else base.merge(summary)

    def keep(self) -> None:
        """The current report's savepoint was released: its merges join the batch (a
        failure here leaves the batch's summaries half merged: redo the batch eagerly)."""
        if self._eager:
            self.pending.update(self.staged)
        else:
            for key, summary in self.staged.items():
                acc = self.pending.get(key)
                if acc is None:
                    acc = self._base[key]
                    if acc is None:
                        self.pending[key] = summary.copy()  # the caller keeps its summary
                        continue
                    self.pending[key] = acc
                acc.merge_in(summary)
        self.staged.clear()

    def drop(self) -> None:
        self.staged.clear()
