"""The MLflow REST API as starlette routes: `mlflow_routes(api)`.

Serves every endpoint of `MlflowApi.endpoints()` under /api/2.0/mlflow/ and
/ajax-api/2.0/mlflow/ (MLflow's UI uses the second), for GET (fields in the
query string, repeated fields repeated) and POST (a JSON object body). Other
paths under those prefixes answer ENDPOINT_NOT_FOUND. Every error leaves as
MLflow's body {"error_code", "message"} with MLflow's HTTP status, translated in
one place (`errors.to_mlflow_error`).

A handler may answer a `StreamedJson` (a whole metric history): it is sent as it is
made, chunk by chunk. Errors raised before the handler returns are error bodies as
above; one raised while streaming, after the status has gone out, is logged and
aborts the response, so the client sees a broken answer, never a short valid one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from trackhouse.query.http.errors import (
    BAD_REQUEST,
    ENDPOINT_NOT_FOUND,
    INTERNAL_ERROR,
    MlflowError,
    invalid,
    to_mlflow_error,
)
from trackhouse.query.http.mlflow_api import Handler, MlflowApi
from trackhouse.query.http.mlflow_history import StreamedJson

log = logging.getLogger(__name__)

PREFIXES = ("/api/2.0/mlflow", "/ajax-api/2.0/mlflow")
METHODS = ["GET", "POST", "PATCH", "DELETE"]
REPEATED = frozenset({"experiment_ids", "order_by", "run_ids"})
# MLflow's MAX_BATCH_LOG_REQUEST_SIZE for log-batch; a generous cap for every other body.
MAX_BATCH_BYTES = 1_000_000
MAX_BODY_BYTES = 16_000_000


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def _body(request: Request, limit: int) -> dict[str, Any]:
    if request.method == "GET":
        query = request.query_params
        return {k: query.getlist(k) if k in REPEATED else query[k] for k in query}
    raw = await request.body()
    if len(raw) > limit:
        raise invalid(f"Batched logging API requests must be at most {limit} bytes in size. Got {len(raw)} bytes."
                      if limit == MAX_BATCH_BYTES else f"request body of {len(raw)} bytes; limit {limit}")
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MlflowError(BAD_REQUEST, f"Malformed request: the body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise MlflowError(BAD_REQUEST, "Malformed request: the body must be a JSON object")
    return body


def _endpoint(handler: Handler, limit: int) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(await _body(request, limit))
            if isinstance(result, StreamedJson):
                return StreamingResponse(_streamed(result.chunks, request), media_type="application/json")
            return _json(result)
        except Exception as exc:
            error = to_mlflow_error(exc)
            if error.error_code == INTERNAL_ERROR:
                log.exception("%s %s failed", request.method, request.url.path)
            return _json(error.body(), error.status)

    return endpoint


async def _streamed(chunks: AsyncIterator[bytes], request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except Exception:
        # The status is sent: no error body can follow. Re-raised, the response is aborted.
        log.exception("%s %s failed while streaming its answer; the response is cut off", request.method,
                      request.url.path)
        raise


async def _not_found(request: Request) -> Response:
    error = MlflowError(ENDPOINT_NOT_FOUND, f"No API endpoint {request.method} {request.url.path}")
    return _json(error.body(), error.status)


def mlflow_routes(api: MlflowApi) -> list[BaseRoute]:
    """The routes of the MLflow REST API over `api`, under both of MLflow's prefixes."""
    routes: list[BaseRoute] = []
    for prefix in PREFIXES:
        for path, handler in api.endpoints().items():
            limit = MAX_BATCH_BYTES if path == "runs/log-batch" else MAX_BODY_BYTES
            routes.append(Route(f"{prefix}/{path}", _endpoint(handler, limit), methods=METHODS))
        routes.append(Route(prefix + "/{rest:path}", _not_found, methods=METHODS))
    return routes
