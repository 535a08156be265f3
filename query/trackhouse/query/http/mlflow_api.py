"""MlflowApi: one async method per MLflow REST endpoint, over trackhouse's two paths.

Reads go through the query domain: `RunSearch.search`, `MetricHistory.page`, the
store's run and experiment reads (on the store's threads). Writes go through the
ingest service — an `IngestPort`, gRPC in every deployment (its own port in the
embedded server) — so they get ingest's validation, durability and dedupe.

Metric points of a request become one columnar MetricBatch sent with the unary
LogMetrics (acknowledged once durable). Each batch carries a writer identity
from a pool: a (writer_id, seq) slot serves one request at a time and numbers
its batches 1, 2, 3…, so a batch resent after UNAVAILABLE is deduplicated by
ingest like any client's.

MLflow semantics kept here: the run name is also the tag `mlflow.runName` (set
either way, kept in step); log-batch limits (1,000 metrics, 100 params, 100 tags,
1,000 entities); params before metrics before tags, as MLflow's stores do.

A request is applied whole or refused whole, as MLflow's (one transaction) is: the
service takes its parts in separate calls, so everything the service would refuse for
its content (names, values, lengths: `convert.check_pairs`, `convert.metric_batch`) is
checked before the first call. A call can still fail for the state it finds (a param
already logged with another value: params go first for that) or for an outage: then
the parts sent before it stay, and a retry of the request completes it (storing its
metric points again if they were sent: repeats are dropped within a request only).

Runs search with no experiment ids finds no runs, as MLflow's does (trackhouse's own
query API reads no ids as every experiment).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from trackhouse.proto.rules import MAX_EXPERIMENT_TAG_VALUE, MAX_PARAM_VALUE
from trackhouse.proto.v1 import common_pb2, ingest_pb2
from trackhouse.query.history import MetricHistory
from trackhouse.query.http import convert
from trackhouse.query.http.convert import RUN_NAME_TAG, Body, body_run_id, integer, pairs, strings, text
from trackhouse.query.http.errors import IngestCallError, invalid, missing
from trackhouse.query.http.experiments import ExperimentReader
from trackhouse.query.http.mlflow_history import MlflowHistories, StreamedJson
from trackhouse.query.scope import allowed_experiments
from trackhouse.query.search import RunSearch, SearchRequest
from trackhouse.store import ACTIVE, DELETED, RUN_STATUSES, RunDetails, RunRecord, Store

JSON = dict[str, Any]
Handler = Callable[[Body], Awaitable[JSON | StreamedJson]]

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
VIEW_NUMBERS = {1: "ACTIVE_ONLY", 2: "DELETED_ONLY", 3: "ALL"}
# gRPC status numbers a REJECTED ack may carry (ingest.proto's BatchAck.code).
GRPC_CODE_NAMES = {3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
                   14: "UNAVAILABLE"}
_ADJECTIVES = ("bold", "calm", "keen", "swift", "bright", "quiet", "brave", "merry", "lucky", "wise")
_NOUNS = ("fox", "owl", "elk", "lynx", "hawk", "bee", "seal", "wolf", "crane", "moth")


class IngestPort(Protocol):
    """The write seam: one unary call to the ingest service by method name.

    Raises IngestCallError (the gRPC status name and message) when the call fails.
    """

    async def call(self, method: str, request: Any) -> Any: ...


@dataclass
class _Writer:
    writer_id: str
    seq: int = 0


class WriterPool:
    """(writer_id, seq) slots for metric batches; a slot serves one request at a time."""

    def __init__(self) -> None:
        self._prefix = f"mlflow-rest-{uuid.uuid4().hex[:16]}"
        self._free: list[_Writer] = []
        self._made = 0

    def acquire(self) -> _Writer:
        if self._free:
            return self._free.pop()
        self._made += 1
        return _Writer(f"{self._prefix}-{self._made}")

    def release(self, writer: _Writer) -> None:
        self._free.append(writer)


def _now() -> int:
    return time.time_ns() // 1_000_000


def _view(body: Body, name: str) -> str:
    value = body.get(name)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None or value == "":
        return "ACTIVE_ONLY"
    # isascii: str.isdigit() also holds for "²", which int() refuses.
    if isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdigit()):
        if int(value) not in VIEW_NUMBERS:
            raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied")
        return VIEW_NUMBERS[int(value)]
    return str(value)


def _record(info: Any) -> RunRecord:
    """A RunRecord from the ingest service's RunInfo reply."""
    return RunRecord(
        info.run_id, info.experiment_id, info.run_name, info.user_id, common_pb2.RunStatus.Name(info.status),
        info.start_time, info.end_time or None, DELETED if info.lifecycle_stage == common_pb2.DELETED else ACTIVE,
        info.artifact_uri,
    )


def _tags_pb(items: list[tuple[str, str]]) -> list[Any]:
    return [common_pb2.Tag(key=k, value=v) for k, v in items]


class MlflowApi:
    def __init__(self, store: Store, search: RunSearch, history: MetricHistory, ingest: IngestPort) -> None:
        self._store = store
        self._search = search
        self._history = history
        self._ingest = ingest
        self._experiments = ExperimentReader(store)
        self._writers = WriterPool()
        self._histories = MlflowHistories(history)

    def endpoints(self) -> dict[str, Handler]:
        """Path under /api/2.0/mlflow/ → handler."""
        return {
            "experiments/create": self.create_experiment,
            "experiments/get": self.get_experiment,
            "experiments/get-by-name": self.get_experiment_by_name,
            "experiments/search": self.search_experiments,
            "experiments/update": self.update_experiment,
            "experiments/delete": self.delete_experiment,
            "experiments/restore": self.restore_experiment,
            "experiments/set-experiment-tag": self.set_experiment_tag,
            "experiments/delete-experiment-tag": self.delete_experiment_tag,
            "runs/create": self.create_run,
            "runs/get": self.get_run,
            "runs/update": self.update_run,
            "runs/delete": self.delete_run,
            "runs/restore": self.restore_run,
            "runs/search": self.search_runs,
            "runs/log-metric": self.log_metric,
            "runs/log-parameter": self.log_param,
            "runs/set-tag": self.set_tag,
            "runs/delete-tag": self.delete_tag,
            "runs/log-batch": self.log_batch,
            "runs/log-inputs": self.log_inputs,
            "metrics/get-history": self._histories.get_metric_history,
            "metrics/get-history-bulk-interval": self._histories.get_metric_history_bulk_interval,
        }

    # -- experiments ---------------------------------------------------------------------

    async def create_experiment(self, body: Body) -> JSON:
        name = text(body, "name", required=True)
        tags = pairs(body, "tags")
        # Before the experiment is created: its tags go in a second call, and the name, once taken, stays taken.
        convert.check_pairs(tags, "tags", MAX_EXPERIMENT_TAG_VALUE)
        rec = await self._ingest.call("CreateExperiment", ingest_pb2.CreateExperimentRequest(
            name=name, artifact_location=text(body, "artifact_location")))
        if tags:
            await self._ingest.call("SetExperimentTags", ingest_pb2.SetExperimentTagsRequest(
                experiment_id=rec.experiment_id, tags=_tags_pb(tags)))
        return {"experiment_id": rec.experiment_id}

    async def _experiment_json(self, *, experiment_id: str | None = None, name: str | None = None) -> JSON:
        rec = await self._experiments.get(experiment_id=experiment_id, name=name)
        allowed = allowed_experiments()
        if rec is None or (allowed is not None and rec.experiment_id not in allowed):
            raise missing(f"No Experiment with id={experiment_id} exists" if experiment_id is not None
                          else f"Could not find experiment with name '{name}'")
        tags = await self._experiments.tags([rec.experiment_id])
        return {"experiment": convert.experiment(rec, tags[rec.experiment_id])}

    async def get_experiment(self, body: Body) -> JSON:
        return await self._experiment_json(experiment_id=text(body, "experiment_id", required=True))

    async def get_experiment_by_name(self, body: Body) -> JSON:
        return await self._experiment_json(name=text(body, "experiment_name", required=True))

    async def search_experiments(self, body: Body) -> JSON:
        found, token = await self._experiments.search(
            text(body, "filter"), strings(body, "order_by"),
            integer(body, "max_results"), text(body, "page_token"), _view(body, "view_type"),
            allowed_experiments())
        out: JSON = {"experiments": [convert.experiment(rec, tags) for rec, tags in found]}
        if token:
            out["next_page_token"] = token
        return out

    async def update_experiment(self, body: Body) -> JSON:
        await self._ingest.call("UpdateExperiment", ingest_pb2.UpdateExperimentRequest(
            experiment_id=text(body, "experiment_id", required=True), new_name=text(body, "new_name")))
        return {}

    async def delete_experiment(self, body: Body) -> JSON:
        await self._ingest.call("DeleteExperiment", ingest_pb2.ExperimentRef(
            experiment_id=text(body, "experiment_id", required=True)))
        return {}

    async def restore_experiment(self, body: Body) -> JSON:
        await self._ingest.call("RestoreExperiment", ingest_pb2.ExperimentRef(
            experiment_id=text(body, "experiment_id", required=True)))
        return {}

    async def set_experiment_tag(self, body: Body) -> JSON:
        tag = common_pb2.Tag(key=text(body, "key", required=True), value=text(body, "value"))
        await self._ingest.call("SetExperimentTags", ingest_pb2.SetExperimentTagsRequest(
            experiment_id=text(body, "experiment_id", required=True), tags=[tag]))
        return {}

    async def delete_experiment_tag(self, body: Body) -> JSON:
        await self._ingest.call("DeleteExperimentTag", ingest_pb2.DeleteExperimentTagRequest(
            experiment_id=text(body, "experiment_id", required=True), key=text(body, "key", required=True)))
        return {}

    # -- runs ------------------------------------------------------------------------------

    async def create_run(self, body: Body) -> JSON:
        tags = dict(pairs(body, "tags"))
        name = text(body, "run_name")
        tagged = tags.get(RUN_NAME_TAG)
        if name and tagged and name != tagged:
            raise invalid(f"Both 'run_name' argument and '{RUN_NAME_TAG}' tag are specified, but with "
                          f"different values (run_name='{name}', {RUN_NAME_TAG}='{tagged}').")
        name = name or tagged or (f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}-"
                                  f"{random.randrange(1000)}")
        tags[RUN_NAME_TAG] = name
        info = await self._ingest.call("CreateRun", ingest_pb2.CreateRunRequest(
            experiment_id=text(body, "experiment_id", default="0"), run_name=name,
            user_id=text(body, "user_id"), start_time=integer(body, "start_time", 0),
            tags=_tags_pb(list(tags.items()))))
        return {"run": convert.run(RunDetails(_record(info), {}, tags, []))}

    async def get_run(self, body: Body) -> JSON:
        run_id = body_run_id(body)
        runs = await self._store.arun(self._store.run_details_steps([run_id]))
        allowed = allowed_experiments()
        if not runs or (allowed is not None and runs[0].info.experiment_id not in allowed):
            raise missing(f"Run with id={run_id} not found")
        return {"run": convert.run(runs[0])}

    async def update_run(self, body: Body) -> JSON:
        run_id = body_run_id(body)
        status = text(body, "status")
        if status and status not in RUN_STATUSES:
            raise invalid(f"Invalid value {status!r} for parameter 'status' supplied")
        name = text(body, "run_name")
        info = await self._ingest.call("UpdateRun", ingest_pb2.UpdateRunRequest(
            run_id=run_id, status=status or None,
            end_time=integer(body, "end_time", 0), run_name=name))
        if name:
            await self._ingest.call("SetTags", ingest_pb2.SetTagsRequest(
                run_id=run_id, tags=_tags_pb([(RUN_NAME_TAG, name)])))
        return {"run_info": convert.run_info(_record(info))}

    async def delete_run(self, body: Body) -> JSON:
        await self._ingest.call("DeleteRun", ingest_pb2.RunRef(run_id=body_run_id(body)))
        return {}

    async def restore_run(self, body: Body) -> JSON:
        await self._ingest.call("RestoreRun", ingest_pb2.RunRef(run_id=body_run_id(body)))
        return {}

    async def search_runs(self, body: Body) -> JSON:
        max_results = integer(body, "max_results")
        if max_results is not None and max_results < 1:  # MLflow's store: 0 is not "the default"
            raise invalid(f"Invalid value {max_results} for parameter 'max_results' supplied. "
                          "It must be a positive integer")
        experiment_ids = tuple(strings(body, "experiment_ids"))
        req = SearchRequest(
            experiment_ids=experiment_ids, filter=text(body, "filter"),
            order_by=tuple(strings(body, "order_by")), max_results=max_results or 0,
            page_token=text(body, "page_token"), view=_view(body, "run_view_type"),
            # No ids: MLflow searches no experiment (`experiment_id IN ()`), checking the request
            # all the same; the query domain reads no ids as every experiment, so none are allowed.
            allowed_experiments=allowed_experiments() if experiment_ids else (),
        )
        page = await self._search.asearch(req)
        out: JSON = {}  # MLflow's JSON leaves out an empty list: no runs is {}
        if page.runs:
            out["runs"] = [convert.run(r) for r in page.runs]
        if page.next_page_token:
            out["next_page_token"] = page.next_page_token
        return out

    # -- run data ----------------------------------------------------------------------------

    async def log_metric(self, body: Body) -> JSON:
        metric = {k: body.get(k) for k in ("key", "value", "timestamp", "step") if body.get(k) is not None}
        if "value" not in metric:
            raise invalid("Missing value for required parameter 'value'.")
        await self._send_metrics(convert.metric_batch(body_run_id(body), [metric], _now()))
        return {}

    async def log_param(self, body: Body) -> JSON:
        param = common_pb2.Param(key=text(body, "key", required=True), value=text(body, "value"))
        await self._ingest.call("LogParams", ingest_pb2.LogParamsRequest(run_id=body_run_id(body), params=[param]))
        return {}

    async def set_tag(self, body: Body) -> JSON:
        run_id = body_run_id(body)
        tags = [(text(body, "key", required=True), text(body, "value"))]
        convert.check_run_tags(tags)  # before SetTags: the run-name tag renames the run in a second call
        await self._set_tags(run_id, tags)
        return {}

    async def _set_tags(self, run_id: str, tags: list[tuple[str, str]]) -> None:
        await self._ingest.call("SetTags", ingest_pb2.SetTagsRequest(run_id=run_id, tags=_tags_pb(tags)))
        names = [v for k, v in tags if k == RUN_NAME_TAG]
        if names:  # keep the run's name in step with its tag, as MLflow does
            await self._ingest.call("UpdateRun", ingest_pb2.UpdateRunRequest(run_id=run_id, run_name=names[-1]))

    async def delete_tag(self, body: Body) -> JSON:
        await self._ingest.call("DeleteTag", ingest_pb2.DeleteTagRequest(
            run_id=body_run_id(body), key=text(body, "key", required=True)))
        return {}

    async def log_batch(self, body: Body) -> JSON:
        run_id = body_run_id(body)
        metrics = body.get("metrics") or []
        if not isinstance(metrics, list):
            raise invalid("Invalid value for parameter 'metrics' supplied: expected a list")
        params, tags = pairs(body, "params"), pairs(body, "tags")
        for name, items, limit in (("metrics", metrics, MAX_METRICS_PER_BATCH),
                                   ("params", params, MAX_PARAMS_TAGS_PER_BATCH),
                                   ("tags", tags, MAX_PARAMS_TAGS_PER_BATCH)):
            if len(items) > limit:
                raise invalid(f"A batch logging request can contain at most {limit} {name}. Got {len(items)} "
                              f"{name}. Please split up {name} across multiple requests and try again.")
        total = len(metrics) + len(params) + len(tags)
        if total > MAX_ENTITIES_PER_BATCH:
            raise invalid(f"A batch logging request can contain at most {MAX_ENTITIES_PER_BATCH} metrics, params, "
                          f"and tags in total. Got {total} entities.")
        # All of it checked before the first call (see the module's docstring).
        convert.check_pairs(params, "params", MAX_PARAM_VALUE)
        batch = convert.metric_batch(run_id, metrics, _now()) if metrics else None
        convert.check_run_tags(tags)
        if params:
            await self._ingest.call("LogParams", ingest_pb2.LogParamsRequest(
                run_id=run_id, params=[common_pb2.Param(key=k, value=v) for k, v in params]))
        if batch is not None:
            await self._send_metrics(batch)
        if tags:
            await self._set_tags(run_id, tags)
        return {}

    async def log_inputs(self, body: Body) -> JSON:
        # Datasets are accepted and not stored (see docs/mlflow.md); the run must exist.
        run_id = body_run_id(body)
        run = (await self._store.arun(self._store.runs_steps([run_id]))).get(run_id)
        allowed = allowed_experiments()
        if run is None or (allowed is not None and run.experiment_id not in allowed):
            raise missing(f"Run with id={run_id} not found")
        return {}

    async def _send_metrics(self, batch: Any) -> None:
        """LogMetrics with `batch` under a writer identity of the pool; REJECTED raises IngestCallError."""
        writer = self._writers.acquire()
        try:
            writer.seq += 1
            batch.writer_id, batch.seq = writer.writer_id, writer.seq
            for attempt in range(3):
                try:
                    ack = await self._ingest.call("LogMetrics", batch)
                    break
                except IngestCallError as exc:
                    # Same (writer_id, seq) again: ingest stores it at most once.
                    if exc.code != "UNAVAILABLE" or attempt == 2:
                        raise
        finally:
            self._writers.release(writer)
        if ack.status == ingest_pb2.REJECTED:
            raise IngestCallError(GRPC_CODE_NAMES.get(ack.code, "INVALID_ARGUMENT"), ack.message)
