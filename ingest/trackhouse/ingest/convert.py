"""Validate a MetricBatch and decode it into numpy arrays — no per-point Python.

The service's rules of a batch: key names, writer id, seq, timestamp range and size
limits, checked here (names, timestamps and sizes by ``trackhouse.proto.rules``: the client
checks names and timestamps at the call, MemoryTransport applies them all); the wire-level rules of its
two forms (column widths and lengths, index bounds, key sets of rows) are
`trackhouse.proto.points`', shared with the client's MemoryTransport. Each violation raises
InvalidArgument naming the field and the limit. The column form decodes zero-copy
(`np.frombuffer` over the message's bytes), the row form by `np.repeat`; checks are vectorised.

A batch holds 1 to max_batch_points points and names at most max_batch_keys keys and
MAX_BATCH_RUNS run ids, each run id used by one of its points. A batch without points is
refused, never buffered: only a flush answers a buffered batch, and there is nothing to
flush, so its caller (and the acks behind it on a stream) would wait for ever.

`to_arrow` builds ONE Arrow table from many decoded batches (the flush), with
run ids, keys and writer ids dictionary-encoded, so a flush costs a few numpy
concatenations however many batches it merges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.ingest.errors import InvalidArgument
from trackhouse.ingest.settings import BYTES_PER_POINT, IngestSettings
from trackhouse.proto.rules import checked_columns, key_problem

MAX_WRITER_ID_LENGTH = 128

@dataclass(frozen=True)
class DecodedBatch:
    writer_id: str
    seq: int
    run_ids: tuple[str, ...]
    keys: tuple[str, ...]
    run_index: npt.NDArray[np.uint32]
    key_index: npt.NDArray[np.uint32]
    steps: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]

    @property
    def points(self) -> int:
        return len(self.steps)

    @property
    def nbytes(self) -> int:
        # The names are charged too; the rules keep them in proportion: every run id has a point,
        # keys are capped (max_batch_keys), and a batch has at least one point.
        return self.points * BYTES_PER_POINT + 64 * (len(self.keys) + len(self.run_ids))


def check_key(key: str, field: str) -> None:
    """Raise InvalidArgument unless `key` is a legal metric/param/tag name (``trackhouse.proto.rules``)."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidArgument(f"{field}: {problem}")


def _check_header(batch: Any) -> None:
    if not batch.writer_id or len(batch.writer_id) > MAX_WRITER_ID_LENGTH:
        raise InvalidArgument(f"writer_id: required, 1 to {MAX_WRITER_ID_LENGTH} characters")
    if batch.seq < 1:
        raise InvalidArgument("seq: must be >= 1 (sequence numbers start at 1 for each writer)")
    if not batch.run_ids:
        raise InvalidArgument("run_ids: at least one run id is required")


def decode_batch(batch: Any, settings: IngestSettings) -> DecodedBatch:
    """Validate a MetricBatch message and return its points as columns (the column form as
    numpy views, the row form expanded: ``trackhouse.proto.points``)."""
    _check_header(batch)
    try:  # keys, runs, size and timestamps by the rules shared with the client's MemoryTransport
        cols = checked_columns(batch, max_keys=settings.max_batch_keys, max_points=settings.max_batch_points)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    return DecodedBatch(
        writer_id=batch.writer_id, seq=batch.seq, run_ids=tuple(batch.run_ids), keys=tuple(batch.keys),
        run_index=cols.run_index, key_index=cols.key_index, steps=cols.steps, timestamps=cols.timestamps,
        values=cols.values,
    )


def _dictionary(pa: Any, parts: Sequence[tuple[npt.NDArray[Any], Sequence[str]]]) -> Any:
    """One dictionary-encoded string column from per-batch (indices, names) pairs.

    Names repeat across batches (the same key, run or writer); ClickHouse refuses an
    Arrow dictionary with duplicate values, so each batch's local names are mapped to
    one global, duplicate-free list (a loop over names, never over points).
    """
    ids: dict[str, int] = {}
    remapped = []
    for index, batch_names in parts:
        local = np.fromiter((ids.setdefault(name, len(ids)) for name in batch_names), dtype=np.int32,
                            count=len(batch_names))
        remapped.append(local[index] if len(index) else np.zeros(0, dtype=np.int32))
    indices = np.concatenate(remapped) if remapped else np.zeros(0, dtype=np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(indices), pa.array(list(ids), type=pa.string()))


def to_arrow(batches: Sequence[DecodedBatch]) -> Any:
    """Merge decoded batches into one Arrow table shaped like the metrics table."""
    import pyarrow as pa

    def cat(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(b, name) for b in batches])

    writers = [(np.zeros(b.points, dtype=np.int32), (b.writer_id,)) for b in batches]
    seqs = np.concatenate([np.full(b.points, b.seq, dtype=np.uint64) for b in batches])
    return pa.table({
        "run_id": _dictionary(pa, [(b.run_index, b.run_ids) for b in batches]),
        "key": _dictionary(pa, [(b.key_index, b.keys) for b in batches]),
        "step": cat("steps"),
        "timestamp": cat("timestamps"),
        "value": cat("values"),
        "writer_id": _dictionary(pa, writers),
        "seq": seqs,
    })
