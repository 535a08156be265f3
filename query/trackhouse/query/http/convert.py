"""JSON in and out in MLflow's shapes: proto JSON field names, int64 as numbers, NaN as "NaN".

Owns the request-field readers (`text`, `integer`, `number`, `strings`), which raise
INVALID_PARAMETER_VALUE naming the field, and the response builders for runs,
experiments and metric points. Metric points of a request become one columnar
MetricBatch (the ingest wire format); history pages are columns turned into rows
only here, at the JSON edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trackhouse.proto.rules import INT64_MAX, INT64_MIN
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
    """A metric value: a JSON number or proto JSON's "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected a number")
    try:
        return float(value)
    except ValueError:
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


def metric_batch(run_id: str, metrics: Sequence[Any], writer_id: str, seq: int, now: int) -> Any:
    """One MetricBatch (columns as little-endian bytes) from MLflow's metric objects.

    Columns are built with one comprehension each; anything unusual (a missing field,
    a wrong type) falls back to the checked path, which names the offending item.
    """
    try:
        names = [m["key"] for m in metrics]
        raw_values = [m["value"] for m in metrics]
        if not all(type(k) is str and k for k in names) or any(type(v) is bool for v in raw_values):
            raise TypeError
        values = np.array(raw_values, dtype="<f8")
        raw_stamps = [m.get("timestamp", now) for m in metrics]
        raw_steps = [m.get("step", 0) for m in metrics]
        # Plain ints only: numpy would truncate 1.5 and take True as 1 (the checked path refuses
        # them); an int outside int64 raises OverflowError.
        if not all(type(x) is int for x in raw_stamps) or not all(type(x) is int for x in raw_steps):
            raise TypeError
        stamps = np.array(raw_stamps, dtype="<i8")
        steps = np.array(raw_steps, dtype="<i8")
    except (KeyError, TypeError, ValueError, OverflowError):
        return _checked_batch(run_id, metrics, writer_id, seq, now)
    keys: dict[str, int] = {}
    key_index = np.array([keys.setdefault(k, len(keys)) for k in names], dtype="<u4")
    return ingest_pb2.MetricBatch(
        writer_id=writer_id, seq=seq, run_ids=[run_id], keys=list(keys), key_index=key_index.tobytes(),
        steps=steps.tobytes(), timestamps=stamps.tobytes(), values=values.tobytes(),
    )


def _checked_batch(run_id: str, metrics: Sequence[Any], writer_id: str, seq: int, now: int) -> Any:
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
    return ingest_pb2.MetricBatch(
        writer_id=writer_id, seq=seq, run_ids=[run_id], keys=list(keys), key_index=key_index.tobytes(),
        steps=steps.tobytes(), timestamps=stamps.tobytes(), values=values.tobytes(),
    )


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
