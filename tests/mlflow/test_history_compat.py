"""The metric-history endpoints as MLflow serves them: the whole series without max_results
(streamed page after page), page tokens free of the page size, MLflow 3's per-run sampling in
get-history-bulk-interval, and a small TRACKHOUSE_QUERY_MAX_HISTORY_PAGE.

One server per module with tiny history pages (7 points, at most 50), so a series of a few
hundred points spans many pages.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import requests
from starlette.applications import Starlette

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.query.http.mlflow_history import StreamedJson
from trackhouse.query.http.routes import mlflow_routes
from trackhouse.query.settings import QuerySettings
from trackhouse.store import open_store

PAGE, MAX_PAGE = 7, 50
API = "/api/2.0/mlflow"
Point = dict[str, Any]


def call(base: str, path: str, body: dict[str, Any], *, get: bool = False) -> tuple[int, dict[str, Any]]:
    url = f"{base}{API}/{path}"
    resp = requests.get(url, params=body, timeout=30) if get else requests.post(url, json=body, timeout=30)
    return resp.status_code, resp.json()


def log(base: str, run_id: str, points: list[Point]) -> None:
    for i in range(0, len(points), 1000):
        assert call(base, "runs/log-batch", {"run_id": run_id, "metrics": points[i:i + 1000]})[0] == 200


def new_run(base: str) -> str:
    status, body = call(base, "runs/create", {"experiment_id": "0"})
    assert status == 200
    return str(body["run"]["info"]["run_id"])


def ordered(points: list[Point]) -> list[Point]:
    """In the server's order: step, timestamp, value (NaN after numbers)."""
    return sorted(points, key=lambda p: (p["step"], p["timestamp"], math.isnan(p["value"]), p["value"]))


def as_json(points: list[Point]) -> list[Point]:
    """Proto JSON: NaN and infinities as strings."""
    def number(v: float) -> float | str:
        return v if math.isfinite(v) else "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"

    return [{**p, "value": number(p["value"])} for p in points]


def mlflow_sample(n: int, k: int) -> list[int]:
    """MLflow 3's SqlAlchemyStore._sample_rows_with_window_functions, as indices into n ordered points:
    NTILE(k), the first point of each tile, then the last point (in place of the last kept at k)."""
    if n == 0:
        return []
    tiles = [t for t in range(k) for _ in range(n // k + (1 if t < n % k else 0))]
    kept = [i for i in range(n) if i == 0 or tiles[i] != tiles[i - 1]]
    if kept[-1] != n - 1:
        if len(kept) >= k:
            kept[-1] = n - 1
        else:
            kept.append(n - 1)
    return kept


class Env:
    def __init__(self, base: str) -> None:
        self.base = base
        self.port = int(base.rsplit(":", 1)[1])
        # 100 points of "loss" in groups of 4 at one (step, timestamp): ties cut by every page of 7;
        # a NaN and infinities among them.
        self.run = new_run(base)
        loss = [{"key": "loss", "value": float(i), "timestamp": 1_000 + i // 8, "step": i // 4} for i in range(100)]
        loss[13]["value"], loss[50]["value"], loss[51]["value"] = math.nan, math.inf, -math.inf
        log(base, self.run, as_json(loss))
        self.loss = as_json(ordered(loss))
        # For sampling: 300 points all at step 0, 95 over steps 0..47, 4, and none.
        self.runs = {name: new_run(base) for name in ("flat", "ramp", "short", "none")}
        self.points = {
            "flat": [{"key": "m", "value": float(i % 7), "timestamp": i, "step": 0} for i in range(300)],
            "ramp": [{"key": "m", "value": float(i), "timestamp": 5, "step": i // 2} for i in range(95)],
            "short": [{"key": "m", "value": 1.0, "timestamp": i, "step": 10 * i} for i in range(4)],
            "none": [],
        }
        for name, points in self.points.items():
            if points:
                log(base, self.runs[name], points)

    def walk(self, sizes: Iterator[int]) -> tuple[list[Point], int]:
        """Every page of loss, each asking the next size; and how many pages."""
        out: list[Point] = []
        token, pages = "", 0
        while True:
            body: dict[str, Any] = {"run_id": self.run, "metric_key": "loss", "max_results": next(sizes)}
            status, page = call(self.base, "metrics/get-history", {**body, "page_token": token}, get=True)
            assert status == 200, page
            out += page["metrics"]
            pages += 1
            token = page.get("next_page_token", "")
            if not token:
                return out, pages


@pytest.fixture(scope="module")
def env(chdb_dsn: str) -> Iterator[Env]:
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    config = ServerConfig(store="", database=store.database, grpc_port=0, http_port=0,
                          ingest=IngestSettings(flush_interval=0.05),
                          query=QuerySettings(history_page=PAGE, max_history_page=MAX_PAGE))
    thread = ServerThread(config, store=store)
    try:
        thread.start()
        yield Env(f"http://127.0.0.1:{thread.server.http_port}")
    finally:
        thread.stop(grace=1.0)
        store.close()


# -- metrics/get-history ------------------------------------------------------------------


def test_explicit_pages_are_the_series_in_order(env: Env) -> None:
    got, pages = env.walk(iter(lambda: PAGE, None))
    assert got == env.loss and pages == -(-100 // PAGE)


@pytest.mark.parametrize("how", ["get", "post", "post-null"])
def test_without_max_results_the_whole_series_in_one_answer(env: Env, how: str) -> None:
    body: dict[str, Any] = {"run_id": env.run, "metric_key": "loss"}
    if how == "post-null":
        body["max_results"] = None
    status, got = call(env.base, "metrics/get-history", body, get=how == "get")
    assert status == 200
    assert got == {"metrics": env.loss}  # every page, in page order, and no next_page_token


def test_the_whole_series_is_streamed(env: Env) -> None:
    resp = requests.get(f"{env.base}{API}/metrics/get-history", params={"run_id": env.run, "metric_key": "loss"},
                        timeout=30, stream=True)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.headers.get("transfer-encoding") == "chunked" and "content-length" not in resp.headers
    assert resp.json() == {"metrics": env.loss}


def test_a_page_token_without_max_results_reads_the_rest(env: Env) -> None:
    status, first = call(env.base, "metrics/get-history", {"run_id": env.run, "metric_key": "loss",
                                                            "max_results": 10})
    assert status == 200 and len(first["metrics"]) == 10
    status, rest = call(env.base, "metrics/get-history", {"run_id": env.run, "metric_key": "loss",
                                                           "page_token": first["next_page_token"]})
    assert status == 200 and rest == {"metrics": env.loss[10:]}


def test_max_results_may_change_from_page_to_page(env: Env) -> None:
    got, pages = env.walk(iter([10, 1, 3, 50, 7, 49]))
    assert got == env.loss and pages == 6


@pytest.mark.parametrize(("value", "get"), [(0, False), (-1, False), ("0", True), ("-5", True)])
def test_max_results_below_one_is_invalid_as_in_mlflow(env: Env, value: Any, get: bool) -> None:
    status, body = call(env.base, "metrics/get-history",
                        {"run_id": env.run, "metric_key": "loss", "max_results": value}, get=get)
    assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert body["message"] == (f"Invalid value {int(value)} for parameter 'max_results' supplied. "
                               "It must be a positive integer.")


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"run_id": "f" * 32, "metric_key": "loss"}, 404, "RESOURCE_DOES_NOT_EXIST"),
    ({"metric_key": "loss", "page_token": "garbage!"}, 400, "INVALID_PARAMETER_VALUE"),
])
def test_errors_are_mlflow_error_bodies(env: Env, body: dict[str, Any], status: int, code: str) -> None:
    got_status, got = call(env.base, "metrics/get-history", {"run_id": env.run, **body})
    assert (got_status, got["error_code"]) == (status, code) and got["message"]


def test_max_results_above_the_server_s_page_is_a_page_and_a_token(env: Env) -> None:
    status, page = call(env.base, "metrics/get-history", {"run_id": env.run, "metric_key": "loss",
                                                          "max_results": MAX_PAGE + 1})
    assert status == 200 and page["metrics"] == env.loss[:MAX_PAGE] and page["next_page_token"]


def test_mlflows_client_asking_more_than_a_page_gets_the_whole_series(env: Env) -> None:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"http://127.0.0.1:{env.port}").get_metric_history(env.run, "loss")  # 25,000 a page
    assert [(m.step, m.timestamp) for m in history] == [(p["step"], p["timestamp"]) for p in env.loss]


def test_unknown_key_is_empty(env: Env) -> None:
    assert call(env.base, "metrics/get-history", {"run_id": env.run, "metric_key": "nosuch"}) == (
        200, {"metrics": []})


def test_mlflows_rest_store_gets_the_whole_series(env: Env) -> None:
    """MLflow's RestStore (the plugin) asks once, without max_results, and never follows a token."""
    import mlflow.tracking  # noqa: F401  (first: mlflow's import loads the plugin by its entry point)

    from trackhouse.query.http.mlflow_plugin import TrackhouseStore

    store = TrackhouseStore(f"trackhouse://127.0.0.1:{env.port}")
    history = store.get_metric_history(env.run, "loss")
    assert [(m.step, m.timestamp) for m in history] == [(p["step"], p["timestamp"]) for p in env.loss]
    # AbstractStore's bulk interval (RestStore has none of its own) samples that whole history.
    sampled = store.get_metric_history_bulk_interval([env.run], "loss", 10, None, None)
    assert sampled[0].step == 0 and sampled[-1].step == env.loss[-1]["step"]


def test_a_failure_while_streaming_cuts_the_answer_off(caplog: pytest.LogCaptureFixture) -> None:
    """After the status has gone out an error cannot be a body: the response never completes."""
    async def handler(body: Any) -> StreamedJson:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"metrics":['
            raise RuntimeError("the store went away")

        return StreamedJson(chunks())

    class Api:
        def endpoints(self) -> dict[str, Any]:
            return {"metrics/get-history": handler}

    app = Starlette(routes=mlflow_routes(Api()))  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": f"{API}/metrics/get-history", "raw_path": b"",
             "root_path": "", "query_string": b"", "headers": [], "server": ("127.0.0.1", 1)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="the store went away"):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [m["body"] for m in sent[1:]] == [b'{"metrics":[']
    assert all(m.get("more_body") for m in sent[1:])  # never the end of the body
    assert "failed while streaming" in caplog.text


# -- metrics/get-history-bulk-interval ------------------------------------------------------


def bulk(env: Env, names: list[str], **fields: Any) -> tuple[int, dict[str, Any]]:
    return call(env.base, "metrics/get-history-bulk-interval",
                {"run_ids": [env.runs[n] for n in names], "metric_key": "m", **fields}, get=True)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10, 47, 95, 2500])
def test_bulk_interval_samples_each_run_as_mlflow(env: Env, k: int) -> None:
    names = ["flat", "ramp", "short", "none"]
    status, got = bulk(env, names, max_results=k)
    assert status == 200
    want = []
    for name in names:
        points = ordered(env.points[name])
        want += [{**points[i], "run_id": env.runs[name]} for i in mlflow_sample(len(points), k)]
    assert got["metrics"] == want
    for name in ("flat", "ramp"):  # at most k per run, the last point always among them
        mine = [m for m in got["metrics"] if m["run_id"] == env.runs[name]]
        assert len(mine) == min(k, len(env.points[name])) and mine[-1] == {**ordered(env.points[name])[-1],
                                                                           "run_id": env.runs[name]}


def test_bulk_interval_of_points_all_at_one_step_is_at_most_max_results(env: Env) -> None:
    status, got = bulk(env, ["flat"], max_results=10)
    assert status == 200 and len(got["metrics"]) == 10
    assert [m["timestamp"] for m in got["metrics"]] == [0, 30, 60, 90, 120, 150, 180, 210, 240, 299]


def test_bulk_interval_samples_within_the_step_range(env: Env) -> None:
    status, got = bulk(env, ["ramp", "flat", "ramp"], start_step=3, end_step=20, max_results=5)
    assert status == 200
    ramp = [p for p in ordered(env.points["ramp"]) if 3 <= p["step"] <= 20]
    mine = [{**ramp[i], "run_id": env.runs["ramp"]} for i in mlflow_sample(len(ramp), 5)]
    assert got["metrics"] == mine + mine  # "flat" has nothing in range; a run asked twice answers twice


def test_bulk_interval_is_not_limited_by_a_small_max_history_page(env: Env) -> None:
    """The runs here have up to 300 points and the largest history page is 50: all answer."""
    status, got = bulk(env, ["flat", "ramp"])
    assert status == 200
    assert len(got["metrics"]) == 300 + 95 and got["metrics"][-1]["value"] == 94.0


def test_bulk_interval_of_an_unknown_run_is_not_found(env: Env) -> None:
    status, body = call(env.base, "metrics/get-history-bulk-interval",
                        {"run_ids": [env.runs["flat"], "f" * 32], "metric_key": "m"}, get=True)
    assert (status, body["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
