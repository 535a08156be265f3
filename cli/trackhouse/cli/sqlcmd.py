"""`trackhouse sql "SELECT …"`: run read-only SQL (docs/sql.md) and print the answer.

Against a running server (`--url HOST:PORT`, the default 127.0.0.1:50051) through the
Python client's gRPC `Sql` stream, or straight against a store (`--store DSN`) when no
server holds it (an embedded store allows one process per data path).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import pyarrow as pa

from trackhouse.query.settings import QuerySettings
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlformat import csv_body, json_body
from trackhouse.store import open_store

MAX_CELL = 60


def add_parser(sub: Any) -> None:
    sql = sub.add_parser("sql", help="run one read-only SELECT and print the answer",
                         description="Run one read-only SELECT over trackhouse's tables (docs/sql.md) and "
                                     "print the answer, against a server (--url) or a store (--store).")
    sql.add_argument("query", help="one SELECT, e.g. \"SELECT count() FROM runs\"")
    where = sql.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="query service HOST:PORT (default 127.0.0.1:50051)")
    where.add_argument("--store", default=None, metavar="DSN", help="read a store directly (no server running)")
    sql.add_argument("--database", default="trackhouse", help="database inside --store (default %(default)s)")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")


def run(args: argparse.Namespace) -> int:
    table = _from_store(args) if args.store else _from_server(args.url or "127.0.0.1:50051", args.query)
    if args.format == "csv":
        sys.stdout.write(csv_body(table).decode())
    elif args.format == "json":
        sys.stdout.write(json_body(table).decode() + "\n")
    else:
        sys.stdout.write(render(table))
    return 0


def _from_server(url: str, query: str) -> pa.Table:
    import trackhouse.client as th

    client = th.connect(url)
    try:
        return client.sql(query)
    finally:
        client.close(timeout=1.0)


def _from_store(args: argparse.Namespace) -> pa.Table:
    store = open_store(args.store, args.database, migrate=False)
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
