"""Read-only analytical SQL over trackhouse's tables: validate, restrict, run with limits, stream Arrow.

The entry point is `SqlQueries.run(query, experiment_ids=...)`, an async context
manager whose answer iterates pyarrow RecordBatches, shared by the gRPC `Sql` RPC,
the HTTP `POST /api/v1/sql` route and `trackhouse sql --store`.

How a query runs (docs/sql.md):
1. Its length is checked, then ClickHouse's parser parses it — the text bound as a
   parameter of `parseQueryToJSON` / `formatQuery`, so nothing in it executes
   (pasting it after `EXPLAIN AST` would not do: chDB runs every statement of a
   multi-statement string).
2. `sqlcheck.check` walks the AST: one SELECT over the stable table names only.
3. The query, as ClickHouse formatted it (no comments, one statement; refused if
   re-parsing the formatted text does not give the same AST), becomes a subquery
   under CTEs that define each stable name over trackhouse's database; with
   `experiment_ids` every CTE keeps only those experiments' rows, through a bound
   parameter (`{th_experiments:Array(String)}`), never pasted text.
   Bytes that are not UTF-8 (`'\\xff'` in a literal or a quoted name) reach the
   checker one character per byte (surrogateescape), and the formatted text that
   runs writes them as `\\xNN` escapes, kept only if it parses to the checked AST.
4. It runs on the store's sandbox connections (current database: an empty one)
   with readonly=2 and the limits of `QuerySettings` (TRACKHOUSE_QUERY_SQL_*).
   A query first takes one of the sandbox's slots (one per connection), waiting
   asynchronously, at most sql_max_execution_time, then ResourceExhausted ("busy");
   its steps run on the sandbox's own threads, never on the store's pool, so SQL
   queries cannot starve search, history or ingest (trackhouse.store.sandbox).
Engine errors become `ResourceExhausted` (a limit, named) or `InvalidArgument`
(ClickHouse's message); an unreachable store, or one refusing the store's
credentials, stays a StoreError (UNAVAILABLE / HTTP 503), never a parse error.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from trackhouse.query.errors import Busy, InvalidArgument, ResourceExhausted
from trackhouse.query.settings import QuerySettings
from trackhouse.query.sqlcheck import SURROGATES, TABLES, check, escape_bytes
from trackhouse.store import QueryFailed, Store, StoreError
from trackhouse.store.sandbox import Parsed, SqlSession
from trackhouse.store.schema import latest_step, latest_timestamp, latest_value

_EXPERIMENTS = "{th_experiments:Array(String)}"
_BY_EXPERIMENT = f" WHERE experiment_id IN {_EXPERIMENTS}"
_BY_RUN = f" WHERE run_id IN (SELECT run_id FROM {{db}}.runs WHERE experiment_id IN {_EXPERIMENTS})"

# The stable names (sqlcheck.TABLES) as SELECTs over the database; `{where}` is the
# restriction, empty when unrestricted. Mutable tables show their latest state.
CATALOG: dict[str, tuple[str, str]] = {
    "experiments": ("SELECT experiment_id, name, artifact_location, lifecycle_stage, creation_time, "
                    "last_update_time FROM {db}.experiments FINAL{where}", _BY_EXPERIMENT),
    "runs": ("SELECT run_id, experiment_id, run_name, user_id, status, start_time, end_time, lifecycle_stage, "
             "artifact_uri FROM {db}.runs FINAL{where}", _BY_EXPERIMENT),
    "params": ("SELECT run_id, key, value FROM {db}.params FINAL{where}", _BY_RUN),
    "tags": ("SELECT run_id, key, value FROM (SELECT run_id, key, value, deleted FROM {db}.tags FINAL{where}) "
             "WHERE deleted = 0", _BY_RUN),
    "metrics": ("SELECT run_id, key, step, timestamp, value FROM {db}.metrics{where}", _BY_RUN),
    "latest_metrics": (f"SELECT run_id, key, {latest_step('max(last_key)')} AS step, "
                       f"{latest_timestamp('max(last_key)')} AS timestamp, "
                       f"{latest_value('max(last_key)')} AS value, "
                       "min(min_value) AS min_value, max(max_value) AS max_value, "
                       "sum(count) AS count FROM {db}.latest_metrics{where} GROUP BY run_id, key", _BY_RUN),
    "experiment_tags": ("SELECT experiment_id, key, value FROM (SELECT experiment_id, key, value, deleted "
                        "FROM {db}.experiment_tags FINAL{where}) WHERE deleted = 0", _BY_EXPERIMENT),
}
assert tuple(CATALOG) == TABLES

# ClickHouse error codes of the limits we set → what to call them.
_TIMEOUT = frozenset({159, 160})  # TIMEOUT_EXCEEDED, TOO_SLOW
_RESULT = frozenset({396})  # TOO_MANY_ROWS_OR_BYTES
_MEMORY = frozenset({241})  # MEMORY_LIMIT_EXCEEDED
_COMPLEXITY = frozenset({167, 168, 306})  # TOO_DEEP_AST, TOO_BIG_AST, TOO_DEEP_RECURSION
# What clickhouse-connect returns for a String value that is not UTF-8: its bytes in hex.
_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_CH_MESSAGE = re.compile(r"DB::Exception: (.*?)(?: \(version [^)]*\))?\.?$", re.S)


@dataclass(frozen=True)
class PreparedSql:
    sql: str
    parameters: dict[str, Any] | None
    tables: frozenset[str]  # the stable names the query reads


class SqlQueries:
    def __init__(self, store: Store, settings: QuerySettings | None = None) -> None:
        self._store = store
        self.settings = settings or QuerySettings()

    def engine_settings(self) -> dict[str, Any]:
        """ClickHouse settings of every SQL call, in the order applied: readonly last."""
        s = self.settings
        return {
            "max_execution_time": s.sql_max_execution_time,
            "max_result_rows": s.sql_max_result_rows,
            "max_result_bytes": s.sql_max_result_bytes,
            "result_overflow_mode": "throw",
            "max_memory_usage": s.sql_max_memory_usage,
            "readonly": 2,
        }

    # -- blocking steps (threads) -------------------------------------------------------

    def prepare(self, query: str, experiment_ids: frozenset[str] | None = None) -> PreparedSql:
        """Validate `query` and build what runs; raises SqlRefused / InvalidArgument."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidArgument("query: required (one SELECT statement)")
        if len(query) > self.settings.sql_max_query_length:
            raise InvalidArgument(f"query of {len(query)} characters; the limit is "
                                  f"{self.settings.sql_max_query_length} (TRACKHOUSE_QUERY_SQL_MAX_QUERY_LENGTH)")
        if SURROGATES.search(query):
            raise InvalidArgument("query: not valid Unicode text (it holds lone surrogates); "
                                  "write bytes that are not UTF-8 as escapes: '\\xff'")
        parsed = self._parse(query)
        tables = check(_engine_text(parsed.ast_json))
        if not parsed.round_trip:
            raise InvalidArgument("query is not allowed: ClickHouse formats it into a different query")
        formatted = _engine_text(parsed.formatted)
        if SURROGATES.search(formatted):
            formatted = self._escaped(formatted, parsed.ast_json)
        return PreparedSql(*self.wrap(formatted, experiment_ids), tables)

    def _parse(self, query: str) -> Parsed:
        try:
            return self._store.sandbox.parse(query, self.engine_settings())
        except QueryFailed as exc:
            raise InvalidArgument(f"cannot parse the query: {_message(exc)}") from None

    def _escaped(self, formatted: str, ast_json: str) -> str:
        """`formatted` with its bytes that are not UTF-8 written as `\\xNN` escapes, which
        parses to the very AST that was checked (`ast_json`, as the engine returned it)."""
        escaped = escape_bytes(formatted)
        if self._parse(escaped).ast_json != ast_json:
            raise InvalidArgument("query is not allowed: it holds bytes that are not UTF-8 where they cannot "
                                  "be written as '\\xNN' escapes; build such values with unhex()")
        return escaped

    def wrap(self, formatted: str, experiment_ids: frozenset[str] | None) -> tuple[str, dict[str, Any] | None]:
        """The validated query under the CTEs that define the stable names."""
        db = self._store.database
        # str.replace, not format: the restriction holds a {name:Type} placeholder.
        ctes = ",\n".join(
            f"{name} AS ({select.replace('{where}', '' if experiment_ids is None else where).replace('{db}', db)})"
            for name, (select, where) in CATALOG.items()
        )
        params = None if experiment_ids is None else {"th_experiments": sorted(experiment_ids)}
        return f"WITH {ctes}\nSELECT * FROM (\n{formatted}\n)", params

    def _next(self, batches: Iterator[Any]) -> Any:
        with self._errors():
            return next(batches, None)

    def _open(self, prepared: PreparedSql, session: SqlSession) -> tuple[Any, Iterator[Any]]:
        context = self._store.sandbox.stream(prepared.sql, prepared.parameters, self.engine_settings())
        with self._errors():
            schema, batches = context.__enter__()
        # Closed when the query ends, even if its caller stopped waiting for this step.
        session.defer(context.__exit__, None, None, None)
        return schema, batches

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except QueryFailed as exc:
            raise self.domain_error(exc) from None

    def domain_error(self, exc: QueryFailed) -> Exception:
        """The query-domain error for an engine error of a user's query."""
        s, code, text = self.settings, exc.code, _message(exc)
        if code in _TIMEOUT:
            return ResourceExhausted(f"time limit: max_execution_time = {s.sql_max_execution_time} s "
                                     f"(TRACKHOUSE_QUERY_SQL_MAX_EXECUTION_TIME): {text}")
        if code in _RESULT:
            return ResourceExhausted(
                f"result limit: max_result_rows = {s.sql_max_result_rows}, max_result_bytes = "
                f"{s.sql_max_result_bytes} (TRACKHOUSE_QUERY_SQL_MAX_RESULT_ROWS / _BYTES): {text}")
        if code in _MEMORY:
            return ResourceExhausted(f"memory limit: max_memory_usage = {s.sql_max_memory_usage} bytes "
                                     f"(TRACKHOUSE_QUERY_SQL_MAX_MEMORY_USAGE): {text}")
        if code in _COMPLEXITY:
            return ResourceExhausted(f"complexity limit: {text}")
        if code is None:
            return exc  # not an answer about the query: the store failed
        return InvalidArgument(f"query failed: {text}")

    # -- the entry point ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run(self, query: str, *, experiment_ids: frozenset[str] | None = None) -> AsyncIterator[SqlAnswer]:
        """Validate and start `query`: `async with sql.run(q) as answer:` then `answer.schema`
        and `async for batch in answer` (pyarrow RecordBatches, as the engine produces them).

        `experiment_ids`: None reads every experiment; a set restricts every table to the
        rows of those experiments (an empty set sees no rows). Raises on entry when the query
        is refused (SqlRefused / InvalidArgument); a limit hit raises ResourceExhausted, on
        entry or while iterating, and so does a query that found no free sandbox slot within
        sql_max_execution_time ("busy"). Every way out (cancellation too) frees the slot.
        """
        session = await self._admit()
        try:
            prepared = await session.call(self.prepare, query, experiment_ids)
            schema, batches = await session.call(self._open, prepared, session)
            yield SqlAnswer(self, session, schema, batches)
        finally:
            await session.end()

    async def _admit(self) -> SqlSession:
        """A slot of the sandbox, waited for (asynchronously) as long as a query may run."""
        sandbox, wait = self._store.sandbox, self.settings.sql_max_execution_time
        try:
            async with asyncio.timeout(wait):
                return await sandbox.admit()
        except TimeoutError:
            raise Busy(
                f"busy: {sandbox.slots.size} SQL queries run at once (one per store reader) and none "
                f"ended within {wait} s (TRACKHOUSE_QUERY_SQL_MAX_EXECUTION_TIME); retry later") from None


class SqlAnswer:
    """The answer of one running query: its Arrow schema, then its record batches.

    Column names are text: a name holding bytes that are not UTF-8 (`SELECT '\\xff'`
    is named after its literal) gets U+FFFD for each, as values do in JSON and CSV;
    pyarrow cannot even read such a name, and clients could not either.
    """

    def __init__(self, queries: SqlQueries, session: SqlSession, schema: Any, batches: Iterator[Any]) -> None:
        self._queries = queries
        self._session = session
        self._batches = batches
        self.schema = None if schema is None else _text_names(schema)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (batch := await self._session.call(self._queries._next, self._batches)) is not None:
            schema = _text_names(batch.schema)
            yield batch if schema is batch.schema else batch.rename_columns(schema.names)


def _text_names(schema: pa.Schema) -> pa.Schema:
    """`schema`, or a copy whose names that are not UTF-8 have U+FFFD for each bad byte."""
    fields, renamed = [], False
    for i in range(len(schema)):
        field = schema.field(i)
        try:
            name = field.name
        except UnicodeDecodeError as exc:  # pyarrow decodes names strictly; `object` holds the bytes
            name = bytes(exc.object).decode("utf-8", "replace")
            field, renamed = field.with_name(name), True
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata) if renamed else schema


def _engine_text(value: str) -> str:
    """A String the parser returned, as text: bytes that are not UTF-8 as lone surrogates.

    clickhouse-connect hands such a value over as the hex of its bytes. The AST JSON
    always starts with `{` and the formatted query with a keyword or `(`, never as
    lowercase hex, so the two cannot be confused; surrogateescape keeps one character
    per byte, so the checker compares names byte for byte.
    """
    if not _HEX.fullmatch(value):
        return value
    return bytes.fromhex(value).decode("utf-8", "surrogateescape")


def _message(exc: StoreError) -> str:
    """ClickHouse's own sentence from an engine error (without the code and version)."""
    text = str(exc).strip()
    found = _CH_MESSAGE.search(text)
    text = (found.group(1) if found else text).strip()
    return text.split(": In scope ", 1)[0].split(". In scope ", 1)[0]
