"""The spool's record format: encoding a record, and reading a file of them back.

Every record is ``MAGIC kind:u8 length:u32 crc32:u32 payload`` (little-endian; the crc
covers kind and payload). ``scan`` checks every record; a damaged one is reported as a
``Corruption`` (file, offset, bytes skipped) and reading resumes at the next magic that
starts a valid record, so one bad sector costs one batch. Writing the records, and the
files that hold them, is ``spool.py``'s.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from trackhouse.client.errors import SpoolError
from trackhouse.proto.v1 import ingest_pb2

MAGIC = b"THR1"
_HEADER = struct.Struct("<4sBII")
HEADER_SIZE = _HEADER.size
_MAX_RECORD = 1 << 30


class Kind(IntEnum):
    BATCH = 1
    CREATE_RUN = 2
    LOG_PARAMS = 3
    SET_TAGS = 4
    UPDATE_RUN = 5


@dataclass(frozen=True)
class Record:
    kind: Kind
    payload: bytes
    offset: int


@dataclass(frozen=True)
class Corruption:
    """A damaged stretch of a spool file, skipped when reading."""

    path: str
    offset: int
    skipped: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.skipped} bytes at offset {self.offset} skipped ({self.reason})"


def _crc(kind: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes((kind,))))


def encode_record(kind: Kind, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, kind, len(payload), _crc(kind, payload)) + payload


def record_at(data: bytes | memoryview, pos: int) -> tuple[Record | None, str]:
    """The record whose header starts at ``pos``, or None and why it is not one."""
    if len(data) - pos < HEADER_SIZE:
        return None, "truncated header"
    magic, kind, length, crc = _HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return None, "bad magic"
    end = pos + HEADER_SIZE + length
    if kind not in Kind._value2member_map_ or length > _MAX_RECORD:
        return None, "bad header"
    if end > len(data):
        return None, "truncated record"
    payload = bytes(data[pos + HEADER_SIZE : end])
    if _crc(kind, payload) != crc:
        return None, "checksum mismatch"
    return Record(Kind(kind), payload, pos), ""


def scan(path: Path) -> Iterator[Record | Corruption]:
    """Every record of a spool file in order, and a ``Corruption`` for each damaged stretch."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpoolError(f"cannot read spool file {path}: {exc}") from exc
    pos = 0
    while pos < len(data):
        record, reason = record_at(data, pos)
        if record is not None:
            yield record
            pos += HEADER_SIZE + len(record.payload)
            continue
        nxt = pos + 1
        while (nxt := data.find(MAGIC, nxt)) >= 0 and record_at(data, nxt)[0] is None:
            nxt += 1
        end = nxt if nxt >= 0 else len(data)
        yield Corruption(str(path), pos, end - pos, reason)
        pos = end


def scan_ops(path: Path) -> Iterator[Record | Corruption]:
    """``scan`` of an operations file, where a record that is not its kind's request message (a
    whole record, checksum right, wrong content) is reported damaged too, not left to fail a sync."""
    pb = ingest_pb2
    types: dict[Kind, Any] = {Kind.CREATE_RUN: pb.CreateRunRequest, Kind.SET_TAGS: pb.SetTagsRequest,
                              Kind.LOG_PARAMS: pb.LogParamsRequest, Kind.UPDATE_RUN: pb.UpdateRunRequest}
    for item in scan(path):
        if isinstance(item, Record):
            try:
                types[item.kind].FromString(item.payload)
            except Exception:  # KeyError: a batch among the operations; protobuf's DecodeError
                item = Corruption(str(path), item.offset, HEADER_SIZE + len(item.payload),
                                  f"record of kind {item.kind.name} is not a run operation")
        yield item
