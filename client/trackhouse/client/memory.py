"""``MemoryTransport``: a complete in-process ``Transport`` for users' own tests.

    client = th.Client(th.MemoryTransport())
    run = client.start_run(experiment="unit")
    run.log(step=0, loss=0.5)
    client.flush()
    client.transport.points(run.run_id, "loss")   # [(0, <ms>, 0.5)]

It keeps experiments, runs, params, tags and metric points in memory and answers and
refuses as the server does (tests/client/test_memory.py runs the same tests against
both), with the rules of ``trackhouse.proto.rules`` that the service applies:

- names, values and sizes of params, tags, run names and times are checked before
  anything is stored; a refused call stores nothing (``log_params`` is all or nothing);
- params are write-once per (run, key); tags are last-write-wins; a run without a name
  is named ``run-`` and its id's last 8 characters; no experiment id means ``"0"``;
- a final status (FINISHED, FAILED, KILLED) without an end time ends the run now,
  unless it has ended already; an unknown status is InvalidArgument;
- a metric batch is checked for the batch rules, then for its runs, and only then
  against its writer's high-water mark: a ``(writer_id, seq)`` at or below it is a
  DUPLICATE, not stored again; a refused batch is REJECTED whole, with 0 points.

Reads (``memoryquery``) answer ``get_run``, ``search_runs`` (no filter or order_by:
InvalidArgument) and ``get_metric_history`` in the query service's order and pages.
Set ``available = False`` to act like a server that is down (every call raises
``ServerUnavailable``, open streams end), to test how code behaves offline.
Thread-safe: one lock guards the state.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from trackhouse.client import memoryquery
from trackhouse.client.errors import AlreadyExists, InvalidArgument, NotFound, ServerUnavailable, UsageError
from trackhouse.proto.points import batch_points
from trackhouse.proto.rules import MAX_PARAM_VALUE, MAX_RUN_NAME, MAX_TAG_VALUE, checked_columns, items_problem
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2

_Point = tuple[int, int, float]
_M = TypeVar("_M", common_pb2.Experiment, common_pb2.RunInfo)
# The statuses that end a run (the catalog's TERMINAL_STATUSES).
_FINAL = (common_pb2.FINISHED, common_pb2.FAILED, common_pb2.KILLED)
_INVALID, _NOT_FOUND = 3, 5  # gRPC codes of a REJECTED ack


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, "INVALID_ARGUMENT")


def _items(items: Any, field: str, max_value: int) -> list[tuple[str, str]]:
    """Params or tags of one call as (key, value), once they keep the service's rules."""
    pairs = [(item.key, item.value) for item in items]
    if (problem := items_problem(pairs, field, max_value)) is not None:
        raise _invalid(problem)
    return pairs


def _copied(message: _M) -> _M:
    """A copy for the caller: what it does to an answer must not change the state."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _status(number: int) -> None:
    # proto3 enums are open: a number the server does not know arrives as is, and is refused.
    if number not in common_pb2.RunStatus.values():
        raise _invalid(f"status: {number} is not a RunStatus")


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
            "0": common_pb2.Experiment(experiment_id="0", name="Default", lifecycle_stage=common_pb2.ACTIVE)
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
            raise NotFound(f"run_id: no run {run_id!r}", "NOT_FOUND")
        return info

    # -- Transport: experiments and runs --------------------------------------------------------

    def create_experiment(self, request: ingest_pb2.CreateExperimentRequest) -> common_pb2.Experiment:
        self._check()
        name = request.name.strip()
        if not name:
            raise _invalid("name: an experiment needs a non-empty name")
        with self._lock:
            if any(e.name == name for e in self.experiments.values()):
                raise AlreadyExists(f"experiment {name!r} already exists", "ALREADY_EXISTS")
            now = _now_ms()
            exp = common_pb2.Experiment(experiment_id=str(next(self._ids)), name=name,
                                        artifact_location=request.artifact_location,
                                        lifecycle_stage=common_pb2.ACTIVE, creation_time=now, last_update_time=now)
            self.experiments[exp.experiment_id] = exp
            return _copied(exp)

    def get_experiment(self, request: ingest_pb2.GetExperimentRequest) -> common_pb2.Experiment:
        self._check()
        if not request.experiment_id and not request.name:
            raise _invalid("experiment_id or name: one is required")
        with self._lock:
            for exp in self.experiments.values():
                if exp.experiment_id == request.experiment_id or (request.name and exp.name == request.name):
                    return _copied(exp)
        raise NotFound(f"no experiment {request.name or request.experiment_id!r}", "NOT_FOUND")

    def create_run(self, request: ingest_pb2.CreateRunRequest) -> common_pb2.RunInfo:
        self._check()
        experiment_id = request.experiment_id or "0"
        if len(request.run_name) > MAX_RUN_NAME:
            raise _invalid(f"run_name: {len(request.run_name)} characters, limit {MAX_RUN_NAME}")
        if request.start_time < 0:
            raise _invalid("start_time: must be >= 0 (ms since the epoch)")
        params = _items(request.params, "params", MAX_PARAM_VALUE)
        tags = _items(request.tags, "tags", MAX_TAG_VALUE)
        if len(dict(params)) != len(params):
            raise _invalid("params: the same key appears twice")
        with self._lock:
            if experiment_id not in self.experiments:
                raise NotFound(f"no experiment with id {experiment_id!r}", "NOT_FOUND")
            run_id = uuid.uuid4().hex
            info = common_pb2.RunInfo(
                run_id=run_id, experiment_id=experiment_id, run_name=request.run_name or f"run-{run_id[-8:]}",
                user_id=request.user_id, status=common_pb2.RUNNING, start_time=request.start_time or _now_ms(),
                lifecycle_stage=common_pb2.ACTIVE,
            )  # fmt: skip
            self.runs[run_id] = info
            self.params[run_id] = dict(params)
            self.tags[run_id] = dict(tags)
            return _copied(info)

    def update_run(self, request: ingest_pb2.UpdateRunRequest) -> common_pb2.RunInfo:
        self._check()
        _status(request.status)
        if request.end_time < 0:
            raise _invalid("end_time: must be >= 0 (ms since the epoch)")
        if len(request.run_name) > MAX_RUN_NAME:
            raise _invalid(f"run_name: {len(request.run_name)} characters, limit {MAX_RUN_NAME}")
        with self._lock:
            info = self._run(request.run_id)
            info.status = request.status or info.status
            end_time = request.end_time
            if not end_time and info.status in _FINAL:
                end_time = info.end_time or _now_ms()
            info.end_time = end_time or info.end_time
            info.run_name = request.run_name or info.run_name
            return _copied(info)

    def log_params(self, request: ingest_pb2.LogParamsRequest) -> None:
        self._check()
        given: dict[str, str] = {}
        for key, value in _items(request.params, "params", MAX_PARAM_VALUE):
            if given.setdefault(key, value) != value:
                raise _invalid(f"params: key {key!r} given twice with different values")
        with self._lock:
            self._run(request.run_id)
            stored = self.params[request.run_id]
            for key, value in given.items():  # all checked before any is stored
                if stored.get(key, value) != value:
                    raise _invalid(
                        f"params: changing param values is not allowed. Param with key={key!r} was already logged "
                        f"with value={stored[key]!r} for run {request.run_id}; attempted value={value!r}")
            stored.update(given)

    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None:
        self._check()
        tags = _items(request.tags, "tags", MAX_TAG_VALUE)
        with self._lock:
            self._run(request.run_id)
            self.tags[request.run_id].update(tags)

    # -- Transport: metric batches ---------------------------------------------------------------

    def stream_metrics(self, requests: Iterator[bytes]) -> _MemoryAckStream:
        self._check()
        return _MemoryAckStream(self, requests)

    def _store(self, batch: ingest_pb2.MetricBatch) -> ingest_pb2.BatchAck:
        self._check()
        n = batch_points(batch)
        try:
            cols = checked_columns(batch)  # the service's rules, its default limits
        except ValueError as exc:
            return _rejected(batch.seq, _INVALID, str(exc))
        with self._lock:
            for i, run_id in enumerate(batch.run_ids):
                if run_id not in self.runs:
                    return _rejected(batch.seq, _NOT_FOUND, f"run_ids[{i}]: no run {run_id!r}")
            # Duplicates after the rules and the runs, as the service: a copy it cannot accept is refused.
            if batch.seq <= self.high_water.get(batch.writer_id, 0):
                return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.DUPLICATE, points=n)
            columns = zip(cols.run_index.tolist(), cols.key_index.tolist(), cols.steps.tolist(),
                          cols.timestamps.tolist(), cols.values.tolist(), strict=True)
            for r, k, step, ts, value in columns:
                self.metrics.setdefault(batch.run_ids[r], {}).setdefault(batch.keys[k], []).append((step, ts, value))
            self.high_water[batch.writer_id] = batch.seq
            self.batches_stored += 1
            return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.STORED, points=n)

    # -- Transport: reads ------------------------------------------------------------------------

    def get_run(self, request: query_pb2.GetRunRequest) -> common_pb2.Run:
        self._check()
        if not request.run_id:
            raise _invalid("run_id: required")
        with self._lock:
            return self._view(self._run(request.run_id))

    def _view(self, info: common_pb2.RunInfo) -> common_pb2.Run:
        return memoryquery.run_view(info, self.params[info.run_id], self.tags[info.run_id],
                                    self.metrics.get(info.run_id, {}))

    def search_runs(self, request: query_pb2.SearchRunsRequest) -> query_pb2.SearchRunsResponse:
        self._check()
        with self._lock:
            runs: Sequence[common_pb2.RunInfo] = list(self.runs.values())
            return memoryquery.search(request, runs, self._view)

    def get_metric_history(self, request: query_pb2.GetMetricHistoryRequest) -> query_pb2.MetricHistory:
        self._check()
        memoryquery.check_history(request)
        with self._lock:
            self._run(request.run_id)
            series = list(self.metrics.get(request.run_id, {}).get(request.key, []))
        return memoryquery.history_page(request, series)

    def sql(self, request: query_pb2.SqlRequest, timeout: float | None = None) -> Iterator[query_pb2.SqlChunk]:
        raise UsageError("MemoryTransport does not run SQL: connect to a trackhouse server")

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def _rejected(seq: int, code: int, message: str) -> ingest_pb2.BatchAck:
    # The service counts no points in a refused batch (it stored none).
    return ingest_pb2.BatchAck(seq=seq, status=ingest_pb2.REJECTED, points=0, code=code, message=message)
