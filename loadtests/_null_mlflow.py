"""The fastest possible MLflow tracking server: it parses each request and stores nothing.

    python loadtests/_null_mlflow.py PORT

loadtests/mlflow_compare.py drives it with the same `MlflowClient` log_batch workload
as the two real servers: its throughput is the ceiling that MLflow's own client can
reach on this machine, whatever the server. It answers only what that workload calls
(experiments/create, runs/create, runs/log-batch, /health); every body is parsed with
orjson (the least any real server must do) and then dropped.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

API = "/api/2.0/mlflow"


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


async def health(request: Request) -> Response:
    return Response("OK")


async def create_experiment(request: Request) -> Response:
    orjson.loads(await request.body())
    return _json({"experiment_id": "1"})


async def create_run(request: Request) -> Response:
    body = orjson.loads(await request.body())
    run_id = uuid.uuid4().hex
    info = {"run_id": run_id, "run_uuid": run_id, "experiment_id": body.get("experiment_id", "0"),
            "user_id": "", "status": "RUNNING", "start_time": int(time.time() * 1000),
            "artifact_uri": f"/tmp/null/{run_id}", "lifecycle_stage": "active"}
    return _json({"run": {"info": info, "data": {}}})


async def log_batch(request: Request) -> Response:
    body = orjson.loads(await request.body())
    if len(body.get("metrics", ())) > 1000:
        return Response(orjson.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "too many metrics"}),
                         status_code=400, media_type="application/json")
    return _json({})


app = Starlette(routes=[
    Route("/health", health),
    Route(f"{API}/experiments/create", create_experiment, methods=["POST"]),
    Route(f"{API}/runs/create", create_run, methods=["POST"]),
    Route(f"{API}/runs/log-batch", log_batch, methods=["POST"]),
])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
