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
    ddl = [s for s in cluster_script() if s.startswith(("CREATE", "DROP", "ALTER"))]
    assert all(re.search(r" ON CLUSTER th_cluster( |$)", s) for s in ddl)
    create = re.compile(r"CREATE TABLE IF NOT EXISTS trackhouse\.(\w+) .*?ENGINE = (\w+)")
    tables = {m[1]: m[2] for s in ddl if (m := create.match(s))}
    assert {"api_tokens", "experiment_tags"} <= set(tables)
    for name, engine in tables.items():
        if name.endswith("_local"):
            assert engine.startswith("Replicated") and engine.endswith("MergeTree"), name
            assert tables[name.removesuffix("_local")] == "Distributed", name
        elif name in layout.NULL_TABLES:
            assert engine == "Null" and name + "_local" not in tables, name
        elif not name.startswith("migration_lock_"):
            assert engine == "Distributed" and name + "_local" in tables, name


def test_null_tables_exist_on_every_node_under_their_own_name() -> None:
    assert set(layout.NULL_TABLES) == {"metric_cells"}
    script = cluster_script()
    assert ("CREATE TABLE IF NOT EXISTS trackhouse.metric_cells ON CLUSTER th_cluster ( run_id String, "
            in " ".join(script))
    assert not any("metric_cells_local" in s or "Distributed(th_cluster, trackhouse, metric_cells" in s
                   for s in script)


def test_drops_run_on_cluster_and_a_dropped_table_goes_with_its_local_half() -> None:
    drops = [s for s in cluster_script() if s.startswith("DROP")]
    assert drops and all(s.endswith(" ON CLUSTER th_cluster SYNC") for s in drops)
    dropped = [re.match(r"DROP TABLE IF EXISTS trackhouse\.(\w+) ", s)[1]  # type: ignore[index]
               for s in drops if s.startswith("DROP TABLE")]
    assert dropped == ["search_metrics", "search_metrics_local", "latest_metrics", "latest_metrics_local",
                       "run_index_state", "run_index_state_local", "run_index", "run_index_local",
                       "run_pages", "run_pages_local"]
    views = [re.match(r"DROP VIEW IF EXISTS trackhouse\.(\w+) ", s)[1]  # type: ignore[index]
             for s in drops if s.startswith("DROP VIEW")]
    assert views == ["search_metrics_mv", "latest_metrics_mv", "metric_rollup_10_mv", "metric_rollup_1000_mv"]
    # Each dropped table is created again afterwards, in both halves (migrations 4, 9 and 11).
    script = cluster_script()
    for half in dropped:
        drop = max(i for i, s in enumerate(script) if s.startswith(f"DROP TABLE IF EXISTS trackhouse.{half} "))
        assert any(s.startswith(f"CREATE TABLE IF NOT EXISTS trackhouse.{half} ON CLUSTER")
                   for s in script[drop:]), half


def test_mutations_run_on_the_shard_local_tables() -> None:
    alters = [s for s in cluster_script() if s.startswith("ALTER")]
    assert [re.match(r"ALTER TABLE trackhouse\.(\w+) ON CLUSTER th_cluster DELETE WHERE ", s)[1]  # type: ignore[index]
            for s in alters] == ["tags_local", "search_tags_local"]
    assert all(s.endswith("SETTINGS mutations_sync = 2") for s in alters)


def test_run_keyed_tables_are_sharded_by_run_so_a_run_lives_on_one_shard() -> None:
    keys = dict(re.findall(r"Distributed\(th_cluster, trackhouse, (\w+)_local, (.+)\)$", s)[0]
                for s in cluster_script() if "Distributed(" in s)
    for name in ("metrics", "latest_metrics", "runs", "params", "tags", "search_runs", "search_params",
                 "search_tags", "search_metrics", "metric_rollup"):
        assert keys[name] == "cityHash64(run_id)", name
    assert keys["writer_progress"] == "cityHash64(writer_id)"
    assert keys["experiments"] == "cityHash64(experiment_id)"
    assert keys["experiment_tags"] == "cityHash64(experiment_id)"
    assert keys["api_tokens"] == "cityHash64(token_id)"


def test_views_read_and_write_shard_local_tables_and_writer_progress_has_none() -> None:
    """Shard-local (`_local`) tables, or a Null table, which every node has under its own name."""
    views = [s for s in cluster_script() if s.startswith("CREATE MATERIALIZED VIEW")]
    assert views
    local = re.compile(rf"\w+_local|{'|'.join(layout.NULL_TABLES)}")
    for view in views:
        target = re.search(r" TO trackhouse\.(\w+) AS ", view)
        assert target and local.fullmatch(target[1]), view
        sources = re.findall(r"FROM trackhouse\.(\w+)", view)
        assert sources and all(local.fullmatch(src) for src in sources), view
    assert not any("writer_progress_mv" in v for v in views)
    # The rollup cascade: metrics_local -> metric_cells (Null) -> metric_rollup_local, on each shard.
    cascade = {re.search(r"VIEW IF NOT EXISTS trackhouse\.(\w+) ", v)[1]: v for v in views  # type: ignore[index]
               if "metric_cells" in v}
    assert "TO trackhouse.metric_cells AS " in cascade["metric_cells_mv"]
    assert "FROM trackhouse.metrics_local " in cascade["metric_cells_mv"]
    for g in (10, 1000):
        assert "TO trackhouse.metric_rollup_local AS " in cascade[f"metric_rollup_{g}_mv"]
        assert "FROM trackhouse.metric_cells" in cascade[f"metric_rollup_{g}_mv"]


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
                # Everything but the Distributed tables and the back-fills through them (which need
                # a cluster): shard-local tables, Null tables, views, drops and mutations.
                if "ENGINE = Distributed" not in statement and not statement.lstrip().startswith("INSERT"):
                    store.command(_declustered(statement).replace(f"{db}.", f"{db}.c_"))
    names = {r[0] for r in store.query_rows("SELECT name FROM system.tables WHERE database = {d:String}",
                                            {"d": db})}
    assert {"c_metrics_local", "c_latest_metrics_mv", "c_metric_rollup_1000_mv", "c_metric_cells",
            "c_metric_cells_mv", "c_api_tokens_local", "c_experiment_tags_local"} <= names
    # The cascade works on one shard: points into metrics_local reach latest_metrics_local,
    # search_metrics_local (migration 4's packed key) and both rollup levels through metric_cells.
    store.command(f"INSERT INTO {db}.c_metrics_local (run_id, key, step, timestamp, value, writer_id, seq) "
                  "VALUES ('r', 'loss', 1, 10, 0.5, 'w', 1), ('r', 'loss', 2, 20, 0.25, 'w', 1)")
    last = "max(last_key)"
    assert store.query_rows(f"SELECT {schema.latest_step(last)}, {schema.latest_value(last)} "
                            f"FROM {db}.c_latest_metrics_local") == [(2, 0.25)]
    assert store.query_rows(f"SELECT count() FROM {db}.c_search_metrics_local") == [(1,)]
    assert store.query_rows(f"SELECT g, sum(count) FROM {db}.c_metric_rollup_local GROUP BY g ORDER BY g") == [
        (10, 2), (1000, 2)]


def test_optimize_final_merges_the_shard_local_table_on_a_cluster() -> None:
    assert layout.optimize_final(layout.Layout("th"), "run_index") == "OPTIMIZE TABLE th.run_index FINAL"
    assert (layout.optimize_final(layout.Layout("th", "c1"), "run_index")
            == "OPTIMIZE TABLE th.run_index_local ON CLUSTER c1 FINAL")
    assert layout.optimize_final(layout.Layout("th"), "run_order", 3) == "OPTIMIZE TABLE th.run_order PARTITION 3 FINAL"
    assert (layout.optimize_final(layout.Layout("th", "c1"), "run_order", 3)
            == "OPTIMIZE TABLE th.run_order_local ON CLUSTER c1 PARTITION 3 FINAL")
    with pytest.raises(ValueError, match="table name"):
        layout.optimize_final(layout.Layout("th"), "run_index; DROP")
