"""A writer's batches are stored in seq order even when they come on two streams at once (an old one
the client gave up on, a new one it resends on): a batch stored past an earlier one that then fails
takes the mark past it, and the earlier one's resend is answered DUPLICATE while its points were
never stored.

Intake with the real catalog (over a fresh store), flushed by hand while a test sets a race up and
by the flusher afterwards, and an INSERT that fails for the seqs a test names or waits until the test
lets it return. A batch of n points of one key and one run holds 40·n + 128 bytes (100 points: 4,128;
150 points: 6,128) against a budget of 10,000 bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import pytest

from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.errors import Unavailable
from trackhouse.ingest.flusher import Flusher
from trackhouse.ingest.intake import Intake, Outcome, Verdict
from trackhouse.ingest.progress import WriterProgress
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import Store

if TYPE_CHECKING:
    from trackhouse.ingest.progress import Turn

SETTINGS = IngestSettings(flush_rows=100_000, flush_interval=60.0, buffer_bytes=10_000, max_batch_points=200)
DEADLINE = 5.0
W = "w"  # the writer whose order is at stake; "o" is another writer sharing the buffer


class Inserts:
    """The store's INSERT: waits while `gate` is clear; fails while `failures[seq]` (of writer W) lasts."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, int, int]] = []  # (writer, seq, rows) of each batch stored, in order
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: dict[int, int] = {}

    async def __call__(self, table: Any) -> None:
        self.started.set()
        await self.gate.wait()
        rows = list(zip(table.column("writer_id").to_pylist(), table.column("seq").to_pylist(), strict=True))
        failing = {seq for writer, seq in rows if writer == W and self.failures.get(seq, 0) > 0}
        for seq in failing:
            self.failures[seq] -= 1
        if failing:
            raise ConnectionError(f"store unreachable (the INSERT held seq {sorted(failing)})")
        self.stored += [(writer, seq, len(list(group))) for (writer, seq), group in itertools.groupby(rows)]

    def of(self, writer_id: str) -> list[tuple[int, int]]:
        return [(seq, rows) for writer, seq, rows in self.stored if writer == writer_id]


class WatchedProgress(WriterProgress):
    """WriterProgress that tells a test when a batch of W was admitted as new: `tracked(seq, n)` returns
    once the n-th batch with that seq was tracked, so it is buffered or waits (for its turn or for room)."""

    def __init__(self, load: Callable[[str], Awaitable[int]]) -> None:
        super().__init__(load)
        self._count: Counter[int] = Counter()
        self._signals: defaultdict[tuple[int, int], asyncio.Event] = defaultdict(asyncio.Event)

    def track(self, writer_id: str, seq: int, done: asyncio.Future[None]) -> Turn:
        turn = super().track(writer_id, seq, done)
        if writer_id == W:
            self._count[seq] += 1
            self._signals[(seq, self._count[seq])].set()
        return turn

    async def tracked(self, seq: int, nth: int = 1) -> None:
        await asyncio.wait_for(self._signals[(seq, nth)].wait(), DEADLINE)


class Rig:
    def __init__(self, store: Store) -> None:
        self.catalog = Catalog(store)
        self.buffer = MetricBuffer(SETTINGS.buffer_bytes)

        async def committed(writer_id: str) -> int:
            return await store.call(store.writer_max_seq, writer_id)

        self.progress = WatchedProgress(committed)
        self.inserts = Inserts()
        # Its clock is always past every age limit: once running, it flushes whatever is buffered.
        self.flusher = Flusher(self.buffer, self.progress, self.inserts, SETTINGS, clock=lambda: math.inf)
        self.intake = Intake(self.catalog, self.buffer, self.progress, SETTINGS)
        self.run_id = ""
        self._flushing: asyncio.Future[None] | None = None

    def batches(self, points: dict[int, int], make_batch: Any, writer_id: str = W) -> Callable[[int], Any]:
        """The batch of each seq, `points[seq]` points (the same message when it is resent)."""
        return lambda seq: make_batch(writer_id=writer_id, seq=seq, run_ids=[self.run_id], points=points[seq],
                                      steps=range(seq * 1000, seq * 1000 + points[seq]))

    def start_flushing(self) -> None:
        self._flushing = asyncio.ensure_future(self.flusher.run())

    async def stop_flushing(self) -> None:
        assert self._flushing is not None
        self.flusher.stop()
        await asyncio.wait_for(self._flushing, DEADLINE)


def run_with_rig(store: Store, test: Callable[[Rig], Coroutine[Any, Any, None]]) -> None:
    async def body() -> None:
        rig = Rig(store)
        await rig.catalog.ensure_default_experiment()
        rig.run_id = (await rig.catalog.create_run("0", "r", "", 0, [], [])).run_id
        await test(rig)

    asyncio.run(body())


async def _refused(error: Exception) -> Outcome:
    raise error


async def stream(intake: Intake, batches: Iterable[Any]) -> list[Outcome | BaseException]:
    """One metric stream as the service reads it: a batch is accepted only once the one before it was
    (so one waiting for its turn or for room holds up the rest); then the outcome of each, in order."""
    outcomes: list[asyncio.Future[Outcome]] = []
    for message in batches:
        try:
            pending = await intake.accept(message)
        except Unavailable as exc:
            pending = _refused(exc)
        outcomes.append(asyncio.ensure_future(pending))
    return await asyncio.gather(*outcomes, return_exceptions=True)


def acknowledged(seqs: Iterable[int], outcomes: Iterable[Outcome | BaseException]) -> set[int]:
    """What the client learns from a stream: the acks before the first error, which ends the stream."""
    acked = set()
    for seq, outcome in zip(seqs, outcomes, strict=True):
        if not isinstance(outcome, Outcome):
            break
        acked.add(seq)
    return acked


async def resend_in_order(rig: Rig, batch: Callable[[int], Any], seqs: Iterable[int]) -> dict[int, Verdict]:
    """The client on a third stream, the flusher running: each unacknowledged batch, in seq order."""
    verdicts = {}
    for seq in sorted(seqs):
        outcome = await asyncio.wait_for(await rig.intake.accept(batch(seq)), DEADLINE)
        verdicts[seq] = outcome.verdict
    return verdicts


def assert_stored_once_in_order(rig: Rig, points: dict[int, int], resent: dict[int, Verdict]) -> None:
    stored = rig.inserts.of(W)
    lost = sorted(set(points) - {seq for seq, _ in stored})
    assert not lost, (f"the points of seq {lost} were never stored, yet their resends were answered "
                      f"{[resent.get(seq) for seq in lost]}; stored in this order: {stored}")
    assert stored == sorted(points.items()), "not every point stored exactly once, in seq order"


def test_a_batch_that_fits_does_not_overtake_an_earlier_one_of_its_writer_waiting_for_room(
        store: Store, make_batch: Any) -> None:
    """Seq 5 waits for room on the old stream. On the new stream the client resends 5 (a copy in
    flight: it shares the original's fate) and sends 6, which fits at once. Were 6 buffered first, it
    would be stored first and move the mark to 6; then 5's INSERT fails, and 5's resend is taken for a
    duplicate: its points are lost. 6 must wait for 5 and, 5 failing, be refused."""

    async def test(rig: Rig) -> None:
        points = {4: 100, 5: 150, 6: 100}
        batch = rig.batches(points, make_batch)
        rig.inserts.failures[5] = 1
        four = asyncio.ensure_future(await rig.intake.accept(batch(4)))  # 4,128 bytes, buffered
        old = asyncio.ensure_future(stream(rig.intake, [batch(5)]))  # 6,128 more do not fit: waits
        await rig.progress.tracked(5)
        new = asyncio.ensure_future(stream(rig.intake, [batch(5), batch(6)]))
        await rig.progress.tracked(6)  # admitted as new while 5 still waits for room
        rig.start_flushing()
        old_outcomes, new_outcomes = await asyncio.wait_for(asyncio.gather(old, new), DEADLINE)
        assert (await asyncio.wait_for(four, DEADLINE)).verdict is Verdict.STORED
        assert [type(o) for o in old_outcomes + new_outcomes[:1]] == [ConnectionError] * 2  # 5 and its copy
        acked = {4} | acknowledged([5], old_outcomes) | acknowledged([5, 6], new_outcomes)
        resent = await resend_in_order(rig, batch, set(points) - acked)
        await rig.stop_flushing()
        assert_stored_once_in_order(rig, points, resent)
        assert resent == {5: Verdict.STORED, 6: Verdict.STORED}

    run_with_rig(store, test)


def test_a_batch_admitted_before_a_failure_is_refused_even_after_the_resend_lifted_the_block(
        store: Store, make_batch: Any) -> None:
    """Seq 7's INSERT fails while the old stream's 8 waits for room (another writer's batch holds
    it). The client resends 7 on a new stream, which lifts the block; 7 does not fit either. Were the
    old 8 buffered when room comes (it waited first), it would be stored before the resent 7 — and when
    that one fails again, the mark at 8 makes its resend a duplicate. The old 8 must be refused (7
    failed after it was admitted) and the resent 7 go on."""

    async def test(rig: Rig) -> None:
        points = {7: 100, 8: 150}
        batch = rig.batches(points, make_batch)
        other = rig.batches({1: 100, 2: 50}, make_batch, writer_id="o")
        rig.inserts.failures[7] = 2
        rig.inserts.gate.clear()
        first = asyncio.ensure_future(await rig.intake.accept(batch(7)))
        flushing = asyncio.ensure_future(rig.flusher.flush_once())
        await asyncio.wait_for(rig.inserts.started.wait(), DEADLINE)  # 7's INSERT is under way, held
        others = [asyncio.ensure_future(await rig.intake.accept(other(1)))]  # 8,256 bytes
        old8 = asyncio.ensure_future(stream(rig.intake, [batch(8)]))  # 6,128 more do not fit: waits
        await rig.progress.tracked(8)
        rig.inserts.gate.set()
        await asyncio.wait_for(flushing, DEADLINE)  # 7 failed; beside o1, 8 still does not fit
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(first, DEADLINE)
        others.append(asyncio.ensure_future(await rig.intake.accept(other(2))))  # 6,256 bytes
        new = asyncio.ensure_future(stream(rig.intake, [batch(7), batch(8)]))  # the client resends from 7
        await rig.progress.tracked(7, nth=2)  # admitted as new: waits (6,256 + 4,128 do not fit)
        rig.start_flushing()  # o1, o2 go: room for the old 8, which waited first, and not beside it for 7
        _, new_outcomes = await asyncio.wait_for(asyncio.gather(old8, new), DEADLINE)
        assert [(await asyncio.wait_for(o, DEADLINE)).verdict for o in others] == [Verdict.STORED] * 2
        acked = acknowledged([7, 8], new_outcomes)  # none from the old stream: it ended at 7's failure
        resent = await resend_in_order(rig, batch, set(points) - acked)
        await rig.stop_flushing()
        assert_stored_once_in_order(rig, points, resent)
        assert resent == {7: Verdict.STORED, 8: Verdict.STORED}

    run_with_rig(store, test)


def test_batches_resent_after_a_failure_do_not_overtake_a_batch_of_their_writer_admitted_before_it(
        store: Store, make_batch: Any) -> None:
    """Seq 7's INSERT fails while the old stream's 8 waits for room. On the new stream the client
    resends 7, then 8 (a copy of the old 8, in flight: it shares that one's fate) and 9; 7 and 9 fit.
    Were they buffered at once, 9 would be stored before 8, moving the mark past it; and the old 8,
    refused since 7 failed after it was admitted, takes its copy down with it, so 8's resend would
    be a duplicate. Everything admitted after the old 8 waits for it, whatever failed in between."""

    async def test(rig: Rig) -> None:
        points = {7: 100, 8: 150, 9: 10}
        batch = rig.batches(points, make_batch)
        other = rig.batches({1: 100}, make_batch, writer_id="o")
        rig.inserts.failures[7] = 1
        rig.inserts.gate.clear()
        first = asyncio.ensure_future(await rig.intake.accept(batch(7)))
        flushing = asyncio.ensure_future(rig.flusher.flush_once())
        await asyncio.wait_for(rig.inserts.started.wait(), DEADLINE)  # 7's INSERT is under way, held
        o1 = asyncio.ensure_future(await rig.intake.accept(other(1)))  # 8,256 bytes
        old8 = asyncio.ensure_future(stream(rig.intake, [batch(8)]))  # 6,128 more do not fit: waits
        await rig.progress.tracked(8)
        rig.inserts.gate.set()
        await asyncio.wait_for(flushing, DEADLINE)  # 7 failed; beside o1, 8 still does not fit
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(first, DEADLINE)
        new = asyncio.ensure_future(stream(rig.intake, [batch(7), batch(8), batch(9)]))
        await rig.progress.tracked(7, nth=2)
        rig.start_flushing()
        _, new_outcomes = await asyncio.wait_for(asyncio.gather(old8, new), DEADLINE)
        assert (await asyncio.wait_for(o1, DEADLINE)).verdict is Verdict.STORED
        acked = acknowledged([7, 8, 9], new_outcomes)
        resent = await resend_in_order(rig, batch, set(points) - acked)
        await rig.stop_flushing()
        assert_stored_once_in_order(rig, points, resent)

    run_with_rig(store, test)


def test_a_stream_closed_while_its_batch_waits_for_its_turn_settles_it_and_refuses_the_later_ones(
        store: Store, make_batch: Any) -> None:
    """5 waits for room, 6 and 7 (on other streams) wait behind it. 6's stream closes: 6 is settled as
    before (not in flight, its copy told to resend, its writer blocked at 6); 5 goes on and is stored;
    7 is refused when its turn comes instead of waiting for ever; the resent 6 and 7 are stored."""

    async def test(rig: Rig) -> None:
        points = {4: 100, 5: 150, 6: 100, 7: 100}
        batch = rig.batches(points, make_batch)
        four = asyncio.ensure_future(await rig.intake.accept(batch(4)))
        five = asyncio.ensure_future(stream(rig.intake, [batch(5)]))  # 4,128 + 6,128: waits for room
        await rig.progress.tracked(5)
        six = asyncio.ensure_future(rig.intake.accept(batch(6)))
        await rig.progress.tracked(6)
        copy = asyncio.ensure_future(await rig.intake.accept(batch(6)))  # a copy in flight
        seven = asyncio.ensure_future(stream(rig.intake, [batch(7)]))
        await rig.progress.tracked(7)
        assert len(rig.buffer) == 1, "a batch went past 5, which waits for room"
        six.cancel()  # its stream closed
        with pytest.raises(asyncio.CancelledError):
            await six
        with pytest.raises(Unavailable, match="stream closed"):
            await asyncio.wait_for(copy, DEADLINE)
        assert rig.progress.is_blocked(W, 7) and not rig.progress.is_blocked(W, 6)
        rig.start_flushing()
        [stored] = await asyncio.wait_for(five, DEADLINE)
        assert isinstance(stored, Outcome) and stored.verdict is Verdict.STORED
        [refused] = await asyncio.wait_for(seven, DEADLINE)
        assert isinstance(refused, Unavailable) and "resend from seq 6" in str(refused)
        assert (await asyncio.wait_for(four, DEADLINE)).verdict is Verdict.STORED
        resent = await resend_in_order(rig, batch, [6, 7])
        await rig.stop_flushing()
        assert_stored_once_in_order(rig, points, resent)
        assert not rig.progress._lines, "a writer's line outlived its last batch"

    run_with_rig(store, test)


def test_a_stream_closed_while_its_batch_waits_for_room_lets_the_next_of_its_writer_be_refused(
        store: Store, make_batch: Any) -> None:
    """5 waits for room, first in its writer's line, and 6 (another stream) waits behind it. 5's
    stream closes: 6 gets its turn and is refused at once (its writer is blocked at 5); both resent,
    both are stored in order."""

    async def test(rig: Rig) -> None:
        points = {4: 100, 5: 150, 6: 100}
        batch = rig.batches(points, make_batch)
        four = asyncio.ensure_future(await rig.intake.accept(batch(4)))
        five = asyncio.ensure_future(rig.intake.accept(batch(5)))
        await rig.progress.tracked(5)
        six = asyncio.ensure_future(stream(rig.intake, [batch(6)]))
        await rig.progress.tracked(6)
        five.cancel()
        with pytest.raises(asyncio.CancelledError):
            await five
        [refused] = await asyncio.wait_for(six, DEADLINE)  # no flush needed: it does not wait for room
        assert isinstance(refused, Unavailable) and "resend from seq 5" in str(refused)
        assert len(rig.buffer) == 1
        rig.start_flushing()
        assert (await asyncio.wait_for(four, DEADLINE)).verdict is Verdict.STORED
        resent = await resend_in_order(rig, batch, [5, 6])
        await rig.stop_flushing()
        assert_stored_once_in_order(rig, points, resent)
        assert not rig.progress._lines

    run_with_rig(store, test)
