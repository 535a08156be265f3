"""Errors of the ingest service's domain; the service maps them to gRPC codes.

    IngestError                 base; never raised itself
    ├── InvalidArgument         the request is malformed (field and limit named)  → INVALID_ARGUMENT
    ├── NotFound                an experiment or run that does not exist          → NOT_FOUND
    ├── AlreadyExists           an experiment name that is taken                   → ALREADY_EXISTS
    ├── PermissionDenied        the caller's token may not do this at all          → PERMISSION_DENIED
    ├── FailedPrecondition      the target is in the wrong state (deleted run)     → FAILED_PRECONDITION
    ├── ResourceExhausted       the buffer is over its budget; retry later         → RESOURCE_EXHAUSTED
    └── Unavailable             the store cannot be reached; retry later           → UNAVAILABLE

Domain modules raise these; `service.status_for()` is the one place that maps
them (and store errors) to gRPC status codes.
"""

from __future__ import annotations


class IngestError(Exception):
    """Base of the ingest service's errors."""


class InvalidArgument(IngestError):
    pass


class NotFound(IngestError):
    pass


class PermissionDenied(IngestError):
    pass


class AlreadyExists(IngestError):
    pass


class FailedPrecondition(IngestError):
    pass


class ResourceExhausted(IngestError):
    pass


class Unavailable(IngestError):
    pass
