"""The store's threads under load: writes never queue behind reads; user SQL waits for a
sandbox slot without holding a thread.

In the embedded deployment ingest and query share one Store. A read may run up to
max_query_seconds; ingest's INSERT (its acks wait on it) must not wait behind
reads that fill the store's thread pool. The SQL sandbox's slots and sessions are
tested here on their own (no engine needed); tests/query/test_sql_concurrency.py
runs them under real queries.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pyarrow as pa
import pytest

from trackhouse.store import RunRecord, Store, StoreError, parse_dsn
from trackhouse.store.sandbox import Slots, SqlSandbox, SqlSession
from trackhouse.store.settings import StoreSettings

SLOW_READS = 8  # more than the store's read threads: some run, the rest wait in its queue


def _metrics(writer: str) -> pa.Table:
    return pa.table({
        "run_id": ["r1"], "key": ["loss"], "step": pa.array([1], pa.int64()),
        "timestamp": pa.array([1], pa.int64()), "value": pa.array([0.5], pa.float64()),
        "writer_id": [writer], "seq": pa.array([7], pa.uint64()),
    })


def _run() -> RunRecord:
    return RunRecord("r1", "0", "run", "ann", "RUNNING", 1, None, "active", "")


# ingest's flush (trackhouse.ingest.app) and a catalog write: (arguments, "is it stored?")
WRITES: dict[str, tuple[Callable[[], tuple[object, ...]], Callable[[Store], bool]]] = {
    "insert_metrics": (lambda: (_metrics("w"),), lambda s: s.writer_max_seq("w") == 7),
    "put_run": (lambda: (_run(),), lambda s: "r1" in s.get_runs(["r1"])),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_does_not_wait_behind_slow_reads(store: Store, write: str) -> None:
    arguments, stored = WRITES[write]
    gate = threading.Event()

    def slow_read() -> None:
        """Stands for a read that holds a store thread until ClickHouse stops it (max_query_seconds)."""
        gate.wait(30)

    async def scenario() -> None:
        reads = [asyncio.ensure_future(store.call(slow_read)) for _ in range(SLOW_READS)]
        try:
            # The reads were submitted first (tasks start in order): the write comes after all of them.
            await asyncio.wait_for(store.call(getattr(store, write), *arguments()), 5)
            assert not any(r.done() for r in reads)
        finally:
            gate.set()
            await asyncio.wait_for(asyncio.gather(*reads), 10)

    asyncio.run(scenario())
    assert stored(store)


# -- the SQL sandbox's slots and sessions ------------------------------------------------------


def _sandbox(size: int) -> SqlSandbox:
    # No I/O until a query runs.
    return SqlSandbox(parse_dsn("chdb://./unused"), "unused_sql", size, options=StoreSettings())


def test_slots_admit_at_most_size_and_hand_over_first_come_first_served() -> None:
    slots = Slots(2)

    async def scenario() -> None:
        await slots.acquire()
        await slots.acquire()
        got: list[int] = []

        async def take(i: int) -> None:
            await slots.acquire()
            got.append(i)

        waiters = [asyncio.create_task(take(i)) for i in range(3)]
        await asyncio.sleep(0)  # one turn of the loop: a free slot would have been taken in it
        assert got == [] and not any(w.done() for w in waiters)
        await asyncio.to_thread(slots.release)  # from another thread, as a finished step does
        await asyncio.wait_for(waiters[0], 5)
        waiters[1].cancel()
        slots.release()
        await asyncio.wait_for(waiters[2], 5)  # the cancelled one was passed over
        assert got == [0, 2]
        with pytest.raises(asyncio.CancelledError):
            await waiters[1]
        slots.release()
        slots.release()
        again = [asyncio.create_task(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert [t.done() for t in again] == [True, True, False]
        again[2].cancel()

    asyncio.run(scenario())


def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_goes_back() -> None:
    slots = Slots(1)

    async def scenario() -> None:
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(slots.acquire(), 5)  # not lost

    asyncio.run(scenario())


def test_slots_are_shared_by_event_loops_in_other_threads() -> None:
    slots = Slots(1)
    admitted = threading.Event()

    def other_loop() -> None:
        async def take() -> None:
            await slots.acquire()
            admitted.set()
            slots.release()

        asyncio.run(take())

    async def scenario() -> None:
        await slots.acquire()
        other = threading.Thread(target=other_loop)
        other.start()
        try:
            assert not await asyncio.to_thread(admitted.wait, 0.2)  # it waits while we hold the slot
            slots.release()
            assert await asyncio.to_thread(admitted.wait, 5)
        finally:
            other.join(5)
        await asyncio.wait_for(slots.acquire(), 5)

    asyncio.run(scenario())


def test_a_query_cancelled_mid_step_frees_its_slot_only_after_the_step_and_its_clean_up() -> None:
    sandbox = _sandbox(2)
    running, finish = threading.Event(), threading.Event()
    events: list[str] = []

    def step(session: SqlSession) -> None:
        session.defer(events.append, "stream closed")  # what opening a stream defers
        running.set()
        finish.wait(10)
        events.append("step over")

    async def scenario() -> None:
        other = await sandbox.admit()
        session = await sandbox.admit()
        task = asyncio.create_task(session.call(step, session))
        assert await asyncio.to_thread(running.wait, 5)
        task.cancel()  # the client went away: nobody waits for the step any more
        with pytest.raises(asyncio.CancelledError):
            await task
        ending = asyncio.create_task(session.end())
        waiting = asyncio.create_task(sandbox.admit())
        await asyncio.sleep(0)
        assert not ending.done() and not waiting.done() and events == []
        finish.set()
        await asyncio.wait_for(ending, 5)
        assert events == ["step over", "stream closed"]
        admitted = await asyncio.wait_for(waiting, 5)
        with pytest.raises(StoreError, match="ended"):
            await session.call(events.append, "too late")
        await admitted.end()
        await other.end()

    try:
        asyncio.run(scenario())
    finally:
        finish.set()
        sandbox.close()
