"""`trackhouse sql "SELECT …"`: run read-only SQL (docs/sql.md) and print the answer.

Against a running server through the Python client's gRPC `Sql` stream: `--url HOST:PORT`
(the query service, whatever TRACKHOUSE_CLIENT_QUERY_URL says), else the client's
variables (TRACKHOUSE_CLIENT_QUERY_URL, else TRACKHOUSE_CLIENT_URL, else 127.0.0.1:50051;
its token and CA too). Or straight against a store when no server holds it (an embedded
store allows one process per data path): `--store DSN`, or a bare `--store` for
TRACKHOUSE_SERVER_STORE; `--database` defaults to TRACKHOUSE_SERVER_DATABASE, and the
connection to a ClickHouse server reads TRACKHOUSE_STORE_* (user, password, TLS,
timeouts, cluster), as `migrate` and `token` do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import pyarrow as pa

from trackhouse.cli.settings import ServerSettings
from trackhouse.query.settings import QuerySettings
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlformat import csv_body, json_body
from trackhouse.store import DEFAULT_DSN, open_store
from trackhouse.store.settings import StoreSettings

MAX_CELL = 60


def add_parser(sub: Any) -> None:
    env = ServerSettings.from_env()
    sql = sub.add_parser("sql", help="run one read-only SELECT and print the answer",
                         description="Run one read-only SELECT over trackhouse's tables (docs/sql.md) and "
                                     "print the answer, against a server (--url) or a store (--store).")
    # Optional here only so that a bare `--store` that swallowed the query gets a clear error (run()).
    sql.add_argument("query", nargs="?", help="one SELECT, e.g. \"SELECT count() FROM runs\"")
    where = sql.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, metavar="HOST:PORT",
                       help="the query service (its replicas: comma-separated); unset: TRACKHOUSE_CLIENT_QUERY_URL, "
                            "else TRACKHOUSE_CLIENT_URL, else 127.0.0.1:50051")
    where.add_argument("--store", nargs="?", const=env.store, default=None, metavar="DSN",
                       help="read a store directly (no server running); without DSN: TRACKHOUSE_SERVER_STORE "
                            f"(default {DEFAULT_DSN}; put the query first then); connection: "
                            "TRACKHOUSE_STORE_*")
    sql.add_argument("--database", default=env.database,
                     help="database inside --store (default %(default)s); env TRACKHOUSE_SERVER_DATABASE")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")


def run(args: argparse.Namespace) -> int:
    if args.query is None:
        hint = f"; --store took {args.store!r} as its DSN" if args.store and "://" not in args.store else ""
        raise ValueError(f"sql: no query given{hint}: write trackhouse sql \"SELECT …\" [--store [DSN]]")
    table = _from_store(args) if args.store else _from_server(args.url, args.query)
    if args.format == "csv":
        sys.stdout.write(csv_body(table).decode())
    elif args.format == "json":
        sys.stdout.write(json_body(table).decode() + "\n")
    else:
        sys.stdout.write(render(table))
    return 0


def _from_server(url: str | None, query: str) -> pa.Table:
    import trackhouse.client as th

    # connect(url) alone would replace only the ingest address: TRACKHOUSE_CLIENT_QUERY_URL would still win.
    client = th.connect(url, query_url=url) if url else th.connect()
    try:
        return client.sql(query)
    finally:
        client.close(timeout=1.0)


def _from_store(args: argparse.Namespace) -> pa.Table:
    store = open_store(args.store, args.database, migrate=False, settings=StoreSettings.from_env())
    try:
        sql = SqlQueries(store, QuerySettings.from_env())

        async def collect() -> pa.Table:
            async with sql.run(args.query) as answer:
                batches = [b async for b in answer]
            return pa.Table.from_batches(batches, schema=answer.schema or pa.schema([]))

        return asyncio.run(collect())
    finally:
        store.close()


def _cell(value: Any) -> str:
    text = "NULL" if value is None else str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def render(table: pa.Table) -> str:
    """A plain text table: header, rule, rows, and the row count."""
    names = table.schema.names
    rows = [[_cell(v) for v in row] for row in zip(*(c.to_pylist() for c in table.columns), strict=True)]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines) + "\n"
