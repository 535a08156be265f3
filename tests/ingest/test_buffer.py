"""MetricBuffer: accounting, the byte budget, and wait_for_room as the brake on streams."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.convert import DecodedBatch, decode_batch
from trackhouse.ingest.settings import IngestSettings

SETTINGS = IngestSettings()


def decoded(make_batch: Any, points: int, seq: int = 1) -> DecodedBatch:
    return decode_batch(make_batch(seq=seq, points=points), SETTINGS)


def test_add_and_take_keep_the_accounts(make_batch: Any) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        buf = MetricBuffer(1 << 20)
        a, b = decoded(make_batch, 3, 1), decoded(make_batch, 5, 2)
        buf.add(a, loop.create_future(), now=10.0)
        buf.add(b, loop.create_future(), now=11.0)
        assert (len(buf), buf.rows, buf.nbytes, buf.oldest) == (2, 8, a.nbytes + b.nbytes, 10.0)
        assert buf.changed.is_set()
        taken = buf.take(max_rows=10**9)
        assert [p.batch for p in taken] == [a, b]
        # Taken bytes still count until the flush releases them.
        assert (len(buf), buf.rows, buf.nbytes, buf.oldest) == (0, 0, a.nbytes + b.nbytes, None)
        assert not buf.changed.is_set()
        await buf.release(a.nbytes + b.nbytes)
        assert buf.nbytes == 0

    asyncio.run(body())


def test_take_caps_rows_per_flush_but_takes_at_least_one_batch(make_batch: Any) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        buf = MetricBuffer(1 << 20)
        batches = [decoded(make_batch, 4, seq) for seq in (1, 2, 3)]
        for t, b in enumerate(batches):
            buf.add(b, loop.create_future(), now=float(t))
        assert [p.batch for p in buf.take(max_rows=8)] == batches[:2]
        # The rest keeps its own arrival time, so its age is not reset.
        assert (buf.rows, buf.oldest) == (4, 2.0)
        assert buf.changed.is_set()
        assert [p.batch for p in buf.take(max_rows=1)] == batches[2:]  # larger than the cap: still taken
        assert (len(buf), buf.rows, buf.oldest) == (0, 0, None)

    asyncio.run(body())


def test_fits_respects_the_budget_but_an_empty_buffer_takes_anything(make_batch: Any) -> None:
    async def body() -> None:
        one = decoded(make_batch, 10)
        buf = MetricBuffer(2 * one.nbytes)
        assert buf.fits(10 * one.nbytes)  # empty: one oversized batch cannot stall forever
        buf.add(one, asyncio.get_running_loop().create_future(), now=0.0)
        assert buf.fits(one.nbytes)
        assert not buf.fits(one.nbytes + 1)

    asyncio.run(body())


def test_wait_for_room_returns_at_once_when_the_batch_fits(make_batch: Any) -> None:
    async def body() -> None:
        buf = MetricBuffer(1 << 20)
        await asyncio.wait_for(buf.wait_for_room(100), 5)
        assert not buf.changed.is_set()

    asyncio.run(body())


def test_wait_for_room_blocks_until_release(make_batch: Any) -> None:
    async def body() -> None:
        one = decoded(make_batch, 10)
        buf = MetricBuffer(one.nbytes)
        buf.add(one, asyncio.get_running_loop().create_future(), now=0.0)
        buf.take(max_rows=10**9)  # being flushed: still counted
        waiter = asyncio.ensure_future(buf.wait_for_room(one.nbytes))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), 0.05)
        assert buf.changed.is_set()  # the waiter asked for a flush
        await buf.release(one.nbytes)
        await asyncio.wait_for(waiter, 5)

    asyncio.run(body())


def test_release_admits_only_what_fits(make_batch: Any) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        one = decoded(make_batch, 10)
        buf = MetricBuffer(3 * one.nbytes)
        for seq in (1, 2, 3):
            buf.add(decoded(make_batch, 10, seq), loop.create_future(), now=0.0)
        buf.take(max_rows=10**9)
        admitted: list[int] = []

        async def stream(seq: int) -> None:
            await buf.wait_for_room(one.nbytes)
            buf.add(decoded(make_batch, 10, seq), loop.create_future(), now=0.0)
            admitted.append(seq)

        waiters = [asyncio.ensure_future(stream(seq)) for seq in (4, 5)]
        await buf.release(one.nbytes)
        done, pending = await asyncio.wait(waiters, timeout=0.1)
        assert len(done) == 1 and len(pending) == 1
        assert buf.nbytes == 3 * one.nbytes  # never past the budget
        await buf.release(2 * one.nbytes)
        await asyncio.wait_for(asyncio.gather(*pending), 5)
        assert sorted(admitted) == [4, 5]
        assert buf.nbytes == 2 * one.nbytes

    asyncio.run(body())


def test_urgent_batches_are_counted_until_taken_or_removed(make_batch: Any) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        buf = MetricBuffer(1 << 20)
        buf.add(decoded(make_batch, 4, 1), loop.create_future(), now=0.0)
        buf.add(decoded(make_batch, 4, 2), loop.create_future(), now=0.0, urgent=True)
        buf.add(decoded(make_batch, 4, 3), loop.create_future(), now=0.0, urgent=True)
        assert buf.urgent == 2
        buf.take(max_rows=8)
        assert buf.urgent == 1
        buf.remove(lambda b: b.seq == 3)
        assert buf.urgent == 0

    asyncio.run(body())
