"""``Client`` and ``connect``: the entry point of the library.

A client owns one ``Transport``, one ``Batcher`` (the process's buffered points,
shared by all its runs) and one ``Sender`` (started with the first run). Creating
it does no I/O. ``close`` flushes against a deadline, spools what the server did
not acknowledge, stops the sender and reports; an atexit hook does the same for
clients left open. After ``os.fork`` the child's clients get a new writer id, new
connections, empty buffers and (lazily) a new worker (``_after_fork_in_child``).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from trackhouse.client import distributed, lifecycle, reads
from trackhouse.client.batcher import Batcher
from trackhouse.client.errors import AlreadyExists, NotFound, ServerUnavailable, UsageError
from trackhouse.client.ops import Op, call_op
from trackhouse.client.reads import RunView
from trackhouse.client.run import Run, check_run_name, check_start_time, param_messages, tag_messages
from trackhouse.client.sender import Sender
from trackhouse.client.settings import Settings
from trackhouse.client.system import SystemSampler
from trackhouse.client.transport import GrpcTransport, Transport
from trackhouse.proto.v1 import ingest_pb2, query_pb2

logger = logging.getLogger(__name__)
_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()


def connect(url: str | None = None, *, query_url: str | None = None, mode: str | None = None,
            settings: Settings | None = None, addresses: Sequence[str] | None = None,
            token: str | None = None, tls_ca: str | None = None) -> Client:
    """A client for the trackhouse server at ``url`` (``host:port``, ``grpc://host:port`` or
    ``grpcs://host:port`` for TLS).

    ``addresses``: several ingest replicas instead of ``url`` (the same as a comma-separated
    ``url``); the client uses one and moves to the next when it is unavailable.
    ``settings`` default to ``Settings.from_env()``; ``url``, ``query_url``, ``mode``
    (``"online"`` / ``"offline"``), ``token`` (an API token, sent as a Bearer credential) and
    ``tls_ca`` (a PEM file to trust for ``grpcs://``), when given, override them. No
    connection is made until the first call; offline, none ever is.

    Reads (``get_run``, ``search_runs``, ``metric_history``, ``sql``) go to ``query_url``,
    else the settings' (``TRACKHOUSE_CLIENT_QUERY_URL``), else the ingest address: ``url``,
    else the settings' (``TRACKHOUSE_CLIENT_URL``, default ``127.0.0.1:50051``). So ``url``
    alone does not move the reads while ``TRACKHOUSE_CLIENT_QUERY_URL`` is set: pass
    ``query_url`` too for that.
    """
    if addresses is not None:
        if url is not None or isinstance(addresses, str) or not addresses:
            raise UsageError("connect(addresses=[...]) takes a non-empty list of 'host:port', and no url")
        url = ",".join(addresses)
    settings = Settings.from_env() if settings is None else settings
    overrides: dict[str, Any] = {k: v for k, v in (("url", url), ("query_url", query_url), ("mode", mode),
                                                   ("token", token), ("tls_ca", tls_ca)) if v is not None}
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    transport = GrpcTransport(settings.url, settings.effective_query_url, rpc_timeout=settings.rpc_timeout,
                              token=settings.token, tls_ca=settings.tls_ca)
    return Client(transport, settings)


class Client:
    """Starts runs and reads them back. Thread-safe; one per process is enough."""

    def __init__(self, transport: Transport, settings: Settings | None = None) -> None:
        self.settings = Settings() if settings is None else settings
        self.transport = transport
        self._batcher = Batcher(self.settings.max_batch_points)
        self._sender = Sender(transport, self._batcher, self.settings)
        self._experiments: dict[str, str] = {}
        self._samplers: list[SystemSampler] = []
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        self._ordinal = 0
        ref = weakref.ref(self)
        self._atexit = lambda: _close_at_exit(ref)
        atexit.register(self._atexit)
        _LIVE.add(self)

    @property
    def writer_id(self) -> str:
        """Identifies this client's metric batches to the server (uuid4 hex; new after fork)."""
        return self._sender.writer_id

    @property
    def spool_path(self) -> str:
        """This writer's spool directory (it exists only while something is spooled)."""
        return str(self._sender.spool.path)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------

    def start_run(
        self,
        *,
        experiment: str | None = None,
        experiment_id: str | None = None,
        name: str = "",
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        start_time: int | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Create a run in ``experiment`` (a name, created when missing) or ``experiment_id``.

        Neither means the default experiment ``"0"``. ``run_id`` (or the setting
        ``run_id``) resumes that run instead, and sets ``name``, ``params`` and ``tags`` on it
        (a param it holds with another value: InvalidArgument). In a distributed job, see
        ``Settings.ranks``: all ranks get a handle on the same run (``lifecycle``: what each sends).
        """
        self._check_open()
        if experiment is not None and experiment_id is not None:
            raise UsageError("pass experiment (a name) or experiment_id, not both")
        request = ingest_pb2.CreateRunRequest(
            run_name=check_run_name(name), user_id=self.settings.user if user_id is None else user_id,
            start_time=0 if start_time is None else check_start_time(start_time),
            params=param_messages(params or {}), tags=tag_messages(tags or {}),
        )  # fmt: skip
        run_id = run_id or self.settings.run_id or ""
        with self._lock:
            ordinal, self._ordinal = self._ordinal, self._ordinal + 1
        if not distributed.logs_here(self.settings):
            return Run(self, run_id, experiment_id or "", name, enabled=False)
        return lifecycle.start(self, request, experiment, experiment_id, run_id, ordinal)

    def resume_run(self, run_id: str, *, mark_running: bool = True) -> Run:
        """A handle to log into an existing run (e.g. after a restart); marks it RUNNING again.

        Offline, the id is trusted (the run must exist when the spool is synced).
        """
        self._check_open()
        if not isinstance(run_id, str) or not run_id:
            raise UsageError(f"run_id must be a non-empty string, got {run_id!r}")
        if not distributed.logs_here(self.settings):
            return Run(self, run_id, "", "", enabled=False)
        return lifecycle.resume(self, run_id, mark_running=mark_running)

    def _handle(self, run_id: str, experiment_id: str, name: str) -> Run:
        """The one handle of a run this process logs into, with its system sampler (kept by both)."""
        self._sender.start()
        s = self.settings
        run = Run(self, run_id, experiment_id, name, key_prefix=distributed.key_prefix(s))
        sampler = None
        if s.system_metrics_interval > 0:
            sampler = run._sampler = SystemSampler(run.log_metrics, s.system_metrics_interval,
                                                   gpus=distributed.samples_gpus(s))
        with self._lock:
            self._runs.add(run)  # told when the client closes (their log calls then raise)
            if sampler is not None:
                self._samplers.append(sampler)  # stopped by run.finish() or, at the latest, by close()
        if sampler is not None:
            sampler.start()
        return run

    def _end_run(self, run: Run, status: str, timeout: float) -> bool:
        return lifecycle.end(self, run, status, timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the client is closed; create a new one with trackhouse.client.connect()")

    def _submit(self, op: Op, timeout: float | None = None) -> bool:
        """A run operation: sent now; spooled (and retried) when offline, when the server is away, and
        once one was (in order, behind it). With a ``timeout`` shorter than a call may take
        (``rpc_timeout``) it goes through the sender too, and is waited for at most ``timeout``.

        True when delivered (offline: handed to the spool); a refusal raises, as a direct call does."""
        self._check_open()
        s, deadline = self.settings, None if timeout is None else time.monotonic() + timeout
        if s.offline:
            self._sender.submit_op(op)
            return True
        if not self._sender.queues_ops and (timeout is None or timeout >= s.rpc_timeout):
            try:
                call_op(self.transport, op)
                return True
            except ServerUnavailable as exc:
                logger.warning("trackhouse: %s not delivered (%s); spooled, will retry", type(op).__name__, exc)
                self._sender.submit_op(op)
                return False
        outcome = self._sender.submit_op(op, outcome=deadline is not None)
        if outcome is None or deadline is None:
            return False
        try:
            outcome.result(max(0.0, deadline - time.monotonic()))  # raises the refusal
        except concurrent.futures.TimeoutError:
            return False
        return True

    def create_experiment(self, name: str, artifact_location: str = "") -> str:
        """Create experiment ``name``; return its id. AlreadyExists when the name is taken."""
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"experiment name must be a non-empty string, got {name!r}")
        exp = self.transport.create_experiment(
            ingest_pb2.CreateExperimentRequest(name=name, artifact_location=artifact_location)
        )
        with self._lock:
            self._experiments[name] = exp.experiment_id
        return str(exp.experiment_id)

    def _experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, creating it if missing (a concurrent creator wins)."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"experiment must be a non-empty name, got {name!r}")
        with self._lock:
            cached = self._experiments.get(name)
        if cached is not None:
            return cached
        try:
            exp = self.transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name))
        except NotFound:
            try:
                exp = self.transport.create_experiment(ingest_pb2.CreateExperimentRequest(name=name))
            except AlreadyExists:
                exp = self.transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name))
        with self._lock:
            self._experiments[name] = exp.experiment_id
        return str(exp.experiment_id)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point logged so far is acknowledged (offline: spooled); False on timeout."""
        return self._sender.flush(self.settings.flush_timeout if timeout is None else timeout)

    def stats(self) -> dict[str, int]:
        """Delivery counters: points_logged / sent / acked / rejected / pending / spooled / offline /
        lost, batches_sent / acked / duplicate / rejected / spilled / pending, reconnects,
        spools_replayed, ops_pending (run operations not yet delivered: params, tags, status)."""
        return self._sender.stats()

    def close(self, timeout: float | None = None) -> bool:
        """Flush (bounded by ``timeout``), spool what is left, stop the sender. Idempotent.

        Returns True when every logged point and run operation was delivered (offline:
        spooled); otherwise logs a warning saying what is spooled and where.
        """
        with self._lock:
            if self._closed:
                return True
            self._closed = True
            samplers, self._samplers = self._samplers, []
        atexit.unregister(self._atexit)
        deadline = time.monotonic() + (self.settings.close_timeout if timeout is None else timeout)
        lifecycle.stop_samplers(samplers, deadline)  # before the last flush: none logs into it meanwhile
        delivered = self._sender.close(max(0.0, deadline - time.monotonic()))
        self._batcher.accepting = False
        with self._lock:
            runs = list(self._runs)
        for run in runs:
            run._client_closed()
        # The sender's threads were waited for within the bound; a call still in flight past it is cut
        # (CANCELLED), and its operation stays pending, recorded in the spool: nothing is dropped.
        self.transport.close()
        _report(self._sender.stats(), self.settings, self.spool_path, delivered)
        return delivered

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._samplers = []
        self._batcher.after_fork()
        self._sender.after_fork()
        self.transport.reopen()

    # -- reading ------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunView:
        """The run with its params, tags and latest metric values. NotFound when unknown."""
        return RunView.from_proto(self.transport.get_run(query_pb2.GetRunRequest(run_id=run_id)))

    def search_runs(
        self,
        experiment_ids: Sequence[str] | None = None,
        *,
        experiment_names: Sequence[str] | None = None,
        filter: str = "",
        order_by: Sequence[str] | None = None,
        max_results: int | None = None,
        page_size: int = 1000,
        run_view: str = "active_only",
    ) -> Iterator[RunView]:
        """Runs matching ``filter`` (MLflow grammar), fetched ``page_size`` at a time.

        No experiment ids nor names means every experiment. Names are resolved now
        (NotFound when one is unknown); pages are fetched as the iterator advances.
        UsageError at once for a string instead of a list, ``page_size`` < 1,
        ``max_results`` < 0 or an unknown ``run_view`` (``active_only``, ``deleted_only``,
        ``all``); InvalidArgument, when the first page is fetched, for a filter or
        ``order_by`` the server cannot parse.
        """
        if isinstance(experiment_ids, str) or isinstance(experiment_names, str):
            raise UsageError("experiment_ids / experiment_names take a list, e.g. ['1'], not a string")
        ids = list(experiment_ids or [])
        for name in experiment_names or []:
            ids.append(self.transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name)).experiment_id)
        return reads.iter_runs(
            self.transport, experiment_ids=ids, filter=filter, order_by=list(order_by or []),
            max_results=max_results, page_size=page_size, run_view=run_view,
        )  # fmt: skip

    def sql(self, query: str, *, timeout: float | None = None) -> Any:
        """Run one read-only SELECT on the server (docs/sql.md); the answer as a ``pyarrow.Table``.

        ``.to_pandas()`` on it gives a DataFrame when pandas is installed. A refused query
        raises InvalidArgument saying what is not allowed; so does a query that hits one of
        its limits (result rows or bytes, memory, time): ``code`` ``"RESOURCE_EXHAUSTED"``,
        the message names the limit, and retrying cannot help. ServerUnavailable (with
        ``retry_after``) means the server is busy or away: try again later. ``timeout``:
        seconds (default: the RPC timeout). Needs pyarrow (UsageError without it).
        """
        if not isinstance(query, str) or not query.strip():
            raise UsageError("sql: pass one SELECT statement as a string")
        return reads.sql_table(self.transport.sql(query_pb2.SqlRequest(query=query), timeout))

    def metric_history(self, run_id: str, key: str, min_step: int | None = None, max_step: int | None = None) -> Any:
        """Every point of one series as a ``pyarrow.Table`` (step, timestamp, value), step order."""
        return reads.history_table(*reads.history_arrays(self.transport, run_id, key, min_step, max_step))


def _report(stats: dict[str, int], settings: Settings, spool_path: str, delivered: bool) -> None:
    """The one message at close: what is spooled, where, and how to upload it."""
    spooled = stats["points_spooled"]  # of the undelivered ones (offline, the rest are in the spool too)
    lost = stats["points_pending"] - stats["points_spooled"]
    where = f"{spool_path} (upload with: trackhouse sync {os.path.dirname(spool_path)})"
    if settings.offline and stats["points_offline"]:
        logger.warning("trackhouse offline: %d points spooled in %s", stats["points_offline"], where)
    if not delivered and stats["points_pending"] > 0:
        logger.warning(
            "trackhouse client closed with %d of %d logged points undelivered: %d spooled in %s%s",
            stats["points_pending"], stats["points_logged"], spooled, where,
            f"; {lost} could not be spooled in time and are lost" if lost > 0 else "",
        )  # fmt: skip
    if stats["ops_pending"] > 0:  # recorded in the spool when handed to the sender (a failed write was logged)
        logger.warning("trackhouse client closed with %d run operations (params, tags, status) undelivered: "
                       "recorded in %s", stats["ops_pending"], where)


def _close_at_exit(ref: weakref.ref[Client]) -> None:
    client = ref()
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    for client in list(_LIVE):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
