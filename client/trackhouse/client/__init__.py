"""trackhouse.client — log metrics from training jobs, read runs back.

    import trackhouse.client as th

    client = th.connect("127.0.0.1:50051")
    with client.start_run(experiment="sweep-1", params={"lr": 0.01}) as run:
        for step in range(1000):
            run.log(step=step, loss=0.5)        # ~0.1 µs a value; a background sender delivers
        run.log_array("reward", steps, rewards)  # numpy arrays, vectorized
    client.get_run(run.run_id).metrics           # {"loss": 0.5, "reward": ...}

Points the server does not acknowledge are kept, spilled to an on-disk spool when
it stays away, and replayed (``trackhouse sync DIR`` for offline runs). See
docs/client.md.

Everything public is re-exported here; the modules behind it are private detail.
"""

from trackhouse.client.client import Client, connect
from trackhouse.client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServerError,
    ServerUnavailable,
    SpoolError,
    TrackhouseError,
    UsageError,
)
from trackhouse.client.memory import MemoryTransport
from trackhouse.client.reads import RunView
from trackhouse.client.replay import ReplayReport, sync
from trackhouse.client.run import Run
from trackhouse.client.settings import Settings
from trackhouse.client.transport import AckStream, GrpcTransport, Transport

__all__ = [
    "AckStream",
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GrpcTransport",
    "InvalidArgument",
    "MemoryTransport",
    "NotFound",
    "ReplayReport",
    "Run",
    "RunView",
    "ServerError",
    "ServerUnavailable",
    "Settings",
    "SpoolError",
    "TrackhouseError",
    "Transport",
    "UsageError",
    "connect",
    "sync",
]
