"""Encodings of a SQL answer: Arrow IPC stream chunks (gRPC, HTTP), JSON and CSV (HTTP).

Pure functions and one small writer over pyarrow; no I/O beyond memory buffers.
"""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv

# Largest record batch per gRPC message (well under the 64 MiB message limits).
MAX_CHUNK_BYTES = 4 * 1024 * 1024


class IpcChunks:
    """One Arrow IPC stream written piece by piece: each call returns the bytes it added."""

    def __init__(self, schema: pa.Schema) -> None:
        self._sink = io.BytesIO()
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def take(self) -> bytes:
        data = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return data

    def write(self, batch: pa.RecordBatch) -> bytes:
        self._writer.write_batch(batch)
        return self.take()

    def close(self) -> bytes:
        self._writer.close()
        return self.take()


def pieces(batch: pa.RecordBatch, max_bytes: int = MAX_CHUNK_BYTES) -> list[pa.RecordBatch]:
    """`batch` cut into slices of about `max_bytes` each (one slice when it is small)."""
    n = batch.num_rows
    if n <= 1 or batch.nbytes <= max_bytes:
        return [batch]
    rows = max(1, n * max_bytes // batch.nbytes)
    return [batch.slice(start, rows) for start in range(0, n, rows)]


def arrow_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Decimal):
        return str(value)
    return str(value)


def json_body(table: pa.Table) -> bytes:
    """{"columns": [{"name", "type"}], "rows": [[...], ...]}; NaN and ±Inf become null."""
    columns = [{"name": f.name, "type": str(f.type)} for f in table.schema]
    data = [c.to_pylist() for c in table.columns]
    rows = [list(r) for r in zip(*data, strict=True)] if data else []
    return orjson.dumps({"columns": columns, "rows": rows}, default=_default)


def csv_body(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue()
