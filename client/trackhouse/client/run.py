"""``Run``: the handle a training loop logs through.

Metrics go to the client's ``Batcher`` after validation and return at once (no
lock is held across I/O, no network on this path); the ``Sender`` delivers them.
Params, tags and the final status are unary calls and raise client errors.
Validation happens before anything is appended, so a bad call appends nothing.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, SupportsFloat, SupportsIndex, cast

from trackhouse.client.batcher import Batcher
from trackhouse.client.errors import UsageError
from trackhouse.client.sender import Sender
from trackhouse.client.settings import Settings
from trackhouse.client.transport import Transport
from trackhouse.proto.v1 import common_pb2, ingest_pb2

logger = logging.getLogger(__name__)

_I64 = 2**63
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_int(name: str, value: object) -> int:
    """``value`` as an int64, or UsageError saying what to pass."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise UsageError(f"{name} must be an int, got {type(value).__name__} {value!r}: pass int({name})")
        value = operator.index(cast(SupportsIndex, value))
    if not -_I64 <= value < _I64:
        raise UsageError(f"{name}={value} does not fit in int64")
    return value


def check_metric(key: object, value: object) -> tuple[str, float]:
    """A validated (key, value) pair; values are anything float() takes except strings."""
    if type(key) is not str or not key:
        raise UsageError(f"metric keys must be non-empty strings, got {key!r}")
    if type(value) is float:
        return key, value
    if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
        raise UsageError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}: log float(value)")
    try:
        return key, float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"metric {key!r} must be a single number, got {value!r}: {exc}") from None


def _string_pairs(kind: str, items: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for key, value in items.items():
        if type(key) is not str or not key:
            raise UsageError(f"{kind} keys must be non-empty strings, got {key!r}")
        pairs.append((key, value if isinstance(value, str) else str(value)))
    return pairs


def param_messages(params: Mapping[str, Any]) -> list[common_pb2.Param]:
    return [common_pb2.Param(key=k, value=v) for k, v in _string_pairs("param", params)]


def tag_messages(tags: Mapping[str, Any]) -> list[common_pb2.Tag]:
    return [common_pb2.Tag(key=k, value=v) for k, v in _string_pairs("tag", tags)]


class Run:
    """One run being logged. Create it with ``Client.start_run``; use it as a context manager."""

    def __init__(
        self,
        run_id: str,
        experiment_id: str,
        name: str,
        *,
        transport: Transport,
        batcher: Batcher,
        sender: Sender,
        settings: Settings,
    ) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.name = name
        self._transport = transport
        self._batcher = batcher
        self._sender = sender
        self._settings = settings
        self._finished = False
        self._status_sent = False

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id!r}, experiment_id={self.experiment_id!r}, name={self.name!r})"

    def log(self, *, step: SupportsIndex = 0, **metrics: SupportsFloat) -> None:
        """Log metrics at ``step`` (``run.log(step=3, loss=0.5, acc=0.9)``); returns at once."""
        if not metrics:
            raise UsageError("run.log() needs metrics as keywords, e.g. run.log(step=3, loss=0.5)")
        self.log_metrics(metrics, step=step)

    def log_metrics(
        self, metrics: Mapping[str, SupportsFloat], *, step: SupportsIndex = 0, timestamp: SupportsIndex | None = None
    ) -> None:
        """Log a mapping of metrics at ``step``; ``timestamp`` in ms since epoch, default now."""
        if self._finished:
            raise UsageError(f"run {self.run_id} is finished; start a new run with client.start_run()")
        if self._sender.stopped:
            raise UsageError("the client is closed; create a new one with trackhouse.client.connect()")
        step = check_int("step", step)
        ts = now_ms() if timestamp is None else check_int("timestamp", timestamp)
        items = [check_metric(k, v) for k, v in metrics.items()]
        if self._batcher.append(self.run_id, step, ts, items, time.monotonic()):
            self._sender.wake()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (write-once: another value for a logged key raises InvalidArgument)."""
        if params:
            request = ingest_pb2.LogParamsRequest(run_id=self.run_id, params=param_messages(params))
            self._transport.log_params(request)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (last write wins)."""
        if tags:
            self._transport.set_tags(ingest_pb2.SetTagsRequest(run_id=self.run_id, tags=tag_messages(tags)))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point logged so far (by any run of this client) is acknowledged.

        Returns False when ``timeout`` (default ``Settings.flush_timeout``) passes first;
        the points stay queued and keep being retried.
        """
        return self._sender.flush(self._settings.flush_timeout if timeout is None else timeout)

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Flush (bounded by ``timeout``), then record ``status`` and the end time.

        Returns whether the flush completed. Calling it again only retries a status
        update that failed.
        """
        if status not in _TERMINAL:
            raise UsageError(f"status must be one of {', '.join(_TERMINAL)}, got {status!r}")
        self._finished = True
        if self._status_sent:
            return True
        flushed = self.flush(self._settings.close_timeout if timeout is None else timeout)
        if not flushed:
            logger.warning("run %s finished before all its metrics were acknowledged", self.run_id)
        request = ingest_pb2.UpdateRunRequest(
            run_id=self.run_id, status=common_pb2.RunStatus.Value(status), end_time=now_ms()
        )
        self._transport.update_run(request)
        self._status_sent = True
        return flushed

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
            return
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except Exception:  # never mask the training loop's own exception
            logger.exception("could not mark run %s %s", self.run_id, status)
