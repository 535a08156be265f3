"""`migrate` from several replicas at once, over HTTP: one migrator per version, no back-fill twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from trackhouse.store import open_store, schema
from trackhouse.store.settings import StoreSettings

pytestmark = pytest.mark.parametrize("store_url", ["http"], indirect=True)
MIGRATORS = 4


def _metrics(n: int) -> pa.Table:
    return pa.table({
        "run_id": ["r1"] * n, "key": ["loss"] * n,
        "step": pa.array(range(n), pa.int64()), "timestamp": pa.array([1_000] * n, pa.int64()),
        "value": pa.array([float(i) for i in range(n)]), "writer_id": ["w"] * n,
        "seq": pa.array([1] * n, pa.uint64()),
    })


def test_concurrent_migrations_apply_each_version_once_and_back_fill_once(
        store_url: str, database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A store at version 1 holding data that migrations 2, 3, 4 and 6 back-fill (4 drops and
    # rebuilds the latest tables, 6 moves experiment tags and deletes them from `tags`).
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        old = open_store(store_url, database)
    try:
        old.insert_rows("params", ("run_id", "key", "value"), [("r1", "lr", "0.1"), ("r2", "lr", "0.2")])
        old.insert_arrow("metrics", _metrics(2500))
        old.insert_rows("tags", ("run_id", "key", "value", "deleted", "version"),
                        [("experiment:0", "team", "vision", 0, 1), ("r1", "note", "x", 0, 1)])
    finally:
        old.close()

    barrier = threading.Barrier(MIGRATORS)

    def migrate() -> list[int]:
        store = open_store(store_url, database, migrate=False, settings=StoreSettings(migration_lock_timeout=120))
        try:
            barrier.wait(30)
            return store.migrate()
        finally:
            store.close()

    with ThreadPoolExecutor(MIGRATORS) as pool:
        results = list(pool.map(lambda _: migrate(), range(MIGRATORS)))

    # Each version applied by one migrator.
    assert sorted(v for applied in results for v in applied) == list(range(2, schema.latest_version() + 1))
    store = open_store(store_url, database, migrate=False)
    try:
        assert store.schema_version() == schema.latest_version()
        assert store.query_rows(f"SELECT version, count() FROM {store.t('schema_migrations')} "
                                "GROUP BY version ORDER BY version") == [
                                    (v, 1) for v in range(1, schema.latest_version() + 1)]
        # No FINAL, no merge: rows as inserted. A second back-fill would double them.
        assert store.query_rows(f"SELECT count() FROM {store.t('search_params')}") == [(2,)]
        assert store.query_rows(f"SELECT g, sum(count) FROM {store.t('metric_rollup')} GROUP BY g ORDER BY g"
                                ) == [(10, 2500), (1000, 2500)]
        last = "max(last_key)"
        assert store.query_rows(f"SELECT sum(count), {schema.latest_step(last)}, {schema.latest_value(last)} "
                                f"FROM {store.t('latest_metrics')}") == [(2500, 2499, 2499.0)]
        assert store.query_rows(f"SELECT count() FROM {store.t('search_metrics')}") == [(1,)]
        assert store.query_rows(f"SELECT experiment_id, key, value FROM {store.t('experiment_tags')}") == [
            ("0", "team", "vision")]
        assert store.query_rows(f"SELECT run_id FROM {store.t('tags')}") == [("r1",)]
    finally:
        store.close()
