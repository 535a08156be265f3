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
   job id (``TORCHELASTIC_RUN_ID`` / ``SLURM_JOB_ID``), the experiment, the run
   name and the call's ordinal; other ranks wait for it up to
   ``rendezvous_timeout``. A restarted job (same job id) finds the file and
   resumes the same run, so an elastic restart does not split the run.

The server's CreateRun is not idempotent (there is no client-chosen run id), so
one creator is required; the file is that creator's announcement.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from trackhouse.client.errors import TrackhouseError, UsageError
from trackhouse.client.settings import Settings


def key_prefix(settings: Settings) -> str:
    return f"rank{settings.rank}/" if settings.ranks == "all" and settings.world_size > 1 else ""


def logs_here(settings: Settings) -> bool:
    return settings.ranks == "all" or settings.rank == 0


def needs_rendezvous(settings: Settings) -> bool:
    return settings.ranks == "all" and settings.world_size > 1


def rendezvous_file(settings: Settings, experiment: str, name: str, ordinal: int) -> Path:
    if not settings.job_id:
        raise UsageError(
            "ranks='all' needs a shared run id: launch with torchrun --rdzv-id, under SLURM, or set "
            "TRACKHOUSE_CLIENT_JOB_ID (or TRACKHOUSE_CLIENT_RUN_ID) in the launcher; or use ranks='zero'"
        )
    digest = hashlib.sha256(f"{settings.job_id}\0{experiment}\0{name}\0{ordinal}".encode()).hexdigest()[:32]
    return Path(settings.rendezvous_dir) / f"run-{digest}"


def shared_run_id(path: Path, settings: Settings, create: Callable[[], str],
                  sleep: Callable[[float], None] = time.sleep) -> tuple[str, bool]:
    """(run id, created here): rank 0 creates and publishes (or resumes a published one); others wait."""
    if settings.rank == 0:
        published = _read(path)
        if published:
            return published, False
        run_id = create()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(run_id)
        os.replace(tmp, path)
        return run_id, True
    deadline = time.monotonic() + settings.rendezvous_timeout
    delay = 0.01
    while not (run_id := _read(path)):
        if time.monotonic() >= deadline:
            raise TrackhouseError(
                f"rank {settings.rank} waited {settings.rendezvous_timeout:.0f} s for rank 0 to publish the "
                f"run id in {path.absolute()}; is rendezvous_dir shared by all ranks?"
            )
        sleep(delay)  # polling a shared file system: no notification crosses nodes
        delay = min(delay * 2, 0.5)
    return run_id, False


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
