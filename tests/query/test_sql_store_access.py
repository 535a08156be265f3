"""The SQL endpoint reaches the store as search and ingest do, and says so when the store refuses it.

Over the HTTP fixture (or TRACKHOUSE_TEST_CLICKHOUSE_URL), which checks user and
password on every request: credentials given only as TRACKHOUSE_STORE_* settings
reach the SQL sandbox's connections too, and credentials the store refuses are the
store's error (UNAVAILABLE, HTTP 503), never "cannot parse the query".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc
import orjson
import pyarrow as pa
import pytest

from trackhouse.query.http.sql import error_response
from trackhouse.query.service import status_for
from trackhouse.query.sql import SqlQueries
from trackhouse.store import Store, StoreUnavailable, open_store, parse_dsn
from trackhouse.store.dsn import connect
from trackhouse.store.settings import StoreSettings


def answer(store: Store, query: str) -> list[dict[str, Any]]:
    async def collect() -> pa.Table:
        async with SqlQueries(store).run(query) as running:
            return pa.Table.from_batches([b async for b in running], schema=running.schema)

    return list(asyncio.run(collect()).to_pylist())


def refused(store: Store, query: str = "SELECT 1 AS x") -> StoreUnavailable:
    with pytest.raises(StoreUnavailable) as info:
        answer(store, query)
    return info.value


def assert_store_error(exc: StoreUnavailable) -> None:
    assert "refused the SQL endpoint's connection or its credentials" in str(exc)
    assert "AUTHENTICATION_FAILED" in str(exc) and "parse" not in str(exc)
    response = error_response(exc)
    assert response.status_code == 503
    assert orjson.loads(bytes(response.body))["error_code"] == "UNAVAILABLE"
    assert status_for(exc)[0] == grpc.StatusCode.UNAVAILABLE


def bare(url: str) -> str:
    dsn = parse_dsn(url)
    return f"{dsn.scheme}://{dsn.host}:{dsn.port}"


@pytest.fixture
def store_by_settings(clickhouse_http_url: str) -> Iterator[Store]:
    """A store whose DSN names no user: user and password are settings (TRACKHOUSE_STORE_USER / _PASSWORD)."""
    dsn = parse_dsn(clickhouse_http_url)
    store = open_store(bare(clickhouse_http_url), f"t_{uuid.uuid4().hex[:12]}",
                       settings=StoreSettings(user=dsn.username, password=dsn.password))
    try:
        yield store
    finally:
        store.close()
        client = connect(dsn)
        for db in (store.database, store.database + "_sql"):
            client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def test_sql_uses_the_credentials_of_the_store_settings(store_by_settings: Store) -> None:
    assert store_by_settings.query_rows("SELECT 1") == [(1,)]  # what search and history read with
    assert answer(store_by_settings, "SELECT count() AS n FROM runs") == [{"n": 0}]


def test_credentials_refused_when_opening_are_a_store_error(clickhouse_http_url: str) -> None:
    dsn = parse_dsn(clickhouse_http_url)
    wrong = f"{dsn.scheme}://{dsn.username}:not-the-password@{dsn.host}:{dsn.port}"
    store = Store(parse_dsn(wrong), "trackhouse")  # never opened: only the sandbox connects
    try:
        assert_store_error(refused(store))
    finally:
        store.close()


def test_credentials_refused_on_an_open_connection_are_a_store_error(chdb_dsn: str, chhttp_module: ModuleType) -> None:
    """The server checks credentials on every request: a password changed on the server after
    the sandbox opened its connection is refused at the next query, still as the store's error."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    open_store(chdb_dsn, database).close()  # migrated in-process: faster than over HTTP, same data path
    server = chhttp_module.ChHttpServer(parse_dsn(chdb_dsn).path, password="before")
    store = open_store(server.start(), database, migrate=False)
    try:
        assert answer(store, "SELECT 1 AS x") == [{"x": 1}]
        # The fixture's App, behind uvicorn: its password, as an administrator would change it.
        app = server._server.config.app
        app.routes[0].endpoint.__self__.password = "after"
        assert_store_error(refused(store))
    finally:
        store.close()
        server.stop()
