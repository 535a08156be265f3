"""The outbox: every numbered batch not yet acknowledged, in seq order, in memory or on disk.

A plain data structure (the sender holds its lock around every call). It keeps
the accounting the sender decides on: bytes held in memory (against the memory
budget), bytes read back from disk and in flight (against the replay window),
the next seq to queue on the open stream, and which points a ``flush`` waits for.

Invariants: keys are seqs in increasing order (insertion order); an entry has
either ``batch`` (memory) or ``loc`` (spool); ``memory_bytes`` is the sum of
``nbytes`` of memory entries; ``window_bytes`` that of entries flagged ``in_window``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trackhouse.client.spool import Location


@dataclass
class Entry:
    seq: int
    points: int
    nbytes: int
    first_point: int  # position of its first point among all points taken, for flush()
    batch: bytes | None  # the serialized MetricBatch; None once spilled
    loc: Location | None = None
    in_window: bool = False  # read back from disk and queued on the open stream


class Outbox:
    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.memory_bytes = 0
        self.window_bytes = 0
        self.send_next = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry) -> None:
        self.entries[entry.seq] = entry
        self.memory_bytes += entry.nbytes

    def first_seq(self) -> int:
        return next(iter(self.entries), 0)

    def in_flight(self) -> bool:
        return bool(self.entries) and self.send_next > self.first_seq()

    def restart(self) -> None:
        """A new stream: resend from the oldest unacknowledged entry."""
        self.send_next, self.window_bytes = self.first_seq(), 0
        for entry in self.entries.values():
            entry.in_window = False

    def spilled(self, entry: Entry, loc: Location) -> bool:
        """``entry`` was written to ``loc``; False when it was acked meanwhile (release ``loc``)."""
        if entry.seq not in self.entries:
            return False
        entry.batch, entry.loc = None, loc
        self.memory_bytes -= entry.nbytes
        return True

    def acked(self, seq: int) -> Entry | None:
        entry = self.entries.pop(seq, None)
        if entry is not None:
            if entry.batch is not None:
                self.memory_bytes -= entry.nbytes
            if entry.in_window:
                self.window_bytes -= entry.nbytes
        return entry

    def queue_next(self, last_seq: int, put: Callable[[bytes], object], window: int) -> Entry | None:
        """Queue memory entries from ``send_next`` in order; stop at the first entry on disk and
        return it (to be read back) when the window has room, else None."""
        while self.send_next <= last_seq:
            entry = self.entries.get(self.send_next)
            if entry is not None and entry.batch is None:
                return entry if self.window_bytes < window else None
            if entry is not None and entry.batch is not None:
                put(entry.batch)
            self.send_next += 1
        return None

    def queued_from_disk(self, entry: Entry) -> None:
        entry.in_window = True
        self.window_bytes += entry.nbytes

    def in_memory(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.batch is not None]

    def points_on_disk(self) -> int:
        return sum(e.points for e in self.entries.values() if e.loc is not None)

    def answered_through(self, taken: int, target: int) -> bool:
        """Whether every point before position ``target`` has been answered."""
        if taken < target:
            return False
        return not self.entries or next(iter(self.entries.values())).first_point >= target
