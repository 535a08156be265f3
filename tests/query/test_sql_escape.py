"""The escape corpus: queries that try to leave trackhouse's tables or exhaust the server.

Each refused query must be refused before anything runs (the sandbox never gets a
query to execute), with a message saying what is not allowed, and must leave no
trace: a canary table in another database keeps its row, trackhouse's tables and
the sandbox database gain nothing, and no answer is returned at all.
Resource-exhaustion queries run with small limits and must stop with a clear
error naming the limit they hit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from trackhouse.query.errors import InvalidArgument, ResourceExhausted
from trackhouse.query.settings import QuerySettings
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlcheck import SqlRefused
from trackhouse.store import Store

CANARY_DB = "th_canary"

ESCAPES: list[tuple[str, str]] = [
    # table functions of every kind
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function `file`"),
    ("SELECT * FROM url('http://127.0.0.1:1/x', CSV)", "table function `url`"),
    ("SELECT * FROM URL('http://127.0.0.1:1/x', CSV)", "table function `URL`"),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k', CSV)", "table function `s3`"),
    ("SELECT * FROM hdfs('hdfs://x/y', CSV)", "table function `hdfs`"),
    ("SELECT * FROM remote('127.0.0.1', system.one)", "table function `remote`"),
    ("SELECT * FROM remoteSecure('127.0.0.1', default.t)", "table function `remoteSecure`"),
    ("SELECT * FROM cluster('default', system.one)", "table function `cluster`"),
    ("SELECT * FROM executable('cat /etc/passwd', TSV, 'x String')", "table function `executable`"),
    ("SELECT * FROM input('x String')", "table function `input`"),
    ("SELECT * FROM numbers(10)", "table function `numbers`"),
    ("SELECT * FROM generateRandom('a Int8')", "table function `generateRandom`"),
    ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", "table function `mysql`"),
    ("SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')", "table function `postgresql`"),
    ("SELECT * FROM jdbc('jdbc:x', 't')", "table function `jdbc`"),
    ("SELECT * FROM merge('th_canary', '.*')", "table function `merge`"),
    ("SELECT * FROM view(SELECT * FROM th_canary.secrets)", "table function `view`"),
    ("SELECT * FROM dictionary('d')", "table function `dictionary`"),
    ("SELECT * FROM runs, file('/etc/passwd')", "table function `file`"),
    # system and information_schema tables, other databases
    ("SELECT * FROM system.tables", "system tables are not allowed"),
    ("SELECT * FROM SYSTEM.tables", "system tables are not allowed"),
    ('SELECT * FROM "system"."users"', "system tables are not allowed"),
    ("SELECT * FROM `system`.`settings`", "system tables are not allowed"),
    ("SELECT * FROM information_schema.tables", "system tables are not allowed"),
    ("SELECT * FROM INFORMATION_SCHEMA.COLUMNS", "system tables are not allowed"),
    ("SELECT * FROM th_canary.secrets", "table `th_canary.secrets` is not allowed"),
    ("SELECT * FROM default.runs", "table `default.runs` is not allowed"),
    ("SELECT * FROM meta", "table `meta` is not allowed"),
    ("SELECT * FROM schema_migrations", "table `schema_migrations` is not allowed"),
    ("SELECT * FROM search_runs", "table `search_runs` is not allowed"),
    ("SELECT * FROM secrets", "table `secrets` is not allowed"),
    ("SELECT * FROM `system.tables`", "table `system.tables` is not allowed"),
    ("SELECT * FROM RUNS", "table `RUNS` is not allowed"),
    ("SELECT * FROM ｒｕｎｓ", "Syntax error"),
    ('SELECT * FROM "ｒｕｎｓ"', "table `ｒｕｎｓ` is not allowed"),
    ("SELECT * FROM \"runs\u200b\"", "is not allowed"),
    ("SELECT system.tables.name FROM runs", "database-qualified names are not allowed"),
    ("SELECT system.one.* FROM runs", "system tables are not allowed"),
    # forbidden tables in every position
    ("SELECT * FROM runs JOIN system.tables AS t ON 1", "system tables are not allowed"),
    ("SELECT * FROM runs WHERE run_id IN (SELECT name FROM system.tables)", "system tables are not allowed"),
    ("SELECT * FROM runs WHERE run_id IN system.tables", "system tables are not allowed"),
    ("SELECT * FROM runs WHERE run_id IN meta", "table `meta` is not allowed"),
    ("SELECT (SELECT value FROM meta LIMIT 1)", "table `meta` is not allowed"),
    ("WITH x AS (SELECT * FROM th_canary.secrets) SELECT * FROM x", "table `th_canary.secrets`"),
    ("SELECT 1 UNION ALL SELECT count() FROM system.parts", "system tables are not allowed"),
    ("SELECT * FROM (SELECT * FROM (SELECT * FROM system.databases))", "system tables are not allowed"),
    ("SELECT * FROM runs ARRAY JOIN (SELECT groupArray(name) FROM system.tables) AS n",
     "system tables are not allowed"),
    ("SELECT 1 INTERSECT SELECT 1 FROM meta", "table `meta` is not allowed"),
    ("SELECT * FROM runs WHERE EXISTS (SELECT 1 FROM system.one)", "system tables are not allowed"),
    ("WITH meta AS (SELECT 1) SELECT * FROM (SELECT * FROM meta) UNION ALL SELECT 1 FROM schema_migrations",
     "table `schema_migrations` is not allowed"),
    # output clauses and settings
    ("SELECT * FROM runs INTO OUTFILE '/tmp/th-escape-out'", "INTO OUTFILE is not allowed"),
    ("SELECT 1 INTO OUTFILE '/tmp/th-escape-out' AND STDOUT", "INTO OUTFILE is not allowed"),
    ("SELECT 1 FORMAT CSV", "FORMAT clauses are not allowed"),
    ("SELECT 1 FORMAT Native SETTINGS readonly = 0", "are not allowed"),
    ("SELECT 1 SETTINGS readonly = 0", "SETTINGS clauses are not allowed"),
    ("SELECT 1 SETTINGS max_execution_time = 0", "SETTINGS clauses are not allowed"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_result_rows = 0)", "SETTINGS clauses are not allowed"),
    ("SELECT 1 UNION ALL (SELECT 2 SETTINGS max_memory_usage = 0)", "SETTINGS clauses are not allowed"),
    ("SELECT {p:String}", "query parameters"),
    # other statements, multiple statements, comments hiding statements
    ("INSERT INTO runs (run_id) VALUES ('x')", "not supported by parseQueryToJSON"),
    ("INSERT INTO th_canary.secrets SELECT 'x'", "not INSERT"),
    ("ALTER TABLE runs DELETE WHERE 1", "not ALTER"),
    ("DROP TABLE th_canary.secrets", "not DROP"),
    ("TRUNCATE TABLE th_canary.secrets", "not DROP / TRUNCATE"),
    ("CREATE TABLE th_canary.evil (a Int8) ENGINE = Memory", "not CREATE"),
    ("ATTACH TABLE th_canary.evil", "not CREATE / ATTACH"),
    ("SYSTEM SHUTDOWN", "not SYSTEM"),
    ("SYSTEM DROP DNS CACHE", "not SYSTEM"),
    ("KILL QUERY WHERE 1", "not KILL"),
    ("SET readonly = 0", "not SET"),
    ("OPTIMIZE TABLE runs FINAL", "not OPTIMIZE"),
    ("GRANT ALL ON *.* TO default", "not supported by parseQueryToJSON"),
    ("USE th_canary", "not USE"),
    ("EXPLAIN SELECT * FROM system.tables", "not EXPLAIN"),
    ("SHOW TABLES", "not SHOWTABLES"),
    ("SELECT 1; DROP TABLE th_canary.secrets", "Multi-statements are not allowed"),
    ("SELECT 1; SELECT * FROM system.tables", "Multi-statements are not allowed"),
    ("SELECT 1 /* ; DROP TABLE th_canary.secrets */; DROP TABLE th_canary.secrets", "Multi-statements"),
    ("SELECT 1 -- harmless\n; DROP TABLE th_canary.secrets", "Multi-statements are not allowed"),
    ("/* SELECT */ DROP TABLE th_canary.secrets", "not DROP"),
    # functions that reach outside
    ("SELECT dictGet('d', 'a', toUInt64(1))", "dictionaries are not allowed"),
    ("SELECT dictGetOrDefault('d', 'a', toUInt64(1), 'x')", "dictionaries are not allowed"),
    ("SELECT DICTHAS('d', toUInt64(1))", "dictionaries are not allowed"),
    ("SELECT joinGet('th_canary.j', 'v', 1)", "function `joinGet` is not allowed"),
    ("SELECT file('/etc/passwd')", "function `file` is not allowed"),
    ("SELECT hasColumnInTable('th_canary', 'secrets', 'value')", "function `hasColumnInTable`"),
    ("SELECT getServerSetting('path')", "function `getServerSetting`"),
    ("SELECT getSetting('readonly')", "function `getSetting`"),
    ("SELECT sleep(3)", "function `sleep` is not allowed"),
    ("SELECT sleepEachRow(1) FROM runs", "function `sleepEachRow` is not allowed"),
    ("SELECT __getScalar('x')", "function `__getScalar` is not allowed"),
    ("SELECT count() FROM runs WHERE length(file('/etc/hostname')) > 0", "function `file`"),
    # bytes that are not UTF-8 (ClickHouse's \xNN escapes) next to what is forbidden
    (r"SELECT '\xff' FROM th_canary.secrets", "table `th_canary.secrets` is not allowed"),
    (r"SELECT '\xff', `fil\x65`('/etc/passwd')", "function `file` is not allowed"),
    (r"SELECT 1 UNION ALL SELECT * FROM `secrets\xff`", r"table `secrets\xff` is not allowed"),
    (r"WITH `t\xff` AS (SELECT 1) SELECT * FROM `t\xfe`", r"table `t\xfe` is not allowed"),
    # very long queries
    ("SELECT 1" + " + 1" * 30_000, "the limit is"),
]


@pytest.fixture(scope="module")
def canary(sql_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A table in another database and a file, neither of which any query may read or change."""
    sql_store.command(f"CREATE DATABASE IF NOT EXISTS {CANARY_DB}")
    sql_store.command(f"CREATE TABLE IF NOT EXISTS {CANARY_DB}.secrets (value String) "
                      "ENGINE = MergeTree ORDER BY value")
    sql_store.command(f"TRUNCATE TABLE {CANARY_DB}.secrets")
    sql_store.command(f"INSERT INTO {CANARY_DB}.secrets VALUES ('s3cret')")
    path = tmp_path_factory.mktemp("canary") / "secret.txt"
    path.write_text("s3cret")
    yield path


def _state(store: Store) -> Any:
    tables = store.query_rows(
        "SELECT database, name FROM system.tables WHERE database IN {dbs:Array(String)} ORDER BY database, name",
        {"dbs": [store.database, store.database + "_sql", CANARY_DB]})
    counts = {t: store.query_rows(f"SELECT count() FROM {store.t(t)}")[0][0] for t in ("runs", "metrics", "meta")}
    secrets = store.query_rows(f"SELECT value FROM {CANARY_DB}.secrets")
    return tables, counts, secrets


class Spy:
    """Records every query that reaches the sandbox for execution."""

    def __init__(self, store: Store) -> None:
        self.executed: list[str] = []
        sandbox = store.sandbox
        original = sandbox.stream

        def stream(sql: str, parameters: Any, settings: Any) -> Any:
            self.executed.append(sql)
            return original(sql, parameters, settings)

        self._restore = lambda: setattr(sandbox, "stream", original)
        sandbox.stream = stream  # type: ignore[method-assign]


def run(sql: SqlQueries, query: str) -> pa.Table:
    async def collect() -> pa.Table:
        async with sql.run(query) as answer:
            return pa.Table.from_batches([b async for b in answer], schema=answer.schema)

    return asyncio.run(collect())


def test_corpus_is_large_enough() -> None:
    assert len(ESCAPES) >= 50


@pytest.mark.parametrize(("query", "message"), ESCAPES, ids=[f"{i:03d}" for i in range(len(ESCAPES))])
def test_escape_is_refused_before_anything_runs(sql_store: Store, canary: Path, query: str, message: str) -> None:
    sql = SqlQueries(sql_store, QuerySettings(sql_max_query_length=100_000))
    before = _state(sql_store)
    spy = Spy(sql_store)
    try:
        with pytest.raises(InvalidArgument) as info:
            run(sql, query)
    finally:
        spy._restore()
    assert message in str(info.value)
    assert spy.executed == []  # refused before execution: nothing was read
    assert _state(sql_store) == before  # nothing was written, created or dropped
    assert canary.read_text() == "s3cret"
    assert not Path("/tmp/th-escape-out").exists()


def test_refusals_are_sql_refused_with_the_table_list(sql_store: Store) -> None:
    with pytest.raises(SqlRefused, match="tables: experiments, runs, params, tags, metrics, latest_metrics"):
        run(SqlQueries(sql_store), "SELECT * FROM meta")


def test_deeply_nested_query_is_a_clear_error(sql_store: Store) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot parse the query: .*depth"):
        run(SqlQueries(sql_store), "SELECT " + "(" * 5000 + "1" + ")" * 5000)
    with pytest.raises(InvalidArgument, match="cannot parse the query"):
        run(SqlQueries(sql_store), "SELECT " + "-(" * 3000 + "1" + ")" * 3000)


SMALL = QuerySettings(sql_max_execution_time=1, sql_max_result_rows=1000, sql_max_result_bytes=1_000_000,
                      sql_max_memory_usage=64_000_000)
EXHAUSTION = [
    ("SELECT count() FROM metrics a, metrics b, metrics c, metrics d", "time limit: max_execution_time = 1 s"),
    ("SELECT * FROM metrics a, metrics b", "result limit: max_result_rows = 1000"),
    ("SELECT arrayJoin(range(100000)) AS n", "result limit"),
    ("SELECT * FROM metrics ARRAY JOIN range(50) AS x", "result limit"),
    ("SELECT a, b FROM (SELECT arrayJoin(range(1000)) AS a) AS x, (SELECT arrayJoin(range(1000)) AS b) AS y",
     "result limit"),
    ("SELECT length(groupArray(x)) FROM (SELECT arrayJoin(range(50000000)) AS x)", "memory limit"),
    ("WITH RECURSIVE t AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM t) SELECT count() FROM t",
     "complexity limit|time limit"),  # depth 1000, or the second, whichever comes first on a busy machine
]


@pytest.mark.parametrize(("query", "message"), EXHAUSTION, ids=[f"{i:02d}" for i in range(len(EXHAUSTION))])
def test_resource_exhaustion_stops_within_its_limit(sql_store: Store, query: str, message: str) -> None:
    with pytest.raises(ResourceExhausted, match=message.replace("(", r"\(")) as info:
        run(SqlQueries(sql_store, SMALL), query)
    assert "TRACKHOUSE_QUERY_SQL_" in str(info.value) or "complexity" in str(info.value)
