"""Plain records the store reads and writes: the store's typed vocabulary.

Frozen dataclasses, independent of gRPC and of clickhouse-connect, so the
services can convert them to their own wire types at their edges.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

ACTIVE = "active"
DELETED = "deleted"

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_MAX_ID_TIME = (1 << 48) - 1


def new_run_id(start_time: int) -> str:
    """A new run id: 32 hex digits (as MLflow's), the first 12 the run's start time in ms.

    Ids then sort by start time, so the runs a search shows first — the newest — sit
    together in every table sorted by run id (docs/search.md, "Run ids that sort by
    start time"); the other 80 bits are random. Times past 2^48 ms (year 10889) clamp.
    """
    return run_id_prefix(start_time) + secrets.token_hex(10)


def run_id_prefix(start_time: int) -> str:
    """The 12 hex digits a run id minted for `start_time` begins with (`new_run_id`)."""
    return f"{min(max(start_time, 0), _MAX_ID_TIME):012x}"


@dataclass(frozen=True)
class ExperimentRecord:
    experiment_id: str
    name: str
    artifact_location: str
    lifecycle_stage: str
    creation_time: int
    last_update_time: int


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment_id: str
    run_name: str
    user_id: str
    status: str
    start_time: int
    end_time: int | None
    lifecycle_stage: str
    artifact_uri: str


@dataclass(frozen=True)
class LatestMetricRecord:
    key: str
    value: float
    timestamp: int
    step: int
    min_value: float
    max_value: float
    count: int


@dataclass(frozen=True)
class RunDetails:
    """A run with everything a search page or GetRun returns."""

    info: RunRecord
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[LatestMetricRecord] = field(default_factory=list)


@dataclass(frozen=True)
class TokenRecord:
    """An API token as stored: the secret itself is never stored, only its SHA-256 (hex)."""

    token_id: str
    name: str
    secret_sha256: str
    scope: str
    experiment_ids: tuple[str, ...]
    created_at: int
    revoked: bool = False
