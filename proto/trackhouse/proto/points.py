"""What a ``MetricBatch`` (ingest.proto) holds, as five numpy columns of one length.

A batch carries points in two forms: columns (a value per point in every column) and
rows (one call's keys of one run at one step and timestamp: the step and timestamp
once, the keys as a key set). ``batch_columns`` checks both against the message's
rules and returns them as one set of columns, the column points then the rows'
points: numpy only, no Python per point, and the column form zero-copy over the
message's bytes. It is shared by the ingest service and by the client's
``MemoryTransport``; both add the limits and the rules of ``rules.py`` (names, timestamps).

Every violation raises ``ValueError`` naming the field and what is wrong; the
service answers it with INVALID_ARGUMENT. ``batch_points`` counts a batch's points
from the sizes of two fields alone, before anything is expanded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

_U32 = np.dtype("<u4")
_I64 = np.dtype("<i8")
_F64 = np.dtype("<f8")


_FIELDS = ("run_index", "key_index", "steps", "timestamps", "values")


@dataclass(frozen=True)
class Columns:
    """Points as numpy columns of one length (a batch's, decoded; the client's buffer's, taken)."""

    run_index: npt.NDArray[np.uint32]
    key_index: npt.NDArray[np.uint32]
    steps: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.values)

    def split(self, limit: int) -> list[Columns]:
        """Consecutive slices of at most ``limit`` points (views, no copy)."""
        return [Columns(*(getattr(self, f)[i : i + limit] for f in _FIELDS)) for i in range(0, len(self), limit)]

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        """``parts`` one after another (the part itself when there is one)."""
        if len(parts) == 1:
            return parts[0]
        return Columns(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


def batch_points(batch: Any) -> int:
    """The points ``batch`` claims in both forms (the sizes of ``steps`` and ``row_values``)."""
    return (len(batch.steps) + len(batch.row_values)) // 8


def _column(data: bytes, dtype: np.dtype[Any], field: str) -> npt.NDArray[Any]:
    """``data`` as a little-endian column (a view, no copy)."""
    if len(data) % dtype.itemsize:
        raise ValueError(
            f"{field}: {len(data)} bytes is not a multiple of {dtype.itemsize} "
            f"(each value is a little-endian {dtype.name})"
        )
    return np.frombuffer(data, dtype=dtype)


def _check_index(index: npt.NDArray[np.uint32], size: int, field: str, names: str) -> None:
    if len(index) and int(index.max()) >= size:
        raise ValueError(f"{field}: index {int(index.max())} out of range, {names} has {size} entries")


def _same_length(columns: dict[str, npt.NDArray[Any]], first: str) -> None:
    n = len(columns[first])
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"{name}: {len(col)} values, but {first} has {n}; all columns must have one length")


def _runs(data: bytes, n: int, runs: int, field: str) -> npt.NDArray[np.uint32]:
    """A run index column, which may be left empty when the batch names one run."""
    if data:
        return _column(data, _U32, field)
    if runs == 1:
        return np.zeros(n, dtype=np.uint32)
    raise ValueError(f"{field}: required when the batch has {runs} run_ids")


def _column_form(batch: Any) -> Columns:
    steps = _column(batch.steps, _I64, "steps")
    n, runs = len(steps), len(batch.run_ids)
    timestamps, values = _column(batch.timestamps, _I64, "timestamps"), _column(batch.values, _F64, "values")
    key_index = _column(batch.key_index, _U32, "key_index")
    run_index = _runs(batch.run_index, n, runs, "run_index") if n or batch.run_index else key_index[:0]
    _same_length({"steps": steps, "timestamps": timestamps, "values": values, "key_index": key_index,
                  "run_index": run_index}, "steps")
    _check_index(key_index, len(batch.keys), "key_index", "keys")
    _check_index(run_index, runs, "run_index", "run_ids")
    return Columns(run_index, key_index, steps, timestamps, values)


_ROW_FIELDS = ("set_runs", "set_widths", "set_keys", "row_sets", "row_timestamps", "row_values")


def _row_form(batch: Any) -> Columns | None:
    """The rows expanded into columns; None when the batch has none."""
    row_steps = _column(batch.row_steps, _I64, "row_steps")
    if not len(row_steps):
        for name in _ROW_FIELDS:
            if getattr(batch, name):
                raise ValueError(f"{name}: set, but the batch has no rows (row_steps is empty)")
        return None
    widths = _column(batch.set_widths, _U32, "set_widths").astype(np.int64)
    sets = len(widths)
    if not sets:
        raise ValueError("set_widths: rows need at least one key set")
    if sets > len(row_steps):
        raise ValueError(f"set_widths: {sets} key sets for {len(row_steps)} rows; name only the sets the rows use")
    if int(widths.min()) == 0:
        raise ValueError("set_widths: a key set of width 0; every key set has at least one key")
    set_keys = _column(batch.set_keys, _U32, "set_keys")
    if len(set_keys) != int(widths.sum()):
        raise ValueError(f"set_keys: {len(set_keys)} keys, but set_widths adds up to {int(widths.sum())}")
    _check_index(set_keys, len(batch.keys), "set_keys", "keys")
    set_runs = _runs(batch.set_runs, sets, len(batch.run_ids), "set_runs")
    row_sets = _column(batch.row_sets, _U32, "row_sets") if batch.row_sets else None
    if row_sets is None and sets > 1:
        raise ValueError(f"row_sets: required when there are {sets} key sets")
    rows = {"row_steps": row_steps, "row_timestamps": _column(batch.row_timestamps, _I64, "row_timestamps")}
    if row_sets is not None:
        rows["row_sets"] = row_sets
    _same_length(rows, "row_steps")
    _same_length({"set_widths": widths, "set_runs": set_runs}, "set_widths")
    _check_index(set_runs, len(batch.run_ids), "set_runs", "run_ids")
    if row_sets is not None:
        _check_index(row_sets, sets, "row_sets", "set_widths")
    values = _column(batch.row_values, _F64, "row_values")
    row_widths = widths[row_sets] if row_sets is not None else np.full(len(row_steps), widths[0])
    total = int(row_widths.sum())
    if len(values) != total:
        raise ValueError(f"row_values: {len(values)} values, but the rows' key sets have {total} keys")
    if row_sets is None:  # one key set: a grid of rows x keys
        key_index = np.tile(set_keys, len(row_steps))
        run_index = np.full(total, set_runs[0], dtype=np.uint32)
    else:  # a point's key: its set's first key in set_keys, plus its place in the row
        set_starts = np.cumsum(widths) - widths
        row_starts = np.cumsum(row_widths) - row_widths
        key_index = set_keys[np.arange(total) + np.repeat(set_starts[row_sets] - row_starts, row_widths)]
        run_index = np.repeat(set_runs[row_sets], row_widths)
    return Columns(run_index, key_index, np.repeat(row_steps, row_widths),
                        np.repeat(rows["row_timestamps"], row_widths), values)


def batch_columns(batch: Any) -> Columns:
    """Both forms of ``batch`` checked and joined: the column points, then the rows' points."""
    cols, rows = _column_form(batch), _row_form(batch)
    if rows is None:
        return cols
    return Columns.concat([cols, rows] if len(cols) else [rows])
