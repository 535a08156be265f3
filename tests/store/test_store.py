"""Tests for trackhouse.store.Store against the real embedded engine (one fresh database per test)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from trackhouse.store import (
    ExperimentRecord,
    LatestMetricRecord,
    RunDetails,
    RunRecord,
    Store,
    StoreError,
    new_run_id,
    open_store,
)
from trackhouse.store.schema import latest_version


def run(run_id: str, **changes: object) -> RunRecord:
    fields: dict[str, object] = dict(
        run_id=run_id, experiment_id="e1", run_name=f"name-{run_id}", user_id="ann", status="RUNNING",
        start_time=1_000, end_time=None, lifecycle_stage="active", artifact_uri=f"file:///a/{run_id}",
    )
    fields.update(changes)
    return RunRecord(**fields)  # type: ignore[arg-type]


def insert_metrics(store: Store, rows: list[tuple[str, str, int, int, float]], writer: str = "w", seq: int = 1) -> None:
    run_ids, keys, steps, tss, values = (list(c) for c in zip(*rows, strict=True))
    store.insert_arrow("metrics", pa.table({
        "run_id": run_ids, "key": keys,
        "step": pa.array(steps, pa.int64()), "timestamp": pa.array(tss, pa.int64()),
        "value": pa.array(values, pa.float64()),
        "writer_id": [writer] * len(rows), "seq": pa.array([seq] * len(rows), pa.uint64()),
    }))


# -- migrations ------------------------------------------------------------------------------


def test_migrate_is_idempotent(store: Store) -> None:
    # The fixture's open_store already migrated: a second and third call apply nothing.
    assert store.migrate() == []
    assert store.migrate() == []
    assert store.schema_version() == latest_version() == 11
    rows = store.query_rows(f"SELECT version, description FROM {store.t('schema_migrations')} FINAL")
    assert sorted(r[0] for r in rows) == list(range(1, latest_version() + 1))
    tables = {r[0] for r in store.query_rows(
        "SELECT name FROM system.tables WHERE database = {db:String}", {"db": store.database})}
    assert tables >= {
        "experiments", "runs", "params", "tags", "metrics", "latest_metrics", "latest_metrics_mv",
        "writer_progress", "writer_progress_mv", "meta", "schema_migrations",
        "search_runs", "search_params", "search_tags", "search_metrics", "metric_rollup", "metric_cells",
        "experiment_tags", "run_changes", "run_index", "run_index_state", "run_order", "run_order_state", "run_pages",
    }


def test_open_store_on_a_fresh_database_applies_every_version(chdb_dsn: str, database: str) -> None:
    s = open_store(chdb_dsn, database, migrate=False)
    try:
        assert s.migrate() == list(range(1, latest_version() + 1))
        assert s.migrate() == []
        assert s.schema_version() == latest_version()
    finally:
        s.close()


def test_store_refuses_a_bad_database_name(chdb_dsn: str) -> None:
    with pytest.raises(ValueError, match="invalid database name"):
        open_store(chdb_dsn, "x; DROP DATABASE default")


# -- latest_metrics and writer_progress (materialized views) ------------------------------------


def test_latest_metrics_is_max_step_then_timestamp_then_value_across_inserts(store: Store) -> None:
    store.put_run(run("r1"))
    store.put_run(run("r2"))
    # Several INSERTs (several parts) the view aggregates separately; reads must combine them.
    insert_metrics(store, [("r1", "loss", 0, 100, 5.0), ("r1", "loss", 3, 50, 2.0), ("r2", "loss", 1, 1, 9.0)])
    insert_metrics(store, [("r1", "loss", 3, 60, 1.5), ("r1", "loss", 2, 999, -7.0)], seq=2)
    insert_metrics(store, [("r1", "loss", 3, 60, 0.5), ("r1", "loss", 3, 60, 1.0), ("r1", "acc", 1, 1, 0.25)], seq=3)
    insert_metrics(store, [("r1", "loss", 1, 10_000, 42.0)], seq=4)

    [r1, r2] = store.get_run_details(["r1", "r2"])
    # latest = greatest (step, timestamp, value): step 3, then timestamp 60, then value 1.5.
    assert r1.metrics == [
        LatestMetricRecord(key="acc", value=0.25, timestamp=1, step=1, min_value=0.25, max_value=0.25, count=1),
        LatestMetricRecord(key="loss", value=1.5, timestamp=60, step=3, min_value=-7.0, max_value=42.0, count=7),
    ]
    assert r2.metrics == [LatestMetricRecord("loss", 9.0, 1, 1, 9.0, 9.0, 1)]


def test_writer_progress_is_the_max_seq_per_writer(store: Store) -> None:
    assert store.writer_max_seq("w1") == 0
    insert_metrics(store, [("r", "m", 0, 0, 0.0)], writer="w1", seq=7)
    insert_metrics(store, [("r", "m", 1, 0, 0.0)], writer="w1", seq=3)
    insert_metrics(store, [("r", "m", 2, 0, 0.0)], writer="w2", seq=2**40)
    insert_metrics(store, [("r", "m", 3, 0, 0.0)], writer="w1", seq=12)
    assert store.writer_max_seq("w1") == 12
    assert store.writer_max_seq("w2") == 2**40
    assert store.writer_max_seq("w3") == 0


# -- runs, params, tags, details ----------------------------------------------------------------


def test_get_run_details_keeps_the_asked_order_and_skips_unknown_runs(store: Store) -> None:
    store.put_run(run("a", start_time=3, end_time=9, status="FINISHED"))
    store.put_run(run("b"))
    store.put_run(run("c", experiment_id="e2"))
    store.put_params("a", [("lr", "0.01"), ("opt", "adam")])
    store.put_params("a", [("lr", "0.01")])  # the same value again is harmless
    store.put_params("c", [("lr", "1e-3")])
    store.put_tags("a", [("team", "x"), ("note", "it's \\ fine\n")])
    store.put_tags("b", [("team", "y")])
    insert_metrics(store, [("c", "loss", 1, 2, 0.5)])

    details = store.get_run_details(["c", "nope", "a", "b"])
    assert details == [
        RunDetails(run("c", experiment_id="e2"), {"lr": "1e-3"}, {},
                   [LatestMetricRecord("loss", 0.5, 2, 1, 0.5, 0.5, 1)]),
        RunDetails(run("a", start_time=3, end_time=9, status="FINISHED"), {"lr": "0.01", "opt": "adam"},
                   {"note": "it's \\ fine\n", "team": "x"}, []),
        RunDetails(run("b"), {}, {"team": "y"}, []),
    ]
    assert list(details[1].params) == ["lr", "opt"]  # keys sorted
    assert store.get_run_details([]) == []
    assert store.get_run_details(["nope"]) == []


def test_put_run_twice_reads_the_latest_version(store: Store) -> None:
    store.put_run(run("r1"))
    store.put_run(run("r1", status="FINISHED", end_time=2_000, run_name="renamed"))
    store.put_run(run("r1", status="FINISHED", end_time=2_000, run_name="renamed", lifecycle_stage="deleted"))
    assert store.get_runs(["r1"]) == {
        "r1": run("r1", status="FINISHED", end_time=2_000, run_name="renamed", lifecycle_stage="deleted")
    }
    assert [d.info for d in store.get_run_details(["r1"])] == [
        run("r1", status="FINISHED", end_time=2_000, run_name="renamed", lifecycle_stage="deleted")
    ]
    # Back to active: the newest version wins again, before and after a merge.
    store.put_run(run("r1", status="FINISHED", end_time=2_000))
    assert store.get_runs(["r1"])["r1"] == run("r1", status="FINISHED", end_time=2_000)
    store.command(f"OPTIMIZE TABLE {store.t('runs')} FINAL")
    assert store.get_runs(["r1"])["r1"] == run("r1", status="FINISHED", end_time=2_000)


def test_experiments_latest_version(store: Store) -> None:
    first = ExperimentRecord("e1", "exp", "file:///a", "active", 1, 1)
    store.put_experiment(first)
    store.put_experiment(ExperimentRecord("e1", "exp2", "file:///a", "active", 1, 5))
    assert store.get_experiment(experiment_id="e1") == ExperimentRecord("e1", "exp2", "file:///a", "active", 1, 5)
    assert store.get_experiment(name="exp2") == ExperimentRecord("e1", "exp2", "file:///a", "active", 1, 5)
    assert store.get_experiment(name="exp") is None
    assert store.get_experiment(experiment_id="zz") is None


def test_deleted_tags_are_hidden_and_can_come_back(store: Store) -> None:
    store.put_run(run("r1"))
    store.put_tags("r1", [("a", "1"), ("b", "2")])
    store.put_tags("r1", [("a", "1")], deleted=True)
    assert store.get_run_details(["r1"])[0].tags == {"b": "2"}
    store.put_tags("r1", [("b", "3")])  # last write wins
    assert store.get_run_details(["r1"])[0].tags == {"b": "3"}
    store.put_tags("r1", [("a", "again")])
    assert store.get_run_details(["r1"])[0].tags == {"a": "again", "b": "3"}
    store.put_tags("r1", [("a", "x"), ("b", "x")], deleted=True)
    store.command(f"OPTIMIZE TABLE {store.t('tags')} FINAL")
    assert store.get_run_details(["r1"])[0].tags == {}


def test_get_params_reads_only_the_asked_keys(store: Store) -> None:
    store.put_params("r1", [("a", "1"), ("b", "2"), ("c", "3")])
    store.put_params("r2", [("a", "other")])
    assert store.get_params("r1", ["a", "c", "zz"]) == {"a": "1", "c": "3"}
    assert store.get_params("r1", []) == {}


# -- meta ------------------------------------------------------------------------------------------


def test_meta_value_is_created_once_and_stable(store: Store) -> None:
    calls: list[str] = []

    def make(value: str) -> str:
        calls.append(value)
        return value

    assert store.meta_value("secret", lambda: make("first")) == "first"
    assert store.meta_value("secret", lambda: make("second")) == "first"
    assert store.meta_value("other", lambda: make("o")) == "o"
    assert store.meta_value("secret", lambda: make("third")) == "first"
    assert calls == ["first", "o"]


def test_meta_value_is_shared_by_every_store_on_the_database(chdb_dsn: str, store: Store) -> None:
    value = store.meta_value("k", lambda: "v1")
    other = open_store(chdb_dsn, store.database)
    try:
        assert other.meta_value("k", lambda: "v2") == value == "v1"
    finally:
        other.close()


def test_meta_value_first_writer_wins_when_two_replicas_race(store: Store) -> None:
    # Both replicas found nothing and both wrote; each reads after its own write.
    store.insert_rows("meta", ("key", "value"), [("race", "from-a")])
    store.insert_rows("meta", ("key", "value"), [("race", "from-b")])
    assert store.meta_value("race", lambda: "from-c") == "from-a"
    store.command(f"OPTIMIZE TABLE {store.t('meta')} FINAL")
    assert store.meta_value("race", lambda: "from-c") == "from-a"


def test_migration_6_moves_experiment_tags_out_of_the_run_tags(
    chdb_dsn: str, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trackhouse.store import schema as schema_module

    monkeypatch.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:5])
    old = open_store(chdb_dsn, database)
    try:  # as versions up to 5 wrote them: rows of `tags` under a pseudo run id
        old.put_tags("experiment:7", [("team", "vision"), ("gone", "x")])
        old.put_tags("experiment:7", [("gone", "")], deleted=True)
        old.put_tags("a" * 32, [("team", "run-tag")])
    finally:
        old.close()
    monkeypatch.undo()
    new = open_store(chdb_dsn, database, migrate=False)
    try:
        assert new.migrate() == list(range(6, latest_version() + 1))
        assert new.get_experiment_tags(["7"]) == {"7": {"team": "vision"}}
        for table in ("tags", "search_tags"):
            assert new.query_rows(f"SELECT run_id, key FROM {new.t(table)} FINAL ORDER BY key") == [
                ("a" * 32, "team")]
    finally:
        new.close()


def test_new_run_id_is_hex_and_starts_with_its_start_time() -> None:
    a, b = new_run_id(1_700_000_000_000), new_run_id(1_700_000_000_000)
    assert len(a) == 32 and int(a, 16) >= 0 and a != b
    assert a[:12] == b[:12] == f"{1_700_000_000_000:012x}"
    assert new_run_id(1) < new_run_id(2) < new_run_id(1_700_000_000_000)
    assert new_run_id(0)[:12] == "0" * 12 and new_run_id(-5)[:12] == "0" * 12
    assert new_run_id(1 << 60)[:12] == "f" * 12 and len(new_run_id(1 << 60)) == 32


def test_a_closed_store_refuses_reads_and_rebuilds_instead_of_waiting(store: Store) -> None:
    s = store
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.query_rows("SELECT 1")
    with pytest.raises(StoreError, match="closed"):
        s.maintain("SELECT 1")
