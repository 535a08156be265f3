"""The wire format of a metric batch: ``encode`` turns what the batcher took (``Taken``:
rows and columns) into a serialized ``MetricBatch`` holding only the runs and keys it
uses, without the generated class.

Every field is length-delimited (tag, varint length, bytes) except ``seq`` (tag,
varint), and the columns are ``bytes`` fields, so each column is copied once, straight
into the message. The bytes are those
``MetricBatch.SerializeToString()`` produces (fields in number order, defaults
omitted), which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.client.batcher import Taken
from trackhouse.proto.rules import MAX_BATCH_KEYS, MAX_BATCH_RUNS


def key_count(taken: Taken) -> int:
    """How many distinct keys a batch of ``taken`` would name."""
    rows = [np.frombuffer(block, np.uint32) for _, block in taken.rows.sets] if taken.rows is not None else []
    return _distinct(rows, None if taken.columns is None else taken.columns.key_index)


def run_count(taken: Taken) -> int:
    """How many distinct runs a batch of ``taken`` would name."""
    rows = [np.array([run for run, _ in taken.rows.sets], np.uint32)] if taken.rows is not None else []
    return _distinct(rows, None if taken.columns is None else taken.columns.run_index)


def _distinct(rows: list[npt.NDArray[np.uint32]], columns: npt.NDArray[np.uint32] | None) -> int:
    found = rows if columns is None else [*rows, columns]
    return len(np.unique(np.concatenate(found))) if found else 0


def fit_names(parts: list[Taken], max_keys: int = MAX_BATCH_KEYS, max_runs: int = MAX_BATCH_RUNS) -> list[Taken]:
    """``parts`` halved (by points) until none names more than ``max_keys`` keys or ``max_runs`` runs,
    the service's limits of a batch: many single-key calls, or calls of many runs, fit in one
    batch by points, and the service refuses it whole. A row has one run and at most ``max_keys``
    keys (a wider key set is refused at the call), so halving ends."""
    out: list[Taken] = []
    todo = list(reversed(parts))
    while todo:
        part = todo.pop()
        if len(part) > 1 and (key_count(part) > max_keys or run_count(part) > max_runs):
            todo.extend(reversed(part.split(max(1, len(part) // 2))))
        else:
            out.append(part)
    return out


def _compact(index: npt.NDArray[np.uint32], size: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint32]]:
    """(used table positions, index renumbered into them), in O(n) without sorting."""
    if not len(index):
        return np.zeros(0, np.intp), np.zeros(0, np.uint32)
    low = int(index.min())
    if low == int(index.max()):  # one run / one key: the common case, no table lookup
        return np.array([low], np.intp), np.zeros(len(index), np.uint32)
    used = np.flatnonzero(np.bincount(index, minlength=size))
    if int(used[-1]) - int(used[0]) + 1 == len(used):  # a contiguous range (one key set): no lookup table
        return used, index - index.dtype.type(used[0]) if used[0] else index
    lookup = np.zeros(size, np.uint32)
    lookup[used] = np.arange(len(used), dtype=np.uint32)
    return used, lookup[index]


def encode(taken: Taken, run_ids: Sequence[str], keys: Sequence[str], *, writer_id: str, seq: int) -> bytes:
    """``taken`` as one serialized ``MetricBatch``: its chunks in the column form, its rows in the
    row form (run index columns left empty when the batch has one run, ``row_sets`` when it
    has one key set)."""
    rows, cols = taken.rows, taken.columns
    sets = rows.sets if rows is not None else ()
    set_runs = np.array([run for run, _ in sets], np.uint32)
    set_keys = np.frombuffer(b"".join([block for _, block in sets]), np.uint32)
    runs_used, (run_index, set_runs) = _compact_all(cols.run_index if cols else None, set_runs, len(run_ids))
    keys_used, (key_index, set_keys) = _compact_all(cols.key_index if cols else None, set_keys, len(keys))
    parts: list[bytes | memoryview] = []
    _put(parts, b"\x0a", writer_id.encode())
    if seq:
        parts += (b"\x10", _varint(seq))
    for prefix, names, used in ((b"\x1a", run_ids, runs_used), (b"\x22", keys, keys_used)):
        for i in used:  # repeated: an element is written even when empty
            name = names[i].encode()
            parts += (prefix, _varint(len(name)), name)
    several_runs = len(runs_used) > 1
    if cols is not None:
        if several_runs:
            _put(parts, b"\x2a", _le(run_index, "<u4"))
        for tag, column, dtype in ((b"\x32", key_index, "<u4"), (b"\x3a", cols.steps, "<i8"),
                                   (b"\x42", cols.timestamps, "<i8"), (b"\x4a", cols.values, "<f8")):
            _put(parts, tag, _le(column, dtype))
    if rows is not None:
        if several_runs:
            _put(parts, b"\x52", _le(set_runs, "<u4"))
        _put(parts, b"\x5a", np.array([len(block) for _, block in sets], "<u4"))
        _put(parts, b"\x62", _le(set_keys, "<u4"))
        if rows.row_sets is not None:
            _put(parts, b"\x6a", _le(rows.row_sets, "<u4"))
        _put(parts, b"\x72", _le(rows.steps, "<i8"))
        _put(parts, b"\x7a", _le(rows.timestamps, "<i8"))
        _put(parts, b"\x82\x01", _le(rows.values, "<f8"))
    return b"".join(parts)


def _compact_all(column: npt.NDArray[np.uint32] | None, sets: npt.NDArray[np.uint32],
                 size: int) -> tuple[npt.NDArray[np.intp], tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]]:
    """``_compact`` over a column index and a key sets' index together: one numbering for both."""
    if column is None:
        used, index = _compact(sets, size)
        return used, (index[:0], index)
    if not len(sets):
        used, index = _compact(column, size)
        return used, (index, index[:0])
    used, index = _compact(np.concatenate([column, sets]), size)
    return used, (index[: len(column)], index[len(column) :])


def _put(parts: list[bytes | memoryview], tag: bytes, data: bytes | npt.NDArray[Any]) -> None:
    """One singular length-delimited field (proto3 omits it when empty)."""
    if len(data):
        view = data.data if isinstance(data, np.ndarray) else memoryview(data)
        parts += (tag, _varint(view.nbytes), view)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _le(column: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """The column as contiguous little-endian data (no copy when it already is: the join copies it)."""
    return np.ascontiguousarray(column, dtype)
