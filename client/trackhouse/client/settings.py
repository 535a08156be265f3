"""Client settings: one frozen value object, and the only place that reads ``os.environ``.

``Settings()`` holds the defaults; ``Settings.from_env()`` overlays the
``TRACKHOUSE_CLIENT_*`` variables documented on the class (and, for the rank of a
distributed job, the variables torchrun, mpirun and SLURM set). ``__post_init__`` rejects
impossible values at start-up, so a bad configuration fails when the client is
created rather than inside the background sender: counts and sizes must be ints
(``1e5`` is a float, ``True`` a bool: both refused), seconds must be numbers,
finite and no longer than a thread can wait (``threading.TIMEOUT_MAX``).
"""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from trackhouse.client.errors import UsageError

_PREFIX = "TRACKHOUSE_CLIENT_"
_SCHEMES = ("grpc", "grpcs")
_MODES = ("online", "offline")
_UNSET = ("", "none")  # torchrun sets TORCHELASTIC_RUN_ID=none when no --rdzv-id is given
_RANKS = ("zero", "all")
# Longest setting in seconds: flush(), close() and the sender wait on threading primitives with it.
_MAX_SECONDS = threading.TIMEOUT_MAX
# Launcher variables, in order of preference, when TRACKHOUSE_CLIENT_<NAME> is unset: the launcher
# that started this process first. SLURM's come last: ``mpirun`` inside an ``sbatch`` script
# leaves the script's SLURM_PROCID (0) and SLURM_NTASKS in every rank it starts.
_LAUNCHER_VARS = {
    "rank": ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"),
    "world_size": ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"),
    "local_rank": ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"),
}
# The job id keys the run rendezvous, so it must be the same on every rank of one launch and new
# at each launch: torchrun's --rdzv-id; the PMIx namespace (Open MPI 5's "prterun-<host>-<pid>@1",
# Open MPI 4's job number, srun --mpi=pmix's "slurm.pmix.<job>.<step>"); Open MPI 4's job number;
# SLURM's job *and step* id (two srun steps of one sbatch script are two launches). MPICH's Hydra
# exports no such variable (PMI_FD, PMI_PORT are per process or reusable): set the job id there.
_JOB_VARS = ("TORCHELASTIC_RUN_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid")
# Shortest system-metrics interval: each sample costs ~0.1-1 ms of CPU (more with many GPUs),
# so 0.1 s keeps the sampler under ~1% of a core; 1e-6 was accepted and cost 0.7 s of CPU a second.
MIN_SYSTEM_METRICS_INTERVAL = 0.1


@dataclass(frozen=True)
class Settings:
    """How the client talks to trackhouse. Every field has an environment variable.

    Connection
    ``TRACKHOUSE_CLIENT_URL``
        Ingest service address: ``host:port``, ``grpc://host:port`` or
        ``grpcs://host:port`` (TLS with the system roots). Default ``127.0.0.1:50051``.
        Several, comma-separated (``a:50051,b:50051``): replicas; calls go to one and move
        to the next when it is unavailable. A DNS name with several addresses works too.
    ``TRACKHOUSE_CLIENT_QUERY_URL``
        Query service address, same forms. Unset: the ingest address (``trackhouse serve``
        runs both services on one port).
    ``TRACKHOUSE_CLIENT_MODE``
        ``online`` (default): stream to the server, spool only when it is away.
        ``offline``: never connect; every batch, run and param goes to the spool, to be
        uploaded later with ``trackhouse sync``.
    ``TRACKHOUSE_CLIENT_RPC_TIMEOUT``
        Deadline in seconds of each unary call (create run, log params, reads). Default 30.0.
    ``TRACKHOUSE_CLIENT_USER``
        ``user_id`` recorded on new runs. Default: the login name.
    ``TRACKHOUSE_CLIENT_TOKEN``
        API token (``th_…``, from ``trackhouse token create``), sent as
        ``authorization: Bearer …`` on every call. Default: none (a server on loopback
        with auth off needs none).
    ``TRACKHOUSE_CLIENT_TLS_CA``
        PEM file of the certificate authority (or the self-signed certificate) to trust
        for ``grpcs://`` URLs instead of the system roots. Default: the system roots.

    Batching and delivery
    ``TRACKHOUSE_CLIENT_FLUSH_INTERVAL``
        Seconds a logged point may wait in the buffer before it is sent. Default 5.0
        (OpenTelemetry's batch processor waits 5 s too). Lower it for fresher charts.
    ``TRACKHOUSE_CLIENT_MAX_BATCH_POINTS``
        Points per metric batch; reaching it in the buffer wakes the sender at once.
        Default 200000. Each batch costs the training process ~2 ms or more of background
        CPU on top of its points (measured: docs/benchmarks.md, issue 5), so fewer, larger
        batches cost less; the interval bounds how late a point is sent.
    ``TRACKHOUSE_CLIENT_FLUSH_TIMEOUT``
        Default deadline in seconds of ``Run.flush()``. Default 10.0.
    ``TRACKHOUSE_CLIENT_CLOSE_TIMEOUT``
        Longest wait in seconds of ``Run.finish()``, ``Client.close()`` and of the close at
        interpreter exit; what is undelivered then is spooled and reported. Default 30.0.
    ``TRACKHOUSE_CLIENT_ACK_TIMEOUT``
        Seconds a stream with batches in flight may go without an ack before it is
        treated as dead and reopened (a half-open connection never errors by
        itself; the server acks within its flush interval). Default 60.0.
    ``TRACKHOUSE_CLIENT_BACKOFF_INITIAL`` / ``TRACKHOUSE_CLIENT_BACKOFF_MAX``
        First and largest delay in seconds between reconnects of the metric stream
        (exponential, jittered; a retry delay sent by the server wins). Defaults 0.5, 30.0.

    Spool (disk)
    ``TRACKHOUSE_CLIENT_SPOOL_DIR``
        Where batches spill when the server is away or memory is full; one
        subdirectory per writer. Default ``.trackhouse/spool`` (relative to the
        working directory at start).
    ``TRACKHOUSE_CLIENT_SPOOL_GRACE``
        Seconds the server may be unreachable before unacknowledged batches spill
        to the spool. Default 10.0.
    ``TRACKHOUSE_CLIENT_MEMORY_BUDGET``
        Bytes of encoded, unacknowledged batches kept in memory; past it the oldest
        spill to the spool. Default 268435456 (256 MiB).
    ``TRACKHOUSE_CLIENT_SPOOL_SEGMENT_BYTES``
        Size at which a spool segment file is closed and a new one started.
        Default 67108864 (64 MiB).
    ``TRACKHOUSE_CLIENT_REPLAY_ORPHANS``
        ``1``/``0``: replay spools left by dead online clients of the same server
        (same spool dir) when a run starts. Default 1.

    Distributed training
    ``TRACKHOUSE_CLIENT_RANKS``
        ``zero`` (default): only rank 0 logs; other ranks' runs are no-ops. ``all``:
        every rank logs into the one run, each key prefixed ``rank{N}/``.
    ``TRACKHOUSE_CLIENT_RANK`` / ``TRACKHOUSE_CLIENT_WORLD_SIZE``
        This process's rank and the number of ranks. Unset: ``RANK``/``WORLD_SIZE``
        (torchrun), ``OMPI_COMM_WORLD_*`` (Open MPI's mpirun), ``PMI_*`` (MPICH),
        ``SLURM_PROCID``/``SLURM_NTASKS`` (srun), in that order; else 0 and 1.
    ``TRACKHOUSE_CLIENT_LOCAL_RANK``
        This process's rank on its node; only local rank 0 samples the node's GPUs. Unset:
        ``LOCAL_RANK`` (torchrun), ``OMPI_COMM_WORLD_LOCAL_RANK``, ``MPI_LOCALRANKID`` (MPICH),
        ``PMI_LOCAL_RANK``, ``SLURM_LOCALID``, in that order; else 0.
    ``TRACKHOUSE_CLIENT_JOB_ID``
        Identifies one launch of a distributed job for the run rendezvous; best unique per
        launch (a reused one resumes the earlier launch's run unless it ended, docs/client.md).
        Unset: ``TORCHELASTIC_RUN_ID`` (torchrun's ``--rdzv-id``, unless ``none``),
        ``PMIX_NAMESPACE``, ``OMPI_MCA_ess_base_jobid`` (Open MPI's mpirun), else
        ``SLURM_JOB_ID.SLURM_STEP_ID``; ``+requeue<N>`` is appended when ``SLURM_RESTART_COUNT`` is N > 0.
    ``TRACKHOUSE_CLIENT_RUN_ID``
        When set, ``start_run`` resumes this run instead of creating one (the
        launcher's or a restarted job's way to share a run). Default unset.
    ``TRACKHOUSE_CLIENT_RENDEZVOUS_DIR``
        Shared directory where rank 0 publishes the run id of a job for the other
        ranks (``ranks=all``). Default ``.trackhouse/rendezvous``.
    ``TRACKHOUSE_CLIENT_RENDEZVOUS_TIMEOUT``
        Seconds a rank > 0 waits for rank 0's run id. Default 600.0.
    ``TRACKHOUSE_CLIENT_SYSTEM_METRICS_INTERVAL``
        Seconds between samples of CPU, memory (and GPU when ``pynvml`` is
        installed) logged as ``system/*`` on a background thread; 0 turns it off,
        else at least 0.1. Default 0.
    """

    url: str = "127.0.0.1:50051"
    query_url: str | None = None
    mode: str = "online"
    rpc_timeout: float = 30.0
    user: str = ""
    flush_interval: float = 5.0
    max_batch_points: int = 200_000
    flush_timeout: float = 10.0
    close_timeout: float = 30.0
    ack_timeout: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    spool_dir: str = ".trackhouse/spool"
    spool_grace: float = 10.0
    memory_budget: int = 256 * 1024 * 1024
    spool_segment_bytes: int = 64 * 1024 * 1024
    replay_orphans: bool = True
    ranks: str = "zero"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    job_id: str = ""
    run_id: str | None = None
    rendezvous_dir: str = ".trackhouse/rendezvous"
    rendezvous_timeout: float = 600.0
    system_metrics_interval: float = 0.0
    token: str = dataclasses.field(default="", repr=False)
    tls_ca: str = ""

    def __post_init__(self) -> None:
        secure = all(tls for _, tls in parse_urls(self.url))
        if self.query_url is not None:
            secure = all(tls for _, tls in parse_urls(self.query_url)) and secure
        if self.tls_ca and not secure:
            raise UsageError("Settings.tls_ca is set but the URL is not TLS: use grpcs://host:port")
        if self.tls_ca and not os.access(self.tls_ca, os.R_OK):
            raise UsageError(f"Settings.tls_ca: {self.tls_ca!r} is not a readable file")
        if any(c.isspace() for c in self.token):
            raise UsageError("Settings.token must not contain whitespace: pass the token as printed")
        self._check_numbers()
        positive = ("flush_interval", "flush_timeout", "close_timeout", "rpc_timeout", "backoff_initial",
                    "rendezvous_timeout", "ack_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UsageError(f"Settings.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("spool_grace", "system_metrics_interval", "local_rank"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"Settings.{name} must be >= 0, got {getattr(self, name)!r}")
        if 0 < self.system_metrics_interval < MIN_SYSTEM_METRICS_INTERVAL:
            raise UsageError(
                f"Settings.system_metrics_interval must be 0 (off) or >= {MIN_SYSTEM_METRICS_INTERVAL} seconds, "
                f"got {self.system_metrics_interval!r}"
            )
        if self.max_batch_points < 1:
            raise UsageError(f"Settings.max_batch_points must be >= 1, got {self.max_batch_points!r}")
        if self.backoff_max < self.backoff_initial:
            raise UsageError(
                f"Settings.backoff_max ({self.backoff_max}) must be >= backoff_initial ({self.backoff_initial})"
            )
        self._check_choices()
        if self.memory_budget < 1 or self.spool_segment_bytes < 4096:
            raise UsageError("Settings.memory_budget must be >= 1 and spool_segment_bytes >= 4096")
        if not self.spool_dir:
            raise UsageError("Settings.spool_dir must be a directory path")

    def _check_numbers(self) -> None:
        # Before the range checks: NaN passes none of them, inf passes ``> 0`` and then makes
        # every threading wait raise OverflowError, and a float count kills the sender at
        # ``range(0, n, max_batch_points)``.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and type(value) is not int:
                raise UsageError(f"Settings.{field.name} must be an int, got {type(value).__name__} {value!r}")
            if field.type not in ("float", float):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsageError(
                    f"Settings.{field.name} must be a number of seconds, got {type(value).__name__} {value!r}"
                )
            if (isinstance(value, float) and not math.isfinite(value)) or value > _MAX_SECONDS:
                raise UsageError(
                    f"Settings.{field.name} must be finite and <= {_MAX_SECONDS:.0f} seconds "
                    f"(threading.TIMEOUT_MAX), got {value!r}"
                )

    def _check_choices(self) -> None:
        if self.mode not in _MODES:
            raise UsageError(f"Settings.mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.ranks not in _RANKS:
            raise UsageError(f"Settings.ranks must be one of {', '.join(_RANKS)}, got {self.ranks!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UsageError(
                f"Settings.rank ({self.rank}) must be in [0, world_size) and world_size ({self.world_size}) >= 1"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overlaid by ``TRACKHOUSE_CLIENT_*`` (and launcher) variables, overlaid by ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            names = (_PREFIX + field.name.upper(), *_LAUNCHER_VARS.get(field.name, ()))
            raw = next((env[n] for n in names if env.get(n, "").strip() not in _UNSET), None)
            if raw is None:
                continue
            values[field.name] = _convert(names[0], raw.strip(), _CONVERTERS.get(field.name, str))
        if "job_id" not in values:
            values["job_id"] = _launcher_job_id(env)
        if "user" not in values:
            values["user"] = _login_name()
        values.update(overrides)
        return cls(**values)

    @property
    def effective_query_url(self) -> str:
        return self.url if self.query_url is None else self.query_url

    @property
    def offline(self) -> bool:
        return self.mode == "offline"


def _launcher_job_id(env: Mapping[str, str]) -> str:
    """The launch's id from the launcher's variables (``_JOB_VARS``, then SLURM's), or ""."""
    def get(name: str) -> str:
        value = env.get(name, "").strip()
        return "" if value in _UNSET else value

    job = next((get(n) for n in _JOB_VARS if get(n)), "")
    if not job and get("SLURM_JOB_ID"):
        step = get("SLURM_STEP_ID")
        job = get("SLURM_JOB_ID") + (f".{step}" if step else "")
    requeued = get("SLURM_RESTART_COUNT")
    if job and requeued not in ("", "0"):  # a requeued job runs its launches again under the same ids
        job += f"+requeue{requeued}"
    return job


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_bool.__name__ = "boolean (1/0)"

_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "flush_interval": float,
    "max_batch_points": int,
    "flush_timeout": float,
    "close_timeout": float,
    "ack_timeout": float,
    "rpc_timeout": float,
    "backoff_initial": float,
    "backoff_max": float,
    "spool_grace": float,
    "memory_budget": int,
    "spool_segment_bytes": int,
    "replay_orphans": _bool,
    "rank": int,
    "world_size": int,
    "local_rank": int,
    "rendezvous_timeout": float,
    "system_metrics_interval": float,
}


def _convert(variable: str, raw: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(raw)
    except ValueError:
        kind = getattr(convert, "__name__", "value")
        raise UsageError(f"{variable}={raw!r} is not a valid {kind}") from None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers; the user id is optional
        return ""


def parse_urls(url: str) -> list[tuple[str, bool]]:
    """A comma-separated list of addresses (replicas of one service) -> [(gRPC target, use TLS)]."""
    if not url or not isinstance(url, str):
        raise UsageError(f"a trackhouse URL is 'host:port' or 'grpc://host:port', got {url!r}")
    parts = [part.strip() for part in url.split(",")]
    if not all(parts):
        raise UsageError(f"empty address in {url!r}: separate replicas with single commas, 'a:50051,b:50051'")
    return [parse_url(part) for part in parts]


def parse_url(url: str) -> tuple[str, bool]:
    """``host:port`` / ``grpc://host:port`` / ``grpcs://host:port`` -> (gRPC target, use TLS)."""
    if not url or not isinstance(url, str):
        raise UsageError(f"a trackhouse URL is 'host:port' or 'grpc://host:port', got {url!r}")
    if "://" not in url:
        return url, False
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.netloc or parts.path not in ("", "/"):
        raise UsageError(
            f"unsupported trackhouse URL {url!r}: use 'host:port', 'grpc://host:port' or 'grpcs://host:port'"
        )
    return parts.netloc, parts.scheme == "grpcs"
