"""The service's rules for names, timestamps and the size of a metric batch, in one place for both sides.

The ingest service enforces them (``ingest/convert.py``, ``ingest/catalog.py``) and refuses
a whole metric batch that breaks one, with every other run's points in it; so the client
checks them at the call (``Run``), and ``MemoryTransport`` applies them as the service does.

A batch holds 1 to ``max_points`` points, names at most ``max_keys`` keys and
``MAX_BATCH_RUNS`` run ids, and names no run that none of its points belongs to. The
service charges a buffered batch for its points and names, and only flushing frees the
charge, so a batch without points (nothing to flush: its ack would wait for ever) or with
names no point uses (a charge its points do not justify) is refused, not buffered. The
client never sends either: it sends a batch only when it has points, naming only their
runs and keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from trackhouse.proto.points import Columns, batch_columns, batch_points

# MLflow's rule for metric, param and tag names (used with fullmatch: `$` alone accepts a trailing newline).
KEY_PATTERN = re.compile(r"[/\w.\- :]+")
MAX_KEY_LENGTH = 250
# Timestamps are ms since the epoch: from 1970 to the year 3000.
MAX_TIMESTAMP_MS = 32_503_680_000_000
TIMESTAMP_RANGE = f"[0, {MAX_TIMESTAMP_MS}] (milliseconds since the epoch, up to year 3000)"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # steps, timestamps and every other integer on the wire
# The service's default limits of a metric batch (IngestSettings.max_batch_keys / max_batch_points).
MAX_BATCH_KEYS = 10_000
MAX_BATCH_POINTS = 1_000_000
# Run ids one metric batch may name (fixed; each one must be used by a point of the batch).
MAX_BATCH_RUNS = 10_000
# Params, tags and run names (MLflow's limits, but 5,000 for a run tag where MLflow 3 allows 8,000).
MAX_ITEMS_PER_CALL = 1000  # params or tags in one call
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 5000
MAX_EXPERIMENT_TAG_VALUE = 20_000
MAX_RUN_NAME = 250


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


def items_problem(items: Sequence[tuple[str, str]], field: str, max_value: int) -> str | None:
    """What makes ``items`` (params or tags of one call, as (key, value)) illegal, naming the field
    and the item: too many, an illegal key, a value over ``max_value`` characters; None when legal."""
    if len(items) > MAX_ITEMS_PER_CALL:
        return f"{field}: {len(items)} items in one call, limit {MAX_ITEMS_PER_CALL}"
    for i, (key, value) in enumerate(items):
        if (problem := key_problem(key)) is not None:
            return f"{field}[{i}].key: {problem}"
        if len(value) > max_value:
            return f"{field}[{i}].value: {len(value)} characters for {key!r}, limit {max_value}"
    return None


def timestamps_problem(low: int, high: int) -> str | None:
    """What is wrong with timestamps from ``low`` to ``high``; None when they are in range."""
    if low < 0 or high > MAX_TIMESTAMP_MS:
        return f"out of range {TIMESTAMP_RANGE}"
    return None


def checked_columns(batch: Any, *, max_keys: int = MAX_BATCH_KEYS, max_points: int = MAX_BATCH_POINTS) -> Columns:
    """A MetricBatch's points (``points.batch_columns``) once its keys, runs, size and timestamps keep
    these rules; ``ValueError`` naming the field otherwise (the service answers INVALID_ARGUMENT)."""
    if len(batch.keys) > max_keys:
        raise ValueError(f"keys: {len(batch.keys)} keys in one batch, limit {max_keys}")
    if len(batch.run_ids) > MAX_BATCH_RUNS:
        raise ValueError(f"run_ids: {len(batch.run_ids)} run ids in one batch, limit {MAX_BATCH_RUNS}")
    for i, key in enumerate(batch.keys):
        problem = key_problem(key)
        if problem is not None:
            raise ValueError(f"keys[{i}]: {problem}")
    n = batch_points(batch)
    if n > max_points:  # before the rows are expanded
        raise ValueError(f"steps and row_values: {n} points in one batch, limit {max_points}")
    cols = batch_columns(batch)
    if not len(cols):
        raise ValueError("steps and row_values: the batch has no points; a batch holds at least one "
                         "(send a batch only when there are points to store)")
    _check_runs_used(cols, batch.run_ids)
    problem = timestamps_problem(int(cols.timestamps.min()), int(cols.timestamps.max()))
    if problem is not None:
        raise ValueError(f"timestamps: {problem}")
    return cols


def _check_runs_used(cols: Columns, run_ids: Sequence[str]) -> None:
    """``ValueError`` naming the first run id that no point belongs to (the one run of a batch with
    points is used: no pass over the points then)."""
    if len(run_ids) < 2:
        return
    unused = np.flatnonzero(np.bincount(cols.run_index, minlength=len(run_ids)) == 0)
    if len(unused):
        i = int(unused[0])
        raise ValueError(f"run_ids[{i}]: {run_ids[i]!r} has no point in the batch "
                         f"({len(unused)} of its {len(run_ids)} run ids have none); name only the runs of its points")
