"""Renumbering an outbox above a receiver's mark: the device spool's and a regional
aggregator's forward outbox (SQLite or PostgreSQL) follow the same rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def renumber_plan(rows: Sequence[tuple[int, bytes]], mark: int, next_seq: int,
                  rebuild: Callable[[bytes, int], bytes]
                  ) -> tuple[int, list[tuple[int, bytes, int]]]:
    """For ``rows`` ((seq, payload), ascending seq): the first new seq and the updates
    (new_seq, new_payload, old_seq), in order. The new seqs start above ``mark``, at
    ``next_seq`` at the least, and above every old seq, so no new key collides with an old
    one while the updates run in order; the next seq handed out is first + len(rows)."""
    first = max(mark + 1, next_seq)
    if rows and rows[-1][0] >= first:
        first = int(rows[-1][0]) + 1
    return first, [(first + i, rebuild(bytes(payload), first + i), seq)
                   for i, (seq, payload) in enumerate(rows)]
