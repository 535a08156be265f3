"""Errors raised by the store package.

    StoreError                 anything the store could not do
    ├── StoreUnavailable       the store cannot be reached (connection refused, timeout) or its disk is full
    ├── InvalidDSN             the DSN is not one the store understands
    └── QueryFailed            the engine refused or failed a statement
        ├── QueryTimeout       a read ran past its time limit (ClickHouse max_execution_time)
        └── ValueRefused       the engine refused a value of the request (a LIKE pattern): the caller's error

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


class QueryTimeout(QueryFailed):
    """A read ran longer than the limit it was given (ClickHouse TIMEOUT_EXCEEDED)."""


class ValueRefused(QueryFailed):
    """The engine refused a value the request carried (a LIKE pattern it cannot parse), never an
    outage: retrying cannot help. `reason` is the engine's sentence without its trace."""

    @property
    def reason(self) -> str:
        found = _ENGINE_SENTENCE.search(str(self))
        return (found.group(1) if found else str(self)).strip()[:500]


# ClickHouse's error codes for a statement stopped by max_execution_time.
_TIMEOUT_CODES = ("Code: 159.", "TIMEOUT_EXCEEDED")
# ClickHouse error codes that can only mean the engine refused a value of the request, never an
# outage: CANNOT_PARSE_ESCAPE_SEQUENCE (a LIKE pattern). Parsing refuses such values first; this
# keeps one that gets past it a client error (INVALID_ARGUMENT / 400), not a retryable 503.
# Adding a code needs a test that only a request's value raises it.
REFUSED_VALUE_CODES = frozenset({25})
_ENGINE_SENTENCE = re.compile(r"DB::Exception: (.*?)(?:: while executing |\. \(| \(version |$)", re.S)


def translate(exc: BaseException) -> StoreError:
    """Map a clickhouse-connect exception to the store's own hierarchy."""
    from clickhouse_connect.driver import exceptions as ch

    if isinstance(exc, StoreError):
        return exc
    text = _undecoded(exc) or str(exc)
    code = getattr(exc, "code", None)
    if not isinstance(code, int):  # e.g. an error in the middle of a streamed answer
        found = re.search(r"\bcode:? (\d+)", text, re.IGNORECASE)
        code = int(found.group(1)) if found else None
    # An error the server answered with (it has a ClickHouse code) is about the statement,
    # even when it arrives mid-stream as a transport-level error.
    if isinstance(exc, ch.OperationalError) and code is None:
        return StoreUnavailable(text)
    if "NOT_ENOUGH_SPACE" in text or "No space left on device" in text:
        # Disk full (ClickHouse error 243, or ENOSPC from the filesystem): retryable once space returns.
        return StoreUnavailable(f"the store is out of disk space: {text}")
    if any(marker in text for marker in _TIMEOUT_CODES):
        return QueryTimeout(text, code)
    return (ValueRefused if code in REFUSED_VALUE_CODES else QueryFailed)(text, code)


def _undecoded(exc: BaseException) -> str | None:
    """The engine's message when the driver failed to decode it (it quotes bytes that are not
    UTF-8, e.g. a name the request spelled with ``\\xNN`` escapes): its bytes, with those written
    as escapes. chDB raises the UnicodeDecodeError, which holds them, as the error's context."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; never loop on a cycle
        if seen is None:
            return None
        raw = seen.object if isinstance(seen, UnicodeDecodeError) else None
        if isinstance(raw, bytes) and raw.startswith(b"Code: "):
            return raw.decode("utf-8", "backslashreplace")
        seen = seen.__cause__ or seen.__context__
    return None
