"""Reads as steps: the queries a read needs, apart from the client that runs them (sans-I/O).

A read is written once, as a generator that yields `Rows` or `Arrow` requests and
receives each result (`rows = yield Rows(sql, params)`), and returns its answer.
`Store.run(steps)` drives it on blocking clients (a thread; the embedded store),
`await Store.arun(steps)` on clickhouse-connect's async client (a ClickHouse server).
So the query service is async over HTTP without a second, hand-written copy of any read.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Rows:
    """Run `sql`; the result sent back is a list of row tuples."""

    sql: str
    parameters: dict[str, Any] | None = None
    settings: dict[str, Any] | None = field(default=None)


@dataclass(frozen=True)
class Arrow:
    """Run `sql`; the result sent back is a pyarrow Table."""

    sql: str
    parameters: dict[str, Any] | None = None


Steps = Generator["Rows | Arrow", Any, T]


def result(value: T) -> Steps[T]:
    """Steps that run nothing and return `value` (an early answer, for `yield from`)."""
    return value
    yield  # pragma: no cover - makes this a generator
