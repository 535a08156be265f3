"""The client's exceptions. Nothing else ever leaves ``trackhouse.client``.

    TrackhouseError                 base of everything the client raises
    ├── UsageError                  the caller misused the API; the message says what to do
    ├── ServerError                 the server answered a call with an error status
    │   ├── NotFound                NOT_FOUND: no such experiment / run
    │   ├── InvalidArgument         INVALID_ARGUMENT: e.g. a param logged again with another value
    │   ├── AlreadyExists           ALREADY_EXISTS: e.g. an experiment name taken
    │   └── FailedPrecondition      FAILED_PRECONDITION: e.g. updating a deleted run
    └── ServerUnavailable           UNAVAILABLE: the server could not be reached
        └── DeadlineExceeded        DEADLINE_EXCEEDED: no answer within the call's deadline

``grpc.RpcError`` is translated in ``transport.py`` (the only module importing
``grpc``); ``error_for_code`` is the one mapping from status codes to classes.
``log()`` never raises these for transport reasons: the sender retries.
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
    """The server could not be reached (down, restarting, network)."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeadlineExceeded(ServerUnavailable):
    """The server did not answer within the call's deadline."""


_BY_CODE: dict[str, type[ServerError]] = {
    "NOT_FOUND": NotFound,
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
}


def error_for_code(code: str, message: str) -> TrackhouseError:
    """The client error for a gRPC status ``code`` name (``"NOT_FOUND"``, ...) and its message."""
    if code == "UNAVAILABLE":
        return ServerUnavailable(message, code)
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(message, code)
    return _BY_CODE.get(code, ServerError)(message, code)
