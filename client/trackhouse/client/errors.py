"""The client's exceptions. Nothing else ever leaves ``trackhouse.client``.

    TrackhouseError                 base of everything the client raises
    ├── UsageError                  the caller misused the API; the message says what to do
    ├── ServerError                 the server answered a call with an error status
    │   ├── NotFound                NOT_FOUND: no such experiment / run
    │   ├── InvalidArgument         INVALID_ARGUMENT: e.g. a param logged again with another value;
    │   │                           also an SQL query's own limit (RESOURCE_EXHAUSTED, below)
    │   ├── AlreadyExists           ALREADY_EXISTS: e.g. an experiment name taken
    │   └── FailedPrecondition      FAILED_PRECONDITION: e.g. updating a deleted run
    ├── ServerUnavailable           UNAVAILABLE (or another retryable code, CANCELLED too): try again later;
    │   │                           ``retry_after`` holds the server's retry delay when it sent one
    │   └── DeadlineExceeded        DEADLINE_EXCEEDED: no answer within the call's deadline
    └── SpoolError                  a spool on disk cannot be written or read (corrupt records are
                                    reported and skipped, not raised)

``grpc.RpcError`` is translated in ``transport.py`` (the only module importing
``grpc``); ``error_for_code`` is the one mapping from status codes to classes.
``log()`` never raises these for transport reasons: the sender retries, then spools.
Retryable codes (``RETRYABLE``): UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
ABORTED, CANCELLED — they map to ``ServerUnavailable``. CANCELLED is no answer of the
service: the call was cut (the client's channel closed under it, a server shutting down),
so whether it took effect is unknown; the operation is kept and sent again, never dropped
as refused. The metric stream reconnects after any error.
One exception: an SQL query (``sql=True``) answered RESOURCE_EXHAUSTED without a retry
delay hit a limit of its own (result rows or bytes, memory, time), which fails again on
any replica: ``InvalidArgument`` (``code`` stays ``"RESOURCE_EXHAUSTED"``). With a retry
delay the server is overloaded (no SQL slot freed in time): ``ServerUnavailable``.
"""

from __future__ import annotations


class TrackhouseError(Exception):
    """Base class of every error raised by the trackhouse client."""


class UsageError(TrackhouseError, ValueError):
    """The API was called wrongly (bad value, finished run, closed client)."""


class ServerError(TrackhouseError):
    """The server refused a call. ``code`` is the gRPC status name, e.g. ``"NOT_FOUND"``."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotFound(ServerError):
    """The experiment or run does not exist."""


class InvalidArgument(ServerError):
    """The server rejected a value of the request."""


class AlreadyExists(ServerError):
    """The entity to create exists already."""


class FailedPrecondition(ServerError):
    """The entity is not in a state that allows the call (e.g. deleted)."""


class ServerUnavailable(TrackhouseError):
    """The server could not be reached or asked to retry (down, restarting, overloaded)."""

    def __init__(self, message: str, code: str = "UNAVAILABLE", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class DeadlineExceeded(ServerUnavailable):
    """The server did not answer within the call's deadline."""


class SpoolError(TrackhouseError):
    """A spool directory or segment cannot be written or read (permissions, full disk, not a spool)."""


RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"})

_BY_CODE: dict[str, type[ServerError]] = {
    "NOT_FOUND": NotFound,
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
}


def error_for_code(code: str, message: str, retry_after: float | None = None, *,
                   sql: bool = False) -> TrackhouseError:
    """The client error for a gRPC status ``code`` name (``"NOT_FOUND"``, ...) and its message.

    ``sql``: the status answers an SQL query, whose limits are final (module docstring).
    """
    if sql and code == "RESOURCE_EXHAUSTED" and retry_after is None:
        return InvalidArgument(message, code)
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(message, code, retry_after)
    if code in RETRYABLE:
        return ServerUnavailable(message, code, retry_after)
    return _BY_CODE.get(code, ServerError)(message, code)
