"""WriterProgress: the committed high-water mark per writer and the batches in flight."""

from __future__ import annotations

import asyncio

import pytest

from trackhouse.ingest.errors import Unavailable
from trackhouse.ingest.progress import Admission, WriterProgress


def progress_with(committed: dict[str, int], loads: list[str] | None = None) -> WriterProgress:
    async def load(writer_id: str) -> int:
        if loads is not None:
            loads.append(writer_id)
        return committed.get(writer_id, 0)

    return WriterProgress(load)


def test_new_writer_admits_from_seq_one() -> None:
    async def body() -> None:
        p = progress_with({})
        assert await p.admit("w", 1) == (Admission.NEW, None)
        assert await p.committed("w") == 0

    asyncio.run(body())


def test_committed_is_loaded_once_per_writer() -> None:
    async def body() -> None:
        loads: list[str] = []
        p = progress_with({"w": 5}, loads)
        assert (await p.admit("w", 5))[0] is Admission.DUPLICATE
        assert (await p.admit("w", 1))[0] is Admission.DUPLICATE
        assert (await p.admit("w", 6))[0] is Admission.NEW
        assert (await p.admit("other", 1))[0] is Admission.NEW
        assert loads == ["w", "other"]

    asyncio.run(body())


def test_tracked_batch_is_in_flight_until_stored() -> None:
    async def body() -> None:
        p = progress_with({})
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        p.track("w", 1, done)
        admission, original = await p.admit("w", 1)
        assert admission is Admission.IN_FLIGHT and original is done
        assert (await p.admit("w", 2))[0] is Admission.NEW
        p.stored("w", 1)
        assert await p.admit("w", 1) == (Admission.DUPLICATE, None)
        assert await p.committed("w") == 1

    asyncio.run(body())


def test_failed_batch_is_new_again() -> None:
    async def body() -> None:
        p = progress_with({})
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        p.track("w", 1, done)
        p.failed("w", 1)
        assert await p.admit("w", 1) == (Admission.NEW, None)
        assert await p.committed("w") == 0

    asyncio.run(body())


def test_stored_never_lowers_the_mark() -> None:
    async def body() -> None:
        p = progress_with({"w": 3})
        await p.committed("w")
        p.stored("w", 7)
        p.stored("w", 5)
        assert await p.committed("w") == 7
        assert (await p.admit("w", 6))[0] is Admission.DUPLICATE

    asyncio.run(body())


def test_mark_advanced_while_loading_is_kept() -> None:
    async def body() -> None:
        gate = asyncio.Event()

        async def slow_load(writer_id: str) -> int:
            await gate.wait()
            return 2

        p = WriterProgress(slow_load)
        loading = asyncio.ensure_future(p.committed("w"))
        await asyncio.sleep(0)  # let the load start and park on the gate
        p.stored("w", 9)
        gate.set()
        assert await asyncio.wait_for(loading, 5) == 9

    asyncio.run(body())


def test_a_block_is_lifted_once_the_store_has_the_failed_batch() -> None:
    """Seq 1 failed here, but another replica stored it: its resend is a duplicate, and the writer's
    later batches are taken (before, each was refused with "resend from seq 1", for ever)."""

    async def body() -> None:
        marks: dict[str, int] = {}
        p = progress_with(marks)
        loop = asyncio.get_running_loop()
        assert (await p.admit("w", 1))[0] is Admission.NEW
        p.track("w", 1, loop.create_future())
        p.failed("w", 1)
        marks["w"] = 1  # stored through another replica
        assert (await p.admit("w", 1, refresh=True))[0] is Admission.DUPLICATE
        assert (await p.admit("w", 2))[0] is Admission.NEW

    asyncio.run(body())


def test_a_failed_batch_blocks_later_seqs_of_its_writer_until_it_is_resent() -> None:
    """Seq 1 failed: seq 2 must not be stored before it (the stored seqs stay a prefix, which is
    all a restart can know), so 2 is refused until 1 is resent; other writers are unaffected."""

    async def body() -> None:
        p = progress_with({})
        loop = asyncio.get_running_loop()
        p.track("w", 1, loop.create_future())
        p.failed("w", 1)
        assert p.is_blocked("w", 2) and not p.is_blocked("w", 1) and not p.is_blocked("other", 5)
        with pytest.raises(Unavailable, match="resend from seq 1"):
            await p.admit("w", 2)
        assert (await p.admit("other", 1))[0] is Admission.NEW
        assert (await p.admit("w", 1))[0] is Admission.NEW  # the resend unblocks the writer
        assert (await p.admit("w", 2))[0] is Admission.NEW
        p.track("w", 1, loop.create_future())
        p.stored("w", 1)
        assert (await p.admit("w", 1))[0] is Admission.DUPLICATE

    asyncio.run(body())


def test_a_batch_stored_past_a_failed_one_does_not_move_the_mark_past_it() -> None:
    """Were seq 3 stored while its writer is blocked at 1, a mark of 3 would make 1's resend a
    duplicate and lose it: the mark stays below 1 until 1 itself is stored."""

    async def body() -> None:
        p = progress_with({})
        loop = asyncio.get_running_loop()
        for seq in (1, 3):
            p.track("w", seq, loop.create_future())
        p.failed("w", 1)
        p.stored("w", 3)
        assert await p.committed("w") == 0, "the mark moved past the failed seq 1"
        assert (await p.admit("w", 1))[0] is Admission.NEW
        p.track("w", 1, loop.create_future())
        p.stored("w", 1)
        assert await p.committed("w") == 1

    asyncio.run(body())


def test_a_cached_mark_is_reloaded_when_a_writer_may_have_written_elsewhere() -> None:
    """Replica A cached mark 5; the client went to replica B, which stored 6..8, then came back to A.
    The first batch on the new stream reloads the mark, so 7 and 8 are duplicates, not new rows."""

    async def body() -> None:
        store = {"w": 5}
        loads: list[str] = []
        p = progress_with(store, loads)
        assert (await p.admit("w", 5))[0] is Admission.DUPLICATE
        store["w"] = 8  # another replica stored 6..8
        assert (await p.admit("w", 7, refresh=True))[0] is Admission.DUPLICATE
        assert (await p.admit("w", 8))[0] is Admission.DUPLICATE
        assert (await p.admit("w", 9))[0] is Admission.NEW
        assert loads == ["w", "w"]

    asyncio.run(body())


def test_refresh_is_skipped_below_the_mark_and_for_a_batch_in_flight_here() -> None:
    async def body() -> None:
        loads: list[str] = []
        p = progress_with({"w": 5}, loads)
        await p.committed("w")
        assert (await p.admit("w", 3, refresh=True))[0] is Admission.DUPLICATE
        p.track("w", 6, asyncio.get_running_loop().create_future())
        assert (await p.admit("w", 6, refresh=True))[0] is Admission.IN_FLIGHT
        assert loads == ["w"]

    asyncio.run(body())


def test_refresh_never_lowers_a_mark() -> None:
    async def body() -> None:
        p = progress_with({"w": 2})
        await p.committed("w")
        p.stored("w", 4)  # stored here, the store's view not yet visible to the load
        assert await p.refresh("w") == 4

    asyncio.run(body())


# -- the cap on cached marks -------------------------------------------------------------------


class StoreMarks:
    """The store's marks, as `stored` would leave them (an ack means the INSERT returned), and the
    loads the progress made."""

    def __init__(self) -> None:
        self.marks: dict[str, int] = {}
        self.loads: list[str] = []

    async def load(self, writer_id: str) -> int:
        self.loads.append(writer_id)
        return self.marks.get(writer_id, 0)

    def store(self, p: WriterProgress, writer_id: str, seq: int) -> None:
        """Admitted seq `seq` is buffered, flushed and stored."""
        p.track(writer_id, seq, asyncio.get_running_loop().create_future())
        self.marks[writer_id] = max(self.marks.get(writer_id, 0), seq)
        p.stored(writer_id, seq)


async def admit_writers(p: WriterProgress, store: StoreMarks, names: list[str]) -> None:
    for name in names:
        assert (await p.admit(name, 1))[0] is Admission.NEW
        store.store(p, name, 1)


def test_marks_past_the_cap_are_let_go_and_loaded_again_on_next_use() -> None:
    """Ten writers, room for three marks: the seven least recent are let go; a resend from one of
    them is still a duplicate, its mark read again from the store."""

    async def body() -> None:
        store = StoreMarks()
        p = WriterProgress(store.load, max_writers=3)
        await admit_writers(p, store, [f"w{i}" for i in range(10)])
        store.loads.clear()
        for name in ("w9", "w8", "w7"):
            assert (await p.admit(name, 1))[0] is Admission.DUPLICATE
        assert store.loads == [], "a mark within the cap was loaded again"
        assert (await p.admit("w0", 1))[0] is Admission.DUPLICATE
        assert (await p.admit("w0", 2))[0] is Admission.NEW
        assert store.loads == ["w0"]

    asyncio.run(body())


def test_a_writer_with_a_batch_in_flight_keeps_its_mark() -> None:
    async def body() -> None:
        store = StoreMarks()
        p = WriterProgress(store.load, max_writers=2)
        assert (await p.admit("busy", 1))[0] is Admission.NEW
        p.track("busy", 1, asyncio.get_running_loop().create_future())
        await admit_writers(p, store, [f"w{i}" for i in range(5)])
        store.loads.clear()
        assert (await p.admit("busy", 1))[0] is Admission.IN_FLIGHT
        assert store.loads == [], "the mark of a writer with a batch in flight was let go"
        store.store(p, "busy", 1)  # settled: now it may go like any other
        await admit_writers(p, store, [f"v{i}" for i in range(2)])
        store.loads.clear()
        assert (await p.admit("busy", 1))[0] is Admission.DUPLICATE
        assert store.loads == ["busy"]

    asyncio.run(body())


def test_a_blocked_writer_keeps_its_mark_and_its_block() -> None:
    async def body() -> None:
        store = StoreMarks()
        p = WriterProgress(store.load, max_writers=2)
        await admit_writers(p, store, ["w"])
        p.track("w", 2, asyncio.get_running_loop().create_future())
        p.failed("w", 2)
        await admit_writers(p, store, [f"w{i}" for i in range(5)])
        store.loads.clear()
        with pytest.raises(Unavailable, match="resend from seq 2"):
            await p.admit("w", 3)
        assert (await p.admit("w", 1))[0] is Admission.DUPLICATE
        assert store.loads == [], "the mark of a blocked writer was let go"

    asyncio.run(body())


def test_a_mark_held_below_a_batch_stored_past_a_failed_one_is_not_reloaded() -> None:
    """Seq 1 failed and seq 3 was stored past it: the store's mark says 3, the cached one stays below
    1 so that 1 and 2 are taken when resent. Were that mark let go, the reload (3) would take the
    resent 2 for a duplicate and lose it."""

    async def body() -> None:
        store = StoreMarks()
        p = WriterProgress(store.load, max_writers=2)
        loop = asyncio.get_running_loop()
        for seq in (1, 3):
            p.track("w", seq, loop.create_future())
        p.failed("w", 1)
        store.marks["w"] = 3
        p.stored("w", 3)
        assert (await p.admit("w", 1))[0] is Admission.NEW  # the resend unblocks the writer
        store.store(p, "w", 1)
        await admit_writers(p, store, [f"w{i}" for i in range(5)])
        assert (await p.admit("w", 2))[0] is Admission.NEW, "seq 2, never stored, taken for a duplicate"
        store.store(p, "w", 2)
        assert (await p.admit("w", 3))[0] is Admission.NEW  # as without a cap: the mark is 2 here
        store.store(p, "w", 3)
        await admit_writers(p, store, [f"v{i}" for i in range(2)])  # caught up: it may go now
        store.loads.clear()
        assert (await p.admit("w", 3))[0] is Admission.DUPLICATE
        assert store.loads == ["w"]

    asyncio.run(body())


def test_a_mark_stored_while_it_is_being_loaded_is_not_let_go() -> None:
    """The load began before seq 9 was stored and returns the store's older mark (2): were the
    writer's mark let go before it returned, the older mark would be cached, and 3..9 resent
    would be stored twice."""

    async def body() -> None:
        entered, gate = asyncio.Event(), asyncio.Event()

        async def load(writer_id: str) -> int:
            if writer_id == "w":
                entered.set()
                await gate.wait()
                return 2
            return 0

        p = WriterProgress(load, max_writers=1)
        loading = asyncio.ensure_future(p.admit("w", 5, refresh=True))
        await asyncio.wait_for(entered.wait(), 5)
        p.track("w", 9, asyncio.get_running_loop().create_future())
        p.stored("w", 9)
        for i in range(3):
            await p.admit(f"other{i}", 1)
        gate.set()
        assert (await asyncio.wait_for(loading, 5))[0] is Admission.DUPLICATE
        assert await p.committed("w") == 9

    asyncio.run(body())


# -- the line to the buffer --------------------------------------------------------------------


def test_batches_of_a_writer_take_their_turns_in_admission_order() -> None:
    """A batch admitted later waits until the ones before it are buffered (or abandoned), whatever
    their seqs; another writer's batches do not wait for them."""

    async def body() -> None:
        p = progress_with({})
        loop = asyncio.get_running_loop()
        first, second = (p.track("w", seq, loop.create_future()) for seq in (2, 1))
        other = p.track("other", 1, loop.create_future())
        await asyncio.wait_for(p.wait_turn(first), 5)
        await asyncio.wait_for(p.wait_turn(other), 5)
        waiting = asyncio.ensure_future(p.wait_turn(second))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), 0.05)
        p.leave(first)  # buffered
        await asyncio.wait_for(waiting, 5)

    asyncio.run(body())


def test_a_batch_is_refused_after_a_failure_at_or_before_its_seq_even_once_the_block_is_lifted() -> None:
    """Seq 3 waits for room when 2 fails; 2's resend lifts the block, but 3 was admitted before it and
    must not reach the buffer first. A failure past its seq (5) does not concern it."""

    async def body() -> None:
        p = progress_with({})
        loop = asyncio.get_running_loop()
        p.track("w", 2, loop.create_future())
        three = p.track("w", 3, loop.create_future())
        p.track("w", 5, loop.create_future())
        p.failed("w", 5)
        p.check_turn(three)
        p.failed("w", 2)
        assert (await p.admit("w", 2))[0] is Admission.NEW  # the resend lifts the block
        with pytest.raises(Unavailable, match="resend from seq 2"):
            p.check_turn(three)
        with pytest.raises(Unavailable, match="resend from seq 2"):
            await asyncio.wait_for(p.wait_turn(three), 5)

    asyncio.run(body())


def test_a_writer_line_is_let_go_with_its_last_batch() -> None:
    """Per-writer state for ordering lives only while a batch is on its way to the buffer: buffered,
    abandoned, or settled by hand, the writer leaves nothing behind (its mark may be let go too)."""

    async def body() -> None:
        store = StoreMarks()
        p = WriterProgress(store.load, max_writers=1)
        loop = asyncio.get_running_loop()
        buffered, abandoned = p.track("w", 1, loop.create_future()), p.track("w", 2, loop.create_future())
        p.track("w", 3, loop.create_future())
        p.leave(buffered)
        p.leave(abandoned)
        p.failed("w", 2)
        p.failed("w", 3)  # tracked, never in the buffer: settling it takes it out of the line
        p.stored("w", 1)
        assert not p._lines and not p._busy
        assert (await p.admit("w", 2))[0] is Admission.NEW  # blocked at 2: the resend is taken
        await admit_writers(p, store, ["v"])  # the only slot: w's mark, held by nothing, is let go
        store.loads.clear()
        assert (await p.admit("w", 2))[0] is Admission.NEW
        assert store.loads == ["w"]

    asyncio.run(body())
