"""``MemoryTransport``: a complete in-process ``Transport`` for users' own tests.

    client = th.Client(th.MemoryTransport())
    run = client.start_run(experiment="unit")
    run.log(step=0, loss=0.5)
    client.flush()
    client.transport.points(run.run_id, "loss")   # [(0, <ms>, 0.5)]

It keeps experiments, runs, params (write-once, as the server), tags and metric
points in memory and acknowledges metric batches with the server's contract:
a ``(writer_id, seq)`` at or below the writer's high-water mark is a DUPLICATE
and is not stored again, and a batch that breaks the service's rules (names,
timestamps, its default size limits) is REJECTED whole, as the service does.
Set ``available = False`` to act like a server that is down (every call raises
``ServerUnavailable``, open streams end), to test how code behaves offline.
Reads answer ``get_run``, unfiltered ``search_runs`` and ``get_metric_history``.
Thread-safe.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np

from trackhouse.client.errors import AlreadyExists, InvalidArgument, NotFound, ServerUnavailable, UsageError
from trackhouse.proto.points import batch_points
from trackhouse.proto.rules import checked_columns
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2

_Point = tuple[int, int, float]


class _MemoryAckStream:
    def __init__(self, owner: MemoryTransport, requests: Iterator[bytes]) -> None:
        self._owner = owner
        self._requests = requests
        self._cancelled = False

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]:
        for batch in self._requests:
            if self._cancelled:
                return
            yield self._owner._store(ingest_pb2.MetricBatch.FromString(batch))

    def cancel(self) -> None:
        self._cancelled = True

    def ended(self, timeout: float) -> bool:
        return True


class MemoryTransport:
    """Everything a trackhouse server does for the client, in memory (see the module docstring)."""

    url = "memory"

    def __init__(self) -> None:
        self.available = True
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.experiments: dict[str, common_pb2.Experiment] = {
            "0": common_pb2.Experiment(experiment_id="0", name="Default")
        }
        self.runs: dict[str, common_pb2.RunInfo] = {}
        self.params: dict[str, dict[str, str]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.metrics: dict[str, dict[str, list[_Point]]] = {}
        self.high_water: dict[str, int] = {}
        self.batches_stored = 0

    # -- helpers for tests -------------------------------------------------------------------

    def points(self, run_id: str, key: str) -> list[_Point]:
        """(step, timestamp, value) of one series, in arrival order."""
        with self._lock:
            return list(self.metrics.get(run_id, {}).get(key, []))

    def point_count(self) -> int:
        with self._lock:
            return sum(len(series) for keys in self.metrics.values() for series in keys.values())

    def _check(self) -> None:
        if not self.available:
            raise ServerUnavailable("MemoryTransport: unavailable (available = False)")

    def _run(self, run_id: str) -> common_pb2.RunInfo:
        info = self.runs.get(run_id)
        if info is None:
            raise NotFound(f"run {run_id!r} not found", "NOT_FOUND")
        return info

    # -- Transport ---------------------------------------------------------------------------------

    def create_experiment(self, request: ingest_pb2.CreateExperimentRequest) -> common_pb2.Experiment:
        self._check()
        with self._lock:
            if any(e.name == request.name for e in self.experiments.values()):
                raise AlreadyExists(f"experiment {request.name!r} exists", "ALREADY_EXISTS")
            exp = common_pb2.Experiment(experiment_id=str(next(self._ids)), name=request.name,
                                        artifact_location=request.artifact_location)
            self.experiments[exp.experiment_id] = exp
            return exp

    def get_experiment(self, request: ingest_pb2.GetExperimentRequest) -> common_pb2.Experiment:
        self._check()
        with self._lock:
            for exp in self.experiments.values():
                if exp.experiment_id == request.experiment_id or (request.name and exp.name == request.name):
                    return exp
        raise NotFound(f"experiment {request.name or request.experiment_id!r} not found", "NOT_FOUND")

    def create_run(self, request: ingest_pb2.CreateRunRequest) -> common_pb2.RunInfo:
        self._check()
        with self._lock:
            if request.experiment_id not in self.experiments:
                raise NotFound(f"experiment {request.experiment_id!r} not found", "NOT_FOUND")
            info = common_pb2.RunInfo(
                run_id=uuid.uuid4().hex, experiment_id=request.experiment_id, run_name=request.run_name,
                user_id=request.user_id, status=common_pb2.RUNNING,
                start_time=request.start_time or time.time_ns() // 1_000_000,
            )  # fmt: skip
            self.runs[info.run_id] = info
            self.params[info.run_id] = {p.key: p.value for p in request.params}
            self.tags[info.run_id] = {t.key: t.value for t in request.tags}
            return info

    def update_run(self, request: ingest_pb2.UpdateRunRequest) -> common_pb2.RunInfo:
        self._check()
        with self._lock:
            info = self._run(request.run_id)
            if request.status:
                info.status = request.status
            if request.end_time:
                info.end_time = request.end_time
            if request.run_name:
                info.run_name = request.run_name
            return info

    def log_params(self, request: ingest_pb2.LogParamsRequest) -> None:
        self._check()
        with self._lock:
            self._run(request.run_id)
            params = self.params[request.run_id]
            for p in request.params:
                if params.setdefault(p.key, p.value) != p.value:
                    raise InvalidArgument(f"param {p.key!r} already logged as {params[p.key]!r}", "INVALID_ARGUMENT")

    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None:
        self._check()
        with self._lock:
            self._run(request.run_id)
            self.tags[request.run_id].update({t.key: t.value for t in request.tags})

    def stream_metrics(self, requests: Iterator[bytes]) -> _MemoryAckStream:
        self._check()
        return _MemoryAckStream(self, requests)

    def _store(self, batch: ingest_pb2.MetricBatch) -> ingest_pb2.BatchAck:
        self._check()
        n = batch_points(batch)
        with self._lock:
            if batch.seq <= self.high_water.get(batch.writer_id, 0):
                return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.DUPLICATE, points=n)
            missing = [r for r in batch.run_ids if r not in self.runs]
            if missing:
                return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.REJECTED, points=n, code=5,
                                           message=f"run_ids: {missing[0]!r} not found")
            try:
                cols = checked_columns(batch)  # the service's rules, its default limits
            except ValueError as exc:
                return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.REJECTED, points=n, code=3,
                                           message=str(exc))
            columns = zip(cols.run_index.tolist(), cols.key_index.tolist(), cols.steps.tolist(),
                          cols.timestamps.tolist(), cols.values.tolist(), strict=True)
            for r, k, step, ts, value in columns:
                self.metrics.setdefault(batch.run_ids[r], {}).setdefault(batch.keys[k], []).append((step, ts, value))
            self.high_water[batch.writer_id] = batch.seq
            self.batches_stored += 1
            return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.STORED, points=n)

    def get_run(self, request: query_pb2.GetRunRequest) -> common_pb2.Run:
        self._check()
        with self._lock:
            return self._view(self._run(request.run_id))

    def _view(self, info: common_pb2.RunInfo) -> common_pb2.Run:
        latest = []
        for key, series in self.metrics.get(info.run_id, {}).items():
            step, ts, value = max(series)
            values = [v for _, _, v in series]
            latest.append(common_pb2.LatestMetric(key=key, value=value, timestamp=ts, step=step,
                                                  min_value=min(values), max_value=max(values), count=len(series)))
        return common_pb2.Run(
            info=info, metrics=latest,
            params=[common_pb2.Param(key=k, value=v) for k, v in self.params[info.run_id].items()],
            tags=[common_pb2.Tag(key=k, value=v) for k, v in self.tags[info.run_id].items()],
        )  # fmt: skip

    def search_runs(self, request: query_pb2.SearchRunsRequest) -> query_pb2.SearchRunsResponse:
        self._check()
        if request.filter or request.order_by or request.page_token:
            raise InvalidArgument("MemoryTransport.search_runs supports no filter, order or paging",
                                  "INVALID_ARGUMENT")
        with self._lock:
            runs = [self._view(i) for i in self.runs.values()
                    if not request.experiment_ids or i.experiment_id in request.experiment_ids]
        return query_pb2.SearchRunsResponse(runs=runs)

    def get_metric_history(self, request: query_pb2.GetMetricHistoryRequest) -> query_pb2.MetricHistory:
        self._check()
        with self._lock:
            self._run(request.run_id)
            series = sorted(self.metrics.get(request.run_id, {}).get(request.key, []))
        if request.HasField("min_step"):
            series = [p for p in series if p[0] >= request.min_step]
        if request.HasField("max_step"):
            series = [p for p in series if p[0] <= request.max_step]
        steps, times, values = (np.array(c, dtype) for c, dtype in
                                zip(zip(*series, strict=True) if series else ((), (), ()), ("<i8", "<i8", "<f8"),
                                    strict=True))  # fmt: skip
        return query_pb2.MetricHistory(run_id=request.run_id, key=request.key, steps=steps.tobytes(),
                                       timestamps=times.tobytes(), values=values.tobytes())

    def sql(self, request: query_pb2.SqlRequest, timeout: float | None = None) -> Iterator[query_pb2.SqlChunk]:
        raise UsageError("MemoryTransport does not run SQL: connect to a trackhouse server")

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
