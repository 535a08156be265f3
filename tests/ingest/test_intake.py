"""Intake with the real catalog (over a fresh store) and a flusher whose INSERT the test controls:
backpressure, dedupe of in-flight copies, and retries after a failed flush."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from trackhouse.ingest.flusher import Flusher
from trackhouse.ingest.intake import Intake, Outcome, Verdict
from trackhouse.ingest.progress import WriterProgress
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import DELETED, Store

# A 100-point batch of one key and one run holds 4,128 bytes: two fit in the budget, three do not,
# and two reach half the budget (a flush is due).
SETTINGS = IngestSettings(flush_rows=100_000, flush_interval=60.0, buffer_bytes=10_000, max_batch_points=200)


class Inserts:
    def __init__(self) -> None:
        self.tables: list[Any] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures = 0

    async def __call__(self, table: Any) -> None:
        self.started.set()
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store unreachable")
        self.tables.append(table)


class Rig:
    def __init__(self, store: Store) -> None:
        self.catalog = Catalog(store)
        self.buffer = MetricBuffer(SETTINGS.buffer_bytes)

        async def committed(writer_id: str) -> int:
            return await store.call(store.writer_max_seq, writer_id)

        self.progress = WriterProgress(committed)
        self.inserts = Inserts()
        self.flusher = Flusher(self.buffer, self.progress, self.inserts, SETTINGS)
        self.intake = Intake(self.catalog, self.buffer, self.progress, SETTINGS)
        self.run_id = ""

    async def start(self) -> None:
        await self.catalog.ensure_default_experiment()
        self.run_id = (await self.catalog.create_run("0", "r", "", 0, [], [])).run_id


def run_with_rig(store: Store, test: Callable[[Rig], Coroutine[Any, Any, None]]) -> None:
    async def body() -> None:
        rig = Rig(store)
        await rig.start()
        await test(rig)

    asyncio.run(body())


async def outcome(pending: Awaitable[Outcome]) -> Outcome:
    return await asyncio.wait_for(pending, 5)


def test_bad_batches_are_rejected_with_the_error(store: Store, make_batch: Any) -> None:
    async def test(rig: Rig) -> None:
        bad = await outcome(await rig.intake.accept(make_batch(seq=4, run_ids=[rig.run_id], keys=["a b*"])))
        assert bad.verdict is Verdict.REJECTED and bad.seq == 4 and isinstance(bad.error, InvalidArgument)
        unknown = await outcome(await rig.intake.accept(make_batch(seq=5, run_ids=["nope"])))
        assert unknown.verdict is Verdict.REJECTED and isinstance(unknown.error, NotFound)
        assert "run_ids[0]" in str(unknown.error)
        assert rig.intake.rejected == {"InvalidArgument": 1, "NotFound": 1}
        assert len(rig.buffer) == 0

    run_with_rig(store, test)


def test_intake_stops_admitting_past_the_budget_and_resumes_after_the_flush(
        store: Store, make_batch: Any) -> None:
    async def test(rig: Rig) -> None:
        flusher = asyncio.ensure_future(rig.flusher.run())
        rig.inserts.gate.clear()  # hold the INSERT

        def batch(seq: int) -> Any:
            return make_batch(seq=seq, run_ids=[rig.run_id], points=100)

        first = await rig.intake.accept(batch(1))
        second = await rig.intake.accept(batch(2))
        await asyncio.wait_for(rig.inserts.started.wait(), 5)  # half the budget: flushing, held
        third = asyncio.ensure_future(rig.intake.accept(batch(3)))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(third), 0.1)
        assert rig.buffer.nbytes <= SETTINGS.buffer_bytes
        assert rig.intake.points_received == 200
        rig.inserts.gate.set()  # the flush returns
        assert (await outcome(first)).verdict is Verdict.STORED
        assert (await outcome(second)).verdict is Verdict.STORED
        pending_third = await asyncio.wait_for(third, 5)  # admitted once the room was released
        assert rig.intake.points_received == 300
        rig.flusher.stop()
        await asyncio.wait_for(flusher, 5)
        assert (await outcome(pending_third)).verdict is Verdict.STORED
        assert [t.num_rows for t in rig.inserts.tables] == [200, 100]

    run_with_rig(store, test)


def test_a_copy_in_flight_waits_for_the_original(store: Store, make_batch: Any) -> None:
    async def test(rig: Rig) -> None:
        batch = make_batch(seq=1, run_ids=[rig.run_id])
        original = await rig.intake.accept(batch)
        copy = await rig.intake.accept(batch)
        assert len(rig.buffer) == 1  # the copy is not buffered
        await rig.flusher.flush_once()
        assert (await outcome(original)).verdict is Verdict.STORED
        assert (await outcome(copy)).verdict is Verdict.DUPLICATE
        again = await outcome(await rig.intake.accept(batch))
        assert again.verdict is Verdict.DUPLICATE and again.points == 4
        assert len(rig.buffer) == 0 and rig.inserts.tables[0].num_rows == 4

    run_with_rig(store, test)


def test_a_copy_in_flight_fails_with_the_original(store: Store, make_batch: Any) -> None:
    async def test(rig: Rig) -> None:
        batch = make_batch(seq=1, run_ids=[rig.run_id])
        original = asyncio.ensure_future(await rig.intake.accept(batch))
        copy = asyncio.ensure_future(await rig.intake.accept(batch))
        rig.inserts.failures = 1
        await rig.flusher.flush_once()
        for pending in (original, copy):
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pending, 5)
        retry = await rig.intake.accept(batch)
        await rig.flusher.flush_once()
        assert (await outcome(retry)).verdict is Verdict.STORED

    run_with_rig(store, test)


def test_a_failed_batch_blocks_its_writer_until_resent_so_stored_seqs_stay_a_prefix(
        store: Store, make_batch: Any) -> None:
    """Seq 1's flush fails while seq 2 waits in the buffer. Storing 2 first would leave a hole
    that a restart (which knows only the high-water mark) would take 1's resend for a duplicate
    of: so 2 is failed too, 3 is refused until 1 is resent, and then all land in order."""

    async def test(rig: Rig) -> None:
        one = make_batch(seq=1, run_ids=[rig.run_id], values=[1, 1, 1, 1])
        first = asyncio.ensure_future(await rig.intake.accept(one))
        rig.inserts.failures = 1
        rig.inserts.gate.clear()
        flushing = asyncio.ensure_future(rig.flusher.flush_once())
        await asyncio.wait_for(rig.inserts.started.wait(), 5)
        second = asyncio.ensure_future(await rig.intake.accept(make_batch(seq=2, run_ids=[rig.run_id])))
        rig.inserts.gate.set()
        await asyncio.wait_for(flushing, 5)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(first, 5)
        with pytest.raises(Unavailable, match="failed to store"):
            await asyncio.wait_for(second, 5)
        assert len(rig.buffer) == 0
        with pytest.raises(Unavailable, match="resend from seq 1"):
            await rig.intake.accept(make_batch(seq=3, run_ids=[rig.run_id]))
        resent = [await rig.intake.accept(make_batch(seq=seq, run_ids=[rig.run_id])) for seq in (1, 2, 3)]
        await rig.flusher.flush_once()
        assert [(await outcome(r)).verdict for r in resent] == [Verdict.STORED] * 3
        assert rig.inserts.tables[-1].column("seq").to_pylist()[::4] == [1, 2, 3]

    run_with_rig(store, test)


def test_a_stream_closed_while_waiting_for_room_leaves_the_batch_retryable(
        store: Store, make_batch: Any) -> None:
    async def test(rig: Rig) -> None:
        def batch(seq: int) -> Any:
            return make_batch(seq=seq, run_ids=[rig.run_id], points=150)  # 6,128 bytes: one at a time

        first = await rig.intake.accept(batch(1))
        rig.inserts.gate.clear()
        flushing = asyncio.ensure_future(rig.flusher.flush_once())
        await asyncio.wait_for(rig.inserts.started.wait(), 5)
        waiting = asyncio.ensure_future(rig.intake.accept(batch(2)))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), 0.05)
        waiting.cancel()  # the stream went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        rig.inserts.gate.set()
        await asyncio.wait_for(flushing, 5)
        assert (await outcome(first)).verdict is Verdict.STORED
        retry = await rig.intake.accept(batch(2))
        await rig.flusher.flush_once()
        assert (await outcome(retry)).verdict is Verdict.STORED

    run_with_rig(store, test)


def test_a_batch_that_waited_for_room_is_refused_when_an_earlier_one_failed_meanwhile(
        store: Store, make_batch: Any) -> None:
    """Seqs 1 and 2 fill the buffer and their INSERT fails while seq 3 waits for room. Admitted
    before the failure, 3 must still be refused when the room comes: stored alone it would move
    the mark past 1, and 1's resend would be taken for a duplicate and lost."""

    async def test(rig: Rig) -> None:
        def batch(seq: int) -> Any:
            return make_batch(seq=seq, run_ids=[rig.run_id], points=100)  # two fill the budget

        failed = [asyncio.ensure_future(await rig.intake.accept(batch(seq))) for seq in (1, 2)]
        rig.inserts.failures = 1
        rig.inserts.gate.clear()
        flushing = asyncio.ensure_future(rig.flusher.flush_once())
        await asyncio.wait_for(rig.inserts.started.wait(), 5)
        third = asyncio.ensure_future(rig.intake.accept(batch(3)))
        await asyncio.wait_for(rig.buffer.changed.wait(), 5)  # set by seq 3 asking for room
        assert rig.buffer.room_wanted and not third.done()
        rig.inserts.gate.set()
        await asyncio.wait_for(flushing, 5)
        for pending in failed:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pending, 5)
        await asyncio.wait({third}, timeout=5)
        assert third.done(), "seq 3 still waits for room after the failed flush released it"
        assert isinstance(third.exception(), Unavailable), "seq 3 was buffered past the failed seq 1"
        assert "resend from seq 1" in str(third.exception())
        assert len(rig.buffer) == 0 and rig.buffer.nbytes == 0
        assert await rig.progress.committed("w") == 0
        for seqs in ((1, 2), (3,)):  # the client resends in order, as the room allows
            resent = [await asyncio.wait_for(rig.intake.accept(batch(seq)), 5) for seq in seqs]
            await rig.flusher.flush_once()
            assert [(await outcome(r)).verdict for r in resent] == [Verdict.STORED] * len(seqs)
        assert [t.column("seq").to_pylist()[::100] for t in rig.inserts.tables] == [[1, 2], [3]]
        assert await rig.progress.committed("w") == 3

    run_with_rig(store, test)


def test_a_stream_cancelled_while_its_batch_is_in_flight_leaves_the_outcome_to_the_resend(
        store: Store, make_batch: Any) -> None:
    """The stream waiting for seq 1's flush goes away (the client reconnects): its cancellation
    must not cancel the future that the resend on the new stream, a copy in flight, waits on."""

    async def test(rig: Rig) -> None:
        batch = make_batch(seq=1, run_ids=[rig.run_id])
        abandoned = asyncio.ensure_future(await rig.intake.accept(batch))  # a task, as StreamMetrics makes
        rig.inserts.gate.clear()
        flushing = asyncio.ensure_future(rig.flusher.flush_once())
        await asyncio.wait_for(rig.inserts.started.wait(), 5)  # the task, created first, now awaits the flush
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        resent = asyncio.ensure_future(await rig.intake.accept(batch))
        rig.inserts.gate.set()
        await asyncio.wait_for(flushing, 5)
        await asyncio.wait({resent}, timeout=5)
        assert resent.done(), "the resend is still waiting after the flush"
        assert not resent.cancelled(), "the resend died with the cancelled stream"
        assert resent.result().verdict is Verdict.DUPLICATE
        assert [t.num_rows for t in rig.inserts.tables] == [4]

    run_with_rig(store, test)


def test_a_copy_of_a_cancelled_original_is_told_to_resend(store: Store, make_batch: Any) -> None:
    """Should the future of a batch in flight be cancelled all the same, its outcome is unknown:
    a copy waiting on it fails as retryable instead of dying with the cancellation."""

    async def test(rig: Rig) -> None:
        original: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rig.progress.track("w", 1, original)
        original.cancel()
        copy = asyncio.ensure_future(await rig.intake.accept(make_batch(seq=1, run_ids=[rig.run_id])))
        await asyncio.wait({copy}, timeout=5)
        assert copy.done(), "the copy is still waiting on a cancelled original"
        assert not copy.cancelled(), "the copy died with the cancelled original"
        with pytest.raises(Unavailable, match="resend"):
            copy.result()

    run_with_rig(store, test)


def test_a_stored_batch_resent_after_its_run_was_deleted_is_a_duplicate(store: Store, make_batch: Any) -> None:
    """Its points are in the store: the client must count them stored, not rejected. A copy of a
    batch still in flight shares the original's fate; only a new batch is refused."""

    async def test(rig: Rig) -> None:
        def batch(seq: int) -> Any:
            return make_batch(seq=seq, run_ids=[rig.run_id])

        first = await rig.intake.accept(batch(1))
        await rig.flusher.flush_once()
        assert (await outcome(first)).verdict is Verdict.STORED
        in_flight = asyncio.ensure_future(await rig.intake.accept(batch(2)))
        await rig.catalog.set_run_stage(rig.run_id, DELETED)
        again = await outcome(await rig.intake.accept(batch(1)))
        assert (again.verdict, again.points, again.error) == (Verdict.DUPLICATE, 4, None)
        copy = asyncio.ensure_future(await rig.intake.accept(batch(2)))
        await rig.flusher.flush_once()
        assert (await outcome(in_flight)).verdict is Verdict.STORED
        assert (await outcome(copy)).verdict is Verdict.DUPLICATE
        new = await outcome(await rig.intake.accept(batch(3)))
        assert new.verdict is Verdict.REJECTED and isinstance(new.error, FailedPrecondition)
        assert rig.intake.rejected == {"FailedPrecondition": 1}

    run_with_rig(store, test)


def test_a_failed_batch_rejected_on_its_resend_unblocks_its_writer(store: Store, make_batch: Any) -> None:
    """Seq 1 fails to store, then its run is deleted: its resend is rejected, and the client drops
    it. Later batches (to another run) must not be refused forever with "resend from seq 1"."""

    async def test(rig: Rig) -> None:
        other = (await rig.catalog.create_run("0", "other", "", 0, [], [])).run_id
        failed = asyncio.ensure_future(await rig.intake.accept(make_batch(seq=1, run_ids=[rig.run_id])))
        rig.inserts.failures = 1
        await rig.flusher.flush_once()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(failed, 5)
        await rig.catalog.set_run_stage(rig.run_id, DELETED)
        resent = await outcome(await rig.intake.accept(make_batch(seq=1, run_ids=[rig.run_id])))
        assert resent.verdict is Verdict.REJECTED and isinstance(resent.error, FailedPrecondition)
        after = await rig.intake.accept(make_batch(seq=2, run_ids=[other]))
        await rig.flusher.flush_once()
        assert (await outcome(after)).verdict is Verdict.STORED

    run_with_rig(store, test)
