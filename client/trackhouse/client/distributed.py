"""Distributed training: which rank logs, and how all ranks agree on one run id.

Rank and world size come from the launcher (``Settings.from_env``: torchrun's
``RANK``/``WORLD_SIZE``, SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``, ...).

``ranks="zero"`` (default): rank 0 creates the run and logs; other ranks get a
disabled ``Run`` and make no call at all — nothing to coordinate.

``ranks="all"``: every rank logs into one run, keys prefixed ``rank{N}/`` (the
wire has no rank column; a prefix keeps each rank's series apart and is
searchable). The run id is shared without extra user code, in this order:

1. ``TRACKHOUSE_CLIENT_RUN_ID`` set by the launcher: every rank resumes it;
2. otherwise a rendezvous file: rank 0 creates the run and publishes its id
   atomically in ``rendezvous_dir`` (a directory every rank sees: the job's
   working directory on a cluster file system), under a name derived from the
   launch's job id (``Settings.job_id``), the experiment, the run name and the
   call's ordinal; other ranks wait for it up to ``rendezvous_timeout``.

Invariants of the file, which holds ``{"run_id": …, "restart_count": …}``:

- it belongs to one launch: rank 0 resumes its run id only when an *earlier restart*
  of the same job id wrote it (``restart_count`` lower than this process's: torchrun's
  elastic restart), and then publishes it again under its own restart count;
  a file of the same or a later restart count was written by another launch that
  reused the job id, so rank 0 creates a new run, replaces the file and warns;
- ranks > 0 take only a file written under their own restart count, so an earlier
  restart's file is never read as this one's;
- it is never removed: a rank > 0 may read it after rank 0 ended its run, and an elastic
  restart after rank 0 finished must still find it (``lifecycle.py``).

What no file can tell: ranks > 0 of a launch that reuses a job id *and* restart count
may read the earlier launch's file before rank 0 replaces it. Job ids must therefore
differ between launches (torchrun's ``--rdzv-id``; SLURM's ids include the step).

The server's CreateRun is not idempotent (there is no client-chosen run id), so
one creator is required; the file is that creator's announcement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from trackhouse.client.errors import TrackhouseError, UsageError
from trackhouse.client.settings import Settings

logger = logging.getLogger(__name__)


def key_prefix(settings: Settings) -> str:
    return f"rank{settings.rank}/" if settings.ranks == "all" and settings.world_size > 1 else ""


def logs_here(settings: Settings) -> bool:
    return settings.ranks == "all" or settings.rank == 0


def needs_rendezvous(settings: Settings) -> bool:
    return settings.ranks == "all" and settings.world_size > 1


def samples_gpus(settings: Settings) -> bool:
    """Whether this process's system metrics include the node's GPUs: only on its first rank, so a
    node's GPUs are sampled once, not once per rank (NVML cannot tell which GPU a rank uses)."""
    return settings.local_rank == 0


def rendezvous_file(settings: Settings, experiment: str, name: str, ordinal: int) -> Path:
    if not settings.job_id:
        raise UsageError(
            "ranks='all' needs a shared run id: launch with torchrun, mpirun (Open MPI) or under SLURM, or set "
            "TRACKHOUSE_CLIENT_JOB_ID (unique per launch) or TRACKHOUSE_CLIENT_RUN_ID in the launcher; "
            "or use ranks='zero'"
        )
    digest = hashlib.sha256(f"{settings.job_id}\0{experiment}\0{name}\0{ordinal}".encode()).hexdigest()[:32]
    return Path(settings.rendezvous_dir) / f"run-{digest}"


def shared_run_id(path: Path, settings: Settings, create: Callable[[], str],
                  sleep: Callable[[float], None] = time.sleep) -> tuple[str, bool]:
    """(run id, created here): rank 0 creates and publishes (or resumes its launch's); others wait."""
    if settings.rank == 0:
        return _publish(path, settings, create)
    deadline = time.monotonic() + settings.rendezvous_timeout
    delay = 0.01
    while (published := _read(path)) is None or published[1] != settings.restart_count:
        if time.monotonic() >= deadline:
            raise TrackhouseError(
                f"rank {settings.rank} waited {settings.rendezvous_timeout:.0f} s for rank 0 to publish the "
                f"run id of restart {settings.restart_count} in {path.absolute()}; is rendezvous_dir shared by "
                f"all ranks, and do all ranks see the same job id ({settings.job_id!r})?"
            )
        sleep(delay)  # polling a shared file system: no notification crosses nodes
        delay = min(delay * 2, 0.5)
    return published[0], False


def _publish(path: Path, settings: Settings, create: Callable[[], str]) -> tuple[str, bool]:
    published = _read(path)
    if published is not None and published[1] < settings.restart_count:
        run_id, created = published[0], False  # an elastic restart of this launch: resume its run
    else:
        if published is not None or path.exists():
            logger.warning(
                "trackhouse: %s was written by an earlier launch with job id %r; starting a new run. Ranks > 0 "
                "may have joined the earlier run: give each launch its own job id (torchrun --rdzv-id, "
                "TRACKHOUSE_CLIENT_JOB_ID)", path.absolute(), settings.job_id,
            )
        run_id, created = create(), True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "restart_count": settings.restart_count}))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    return run_id, created


def _read(path: Path) -> tuple[str, int] | None:
    """(run id, restart count) of the published file; None when missing or not in this format."""
    try:
        data = json.loads(path.read_text())
        run_id, restart = data["run_id"], data["restart_count"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(run_id, str) or not run_id or type(restart) is not int:
        return None
    return run_id, restart
