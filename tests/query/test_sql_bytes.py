"""Queries holding bytes that are not UTF-8: checked like any other, answered or refused, never a 500.

ClickHouse's escapes (`'\\xff'`, `` `a\\xff` ``) put raw bytes into string literals and
quoted identifiers, and its parser writes them raw into the AST JSON and the formatted
query. The checker must still see exactly the names the engine sees; the answer's bad
bytes become U+FFFD in JSON and CSV and stay as they are in Arrow.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import urllib.error
import urllib.request
from typing import Any

import pyarrow as pa
import pytest

import trackhouse.client as th
from trackhouse.cli.server import ServerThread
from trackhouse.query.errors import InvalidArgument
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlcheck import SqlRefused, check
from trackhouse.store import Store

LITERALS = r"SELECT '\xff' AS b, 'caf\xc3\xa9\xc3' AS c, 'ok' AS s"
BYTES = [b"\xff"], [b"caf\xc3\xa9\xc3"]


def run(sql: SqlQueries, query: str) -> pa.Table:
    async def collect() -> pa.Table:
        async with sql.run(query) as answer:
            return pa.Table.from_batches([b async for b in answer], schema=answer.schema)

    return asyncio.run(collect())


def as_bytes(table: pa.Table, name: str) -> list[bytes]:
    return list(table.column(name).cast(pa.binary()).to_pylist())


def post(port: int, body: Any) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/sql", data=json.dumps(body).encode(),
                                     method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_literals_that_are_not_utf8_run_with_their_bytes(sql_store: Store) -> None:
    table = run(SqlQueries(sql_store), LITERALS)
    assert (as_bytes(table, "b"), as_bytes(table, "c")) == BYTES
    assert table.column("s").to_pylist() == ["ok"]


def test_column_named_after_such_a_literal_has_a_text_name(sql_store: Store) -> None:
    table = run(SqlQueries(sql_store), r"SELECT '\xff', 1 AS `n\xfe`")
    assert table.schema.names == ["'\ufffd'", "n\ufffd"]
    assert as_bytes(table, "'\ufffd'") == [b"\xff"]


def test_quoted_names_that_are_not_utf8_run(sql_store: Store) -> None:
    query = r"WITH `t\xff` AS (SELECT 1 AS `v\xfe`) SELECT `v\xfe` AS v FROM `t\xff`"
    assert run(SqlQueries(sql_store), query).column("v").to_pylist() == [1]


REFUSED = [
    (r"SELECT '\xff' FROM system.tables", "system tables are not allowed"),
    (r"SELECT '\xff', file('/etc/passwd')", "function `file` is not allowed"),
    (r"SELECT '\xff', `fil\x65`('/etc/passwd')", "function `file` is not allowed"),
    (r"SELECT * FROM url('http://127.0.0.1:1/\xff', CSV)", "table function `url` is not allowed"),
    (r"SELECT * FROM `runs\xff`", r"table `runs\xff` is not allowed"),
    # two different bytes must stay two different names (a lossy decoding would merge them)
    (r"WITH `t\xff` AS (SELECT 1) SELECT * FROM `t\xfe`", r"table `t\xfe` is not allowed"),
    (r"SELECT '\xff' SETTINGS readonly = 0", "SETTINGS clauses are not allowed"),
    (r"SELECT '\xff' INTO OUTFILE '/tmp/th-escape-out'", "INTO OUTFILE is not allowed"),
    (r"SELECT '\xff'; DROP TABLE runs", "Multi-statements are not allowed"),
]


@pytest.mark.parametrize(("query", "message"), REFUSED, ids=[f"{i:02d}" for i in range(len(REFUSED))])
def test_forbidden_queries_with_bytes_are_refused_before_running(sql_store: Store, query: str,
                                                                  message: str) -> None:
    executed: list[str] = []
    sandbox = sql_store.sandbox
    original = sandbox.stream

    def stream(sql: str, *rest: Any) -> Any:
        executed.append(sql)
        return original(sql, *rest)

    sandbox.stream = stream  # type: ignore[method-assign]
    try:
        with pytest.raises(InvalidArgument) as info:
            run(SqlQueries(sql_store), query)
    finally:
        sandbox.stream = original  # type: ignore[method-assign]
    assert message in str(info.value)
    assert str(info.value).encode("utf-8")  # printable: no lone surrogates reach HTTP or gRPC
    assert executed == []


def test_text_that_is_not_unicode_is_refused(sql_store: Store) -> None:
    with pytest.raises(InvalidArgument, match="lone surrogates"):  # e.g. argv decoded with surrogateescape
        run(SqlQueries(sql_store), "SELECT '\udcff'")


def test_checker_refuses_what_is_not_json() -> None:
    with pytest.raises(SqlRefused, match="cannot analyse"):
        check("7b2274797065223a22")  # what clickhouse-connect returns for text that is not UTF-8
    with pytest.raises(SqlRefused, match="cannot analyse"):
        check('{"type": "SelectWithUnionQuery"')


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_http_answers_literals_that_are_not_utf8(http_server: ServerThread, fmt: str) -> None:
    status, content = post(http_server.server.http_port, {"query": LITERALS, "format": fmt})
    assert status == 200, content
    if fmt == "json":
        assert json.loads(content)["rows"] == [["\ufffd", "caf\u00e9\ufffd", "ok"]]
    else:
        assert list(csv.reader(io.StringIO(content.decode("utf-8")))) == [["b", "c", "s"],
                                                                           ["\ufffd", "caf\u00e9\ufffd", "ok"]]


def test_http_answers_the_bare_literal(http_server: ServerThread) -> None:
    status, content = post(http_server.server.http_port, {"query": r"SELECT '\xff'"})
    assert status == 200, content
    body = json.loads(content)
    assert ([c["name"] for c in body["columns"]], body["rows"]) == (["'\ufffd'"], [["\ufffd"]])


def test_http_refuses_forbidden_query_with_bytes(http_server: ServerThread) -> None:
    status, content = post(http_server.server.http_port, {"query": r"SELECT '\xff' FROM system.tables"})
    body = json.loads(content)
    assert (status, body["error_code"]) == (400, "INVALID_ARGUMENT")
    assert "system tables are not allowed" in body["message"]
    status, content = post(http_server.server.http_port, {"query": r"SELECT * FROM `runs\xff`"})
    assert (status, json.loads(content)["message"]) == (400, r"table `runs\xff` is not allowed; tables: "
                                                                "experiments, runs, params, tags, metrics, "
                                                                "latest_metrics, experiment_tags")


def test_grpc_answers_and_refuses_queries_with_bytes(http_server: ServerThread) -> None:
    client = th.connect(http_server.address)
    try:
        table = client.sql(LITERALS)
        assert (as_bytes(table, "b"), as_bytes(table, "c")) == BYTES
        table = client.sql(r"SELECT '\xff'")
        assert table.schema.names == ["'\ufffd'"] and as_bytes(table, "'\ufffd'") == [b"\xff"]
        with pytest.raises(th.InvalidArgument, match="system tables are not allowed"):
            client.sql(r"SELECT '\xff' FROM system.tables")
        with pytest.raises(th.InvalidArgument, match=r"table `runs\\xff` is not allowed"):
            client.sql(r"SELECT * FROM `runs\xff`")
    finally:
        client.close()


UNKNOWN_NAME = r"SELECT `x\xff` FROM runs"  # the engine's own error quotes the name's raw byte


def test_an_engine_error_quoting_bytes_is_the_query_s_error(sql_store: Store) -> None:
    with pytest.raises(InvalidArgument) as info:
        run(SqlQueries(sql_store), UNKNOWN_NAME)
    assert r"query failed: Unknown expression identifier `x\xff`" in str(info.value)


def test_http_and_grpc_answer_an_engine_error_quoting_bytes_with_400(http_server: ServerThread) -> None:
    status, content = post(http_server.server.http_port, {"query": UNKNOWN_NAME})
    body = json.loads(content)
    assert (status, body["error_code"]) == (400, "INVALID_ARGUMENT"), body
    assert r"Unknown expression identifier `x\xff`" in body["message"]
    client = th.connect(http_server.address)
    try:
        with pytest.raises(th.InvalidArgument, match=r"Unknown expression identifier `x\\xff`"):
            client.sql(UNKNOWN_NAME)
    finally:
        client.close()
