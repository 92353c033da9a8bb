"""The asyncio side's batches (aggregator.batch_writer): every awaiting call gets its own
result or exception, concurrent calls share batches, a failing batch fails only its own calls,
and close() stores what is queued before the thread stops."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aggregator.batch_writer import BatchWriter, WriterClosed


def test_each_caller_gets_its_own_result_and_calls_share_batches() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def process(items: list[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        gate.wait(5)  # hold the first batch so that the others queue behind it
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    writer: BatchWriter[int, int] = BatchWriter(process, max_batch=16)

    async def main() -> list[object]:
        async def one(i: int) -> object:
            try:
                return await writer.submit(i)
            except ValueError as e:
                return str(e)

        first = asyncio.ensure_future(one(0))
        await asyncio.sleep(0.05)  # the writer holds batch [0]
        rest = [asyncio.ensure_future(one(i)) for i in range(1, 50)]
        await asyncio.sleep(0.05)
        gate.set()
        return [await first] + [await r for r in rest]

    try:
        results = asyncio.run(main())
    finally:
        writer.close()
    assert results == [f"odd {i}" if i % 2 else i * 10 for i in range(50)]
    assert sizes[0] == 1 and sum(sizes) == 50
    assert max(sizes) == 16 and len(sizes) == 1 + 49 // 16 + 1  # queued calls batched, capped


def test_a_batch_that_raises_fails_its_calls_and_the_writer_goes_on() -> None:
    calls = 0

    def process(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("disk on fire")
        return [i + 1 for i in items]

    writer: BatchWriter[int, int] = BatchWriter(process)

    async def main() -> tuple[str, int]:
        with pytest.raises(RuntimeError, match="disk on fire"):
            await writer.submit(1)
        return "raised", await writer.submit(2)

    try:
        assert asyncio.run(main()) == ("raised", 3)
    finally:
        writer.close()


def test_a_wrong_number_of_results_is_an_error_for_every_call() -> None:
    writer: BatchWriter[int, int] = BatchWriter(lambda items: [])

    async def main() -> None:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            await writer.submit(1)

    try:
        asyncio.run(main())
    finally:
        writer.close()


def test_close_processes_what_is_queued_then_refuses() -> None:
    gate = threading.Event()
    done: list[int] = []

    def process(items: list[int]) -> list[int]:
        gate.wait(5)
        done.extend(items)
        return items

    writer: BatchWriter[int, int] = BatchWriter(process)

    async def main() -> None:
        futures = [writer.submit(i) for i in range(5)]
        closer = threading.Thread(target=writer.close)
        closer.start()
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.to_thread(closer.join, 5)
        assert sorted(done) == [0, 1, 2, 3, 4]  # nothing queued was dropped by close
        assert [await f for f in futures] == [0, 1, 2, 3, 4]
        with pytest.raises(WriterClosed):
            writer.submit(9)

    asyncio.run(main())


def test_a_cancelled_call_does_not_break_the_batch() -> None:
    gate = threading.Event()
    writer: BatchWriter[int, int] = BatchWriter(lambda items: (gate.wait(5), items)[1])

    async def main() -> int:
        cancelled = writer.submit(1)
        kept = writer.submit(2)
        cancelled.cancel()
        gate.set()
        return await kept

    try:
        assert asyncio.run(main()) == 2
    finally:
        writer.close()


def test_calls_cancelled_while_queued_are_not_processed_and_are_reported() -> None:
    gate = threading.Event()
    processed: list[int] = []
    abandoned: list[int] = []

    def process(items: list[int]) -> list[int]:
        gate.wait(5)
        processed.extend(items)
        return items

    writer: BatchWriter[int, int] = BatchWriter(process, on_abandoned=abandoned.extend)

    async def main() -> list[int]:
        first = writer.submit(0)
        await asyncio.sleep(0.05)  # the writer holds [0]
        queued = [writer.submit(i) for i in range(1, 5)]
        queued[1].cancel()  # item 2: its caller gave up
        queued[3].cancel()  # item 4
        gate.set()
        return [await first, await queued[0], await queued[2]]

    try:
        assert asyncio.run(main()) == [0, 1, 3]
    finally:
        writer.close()
    assert processed == [0, 1, 3] and abandoned == [2, 4]
