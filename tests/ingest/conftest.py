"""Shared helpers of the ingest tests: building MetricBatch messages and opening raw stubs."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest

from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

BatchFactory = Callable[..., Any]


def _build_batch(
    writer_id: str = "w",
    seq: int = 1,
    run_ids: Sequence[str] = ("r1",),
    keys: Sequence[str] = ("loss",),
    *,
    key_index: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    timestamps: Sequence[int] | None = None,
    values: Sequence[float] | None = None,
    run_index: Sequence[int] | None = None,
    points: int = 4,
) -> Any:
    """A well-formed MetricBatch unless told otherwise; columns default to `points` points of key 0."""
    n = len(steps) if steps is not None else points
    return ingest_pb2.MetricBatch(
        writer_id=writer_id, seq=seq, run_ids=list(run_ids), keys=list(keys),
        key_index=np.asarray(key_index if key_index is not None else [0] * n, "<u4").tobytes(),
        run_index=b"" if run_index is None else np.asarray(run_index, "<u4").tobytes(),
        steps=np.asarray(steps if steps is not None else range(n), "<i8").tobytes(),
        timestamps=np.asarray(timestamps if timestamps is not None else [1_000] * n, "<i8").tobytes(),
        values=np.asarray(values if values is not None else np.linspace(0, 1, n), "<f8").tobytes(),
    )


@pytest.fixture
def make_batch() -> BatchFactory:
    return _build_batch


@pytest.fixture
def channel(server: Any) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(server.address)
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture
def ingest(channel: grpc.Channel) -> Any:
    return ingest_pb2_grpc.IngestServiceStub(channel)


@pytest.fixture
def run_id(ingest: Any) -> str:
    """A fresh run in the default experiment."""
    run = ingest.CreateRun(ingest_pb2.CreateRunRequest(
        run_name="r", params=[common_pb2.Param(key="lr", value="0.1")]))
    return str(run.run_id)


class Stream:
    """One StreamMetrics call whose requests a test sends one at a time (``timeout``: the call's
    deadline, so a missing answer fails the test instead of hanging it)."""

    def __init__(self, stub: Any, timeout: float = 30.0) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call = stub.StreamMetrics(iter(self._requests.get, None), timeout=timeout)

    def send(self, batch: Any) -> None:
        self._requests.put(batch)

    def ack(self) -> Any:
        return next(self._call)

    def close(self) -> list[Any]:
        """Half-close; return the acks still to come."""
        self._requests.put(None)
        return list(self._call)


@pytest.fixture
def open_stream() -> type[Stream]:
    """``Stream``, for a test to open one or more: ``open_stream(stub)``."""
    return Stream
