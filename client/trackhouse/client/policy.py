"""Pure delivery decisions: reconnect delay, the server's retry delay, when to spill to disk, when a
stream is stalled.

No clock, no I/O, no randomness of their own (``rand`` is passed in), so the
sender's choices are tested with plain numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum

# Bytes of spooled batches read back and in flight at once during a replay.
REPLAY_WINDOW = 32 * 1024 * 1024
# Most points in one MetricBatch whatever max_batch_points says: the server's default
# limit, and 28 MB on the wire, under gRPC's 64 MiB message limit.
MAX_MESSAGE_POINTS = 1_000_000


class Spill(Enum):
    NONE = "none"
    OLDEST = "oldest"  # over the memory budget: spill the oldest until half of it is free
    ALL = "all"  # server away past the grace period (or offline): everything goes to disk


def backoff_delay(attempt: int, *, initial: float, maximum: float, retry_after: float | None,
                  rand: Callable[[float, float], float]) -> float:
    """Seconds before reconnect number ``attempt`` (0-based): the server's delay when it sent
    one, else exponential from ``initial`` capped at ``maximum``, with jitter in [50 %, 100 %]."""
    if retry_after is not None:
        return max(0.0, retry_after)
    return float(min(maximum, initial * 2 ** min(attempt, 32)) * rand(0.5, 1.0))


def spill_decision(*, memory_bytes: int, budget: int, away_since: float | None, now: float,
                   grace: float) -> Spill:
    """What to move from memory to the spool now."""
    if memory_bytes == 0:
        return Spill.NONE
    if away_since is not None and now - away_since >= grace:
        return Spill.ALL
    if memory_bytes > budget:
        return Spill.OLDEST
    return Spill.NONE


def stalled(*, in_flight: bool, last_progress: float, now: float, timeout: float) -> bool:
    """Whether an open stream should be abandoned for lack of acks (``Settings.ack_timeout``):
    a half-open connection, or a server gone without closing it, never errors by itself."""
    return in_flight and now - last_progress >= timeout


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
