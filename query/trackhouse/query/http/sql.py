"""`POST /api/v1/sql`: read-only SQL over HTTP.

Body: `{"query": "SELECT …", "format": "arrow" | "json" | "csv"}` (format defaults
to json). Answers: an Arrow IPC stream (application/vnd.apache.arrow.stream),
`{"columns": [...], "rows": [[...]]}` (application/json) or CSV with a header.
The answer is built whole before it is sent — bounded by the SQL result limits —
so a limit hit is still a clean error; the gRPC `Sql` RPC streams instead.

Errors: `{"error_code", "message"}` with 400 INVALID_ARGUMENT (refused, syntax,
bad body), 413 RESOURCE_EXHAUSTED (a limit, named), 429 RESOURCE_EXHAUSTED with
`Retry-After` (every SQL slot busy), 503 UNAVAILABLE (store).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
import pyarrow as pa
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from trackhouse.query.errors import Busy, InvalidArgument, QueryError, ResourceExhausted
from trackhouse.query.filters import FilterError
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlformat import arrow_stream, csv_body, json_body
from trackhouse.store import StoreError

log = logging.getLogger(__name__)

PATH = "/api/v1/sql"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
FORMATS = {"arrow": (arrow_stream, ARROW_STREAM), "json": (json_body, "application/json"),
           "csv": (csv_body, "text/csv; charset=utf-8")}
# Who may see which experiments: None = all (auth wires the principal's set here).
Scope = Callable[[Request], "frozenset[str] | None"]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error_code": code, "message": message}), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(exc: Exception) -> Response:
    """The one mapping of SQL errors to HTTP statuses."""
    if isinstance(exc, Busy):
        return _error(429, "RESOURCE_EXHAUSTED", str(exc), {"Retry-After": "1"})
    if isinstance(exc, ResourceExhausted):
        return _error(413, "RESOURCE_EXHAUSTED", str(exc))
    if isinstance(exc, (InvalidArgument, FilterError)):
        return _error(400, "INVALID_ARGUMENT", str(exc))
    if isinstance(exc, StoreError):
        return _error(503, "UNAVAILABLE", f"store error: {exc}")
    return _error(500, "INTERNAL", "internal error")


async def _request(request: Request, limit: int) -> tuple[str, str]:
    raw = await request.body()
    if len(raw) > limit:
        raise InvalidArgument(f"request body of {len(raw)} bytes; limit {limit}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not JSON ({exc}); send {{\"query\": \"SELECT …\"}}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object: {\"query\": \"SELECT …\", \"format\": \"json\"}")
    query, fmt = body.get("query"), body.get("format", "json")
    if not isinstance(query, str) or not query.strip():
        raise InvalidArgument("query: required, a string holding one SELECT")
    if not isinstance(fmt, str):
        raise InvalidArgument(f"format: a string, one of {sorted(FORMATS)}; got {orjson.dumps(fmt).decode()}")
    if fmt not in FORMATS:
        raise InvalidArgument(f"format: {fmt!r} is not one of {sorted(FORMATS)}")
    return query, fmt


def sql_routes(sql: SqlQueries, scope: Scope = lambda _: None) -> list[BaseRoute]:
    limit = sql.settings.sql_max_query_length * 4 + 4096  # UTF-8 and JSON escaping

    async def endpoint(request: Request) -> Response:
        try:
            query, fmt = await _request(request, limit)
            async with sql.run(query, experiment_ids=scope(request)) as answer:
                batches = [batch async for batch in answer]
            schema = answer.schema or (batches[0].schema if batches else pa.schema([]))
            encode, media_type = FORMATS[fmt]
            return Response(encode(pa.Table.from_batches(batches, schema=schema)), media_type=media_type)
        except (QueryError, FilterError, StoreError) as exc:
            return error_response(exc)
        except Exception as exc:
            log.exception("POST %s failed", PATH)
            return error_response(exc)

    return [Route(PATH, endpoint, methods=["POST"])]
