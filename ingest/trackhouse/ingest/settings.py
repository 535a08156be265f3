"""Settings of the ingest service: one frozen value object, read from the environment once.

Every variable (all optional):

    TRACKHOUSE_INGEST_FLUSH_ROWS        rows buffered before a flush (default 250000)
    TRACKHOUSE_INGEST_FLUSH_INTERVAL    seconds the oldest buffered batch may wait (default 0.5)
    TRACKHOUSE_INGEST_BUFFER_BYTES      byte budget of the buffer; past it streams stop being
                                        read (gRPC flow control) until a flush frees room
                                        (default 67108864 = 64 MiB)
    TRACKHOUSE_INGEST_MAX_BATCH_POINTS  points in one MetricBatch (default 1000000)
    TRACKHOUSE_INGEST_MAX_BATCH_KEYS    distinct keys in one MetricBatch (default 10000)
    TRACKHOUSE_INGEST_MAX_MESSAGE_BYTES largest gRPC message accepted (default 67108864 = 64 MiB)
    TRACKHOUSE_INGEST_MAX_STREAMS_PER_CONNECTION  metric streams open at once on one client
                                        connection; one more is refused with RESOURCE_EXHAUSTED
                                        (default 64)
    TRACKHOUSE_INGEST_MAX_CACHED_WRITERS  client writers whose committed marks are kept in
                                        memory; the least recently used beyond it are reloaded
                                        from the store on their next batch (default 100000)
    TRACKHOUSE_INGEST_MAX_CACHED_RUNS   run records kept in memory to check metric batches;
                                        the least recently used beyond it are read from the
                                        store again on next use (default 200000)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

# Bytes one buffered point costs (indexes, step, ts, value, seq in the Arrow table); the buffer counts
# batches by it (convert.DecodedBatch.nbytes), so the budget check below must use the same figure.
BYTES_PER_POINT = 4 + 4 + 8 + 8 + 8 + 8


@dataclass(frozen=True)
class IngestSettings:
    flush_rows: int = 250_000
    flush_interval: float = 0.5
    buffer_bytes: int = 64 * 1024 * 1024
    max_batch_points: int = 1_000_000
    max_batch_keys: int = 10_000
    max_message_bytes: int = 64 * 1024 * 1024
    max_streams_per_connection: int = 64
    max_cached_writers: int = 100_000  # progress.MAX_CACHED_WRITERS
    max_cached_runs: int = 200_000  # catalog.MAX_CACHED_RUNS

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"ingest setting {f.name} must be > 0, got {getattr(self, f.name)!r}")
        # A full batch must fit in the buffer, or a legal batch could never be accepted.
        largest_batch = self.max_batch_points * BYTES_PER_POINT
        if largest_batch > self.buffer_bytes:
            raise ValueError(
                f"buffer_bytes ({self.buffer_bytes}) must hold one largest batch "
                f"(max_batch_points {self.max_batch_points} × {BYTES_PER_POINT} bytes = {largest_batch})"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> IngestSettings:
        env = os.environ if environ is None else environ
        values: dict[str, int | float] = {}
        for f in fields(cls):
            name = f"TRACKHOUSE_INGEST_{f.name.upper()}"
            if name in env:
                kind = float if f.type in ("float", float) else int
                try:
                    values[f.name] = kind(env[name])
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r} is not a valid {kind.__name__}") from None
        return cls(**values)  # type: ignore[arg-type]
