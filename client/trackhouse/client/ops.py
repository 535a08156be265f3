"""Run operations (create, params, tags, status) as values: what the spool records and replays.

An ``Op`` is the request message itself; ``call_op`` sends one through a
``Transport``; ``OP_KINDS`` names its spool record kind; ``PendingOps`` retries
the ones that met an unreachable server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
    """Operations that failed while the server was away, retried in order by the sender's worker."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.retry_at = 0.0

    def retry(self, transport: Transport, now: float, delay: Callable[[float | None], float]) -> None:
        """Send them in order until one fails for a retryable reason (then wait ``delay``)."""
        while self.ops and now >= self.retry_at:
            op = self.ops[0]
            try:
                call_op(transport, op)
            except ServerUnavailable as exc:
                self.retry_at = now + delay(exc.retry_after)
                return
            except TrackhouseError as exc:
                logger.warning("trackhouse: dropping %s after the server refused it: %s", type(op).__name__, exc)
            self.ops.pop(0)
