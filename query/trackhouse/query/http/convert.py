"""JSON in and out in MLflow's shapes: proto JSON field names, int64 as numbers, NaN as "NaN".

Owns the request-field readers (`text`, `integer`, `number`, `strings`), which raise
INVALID_PARAMETER_VALUE naming the field, and the response builders for runs,
experiments and metric points. Metric points of a request become one columnar
MetricBatch (the ingest wire format); history pages are columns turned into rows
only here, at the JSON edge.

A request's items are checked here by the rules the ingest service applies
(`trackhouse.proto.rules` for names, timestamps and batches; `check_pairs` for params and
tags), before the first write: MLflow applies a request whole or not at all, and the
service takes a request's params, metrics and tags in separate calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trackhouse.proto.points import Columns
from trackhouse.proto.rules import (
    INT64_MAX,
    INT64_MIN,
    MAX_RUN_NAME,
    MAX_TAG_VALUE,
    checked_columns,
    items_problem,
    key_problem,
    timestamps_problem,
)
from trackhouse.proto.v1 import ingest_pb2
from trackhouse.query.http.errors import invalid
from trackhouse.store import ExperimentRecord, RunDetails, RunRecord

RUN_NAME_TAG = "mlflow.runName"
Body = Mapping[str, Any]


# -- request fields ----------------------------------------------------------------------


def body_run_id(body: Body) -> str:
    """The request's run: `run_id`, or MLflow's older `run_uuid`."""
    return text(body, "run_id") or text(body, "run_uuid", required=True)


def text(body: Body, name: str, *, required: bool = False, default: str = "") -> str:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise invalid(f"Missing value for required parameter '{name}'. See the API docs for more "
                          "information about request parameters.")
        return default
    if isinstance(value, list) and len(value) == 1:  # a query-string field given once
        value = value[0]
    if not isinstance(value, str):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected a string")
    return value


def integer(body: Body, name: str, default: int | None = None) -> int | None:
    """An int64 field (proto JSON allows a number or a string of digits); out of range is invalid."""
    value = body.get(name)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None or value == "":
        return default
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected an integer") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected an int64 "
                      f"({INT64_MIN}..{INT64_MAX})")
    return number


def number(value: Any, name: str) -> float:
    """A metric value: a JSON number or a string of one, as proto JSON reads a double ("1.5", "NaN",
    "Infinity", "-Infinity"); anything else (a list, an object, a boolean) is invalid."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected a number")
    try:
        return float(value)
    except (ValueError, OverflowError):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected a number") from None


def strings(body: Body, name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected a list of strings")
    return value


def pairs(body: Body, name: str) -> list[tuple[str, str]]:
    """`params` / `tags`: a list of {"key", "value"} objects."""
    items = body.get(name) or []
    if not isinstance(items, list):
        raise invalid(f"Invalid value for parameter '{name}' supplied: expected a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid(f"Invalid value for parameter '{name}[{i}]': expected an object")
        key = text(item, "key", required=True)
        value = item.get("value", "")
        out.append((key, value if isinstance(value, str) else str(value)))
    return out


def check_pairs(items: Sequence[tuple[str, str]], name: str, max_value: int) -> None:
    """INVALID_PARAMETER_VALUE naming the item unless `items` keep the service's rules for params
    and tags: at most MAX_ITEMS_PER_CALL, legal keys (`key_problem`), values of at most `max_value`."""
    if (problem := items_problem(items, name, max_value)) is not None:
        raise invalid(problem)


def check_run_tags(tags: Sequence[tuple[str, str]]) -> None:
    """`check_pairs` for a run's tags; the run-name tag also renames the run, so it keeps that limit too."""
    check_pairs(tags, "tags", MAX_TAG_VALUE)
    for i, (key, value) in enumerate(tags):
        if key == RUN_NAME_TAG and len(value) > MAX_RUN_NAME:
            raise invalid(f"tags[{i}].value: the run name is {len(value)} characters, limit {MAX_RUN_NAME}")


def metric_batch(run_id: str, metrics: Sequence[Any], now: int) -> Any:
    """One MetricBatch (columns as little-endian bytes) from MLflow's metric objects, checked by the
    service's rules (`_checked`) and without repeats of a point (`_without_repeats`); its sender
    gives it a writer identity (`writer_id`, `seq`). A timestamp left out is `now`.

    Columns are built with one comprehension each (`_plain_batch`); anything unusual (a missing
    field, a wrong type) falls back to `_item_batch`, which reads item by item and names the
    offending one.
    """
    batch = _plain_batch(run_id, metrics, now)
    if batch is None:
        batch = _item_batch(run_id, metrics, now)
    return _without_repeats(batch, _checked(batch))


def _plain_batch(run_id: str, metrics: Sequence[Any], now: int) -> Any | None:
    """The batch when every metric is plain (string key, number value, int timestamp and step); else None."""
    try:
        names = [m["key"] for m in metrics]
        raw_values = [m["value"] for m in metrics]
        # int and float only: numpy would read a string, a bool as 1, and flatten a list ([7] as 7).
        if not all(type(k) is str and k for k in names) or not all(type(v) in (int, float) for v in raw_values):
            return None
        values = np.array(raw_values, dtype="<f8")
        raw_stamps = [m.get("timestamp", now) for m in metrics]
        raw_steps = [m.get("step", 0) for m in metrics]
        # Plain ints only: numpy would truncate 1.5 and take True as 1 (`_item_batch` refuses
        # them); an int outside int64 raises OverflowError.
        if not all(type(x) is int for x in raw_stamps) or not all(type(x) is int for x in raw_steps):
            return None
        stamps = np.array(raw_stamps, dtype="<i8")
        steps = np.array(raw_steps, dtype="<i8")
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    keys: dict[str, int] = {}
    key_index = np.array([keys.setdefault(k, len(keys)) for k in names], dtype="<u4")
    return _batch(run_id, list(keys), key_index, steps, stamps, values)


def _item_batch(run_id: str, metrics: Sequence[Any], now: int) -> Any:
    keys: dict[str, int] = {}
    n = len(metrics)
    key_index = np.empty(n, "<u4")
    steps = np.empty(n, "<i8")
    stamps = np.empty(n, "<i8")
    values = np.empty(n, "<f8")
    for i, m in enumerate(metrics):
        if not isinstance(m, dict):
            raise invalid(f"Invalid value for parameter 'metrics[{i}]': expected an object")
        key = text(m, "key", required=True)
        key_index[i] = keys.setdefault(key, len(keys))
        if "value" not in m:
            raise invalid(f"Missing value for required parameter 'metrics[{i}].value'.")
        values[i] = number(m["value"], f"metrics[{i}].value")
        stamps[i] = integer(m, "timestamp", now)
        steps[i] = integer(m, "step", 0)
    return _batch(run_id, list(keys), key_index, steps, stamps, values)


def _batch(run_id: str, keys: list[str], key_index: Any, steps: Any, stamps: Any, values: Any) -> Any:
    return ingest_pb2.MetricBatch(
        run_ids=[run_id], keys=keys, key_index=key_index.tobytes(),
        steps=steps.tobytes(), timestamps=stamps.tobytes(), values=values.tobytes(),
    )


def _checked(batch: Any) -> Columns:
    """The batch's columns once it keeps the rules the service checks a batch by
    (`trackhouse.proto.rules.checked_columns`); INVALID_PARAMETER_VALUE otherwise, naming the
    metric when the fault is a key's or a timestamp's."""
    key_index = np.frombuffer(batch.key_index, "<u4")
    for k, key in enumerate(batch.keys):
        problem = key_problem(key)
        if problem is not None:
            raise invalid(f"metrics[{int(np.argmax(key_index == k))}].key: {problem}")
    stamps = np.frombuffer(batch.timestamps, "<i8")
    if len(stamps) and timestamps_problem(int(stamps.min()), int(stamps.max())) is not None:
        i, stamp = next((i, t) for i, t in enumerate(stamps.tolist()) if timestamps_problem(t, t) is not None)
        raise invalid(f"metrics[{i}].timestamp: {stamp} is {timestamps_problem(stamp, stamp)}")
    try:
        return checked_columns(batch)
    except ValueError as exc:
        raise invalid(f"metrics: {exc}") from None


def _without_repeats(batch: Any, cols: Columns) -> Any:
    """The batch with each point (key, step, timestamp, value) once, in its first place.

    MLflow's store holds a point once (its primary key; `log_batch` drops the repeats),
    where trackhouse's metrics table keeps every point it is sent. Values compare as MLflow's
    table does: every NaN is one value (MLflow stores NaN as a flag), and -0.0 is 0.0.
    """
    if len(cols) < 2:
        return batch
    values = np.where(np.isnan(cols.values), np.nan, cols.values + 0.0)
    rows = np.stack([cols.key_index.astype(np.int64), cols.steps, cols.timestamps, values.view(np.int64)], axis=1)
    _, first = np.unique(rows, axis=0, return_index=True)
    if len(first) == len(rows):
        return batch
    keep = np.sort(first)
    return _batch(batch.run_ids[0], list(batch.keys), cols.key_index[keep], cols.steps[keep],
                  cols.timestamps[keep], cols.values[keep])


# -- responses ------------------------------------------------------------------------------


def json_number(value: float) -> float | str:
    """Proto JSON for a double: NaN and ±inf as strings (orjson would write null)."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def run_info(rec: RunRecord) -> dict[str, Any]:
    info: dict[str, Any] = {
        "run_id": rec.run_id, "run_uuid": rec.run_id, "run_name": rec.run_name,
        "experiment_id": rec.experiment_id, "user_id": rec.user_id, "status": rec.status,
        "start_time": rec.start_time, "artifact_uri": rec.artifact_uri, "lifecycle_stage": rec.lifecycle_stage,
    }
    if rec.end_time:
        info["end_time"] = rec.end_time
    return info


def run(details: RunDetails) -> dict[str, Any]:
    tags = dict(details.tags)
    # MLflow keeps the run name as a tag too; runs written over gRPC may lack it.
    tags.setdefault(RUN_NAME_TAG, details.info.run_name)
    return {
        "info": run_info(details.info),
        "data": {
            "metrics": [{"key": m.key, "value": json_number(m.value), "timestamp": m.timestamp, "step": m.step}
                        for m in details.metrics],
            "params": [{"key": k, "value": v} for k, v in details.params.items()],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        },
        "inputs": {},
    }


def experiment(rec: ExperimentRecord, tags: Mapping[str, str]) -> dict[str, Any]:
    return {
        "experiment_id": rec.experiment_id, "name": rec.name, "artifact_location": rec.artifact_location,
        "lifecycle_stage": rec.lifecycle_stage, "creation_time": rec.creation_time,
        "last_update_time": rec.last_update_time, "tags": [{"key": k, "value": v} for k, v in tags.items()],
    }


def points(key: str, steps: Any, stamps: Any, values: Any, run_id: str | None = None) -> list[dict[str, Any]]:
    """Metric points as MLflow's JSON objects (the only per-point loop: the JSON edge)."""
    vals: list[Any] = values.tolist()
    if not bool(np.isfinite(values).all()):
        vals = [json_number(v) for v in vals]
    if run_id is None:
        return [{"key": key, "value": v, "timestamp": t, "step": s}
                for s, t, v in zip(steps.tolist(), stamps.tolist(), vals, strict=True)]
    return [{"key": key, "value": v, "timestamp": t, "step": s, "run_id": run_id}
            for s, t, v in zip(steps.tolist(), stamps.tolist(), vals, strict=True)]
