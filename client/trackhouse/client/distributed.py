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

Invariants of the file, which holds ``{"run_id": …, "published_ms": …}`` (rank 0's wall clock when it
published; other keys are ignored, a file without ``published_ms`` is taken as an earlier launch's):

- it is never removed: a rank > 0 may read it after rank 0 ended its run, and an elastic
  restart must still find it (``lifecycle.py``);
- the run it names is resumed by rank 0 (an elastic restart after a failure) unless the server
  says the run *ended* — FINISHED or KILLED, ended normally or by the user — which only another
  launch reusing the job id can meet: rank 0 then creates a new run, replaces the file and
  warns. RUNNING or FAILED, or a status that cannot be known (offline, no query service, not
  found): resumed. A server that does not answer (``ServerUnavailable``) is asked again until
  ``rendezvous_timeout``, then the rendezvous fails: it never guesses;
- a rank > 0 takes a file published after this process started without asking the server; of
  an older one it asks, and skips a file naming an ended run that ended before this process started (a
  launch reusing the job id: its rank 0 will replace the file) and keeps waiting; a run that
  ended after this process started is its own launch's (rank 0 finished first): taken.

No launcher counter is used: torchrun's ``TORCHELASTIC_RESTART_COUNT`` is per agent, not
synchronised between nodes. What the status cannot tell: a launch reusing the job id of one
whose run is still RUNNING or FAILED (or offline) joins that run. Job ids should therefore
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

from trackhouse.client.errors import ServerUnavailable, TrackhouseError, UsageError
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
                  ended: Callable[[str], int | None] = lambda run_id: None,
                  sleep: Callable[[float], None] = time.sleep) -> tuple[str, bool]:
    """(run id, created here): rank 0 creates and publishes (or resumes its launch's); others wait.
    ``ended(run_id)``: the end time (ms) of a run that is FINISHED or KILLED, else None (running,
    failed, unknown); it raises ``ServerUnavailable`` when the server did not answer: asked again,
    with backoff, until ``rendezvous_timeout``."""
    deadline = time.monotonic() + settings.rendezvous_timeout
    if settings.rank == 0:
        return _publish(path, settings, create, lambda run_id: _ask(ended, run_id, path, settings, deadline, sleep))
    delay = 0.01
    # files naming an ended run of another launch, by (run id, publish stamp): the same file stays so, but
    # one rank 0 has rewritten since (even naming the same run) is read again
    stale: set[tuple[str, int | None]] = set()
    while (entry := _read_entry(path)) is None or entry in stale or (
            not _fresh(entry[1]) and _earlier(_ask(ended, entry[0], path, settings, deadline, sleep))):
        if entry is not None:
            stale.add(entry)
        if time.monotonic() >= deadline:
            raise TrackhouseError(
                f"rank {settings.rank} waited {settings.rendezvous_timeout:.0f} s for rank 0 to publish the "
                f"run id in {path.absolute()}" + (f" (it names run {entry[0]}, which an earlier launch ended)"
                                                  if entry else "") +
                f"; is rendezvous_dir shared by all ranks, and do all ranks see the same job id "
                f"({settings.job_id!r})?"
            )
        sleep(delay)  # polling a shared file system: no notification crosses nodes
        delay = min(delay * 2, 0.5)
    return entry[0], False


PROCESS_STARTED_MS = int(time.time() * 1000)  # at import: no later than this process's first start_run


def _earlier(end_ms: int | None) -> bool:
    """Whether a run that ended at ``end_ms`` ended before this process started: another launch's."""
    return end_ms is not None and end_ms < PROCESS_STARTED_MS


def _fresh(published_ms: int | None) -> bool:
    """Whether a file was published after this process started: this launch's, no need to ask the server.
    A file without a stamp (an older version's) may be an earlier launch's."""
    return published_ms is not None and published_ms >= PROCESS_STARTED_MS


def _ask(ended: Callable[[str], int | None], run_id: str, path: Path, settings: Settings, deadline: float,
         sleep: Callable[[float], None]) -> int | None:
    """``ended(run_id)``, asked again while the server does not answer, until ``deadline``."""
    delay = 0.01
    while True:
        try:
            return ended(run_id)
        except ServerUnavailable as exc:
            if time.monotonic() >= deadline:
                raise TrackhouseError(
                    f"rank {settings.rank} could not learn from the server within {settings.rendezvous_timeout:.0f} s "
                    f"whether run {run_id}, named in {path.absolute()}, is this launch's or an earlier one's "
                    f"(ended): {exc}"
                ) from exc
            logger.debug("trackhouse: cannot read run %s's status yet (%s); asking again", run_id, exc)
        sleep(delay)
        delay = min(delay * 2, 0.5)


def _publish(path: Path, settings: Settings, create: Callable[[], str],
             ended: Callable[[str], int | None]) -> tuple[str, bool]:
    entry = _read_entry(path)
    published = entry[0] if entry is not None else None
    if published is not None and ended(published) is None:
        run_id, created = published, False  # an elastic restart of this launch: resume its run
    else:
        if published is not None or path.exists():
            logger.warning(
                "trackhouse: %s was written by an earlier launch with job id %r (%s); starting a new run. Give "
                "each launch its own job id (torchrun --rdzv-id, TRACKHOUSE_CLIENT_JOB_ID)", path.absolute(),
                settings.job_id, f"its run {published} ended" if published else "in an older format",
            )
        run_id, created = create(), True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "published_ms": int(time.time() * 1000)}))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    return run_id, created


def _read_entry(path: Path) -> tuple[str, int | None] | None:
    """(run id, published_ms or None when the file has none) of the published file; None when missing
    or not in this format."""
    try:
        data = json.loads(path.read_text())
        run_id = data["run_id"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(run_id, str) or not run_id:
        return None
    stamp = data.get("published_ms")
    return run_id, stamp if isinstance(stamp, int) and not isinstance(stamp, bool) else None
