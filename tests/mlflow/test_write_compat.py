"""MLflow's write semantics over REST: a request is applied whole or refused whole; a point is
stored once per request; runs/search without experiment ids finds nothing; MLflow's rules
for max_results, metric values and the names of deleted experiments."""

from __future__ import annotations

import math
import uuid
from typing import Any

import grpc
import numpy as np
import pytest
import requests

from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.query.http import convert


def call(base_url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = requests.post(f"{base_url}/api/2.0/mlflow/{path}", json=body, timeout=30)
    return resp.status_code, resp.json()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_experiment(base_url: str) -> str:
    status, body = call(base_url, "experiments/create", {"name": unique("write")})
    assert status == 200, body
    return str(body["experiment_id"])


def new_run(base_url: str, experiment_id: str = "0") -> str:
    status, body = call(base_url, "runs/create", {"experiment_id": experiment_id, "run_name": "w"})
    assert status == 200, body
    return str(body["run"]["info"]["run_id"])


def run_data(base_url: str, run_id: str) -> dict[str, Any]:
    status, body = call(base_url, "runs/get", {"run_id": run_id})
    assert status == 200, body
    data: dict[str, Any] = body["run"]["data"]
    data["tags"] = [t for t in data["tags"] if t["key"] != "mlflow.runName"]
    return data


def history(base_url: str, run_id: str, key: str) -> list[dict[str, Any]]:
    status, body = call(base_url, "metrics/get-history", {"run_id": run_id, "metric_key": key})
    assert status == 200, body
    return list(body.get("metrics", []))


# -- a refused request writes nothing ---------------------------------------------------------

GOOD_PARAM = {"key": "p", "value": "v"}
GOOD_METRIC = {"key": "m", "value": 1.0, "timestamp": 1, "step": 0}
GOOD_TAG = {"key": "t", "value": "v"}


@pytest.mark.parametrize(("bad", "fragment"), [
    ({"metrics": [GOOD_METRIC, {"key": "m" * 300, "value": 1, "timestamp": 1}]}, "metrics[1].key"),
    ({"metrics": [{"key": "bad key!", "value": 1, "timestamp": 1}]}, "metrics[0].key"),
    ({"metrics": [{"key": "m", "value": "abc", "timestamp": 1}]}, "'metrics[0].value'"),
    ({"metrics": [{"key": "m", "value": [7], "timestamp": 1}]}, "'metrics[0].value'"),
    ({"metrics": [GOOD_METRIC, {"key": "m", "value": 1, "timestamp": -1}]}, "metrics[1].timestamp"),
    ({"tags": [GOOD_TAG, {"key": "t2", "value": "x" * 5001}]}, "tags[1].value"),
    ({"tags": [{"key": "bad\u0000key", "value": "v"}]}, "tags[0].key"),
    ({"tags": [{"key": "mlflow.runName", "value": "n" * 251}]}, "tags[0].value"),
    ({"params": [GOOD_PARAM, {"key": "p2", "value": "x" * 6001}]}, "params[1].value"),
], ids=["metric-key-long", "metric-key-chars", "metric-value-text", "metric-value-list", "metric-timestamp",
        "tag-value-long", "tag-key-nul", "run-name-tag-long", "param-value-long"])
def test_a_refused_log_batch_writes_nothing(base_url: str, bad: dict[str, Any], fragment: str) -> None:
    run_id = new_run(base_url)
    body = {"run_id": run_id, "params": [GOOD_PARAM], "metrics": [GOOD_METRIC], "tags": [GOOD_TAG], **bad}
    status, error = call(base_url, "runs/log-batch", body)
    assert (status, error["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), error
    assert fragment in error["message"]
    assert run_data(base_url, run_id) == {"metrics": [], "params": [], "tags": []}
    assert history(base_url, run_id, "m") == []


def test_a_set_tag_refused_for_its_run_name_writes_nothing(base_url: str) -> None:
    run_id = new_run(base_url)
    status, error = call(base_url, "runs/set-tag", {"run_id": run_id, "key": "mlflow.runName", "value": "n" * 251})
    assert (status, error["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), error
    status, body = call(base_url, "runs/get", {"run_id": run_id})
    assert body["run"]["info"]["run_name"] == "w"
    assert {t["key"]: t["value"] for t in body["run"]["data"]["tags"]} == {"mlflow.runName": "w"}


def test_a_valid_log_batch_writes_all_of_it(base_url: str) -> None:
    run_id = new_run(base_url)
    status, _ = call(base_url, "runs/log-batch", {"run_id": run_id, "params": [GOOD_PARAM], "metrics": [GOOD_METRIC],
                                                  "tags": [GOOD_TAG]})
    assert status == 200
    data = run_data(base_url, run_id)
    assert (data["params"], data["metrics"], data["tags"]) == ([GOOD_PARAM], [GOOD_METRIC], [GOOD_TAG])


@pytest.mark.parametrize(("tags", "fragment"), [
    ([{"key": "ok", "value": "v"}, {"key": "bad\u0000key", "value": "v"}], "tags[1].key"),
    ([{"key": "long", "value": "x" * 20_001}], "tags[0].value"),
    ([{"key": f"k{i}", "value": "v"} for i in range(1001)], "1001"),
], ids=["key", "value", "count"])
def test_an_experiment_refused_for_its_tags_is_not_created(base_url: str, tags: list[dict[str, str]],
                                                          fragment: str) -> None:
    name = unique("tagged")
    status, error = call(base_url, "experiments/create", {"name": name, "tags": tags})
    assert (status, error["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), error
    assert fragment in error["message"]
    status, error = call(base_url, "experiments/get-by-name", {"experiment_name": name})
    assert (status, error["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
    status, created = call(base_url, "experiments/create", {"name": name, "tags": [{"key": "ok", "value": "v"}]})
    assert status == 200, created


# -- a point once per request ---------------------------------------------------------------------


def test_a_point_repeated_in_one_log_batch_is_stored_once(base_url: str) -> None:
    run_id = new_run(base_url)
    point = {"key": "acc", "value": 0.7, "timestamp": 2000, "step": 2}
    other = {**point, "step": 3}
    status, _ = call(base_url, "runs/log-batch", {"run_id": run_id, "metrics": [point, other, point, point]})
    assert status == 200
    assert history(base_url, run_id, "acc") == [point, other]


def test_repeats_are_found_whatever_form_the_points_take() -> None:
    """NaN is one value and -0.0 is 0.0 (as MLflow's table compares them); the first of each stays, in place."""
    metrics = [
        {"key": "a", "value": "NaN", "timestamp": 1, "step": 0},
        {"key": "b", "value": 0.0, "timestamp": 1, "step": 0},
        {"key": "a", "value": float("nan"), "timestamp": 1, "step": 0},
        {"key": "b", "value": -0.0, "timestamp": 1, "step": 0},
        {"key": "b", "value": 0.0, "timestamp": 2, "step": 0},
        {"key": "a", "value": 1, "timestamp": 1, "step": 0},
    ]
    batch = convert.metric_batch("r", metrics, now=5)
    keys = [batch.keys[i] for i in np.frombuffer(batch.key_index, "<u4")]
    values = np.frombuffer(batch.values, "<f8").tolist()
    assert keys == ["a", "b", "b", "a"]
    assert math.isnan(values[0]) and values[1:] == [0.0, 0.0, 1.0]
    assert np.frombuffer(batch.timestamps, "<i8").tolist() == [1, 1, 2, 1]


# -- metric values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[7], [[1]], [1, 2], [], {"v": 1}, True], ids=repr)
def test_a_metric_value_that_is_not_a_number_is_invalid(base_url: str, value: Any) -> None:
    """One metric or many: never read as a number ([7] as 7), never an internal message ([1, 2])."""
    run_id = new_run(base_url)
    plain = [{"key": "m", "value": float(i), "timestamp": 1, "step": i} for i in range(5)]
    for path, body, name in [
        ("runs/log-metric", {"key": "m", "value": value, "timestamp": 1}, "metrics[0].value"),
        ("runs/log-batch", {"metrics": [*plain, {"key": "m", "value": value, "timestamp": 1}]}, "metrics[5].value"),
    ]:
        status, error = call(base_url, path, {"run_id": run_id, **body})
        assert (status, error["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), (path, error)
        assert f"'{name}'" in error["message"] and "expected a number" in error["message"], (path, error)
    assert history(base_url, run_id, "m") == []


def test_metric_values_may_be_numbers_or_strings_of_numbers(base_url: str) -> None:
    run_id = new_run(base_url)
    for step, value in enumerate([3, 1.5, "2.5", "NaN", "Infinity"]):
        status, body = call(base_url, "runs/log-metric", {"run_id": run_id, "key": "v", "value": value,
                                                          "timestamp": 1, "step": step})
        assert status == 200, body
    assert [m["value"] for m in history(base_url, run_id, "v")] == [3.0, 1.5, 2.5, "NaN", "Infinity"]


# -- runs/search ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"experiment_ids": []}, {"experiment_ids": [], "run_view_type": "ALL",
                                                                "order_by": ["metrics.m DESC"]}])
def test_search_runs_without_experiment_ids_finds_none(base_url: str, mlflow_server: ServerThread,
                                                       body: dict[str, Any]) -> None:
    run_id = new_run(base_url, new_experiment(base_url))
    assert call(base_url, "runs/search", body) == (200, {})  # MLflow's JSON for no runs
    # ...but the request is still checked, as MLflow does.
    status, error = call(base_url, "runs/search", {**body, "filter": "params.x = "})
    assert (status, error["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    # trackhouse's own query API reads no ids as every experiment.
    with grpc.insecure_channel(mlflow_server.address) as channel:
        found = query_pb2_grpc.QueryServiceStub(channel).SearchRuns(
            query_pb2.SearchRunsRequest(filter=f"attributes.run_id = '{run_id}'"), timeout=30)
    assert [r.info.run_id for r in found.runs] == [run_id]


@pytest.mark.parametrize("max_results", [0, -1, "0"])
def test_search_runs_max_results_below_one_is_invalid(base_url: str, max_results: Any) -> None:
    status, error = call(base_url, "runs/search", {"experiment_ids": ["0"], "max_results": max_results})
    assert (status, error["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert error["message"] == (f"Invalid value {int(max_results)} for parameter 'max_results' supplied. "
                                "It must be a positive integer")


def test_search_runs_max_results_left_out_is_the_default(base_url: str) -> None:
    experiment_id = new_experiment(base_url)
    run_id = new_run(base_url, experiment_id)
    status, body = call(base_url, "runs/search", {"experiment_ids": [experiment_id]})
    assert status == 200 and [r["info"]["run_id"] for r in body["runs"]] == [run_id]


# -- deleted experiments keep their names ---------------------------------------------------------------


def test_a_deleted_experiments_name_is_taken_until_it_is_restored(base_url: str) -> None:
    name = unique("gone")
    status, created = call(base_url, "experiments/create", {"name": name})
    assert status == 200
    experiment_id = created["experiment_id"]
    assert call(base_url, "experiments/delete", {"experiment_id": experiment_id})[0] == 200
    status, error = call(base_url, "experiments/create", {"name": name})
    assert (status, error["error_code"]) == (400, "RESOURCE_ALREADY_EXISTS")
    assert "deleted state" in error["message"] and experiment_id in error["message"]
    assert call(base_url, "experiments/restore", {"experiment_id": experiment_id})[0] == 200
    status, found = call(base_url, "experiments/get-by-name", {"experiment_name": name})
    assert status == 200 and found["experiment"]["experiment_id"] == experiment_id
    assert found["experiment"]["lifecycle_stage"] == "active"
