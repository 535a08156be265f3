"""Where the tables live: one node, or a cluster of shards and replicas. Pure functions, no I/O.

The migrations in `schema` are written for one node. `render(statement, layout)`
returns what to run for one of them:

- one node: the statement with the database name filled in;
- a cluster (`Layout(db, cluster="NAME")`), every DDL `ON CLUSTER NAME`:
  - `CREATE TABLE {db}.t (…) ENGINE = XMergeTree(args) ORDER BY …` becomes the
    shard-local table `{db}.t_local` with `ReplicatedXMergeTree('/clickhouse/tables/
    {shard}/{db}/t_local', '{replica}', args)` and, under the old name, a
    `Distributed(NAME, db, t_local, <sharding key>)` over it. Readers and writers
    keep using `{db}.t`.
  - The sharding key keeps one run on one shard (`cityHash64(run_id)`) for every
    run-keyed table, so a run's series, its latest metrics, rollups and search
    copies are co-located: materialized views run on the shard-local tables
    (`… TO {db}.t_local AS SELECT … FROM {db}.s_local`) and never move rows
    between shards, and FINAL / GROUP BY run_id per shard equals the global answer.
  - `writer_progress` is sharded by writer and written by the store after the
    whole metrics INSERT returned (`progress_rows`), not by a view on the shards:
    a view would record a batch whose rows reached one shard while another shard
    failed, and the resend would be taken for a duplicate (data lost). See
    docs/deploy.md.
  - back-fill `INSERT … SELECT` statements run unchanged, through the
    Distributed tables.
  - a `Null`-engine table (metric_cells: rows pass through to its views, nothing
    is stored) has no Replicated or Distributed form: it is created under its own
    name on every node (`ON CLUSTER`). Views write into it and read from it under
    that name, so the cascade stays on the shard the rows arrived on (`metrics_local`
    → `metric_cells` → `metric_rollup_local`).
  - `DROP VIEW … SYNC` runs `ON CLUSTER`; `DROP TABLE {db}.t … SYNC` drops the
    Distributed table and then its shard-local `t_local` (SYNC also frees its Keeper
    path, so the table can be created again at once); a Null table is dropped as is.
  - `ALTER TABLE {db}.t DELETE …` (a mutation) runs on the shard-local `t_local`,
    `ON CLUSTER`: a Distributed table has no parts to mutate.

Identifiers (database, cluster) are whitelisted; nothing here is user text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trackhouse.store.schema import check_identifier

# Sharding expression per table; every other table is run-keyed.
SHARD_KEYS = {
    "experiments": "cityHash64(experiment_id)",
    "writer_progress": "cityHash64(writer_id)",
    "meta": "cityHash64(key)",
    "schema_migrations": "version",
    "api_tokens": "cityHash64(token_id)",
    "experiment_tags": "cityHash64(experiment_id)",
    "run_index_state": "cityHash64(key)",
    "run_order_state": "cityHash64(key)",
}
RUN_SHARD_KEY = "cityHash64(run_id)"
# Views replaced by an explicit write in cluster mode (see the module docstring).
CLUSTER_SKIPS_VIEWS = frozenset({"writer_progress_mv"})
LOCAL_SUFFIX = "_local"
ZK_PATH = "/clickhouse/tables/{shard}/%s/%s"

_CREATE_TABLE = re.compile(
    r"\s*CREATE TABLE IF NOT EXISTS (?P<db>\w+)\.(?P<name>\w+) \((?P<columns>.*)\)\s*"
    r"ENGINE = (?P<engine>\w*MergeTree)(?:\((?P<args>[^()]*)\))?\s+(?P<rest>ORDER BY .*?)\s*",
    re.DOTALL,
)
_CREATE_VIEW = re.compile(
    r"\s*CREATE MATERIALIZED VIEW IF NOT EXISTS (?P<db>\w+)\.(?P<name>\w+) "
    r"TO (?P<to_db>\w+)\.(?P<to>\w+) AS\s+(?P<select>.*?)\s*",
    re.DOTALL,
)
_INSERT_SELECT = re.compile(r"\s*INSERT INTO \w+\.\w+\s.*SELECT\s.*", re.DOTALL)
_CREATE_NULL = re.compile(
    r"\s*CREATE TABLE IF NOT EXISTS (?P<db>\w+)\.(?P<name>\w+) \((?P<columns>.*)\)\s*ENGINE = Null\s*", re.DOTALL)
_DROP = re.compile(r"\s*DROP (?P<kind>VIEW|TABLE) IF EXISTS (?P<db>\w+)\.(?P<name>\w+)(?P<sync> SYNC)?\s*")
_CREATE_DATABASE = re.compile(r"\s*CREATE DATABASE IF NOT EXISTS (?P<name>\w+)\s*")
_ALTER_DELETE = re.compile(r"\s*ALTER TABLE (?P<db>\w+)\.(?P<name>\w+) (?P<rest>DELETE WHERE .*?)\s*", re.DOTALL)


def _null_tables() -> frozenset[str]:
    """Tables the migrations create with the Null engine: one per node, never Replicated or Distributed."""
    from trackhouse.store import schema

    found = (_CREATE_NULL.fullmatch(statement.format(db="db")) for m in schema.MIGRATIONS for statement in m.statements)
    return frozenset(match["name"] for match in found if match)


@dataclass(frozen=True)
class Layout:
    database: str
    cluster: str | None = None

    def __post_init__(self) -> None:
        check_identifier(self.database)
        if self.cluster is not None:
            check_identifier(self.cluster, "cluster name")

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER {self.cluster}" if self.cluster else ""


def create_database(layout: Layout) -> str:
    return f"CREATE DATABASE IF NOT EXISTS {layout.database}{layout.on_cluster}"


def migration_lock(layout: Layout, version: int) -> tuple[str, str]:
    """(name, CREATE statement) of the table whose creation claims migration `version`.

    CREATE TABLE without IF NOT EXISTS succeeds for exactly one of several racing
    migrators (on a cluster: the first entry of the distributed DDL queue).
    """
    name = f"migration_lock_{int(version)}"
    return name, (f"CREATE TABLE {layout.database}.{name}{layout.on_cluster} "
                  "(owner String) ENGINE = Memory")


def optimize_final(layout: Layout, table: str, partition: int | None = None) -> str:
    """OPTIMIZE ... FINAL of one of our tables (of one partition of a table partitioned by an
    integer): on a cluster, of its shard-local table on every node (a Distributed table has no
    parts to merge)."""
    name = check_identifier(table, "table name")
    only = "" if partition is None else f" PARTITION {int(partition)}"
    if layout.cluster is None:
        return f"OPTIMIZE TABLE {layout.database}.{name}{only} FINAL"
    return f"OPTIMIZE TABLE {layout.database}.{name}{LOCAL_SUFFIX}{layout.on_cluster}{only} FINAL"


def drop_partition(layout: Layout, table: str, partition: int) -> str:
    """ALTER TABLE ... DROP PARTITION of one of our tables partitioned by an integer: on a cluster,
    of its shard-local table on every node."""
    name = check_identifier(table, "table name")
    local = f"{name}{LOCAL_SUFFIX}" if layout.cluster else name
    return f"ALTER TABLE {layout.database}.{local}{layout.on_cluster} DROP PARTITION {int(partition)}"


def render(statement: str, layout: Layout) -> list[str]:
    """The statements to run for one migration statement (its `{db}` template) in `layout`."""
    sql = statement.format(db=layout.database)
    if layout.cluster is None:
        return [sql]
    on = layout.on_cluster
    null = NULL_TABLES
    if m := _CREATE_TABLE.fullmatch(sql):
        return _cluster_table(m, layout)
    if m := _CREATE_NULL.fullmatch(sql):
        return [f"CREATE TABLE IF NOT EXISTS {m['db']}.{m['name']}{on} ({m['columns']}) ENGINE = Null"]
    if m := _CREATE_VIEW.fullmatch(sql):
        if m["name"] in CLUSTER_SKIPS_VIEWS:
            return []
        select = re.sub(rf"\bFROM {layout.database}\.(\w+)",
                        lambda s: s[0] if s[1] in null else f"{s[0]}{LOCAL_SUFFIX}", m["select"])
        target = m["to"] if m["to"] in null else m["to"] + LOCAL_SUFFIX
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {m['db']}.{m['name']}{on} "
                f"TO {m['to_db']}.{target} AS {select}"]
    if m := _DROP.fullmatch(sql):
        sync = m["sync"] or ""
        names = [m["name"]] if m["kind"] == "VIEW" or m["name"] in null else [m["name"], m["name"] + LOCAL_SUFFIX]
        return [f"DROP {m['kind']} IF EXISTS {m['db']}.{name}{on}{sync}" for name in names]
    if m := _ALTER_DELETE.fullmatch(sql):
        return [f"ALTER TABLE {m['db']}.{m['name']}{LOCAL_SUFFIX}{on} {m['rest']}"]
    if m := _CREATE_DATABASE.fullmatch(sql):  # e.g. the SQL sandbox (migration 7): on every node
        return [f"CREATE DATABASE IF NOT EXISTS {m['name']}{on}"]
    if _INSERT_SELECT.fullmatch(sql):
        return [sql]
    raise ValueError(f"no cluster form for this statement; teach trackhouse.store.layout about it: {sql[:120]!r}")


def _cluster_table(m: re.Match[str], layout: Layout) -> list[str]:
    db, name, cluster = m["db"], m["name"], layout.cluster
    local = name + LOCAL_SUFFIX
    args = ", ".join(a for a in (f"'{ZK_PATH % (db, local)}'", "'{replica}'", (m["args"] or "").strip()) if a)
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.{local}{layout.on_cluster} ({m['columns']}) "
        f"ENGINE = Replicated{m['engine']}({args}) {m['rest']}",
        f"CREATE TABLE IF NOT EXISTS {db}.{name}{layout.on_cluster} AS {db}.{local} "
        f"ENGINE = Distributed({cluster}, {db}, {local}, {SHARD_KEYS.get(name, RUN_SHARD_KEY)})",
    ]


def client_settings(layout: Layout, writer: bool) -> dict[str, object]:
    """ClickHouse settings every request of a client carries in this layout."""
    if layout.cluster is None:
        return {}
    # Writers and readers pick the same replica of each shard (the first live one), so a
    # read after a write sees it without waiting for replication (writer marks, meta).
    same_replica = {"load_balancing": "in_order"}
    if writer:
        # An ack means durable: the INSERT returns only once every shard has its rows
        # (the default queues them on the initiator and sends them later).
        return {**same_replica, "insert_distributed_sync": 1}
    # IN / JOIN subqueries over Distributed tables run once, globally: always correct.
    return {**same_replica, "distributed_product_mode": "global"}


NULL_TABLES = _null_tables()
