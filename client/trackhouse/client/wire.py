"""The wire format of a metric batch: ``encode`` turns ``Columns`` into a serialized
``MetricBatch`` holding only the runs and keys it uses, without the generated class.

Every field is length-delimited (tag, varint length, bytes) except ``seq`` (tag,
varint), and the columns are ``bytes`` fields, so each column is copied once, straight
into the message. The bytes are those ``MetricBatch.SerializeToString()`` produces
(fields in number order, defaults omitted), which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.client.batcher import Columns


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


def encode(cols: Columns, run_ids: Sequence[str], keys: Sequence[str], *, writer_id: str, seq: int) -> bytes:
    """``cols`` as one serialized ``MetricBatch`` (``run_index`` left empty when there is one run)."""
    runs_used, run_index = _compact(cols.run_index, len(run_ids))
    keys_used, key_index = _compact(cols.key_index, len(keys))
    parts: list[bytes | memoryview] = []
    _put(parts, 0x0A, writer_id.encode())
    if seq:
        parts += (b"\x10", _varint(seq))
    for prefix, names, used in ((b"\x1a", run_ids, runs_used), (b"\x22", keys, keys_used)):
        for i in used:  # repeated: an element is written even when empty
            name = names[i].encode()
            parts += (prefix, _varint(len(name)), name)
    if len(runs_used) > 1:
        _put(parts, 0x2A, _le(run_index, "<u4"))
    for tag, column, dtype in ((0x32, key_index, "<u4"), (0x3A, cols.steps, "<i8"),
                               (0x42, cols.timestamps, "<i8"), (0x4A, cols.values, "<f8")):
        _put(parts, tag, _le(column, dtype))
    return b"".join(parts)


def _put(parts: list[bytes | memoryview], tag: int, data: bytes | npt.NDArray[Any]) -> None:
    """One singular length-delimited field (proto3 omits it when empty)."""
    if len(data):
        view = data.data if isinstance(data, np.ndarray) else memoryview(data)
        parts += (bytes((tag,)), _varint(view.nbytes), view)


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
