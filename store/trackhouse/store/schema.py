"""The schema of the trackhouse store and its versioned migrations.

Owns every DDL statement. A migration is a numbered list of statements; the
numbers applied are recorded in the `schema_migrations` table of the store, so
`migrate()` is idempotent and a newer release applies only what is missing.
Statements use `{db}` for the database name (a whitelisted identifier, checked
by `check_identifier`), never user text.

Tables (see docs/schema.md for the stable, user-facing description):

- experiments, runs, tags — small and mutable: ReplacingMergeTree(version);
  readers take the latest version (FINAL on the few rows a page touches).
- params — write-once per (run, key); the ingest service refuses another value.
- metrics — the big one, append-only; one run's series contiguous on disk;
  (writer_id, seq) of the client batch on every row, for exactly-once replays.
- latest_metrics — kept by a materialized view: per (run, key) the greatest
  (step, timestamp, value) tuple, min, max and count.
- writer_progress — kept by a materialized view: the greatest batch seq stored
  per writer, which is what ingest's dedupe consults after a restart.
- search_runs, search_params, search_tags, search_metrics (migration 2) — the
  run-search layout: copies kept by materialized views, sorted for the
  questions search asks (runs by start_time; params, tags and latest metrics
  key-first, so one key is one primary-key range). Same engines and the same
  merge rules as their sources, so FINAL reads give the same answers. See
  docs/search.md for the measurements behind it.
- meta — server-side values (the page-token secret); the first value written for
  a key wins, so replicas racing to create one still agree on it.
- api_tokens (migration 5) — API tokens: id, name, scope, experiment ids and the
  SHA-256 of the secret (never the secret); ReplacingMergeTree(version), so a
  revoke is a newer row.
- experiment_tags (migration 6) — experiment tags, moved out of `tags`.

The statements are written once, for one node; `layout.render()` (a pure
function, trackhouse.store.layout) turns each into what a cluster runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def check_identifier(name: str, what: str = "database name") -> str:
    """Return `name` if it is a plain SQL identifier, else raise ValueError."""
    # fullmatch: `$` would also accept a trailing newline.
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 64 characters"
        )
    return name


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
    version UInt32,
    description String,
    applied_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree ORDER BY version
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "experiments, runs, params, tags, metrics, latest_metrics, writer_progress",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.experiments (
                experiment_id String,
                name String,
                artifact_location String,
                lifecycle_stage LowCardinality(String),
                creation_time Int64,
                last_update_time Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version) ORDER BY experiment_id
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.runs (
                run_id String,
                experiment_id String,
                run_name String,
                user_id String,
                status LowCardinality(String),
                start_time Int64,
                end_time Nullable(Int64),
                lifecycle_stage LowCardinality(String),
                artifact_uri String,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version) ORDER BY run_id
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.params (
                run_id String,
                key String,
                value String
            ) ENGINE = ReplacingMergeTree ORDER BY (run_id, key)
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.tags (
                run_id String,
                key String,
                value String,
                deleted UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version) ORDER BY (run_id, key)
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.metrics (
                run_id String,
                key LowCardinality(String),
                step Int64 CODEC(Delta, ZSTD(1)),
                timestamp Int64 CODEC(DoubleDelta, ZSTD(1)),
                value Float64 CODEC(Gorilla, ZSTD(1)),
                writer_id LowCardinality(String),
                seq UInt64 CODEC(Delta, ZSTD(1))
            ) ENGINE = MergeTree ORDER BY (run_id, key, step, timestamp)
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.latest_metrics (
                run_id String,
                key String,
                last SimpleAggregateFunction(max, Tuple(Int64, Int64, Float64)),
                min_value SimpleAggregateFunction(min, Float64),
                max_value SimpleAggregateFunction(max, Float64),
                count SimpleAggregateFunction(sum, UInt64)
            ) ENGINE = AggregatingMergeTree ORDER BY (run_id, key)
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.latest_metrics_mv TO {db}.latest_metrics AS
            SELECT run_id, toString(key) AS key,
                   max((step, timestamp, value)) AS last,
                   min(value) AS min_value, max(value) AS max_value, count() AS count
            FROM {db}.metrics GROUP BY run_id, key
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.writer_progress (
                writer_id String,
                max_seq SimpleAggregateFunction(max, UInt64)
            ) ENGINE = AggregatingMergeTree ORDER BY writer_id
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.writer_progress_mv TO {db}.writer_progress AS
            SELECT toString(writer_id) AS writer_id, max(seq) AS max_seq
            FROM {db}.metrics GROUP BY writer_id
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.meta (
                key String,
                value String,
                created DateTime64(9) DEFAULT now64(9)
            ) ENGINE = MergeTree ORDER BY (key, created)
            """,
        ),
    ),
)


# Migration 2: the run-search layout (docs/search.md). Each copy is created with its
# view first and back-filled second, so no row written during the migration is
# missed; a row both back-filled and seen by the view is harmless, because every
# engine here keeps one row per key (Replacing by version, max of the latest tuple).
# search_runs is ordered by (start_time, run_id): start_time never changes after a
# run is created (as in MLflow), so the key still identifies one run.
# The run record's columns as search_runs and run_index (migration 8) hold them.
_RECORD_COLUMNS = """
        start_time Int64,
        run_id String,
        experiment_id LowCardinality(String),
        run_name String,
        user_id String,
        status LowCardinality(String),
        end_time Nullable(Int64),
        lifecycle_stage LowCardinality(String),
        artifact_uri String,"""
_SEARCH_LAYOUT = (
    f"""
    CREATE TABLE IF NOT EXISTS {{db}}.search_runs ({_RECORD_COLUMNS}
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY (start_time, run_id)
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.search_runs_mv TO {db}.search_runs AS
    SELECT start_time, run_id, experiment_id, run_name, user_id, status, end_time,
           lifecycle_stage, artifact_uri, version
    FROM {db}.runs
    """,
    """
    INSERT INTO {db}.search_runs
    SELECT start_time, run_id, experiment_id, run_name, user_id, status, end_time,
           lifecycle_stage, artifact_uri, version
    FROM {db}.runs
    """,
    """
    CREATE TABLE IF NOT EXISTS {db}.search_params (
        key LowCardinality(String),
        value String,
        run_id String
    ) ENGINE = ReplacingMergeTree ORDER BY (key, value, run_id)
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.search_params_mv TO {db}.search_params AS
    SELECT key, value, run_id FROM {db}.params
    """,
    "INSERT INTO {db}.search_params SELECT key, value, run_id FROM {db}.params",
    """
    CREATE TABLE IF NOT EXISTS {db}.search_tags (
        key LowCardinality(String),
        run_id String,
        value String,
        deleted UInt8,
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY (key, run_id)
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.search_tags_mv TO {db}.search_tags AS
    SELECT key, run_id, value, deleted, version FROM {db}.tags
    """,
    "INSERT INTO {db}.search_tags SELECT key, run_id, value, deleted, version FROM {db}.tags",
    """
    CREATE TABLE IF NOT EXISTS {db}.search_metrics (
        key LowCardinality(String),
        run_id String,
        last SimpleAggregateFunction(max, Tuple(Int64, Int64, Float64))
    ) ENGINE = AggregatingMergeTree ORDER BY (key, run_id)
    """,
    # Cascades from latest_metrics (whose view already aggregated each insert), so
    # the metrics insert path pays for one GROUP BY, not two.
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.search_metrics_mv TO {db}.search_metrics AS
    SELECT key, run_id, last FROM {db}.latest_metrics
    """,
    "INSERT INTO {db}.search_metrics SELECT key, run_id, max(last) FROM {db}.latest_metrics GROUP BY key, run_id",
)

MIGRATIONS = (
    *MIGRATIONS,
    Migration(2, "run-search layout: search_runs, search_params, search_tags, search_metrics", _SEARCH_LAYOUT),
)


def latest_version() -> int:
    return MIGRATIONS[-1].version


# Migration 3: metric_rollup (docs/search.md, "History downsampling"). Per (run, key) and
# cell of G consecutive steps (G = 10 and G = 1000, floor division so negative steps
# work), the extremes of the cell's numbers packed into one UInt128 each, so min/max
# are native integer aggregates that also carry a step: high 64 bits = the value
# mapped to an order-preserving UInt64, low 64 bits = the step mapped likewise
# (inverted for the max, so ties go to the smallest step either way). A NaN point
# counts but is never an extreme: the sentinels lose to every real key. Charts whose
# bucket boundaries fall on cell boundaries read cells instead of points.
ROLLUP_LEVELS = (10, 1000)
_U63 = "9223372036854775808"
_VALUE_KEY = (f"if(reinterpretAsUInt64(value + 0.) >= {_U63}, bitNot(reinterpretAsUInt64(value + 0.)), "
              f"bitOr(reinterpretAsUInt64(value + 0.), {_U63}))")  # + 0.: -0.0 and 0.0 are one value
_STEP_KEY = f"bitXor(reinterpretAsUInt64(step), {_U63})"
MIN_KEY = f"bitOr(bitShiftLeft(toUInt128({_VALUE_KEY}), 64), toUInt128({_STEP_KEY}))"
MAX_KEY = f"bitOr(bitShiftLeft(toUInt128({_VALUE_KEY}), 64), toUInt128(bitNot({_STEP_KEY})))"
_NO_MIN = "toUInt128('340282366920938463463374607431768211455')"


def cell_of(step: str, g: int) -> str:
    """Floor division of `step` by the cell width (intDiv truncates towards zero)."""
    return f"(intDiv({step}, {int(g)}) - toInt64({step} < 0 AND {step} % {int(g)} != 0))"


def decode_value(k: str) -> str:
    hi = f"toUInt64(bitShiftRight({k}, 64))"
    return f"reinterpretAsFloat64(if({hi} >= {_U63}, bitXor({hi}, {_U63}), bitNot({hi})))"


def decode_step(k: str, inverted: bool) -> str:
    lo = f"toUInt64(bitAnd({k}, toUInt128('18446744073709551615')))"
    return f"reinterpretAsInt64(bitXor({f'bitNot({lo})' if inverted else lo}, {_U63}))"


def _rollup_select(g: int) -> str:
    return (f"SELECT run_id, key, {int(g)} AS g, {cell_of('step', g)} AS cell, "
            f"min(if(isNaN(value), {_NO_MIN}, {MIN_KEY})) AS min_key, "
            f"max(if(isNaN(value), toUInt128(0), {MAX_KEY})) AS max_key, "
            "min(step) AS min_step, max(step) AS max_step, "
            "countIf(NOT isNaN(value)) AS numbers, count() AS count "
            "FROM {db}.metrics GROUP BY run_id, key, cell")


_ROLLUP = (
    """
    CREATE TABLE IF NOT EXISTS {db}.metric_rollup (
        run_id String,
        key LowCardinality(String),
        g UInt32,
        cell Int64,
        min_key SimpleAggregateFunction(min, UInt128),
        max_key SimpleAggregateFunction(max, UInt128),
        min_step SimpleAggregateFunction(min, Int64),
        max_step SimpleAggregateFunction(max, Int64),
        numbers SimpleAggregateFunction(sum, UInt64),
        count SimpleAggregateFunction(sum, UInt64)
    ) ENGINE = AggregatingMergeTree ORDER BY (run_id, key, g, cell)
    """,
    *(stmt for g in ROLLUP_LEVELS for stmt in (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.metric_rollup_{g}_mv TO {{db}}.metric_rollup AS "
        + _rollup_select(g),
        "INSERT INTO {db}.metric_rollup " + _rollup_select(g),
    )),
)

MIGRATIONS = (*MIGRATIONS, Migration(3, "metric_rollup: per-cell extremes for charts", _ROLLUP))



# Migration 4: the insert path made cheaper (docs/ingest.md, "Where the time goes";
# loadtests/insert_profile.py measures each view). Two changes, same answers:
#
# - latest_metrics/search_metrics keep the latest point as one order-preserving
#   UInt256 key, step ‖ timestamp ‖ value, each part mapped like the rollup keys
#   above, so `max` compares native integers (MLflow's order: max(step, timestamp,
#   value)); `latest_step/latest_timestamp/latest_value` decode it. The generic
#   tuple max cost about twice as much per inserted row.
# - metric_rollup's two levels cascade: one view groups the inserted block into
#   cells of 10 steps in a Null table (nothing stored); the 10-step level copies
#   those cells and the 1000-step level re-aggregates them, reading a tenth of the
#   rows. Same table, same rows as migration 3's views.
#
# The old views are dropped and the latest tables rebuilt from `metrics`; run it
# (like every migration) before serving writes.
_TS_KEY = f"bitXor(reinterpretAsUInt64(timestamp), {_U63})"
LATEST_KEY = (f"bitOr(bitOr(bitShiftLeft(toUInt256({_STEP_KEY}), 128), bitShiftLeft(toUInt256({_TS_KEY}), 64)), "
              f"toUInt256({_VALUE_KEY}))")


def latest_value(k: str) -> str:
    """The value of a packed latest key (its low 64 bits)."""
    lo = f"toUInt64(bitAnd({k}, toUInt256(18446744073709551615)))"
    return f"reinterpretAsFloat64(if({lo} >= {_U63}, bitXor({lo}, {_U63}), bitNot({lo})))"


def latest_timestamp(k: str) -> str:
    mid = f"toUInt64(bitAnd(bitShiftRight({k}, 64), toUInt256(18446744073709551615)))"
    return f"reinterpretAsInt64(bitXor({mid}, {_U63}))"


def latest_step(k: str) -> str:
    return f"reinterpretAsInt64(bitXor(toUInt64(bitShiftRight({k}, 128)), {_U63}))"


def _cells_select() -> str:
    return (f"SELECT run_id, key, {cell_of('step', 10)} AS cell, "
            f"min(if(isNaN(value), {_NO_MIN}, {MIN_KEY})) AS min_key, "
            f"max(if(isNaN(value), toUInt128(0), {MAX_KEY})) AS max_key, "
            "min(step) AS min_step, max(step) AS max_step, "
            "countIf(NOT isNaN(value)) AS numbers, count() AS count "
            "FROM {db}.metrics GROUP BY run_id, key, cell")


_LATEST_SELECT = (f"SELECT run_id, toString(key) AS key, max({LATEST_KEY}) AS last_key, "
                  "min(value) AS min_value, max(value) AS max_value, count() AS count "
                  "FROM {db}.metrics GROUP BY run_id, key")

_CHEAPER_INSERT = (
    "DROP VIEW IF EXISTS {db}.search_metrics_mv SYNC",
    "DROP VIEW IF EXISTS {db}.latest_metrics_mv SYNC",
    *(f"DROP VIEW IF EXISTS {{db}}.metric_rollup_{g}_mv SYNC" for g in ROLLUP_LEVELS),
    "DROP TABLE IF EXISTS {db}.search_metrics SYNC",
    "DROP TABLE IF EXISTS {db}.latest_metrics SYNC",
    """
    CREATE TABLE IF NOT EXISTS {db}.latest_metrics (
        run_id String,
        key String,
        last_key SimpleAggregateFunction(max, UInt256),
        min_value SimpleAggregateFunction(min, Float64),
        max_value SimpleAggregateFunction(max, Float64),
        count SimpleAggregateFunction(sum, UInt64)
    ) ENGINE = AggregatingMergeTree ORDER BY (run_id, key)
    """,
    """
    CREATE TABLE IF NOT EXISTS {db}.search_metrics (
        key LowCardinality(String),
        run_id String,
        last_key SimpleAggregateFunction(max, UInt256)
    ) ENGINE = AggregatingMergeTree ORDER BY (key, run_id)
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.search_metrics_mv TO {db}.search_metrics AS
    SELECT key, run_id, last_key FROM {db}.latest_metrics
    """,
    "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.latest_metrics_mv TO {db}.latest_metrics AS " + _LATEST_SELECT,
    # The back-fill goes through latest_metrics' own view into search_metrics.
    "INSERT INTO {db}.latest_metrics " + _LATEST_SELECT,
    """
    CREATE TABLE IF NOT EXISTS {db}.metric_cells (
        run_id String, key LowCardinality(String), cell Int64,
        min_key UInt128, max_key UInt128, min_step Int64, max_step Int64,
        numbers UInt64, count UInt64
    ) ENGINE = Null
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_rollup_10_mv TO {db}.metric_rollup AS
    SELECT run_id, key, toUInt32(10) AS g, cell, min_key, max_key, min_step, max_step, numbers, count
    FROM {db}.metric_cells
    """,
    f"""
    CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.metric_rollup_1000_mv TO {{db}}.metric_rollup AS
    SELECT run_id, key, toUInt32(1000) AS g, c1000 AS cell, min(min_key) AS min_key,
           max(max_key) AS max_key, min(min_step) AS min_step, max(max_step) AS max_step,
           sum(numbers) AS numbers, sum(count) AS count
    FROM (SELECT run_id, key, {cell_of('cell', 100)} AS c1000, min_key, max_key, min_step, max_step,
                 numbers, count FROM {{db}}.metric_cells)
    GROUP BY run_id, key, c1000
    """,
    # Last: from here on every insert into metrics feeds the cells.
    "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_cells_mv TO {db}.metric_cells AS " + _cells_select(),
)

MIGRATIONS = (*MIGRATIONS, Migration(4, "cheaper insert: packed latest key, cascaded rollup levels",
                                     _CHEAPER_INSERT))


# Migration 5: API tokens (docs/security.md). One row per version of a token; a revoke
# writes a new version with revoked = 1, and readers take the latest (argMax by version).
# Only a SHA-256 of the token's secret is stored: the token itself is shown once, at creation.
_TOKENS = (
    """
    CREATE TABLE IF NOT EXISTS {db}.api_tokens (
        token_id String,
        name String,
        secret_sha256 String,
        scope LowCardinality(String),
        experiment_ids Array(String),
        created_at Int64,
        revoked UInt8,
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY token_id
    """,
)

MIGRATIONS = (*MIGRATIONS, Migration(5, "api_tokens: hashed API tokens and their scopes", _TOKENS))


# Migration 6: experiment tags in their own table. Until now they were rows of `tags`
# under the pseudo run id `experiment:<id>`, which SQL users saw among run tags. They
# move (copied, then deleted from `tags` and its search copy); a rerun copies again
# rows already there with their versions, which ReplacingMergeTree keeps once.
_EXPERIMENT_TAGS = (
    """
    CREATE TABLE IF NOT EXISTS {db}.experiment_tags (
        experiment_id String,
        key String,
        value String,
        deleted UInt8,
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY (experiment_id, key)
    """,
    """
    INSERT INTO {db}.experiment_tags
    SELECT substring(run_id, 12), key, value, deleted, version FROM {db}.tags
    WHERE startsWith(run_id, 'experiment:')
    """,
    "ALTER TABLE {db}.tags DELETE WHERE startsWith(run_id, 'experiment:') SETTINGS mutations_sync = 2",
    "ALTER TABLE {db}.search_tags DELETE WHERE startsWith(run_id, 'experiment:') SETTINGS mutations_sync = 2",
)

MIGRATIONS = (*MIGRATIONS, Migration(6, "experiment_tags: experiment tags out of the run tags table",
                                     _EXPERIMENT_TAGS))


# Migration 7: the SQL sandbox (docs/sql.md). User SQL runs on connections whose current
# database is this one, which holds nothing: the validator admits only trackhouse's
# table names, which the SQL endpoint defines as CTEs over {db}; should a name ever
# slip past the validator it resolves here and fails instead of reading another table.
SANDBOX_SUFFIX = "_sql"


def sandbox_database(db: str) -> str:
    return check_identifier(db) + SANDBOX_SUFFIX


MIGRATIONS = (*MIGRATIONS, Migration(7, "sql sandbox: an empty database for user SQL",
                                     ("CREATE DATABASE IF NOT EXISTS {db}" + SANDBOX_SUFFIX,)))


# Migration 8: the run index (docs/search.md, "The run index"). One row per run with
# everything a filter or an order key can name: the record, and params, tags (not
# deleted) and latest metric values as JSON columns whose paths are `k` + the key's
# UTF-8 bytes in hex (a key is never pasted: every path is [0-9A-F], and a dot in a
# key does not nest), each path stored as its own typed subcolumn. Metric values are
# kept as their Int64 bit pattern (JSON drops NaN and ±inf, and would infer UInt64
# for half of the patterns). Rows are recomputed by the query service's refresher
# (trackhouse.query.runindex) for the runs named in `run_changes`, which views on
# every run-major table fill; `run_index_state` holds the refresher's watermark:
# every change before it is in the index, and searches answer runs changed since
# with the per-key copies.
RUN_CHANGES_TTL_DAYS = 7
_RUN_INDEX_TABLE = f"""
    CREATE TABLE IF NOT EXISTS {{db}}.run_index ({_RECORD_COLUMNS}
        params JSON,
        tags JSON,
        metrics JSON,
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY (start_time, run_id)
    """
_RUN_INDEX_STATE = """
    CREATE TABLE IF NOT EXISTS {db}.run_index_state (
        key String,
        watermark DateTime64(6),
        runs UInt64,
        updated DateTime64(6) DEFAULT now64(6)
    ) ENGINE = ReplacingMergeTree(watermark) ORDER BY key
    """
_RUN_INDEX = (
    f"""
    CREATE TABLE IF NOT EXISTS {{db}}.run_changes (
        changed_at DateTime64(6),
        run_id String
    ) ENGINE = MergeTree ORDER BY changed_at
    TTL toDateTime(changed_at) + INTERVAL {RUN_CHANGES_TTL_DAYS} DAY
    """,
    *(f"""
    CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.run_changes_{source}_mv TO {{db}}.run_changes AS
    SELECT DISTINCT now64(6) AS changed_at, run_id FROM {{db}}.{source}
    """ for source in ("runs", "params", "tags", "latest_metrics")),
    _RUN_INDEX_TABLE,
    _RUN_INDEX_STATE,
)

MIGRATIONS = (*MIGRATIONS, Migration(8, "run_index: one wide row per run, kept by a refresher from run_changes",
                                     _RUN_INDEX))


# Migration 9: the run index's value order (docs/search.md, "Fifth pass"). One row per
# run, metric key and direction, sorted by the order a search ranks them in: a page
# ordered by one metric reads candidates from the best value on and stops once enough
# pass its filter on their run_index rows, instead of reading the metric of every run.
# `value` is the metric value, negated in descending rows, 0 for NaN (`rank` 1 puts NaN
# after every value); `neg_start` is -start_time (the tiebreak: newest first, then
# run_id). Rows are written by the refresher from run_index rows and keep their version:
# a row is current while it carries its run's run_index version. Rows of older versions
# stay until the refresher rebuilds a new generation (a partition) and drops the old;
# `run_order_state` names the generation searches read (merges keep the greatest).
# run_index is made again (the refresher rebuilds it: its state goes too) with granules
# of 1,024 rows and compressed blocks of 4-16 KiB: a search reads a few hundred rows of it
# by primary key (the candidates' check, the page), and each row read decompressed a
# whole block of every column it reads (up to 1 MiB): at 10 M runs the check of 303
# candidates took 227 ms, 53 ms so; a count 378 ms, 431 ms so (docs/search.md, "Fifth pass").
_RUN_ORDER = (
    "DROP TABLE IF EXISTS {db}.run_index_state SYNC",  # first: no watermark vouches for an emptied index
    "DROP TABLE IF EXISTS {db}.run_index SYNC",
    _RUN_INDEX_TABLE.rstrip() + "\n    SETTINGS index_granularity = 1024, min_compress_block_size = 4096, "
    "max_compress_block_size = 16384\n    ",
    _RUN_INDEX_STATE,
    """
    CREATE TABLE IF NOT EXISTS {db}.run_order (
        generation UInt32,
        key String,
        descending UInt8,
        rank UInt8,
        value Float64,
        neg_start Int64,
        run_id String,
        experiment_id LowCardinality(String),
        lifecycle_stage LowCardinality(String),
        version UInt64
    ) ENGINE = MergeTree ORDER BY (key, descending, rank, value, neg_start, run_id)
    PARTITION BY generation SETTINGS index_granularity = 1024
    """,
    """
    CREATE TABLE IF NOT EXISTS {db}.run_order_state (
        key String,
        generation UInt32,
        rows UInt64,
        updated DateTime64(6) DEFAULT now64(6)
    ) ENGINE = ReplacingMergeTree(generation) ORDER BY key
    """,
)

MIGRATIONS = (*MIGRATIONS, Migration(9, "run_order: the run index's rows in metric value order, for early-stop pages",
                                     _RUN_ORDER))


# Migration 10: run_pages (docs/search.md, "Sixth pass"). What a page shows of each run
# — its record, params, tags (not deleted) and latest metrics (value, timestamp, step,
# min, max, count), each sorted by key — in one row per run, kept by the refresher
# with run_index. A page answered from the index reads these rows by run id instead of
# the four run-major tables by run id: at 10 M runs 140-190 ms for params, tags and
# metrics of a page of 100, above the page's whole budget. `page` is all of it as one
# JSON array (runpages.py): each column a read
# touches costs per row read (a granule of it, wherever the row is), so the same lists
# as arrays of tuples (eleven columns) took 52-55 ms for a page, as one column 24-27 ms.
# Granules of 128 rows and 4-16 KiB blocks: a page reads 100 rows spread over the table.
# The refresher's state key changes (runindex.STATE_KEY), so it builds every row again,
# pages with them; a refresher from before keeps its own key's watermark meanwhile.
_RUN_PAGES = (
    """
    CREATE TABLE IF NOT EXISTS {db}.run_pages (
        run_id String,
        page String,
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY run_id
    SETTINGS index_granularity = 128, min_compress_block_size = 4096, max_compress_block_size = 16384
    """,
)

MIGRATIONS = (*MIGRATIONS, Migration(10, "run_pages: what a page shows of each run, one row per run",
                                     _RUN_PAGES))


# Migration 11: run_pages in granules of 32 rows (docs/search.md, "Seventh pass"). A page reads
# 100 rows spread over the table, and each row read decompresses its whole granule of `page`
# (~1.5 KB a run in search_bench): at 10 M runs that read took 38-40 ms in granules of 128 rows,
# 24 ms in granules of 32 and 22 ms in granules of 8 (12 % more on disk). A granularity cannot be
# altered: the table is made again, and the refresher's state key changes (runindex.STATE_KEY), so
# it builds the index, its value order and the pages again; searches use the per-key copies until then.
_RUN_PAGES_32 = (
    "DROP TABLE IF EXISTS {db}.run_pages SYNC",
    _RUN_PAGES[0].replace("index_granularity = 128", "index_granularity = 32"),
)
assert "index_granularity = 32" in _RUN_PAGES_32[1]

MIGRATIONS = (*MIGRATIONS, Migration(11, "run_pages in granules of 32 rows: a page reads 100 rows spread over it",
                                     _RUN_PAGES_32))
