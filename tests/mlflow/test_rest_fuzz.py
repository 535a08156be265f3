"""Fuzz the MLflow REST API: random bodies, wrong types, huge numbers, deep nesting, bad content types.

Every endpoint of the real HTTP server (one per module, port 0) gets generated
requests — JSON objects whose fields have the names MLflow uses but any JSON
value, raw bytes, deeply nested JSON, query strings — and must answer with a
status below 500; every error is MLflow's body {"error_code", "message"} with a
4xx. A request that hangs fails by pytest-timeout (requests have a timeout too).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trackhouse.cli.server import ServerThread
from trackhouse.query.http.routes import PREFIXES

# Each example is a round trip to a real server: a fifth of the profile's examples.
SERVER_EXAMPLES = max(10, settings().max_examples // 5)
ENDPOINTS = [
    "experiments/create", "experiments/get", "experiments/get-by-name", "experiments/search",
    "experiments/update", "experiments/delete", "experiments/restore", "experiments/set-experiment-tag",
    "experiments/delete-experiment-tag", "runs/create", "runs/get", "runs/update", "runs/delete",
    "runs/restore", "runs/search", "runs/log-metric", "runs/log-parameter", "runs/set-tag", "runs/delete-tag",
    "runs/log-batch", "runs/log-inputs", "metrics/get-history", "metrics/get-history-bulk-interval",
    "no/such-endpoint",
]
FIELDS = [
    "experiment_id", "experiment_ids", "name", "new_name", "artifact_location", "run_id", "run_uuid", "run_ids",
    "run_name", "user_id", "start_time", "end_time", "status", "key", "value", "timestamp", "step", "metrics",
    "params", "tags", "filter", "filter_string", "order_by", "max_results", "page_token", "run_view_type",
    "view_type", "metric_key", "start_step", "end_step", "datasets", "inputs",
]
NASTY_STRINGS = ["", "0", "-1", "NaN", "Infinity", "1e999", "9" * 400, "' OR 1=1 --", "\x00", "é" * 300,
                 "metrics.a < 1", "x" * 20_000]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40), st.sampled_from(NASTY_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from([*FIELDS, "x"]), inner, max_size=4)),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def rest(module_server_factory: Any) -> Iterator[tuple[str, str]]:
    """(base URL, a real run id) of a module server."""
    with module_server_factory(http=True) as thread:
        thread_: ServerThread = thread
        base = f"http://127.0.0.1:{thread_.server.http_port}"
        resp = requests.post(f"{base}/api/2.0/mlflow/runs/create", json={"experiment_id": "0"}, timeout=30)
        assert resp.status_code == 200
        yield base, resp.json()["run"]["info"]["run_id"]


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _check(resp: requests.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error_code", "message"}, body
        assert isinstance(body["message"], str) and body["error_code"].isupper()


@st.composite
def bodies(draw: st.DrawFn, run_id: str) -> dict[str, Any]:
    """An object with MLflow's field names; values of any type, or the real run id/experiment to go deep."""
    good = st.sampled_from([run_id, "0", [run_id], ["0"]])
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    return {f: draw(st.one_of(json_values, good)) for f in fields}


@settings(max_examples=SERVER_EXAMPLES)
@given(st.sampled_from(ENDPOINTS), st.data())
def test_random_json_bodies(rest: tuple[str, str], session: requests.Session, endpoint: str,
                            data: st.DataObject) -> None:
    base, run_id = rest
    body = data.draw(bodies(run_id))
    prefix = data.draw(st.sampled_from(PREFIXES))
    resp = session.post(f"{base}{prefix}/{endpoint}", data=json.dumps(body), timeout=30,
                        headers={"content-type": "application/json"})
    _check(resp)


@settings(max_examples=SERVER_EXAMPLES)
@given(st.sampled_from(ENDPOINTS), st.dictionaries(st.sampled_from(FIELDS),
                                                   st.one_of(st.text(max_size=30), st.sampled_from(NASTY_STRINGS)),
                                                   max_size=5))
def test_random_query_strings(rest: tuple[str, str], session: requests.Session, endpoint: str,
                              params: dict[str, str]) -> None:
    base, _ = rest
    _check(session.get(f"{base}/api/2.0/mlflow/{endpoint}", params=params, timeout=30))


@settings(max_examples=SERVER_EXAMPLES)
@given(st.sampled_from(ENDPOINTS), st.binary(max_size=200),
       st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                        "multipart/form-data", "application/json; charset=latin-1", ""]),
       st.sampled_from(["POST", "PATCH", "DELETE"]))
@example("runs/search", b"[" * 100_000, "application/json", "POST")
@example("runs/search", b'{"a":' * 5000, "application/json", "POST")
@example("runs/log-batch", b'{"metrics": [' + b'{"key":"k","value":1e400,"timestamp":1,"step":0},' * 3 + b"]}",
         "application/json", "POST")
@example("runs/create", b"\xff\xfe\x00", "application/json", "POST")
def test_random_raw_bodies(rest: tuple[str, str], session: requests.Session, endpoint: str, raw: bytes,
                           content_type: str, method: str) -> None:
    base, _ = rest
    headers = {"content-type": content_type} if content_type else {}
    _check(session.request(method, f"{base}/api/2.0/mlflow/{endpoint}", data=raw, headers=headers, timeout=30))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_deep_nesting_and_huge_numbers_in_every_field(rest: tuple[str, str], session: requests.Session,
                                                      endpoint: str) -> None:
    base, run_id = rest
    deep: Any = run_id
    for _ in range(500):
        deep = [deep]
    for value in (deep, 10**300, -(10**30), 1e308, [1e308] * 3, {"key": {"key": []}}, True):
        body = {"run_id": run_id, "experiment_id": "0", **{f: value for f in FIELDS if f not in ("run_id",)}}
        _check(session.post(f"{base}/api/2.0/mlflow/{endpoint}", json=body, timeout=30))
