"""``Client`` and ``connect``: the entry point of the library.

A client owns one ``Transport``, one ``Batcher`` (the process's buffered points,
shared by all its runs) and one ``Sender`` (started with the first run). Creating
it does no I/O. ``close`` flushes against a deadline, stops the sender and closes
the channels; an atexit hook does the same for clients left open and logs what
could not be delivered.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from trackhouse.client import reads
from trackhouse.client.batcher import Batcher
from trackhouse.client.errors import AlreadyExists, NotFound, UsageError
from trackhouse.client.reads import RunView
from trackhouse.client.run import Run, check_int, param_messages, tag_messages
from trackhouse.client.sender import Sender
from trackhouse.client.settings import Settings
from trackhouse.client.transport import GrpcTransport, Transport
from trackhouse.proto.v1 import ingest_pb2, query_pb2

logger = logging.getLogger(__name__)


def connect(url: str | None = None, *, query_url: str | None = None, settings: Settings | None = None) -> Client:
    """A client for the trackhouse server at ``url`` (``host:port`` or ``grpc://host:port``).

    ``settings`` default to ``Settings.from_env()``; ``url`` and ``query_url``, when
    given, override its addresses. No connection is made until the first call.
    """
    settings = Settings.from_env() if settings is None else settings
    overrides: dict[str, Any] = {}
    if url is not None:
        overrides["url"] = url
    if query_url is not None:
        overrides["query_url"] = query_url
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    transport = GrpcTransport(settings.url, settings.effective_query_url, rpc_timeout=settings.rpc_timeout)
    return Client(transport, settings)


class Client:
    """Starts runs and reads them back. Thread-safe; one per process is enough."""

    def __init__(self, transport: Transport, settings: Settings | None = None) -> None:
        self._settings = Settings() if settings is None else settings
        self._transport = transport
        self._batcher = Batcher(self._settings.max_batch_points)
        self._sender = Sender(transport, self._batcher, self._settings)
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        ref = weakref.ref(self)
        self._atexit = lambda: _close_at_exit(ref)
        atexit.register(self._atexit)

    @property
    def writer_id(self) -> str:
        """Identifies this client's metric batches to the server (uuid4 hex)."""
        return self._sender.writer_id

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
    ) -> Run:
        """Create a run in ``experiment`` (a name, created when missing) or ``experiment_id``.

        Neither means the default experiment ``"0"``.
        """
        if self._closed:
            raise UsageError("the client is closed; create a new one with trackhouse.client.connect()")
        if experiment is not None and experiment_id is not None:
            raise UsageError("pass experiment (a name) or experiment_id, not both")
        exp_id = self._experiment_id(experiment) if experiment is not None else (experiment_id or "0")
        request = ingest_pb2.CreateRunRequest(
            experiment_id=exp_id,
            run_name=name,
            user_id=self._settings.user if user_id is None else user_id,
            start_time=0 if start_time is None else check_int("start_time", start_time),
            params=param_messages(params or {}),
            tags=tag_messages(tags or {}),
        )
        info = self._transport.create_run(request)
        self._sender.start()
        return Run(
            info.run_id, info.experiment_id, info.run_name,
            transport=self._transport, batcher=self._batcher, sender=self._sender, settings=self._settings,
        )  # fmt: skip

    def create_experiment(self, name: str, artifact_location: str = "") -> str:
        """Create experiment ``name``; return its id. AlreadyExists when the name is taken."""
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"experiment name must be a non-empty string, got {name!r}")
        exp = self._transport.create_experiment(
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
            exp = self._transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name))
        except NotFound:
            try:
                exp = self._transport.create_experiment(ingest_pb2.CreateExperimentRequest(name=name))
            except AlreadyExists:
                exp = self._transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name))
        with self._lock:
            self._experiments[name] = exp.experiment_id
        return str(exp.experiment_id)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point logged so far is acknowledged; False on timeout."""
        return self._sender.flush(self._settings.flush_timeout if timeout is None else timeout)

    def stats(self) -> dict[str, int]:
        """Delivery counters: points_logged / sent / acked / rejected / pending, batches_*, reconnects."""
        return self._sender.stats()

    def close(self, timeout: float | None = None) -> bool:
        """Flush (bounded by ``timeout``), stop the sender, close the channels. Idempotent.

        Returns True when every logged point was delivered; otherwise logs a warning
        with what was not.
        """
        with self._lock:
            if self._closed:
                return True
            self._closed = True
        atexit.unregister(self._atexit)
        delivered = self._sender.close(self._settings.close_timeout if timeout is None else timeout)
        self._transport.close()
        if not delivered:
            stats = self._sender.stats()
            logger.warning(
                "trackhouse client closed with %d of %d logged points undelivered (%d batches awaiting ack)",
                stats["points_pending"], stats["points_logged"], stats["batches_pending"],
            )  # fmt: skip
        return delivered

    # -- reading ------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunView:
        """The run with its params, tags and latest metric values. NotFound when unknown."""
        return RunView.from_proto(self._transport.get_run(query_pb2.GetRunRequest(run_id=run_id)))

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
        """
        if isinstance(experiment_ids, str) or isinstance(experiment_names, str):
            raise UsageError("experiment_ids / experiment_names take a list, e.g. ['1'], not a string")
        ids = list(experiment_ids or [])
        for name in experiment_names or []:
            ids.append(self._transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name)).experiment_id)
        return reads.iter_runs(
            self._transport, experiment_ids=ids, filter=filter, order_by=list(order_by or []),
            max_results=max_results, page_size=page_size, run_view=run_view,
        )  # fmt: skip

    def metric_history(self, run_id: str, key: str, min_step: int | None = None, max_step: int | None = None) -> Any:
        """Every point of one series as a ``pyarrow.Table`` (step, timestamp, value), step order."""
        return reads.history_table(*reads.history_arrays(self._transport, run_id, key, min_step, max_step))


def _close_at_exit(ref: weakref.ref[Client]) -> None:
    client = ref()
    if client is not None:
        client.close(min(client._settings.close_timeout, 10.0))
