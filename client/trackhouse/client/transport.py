"""The gRPC seam: the ``Transport`` protocol and ``GrpcTransport``, its real implementation.

This is the only client module that imports ``grpc``. Every ``grpc.RpcError``
is translated here, by ``_translate``, into the client's error hierarchy
(``errors.py``); nothing above this module knows gRPC exists. A ``Transport``
sends request messages and returns response messages, nothing more: building
requests and interpreting answers belongs to ``client.py`` / ``run.py`` /
``sender.py``.

Unary calls carry a deadline and are retried by gRPC itself on UNAVAILABLE
(the channel's retry policy below). The metric stream is not: the sender owns
its reconnects because it must resend the unacknowledged batches.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, cast

import grpc

from trackhouse.client.errors import ServerUnavailable, TrackhouseError, error_for_code
from trackhouse.client.settings import parse_url
from trackhouse.proto.v1 import (
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# gRPC's own retry of unary calls: only UNAVAILABLE, which means the call did
# not reach the service, so even CreateRun is safe to repeat. Not StreamMetrics:
# the sender owns its reconnects (resend in seq order, spool, the server's delay).
_UNARY = ("CreateExperiment", "GetExperiment", "CreateRun", "UpdateRun", "LogParams", "SetTags")
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    *({"service": "trackhouse.v1.IngestService", "method": m} for m in _UNARY),
                    {"service": "trackhouse.v1.QueryService"},
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
_CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    # Reconnect promptly when the server comes back (gRPC's own default grows to 120 s).
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class AckStream(Protocol):
    """One open StreamMetrics call: iterate for acks; ``cancel`` ends it from any thread.

    Iteration raises a ``TrackhouseError`` when the stream fails and simply stops
    when the server ends it normally.
    """

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]: ...

    def cancel(self) -> None: ...


class Transport(Protocol):
    """Everything the client sends and receives. Methods raise ``TrackhouseError`` only."""

    def create_experiment(self, request: ingest_pb2.CreateExperimentRequest) -> common_pb2.Experiment: ...
    def get_experiment(self, request: ingest_pb2.GetExperimentRequest) -> common_pb2.Experiment: ...
    def create_run(self, request: ingest_pb2.CreateRunRequest) -> common_pb2.RunInfo: ...
    def update_run(self, request: ingest_pb2.UpdateRunRequest) -> common_pb2.RunInfo: ...
    def log_params(self, request: ingest_pb2.LogParamsRequest) -> None: ...
    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None: ...
    def stream_metrics(self, requests: Iterator[ingest_pb2.MetricBatch]) -> AckStream: ...
    def get_run(self, request: query_pb2.GetRunRequest) -> common_pb2.Run: ...
    def search_runs(self, request: query_pb2.SearchRunsRequest) -> query_pb2.SearchRunsResponse: ...
    def get_metric_history(self, request: query_pb2.GetMetricHistoryRequest) -> query_pb2.MetricHistory: ...
    def sql(self, request: query_pb2.SqlRequest, timeout: float | None = None) -> Iterator[query_pb2.SqlChunk]: ...
    def reopen(self) -> None:
        """In a forked child: replace connections inherited from the parent (no I/O on them)."""
    def close(self) -> None: ...


def _translate(exc: grpc.RpcError) -> TrackhouseError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = exc.details() if isinstance(exc, grpc.Call) else None
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    return error_for_code(name, str(details or exc), retry_delay(trailing or ()))


def retry_delay(metadata: Iterable[tuple[str, str | bytes]]) -> float | None:
    """The server's retry delay in seconds, from trailing metadata, or None.

    Understood: ``retry-delay`` (seconds, ``"1.5"`` or ``"1.5s"``), gRPC's
    ``grpc-retry-pushback-ms``, and ``google.rpc.RetryInfo`` in
    ``grpc-status-details-bin`` when googleapis-common-protos is installed.
    """
    for key, value in metadata:
        try:
            if key == "retry-delay" and isinstance(value, str):
                return max(0.0, float(value.strip().removesuffix("s")))
            if key == "grpc-retry-pushback-ms" and isinstance(value, str):
                return max(0.0, int(value) / 1000)
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                found = _retry_info(value)
                if found is not None:
                    return found
        except ValueError:
            continue
    return None


def _retry_info(blob: bytes) -> float | None:
    try:  # optional: only present when the user installed googleapis-common-protos
        from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    status = status_pb2.Status.FromString(blob)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def _open_channel(url: str, tls_ca: str = "") -> grpc.Channel:
    target, secure = parse_url(url)
    if secure:
        roots = None
        if tls_ca:
            with open(tls_ca, "rb") as f:
                roots = f.read()
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=_CHANNEL_OPTIONS)
    return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)


_INHERITED: list[grpc.Channel] = []


def queued_requests(q: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """A request iterator for a streaming call, fed through ``q``: None half-closes the stream.
    gRPC consumes it on its own thread, so the producer never blocks on the network."""
    while (item := q.get()) is not None:
        yield item


class _GrpcAckStream:
    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]:
        try:
            for ack in self._call:
                yield cast(ingest_pb2.BatchAck, ack)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def cancel(self) -> None:
        self._call.cancel()


class GrpcTransport:
    """``Transport`` over two gRPC channels (one when ingest and query share an address).

    Creating it does no I/O: gRPC channels connect on first use (``tls_ca`` is read here).
    ``token``, when given, travels as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(self, url: str, query_url: str | None = None, *, rpc_timeout: float = 30.0,
                 token: str = "", tls_ca: str = "") -> None:
        self._timeout = rpc_timeout
        self.url = url
        self._query_url = url if query_url is None else query_url
        self._tls_ca = tls_ca
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._connect()

    def _connect(self) -> None:
        self._ingest_channel = _open_channel(self.url, self._tls_ca)
        same = self._query_url == self.url
        self._query_channel = self._ingest_channel if same else _open_channel(self._query_url, self._tls_ca)
        self._ingest = ingest_pb2_grpc.IngestServiceStub(self._ingest_channel)  # type: ignore[no-untyped-call]
        self._query = query_pb2_grpc.QueryServiceStub(self._query_channel)  # type: ignore[no-untyped-call]

    def reopen(self) -> None:
        # The parent's channels share sockets with the parent: never close them here
        # (a shutdown would cut the parent's connection); keep them referenced.
        _INHERITED.extend((self._ingest_channel, self._query_channel))
        self._connect()

    def _call(self, method: Callable[..., Any], request: Any, result: type[_T]) -> _T:
        try:
            return cast(_T, method(request, timeout=self._timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        except ValueError as exc:  # grpc raises ValueError on a closed channel
            raise ServerUnavailable(f"channel closed: {exc}") from None

    def create_experiment(self, request: ingest_pb2.CreateExperimentRequest) -> common_pb2.Experiment:
        return self._call(self._ingest.CreateExperiment, request, common_pb2.Experiment)

    def get_experiment(self, request: ingest_pb2.GetExperimentRequest) -> common_pb2.Experiment:
        return self._call(self._ingest.GetExperiment, request, common_pb2.Experiment)

    def create_run(self, request: ingest_pb2.CreateRunRequest) -> common_pb2.RunInfo:
        return self._call(self._ingest.CreateRun, request, common_pb2.RunInfo)

    def update_run(self, request: ingest_pb2.UpdateRunRequest) -> common_pb2.RunInfo:
        return self._call(self._ingest.UpdateRun, request, common_pb2.RunInfo)

    def log_params(self, request: ingest_pb2.LogParamsRequest) -> None:
        self._call(self._ingest.LogParams, request, ingest_pb2.LogParamsResponse)

    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None:
        self._call(self._ingest.SetTags, request, ingest_pb2.SetTagsResponse)

    def stream_metrics(self, requests: Iterator[ingest_pb2.MetricBatch]) -> AckStream:
        """Open the long-lived stream; no deadline, the sender cancels it when done."""
        try:
            return _GrpcAckStream(self._ingest.StreamMetrics(requests, metadata=self._metadata))
        except ValueError as exc:
            raise ServerUnavailable(f"channel closed: {exc}") from None

    def get_run(self, request: query_pb2.GetRunRequest) -> common_pb2.Run:
        return self._call(self._query.GetRun, request, common_pb2.Run)

    def search_runs(self, request: query_pb2.SearchRunsRequest) -> query_pb2.SearchRunsResponse:
        return self._call(self._query.SearchRuns, request, query_pb2.SearchRunsResponse)

    def get_metric_history(self, request: query_pb2.GetMetricHistoryRequest) -> query_pb2.MetricHistory:
        return self._call(self._query.GetMetricHistory, request, query_pb2.MetricHistory)

    def sql(self, request: query_pb2.SqlRequest, timeout: float | None = None) -> Iterator[query_pb2.SqlChunk]:
        """The chunks of one SQL answer, read as they arrive (deadline: `timeout` or the RPC timeout)."""
        try:
            for chunk in self._query.Sql(request, timeout=self._timeout if timeout is None else timeout):
                yield cast(query_pb2.SqlChunk, chunk)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        except ValueError as exc:
            raise ServerUnavailable(f"channel closed: {exc}") from None

    def close(self) -> None:
        self._ingest_channel.close()
        if self._query_channel is not self._ingest_channel:
            self._query_channel.close()
