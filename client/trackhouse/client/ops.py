"""Run operations (create, params, tags, status) as values: what the spool records and replays; and
``PendingOps``, the thread that sends the ones handed to the sender.

An ``Op`` is the request message itself; ``call_op`` sends one through a ``Transport``;
``OP_KINDS`` names its spool record kind.

``PendingOps`` holds the operations the sender's worker handed over (recorded in the spool
first) and sends them in order on a thread of its own, ``trackhouse-ops``: a unary call may
take ``rpc_timeout`` on a slow or hung server, and the worker must go on delivering and
spilling points meanwhile. One that meets an unavailable server, or a call cut short
(CANCELLED: ``errors.py``), stays first and is tried again after ``delay``, and not while
``ready()`` is False (the metric stream is away; the first ack after the outage notifies the
lock). One the server refuses is dropped with a warning. A caller may wait for an
operation's outcome (``outcomes``): None when delivered, the refusal otherwise. The thread
ends when none is left (the next ``add`` starts another). ``stop`` (at close) makes it try
what is left once more, begin no call after the deadline, and end at the first failure:
what is left stays pending, in the spool.

Invariants: operations are sent in the order they were handed over; only the thread removes
one, after the server answered it; the lock is the sender's, never held across a call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from trackhouse.client.errors import ServerUnavailable, TrackhouseError
from trackhouse.client.spool import Kind
from trackhouse.client.transport import Transport
from trackhouse.proto.v1 import ingest_pb2

logger = logging.getLogger(__name__)

Op = ingest_pb2.CreateRunRequest | ingest_pb2.LogParamsRequest | ingest_pb2.SetTagsRequest | ingest_pb2.UpdateRunRequest
OP_KINDS: dict[type, Kind] = {
    ingest_pb2.CreateRunRequest: Kind.CREATE_RUN, ingest_pb2.LogParamsRequest: Kind.LOG_PARAMS,
    ingest_pb2.SetTagsRequest: Kind.SET_TAGS, ingest_pb2.UpdateRunRequest: Kind.UPDATE_RUN,
}  # fmt: skip


def call_op(transport: Transport, op: Op) -> None:
    """Send one operation; raises the transport's ``TrackhouseError``."""
    if isinstance(op, ingest_pb2.LogParamsRequest):
        transport.log_params(op)
    elif isinstance(op, ingest_pb2.SetTagsRequest):
        transport.set_tags(op)
    elif isinstance(op, ingest_pb2.UpdateRunRequest):
        transport.update_run(op)
    else:
        transport.create_run(op)


class PendingOps:
    """Operations waiting for the server, sent in order on their own thread (see the module docstring).

    ``cond`` is the sender's lock (reentrant); ``on_answer`` is called after each answered operation.
    """

    def __init__(self, transport: Transport, cond: threading.Condition, clock: Callable[[], float], *,
                 delay: Callable[[float | None], float], ready: Callable[[], bool],
                 on_answer: Callable[[], None]) -> None:
        self.ops: list[Op] = []
        self.retry_at = 0.0
        self.outcomes: dict[int, Future[None]] = {}  # id(op) -> what a caller waits for
        self._transport, self._cond, self._clock = transport, cond, clock
        self._delay, self._ready, self._on_answer = delay, ready, on_answer
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # set by stop
        self._failed_last = False  # the last pass met a failure: no more calls

    def add(self, ops: list[Op]) -> None:
        """Hand ``ops`` over (they are in the spool already); the thread starts with the first."""
        with self._cond:
            self.ops += ops
            if ops and self._thread is None and self._deadline is None:
                self._thread = threading.Thread(target=self._run, name="trackhouse-ops", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stop(self, deadline: float) -> None:
        """A last try of what is left, no call begun after ``deadline``; then the thread ends."""
        with self._cond:
            self._deadline = deadline
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the thread to end (``stop`` first); True when it did."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(min(max(0.0, timeout), threading.TIMEOUT_MAX))
        return not thread.is_alive()

    def _run(self) -> None:
        try:
            while (op := self._next()) is not None:
                self._send(op)
        except Exception:  # a bug: the operations stay pending, recorded in the spool
            logger.exception("trackhouse: the run operations thread stopped by an unexpected error")

    def _send(self, op: Op) -> None:
        try:
            call_op(self._transport, op)
        except ServerUnavailable as exc:  # no answer (CANCELLED too): it stays first, tried again
            with self._cond:
                self.retry_at = self._clock() + self._delay(exc.retry_after)
                self._failed_last = self._deadline is not None
            return
        except TrackhouseError as exc:
            logger.warning("trackhouse: dropping %s after the server refused it: %s", type(op).__name__, exc)
            refusal: TrackhouseError | None = exc
        else:
            refusal = None
        with self._cond:
            self.ops.pop(0)  # ``op``: only this thread removes
            outcome = self.outcomes.pop(id(op), None)
            self._cond.notify_all()
        if outcome is not None:
            if refusal is None:
                outcome.set_result(None)
            else:
                outcome.set_exception(refusal)
        self._on_answer()

    def _next(self) -> Op | None:
        """The operation to send now, once one is due; None when the thread is to end: nothing left (the
        next ``add`` starts another), or closing and the last try is over."""
        with self._cond:
            while True:
                now, ready = self._clock(), bool(self.ops) and self._ready()
                if self._deadline is not None:  # closing: each once more, while they go through
                    if ready and not self._failed_last and now < self._deadline:
                        return self.ops[0]
                elif ready and now >= self.retry_at:
                    return self.ops[0]
                elif self.ops:  # due later, or when the stream is back (an ack notifies)
                    self._cond.wait(min(self.retry_at - now, threading.TIMEOUT_MAX) if ready else None)
                    continue
                self._thread = None
                return None
