"""Leader batching (aggregator.batcher): every caller gets its own result, concurrent callers
share batches, one failure stays with its caller, and leadership is never lost."""

from __future__ import annotations

import threading
import time

import pytest

from aggregator.batcher import Batcher


def test_a_lone_caller_is_processed_at_once() -> None:
    b: Batcher[int, int] = Batcher(lambda items: [i * 2 for i in items])
    assert [b.submit(i) for i in range(5)] == [0, 2, 4, 6, 8]
    assert b.batches == 5  # nobody waited for a batch to fill


def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def process(items: list[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        gate.wait(5)  # hold the first batch so that the others queue behind it
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    b: Batcher[int, int] = Batcher(process, max_batch=8)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = b.submit(i)
        except ValueError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    assert results == {i: (f"odd {i}" if i % 2 else i * 10) for i in range(40)}
    assert sum(sizes) == 40 and max(sizes) <= 8
    assert len(sizes) < 40, "callers queued behind a batch should have shared the next ones"


def test_a_failing_batch_fails_its_callers_and_the_next_caller_still_leads() -> None:
    calls = []

    def process(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("the batch failed")
        return [s.upper() for s in items]

    b: Batcher[str, str] = Batcher(process)
    with pytest.raises(RuntimeError, match="the batch failed"):
        b.submit("boom")
    assert b.submit("ok") == "OK"  # leadership was handed back after the failure


def test_a_wrong_number_of_results_is_an_error_for_every_caller() -> None:
    b: Batcher[int, int] = Batcher(lambda items: [])
    with pytest.raises(RuntimeError, match="gave 0 results"):
        b.submit(1)
    b2: Batcher[int, int] = Batcher(lambda items: list(items))
    assert b2.submit(7) == 7


def test_no_caller_is_left_waiting_under_load() -> None:
    b: Batcher[int, int] = Batcher(lambda items: [i + 1 for i in items], max_batch=3)
    out: list[int] = []
    lock = threading.Lock()

    def call(base: int) -> None:
        for i in range(base, base + 200):
            r = b.submit(i)
            with lock:
                out.append(r - i)

    threads = [threading.Thread(target=call, args=(k * 1000,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a caller never got its result"
    assert out == [1] * 3200


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Batcher(lambda items: items, max_batch=0)
