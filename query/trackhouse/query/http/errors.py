"""Errors of the MLflow REST API, and the one mapping to MLflow's error codes and HTTP statuses.

    MlflowError(error_code, message)    rendered as {"error_code": ..., "message": ...} with
                                        MLflow's HTTP status for the code (`HTTP_STATUS`)
    IngestCallError(code, message)      a write the ingest service refused; `code` is the gRPC
                                        status name ("NOT_FOUND"); raised by an IngestPort

`to_mlflow_error()` is the only place that turns query-domain, store and ingest errors
into MLflow's codes: handlers raise whatever their layer raises and the routes translate.
"""

from __future__ import annotations

from trackhouse.query.errors import InvalidArgument, NotFound
from trackhouse.query.filters import FilterError
from trackhouse.store import QueryTimeout, StoreError, ValueRefused

INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"
RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
RESOURCE_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
BAD_REQUEST = "BAD_REQUEST"
ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"
INTERNAL_ERROR = "INTERNAL_ERROR"
TEMPORARILY_UNAVAILABLE = "TEMPORARILY_UNAVAILABLE"
REQUEST_LIMIT_EXCEEDED = "REQUEST_LIMIT_EXCEEDED"
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"

# MLflow's ERROR_CODE_TO_HTTP_STATUS (mlflow/exceptions.py), for the codes we raise.
HTTP_STATUS = {
    INVALID_PARAMETER_VALUE: 400,
    RESOURCE_ALREADY_EXISTS: 400,
    BAD_REQUEST: 400,
    UNAUTHENTICATED: 401,
    PERMISSION_DENIED: 403,
    RESOURCE_DOES_NOT_EXIST: 404,
    ENDPOINT_NOT_FOUND: 404,
    REQUEST_LIMIT_EXCEEDED: 429,
    INTERNAL_ERROR: 500,
    TEMPORARILY_UNAVAILABLE: 503,
}

# gRPC status names of the ingest service → MLflow codes. A write to a deleted run is
# FAILED_PRECONDITION in ingest and INVALID_PARAMETER_VALUE in MLflow.
_FROM_GRPC = {
    "INVALID_ARGUMENT": INVALID_PARAMETER_VALUE,
    "FAILED_PRECONDITION": INVALID_PARAMETER_VALUE,
    "NOT_FOUND": RESOURCE_DOES_NOT_EXIST,
    "ALREADY_EXISTS": RESOURCE_ALREADY_EXISTS,
    "RESOURCE_EXHAUSTED": REQUEST_LIMIT_EXCEEDED,
    "UNAVAILABLE": TEMPORARILY_UNAVAILABLE,
    "DEADLINE_EXCEEDED": TEMPORARILY_UNAVAILABLE,
    "UNAUTHENTICATED": UNAUTHENTICATED,
    "PERMISSION_DENIED": PERMISSION_DENIED,
}


class MlflowError(Exception):
    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.error_code, 500)

    def body(self) -> dict[str, str]:
        return {"error_code": self.error_code, "message": self.message}


def invalid(message: str) -> MlflowError:
    return MlflowError(INVALID_PARAMETER_VALUE, message)


def missing(message: str) -> MlflowError:
    return MlflowError(RESOURCE_DOES_NOT_EXIST, message)


class IngestCallError(Exception):
    """A call to the ingest service failed; `code` is the gRPC status code's name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def to_mlflow_error(exc: Exception) -> MlflowError:
    """The MLflow error for any exception a handler raised (INTERNAL_ERROR when unknown)."""
    if isinstance(exc, MlflowError):
        return exc
    if isinstance(exc, IngestCallError):
        return MlflowError(_FROM_GRPC.get(exc.code, INTERNAL_ERROR), exc.message)
    if isinstance(exc, (InvalidArgument, FilterError)):
        return invalid(str(exc))
    if isinstance(exc, NotFound):
        return missing(str(exc))
    if isinstance(exc, QueryTimeout):
        return MlflowError(REQUEST_LIMIT_EXCEEDED,
                           f"query time limit (TRACKHOUSE_QUERY_MAX_QUERY_SECONDS) exceeded: {exc}")
    if isinstance(exc, ValueRefused):  # the request's own value: retrying cannot help
        return invalid(f"the store refused a value of the request: {exc.reason}")
    if isinstance(exc, StoreError):
        return MlflowError(TEMPORARILY_UNAVAILABLE, f"store error: {exc}")
    return MlflowError(INTERNAL_ERROR, "internal error")
