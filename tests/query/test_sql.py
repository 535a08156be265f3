"""The SQL endpoint: analytics that docs/sql.md shows, the experiment restriction, gRPC, HTTP, client.

The queries of docs/sql.md's worked examples are the constants below; each is run
here against the seeded store of tests/query/conftest.py on both deployments.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

import trackhouse.client as th
from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.query.errors import InvalidArgument, ResourceExhausted
from trackhouse.query.settings import QuerySettings
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlcheck import TABLES
from trackhouse.store import Store

from .conftest import OTHER, STEPS, SWEEP, T0, loss_curve, seed

BEST_RUN_PER_SWEEP = """
SELECT p.value AS lr, argMin(m.run_id, m.value) AS best_run, min(m.value) AS best_loss
FROM latest_metrics AS m
JOIN params AS p ON p.run_id = m.run_id AND p.key = 'lr'
JOIN tags AS t ON t.run_id = m.run_id AND t.key = 'sweep' AND t.value = 'lr'
WHERE m.key = 'loss'
GROUP BY lr
ORDER BY lr
"""

LEARNING_CURVE_PERCENTILES = """
SELECT intDiv(step, 25) * 25 AS bucket,
       quantileExact(0.1)(value) AS p10, quantileExact(0.5)(value) AS p50, quantileExact(0.9)(value) AS p90,
       uniqExact(run_id) AS runs
FROM metrics
WHERE key = 'loss' AND run_id IN (SELECT run_id FROM runs WHERE experiment_id = '1')
GROUP BY bucket
ORDER BY bucket
"""

THROUGHPUT_PER_RUN = """
SELECT run_id, count() AS points,
       (max(timestamp) - min(timestamp)) / 1000 AS seconds,
       points / seconds AS points_per_second
FROM metrics
GROUP BY run_id
ORDER BY points_per_second DESC
"""


def run_sql(sql: SqlQueries, query: str, experiment_ids: frozenset[str] | None = None) -> pa.Table:
    async def collect() -> pa.Table:
        async with sql.run(query, experiment_ids=experiment_ids) as answer:
            batches = [b async for b in answer]
        return pa.Table.from_batches(batches, schema=answer.schema)

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def sql(sql_store: Store) -> SqlQueries:
    return SqlQueries(sql_store)


def test_best_run_per_sweep(sql: SqlQueries) -> None:
    rows = run_sql(sql, BEST_RUN_PER_SWEEP).to_pylist()
    expected = {}
    for index, (run_id, lr) in enumerate(SWEEP):
        final = float(loss_curve(index, lr)[-1])
        if lr not in expected or final < expected[lr][1]:
            expected[lr] = (run_id, final)
    assert [(r["lr"], r["best_run"]) for r in rows] == [(lr, expected[lr][0]) for lr in sorted(expected)]
    assert [r["best_loss"] for r in rows] == pytest.approx([expected[lr][1] for lr in sorted(expected)])


def test_learning_curve_percentiles(sql: SqlQueries) -> None:
    table = run_sql(sql, LEARNING_CURVE_PERCENTILES)
    assert table.column("bucket").to_pylist() == [0, 25, 50, 75]
    assert table.column("runs").to_pylist() == [len(SWEEP)] * 4
    p50 = table.column("p50").to_pylist()
    assert p50 == sorted(p50, reverse=True)  # loss falls
    assert all(lo <= mid <= hi for lo, mid, hi in zip(*(table.column(c).to_pylist() for c in ("p10", "p50", "p90")),
                                                      strict=True))


def test_throughput_per_run(sql: SqlQueries) -> None:
    rows = run_sql(sql, THROUGHPUT_PER_RUN).to_pylist()
    assert len(rows) == len(SWEEP) + len(OTHER)
    first = rows[0]  # run 0 logs every 10 ms: the fastest
    assert first["run_id"] == SWEEP[0][0] and first["points"] == STEPS
    assert first["points_per_second"] == pytest.approx(STEPS / ((STEPS - 1) * 10 / 1000))


def test_tables_have_their_documented_columns(sql: SqlQueries) -> None:
    columns = {name: run_sql(sql, f"SELECT * FROM {name} LIMIT 0").schema.names for name in TABLES}
    assert columns == {
        "experiments": ["experiment_id", "name", "artifact_location", "lifecycle_stage", "creation_time",
                        "last_update_time"],
        "runs": ["run_id", "experiment_id", "run_name", "user_id", "status", "start_time", "end_time",
                 "lifecycle_stage", "artifact_uri"],
        "params": ["run_id", "key", "value"],
        "tags": ["run_id", "key", "value"],
        "metrics": ["run_id", "key", "step", "timestamp", "value"],
        "latest_metrics": ["run_id", "key", "step", "timestamp", "value", "min_value", "max_value", "count"],
        "experiment_tags": ["experiment_id", "key", "value"],
    }


def test_experiment_tags_show_the_latest_undeleted_value_of_allowed_experiments(sql: SqlQueries) -> None:
    query = "SELECT experiment_id, key, value FROM experiment_tags ORDER BY experiment_id, key"
    assert run_sql(sql, query).to_pylist() == [
        {"experiment_id": "1", "key": "owner", "value": "vision"},
        {"experiment_id": "2", "key": "owner", "value": "nlp"},
    ]
    assert run_sql(sql, query, frozenset({"2"})).to_pylist() == [
        {"experiment_id": "2", "key": "owner", "value": "nlp"}]


def test_tags_show_the_latest_undeleted_value(sql: SqlQueries) -> None:
    rows = run_sql(sql, f"SELECT key FROM tags WHERE run_id = '{SWEEP[0][0]}' ORDER BY key").to_pylist()
    assert rows == [{"key": "sweep"}]


def test_empty_answer_keeps_its_columns(sql: SqlQueries) -> None:
    table = run_sql(sql, "SELECT run_id, start_time FROM runs WHERE 0")
    assert table.num_rows == 0 and table.schema.names == ["run_id", "start_time"]


def test_order_and_comments_survive(sql: SqlQueries) -> None:
    table = run_sql(sql, "SELECT run_id -- the id\nFROM runs /* all */ ORDER BY start_time DESC LIMIT 3;")
    assert table.column("run_id").to_pylist() == [OTHER[1][0], OTHER[0][0], SWEEP[5][0]]


RESTRICTED = [
    "SELECT count() FROM {t}",
    "SELECT count() FROM (SELECT * FROM {t})",
    "WITH x AS (SELECT * FROM {t}) SELECT count() FROM x",
    "WITH {t} AS (SELECT * FROM {t}) SELECT count() FROM {t}",
    "SELECT (SELECT count() FROM {t})",
    "SELECT count() FROM {t} WHERE 1 IN (SELECT 1 FROM {t})",
    "SELECT sum(c) FROM (SELECT count() AS c FROM {t} UNION ALL SELECT 0)",
    "SELECT count() FROM {t} AS a CROSS JOIN (SELECT 1) AS b",
]
ROWS_OF_EXPERIMENT_2 = {"experiments": 1, "runs": 2, "params": 4, "tags": 2, "metrics": 2 * STEPS,
                        "latest_metrics": 2, "experiment_tags": 1}


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("form", RESTRICTED)
def test_experiment_ids_restrict_every_table_in_every_position(sql: SqlQueries, table: str, form: str) -> None:
    query = form.format(t=table)
    assert run_sql(sql, query, frozenset({"2"})).column(0).to_pylist() == [ROWS_OF_EXPERIMENT_2[table]]
    assert run_sql(sql, query, frozenset()).column(0).to_pylist() == [0]
    everything = run_sql(sql, query, None).column(0).to_pylist()[0]
    assert everything > ROWS_OF_EXPERIMENT_2[table]


def test_restriction_holds_in_in_subqueries_and_joins(sql: SqlQueries) -> None:
    only_2 = frozenset({"2"})
    query = "SELECT count() FROM metrics WHERE run_id IN (SELECT run_id FROM runs)"
    assert run_sql(sql, query, only_2).column(0).to_pylist() == [2 * STEPS]
    query = "SELECT count() FROM metrics AS m JOIN runs AS r ON r.run_id = m.run_id"
    assert run_sql(sql, query, only_2).column(0).to_pylist() == [2 * STEPS]
    query = "SELECT DISTINCT experiment_id FROM runs ARRAY JOIN [1, 2] AS x ORDER BY experiment_id"
    assert run_sql(sql, query, only_2).column(0).to_pylist() == ["2"]


def test_restriction_values_are_bound_not_pasted(sql: SqlQueries) -> None:
    hostile = frozenset({"2') OR 1=1 --", "2"})
    assert run_sql(sql, "SELECT count() FROM runs", hostile).column(0).to_pylist() == [2]


def test_errors_name_what_went_wrong(sql: SqlQueries) -> None:
    with pytest.raises(InvalidArgument, match="cannot parse the query: Syntax error"):
        run_sql(sql, "SELEC 1")
    with pytest.raises(InvalidArgument, match=r"query failed: .*Unknown"):
        run_sql(sql, "SELECT no_such_column FROM runs")
    with pytest.raises(InvalidArgument, match="query: required"):
        run_sql(sql, "  ")


def test_result_limit_is_resource_exhausted_naming_it(sql_store: Store) -> None:
    small = SqlQueries(sql_store, QuerySettings(sql_max_result_rows=10))
    with pytest.raises(ResourceExhausted, match="result limit: max_result_rows = 10"):
        run_sql(small, "SELECT * FROM metrics")
    assert run_sql(small, "SELECT * FROM metrics LIMIT 10").num_rows == 10


def test_settings_from_env_and_validation() -> None:
    s = QuerySettings.from_env({"TRACKHOUSE_QUERY_SQL_MAX_EXECUTION_TIME": "5",
                                "TRACKHOUSE_QUERY_SQL_MAX_RESULT_ROWS": "100"})
    assert (s.sql_max_execution_time, s.sql_max_result_rows) == (5, 100)
    with pytest.raises(ValueError, match="sql_max_memory_usage"):
        QuerySettings(sql_max_memory_usage=0)


# -- over the wire ------------------------------------------------------------------------


@pytest.fixture
def seeded(store: Store) -> Store:
    seed(store)
    return store


def test_client_sql_over_grpc(seeded: Store, server: Any) -> None:
    client = th.connect(server.address)
    try:
        table = client.sql(BEST_RUN_PER_SWEEP)
        assert table.num_rows == 3 and table.schema.names == ["lr", "best_run", "best_loss"]
        frame = client.sql("SELECT run_id, start_time FROM runs ORDER BY start_time").to_pandas()
        assert list(frame["start_time"]) == [T0 + i for i in range(len(SWEEP) + len(OTHER))]
        assert client.sql("SELECT 1 AS x WHERE 0").schema.names == ["x"]
        with pytest.raises(th.InvalidArgument, match="table function `url` is not allowed"):
            client.sql("SELECT * FROM url('http://127.0.0.1:1/x', CSV)")
    finally:
        client.close()


def test_grpc_streams_large_answers_in_many_chunks(seeded: Store, server: Any) -> None:
    from trackhouse.proto.v1 import query_pb2

    transport = th.GrpcTransport(server.address)
    try:
        query = "SELECT number AS n, repeat('x', 100) AS pad FROM (SELECT arrayJoin(range(200000)) AS number)"
        chunks = list(transport.sql(query_pb2.SqlRequest(query=query)))
        assert len(chunks) > 3 and sum(c.rows for c in chunks) == 200_000
        table = pa.ipc.open_stream(b"".join(c.arrow for c in chunks)).read_all()
        assert table.column("n").to_pylist() == list(range(200_000))
    finally:
        transport.close()


@dataclass
class Reply:
    status: int
    content_type: str
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def post(port: int, body: Any, raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/sql", data=data, method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.headers["content-type"], response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers["content-type"], exc.read())


@pytest.fixture
def limited(seeded: Store) -> Iterator[ServerThread]:
    """The server with small SQL limits (100 result rows), gRPC and HTTP."""
    config = ServerConfig(store="", database=seeded.database, grpc_port=0, http_port=0,
                          query=QuerySettings(sql_max_result_rows=100))
    thread = ServerThread(config, store=seeded)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop(grace=1.0)


def test_http_formats(limited: ServerThread) -> None:
    port = limited.server.http_port
    query = "SELECT run_id, start_time FROM runs ORDER BY start_time LIMIT 2"
    body = post(port, {"query": query}).json()
    assert body["columns"][0]["name"] == "run_id" and body["rows"] == [[SWEEP[0][0], T0], [SWEEP[1][0], T0 + 1]]
    arrow = post(port, {"query": query, "format": "arrow"})
    assert arrow.content_type == "application/vnd.apache.arrow.stream"
    assert pa.ipc.open_stream(arrow.content).read_all().column("start_time").to_pylist() == [T0, T0 + 1]
    csv = post(port, {"query": query, "format": "csv"})
    assert csv.content_type.startswith("text/csv")
    assert pacsv.read_csv(io.BytesIO(csv.content)).column("start_time").to_pylist() == [T0, T0 + 1]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"query": "SELECT * FROM system.tables"}, 400, "system tables are not allowed"),
    ({"query": "DROP TABLE runs"}, 400, "only SELECT queries are allowed"),
    ({"query": "SELECT 1", "format": "xml"}, 400, "format: 'xml' is not one of"),
    ({"query": "SELECT 1", "format": []}, 400, "format: a string, one of"),
    ({"query": "SELECT 1", "format": {}}, 400, "format: a string, one of"),
    ({"query": "SELECT 1", "format": 1}, 400, "format: a string, one of"),
    ({"format": "json"}, 400, "query: required"),
    (["SELECT 1"], 400, "must be a JSON object"),
    ({"query": "SELEC 1"}, 400, "Syntax error"),
    ({"query": "SELECT * FROM metrics"}, 413, "result limit: max_result_rows = 100"),
])
def test_http_errors(limited: ServerThread, body: Any, status: int, message: str) -> None:
    reply = post(limited.server.http_port, body)
    assert reply.status == status and reply.content_type == "application/json"
    assert message in reply.json()["message"]


def test_http_body_that_is_not_json(limited: ServerThread) -> None:
    reply = post(limited.server.http_port, None, raw=b"SELECT 1")
    assert reply.status == 400 and reply.json()["error_code"] == "INVALID_ARGUMENT"


def test_grpc_limit_is_resource_exhausted(limited: ServerThread) -> None:
    client = th.connect(limited.address)
    try:
        with pytest.raises(th.TrackhouseError, match="result limit: max_result_rows = 100") as info:
            client.sql("SELECT * FROM metrics")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert client.sql("SELECT * FROM metrics LIMIT 100").num_rows == 100
    finally:
        client.close()


WIDE = ("SELECT toInt128(-1) AS i128, toUInt128('170141183460469231731687303715884105727') AS u128, "
        "toInt256('-57896044618658097711785492504343953926634992332820282019728792003956564819968') AS i256, "
        "toUInt256(5) AS u256, [toInt128(5), toInt128(-5)] AS arr, CAST(NULL, 'Nullable(Int128)') AS nothing")


def test_http_json_writes_128_and_256_bit_integers_as_decimal_strings(limited: ServerThread) -> None:
    """Exact whatever their size: JSON numbers past 2**53 lose digits in most JSON readers."""
    reply = post(limited.server.http_port, {"query": WIDE})
    assert reply.status == 200, reply.content
    assert reply.json()["rows"] == [["-1", str(2**127 - 1), str(-(2**255)), "5", ["5", "-5"], None]]


NESTED = ("SELECT [0, 1, 2] AS arr, map('k', 1) AS m, tuple(1, 'x') AS t, "
          "toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') AS u, toInt128(-1) AS i, "
          "CAST('{\"a\": 1}', 'JSON') AS j, unhex('ff') AS raw, [unhex('ff')] AS raws, 'ok' AS s, 1.5 AS f")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_http_renders_columns_of_any_type(limited: ServerThread, fmt: str) -> None:
    """Arrays, maps, tuples, UUID, JSON, Int128 and bytes that are not UTF-8, in CSV as in JSON."""
    reply = post(limited.server.http_port, {"query": NESTED, "format": fmt})
    assert reply.status == 200, reply.content
    if fmt == "csv":
        import csv

        header, row = list(csv.reader(io.StringIO(reply.content.decode("utf-8"))))
        assert header == ["arr", "m", "t", "u", "i", "j", "raw", "raws", "s", "f"]
        assert row == ["[0,1,2]", '[["k",1]]', '{"1":1,"2":"x"}', "61f0c404-5cb3-11e7-907b-a6006ad3dba0", "-1",
                       '{"a":1}', "\ufffd", '["\ufffd"]', "ok", "1.5"]
    else:
        assert reply.json()["rows"] == [[[0, 1, 2], [["k", 1]], {"1": 1, "2": "x"},
                                         "61f0c404-5cb3-11e7-907b-a6006ad3dba0", "-1", '{"a":1}', "\ufffd", ["\ufffd"],
                                         "ok", 1.5]]
