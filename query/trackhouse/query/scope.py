"""What the caller may see: the experiment restriction of the current principal, for the query domain.

Handlers (async, in the call's context) read it here and pass it into domain
requests explicitly (`SearchRequest.allowed_experiments`, ...): the domain runs
on the store's threads, where the call's contextvars are not visible. Runs and
experiments outside the caller's experiments are reported as not found, never as
forbidden, so an experiment-scoped token cannot learn that they exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trackhouse.query.errors import NotFound
from trackhouse.store import RunRecord
from trackhouse.store.auth import current_principal


def allowed_experiments() -> tuple[str, ...] | None:
    """The current caller's experiment ids (sorted), or None when it may see every experiment."""
    experiments = current_principal().experiments
    return None if experiments is None else tuple(sorted(experiments))


def check_visible(runs: Mapping[str, RunRecord], run_ids: Sequence[str], allowed: tuple[str, ...] | None) -> None:
    """Raise NotFound for the first run id that is absent or outside `allowed`."""
    if allowed is None:
        return
    for i, run_id in enumerate(run_ids):
        run = runs.get(run_id)
        if run is None or run.experiment_id not in allowed:
            raise NotFound(f"run_ids[{i}]: no run {run_id!r}")
