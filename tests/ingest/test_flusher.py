"""Flusher: when a flush is due (pure, explicit clock) and what one flush does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.convert import decode_batch
from trackhouse.ingest.flusher import Flusher, flush_due, seconds_until_due
from trackhouse.ingest.progress import Admission, WriterProgress
from trackhouse.ingest.settings import IngestSettings

SETTINGS = IngestSettings(flush_rows=100, flush_interval=2.0, buffer_bytes=10_000, max_batch_points=200)


@pytest.mark.parametrize(("rows", "oldest", "nbytes", "now", "due"), [
    (0, None, 0, 100.0, False),          # empty
    (0, None, 9_000, 100.0, False),      # only bytes being inserted: nothing to take
    (10, 50.0, 400, 51.0, False),        # young, small
    (10, 50.0, 400, 51.999, False),
    (10, 50.0, 400, 52.0, True),         # age limit reached exactly
    (100, 50.0, 400, 50.0, True),        # row limit
    (99, 50.0, 400, 50.0, False),
    (10, 50.0, 5_000, 50.0, True),       # half the byte budget
    (10, 50.0, 4_999, 50.0, False),
])
def test_flush_due(rows: int, oldest: float | None, nbytes: int, now: float, due: bool) -> None:
    assert flush_due(rows, oldest, nbytes, now, SETTINGS) is due


def test_flush_due_when_a_stream_waits_for_room() -> None:
    assert flush_due(1, 50.0, 100, 50.0, SETTINGS, room_wanted=True)
    assert not flush_due(0, None, 9_000, 50.0, SETTINGS, room_wanted=True)  # nothing to take yet


def test_seconds_until_due() -> None:
    assert seconds_until_due(None, 10.0, SETTINGS) is None
    assert seconds_until_due(10.0, 10.5, SETTINGS) == pytest.approx(1.5)
    assert seconds_until_due(10.0, 12.0, SETTINGS) == 0.0
    assert seconds_until_due(10.0, 99.0, SETTINGS) == 0.0


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Inserts:
    """An `insert` seam that records tables; `hold()` makes the next inserts wait for `resume()`."""

    def __init__(self) -> None:
        self.tables: list[Any] = []
        self.started = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()
        self.fail_with: Exception | None = None

    def hold(self) -> None:
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    async def __call__(self, table: Any) -> None:
        self.started.set()
        await self._gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.tables.append(table)


async def committed_nothing(writer_id: str) -> int:
    return 0


def parts(settings: IngestSettings = SETTINGS) -> tuple[MetricBuffer, WriterProgress, Inserts, Flusher, FakeClock]:
    buf = MetricBuffer(settings.buffer_bytes)
    progress = WriterProgress(committed_nothing)
    inserts = Inserts()
    clock = FakeClock()
    return buf, progress, inserts, Flusher(buf, progress, inserts, settings, clock=clock), clock


def add(buf: MetricBuffer, progress: WriterProgress, make_batch: Any, seq: int, points: int = 5,
        now: float = 0.0) -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    batch = decode_batch(make_batch(seq=seq, points=points), SETTINGS)
    progress.track(batch.writer_id, seq, done)
    buf.add(batch, done, now)
    return done


def test_flush_once_inserts_one_table_and_acks_after_it_returned(make_batch: Any) -> None:
    async def body() -> None:
        buf, progress, inserts, flusher, _ = parts()
        dones = [add(buf, progress, make_batch, seq, points=seq) for seq in (1, 2, 3)]
        inserts.hold()
        flushing = asyncio.ensure_future(flusher.flush_once())
        await asyncio.wait_for(inserts.started.wait(), 5)
        assert not any(d.done() for d in dones)  # not durable yet: no ack
        assert (await progress.admit("w", 2))[0] is Admission.IN_FLIGHT
        assert buf.nbytes > 0
        inserts.resume()
        await asyncio.wait_for(flushing, 5)
        assert [d.result() for d in dones] == [None, None, None]
        assert len(inserts.tables) == 1 and inserts.tables[0].num_rows == 6
        assert inserts.tables[0].column("seq").to_pylist() == [1, 2, 2, 3, 3, 3]
        assert (flusher.stats.flushes, flusher.stats.rows, flusher.stats.failures) == (1, 6, 0)
        assert buf.nbytes == 0
        assert (await progress.admit("w", 3))[0] is Admission.DUPLICATE

    asyncio.run(body())


def test_failed_flush_fails_every_batch_and_frees_the_room(make_batch: Any) -> None:
    async def body() -> None:
        buf, progress, inserts, flusher, _ = parts()
        dones = [add(buf, progress, make_batch, seq) for seq in (1, 2)]
        inserts.fail_with = RuntimeError("store down")
        await asyncio.wait_for(flusher.flush_once(), 5)
        for d in dones:
            with pytest.raises(RuntimeError, match="store down"):
                d.result()
        assert (flusher.stats.flushes, flusher.stats.failures) == (0, 1)
        assert buf.nbytes == 0
        assert (await progress.admit("w", 1))[0] is Admission.NEW  # the client's retry is stored

    asyncio.run(body())


def test_flush_once_on_an_empty_buffer_does_nothing() -> None:
    async def body() -> None:
        _, _, inserts, flusher, _ = parts()
        await flusher.flush_once()
        assert inserts.tables == [] and flusher.stats.flushes == 0

    asyncio.run(body())


def test_run_flushes_by_age_on_the_injected_clock_and_drains_on_stop(make_batch: Any) -> None:
    async def body() -> None:
        buf, progress, _inserts, flusher, clock = parts()
        task = asyncio.ensure_future(flusher.run())
        first = add(buf, progress, make_batch, 1, now=clock.now)
        with pytest.raises(TimeoutError):  # young and small: the flusher waits
            await asyncio.wait_for(asyncio.shield(first), 0.05)
        clock.now = SETTINGS.flush_interval
        buf.changed.set()  # wake it to look at the clock again
        await asyncio.wait_for(first, 5)
        assert flusher.stats.flushes == 1
        second = add(buf, progress, make_batch, 2, now=clock.now)
        flusher.stop()
        await asyncio.wait_for(task, 5)
        assert second.result() is None and flusher.stats.flushes == 2

    asyncio.run(body())


def test_run_flushes_by_rows_without_waiting_for_age(make_batch: Any) -> None:
    async def body() -> None:
        buf, progress, _inserts, flusher, _ = parts()
        task = asyncio.ensure_future(flusher.run())
        done = add(buf, progress, make_batch, 1, points=SETTINGS.flush_rows)
        await asyncio.wait_for(done, 5)
        flusher.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(body())


def test_a_stream_waiting_for_room_gets_a_flush_at_once(make_batch: Any) -> None:
    """Room comes only from flushing: a batch that does not fit must not wait for the age limit."""

    async def body() -> None:
        buf, progress, _inserts, flusher, _ = parts(IngestSettings(
            flush_rows=10_000, flush_interval=60.0, buffer_bytes=10_000, max_batch_points=200))
        task = asyncio.ensure_future(flusher.run())
        small = add(buf, progress, make_batch, 1, points=100)  # 4,128 bytes: under half the budget
        big = decode_batch(make_batch(seq=2, points=150), SETTINGS)  # 6,128: the two exceed 10,000
        assert not buf.fits(big.nbytes)
        await asyncio.wait_for(buf.wait_for_room(big.nbytes), 5)
        assert small.result() is None and flusher.stats.flushes == 1
        flusher.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(body())


def test_an_urgent_batch_is_flushed_without_waiting_for_age(make_batch: Any) -> None:
    """A unary writer waits for its own batch: it goes out as soon as the flusher is free."""

    async def body() -> None:
        buf, progress, _inserts, flusher, clock = parts()
        task = asyncio.ensure_future(flusher.run())
        plain = add(buf, progress, make_batch, 1, now=clock.now)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = decode_batch(make_batch(seq=2, points=5), SETTINGS)
        progress.track(batch.writer_id, 2, done)
        buf.add(batch, done, clock.now, urgent=True)  # the clock never moves: age never triggers
        await asyncio.wait_for(done, 5)
        assert plain.result() is None and flusher.stats.flushes == 1  # the older one shared the INSERT
        flusher.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(body())
