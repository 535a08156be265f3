"""Columnar metric buffers, the pure decision of when to send, and batch encoding.

``Batcher`` owns the process's not-yet-sent points. A log call appends one *row*
— (key set id, step, timestamp, values as native doubles packed by ``row_packer``),
the key set being a run and its key block, interned once by ``key_set`` — to the
shared list ``rows`` with one ``list.append`` and no lock: ``Run.log_metrics``
does it inline (one Python frame for the call, see ``run.py``),
``append_row`` is the same for other producers. Under the GIL a ``list.append`` is
atomic, only this module's consumer side removes rows, and it removes a prefix it
has copied (``rows[:n]``, then ``del rows[:n]``) while holding the lock, so a row
appended meanwhile by any thread stays for the next take. The call runs with caches
cold (after a training step), where cost follows the distinct code and data it
touches more than its operation count: no lock, no counters, one tuple (packing the
step and timestamp too, as int64, costs the cold call ~2 µs more: measured,
docs/benchmarks.md). Producers call ``first_row`` only when they made the list
non-empty (to arm the interval). Vectorized calls copy numpy chunks into an arena
under the lock. Runs and keys are interned once for the life of the process: a
``Run`` keeps the id and key block of the key sets it logs, so it never looks a key
up again.

``take`` removes the rows and chunks under the lock and gathers them off the hot
path, a C-level pass over the rows per field (they are cold by then, and each read
of one costs cache misses, so nothing else reads them: not even to count points
while every key set has one width): the rows stay rows (``Rows``: each row's step,
timestamp and values, its key set named once; they travel in the row form of
ingest.proto, a third of the bytes of a point per key), the chunks become
``Columns`` (numpy); ``wire.encode`` serializes both.

``is_due`` / ``due_at`` decide when to send from the buffer state and a clock
value only (no clock is read there), so they are tested with plain numbers.

Invariants: every row has ``len(block)`` values of its key set; ``rows`` is one list for
the life of the batcher (emptied in place after a fork); interned indices never change;
``appended`` (exact, computed under the lock) counts every value ever buffered:
taken or discarded (``_done``), in chunks, and in rows (counted incrementally: rows
are only ever added at the end). Wake-ups on a full buffer are estimates (the
producers' ``_fill``, a ``Run``'s row count): they only decide a wake-up, the sender
counts exactly and also wakes on the interval.
"""

from __future__ import annotations

import functools
import operator
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.client.errors import UsageError
from trackhouse.proto.points import Columns

_CLOSED = "the client is closed; create a new one with trackhouse.client.connect()"


@dataclass(frozen=True)
class BufferState:
    """What the decision needs: how many points wait, and since when (clock seconds)."""

    points: int
    oldest: float | None


_KeySet = tuple[int, "array[int]"]  # run slot, key block


@functools.lru_cache(maxsize=64)
def row_packer(width: int) -> Callable[..., bytes]:
    """``pack(*values)``: a row's ``width`` values as native doubles (``PyFloat_AsDouble``
    per value: what ``float()`` takes, strings refused, with ``struct.error``)."""
    return struct.Struct(f"{width}d").pack


@dataclass(frozen=True)
class Rows:
    """Rows taken from the buffer, as they travel: row i is of key set ``sets[row_sets[i]]``
    (``sets[0]`` when ``row_sets`` is None); ``values`` holds every row's values, a value per
    key of its set, row after row."""

    sets: tuple[_KeySet, ...]
    row_sets: npt.NDArray[np.uint32] | None
    steps: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]  # every row's values, row after row (native doubles)
    points: int

    def split(self, limit: int) -> list[Rows]:
        """Consecutive runs of whole rows of at most ``limit`` points (a wider row goes alone)."""
        if self.points <= limit:
            return [self]
        widths = np.array([len(block) for _, block in self.sets], np.int64)
        ends = np.cumsum(widths[self.row_sets] if self.row_sets is not None else np.full(len(self.steps), widths[0]))
        parts, start, done = [], 0, 0
        while start < len(ends):
            stop = max(start + 1, int(np.searchsorted(ends, done + limit, side="right")))
            sets, row_sets = self._sets_of(start, stop)
            parts.append(Rows(sets, row_sets, self.steps[start:stop], self.timestamps[start:stop],
                              self.values[done : int(ends[stop - 1])], int(ends[stop - 1]) - done))
            start, done = stop, int(ends[stop - 1])
        return parts

    def _sets_of(self, start: int, stop: int) -> tuple[tuple[_KeySet, ...], npt.NDArray[np.uint32] | None]:
        """The key sets rows ``start:stop`` use, and their rows' indices into them: a part names only
        its own runs and keys (the server checks every run a batch names)."""
        if self.row_sets is None:
            return self.sets, None
        part = self.row_sets[start:stop]
        used = np.unique(part)
        sets = tuple(self.sets[i] for i in used)
        return sets, None if len(used) == 1 else np.searchsorted(used, part).astype(np.uint32)


@dataclass(frozen=True)
class Taken:
    """What one ``take`` removed: rows, vectorized chunks as columns, or both."""

    rows: Rows | None
    columns: Columns | None

    def __len__(self) -> int:
        return (self.rows.points if self.rows is not None else 0) + (len(self.columns) if self.columns else 0)

    def split(self, limit: int) -> list[Taken]:
        """Parts of at most ``limit`` points (a row wider than that alone), rows first."""
        if len(self) <= limit:
            return [self]
        rows = self.rows.split(limit) if self.rows is not None else []
        cols = self.columns.split(limit) if self.columns is not None else []
        return [Taken(r, None) for r in rows] + [Taken(None, c) for c in cols]


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


_Chunk = tuple[int, int, "npt.NDArray[np.int64]", "npt.NDArray[np.int64] | int", "npt.NDArray[np.float64]"]
# run, key, steps, timestamp(s), values
_Row = tuple[int, int, int, bytes]  # key set id, step, timestamp, values
_SET, _STEP, _STAMP, _VALUES = (operator.itemgetter(i) for i in range(4))
_array = array
_ARENA_MIN = 1 << 20  # values; the arena of vectorized calls starts at 16 MiB (steps + values)
_ARENA_KEEP = 1 << 23  # arenas up to this many values are recycled, larger ones freed


class _Arena:
    """Preallocated step/value columns that vectorized calls copy into. Reused after each
    take, so a copy writes to memory already mapped instead of faulting in fresh pages
    (3-6x faster for large arrays)."""

    def __init__(self, capacity: int) -> None:
        self.steps = np.empty(capacity, np.int64)
        self.values = np.empty(capacity, np.float64)
        self.used = 0

    def put(self, steps: npt.NDArray[Any], values: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int64],
                                                                               npt.NDArray[np.float64]]:
        n, at = len(values), self.used
        dst_steps, dst_values = self.steps[at : at + n], self.values[at : at + n]
        np.copyto(dst_steps, steps, casting="same_kind")
        np.copyto(dst_values, values, casting="same_kind")
        self.used = at + n
        return dst_steps, dst_values


class Batcher:
    """The process-wide columnar buffer of one client. Thread-safe; the lock is never held across I/O."""

    def __init__(self, max_points: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_points = max_points
        self._clock = clock
        self._lock = threading.Lock()
        self.run_ids: list[str] = []
        self.keys: list[str] = []
        self._run_slots: dict[str, int] = {}
        self._key_slots: dict[str, int] = {}
        self._set_ids: dict[tuple[int, bytes], int] = {}
        self._sets: list[_KeySet] = []  # by key set id
        # The width of every key set interned so far when they all have one width (then every row
        # has it: a key set is interned before its first row), 0 once a second width came.
        self._width: int | None = None
        self.accepting = True
        self.rows: list[_Row] = []  # shared with producers (``Run``): they only ever append
        self._done = 0  # points taken or discarded so far
        self._arena: _Arena | None = None
        self._spare: _Arena | None = None  # recycled by the sender once it has encoded a take
        self._lent: _Arena | None = None
        self._reset()

    def _reset(self) -> None:
        """Counters of an empty buffer (lock held; rows are removed by the caller)."""
        self._counted_rows = self._counted_points = 0
        self._fill = 0
        self._chunks: list[_Chunk] = []
        self._chunk_points = 0
        self._oldest: float | None = None

    def _row_points(self, n: int) -> int:
        """Points in the first ``n`` rows (lock held): only rows added since the last call are counted."""
        if n > self._counted_rows:
            if self._width:  # no row to touch
                self._counted_points += (n - self._counted_rows) * self._width
            else:
                self._counted_points += sum([len(row[3]) for row in self.rows[self._counted_rows : n]]) >> 3
            self._counted_rows = n
        return self._counted_points

    @property
    def appended(self) -> int:
        """Points appended since the batcher was created (monotonic)."""
        with self._lock:
            return self._done + self._chunk_points + self._row_points(len(self.rows))

    def state(self) -> BufferState:
        with self._lock:
            points = self._chunk_points + self._row_points(len(self.rows))
            if points and self._oldest is None:  # a row's producer lost the race to record it
                self._oldest = self._clock()
            return BufferState(points, self._oldest if points else None)

    def intern_run(self, run_id: str) -> int:
        with self._lock:
            slot = self._run_slots.get(run_id)
            if slot is None:
                slot = self._run_slots[run_id] = len(self.run_ids)
                self.run_ids.append(run_id)
            return slot

    def intern_keys(self, keys: Iterable[str]) -> array[int]:
        """The interned indices of ``keys`` (already validated), as a block to append."""
        block: array[int] = array("I")
        with self._lock:
            for key in keys:
                slot = self._key_slots.get(key)
                if slot is None:
                    slot = self._key_slots[key] = len(self.keys)
                    self.keys.append(key)
                block.append(slot)
        return block

    def key_set(self, run: int, block: array[int]) -> int:
        """The id rows of this run and these keys carry (the same for the life of the batcher)."""
        with self._lock:
            found = self._set_ids.get((run, block.tobytes()))
            if found is None:  # the width first: a fork in between leaves the child a 0 (read the rows)
                self._width = len(block) if self._width in (None, len(block)) else 0
                found = len(self._sets)
                self._sets.append((run, block))
                self._set_ids[(run, block.tobytes())] = found
            return found

    def append_row(self, run: int, step: int, timestamp: int, block: array[int], values: Iterable[object]) -> bool:
        """Buffer one call's values (one per key of ``block``); True when the sender should be woken.

        Raises ``TypeError``/``ValueError`` (nothing appended) when a value is not a
        number: the caller then validates value by value to say which. Wake-ups happen
        when the row is the first of an empty buffer (to arm the interval) and when the
        buffer fills. No lock but interning's (see the module docstring); ``block`` is never mutated.
        """
        if not self.accepting:
            raise UsageError(_CLOSED)
        vals: array[float] = _array("d", values)  # type: ignore[arg-type]  # C loop; rejects non-numbers
        n = len(block)
        if not n:
            raise UsageError("a row needs at least one metric")
        if len(vals) != n:  # a mapping changed size under us: keep columns aligned
            raise ValueError("the metrics mapping changed while it was logged")
        row = (self.key_set(run, block), step, timestamp, vals.tobytes())
        rows = self.rows
        rows.append(row)
        fill = self._fill + n  # an estimate (racing producers may lose an update, a racing take may
        # leave a stale one): it only decides a wake-up, the sender counts exactly
        self._fill = fill
        return self.first_row(row) or fill >= self._max_points > fill - n

    def first_row(self, row: object) -> bool:
        """Called by a producer that appended ``row`` to ``rows`` and saw the list at one row:
        True (the sender should be woken to arm the interval) when ``row`` is still the first
        of the buffer; False when the sender took it meanwhile or another row came first."""
        try:
            if self.rows[0] is row:  # only one producer can see that
                self._oldest = self._clock()
                return True
        except IndexError:  # taken meanwhile: the sender has it
            pass
        return False

    def append_arrays(self, run: int, key: int, steps: npt.NDArray[Any], timestamps: npt.NDArray[np.int64] | int,
                      values: npt.NDArray[Any]) -> bool:
        """Buffer a vectorized series of one key: ``steps`` (integers) and ``values`` (numbers,
        validated by the caller) are copied into the arena, so the caller may reuse them."""
        n = len(values)
        with self._lock:
            if not self.accepting:
                raise UsageError(_CLOSED)
            arena = self._arena
            if arena is None or arena.used + n > len(arena.values):
                spare, self._spare = self._spare, None
                size = max(_ARENA_MIN, n, 2 * len(arena.values) if arena is not None else 0)
                arena = self._arena = spare if spare is not None and len(spare.values) >= size else _Arena(size)
            own_steps, own_values = arena.put(steps, values)
            self._chunks.append((run, key, own_steps, timestamps, own_values))
            before = self._chunk_points + self._row_points(len(self.rows))
            self._chunk_points += n
            if before == 0:
                self._oldest = self._clock()
                return True
            return before < self._max_points <= before + n

    def _remove(self) -> tuple[list[_Row], list[_Chunk], int]:
        """Every buffered row and chunk and their points, out of the buffer (lock held)."""
        n = len(self.rows)
        points = self._row_points(n) + self._chunk_points
        rows = self.rows[:n]
        del self.rows[:n]  # rows appended since len() stay
        chunks = self._chunks
        self._done += points
        self._reset()
        return rows, chunks, points

    def take(self) -> Taken | None:
        """Remove and return every buffered point, or None when empty."""
        with self._lock:
            rows, chunks, points = self._remove()
            if points == 0:
                return None
            if self._arena is not None and self._arena.used:
                self._lent, self._arena = self._arena, self._spare
                self._spare = None
        return Taken(_gather(rows, self._sets) if rows else None, _columns(chunks) if chunks else None)

    def recycle(self) -> None:
        """The columns of the last ``take`` are no longer used (encoded): reuse their memory."""
        with self._lock:
            lent, self._lent = self._lent, None
            if lent is not None and len(lent.values) <= _ARENA_KEEP:
                lent.used = 0
                if self._arena is None:
                    self._arena = lent
                else:
                    self._spare = lent

    def discard(self) -> int:
        """Drop every buffered point; returns how many."""
        with self._lock:
            return self._remove()[2]

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may be held) and no parent points
        (the row list is emptied in place: the child's ``Run``s hold it)."""
        self._lock = threading.Lock()
        self.rows.clear()
        self._reset()
        self._arena = self._spare = self._lent = None
        self._done = 0


def _gather(rows: list[_Row], sets: list[_KeySet]) -> Rows:
    """The rows as columns, a C-level pass per field (``zip(*rows)`` makes an iterator per row:
    3x slower on rows gone cold, docs/benchmarks.md). ``sets`` is read after the rows were removed: a key set is
    interned before its first row, so one key set in the process means one here."""
    n = len(rows)
    steps, stamps = (np.fromiter(map(field, rows), np.int64, n) for field in (_STEP, _STAMP))
    values = np.frombuffer(b"".join(map(_VALUES, rows)), np.float64)
    if len(sets) == 1:
        return Rows((sets[0],), None, steps, stamps, values, len(values))
    ids = np.fromiter(map(_SET, rows), np.int64, n)
    if ids.min() == ids.max():
        return Rows((sets[int(ids[0])],), None, steps, stamps, values, len(values))
    used, row_sets = np.unique(ids, return_inverse=True)
    return Rows(tuple(sets[int(i)] for i in used), row_sets.astype(np.uint32), steps, stamps, values, len(values))


def _columns(chunks: list[_Chunk]) -> Columns:
    parts = []
    for run_, key, steps_, ts, vals in chunks:
        n = len(vals)
        stamps = np.full(n, ts, np.int64) if isinstance(ts, int) else ts
        parts.append(Columns(np.full(n, run_, np.uint32), np.full(n, key, np.uint32), steps_, stamps, vals))
    return Columns.concat(parts)
