"""The service's rules for names and timestamps, in one place for both sides.

The ingest service enforces them (``ingest/convert.py``, ``ingest/catalog.py``) and refuses
a whole metric batch that breaks one, with every other run's points in it; so the client
checks them at the call (``Run``), and ``MemoryTransport`` applies them as the service does.
"""

from __future__ import annotations

import re
from typing import Any

from trackhouse.proto.points import Columns, batch_columns, batch_points

# MLflow's rule for metric, param and tag names (used with fullmatch: `$` alone accepts a trailing newline).
KEY_PATTERN = re.compile(r"[/\w.\- :]+")
MAX_KEY_LENGTH = 250
# Timestamps are ms since the epoch: from 1970 to the year 3000.
MAX_TIMESTAMP_MS = 32_503_680_000_000
TIMESTAMP_RANGE = f"[0, {MAX_TIMESTAMP_MS}] (milliseconds since the epoch, up to year 3000)"
# The service's default limits of a metric batch (IngestSettings.max_batch_keys / max_batch_points).
MAX_BATCH_KEYS = 10_000
MAX_BATCH_POINTS = 1_000_000


def key_problem(key: str) -> str | None:
    """What makes ``key`` an illegal metric, param or tag name; None when it is legal."""
    if not key:
        return "empty name"
    if len(key) > MAX_KEY_LENGTH:
        return f"name {key[:40]!r}… is {len(key)} characters, limit {MAX_KEY_LENGTH}"
    if not KEY_PATTERN.fullmatch(key):
        return (f"invalid name {key!r}; names may contain only alphanumerics, "
                "underscores (_), dashes (-), periods (.), spaces ( ), colons (:) and slashes (/)")
    return None


def timestamps_problem(low: int, high: int) -> str | None:
    """What is wrong with timestamps from ``low`` to ``high``; None when they are in range."""
    if low < 0 or high > MAX_TIMESTAMP_MS:
        return f"out of range {TIMESTAMP_RANGE}"
    return None


def checked_columns(batch: Any, *, max_keys: int = MAX_BATCH_KEYS, max_points: int = MAX_BATCH_POINTS) -> Columns:
    """A MetricBatch's points (``points.batch_columns``) once its keys, size and timestamps keep these
    rules; ``ValueError`` naming the field otherwise (the service answers INVALID_ARGUMENT)."""
    if len(batch.keys) > max_keys:
        raise ValueError(f"keys: {len(batch.keys)} keys in one batch, limit {max_keys}")
    for i, key in enumerate(batch.keys):
        problem = key_problem(key)
        if problem is not None:
            raise ValueError(f"keys[{i}]: {problem}")
    n = batch_points(batch)
    if n > max_points:  # before the rows are expanded
        raise ValueError(f"steps and row_values: {n} points in one batch, limit {max_points}")
    cols = batch_columns(batch)
    problem = timestamps_problem(int(cols.timestamps.min()), int(cols.timestamps.max())) if len(cols) else None
    if problem is not None:
        raise ValueError(f"timestamps: {problem}")
    return cols
