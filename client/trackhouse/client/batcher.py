"""Columnar metric buffers, the pure decision of when to send, and batch encoding.

``Batcher`` owns the process's not-yet-sent points as five ``array.array``
columns plus interning tables for run ids and keys. ``append`` is the hot path:
it holds the lock only to append, never across I/O. ``take`` hands at most
``limit`` points to the sender as a ``Pending`` chunk; the interning tables live
until the buffer is empty, so indices of the remaining points stay valid.

``is_due`` / ``due_at`` decide when to send from the buffer state and a clock
value only (no clock is read here), so they are tested with plain numbers.
``encode`` turns a chunk into a ``MetricBatch`` with one numpy conversion per
column.

Invariants: all five columns have the same length; every index in
``run_index`` / ``key_index`` is valid in the current tables.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from trackhouse.proto.v1 import ingest_pb2


@dataclass(frozen=True)
class BufferState:
    """What the decision needs: how many points wait, and since when (clock seconds)."""

    points: int
    oldest: float | None


@dataclass(frozen=True)
class Pending:
    """A chunk of points taken from the buffer, not yet numbered or encoded."""

    run_ids: list[str]
    keys: list[str]
    run_index: array[int]
    key_index: array[int]
    steps: array[int]
    timestamps: array[int]
    values: array[float]

    def __len__(self) -> int:
        return len(self.steps)


def is_due(state: BufferState, now: float, *, max_points: int, interval: float, forced: bool) -> bool:
    """Whether the sender should take points now: full, old enough, or asked to."""
    if state.points == 0:
        return False
    if forced or state.points >= max_points:
        return True
    return state.oldest is not None and now >= state.oldest + interval


def due_at(state: BufferState, *, interval: float) -> float | None:
    """Clock time at which the buffer becomes due by age, or None when it is empty."""
    if state.points == 0 or state.oldest is None:
        return None
    return state.oldest + interval


def encode(chunk: Pending, *, writer_id: str, seq: int) -> ingest_pb2.MetricBatch:
    """One ``MetricBatch``; ``run_index`` is left empty when the chunk holds one run."""
    run_index = b"" if len(chunk.run_ids) == 1 else np.asarray(chunk.run_index, "<u4").tobytes()
    return ingest_pb2.MetricBatch(
        writer_id=writer_id,
        seq=seq,
        run_ids=chunk.run_ids,
        keys=chunk.keys,
        run_index=run_index,
        key_index=np.asarray(chunk.key_index, "<u4").tobytes(),
        steps=np.asarray(chunk.steps, "<i8").tobytes(),
        timestamps=np.asarray(chunk.timestamps, "<i8").tobytes(),
        values=np.asarray(chunk.values, "<f8").tobytes(),
    )


class Batcher:
    """The process-wide columnar buffer of one client. Thread-safe."""

    def __init__(self, max_points: int) -> None:
        self._max_points = max_points
        self._lock = threading.Lock()
        self._appended = 0
        self._reset_columns()
        self._oldest: float | None = None

    def _reset_columns(self) -> None:
        self._run_ids: list[str] = []
        self._run_slots: dict[str, int] = {}
        self._keys: list[str] = []
        self._key_slots: dict[str, int] = {}
        self._run_index: array[int] = array("I")
        self._key_index: array[int] = array("I")
        self._steps: array[int] = array("q")
        self._timestamps: array[int] = array("q")
        self._values: array[float] = array("d")

    @property
    def appended(self) -> int:
        """Points appended since the batcher was created (monotonic)."""
        return self._appended

    def state(self) -> BufferState:
        with self._lock:
            return BufferState(len(self._steps), self._oldest)

    def append(self, run_id: str, step: int, timestamp: int, items: Iterable[tuple[str, float]], now: float) -> bool:
        """Buffer points of one run at one step; True when the sender should be woken.

        The caller has validated every value. Wake-ups happen when the buffer turns
        non-empty (to arm the interval) and when it reaches ``max_points``.
        """
        with self._lock:
            before = len(self._steps)
            slot = self._run_slots.get(run_id)
            if slot is None:
                slot = self._run_slots[run_id] = len(self._run_ids)
                self._run_ids.append(run_id)
            key_slots = self._key_slots
            for key, value in items:
                k = key_slots.get(key)
                if k is None:
                    k = key_slots[key] = len(self._keys)
                    self._keys.append(key)
                self._run_index.append(slot)
                self._key_index.append(k)
                self._steps.append(step)
                self._timestamps.append(timestamp)
                self._values.append(value)
            after = len(self._steps)
            self._appended += after - before
            if before == 0 and after > 0:
                self._oldest = now
                return True
            return before < self._max_points <= after

    def take(self, limit: int) -> Pending | None:
        """Remove and return up to ``limit`` of the oldest points, or None when empty."""
        with self._lock:
            n = len(self._steps)
            if n == 0:
                return None
            if n <= limit:
                chunk = Pending(
                    self._run_ids, self._keys, self._run_index, self._key_index,
                    self._steps, self._timestamps, self._values,
                )  # fmt: skip
                self._reset_columns()
                self._oldest = None
                return chunk
            chunk = Pending(
                list(self._run_ids), list(self._keys), self._run_index[:limit], self._key_index[:limit],
                self._steps[:limit], self._timestamps[:limit], self._values[:limit],
            )  # fmt: skip
            for column in (self._run_index, self._key_index, self._steps, self._timestamps, self._values):
                del column[:limit]
            return chunk

    def discard(self) -> int:
        """Drop every buffered point (after fork: they belong to the parent); returns how many."""
        with self._lock:
            n = len(self._steps)
            self._reset_columns()
            self._oldest = None
            return n
