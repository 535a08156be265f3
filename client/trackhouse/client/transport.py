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

A service may have several addresses (replicas: ``"a:50051,b:50051"``). Calls go
to the current one; when it answers UNAVAILABLE (after gRPC's own retries) the
current address moves to the next, a unary call is tried there at once, and the
sender's next stream opens there. The server side makes this safe: batches are
deduplicated by (writer_id, seq) in the store, whichever replica stored them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

import grpc

from trackhouse.client.errors import ServerUnavailable, TrackhouseError, error_for_code
from trackhouse.client.policy import retry_delay
from trackhouse.client.settings import parse_urls
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
    # A DNS name with several addresses (a headless Kubernetes service): spread calls and streams
    # over the ready ones, and drop one that goes away (gRPC's default, pick_first, uses only one).
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
# The ingest channels receive only acks and small unary replies: no bandwidth-delay probing of
# what they receive. Its pings cost the client's gRPC threads ~1.5 ms of CPU per metric batch
# (measured: docs/benchmarks.md, issue 5 fourth pass); reads go over the query channels, which keep it.
_INGEST_OPTIONS = [*_CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]


class AckStream(Protocol):
    """One open StreamMetrics call: iterate for acks; ``cancel`` ends it from any thread.

    Iteration raises a ``TrackhouseError`` when the stream fails and simply stops
    when the server ends it normally.
    """

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]: ...

    def cancel(self) -> None: ...

    def ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the call's end to be handled; True once it was."""


class Transport(Protocol):
    """Everything the client sends and receives. Methods raise ``TrackhouseError`` only."""

    def create_experiment(self, request: ingest_pb2.CreateExperimentRequest) -> common_pb2.Experiment: ...
    def get_experiment(self, request: ingest_pb2.GetExperimentRequest) -> common_pb2.Experiment: ...
    def create_run(self, request: ingest_pb2.CreateRunRequest) -> common_pb2.RunInfo: ...
    def update_run(self, request: ingest_pb2.UpdateRunRequest) -> common_pb2.RunInfo: ...
    def log_params(self, request: ingest_pb2.LogParamsRequest) -> None: ...
    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None: ...
    def stream_metrics(self, requests: Iterator[bytes]) -> AckStream:
        """Open a StreamMetrics call sending ``requests``: serialized ``MetricBatch`` messages."""
    def get_run(self, request: query_pb2.GetRunRequest) -> common_pb2.Run: ...
    def search_runs(self, request: query_pb2.SearchRunsRequest) -> query_pb2.SearchRunsResponse: ...
    def get_metric_history(self, request: query_pb2.GetMetricHistoryRequest) -> query_pb2.MetricHistory: ...
    def sql(self, request: query_pb2.SqlRequest, timeout: float | None = None) -> Iterator[query_pb2.SqlChunk]: ...
    def reopen(self) -> None:
        """In a forked child (one thread): replace connections inherited from the parent (no I/O on them,
        no wait on a lock a parent thread may have held at the fork)."""
    def close(self) -> None: ...


def _translate(exc: grpc.RpcError, *, sql: bool = False) -> TrackhouseError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = exc.details() if isinstance(exc, grpc.Call) else None
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    return error_for_code(name, str(details or exc), retry_delay(trailing or ()), sql=sql)


def _open_channel(target: str, secure: bool, tls_ca: str, options: list[tuple[str, Any]]) -> grpc.Channel:
    if secure:
        roots = None
        if tls_ca:
            with open(tls_ca, "rb") as f:
                roots = f.read()
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
    return grpc.insecure_channel(target, options=options)


_INHERITED: list[grpc.Channel] = []
_STREAM_METRICS = "/trackhouse.v1.IngestService/StreamMetrics"


def queued_requests(q: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """A request iterator for a streaming call, fed through ``q``: None half-closes the stream.
    gRPC consumes it on its own thread, so the producer never blocks on the network."""
    while (item := q.get()) is not None:
        yield item


class _Replicas:
    """The addresses of one service, a channel to each (opened on first use), and the current one.

    Thread-safe. ``failed(index)`` moves on only if ``index`` is still current, so
    several calls failing on one dead address move past it once. Once ``close``d, no channel
    is opened again: a call cut by the close does not fail over to the next address.
    """

    def __init__(self, url: str, tls_ca: str, options: list[tuple[str, Any]]) -> None:
        self._targets = parse_urls(url)
        self._tls_ca = tls_ca
        self._options = options
        self._channels: list[grpc.Channel | None] = [None] * len(self._targets)
        self._index = 0
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return len(self._targets)

    def current(self) -> tuple[int, grpc.Channel]:
        with self._lock:
            if self._closed:
                raise ServerUnavailable("the client is closed: its connection to the server is shut")
            i = self._index
            channel = self._channels[i]
            if channel is None:
                channel = self._channels[i] = _open_channel(*self._targets[i], self._tls_ca, self._options)
            return i, channel

    def failed(self, index: int) -> None:
        with self._lock:
            if index == self._index and len(self._targets) > 1 and not self._closed:
                self._index = (index + 1) % len(self._targets)
                logger.warning("trackhouse: %s unavailable, moving to %s",
                               self._targets[index][0], self._targets[self._index][0])

    def channels(self) -> list[grpc.Channel]:
        with self._lock:
            return [c for c in self._channels if c is not None]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = [c for c in self._channels if c is not None]
        for channel in channels:  # outside the lock: a call it cuts fails over no further (``current``)
            channel.close()

    def after_fork(self) -> list[grpc.Channel]:
        """In a forked child: returns the parent's channels and forgets them (the next call opens its own),
        keeping the current address. Takes no lock: a parent thread may have held ``_lock`` at the fork
        (opening a channel, logging a failover), and no thread is left to release it; the child has
        one thread here, so reading without it is safe."""
        inherited = [c for c in self._channels if c is not None]
        self._channels = [None] * len(self._targets)
        self._lock = threading.Lock()
        return inherited


class _GrpcAckStream:
    """Reads acks only while a sent request is unanswered (the server answers each with one ack).

    Waiting in gRPC's ``next()`` wakes the reader every 100 ms (``grpc._common.wait``
    polls so that a main thread stays responsive to signals), whether or not anything is
    in flight: about 1.4 ms of CPU a second for an idle stream. Between batches the
    reader waits instead on an Event with no timeout, set when a request is handed to
    gRPC or when the call ends (its done callback, or ``cancel``).
    """

    def __init__(self, requests: Iterator[bytes]) -> None:
        self.requests = self._counted(requests)
        self._sent = 0  # requests handed to gRPC; written by its request-consumer thread only
        self._ended = False
        self._ready = threading.Event()
        self._done = threading.Event()  # set by gRPC's done callback: past the call's last event
        self._call: Any = None
        self._on_unavailable: Callable[[], None] = lambda: None

    def _counted(self, requests: Iterator[bytes]) -> Iterator[bytes]:
        for request in requests:
            self._sent += 1
            self._ready.set()
            yield request

    def start(self, call: Any, on_unavailable: Callable[[], None]) -> None:
        self._call, self._on_unavailable = call, on_unavailable
        call.add_done_callback(self._call_done)  # at once when it already ended

    def _call_done(self, _: Any) -> None:
        self._done.set()
        self._end()

    def _end(self) -> None:
        self._ended = True
        self._ready.set()

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]:
        answered = 0
        try:
            while True:
                while answered >= self._sent and not self._ended:
                    self._ready.wait()
                    self._ready.clear()  # then the condition is checked again: no wake-up is lost
                ack = next(self._call, None)
                if ack is None:
                    return
                answered += 1
                yield cast(ingest_pb2.BatchAck, ack)
        except grpc.RpcError as exc:
            error = _translate(exc)
            if isinstance(error, ServerUnavailable):
                self._on_unavailable()
            raise error from None

    def cancel(self) -> None:
        self._call.cancel()
        self._end()

    def ended(self, timeout: float) -> bool:
        return self._done.wait(timeout)


class GrpcTransport:
    """``Transport`` over gRPC channels: one per address of ingest and one per address of query
    (two to one address when they are equal: the query channels keep gRPC's receive-window probing).

    ``url`` / ``query_url`` are one address or several, comma-separated (replicas).
    Creating it does no I/O: gRPC channels connect on first use (``tls_ca`` is read then).
    ``token``, when given, travels as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(self, url: str, query_url: str | None = None, *, rpc_timeout: float = 30.0,
                 token: str = "", tls_ca: str = "") -> None:
        self._timeout = rpc_timeout
        self.url = url
        self._query_url = url if query_url is None else query_url
        self._tls_ca = tls_ca
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._ingest = _Replicas(self.url, self._tls_ca, _INGEST_OPTIONS)
        self._query = _Replicas(self._query_url, self._tls_ca, _CHANNEL_OPTIONS)  # its own options: never shared

    def reopen(self) -> None:
        # The parent's channels share sockets with the parent: never close them here
        # (a shutdown would cut the parent's connection); keep them referenced.
        _INHERITED.extend([*self._ingest.after_fork(), *self._query.after_fork()])

    def _call(self, replicas: _Replicas, stub: Callable[[grpc.Channel], Any], method: str, request: Any,
              result: type[_T]) -> _T:
        for attempt in range(len(replicas)):
            index, channel = replicas.current()
            try:
                return cast(_T, getattr(stub(channel), method)(request, timeout=self._timeout,
                                                               metadata=self._metadata))
            except grpc.RpcError as exc:
                error = _translate(exc)
            except ValueError as exc:  # grpc raises ValueError on a closed channel
                error = ServerUnavailable(f"channel closed: {exc}")
            if not isinstance(error, ServerUnavailable):
                raise error
            replicas.failed(index)
            if attempt + 1 == len(replicas):
                raise error
        raise AssertionError("unreachable")  # pragma: no cover

    def _unary_ingest(self, method: str, request: Any, result: type[_T]) -> _T:
        return self._call(self._ingest, ingest_pb2_grpc.IngestServiceStub, method, request, result)

    def _unary_query(self, method: str, request: Any, result: type[_T]) -> _T:
        return self._call(self._query, query_pb2_grpc.QueryServiceStub, method, request, result)

    def create_experiment(self, request: ingest_pb2.CreateExperimentRequest) -> common_pb2.Experiment:
        return self._unary_ingest("CreateExperiment", request, common_pb2.Experiment)

    def get_experiment(self, request: ingest_pb2.GetExperimentRequest) -> common_pb2.Experiment:
        return self._unary_ingest("GetExperiment", request, common_pb2.Experiment)

    def create_run(self, request: ingest_pb2.CreateRunRequest) -> common_pb2.RunInfo:
        return self._unary_ingest("CreateRun", request, common_pb2.RunInfo)

    def update_run(self, request: ingest_pb2.UpdateRunRequest) -> common_pb2.RunInfo:
        return self._unary_ingest("UpdateRun", request, common_pb2.RunInfo)

    def log_params(self, request: ingest_pb2.LogParamsRequest) -> None:
        self._unary_ingest("LogParams", request, ingest_pb2.LogParamsResponse)

    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None:
        self._unary_ingest("SetTags", request, ingest_pb2.SetTagsResponse)

    def stream_metrics(self, requests: Iterator[bytes]) -> AckStream:
        """Open the long-lived stream on the current ingest address; no deadline, the sender cancels it.
        The requests are already serialized (``wire.encode``): gRPC sends them as they are."""
        index, channel = self._ingest.current()
        stream = _GrpcAckStream(requests)
        try:
            call = channel.stream_stream(_STREAM_METRICS, request_serializer=None,
                                         response_deserializer=ingest_pb2.BatchAck.FromString)(
                stream.requests, metadata=self._metadata)
        except ValueError as exc:
            self._ingest.failed(index)
            raise ServerUnavailable(f"channel closed: {exc}") from None
        stream.start(call, lambda: self._ingest.failed(index))
        return stream

    def get_run(self, request: query_pb2.GetRunRequest) -> common_pb2.Run:
        return self._unary_query("GetRun", request, common_pb2.Run)

    def search_runs(self, request: query_pb2.SearchRunsRequest) -> query_pb2.SearchRunsResponse:
        return self._unary_query("SearchRuns", request, query_pb2.SearchRunsResponse)

    def get_metric_history(self, request: query_pb2.GetMetricHistoryRequest) -> query_pb2.MetricHistory:
        return self._unary_query("GetMetricHistory", request, query_pb2.MetricHistory)

    def sql(self, request: query_pb2.SqlRequest, timeout: float | None = None) -> Iterator[query_pb2.SqlChunk]:
        """The chunks of one SQL answer, read as they arrive (deadline: `timeout` or the RPC timeout)."""
        index, channel = self._query.current()
        try:
            call = query_pb2_grpc.QueryServiceStub(channel).Sql(  # type: ignore[no-untyped-call]
                request, timeout=self._timeout if timeout is None else timeout, metadata=self._metadata)
            for chunk in call:
                yield cast(query_pb2.SqlChunk, chunk)
        except grpc.RpcError as exc:
            error = _translate(exc, sql=True)  # a limit of the query: final, and this replica is fine
        except ValueError as exc:
            error = ServerUnavailable(f"channel closed: {exc}")
        else:
            return
        if isinstance(error, ServerUnavailable):
            self._query.failed(index)  # the next call goes to the next replica
        raise error

    def close(self) -> None:
        self._ingest.close()
        self._query.close()
