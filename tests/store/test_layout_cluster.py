"""Cluster mode DDL (trackhouse.store.layout): golden text, structure, and what chDB can execute.

No ClickHouse cluster runs here (chDB has no remote_servers, macros or Keeper:
`ON CLUSTER` fails with CLUSTER_DOESNT_EXIST), so the generated statements are
checked as text, and their shard-local halves are executed on chDB with the
cluster-only parts (ON CLUSTER, the Replicated engine's Keeper path) removed.
Regenerate the golden file with TRACKHOUSE_REGEN_GOLDEN=1 after a deliberate change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pytest

from trackhouse.store import Store, layout, schema
from trackhouse.store.store import progress_rows

GOLDEN = Path(__file__).parent / "golden" / "cluster_ddl.sql"
CLUSTER = layout.Layout("trackhouse", "th_cluster")


def cluster_script() -> list[str]:
    statements = [layout.create_database(CLUSTER), *layout.render(schema.MIGRATIONS_TABLE, CLUSTER)]
    for migration in schema.MIGRATIONS:
        statements.append(f"-- migration {migration.version}: {migration.description}")
        statements.append(layout.migration_lock(CLUSTER, migration.version)[1])
        for template in migration.statements:
            statements += layout.render(template, CLUSTER)
    return [" ".join(s.split()) for s in statements]


def test_cluster_ddl_matches_the_golden_file() -> None:
    text = ";\n".join(cluster_script()) + ";\n"
    if os.environ.get("TRACKHOUSE_REGEN_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_one_node_statements_are_the_templates() -> None:
    one = layout.Layout("db1")
    for migration in schema.MIGRATIONS:
        for template in migration.statements:
            assert layout.render(template, one) == [template.format(db="db1")]
    assert layout.client_settings(one, writer=True) == {} == layout.client_settings(one, writer=False)


def test_every_cluster_ddl_runs_on_cluster_and_every_table_is_replicated_and_distributed() -> None:
    ddl = [s for s in cluster_script() if s.startswith("CREATE")]
    assert all(re.search(r" ON CLUSTER th_cluster( |$)", s) for s in ddl)
    create = re.compile(r"CREATE TABLE IF NOT EXISTS trackhouse\.(\w+) .*?ENGINE = (\w+)")
    tables = {m[1]: m[2] for s in ddl if (m := create.match(s))}
    for name, engine in tables.items():
        if name.endswith("_local"):
            assert engine.startswith("Replicated") and engine.endswith("MergeTree"), name
            assert tables[name.removesuffix("_local")] == "Distributed", name
        elif not name.startswith("migration_lock_"):
            assert engine == "Distributed" and name + "_local" in tables, name


def test_run_keyed_tables_are_sharded_by_run_so_a_run_lives_on_one_shard() -> None:
    keys = dict(re.findall(r"Distributed\(th_cluster, trackhouse, (\w+)_local, (.+)\)$", s)[0]
                for s in cluster_script() if "Distributed(" in s)
    for name in ("metrics", "latest_metrics", "runs", "params", "tags", "search_runs", "search_params",
                 "search_tags", "search_metrics", "metric_rollup"):
        assert keys[name] == "cityHash64(run_id)", name
    assert keys["writer_progress"] == "cityHash64(writer_id)"
    assert keys["experiments"] == "cityHash64(experiment_id)"


def test_views_read_and_write_shard_local_tables_and_writer_progress_has_none() -> None:
    views = [s for s in cluster_script() if "MATERIALIZED VIEW" in s]
    assert views
    for view in views:
        assert re.search(r" TO trackhouse\.\w+_local AS ", view), view
        sources = re.findall(r"FROM trackhouse\.(\w+)", view)
        assert sources and all(src.endswith("_local") for src in sources), view
    assert not any("writer_progress_mv" in v for v in views)


def test_back_fills_go_through_the_distributed_tables() -> None:
    inserts = [s for s in cluster_script() if s.startswith("INSERT")]
    assert inserts and not any("_local" in s for s in inserts)


def test_replicated_engines_keep_their_arguments_after_the_keeper_path() -> None:
    tags = next(s for s in cluster_script() if s.startswith("CREATE TABLE IF NOT EXISTS trackhouse.tags_local "))
    assert ("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/trackhouse/tags_local', "
            "'{replica}', version) ORDER BY (run_id, key)") in tags


@pytest.mark.parametrize("bad", ["c1; DROP TABLE x", "", "a-b", "x" * 65, "c1\n"])
def test_cluster_names_are_whitelisted(bad: str) -> None:
    with pytest.raises(ValueError, match="cluster name"):
        layout.Layout("trackhouse", bad)


def test_cluster_clients_insert_synchronously_read_globally_and_use_the_same_replicas() -> None:
    assert layout.client_settings(CLUSTER, writer=True) == {"insert_distributed_sync": 1, "load_balancing": "in_order"}
    assert layout.client_settings(CLUSTER, writer=False) == {"distributed_product_mode": "global",
                                                             "load_balancing": "in_order"}


def test_progress_rows_are_the_max_seq_per_writer() -> None:
    table = pa.table({"writer_id": pa.array(["a", "b", "a", "a"]).dictionary_encode(),
                      "seq": pa.array([3, 9, 5, 4], pa.uint64())})
    rows = progress_rows(table).sort_by("writer_id").to_pylist()
    assert rows == [{"writer_id": "a", "max_seq": 5}, {"writer_id": "b", "max_seq": 9}]


def _declustered(statement: str) -> str:
    """The shard-local statement as one node can run it: no ON CLUSTER, no Keeper path."""
    statement = statement.replace(" ON CLUSTER th_cluster", "")
    return re.sub(r"Replicated(\w*MergeTree)\('[^']*', '\{replica\}'(?:, )?", r"\1(", statement)


def test_the_shard_local_tables_and_views_execute_on_chdb(store: Store) -> None:
    """Columns, engines and view SELECTs of the cluster layout are valid SQL for the real engine."""
    db = store.database
    local = layout.Layout(db, "th_cluster")
    for migration in schema.MIGRATIONS:
        for template in migration.statements:
            for statement in layout.render(template, local):
                if "_local" in statement.split(" AS ")[0] or "MATERIALIZED VIEW" in statement:
                    store.command(_declustered(statement).replace(f"{db}.", f"{db}.c_"))
    names = {r[0] for r in store.query_rows("SELECT name FROM system.tables WHERE database = {d:String}",
                                            {"d": db})}
    assert {"c_metrics_local", "c_latest_metrics_mv", "c_metric_rollup_1000_mv"} <= names
