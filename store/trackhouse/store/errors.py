"""Errors raised by the store package.

    StoreError                 anything the store could not do
    ├── StoreUnavailable       the store cannot be reached (connection refused, timeout) or its disk is full
    ├── InvalidDSN             the DSN is not one the store understands
    └── QueryFailed            the engine refused or failed a statement
        └── QueryTimeout       a read ran past its time limit (ClickHouse max_execution_time)

No `clickhouse_connect` exception leaves this package: `translate()` is the seam.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store error."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the caller may retry later."""


class InvalidDSN(StoreError, ValueError):
    """The DSN is malformed or names an unsupported scheme."""


class QueryFailed(StoreError):
    """The engine refused or failed a statement."""


class QueryTimeout(QueryFailed):
    """A read ran longer than the limit it was given (ClickHouse TIMEOUT_EXCEEDED)."""


# ClickHouse's error codes for a statement stopped by max_execution_time.
_TIMEOUT_CODES = ("Code: 159.", "TIMEOUT_EXCEEDED")


def translate(exc: BaseException) -> StoreError:
    """Map a clickhouse-connect exception to the store's own hierarchy."""
    from clickhouse_connect.driver import exceptions as ch

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, ch.OperationalError):
        return StoreUnavailable(str(exc))
    if "NOT_ENOUGH_SPACE" in str(exc) or "No space left on device" in str(exc):
        # Disk full (ClickHouse error 243, or ENOSPC from the filesystem): retryable once space returns.
        return StoreUnavailable(f"the store is out of disk space: {exc}")
    if any(code in str(exc) for code in _TIMEOUT_CODES):
        return QueryTimeout(str(exc))
    return QueryFailed(str(exc))
