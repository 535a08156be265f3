"""The run-search layout (schema migration 2) stays equal to its sources.

search_runs, search_params, search_tags and search_metrics are copies kept by
materialized views; read with FINAL they must say exactly what the source
tables say (latest run version, write-once params, last tag write with
deletions, latest metric = max (step, timestamp, value)) — after an upgrade
from version 1 (back-fill) and after every kind of change.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from trackhouse.store import RunRecord, Store, open_store
from trackhouse.store import schema as schema_module

from .test_store import insert_metrics, run


def _latest_of_points(store: Store) -> list[tuple[Any, ...]]:
    """MLflow's latest metric straight from the points: max of (step, timestamp, value)."""
    return sorted(store.query_rows(f"SELECT run_id, toString(key), max((step, timestamp, value)) "
                                   f"FROM {store.t('metrics')} GROUP BY run_id, key"))


def _decoded(k: str) -> str:
    """The packed latest key as the (step, timestamp, value) tuple MLflow orders by."""
    return f"({schema_module.latest_step(k)}, {schema_module.latest_timestamp(k)}, {schema_module.latest_value(k)})"


def _sources(store: Store) -> dict[str, Any]:
    q = store.query_rows
    return {
        "runs": sorted(q(f"SELECT run_id, start_time, experiment_id, status, lifecycle_stage, end_time, run_name "
                         f"FROM {store.t('runs')} FINAL")),
        "params": sorted(q(f"SELECT DISTINCT run_id, key, value FROM {store.t('params')}")),
        "tags": sorted(q(f"SELECT run_id, key, value, deleted FROM {store.t('tags')} FINAL")),
        "metrics": sorted(q(f"SELECT run_id, key, {_decoded('max(last_key)')} FROM {store.t('latest_metrics')} "
                            "GROUP BY run_id, key")),
    }


def _copies(store: Store) -> dict[str, Any]:
    q = store.query_rows
    return {
        "runs": sorted(q(f"SELECT run_id, start_time, experiment_id, status, lifecycle_stage, end_time, run_name "
                         f"FROM {store.t('search_runs')} FINAL")),
        "params": sorted(q(f"SELECT run_id, key, value FROM {store.t('search_params')} FINAL")),
        "tags": sorted(q(f"SELECT run_id, key, value, deleted FROM {store.t('search_tags')} FINAL")),
        "metrics": sorted(q(f"SELECT run_id, key, {_decoded('last_key')} FROM {store.t('search_metrics')} FINAL")),
    }


def _rollup(store: Store) -> list[tuple[Any, ...]]:
    """metric_rollup decoded: per (run, key, g, cell) min (value, step), max (value, step), numbers, count."""
    kmin, kmax = "min(min_key)", "max(max_key)"
    return sorted(store.query_rows(
        f"SELECT run_id, key, g, cell, {schema_module.decode_value(kmin)}, {schema_module.decode_step(kmin, False)}, "
        f"{schema_module.decode_value(kmax)}, {schema_module.decode_step(kmax, True)}, sum(numbers), sum(count) "
        f"FROM {store.t('metric_rollup')} GROUP BY run_id, key, g, cell"))


def _rollup_of_points(store: Store) -> list[tuple[Any, ...]]:
    """The same, recomputed in Python from every point (floor cells; ties to the smallest step)."""
    cells: dict[tuple[Any, ...], list[tuple[int, float]]] = {}
    for run_id, key, step, value in store.query_rows(f"SELECT run_id, key, step, value FROM {store.t('metrics')}"):
        for g in schema_module.ROLLUP_LEVELS:
            cells.setdefault((run_id, key, g, step // g), []).append((step, value))
    out = []
    for cell, points in cells.items():
        nums = [(v + 0.0, s) for s, v in points if not math.isnan(v)]
        lo = min(nums) if nums else None
        hi = min(nums, key=lambda p: (-p[0], p[1])) if nums else None
        assert lo is not None and hi is not None  # every test point is a number
        out.append((*cell, lo[0], lo[1], hi[0], hi[1], len(nums), len(points)))
    return sorted(out)


def _write_some(store: Store, prefix: str) -> None:
    for i in range(3):
        store.put_run(run(f"{prefix}{i}", start_time=1_000 + i))
        store.put_params(f"{prefix}{i}", [("lr", f"0.{i}"), ("opt", "adam")])
        store.put_tags(f"{prefix}{i}", [("team", f"t{i}"), ("x", "1")])
    insert_metrics(store, [(f"{prefix}{i}", "loss", s, 10, float(s + i)) for i in range(3) for s in (1, 5, 3)])


def test_the_copies_follow_every_kind_of_change(store: Store) -> None:
    _write_some(store, "r")
    assert _copies(store) == _sources(store)
    assert _rollup(store) == _rollup_of_points(store)
    # A run finishes, another is deleted (newer versions win), params repeated (write-once: same value).
    store.put_run(run("r0", start_time=1_000, status="FINISHED", end_time=9_000))
    store.put_run(run("r1", start_time=1_001, lifecycle_stage="deleted"))
    store.put_params("r0", [("lr", "0.0")])
    # Tags: last write wins, a deleted tag is marked deleted, a deleted tag set again is back.
    store.put_tags("r0", [("team", "new")])
    store.put_tags("r1", [("x", "1")], deleted=True)
    store.put_tags("r2", [("x", "1")], deleted=True)
    store.put_tags("r2", [("x", "again")])
    # Metrics: a greater step wins; a lower step later does not; equal (step, ts): greater value.
    insert_metrics(store, [("r0", "loss", 9, 1, -1.0), ("r1", "loss", 0, 99, 100.0),
                           ("r2", "loss", 5, 10, 99.0), ("r2", "acc", 1, 1, float("nan"))], seq=2)
    copies = _copies(store)
    assert repr(copies) == repr(_sources(store))  # repr: NaN equals NaN
    metrics = {(r, k): last for r, k, last in copies["metrics"]}
    assert metrics["r0", "loss"] == (9, 1, -1.0)
    assert metrics["r1", "loss"] == (5, 10, 6.0)
    assert metrics["r2", "loss"] == (5, 10, 99.0)
    tags = {(r, k): (v, d) for r, k, v, d in copies["tags"]}
    assert tags["r0", "team"] == ("new", 0) and tags["r1", "x"][1] == 1 and tags["r2", "x"] == ("again", 0)
    runs = {r[0]: r for r in copies["runs"]}
    assert runs["r0"][3] == "FINISHED" and runs["r1"][4] == "deleted"
    assert len(copies["runs"]) == 3  # start_time is the key's prefix: one row per run still


def test_upgrading_a_version_1_store_back_fills_the_copies(
    chdb_dsn: str, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:1])
    old = open_store(chdb_dsn, database)
    try:
        assert old.schema_version() == 1
        _write_some(old, "v1-")
        old.put_run(RunRecord(**{**run("v1-0", start_time=1_000).__dict__, "status": "KILLED"}))
    finally:
        old.close()
    monkeypatch.undo()
    new = open_store(chdb_dsn, database, migrate=False)
    try:
        assert new.migrate() == list(range(2, schema_module.latest_version() + 1))
        assert _copies(new) == _sources(new)
        assert repr(_sources(new)["metrics"]) == repr(_latest_of_points(new))  # migration 4 rebuilt it
        assert _rollup(new) == _rollup_of_points(new)
        _write_some(new, "v2-")  # and the views keep them equal afterwards
        assert _copies(new) == _sources(new)
        assert len(_copies(new)["runs"]) == 6
        assert repr(_sources(new)["metrics"]) == repr(_latest_of_points(new))
        assert _rollup(new) == _rollup_of_points(new)
    finally:
        new.close()
