"""Errors raised by the store package.

    StoreError                 anything the store could not do
    ├── StoreUnavailable       the store cannot be reached (connection refused, timeout)
    ├── InvalidDSN             the DSN is not one the store understands
    └── QueryFailed            the engine refused or failed a statement

No `clickhouse_connect` exception leaves this package: `translate()` is the seam.
"""

from __future__ import annotations

import re


class StoreError(Exception):
    """Base class of every store error."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the caller may retry later."""


class InvalidDSN(StoreError, ValueError):
    """The DSN is malformed or names an unsupported scheme."""


class QueryFailed(StoreError):
    """The engine refused or failed a statement; `code` is ClickHouse's error code when known."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def translate(exc: BaseException) -> StoreError:
    """Map a clickhouse-connect exception to the store's own hierarchy."""
    from clickhouse_connect.driver import exceptions as ch

    if isinstance(exc, StoreError):
        return exc
    code = getattr(exc, "code", None)
    if not isinstance(code, int):  # e.g. an error in the middle of a streamed answer
        found = re.search(r"\bcode:? (\d+)", str(exc), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    # An error the server answered with (it has a ClickHouse code) is about the statement,
    # even when it arrives mid-stream as a transport-level error.
    if isinstance(exc, ch.OperationalError) and code is None:
        return StoreUnavailable(str(exc))
    return QueryFailed(str(exc), code)
