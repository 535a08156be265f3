"""The batch rules shared by the service and MemoryTransport: how many points, keys and run ids a batch
may hold, and that every run id it names has a point."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from trackhouse.proto.rules import MAX_BATCH_KEYS, MAX_BATCH_POINTS, MAX_BATCH_RUNS, checked_columns
from trackhouse.proto.v1 import ingest_pb2


def batch(run_ids: Sequence[str] = ("r1",), run_index: Sequence[int] = (), keys: Sequence[str] = ("loss",),
          points: int = 3, rows: dict[str, bytes] | None = None) -> Any:
    return ingest_pb2.MetricBatch(
        writer_id="w", seq=1, run_ids=list(run_ids), keys=list(keys),
        run_index=np.array(run_index, "<u4").tobytes(), key_index=bytes(4 * points),
        steps=np.arange(points, dtype="<i8").tobytes(), timestamps=np.full(points, 1_000, "<i8").tobytes(),
        values=np.zeros(points, "<f8").tobytes(), **(rows or {}))


def refused(message: Any, *fragments: str, **limits: int) -> None:
    with pytest.raises(ValueError) as info:
        checked_columns(message, **limits)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_the_limits_are_the_service_defaults() -> None:
    assert (MAX_BATCH_POINTS, MAX_BATCH_KEYS, MAX_BATCH_RUNS) == (1_000_000, 10_000, 10_000)


@pytest.mark.parametrize("message", [
    batch(points=0),
    batch(points=0, keys=()),
    batch(points=0, run_ids=["r1"] * 200),  # the names a buffered empty batch was charged for
    ingest_pb2.MetricBatch(writer_id="w", seq=1, run_ids=["r1"]),
])
def test_a_batch_without_points_is_refused(message: Any) -> None:
    refused(message, "steps and row_values", "no points")


def test_keys_are_capped() -> None:
    refused(batch(keys=["k"] * (MAX_BATCH_KEYS + 1)), "keys", f"limit {MAX_BATCH_KEYS}")
    refused(batch(keys=["a", "b", "c"]), "keys: 3 keys in one batch, limit 2", max_keys=2)


def test_run_ids_are_capped_before_anything_is_decoded() -> None:
    refused(batch(run_ids=[f"r{i}" for i in range(MAX_BATCH_RUNS + 1)], run_index=[0, 1, 2]),
            f"run_ids: {MAX_BATCH_RUNS + 1} run ids in one batch, limit {MAX_BATCH_RUNS}")
    refused(batch(run_ids=["r1"] * (MAX_BATCH_RUNS + 1), points=0), f"limit {MAX_BATCH_RUNS}")
    at_the_limit = batch(run_ids=[f"r{i}" for i in range(MAX_BATCH_RUNS)], run_index=range(MAX_BATCH_RUNS),
                         points=MAX_BATCH_RUNS)
    assert len(checked_columns(at_the_limit)) == MAX_BATCH_RUNS


def test_every_run_id_needs_a_point() -> None:
    refused(batch(run_ids=["a", "b", "c"], run_index=[2, 0, 2]), "run_ids[1]: 'b' has no point", "1 of its 3")
    refused(batch(run_ids=["a"] * 200, run_index=[0], points=1), "run_ids[1]", "199 of its 200")
    rows = dict(set_runs=np.array([1, 1], "<u4").tobytes(), set_widths=np.array([1, 1], "<u4").tobytes(),
                set_keys=bytes(8), row_sets=np.array([0, 1], "<u4").tobytes(),
                row_steps=bytes(16), row_timestamps=bytes(16), row_values=bytes(16))
    refused(batch(run_ids=["a", "b"], points=0, rows=rows), "run_ids[0]: 'a'")  # its key sets are all b's
    cols = checked_columns(batch(run_ids=["a", "b"], run_index=[1, 0, 1, 0], points=4))
    assert cols.run_index.tolist() == [1, 0, 1, 0]
