"""Exactly-once in effect: which (writer_id, seq) batches are stored or in flight.

A client numbers its batches 1, 2, 3… and resends unacknowledged ones in order,
so per writer the stored batches form a prefix: one high-water mark (`committed`)
says what is durable. It is loaded from the store the first time a writer is
seen (the writer_progress table, kept by a materialized view over metrics), so
dedupe survives restarts and holds across ingest replicas.

A mark cached here goes stale when the client moves to another replica and
back (the other replica stored more of the writer meanwhile). So the first
batch of a writer on each new stream (and every unary write) is admitted with
`refresh=True`: the mark is reloaded from the store before a batch above it is
taken as new. Within one stream the client cannot have gone elsewhere, so the
hot path makes no store call. What is not covered: a replica that is still
alive and still holds the batch in flight when the client gives up on it and
resends elsewhere (docs/deploy.md, "Exactly once across replicas").

A batch that is buffered but not yet flushed is "in flight": a copy of it that
arrives meanwhile (a retry on a new stream) waits for the original's outcome
instead of being stored twice.

The prefix must stay a prefix, or a restart (which knows only the mark) would
take a resent batch below the mark for a duplicate and lose it. So when a batch
fails to store, its writer is blocked at that seq: later batches of the writer
are refused (Unavailable, "resend from seq N") at admission, and the flusher drops
those already buffered, until the failed batch itself is resent (the buffer keeps
arrival order and flushes take its oldest batches first, so it lands first). Clients resend
unacknowledged batches in order, so the failed one comes first.

Order into the buffer. A batch admitted as new waits for room in the buffer, and one
that fits does not wait; so batches of one writer on two streams (an old one the
client gave up on, and the new one it resends on) could overtake each other. Hence
each writer has a line (`Turn`s, in admission order) of its batches admitted as new
and not yet buffered: a batch enters the buffer only after every batch of its writer
admitted before it was buffered or abandoned (`wait_turn`). And a batch in the line
notes the lowest seq of its writer that failed since it was admitted (`failed` marks
the line): at or below its own seq, it is refused when its turn comes or when it gets
room (`check_turn`), even if a resend lifted the block meanwhile, since the resend was
admitted after it and so is behind it in the line. A line lives only while it holds a
batch (at most one per stream or unary call of the writer in accept); every batch in
it is in flight, so its writer's mark is held meanwhile.

Memory: every client process is a new writer, so the marks are an LRU cache of at most
`max_writers` (MAX_CACHED_WRITERS unless the settings say otherwise). A mark let go is
loaded again on the writer's next batch, as a `refresh` would: the store has every batch
stored here (an ack means the INSERT returned), so the reloaded mark is never below the
cached one. What the store does not have is never let go: a writer with batches in flight
or a mark being loaded (a load that ended after a newer mark was let go would cache an
older one), a blocked writer, and a writer whose mark is held below a batch stored past
its failed one (`_ahead`: the store's mark would take that batch's predecessors for
duplicates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum

from trackhouse.ingest.errors import Unavailable
from trackhouse.ingest.lru import LRU

# Writers whose marks are cached (IngestSettings.max_cached_writers, the same default).
MAX_CACHED_WRITERS = 100_000


class Admission(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    IN_FLIGHT = "in_flight"


class Turn:
    """A batch admitted as new and not yet buffered: its place in its writer's line to the buffer."""

    __slots__ = ("failed_at", "left", "seq", "writer_id")

    def __init__(self, writer_id: str, seq: int) -> None:
        self.writer_id = writer_id
        self.seq = seq
        self.failed_at: int | None = None  # lowest seq of the writer that failed since admission
        self.left = asyncio.Event()  # set once buffered or abandoned: the next in the line may go


class WriterProgress:
    def __init__(self, load_committed: Callable[[str], Awaitable[int]],
                 max_writers: int = MAX_CACHED_WRITERS) -> None:
        self._load = load_committed
        self._committed: LRU[str, int] = LRU(max_writers, keep=self._held)
        self._in_flight: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._busy: dict[str, int] = {}  # writer -> its batches in flight + loads of its mark under way
        self._blocked: dict[str, int] = {}  # writer -> lowest seq that failed to store
        self._ahead: dict[str, int] = {}  # writer -> greatest seq stored past its failed batch
        self._lines: dict[str, list[Turn]] = {}  # writer -> its batches on their way to the buffer (never empty)

    def _held(self, writer_id: str) -> bool:
        """True while the writer's cached state is not all in the store: its mark must stay."""
        return writer_id in self._busy or writer_id in self._blocked or writer_id in self._ahead

    def _hold(self, writer_id: str) -> None:
        self._busy[writer_id] = self._busy.get(writer_id, 0) + 1

    def _release(self, writer_id: str) -> None:
        left = self._busy.pop(writer_id) - 1
        if left:
            self._busy[writer_id] = left

    async def _reload(self, writer_id: str) -> int:
        """Load the writer's mark from the store into the cache (it never goes down)."""
        self._hold(writer_id)  # a mark stored meanwhile must still be cached when the load returns
        try:
            value = await self._load(writer_id)
            # Another coroutine may have loaded and advanced it meanwhile.
            mark = max(value, self._committed.get(writer_id, 0))
            self._committed[writer_id] = mark
        finally:
            self._release(writer_id)
        return mark

    async def committed(self, writer_id: str) -> int:
        mark = self._committed.get(writer_id)
        if mark is None:
            mark = await self._reload(writer_id)
        return mark

    async def refresh(self, writer_id: str) -> int:
        """Reload the writer's mark from the store (it never goes down)."""
        return await self._reload(writer_id)

    async def admit(self, writer_id: str, seq: int, refresh: bool = False
                    ) -> tuple[Admission, asyncio.Future[None] | None]:
        """Raises Unavailable for a batch past its writer's failed one.

        `refresh`: the batch may follow writes made through another replica (first
        batch of the writer on a stream): reload a cached mark before trusting it.
        """
        known = writer_id in self._committed
        committed = await self.committed(writer_id)
        if seq > committed and refresh and known and (writer_id, seq) not in self._in_flight \
                and writer_id not in self._ahead:  # held below the store's mark: a reload would lose the resend
            committed = await self.refresh(writer_id)
        blocked_at = self._blocked.get(writer_id)
        if blocked_at is not None and blocked_at <= committed:  # stored since, through another replica
            del self._blocked[writer_id]
            blocked_at = None
        if seq <= committed:
            return Admission.DUPLICATE, None
        if blocked_at is not None and seq <= blocked_at:
            # The failed batch is resent: buffered in order again, later seqs may follow it.
            del self._blocked[writer_id]
        elif blocked_at is not None:
            raise _refusal(writer_id, blocked_at)
        original = self._in_flight.get((writer_id, seq))
        if original is not None:
            return Admission.IN_FLIGHT, original
        return Admission.NEW, None

    def track(self, writer_id: str, seq: int, done: asyncio.Future[None]) -> Turn:
        """The batch admitted as new is in flight; it joins the end of its writer's line to the buffer."""
        if (writer_id, seq) not in self._in_flight:
            self._hold(writer_id)
        self._in_flight[(writer_id, seq)] = done
        turn = Turn(writer_id, seq)
        self._lines.setdefault(writer_id, []).append(turn)
        return turn

    async def wait_turn(self, turn: Turn) -> None:
        """Wait until every batch of the writer admitted before this one is buffered or abandoned.

        Raises Unavailable when this one must not be buffered any more (`check_turn`). The batch
        first in the line waits only for room, which the flusher makes: the line cannot stall.
        """
        line = self._lines[turn.writer_id]  # never empty while `turn` is in it, so never replaced
        while (place := line.index(turn)) > 0:
            await line[place - 1].left.wait()  # an Event: a cancelled waiter cancels nothing shared
        self.check_turn(turn)

    def check_turn(self, turn: Turn) -> None:
        """Raise Unavailable when a batch of the writer at or before this one failed since its admission.

        Buffered now, it could be stored before that batch's resend and take the mark past it.
        """
        if turn.failed_at is not None and turn.failed_at <= turn.seq:
            raise _refusal(turn.writer_id, turn.failed_at)

    def leave(self, turn: Turn) -> None:
        """The batch is buffered or abandoned: the next one of its writer may go."""
        line = self._lines.get(turn.writer_id)
        if line is not None and turn in line:
            line.remove(turn)
            if not line:
                del self._lines[turn.writer_id]
        turn.left.set()

    def _settled(self, writer_id: str, seq: int) -> None:
        if self._in_flight.pop((writer_id, seq), None) is not None:
            self._release(writer_id)
        for turn in [t for t in self._lines.get(writer_id, ()) if t.seq == seq]:
            self.leave(turn)  # settled without being buffered (a caller that tracked it by hand)

    def is_blocked(self, writer_id: str, seq: int) -> bool:
        """True when an earlier batch of this writer failed and was not stored since."""
        return seq > self._blocked.get(writer_id, seq)

    def stored(self, writer_id: str, seq: int) -> None:
        self._settled(writer_id, seq)
        blocked_at = self._blocked.get(writer_id)
        if blocked_at == seq:
            del self._blocked[writer_id]
        elif blocked_at is not None and seq > blocked_at:
            # Stored past the failed batch (it should have been refused): a mark past the failed
            # batch would take its resend for a duplicate and lose it. The store's mark is past it
            # now, so this writer's mark must not be reloaded until it catches up (`_ahead`).
            self._ahead[writer_id] = max(self._ahead.get(writer_id, 0), seq)
            seq = blocked_at - 1
        mark = max(self._committed.get(writer_id, 0), seq)
        self._committed[writer_id] = mark
        ahead = self._ahead.get(writer_id)
        if ahead is not None and mark >= ahead:
            del self._ahead[writer_id]  # caught up with the store's mark: a reload is safe again

    def failed(self, writer_id: str, seq: int) -> None:
        # The writer's batches on their way to the buffer were admitted before this failure, so before
        # the failed batch's resend, which lifts the block: they must still not pass it (`check_turn`).
        for turn in self._lines.get(writer_id, ()):
            if turn.failed_at is None or seq < turn.failed_at:
                turn.failed_at = seq
        self._settled(writer_id, seq)
        self._blocked[writer_id] = min(self._blocked.get(writer_id, seq), seq)


def _refusal(writer_id: str, blocked_at: int) -> Unavailable:
    return Unavailable(f"writer {writer_id}: batch {blocked_at} failed to store; resend from seq {blocked_at} in order")
