"""The run index's value order (schema migration 9): pages ordered by one metric, early stop.

A page ordered by a metric over `run_index` reads that metric (and the filter's
columns) for every run before it can keep 100: 1.0-1.4 s at 10 M runs whatever
the page (docs/search.md, "Fourth pass"). `run_order` holds one row per run,
metric key and direction, sorted as a search ranks them (values, then NaN; the
tiebreak newest first, then run_id), so a search reads candidates from the best
value on, a chunk at a time, checks each on its run_index row (the filter, and
that the row is the run's current version) and stops once it has the page
(`RunSearch._ordered_hits`).

The refresher writes the rows of every run_index row it writes, with that row's
version: a run's rows are current while they carry its run_index version, older
ones fail the check. Those stale rows stay until the refresher rebuilds the
table (a new generation, one partition) once it holds `REBUILD_GROWTH` times the
rows it was built with, and drops the older generations.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from trackhouse.store import Store
from trackhouse.store.layout import drop_partition

logger = logging.getLogger(__name__)

ORDER = "run_order"
STATE_KEY = "run_order"
# A generation is rebuilt once it holds this many times the rows it was built with.
REBUILD_GROWTH = 2.0
# Columns of a candidate: what the cursor of the next chunk and the check on run_index need.
CANDIDATE = "run_id, neg_start, version, rank, value"
SORT = "key, descending, rank, value, neg_start, run_id"


def rows_sql(db: str, where: str) -> str:
    """run_order rows of the run_index rows (FINAL) meeting `where`, in the generation bound as
    {g:UInt32}: one per metric key and direction. A metric's path is `k` + the key's hex."""
    return ("SELECT {g:UInt32} AS generation, unhex(substring(kv.1, 2)) AS key, d AS descending, "
            "reinterpretAsFloat64(kv.2) AS v, toUInt8(isNaN(v)) AS rank, "
            "if(isNaN(v), 0., if(d = 1, -v, v) + 0.) AS value, -start_time AS neg_start, run_id, experiment_id, "
            "lifecycle_stage, version FROM (SELECT start_time, run_id, experiment_id, lifecycle_stage, version, "
            f"JSONExtractKeysAndValues(toJSONString(metrics), 'Int64') AS kvs FROM {db}.run_index FINAL "
            f"WHERE {where}) ARRAY JOIN kvs AS kv ARRAY JOIN [0, 1] AS d")


def _insert(db: str, where: str) -> str:
    return (f"INSERT INTO {db}.{ORDER} (generation, key, descending, rank, value, neg_start, run_id, "
            f"experiment_id, lifecycle_stage, version) SELECT generation, key, descending, rank, value, neg_start, "
            f"run_id, experiment_id, lifecycle_stage, version FROM ({rows_sql(db, where)})")


def generation_sql(db: str) -> str:
    """The generation searches read (0: none built yet)."""
    return f"(SELECT max(generation) FROM {db}.run_order_state)"


def candidates_sql(db: str, scope: str, after: str, limit: int) -> str:
    """The next `limit` rows of key {k:String} in direction {d:UInt8} of generation {g:UInt32}
    meeting `scope` (a condition on experiment_id and lifecycle_stage) and `after` (a cursor
    condition, or empty), in the order searches rank them."""
    more = f" AND {after}" if after else ""
    return (f"SELECT {CANDIDATE} FROM {db}.{ORDER} WHERE generation = {{g:UInt32}} AND key = {{k:String}} "
            f"AND descending = {{d:UInt8}} AND {scope}{more} ORDER BY {SORT} LIMIT {int(limit)}")


def after_sql(cursor: tuple[int, float, int, str], bind: Any) -> str:
    """Rows strictly after (rank, value, neg_start, run_id): the first term lets the primary
    key skip the rows before (ties on the value too: 180,560 runs tie at accuracy 1.0 in
    search_bench), the tuple makes it exact."""
    rank, value, neg_start, run_id = cursor
    r, v, n = bind(rank, "UInt8"), bind(value, "Float64"), bind(neg_start, "Int64")
    return (f"(rank > {r} OR (rank = {r} AND value > {v}) OR (rank = {r} AND value = {v} AND neg_start >= {n})) "
            f"AND (rank, value, neg_start, run_id) > ({r}, {v}, {n}, {bind(run_id, 'String')})")


class RunOrder:
    """Keeps `run_order` of one store (called by `RunIndex.refresh`, on the refresher's thread)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._db = store.database

    def state(self) -> tuple[int, int]:
        """(generation searches read, 0 when none; rows it was built with)."""
        generation, rows = self._store.query_rows(
            f"SELECT max(generation), argMax(rows, generation) FROM {self._db}.run_order_state")[0]
        return int(generation), int(rows)

    def add(self, where: str, params: dict[str, Any]) -> None:
        """The rows of the run_index rows meeting `where` (just written), into the generation
        searches read; again into a newer one if a rebuild elsewhere published it meanwhile."""
        generation, rows = self.state()
        if not generation:
            self.rebuild()
            return
        self._store.maintain(_insert(self._db, where), {**params, "g": generation})
        latest, _ = self.state()
        if latest != generation:
            self._store.maintain(_insert(self._db, where), {**params, "g": latest})
        held = int(self._store.query_rows(f"SELECT count() FROM {self._db}.{ORDER} WHERE generation = {{g:UInt32}}",
                                          {"g": latest})[0][0])
        if held > REBUILD_GROWTH * max(rows, 1):
            logger.info("run order: generation %d holds %d rows, built with %d: rebuilding", latest, held, rows)
            self.rebuild()

    def rebuild(self) -> int:
        """A new generation from every run_index row, published, then the older ones dropped.
        Rows another refresher writes into the old generation meanwhile are copied over after
        publishing (every run_index row of a version since the build began)."""
        db, started = self._db, time.monotonic()
        newest, since = self._store.query_rows(
            f"SELECT greatest((SELECT max(generation) FROM {db}.{ORDER}), {generation_sql(db)}), "
            "toUnixTimestamp64Nano(now64(9))")[0]
        generation = int(newest) + 1
        self._store.maintain(_insert(db, "1"), {"g": generation})
        rows = int(self._store.query_rows(f"SELECT count() FROM {db}.{ORDER} WHERE generation = {{g:UInt32}}",
                                          {"g": generation})[0][0])
        self._store.maintain(f"INSERT INTO {db}.run_order_state (key, generation, rows) VALUES "
                             "({k:String}, {g:UInt32}, {n:UInt64})", {"k": STATE_KEY, "g": generation, "n": rows})
        self._store.maintain(_insert(db, "version >= {v:UInt64}"), {"g": generation, "v": int(since)})
        older = self._store.query_rows(f"SELECT groupUniqArray(generation) FROM {db}.{ORDER} "
                                       "WHERE generation < {g:UInt32}", {"g": generation})[0][0]
        for old in older:
            self._store.maintain(drop_partition(self._store.layout, ORDER, int(old)))
        logger.info("run order: generation %d built (%d rows) in %.1f s", generation, rows, time.monotonic() - started)
        return rows
