"""Connections for user SQL: parse with ClickHouse's parser, run in a sandbox, stream Arrow.

Owns the SQL endpoint's own clickhouse-connect clients, apart from the store's
readers, because chDB applies a query's SETTINGS to the connection's session
(measured: a `readonly` or `max_result_rows` passed with one query stays set
for every later query on that connection). Here that is what we want: every
call passes the same sandbox settings, so a connection is never used without
them, and the readers that run search and history never see them.

Invariants:
- the current database of every sandbox client is the empty sandbox database
  (schema migration 4), so a table name the validator did not map resolves to
  nothing;
- user text reaches the engine only as a bound parameter of `parse()` or as the
  query of `stream()`, which callers build from the text `parse()` formatted;
- no clickhouse-connect exception leaves this module (`translate`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from trackhouse.store.dsn import DSN, connect
from trackhouse.store.errors import translate


@dataclass(frozen=True)
class Parsed:
    """ClickHouse's parse of one statement: its AST as JSON and the query formatted back."""

    ast_json: str
    formatted: str
    round_trip: bool  # parsing `formatted` gives the same AST


class SqlSandbox:
    """A small pool of sandbox clients, opened on first use (the constructor does no I/O)."""

    def __init__(self, dsn: DSN, database: str, size: int = 2) -> None:
        self._dsn = dsn
        self._database = database
        self._size = size
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._opened = 0
        self._lock = threading.Lock()
        self._all: list[Any] = []

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        client = self._take()
        try:
            yield client
        finally:
            self._idle.put(client)

    def _take(self) -> Any:
        with self._lock:
            if self._idle.empty() and self._opened < self._size:
                self._opened += 1
                try:
                    client = connect(self._dsn)
                except BaseException:
                    self._opened -= 1
                    raise
                client.database = self._database
                self._all.append(client)
                return client
        return self._idle.get()

    def parse(self, text: str, settings: Mapping[str, Any]) -> Parsed:
        """Parse `text` (bound as a parameter: never executed) into (AST JSON, formatted text)."""
        sql = ("SELECT parseQueryToJSON({q:String}) AS ast, formatQuery({q:String}) AS formatted, "
               "parseQueryToJSON(formatQuery({q:String})) = parseQueryToJSON({q:String}) AS same")
        with self._client() as client:
            try:
                row = client.query(sql, parameters={"q": text}, settings=dict(settings)).result_rows[0]
            except Exception as exc:
                raise translate(exc) from None
        return Parsed(str(row[0]), str(row[1]), bool(row[2]))

    @contextlib.contextmanager
    def stream(
        self, sql: str, parameters: Mapping[str, Any] | None, settings: Mapping[str, Any]
    ) -> Iterator[tuple[Any, Iterator[Any]]]:
        """Run `sql`; yield (pyarrow Schema, iterator of RecordBatches); the client is held until exit."""
        with self._client() as client:
            try:
                context = client.query_arrow_stream(sql, parameters=dict(parameters) if parameters else None,
                                                    settings=dict(settings), use_strings=True)
            except Exception as exc:
                raise translate(exc) from None
            with context as batches:
                # The stream reader read the schema already: an empty answer still has columns.
                yield getattr(context.gen, "schema", None), _translated(batches)

    def close(self) -> None:
        for client in self._all:
            with contextlib.suppress(Exception):
                client.close()
        self._all.clear()


def _translated(batches: Iterator[Any]) -> Iterator[Any]:
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise translate(exc) from None
        # clickhouse-connect yields one pyarrow Table per block; hand out its batches.
        yield from (item.to_batches() if hasattr(item, "to_batches") else [item])
