"""What a ``Batcher.take`` hands the sender: the rows it removed as ``Rows`` (their values packed
into doubles here, off the hot path: a log call keeps its values as the Python numbers they
are), the vectorized chunks as ``Columns``, both in a ``Taken``; ``wire.encode`` serializes it."""

from __future__ import annotations

import functools
import logging
import math
import operator
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import starmap
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.proto.points import Columns

logger = logging.getLogger(__name__)

RunKeys = tuple[int, "array[int]"]  # run slot, key block
Row = tuple[int, int, int, tuple[float, ...]]  # key set id, step, timestamp, values (floats, ints, bools)
Chunk = tuple[int, int, "npt.NDArray[np.int64]", "npt.NDArray[np.int64] | int", "npt.NDArray[np.float64]"]
# run, key, steps, timestamp(s), values
_SET, _STEP, _STAMP, _VALUES = (operator.itemgetter(i) for i in range(4))


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

    sets: tuple[RunKeys, ...]
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

    def _sets_of(self, start: int, stop: int) -> tuple[tuple[RunKeys, ...], npt.NDArray[np.uint32] | None]:
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



def gather(rows: list[Row], sets: list[RunKeys]) -> Rows:
    """The rows as columns, a C-level pass per field (``zip(*rows)`` makes an iterator per row:
    3x slower on rows gone cold, docs/benchmarks.md). ``sets`` is read after the rows were removed: a key set is
    interned before its first row, so one key set in the process means one here."""
    n = len(rows)
    steps, stamps = (np.fromiter(map(field, rows), np.int64, n) for field in (_STEP, _STAMP))
    values = list(map(_VALUES, rows))
    if len(sets) == 1:
        packed = _packed(values, len(sets[0][1]))
        return Rows((sets[0],), None, steps, stamps, packed, len(packed))
    ids = np.fromiter(map(_SET, rows), np.int64, n)
    if ids.min() == ids.max():
        only = sets[int(ids[0])]
        packed = _packed(values, len(only[1]))
        return Rows((only,), None, steps, stamps, packed, len(packed))
    used, row_sets = np.unique(ids, return_inverse=True)
    packed = _packed(values, 0)
    return Rows(tuple(sets[int(i)] for i in used), row_sets.astype(np.uint32), steps, stamps, packed, len(packed))


def _packed(values: list[tuple[Any, ...]], width: int) -> npt.NDArray[np.float64]:
    """The rows' values as one float64 array: a ``struct`` pack per row in C (``starmap`` when every
    row has ``width`` values, 0: widths differ), ~10 ns a value."""
    try:
        if width:
            return np.frombuffer(b"".join(starmap(row_packer(width), values)), np.float64)
        return np.frombuffer(b"".join([row_packer(len(row))(*row) for row in values]), np.float64)
    except (TypeError, ValueError, OverflowError, struct.error):
        return np.frombuffer(b"".join(map(_packed_row, values)), np.float64)


def _packed_row(values: tuple[Any, ...]) -> bytes:
    """One row's values, each ``float()``-ed; one that cannot be is NaN, and logged. The call keeps a
    value only when adding it to a float gave a float: Python's numbers, or a class of the
    user's that says so (``__radd__``) without ``__float__``, the only way here."""
    out = array("d")
    for value in values:
        try:
            out.append(float(value))
        except (TypeError, ValueError, OverflowError) as exc:
            logger.error("trackhouse: a metric value of type %s could not be converted to float (%s); "
                         "stored as NaN: log float(value)", type(value).__name__, exc)
            out.append(math.nan)
    return out.tobytes()


def columns(chunks: list[Chunk]) -> Columns:
    parts = []
    for run_, key, steps_, ts, vals in chunks:
        n = len(vals)
        stamps = np.full(n, ts, np.int64) if isinstance(ts, int) else ts
        parts.append(Columns(np.full(n, run_, np.uint32), np.full(n, key, np.uint32), steps_, stamps, vals))
    return Columns.concat(parts)
