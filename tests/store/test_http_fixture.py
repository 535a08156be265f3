"""The ClickHouse HTTP endpoint of the test session, through clickhouse-connect (and raw HTTP).

These run against tests/support/chhttp.py (chDB served over HTTP) or, when
TRACKHOUSE_TEST_CLICKHOUSE_URL is set, a real ClickHouse server: what passes on
both is the protocol subset the fixture promises. The last few tests are of the
fixture's own parsing and are skipped against a real server.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, Error
from clickhouse_connect.driver.summary import QuerySummary

from trackhouse.store import StoreUnavailable, parse_dsn
from trackhouse.store.dsn import DSN, connect

REAL_SERVER = bool(os.environ.get("TRACKHOUSE_TEST_CLICKHOUSE_URL"))


def client_for(url: str, **options: Any) -> Any:
    dsn = parse_dsn(url)
    options.setdefault("autogenerate_session_id", False)
    return clickhouse_connect.get_client(host=dsn.host, port=dsn.port, username=dsn.username,
                                         password=dsn.password, **options)


@pytest.fixture
def db(clickhouse_http_url: str) -> Iterator[tuple[Any, str]]:
    """A clickhouse-connect HTTP client and a fresh database (dropped afterwards)."""
    client = client_for(clickhouse_http_url)
    name = f"h_{uuid.uuid4().hex[:12]}"
    client.command(f"CREATE DATABASE {name}")
    try:
        yield client, name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def make_table(client: Any, db: str) -> str:
    client.command(
        f"CREATE TABLE {db}.t (id Int64, name String, tag LowCardinality(String), n Nullable(Int64), "
        "xs Array(String), pair Tuple(Int64, Float64), v Float64) ENGINE = MergeTree ORDER BY id"
    )
    return f"{db}.t"


ROWS = [
    (1, "a", "red", None, ["p", "q'"], (1, 0.5), 1.5),
    (2, "b\tc\nd", "blue", 7, [], (2, -1.0), math.inf),
]


def test_handshake_and_ping(clickhouse_http_url: str) -> None:
    client = client_for(clickhouse_http_url)
    try:
        assert client.ping()
        assert client.server_version and client.server_version[0].isdigit()
        assert client.server_settings["max_threads"].name == "max_threads"
        assert client.command("SELECT 1") == 1
    finally:
        client.close()


def test_native_insert_and_query_round_trip_types(db: tuple[Any, str]) -> None:
    client, name = db
    table = make_table(client, name)
    client.insert(table, ROWS, column_names=["id", "name", "tag", "n", "xs", "pair", "v"])
    result = client.query(f"SELECT id, name, tag, n, xs, pair, v FROM {table} ORDER BY id")
    assert result.result_rows == ROWS
    assert int(result.summary["read_rows"]) >= 2


@pytest.mark.parametrize("compress", [True, False, "gzip", "zstd"])
def test_inserts_and_replies_with_every_compression(clickhouse_http_url: str, db: tuple[Any, str],
                                                    compress: Any) -> None:
    _, name = db
    client = client_for(clickhouse_http_url, compress=compress)
    try:
        table = make_table(client, name)
        client.insert(table, ROWS, column_names=["id", "name", "tag", "n", "xs", "pair", "v"])
        assert client.query(f"SELECT id, name FROM {table} ORDER BY id").result_rows == [(1, "a"), (2, "b\tc\nd")]
    finally:
        client.close()


def test_arrow_insert_and_query(db: tuple[Any, str]) -> None:
    client, name = db
    client.command(f"CREATE TABLE {name}.m (run_id String, step Int64, value Float64) ENGINE = MergeTree ORDER BY step")
    data = pa.table({"run_id": ["r1"] * 1000, "step": pa.array(range(1000), pa.int64()),
                     "value": pa.array([i / 7 for i in range(1000)], pa.float64())})
    client.insert_arrow(f"{name}.m", data)
    back = client.query_arrow(f"SELECT run_id, step, value FROM {name}.m ORDER BY step")
    assert back.column("step").to_pylist() == list(range(1000))
    assert back.column("value").to_pylist() == data.column("value").to_pylist()
    assert back.column("run_id").to_pylist() == ["r1"] * 1000


def test_server_side_parameters(db: tuple[Any, str]) -> None:
    client, name = db
    table = make_table(client, name)
    client.insert(table, ROWS, column_names=["id", "name", "tag", "n", "xs", "pair", "v"])
    assert client.query(f"SELECT id FROM {table} WHERE name = {{n:String}}", parameters={"n": "b\tc\nd"}
                        ).result_rows == [(2,)]
    assert client.query("SELECT {xs:Array(String)}, {i:Int64}", parameters={"xs": ["a'b", "c\\d"], "i": -5}
                        ).result_rows == [(["a'b", "c\\d"], -5)]
    # Past 4 KiB of parameters clickhouse-connect switches to a multipart/form-data body.
    many = [f"run-{i:06d}" for i in range(2000)] + ["a"]
    assert client.query(f"SELECT id FROM {table} WHERE name IN {{ns:Array(String)}}", parameters={"ns": many}
                        ).result_rows == [(1,)]


def test_command_results(db: tuple[Any, str]) -> None:
    client, name = db
    assert isinstance(client.command(f"CREATE TABLE {name}.c (x Int64) ENGINE = Memory"), QuerySummary)
    assert client.command(f"SELECT count() FROM {name}.c") == 0
    assert client.command(f"SELECT x FROM {name}.c") == ""
    assert client.command("SELECT 'a', 2") == ["a", "2"]


def test_per_query_settings_do_not_leak(clickhouse_http_url: str) -> None:
    client = client_for(clickhouse_http_url)
    try:
        sql = "SELECT value FROM system.settings WHERE name = 'max_block_size'"
        default = client.query(sql).result_rows[0][0]
        for _ in range(6):  # more than the fixture's pool: every connection saw the setting once
            assert client.query(sql, settings={"max_block_size": 1234}).result_rows == [("1234",)]
        assert client.query(sql).result_rows == [(default,)]
    finally:
        client.close()


def test_session_keeps_set_and_temporary_tables(clickhouse_http_url: str) -> None:
    client = client_for(clickhouse_http_url, session_id=f"s-{uuid.uuid4().hex}")
    other = client_for(clickhouse_http_url)
    try:
        client.command("SET max_block_size = 4321")
        sql = "SELECT value FROM system.settings WHERE name = 'max_block_size'"
        assert client.query(sql).result_rows == [("4321",)]
        assert other.query(sql).result_rows != [("4321",)]
    finally:
        client.close()
        other.close()


def test_errors_carry_the_clickhouse_code_and_name(db: tuple[Any, str]) -> None:
    client, name = db
    with pytest.raises(DatabaseError) as info:
        client.query(f"SELECT * FROM {name}.missing")
    assert info.value.code == 60 and "UNKNOWN_TABLE" in str(info.value)
    with pytest.raises(DatabaseError) as info:
        client.query("SELEC 1")
    assert info.value.code == 62
    with pytest.raises(DatabaseError) as info:
        client.command("SELECT throwIf(1, 'boom')")
    assert info.value.code == 395 and "boom" in str(info.value)


def test_a_failed_insert_stores_nothing(db: tuple[Any, str]) -> None:
    client, name = db
    client.command(f"CREATE TABLE {name}.u (x UInt8) ENGINE = MergeTree ORDER BY x")
    with pytest.raises(DatabaseError):
        client.raw_insert(f"{name}.u", ["x"], insert_block="1\nnot-a-number\n", fmt="TabSeparated")
    assert client.command(f"SELECT count() FROM {name}.u") == 0


def test_streamed_results(clickhouse_http_url: str) -> None:
    client = client_for(clickhouse_http_url)
    try:
        with client.query_rows_stream("SELECT number FROM numbers(300000)") as stream:
            assert sum(1 for _ in stream) == 300000
        with client.query_arrow_stream("SELECT number FROM numbers(100000)") as batches:
            assert sum(b.num_rows for b in batches) == 100000
        with pytest.raises(Error), client.query_rows_stream(
                "SELECT throwIf(number = 250000, 'late') FROM numbers(300000)") as stream:
            for _ in stream:
                pass
        assert client.command("SELECT 2") == 2  # the client and the server are still usable
    finally:
        client.close()


def test_async_client_round_trip(clickhouse_http_url: str, db: tuple[Any, str]) -> None:
    """The async (aiohttp) transport, which the query service uses against a server."""
    _, name = db
    dsn = parse_dsn(clickhouse_http_url)

    async def scenario() -> tuple[Any, Any, Any]:
        client = await clickhouse_connect.get_async_client(
            host=dsn.host, port=dsn.port, username=dsn.username, password=dsn.password,
            autogenerate_session_id=False)
        try:
            await client.command(f"CREATE TABLE {name}.a (x Int64, s String) ENGINE = MergeTree ORDER BY x")
            await client.insert(f"{name}.a", [(1, "one")], column_names=["x", "s"])
            await client.insert_arrow(f"{name}.a", pa.table({"x": pa.array([2], pa.int64()), "s": ["two"]}))
            rows = (await client.query(f"SELECT x, s FROM {name}.a WHERE x >= {{lo:Int64}} ORDER BY x",
                                       parameters={"lo": 1})).result_rows
            table = await client.query_arrow(f"SELECT s FROM {name}.a ORDER BY x")
            return rows, table.column("s").to_pylist(), await client.command(f"SELECT sum(x) FROM {name}.a")
        finally:
            await client.close()

    assert asyncio.run(scenario()) == ([(1, "one"), (2, "two")], ["one", "two"], 3)


def test_wrong_password_is_authentication_failed(clickhouse_http_url: str) -> None:
    dsn = parse_dsn(clickhouse_http_url)
    with pytest.raises(DatabaseError) as info:
        clickhouse_connect.get_client(host=dsn.host, port=dsn.port, username=dsn.username,
                                      password="definitely-not-the-password")
    assert info.value.code == 516


def test_store_connect_reports_an_unreachable_server() -> None:
    with pytest.raises(StoreUnavailable):
        connect(DSN(scheme="http", host="127.0.0.1", port=1))


def raw(url: str, sql: str, params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    dsn = parse_dsn(url)
    query = urllib.parse.urlencode(params or {})
    token = base64.b64encode(f"{dsn.username}:{dsn.password}".encode()).decode()
    request = urllib.request.Request(f"http://{dsn.host}:{dsn.port}/?{query}", data=sql.encode(), method="POST",
                                     headers={"Authorization": f"Basic {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_raw_http_headers_compression_and_errors(clickhouse_http_url: str) -> None:
    status, headers, body = raw(clickhouse_http_url, "SELECT 1 AS x FORMAT TabSeparated",
                                {"enable_http_compression": "1", "query_id": "q-1"},
                                {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == b"1\n"
    assert headers["x-clickhouse-format"] == "TabSeparated"
    assert headers["x-clickhouse-query-id"] == "q-1"
    assert headers["x-clickhouse-timezone"]
    assert "read_rows" in json.loads(headers["x-clickhouse-summary"])
    status, headers, body = raw(clickhouse_http_url, "SELECT * FROM system.no_such_table")
    assert status == 404 and headers["x-clickhouse-exception-code"] == "60"
    assert body.startswith(b"Code: 60. DB::Exception: ") and b"UNKNOWN_TABLE" in body


# -- the fixture's own parsing (not a server behaviour) -------------------------------------------

fixture_only = pytest.mark.skipif(REAL_SERVER, reason="tests the chDB HTTP fixture's internals")


@fixture_only
def test_parse_statement_splits_an_insert_body(chhttp_module: ModuleType) -> None:
    stmt = chhttp_module.parse_statement(
        {"database": "d", "max_threads": "2", "wait_end_of_query": "1", "param_x": "5"},
        b"INSERT INTO d.t (`a`, `b`) FORMAT Native\n\x02\x01rest")
    assert (stmt.sql, stmt.data_format, stmt.data) == ("INSERT INTO d.t (`a`, `b`)", "Native", b"\x02\x01rest")
    assert stmt.settings == {"max_threads": "2"} and stmt.params == {"x": "5"} and stmt.database == "d"
    assert not stmt.has_result


@fixture_only
def test_parse_statement_takes_an_insert_from_the_query_parameter(chhttp_module: ModuleType) -> None:
    stmt = chhttp_module.parse_statement({"query": "INSERT INTO t (a) FORMAT Arrow"}, b"ARROW1\x00\x00")
    assert (stmt.sql, stmt.data_format, stmt.data) == ("INSERT INTO t (a)", "Arrow", b"ARROW1\x00\x00")
    select = chhttp_module.parse_statement({"query": "SELECT 1", "default_format": "JSON"}, b"")
    assert (select.sql, select.output_format, select.has_result, select.data) == ("SELECT 1", "JSON", True, None)
    ddl = chhttp_module.parse_statement({}, b"/* c */ CREATE TABLE x (a Int8) ENGINE = Memory")
    assert not ddl.has_result and ddl.data is None
