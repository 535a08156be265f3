"""Encodings of a SQL answer: Arrow IPC stream chunks (gRPC, HTTP), JSON and CSV (HTTP).

Pure functions and one small writer over pyarrow; no I/O beyond memory buffers.

JSON and CSV hold any column ClickHouse answers with:
- Int128/UInt128/Int256/UInt256 arrive as little-endian fixed_size_binary(16/32) and
  are written as decimal strings ("-1"): exact, where a JSON number past 2**53 loses
  digits in most readers (ClickHouse's own JSON formats quote them too). The Arrow
  schema does not say which of these types a column is, so the bytes are read as
  signed: a UInt128/UInt256 of 2**127/2**255 or more, an IPv6 or a FixedString(16|32)
  reads as a (negative or large) integer too.
- Text that is not UTF-8 (a String holding bytes) gets U+FFFD for each bad byte.
- In CSV, a column pyarrow cannot write (arrays, maps, tuples, UUID, JSON, bytes) is
  written as text: nested values as compact JSON, others as their string form.
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


def _is_wide_int(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_binary(t) and t.byte_width in (16, 32)


def _children(t: pa.DataType) -> list[pa.Field]:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [t.value_field]
    if pa.types.is_map(t):
        return [t.key_field, t.item_field]
    if pa.types.is_struct(t):
        return [t.field(i) for i in range(t.num_fields)]
    return []


def _has_wide_int(t: pa.DataType) -> bool:
    return _is_wide_int(t) or any(_has_wide_int(f.type) for f in _children(t))


def _text_as_bytes(t: pa.DataType) -> pa.DataType:
    """`t` with every string type a binary one: to_pylist then yields bytes, never failing on bad UTF-8."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    fields = [f.with_type(_text_as_bytes(f.type)) for f in _children(t)]
    if pa.types.is_list(t):
        return pa.list_(fields[0])
    if pa.types.is_large_list(t):
        return pa.large_list(fields[0])
    if pa.types.is_fixed_size_list(t):
        return pa.list_(fields[0], t.list_size)
    if pa.types.is_map(t):
        return pa.map_(fields[0], fields[1], t.keys_sorted)
    if pa.types.is_struct(t):
        return pa.struct(fields)
    return t


def _plain(value: Any, t: pa.DataType) -> Any:
    """One value of type `t` (strings read as bytes) with wide integers and bytes decoded."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if _is_wide_int(t):
            return str(int.from_bytes(value, "little", signed=True))
        return value.decode("utf-8", "replace")
    if pa.types.is_map(t):
        return [(_plain(k, t.key_type), _plain(v, t.item_type)) for k, v in value]
    if pa.types.is_struct(t):
        return {f.name: _plain(value[f.name], f.type) for f in _children(t)}
    if isinstance(value, list):
        return [_plain(v, t.value_type) for v in value]
    return value


def _python(column: pa.ChunkedArray) -> list[Any]:
    """A column's values as Python objects JSON can hold (the fast path: pyarrow's own)."""
    if not _has_wide_int(column.type):
        try:
            values: list[Any] = column.to_pylist()
            return values
        except UnicodeDecodeError:  # a String holding bytes that are not UTF-8
            pass
    return [_plain(v, column.type) for v in column.cast(_text_as_bytes(column.type)).to_pylist()]


def json_body(table: pa.Table) -> bytes:
    """{"columns": [{"name", "type"}], "rows": [[...], ...]}; NaN and ±Inf become null."""
    columns = [{"name": f.name, "type": str(f.type)} for f in table.schema]
    data = [_python(c) for c in table.columns]
    rows = [list(r) for r in zip(*data, strict=True)] if data else []
    return orjson.dumps({"columns": columns, "rows": rows}, default=_default)


def _csv_writes(column: pa.ChunkedArray) -> bool:
    """Whether pyarrow's CSV writer takes `column` as it is."""
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            column.validate(full=True)  # checks the UTF-8
        except pa.ArrowInvalid:
            return False
        return True
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_decimal(t) or pa.types.is_temporal(t) or pa.types.is_null(t))


def _csv_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return orjson.dumps(value, default=_default).decode()
    return str(value)


def csv_body(table: pa.Table) -> bytes:
    """CSV with a header; a column the writer cannot take is written as text (module docstring)."""
    columns = [c if _csv_writes(c) else pa.array([_csv_text(v) for v in _python(c)], pa.string())
               for c in table.columns]
    sink = io.BytesIO()
    pacsv.write_csv(pa.Table.from_arrays(columns, names=table.column_names), sink)
    return sink.getvalue()
