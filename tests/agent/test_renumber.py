"""`agent.renumber.renumber_plan`: the new seqs the spool and the forward outboxes use."""

from __future__ import annotations

from agent.renumber import renumber_plan


def rebuild(payload: bytes, seq: int) -> bytes:
    return payload + b"@" + str(seq).encode()


def test_above_the_mark_in_order() -> None:
    first, updates = renumber_plan([(1, b"a"), (2, b"b"), (3, b"c")], 100, 4, rebuild)
    assert first == 101
    assert updates == [(101, b"a@101", 1), (102, b"b@102", 2), (103, b"c@103", 3)]


def test_never_below_the_next_seq_handed_out() -> None:
    first, updates = renumber_plan([(5, b"a")], 2, 9, rebuild)
    assert (first, updates) == (9, [(9, b"a@9", 5)])


def test_clear_of_every_old_seq_so_no_update_collides() -> None:
    # mark 2, next seq 3, but old seqs reach 6: renumbering from 3 would hit seq 4..6.
    rows = [(4, b"a"), (5, b"b"), (6, b"c")]
    first, updates = renumber_plan(rows, 2, 3, rebuild)
    assert first == 7
    old = {seq for seq, _ in rows}
    assert all(new not in old for new, _, _ in updates)
    assert [new for new, _, _ in updates] == [7, 8, 9]


def test_nothing_pending() -> None:
    assert renumber_plan([], 10, 3, rebuild) == (11, [])
