"""The read side: ``RunView`` and the paging loops of run search and metric history.

Pure functions over a ``Transport``: they build requests, follow
``next_page_token`` until it is empty, and convert answers. Byte columns are
decoded with ``numpy.frombuffer``; pyarrow is imported only by
``metric_history``, so training jobs never need it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trackhouse.client.errors import UsageError
from trackhouse.client.transport import Transport
from trackhouse.proto.v1 import common_pb2, query_pb2

_VIEW_TYPES = ("active_only", "deleted_only", "all")


@dataclass(frozen=True)
class RunView:
    """A run as the query service sees it. Times are ms since epoch; ``end_time`` is None while running."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    end_time: int | None
    lifecycle_stage: str
    user_id: str = ""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, run: common_pb2.Run) -> RunView:
        info = run.info
        return cls(
            run_id=info.run_id,
            experiment_id=info.experiment_id,
            name=info.run_name,
            status=common_pb2.RunStatus.Name(info.status),
            start_time=info.start_time,
            end_time=info.end_time or None,
            lifecycle_stage=common_pb2.LifecycleStage.Name(info.lifecycle_stage).lower(),
            user_id=info.user_id,
            params={p.key: p.value for p in run.params},
            tags={t.key: t.value for t in run.tags},
            metrics={m.key: m.value for m in run.metrics},
        )


def iter_runs(
    transport: Transport,
    *,
    experiment_ids: Sequence[str],
    filter: str,
    order_by: Sequence[str],
    max_results: int | None,
    page_size: int,
    run_view: str,
) -> Iterator[RunView]:
    """Runs matching ``filter``, page after page, at most ``max_results`` in total."""
    if page_size < 1:
        raise UsageError(f"page_size must be >= 1, got {page_size}")
    if max_results is not None and max_results < 0:
        raise UsageError(f"max_results must be >= 0 or None, got {max_results}")
    if run_view not in _VIEW_TYPES:
        raise UsageError(f"run_view must be one of {sorted(_VIEW_TYPES)}, got {run_view!r}")
    return _pages(transport, query_pb2.SearchRunsRequest(
        experiment_ids=list(experiment_ids), filter=filter, order_by=list(order_by),
        run_view_type=common_pb2.ViewType.Value(run_view.upper()),
    ), max_results, page_size)  # fmt: skip


def _pages(
    transport: Transport, request: query_pb2.SearchRunsRequest, max_results: int | None, page_size: int
) -> Iterator[RunView]:
    remaining = max_results
    while remaining is None or remaining > 0:
        request.max_results = page_size if remaining is None else min(page_size, remaining)
        response = transport.search_runs(request)
        for run in response.runs[: remaining if remaining is not None else None]:
            yield RunView.from_proto(run)
        if remaining is not None:
            remaining -= len(response.runs)
        if not response.next_page_token or not response.runs:
            return
        request.page_token = response.next_page_token


def history_arrays(
    transport: Transport, run_id: str, key: str, min_step: int | None, max_step: int | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(steps int64, timestamps int64, values float64) of one series, all pages joined."""
    request = query_pb2.GetMetricHistoryRequest(run_id=run_id, key=key)
    if min_step is not None:
        request.min_step = min_step
    if max_step is not None:
        request.max_step = max_step
    steps, times, values = [], [], []
    while True:
        page = transport.get_metric_history(request)
        steps.append(np.frombuffer(page.steps, dtype="<i8"))
        times.append(np.frombuffer(page.timestamps, dtype="<i8"))
        values.append(np.frombuffer(page.values, dtype="<f8"))
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    return np.concatenate(steps), np.concatenate(times), np.concatenate(values)


def history_table(steps: np.ndarray[Any, Any], timestamps: np.ndarray[Any, Any], values: np.ndarray[Any, Any]) -> Any:
    """A ``pyarrow.Table`` (step int64, timestamp int64, value float64)."""
    try:
        import pyarrow as pa
    except ImportError:  # the light client does not depend on pyarrow
        raise UsageError("metric_history needs pyarrow: pip install pyarrow") from None
    schema = pa.schema([("step", pa.int64()), ("timestamp", pa.int64()), ("value", pa.float64())])
    return pa.Table.from_arrays(
        [
            pa.array(steps.astype(np.int64)),
            pa.array(timestamps.astype(np.int64)),
            pa.array(values.astype(np.float64)),
        ],
        schema=schema,
    )


def sql_table(chunks: Iterator[query_pb2.SqlChunk]) -> Any:
    """The ``pyarrow.Table`` of one SQL answer: the chunks joined into one Arrow IPC stream."""
    try:
        import pyarrow as pa
    except ImportError:  # the light client does not depend on pyarrow
        raise UsageError("sql needs pyarrow: pip install pyarrow") from None
    data = b"".join(chunk.arrow for chunk in chunks)
    return pa.ipc.open_stream(data).read_all()
