"""Errors of the query service's domain; the service maps them to gRPC codes.

    QueryError              base; never raised itself
    ├── InvalidArgument     a bad filter, order_by, page token or limit     → INVALID_ARGUMENT
    ├── NotFound            a run that does not exist                        → NOT_FOUND
    └── ResourceExhausted   a SQL query hit one of its limits (time, rows,   → RESOURCE_EXHAUSTED
                            bytes, memory); the message names the limit

`SqlRefused` (trackhouse.query.sqlcheck) is an InvalidArgument too.
`FilterError` (from trackhouse.query.filters) is an InvalidArgument too: the
service treats both alike. Store errors map to UNAVAILABLE.
"""

from __future__ import annotations


class QueryError(Exception):
    """Base of the query service's errors."""


class InvalidArgument(QueryError, ValueError):
    pass


class NotFound(QueryError):
    pass


class ResourceExhausted(QueryError):
    pass


class Busy(ResourceExhausted):
    """Every slot for this kind of work is taken and none freed in time: retry later (HTTP 429)."""
