"""The REST protocol itself: prefixes, error bodies and statuses, MLflow's limits, bulk history."""

from __future__ import annotations

from typing import Any

import pytest
import requests


def call(base_url: str, path: str, body: dict[str, Any] | None = None, *, get: bool = False,
         prefix: str = "/api/2.0/mlflow") -> tuple[int, dict[str, Any]]:
    url = f"{base_url}{prefix}/{path}"
    resp = requests.get(url, params=body, timeout=30) if get else requests.post(url, json=body or {}, timeout=30)
    return resp.status_code, resp.json()


def new_run(base_url: str) -> str:
    status, body = call(base_url, "runs/create", {"experiment_id": "0", "run_name": "proto"})
    assert status == 200
    return str(body["run"]["info"]["run_id"])


def test_ajax_prefix_serves_the_same_api(base_url: str) -> None:
    run_id = new_run(base_url)
    status, body = call(base_url, "runs/get", {"run_id": run_id}, get=True, prefix="/ajax-api/2.0/mlflow")
    assert status == 200 and body["run"]["info"]["run_id"] == run_id
    assert body["run"]["info"]["run_uuid"] == run_id


@pytest.mark.parametrize(("path", "body", "get", "status", "code"), [
    ("runs/get", {"run_id": "f" * 32}, True, 404, "RESOURCE_DOES_NOT_EXIST"),
    ("runs/get", {}, True, 400, "INVALID_PARAMETER_VALUE"),
    ("experiments/get", {"experiment_id": "12345"}, True, 404, "RESOURCE_DOES_NOT_EXIST"),
    ("experiments/create", {}, False, 400, "INVALID_PARAMETER_VALUE"),
    ("experiments/create", {"name": "Default"}, False, 400, "RESOURCE_ALREADY_EXISTS"),
    ("runs/search", {"filter": "params.x = "}, False, 400, "INVALID_PARAMETER_VALUE"),
    ("runs/search", {"max_results": 50_001}, False, 400, "INVALID_PARAMETER_VALUE"),
    ("runs/search", {"run_view_type": "\u00b2"}, False, 400, "INVALID_PARAMETER_VALUE"),  # "²".isdigit()
    ("experiments/search", {"view_type": "\u00b2"}, False, 400, "INVALID_PARAMETER_VALUE"),
    ("runs/no-such-endpoint", {}, False, 404, "ENDPOINT_NOT_FOUND"),
])
def test_errors_have_mlflow_codes_and_statuses(base_url: str, path: str, body: dict[str, Any], get: bool,
                                               status: int, code: str) -> None:
    got_status, got = call(base_url, path, body, get=get)
    assert (got_status, got["error_code"]) == (status, code)
    assert isinstance(got["message"], str) and got["message"]


def test_malformed_json_is_bad_request(base_url: str) -> None:
    resp = requests.post(f"{base_url}/api/2.0/mlflow/runs/search", data=b"{nope", timeout=30)
    assert resp.status_code == 400 and resp.json()["error_code"] == "BAD_REQUEST"


@pytest.mark.parametrize(("field", "count"), [("metrics", 1001), ("params", 101), ("tags", 101)])
def test_log_batch_limits(base_url: str, field: str, count: int) -> None:
    run_id = new_run(base_url)
    items = ([{"key": f"k{i}", "value": 1.0, "timestamp": 1, "step": 0} for i in range(count)] if field == "metrics"
             else [{"key": f"k{i}", "value": "v"} for i in range(count)])
    status, body = call(base_url, "runs/log-batch", {"run_id": run_id, field: items})
    assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert f"at most {count - 1} {field}" in body["message"]


@pytest.mark.parametrize(("item", "fragment"), [
    ({"params": [{"key": "k" * 251, "value": "v"}]}, "250"),
    ({"params": [{"key": "p", "value": "v" * 6001}]}, "6000"),
    ({"tags": [{"key": "t", "value": "v" * 5001}]}, "5000"),
    ({"metrics": [{"key": "bad key!", "value": 1.0, "timestamp": 1}]}, "invalid name"),
    ({"metrics": [{"key": "m", "value": "high", "timestamp": 1}]}, "number"),
])
def test_log_batch_validates_keys_and_values(base_url: str, item: dict[str, Any], fragment: str) -> None:
    status, body = call(base_url, "runs/log-batch", {"run_id": new_run(base_url), **item})
    assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert fragment in body["message"].lower()


def test_log_batch_body_over_one_megabyte_is_refused(base_url: str) -> None:
    tags = [{"key": f"t{i}", "value": "v" * 4_999} for i in range(100)]
    params = [{"key": f"p{i}", "value": "v" * 5_999} for i in range(100)]
    status, body = call(base_url, "runs/log-batch", {"run_id": new_run(base_url), "tags": tags, "params": params})
    assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE")


def test_history_pages_and_bulk_interval(base_url: str) -> None:
    run_ids = [new_run(base_url) for _ in range(2)]
    for r, run_id in enumerate(run_ids):
        metrics = [{"key": "m", "value": float(i * (r + 1)), "timestamp": 10 + i, "step": i} for i in range(100)]
        assert call(base_url, "runs/log-batch", {"run_id": run_id, "metrics": metrics})[0] == 200
    status, page = call(base_url, "metrics/get-history", {"run_id": run_ids[0], "metric_key": "m",
                                                          "max_results": 60}, get=True)
    assert status == 200 and len(page["metrics"]) == 60 and page["next_page_token"]
    status, rest = call(base_url, "metrics/get-history", {"run_id": run_ids[0], "metric_key": "m",
                                                          "max_results": 60, "page_token": page["next_page_token"]},
                        get=True)
    assert [m["step"] for m in page["metrics"] + rest["metrics"]] == list(range(100))
    assert "next_page_token" not in rest
    assert page["metrics"][1] == {"key": "m", "value": 1.0, "timestamp": 11, "step": 1}

    status, bulk = call(base_url, "metrics/get-history-bulk-interval",
                        {"run_ids": run_ids, "metric_key": "m", "start_step": 10, "end_step": 50, "max_results": 5},
                        get=True)
    assert status == 200
    # MLflow 3 samples each run's 41 points in range: NTILE(5) tiles of 9, 8, 8, 8, 8 points, the first
    # of each tile, and the last point in place of the last one kept.
    steps = [10, 19, 27, 35, 50]
    assert [(m["run_id"], m["step"]) for m in bulk["metrics"]] == [(r, s) for r in run_ids for s in steps]
    assert [m["value"] for m in bulk["metrics"]] == [float(s) for s in steps] + [float(2 * s) for s in steps]
    status, bad = call(base_url, "metrics/get-history-bulk-interval",
                       {"run_ids": run_ids, "metric_key": "m", "start_step": 10}, get=True)
    assert (status, bad["error_code"]) == (400, "INVALID_PARAMETER_VALUE")


def test_log_inputs_is_accepted(base_url: str) -> None:
    status, body = call(base_url, "runs/log-inputs", {"run_id": new_run(base_url), "datasets": []})
    assert (status, body) == (200, {})


@pytest.mark.parametrize(("path", "fields", "name"), [
    ("runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1, "step": 2**70}, "step"),
    ("runs/log-metric", {"key": "m", "value": 1.0, "timestamp": -(2**64), "step": 0}, "timestamp"),
    ("runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1, "step": 2**63}, "step"),
    ("runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1, "step": 1e30}, "step"),
    ("runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1, "step": str(2**70)}, "step"),
    ("runs/log-batch", {"metrics": [{"key": "m", "value": 1.0, "timestamp": 1, "step": 2**70}]}, "step"),
    ("runs/log-batch", {"metrics": [{"key": "m", "value": 1.0, "timestamp": -(2**64), "step": 0}]}, "timestamp"),
    ("runs/update", {"end_time": 2**70}, "end_time"),
    ("runs/update", {"end_time": 2**64 - 1}, "end_time"),  # orjson reads up to 2**64 - 1 exactly
])
def test_integers_outside_int64_are_invalid_naming_the_field(base_url: str, path: str, fields: dict[str, Any],
                                                             name: str) -> None:
    status, body = call(base_url, path, {"run_id": new_run(base_url), **fields})
    assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), body
    assert f"'{name}'" in body["message"] and "int64" in body["message"]


def test_run_start_time_outside_int64_is_invalid(base_url: str) -> None:
    status, body = call(base_url, "runs/create", {"experiment_id": "0", "start_time": 2**70})
    assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), body
    assert "'start_time'" in body["message"]
    ok, run = call(base_url, "runs/create", {"experiment_id": "0", "start_time": 2**63 - 1})
    assert ok == 200 and run["run"]["info"]["start_time"] == 2**63 - 1


@pytest.mark.parametrize("step", [1.5, True, "1.5"], ids=["float", "bool", "string"])
def test_a_step_that_is_not_an_integer_is_invalid_on_every_path(base_url: str, step: Any) -> None:
    """One metric or a thousand: a fractional or boolean step is refused, never truncated to an integer."""
    run_id = new_run(base_url)
    for metrics in ([{"key": "m", "value": 1.0, "timestamp": 1, "step": step}],
                    [{"key": "m", "value": 1.0, "timestamp": 1, "step": i} for i in range(999)]
                    + [{"key": "m", "value": 1.0, "timestamp": 1, "step": step}]):
        status, body = call(base_url, "runs/log-batch", {"run_id": run_id, "metrics": metrics})
        assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), body
        assert "'step'" in body["message"]
