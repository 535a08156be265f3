"""The run index's value order (schema migration 9): pages ordered by one metric, early stop.

A page ordered by a metric over `run_index` reads that metric (and the filter's
columns) for every run before it can keep 100: 1.0-1.4 s at 10 M runs whatever
the page (docs/search.md, "Fourth pass"). `run_order` holds one row per run,
metric key and direction, sorted as a search ranks them (values, then NaN; the
tiebreak newest first, then run_id), so a search reads candidates from the best
value on, a chunk at a time, checks each on its run_index row (the filter, and
that the row is the run's current version) and stops once it has the page
(`RunSearch._ordered_hits`).

The refresher writes a run's rows just before its run_index row, with the same
version: a run's rows are current while they carry its run_index version, older
ones fail the check. Those stale rows stay until the refresher rebuilds the
table (a new generation, one partition) once it holds `REBUILD_GROWTH` times the
rows it was built with, and drops the older generations DROP_GRACE_SECONDS later
(a search reads the generation it started with to the end).

A search that meets a row of an older version skips it when the run's current row
sorts outside what it has read, and answers the run from rows computed now when that
place was read without it (a pass concurrent with the search). A build of the whole
index retracts the current generation before its watermark (`retract`): searches read
the index whole until a generation of the new rows is built. A pass copies its rows
into a generation another refresher published while it wrote (`follow`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from trackhouse.store import Store, StoreError
from trackhouse.store.layout import drop_partition, optimize_final
from trackhouse.store.schema import check_identifier

logger = logging.getLogger(__name__)

ORDER = "run_order"
STATE_KEY = "run_order"
# A build of the whole index writes the generation it makes stale under this key (`retract`):
# searches read no generation up to it. (Readers from before it take max(generation) of every
# key, so they go on reading that generation, as they did.)
RETRACTED_KEY = "run_order_retracted"
# A generation is rebuilt once it holds this many times the rows it was built with.
REBUILD_GROWTH = 2.0
# Older generations are dropped this long after a newer one is published: a search that read
# the older one's number just before reads it to the end (longer than max_query_seconds).
DROP_GRACE_SECONDS = 120.0
# Columns of a candidate: what the cursor of the next chunk and the check on run_index need.
CANDIDATE = "run_id, neg_start, version, rank, value"
SORT = "key, descending, rank, value, neg_start, run_id"


def index_rows(db: str, where: str) -> str:
    """The run_index rows (FINAL) meeting `where`, as a source for `rows_sql`."""
    check_identifier(db)
    return f"{db}.run_index FINAL WHERE {where}"


def rows_sql(source: str) -> str:
    """run_order rows, in the generation bound as {g:UInt32}, of the rows of `source` (run_index
    rows, or rows computed as run_index rows: `index_rows`, `runindex.fresh_sql`): one per metric
    key and direction. A metric's path is `k` + the key's hex."""
    return ("SELECT {g:UInt32} AS generation, unhex(substring(kv.1, 2)) AS key, d AS descending, "
            "reinterpretAsFloat64(kv.2) AS v, toUInt8(isNaN(v)) AS rank, "
            "if(isNaN(v), 0., if(d = 1, -v, v) + 0.) AS value, -start_time AS neg_start, run_id, experiment_id, "
            "lifecycle_stage, version FROM (SELECT start_time, run_id, experiment_id, lifecycle_stage, version, "
            f"JSONExtractKeysAndValues(toJSONString(metrics), 'Int64') AS kvs FROM {source}) "
            "ARRAY JOIN kvs AS kv ARRAY JOIN [0, 1] AS d")


def _insert(db: str, source: str) -> str:
    return (f"INSERT INTO {db}.{ORDER} (generation, key, descending, rank, value, neg_start, run_id, "
            f"experiment_id, lifecycle_stage, version) SELECT generation, key, descending, rank, value, neg_start, "
            f"run_id, experiment_id, lifecycle_stage, version FROM ({rows_sql(source)})")


def generation_sql(db: str) -> str:
    """The generation searches read: 0 when none is built yet, or when the newest one is retracted
    (`RunOrder.retract`: the index was built again and no generation is of it yet)."""
    built = f"maxIf(generation, key = '{STATE_KEY}')"
    return (f"(SELECT if({built} > maxIf(generation, key = '{RETRACTED_KEY}'), {built}, 0) "
            f"FROM {db}.run_order_state)")


def candidates_sql(db: str, scope: str, after: str, limit: int) -> str:
    """The next `limit` rows of key {k:String} in direction {d:UInt8} of generation {g:UInt32}
    meeting `scope` (a condition on experiment_id and lifecycle_stage) and `after` (a cursor
    condition, or empty), in the order searches rank them."""
    more = f" AND {after}" if after else ""
    return (f"SELECT {CANDIDATE} FROM {db}.{ORDER} WHERE generation = {{g:UInt32}} AND key = {{k:String}} "
            f"AND descending = {{d:UInt8}} AND {scope}{more} ORDER BY {SORT} LIMIT {int(limit)}")


def after_sqls(cursor: tuple[int, float, int, str], bind: Any, first_of_value: bool) -> list[str]:
    """Conditions for the rows strictly after (rank, value, neg_start, run_id), to read one after
    the other (each from where the previous ends) until a chunk is full. Each is a range the
    primary key finds by binary search; one condition for them all (the rank, value and neg_start
    terms OR-ed) made ClickHouse's key analysis an exclusion search over every granule of the
    generation: ~25 ms at 10 M runs before a row was read (docs/search.md, "Seventh pass").
    `first_of_value`: the row before the cursor had another value, so few rows tie with it and
    the rest of its value is read from the value's first row, with the rows after it, in one
    read; otherwise (in a tie, or not known: a page token) the tie is read from the cursor's
    neg_start on (180,560 runs tie at accuracy 1.0 in search_bench), then the values after it.
    NaN rows (rank 1) come last."""
    rank, value, neg_start, run_id = cursor
    r, v, n, i = bind(rank, "UInt8"), bind(value, "Float64"), bind(neg_start, "Int64"), bind(run_id, "String")
    nans = [f"rank > {r}"] if rank == 0 else []
    if first_of_value:
        return [f"rank = {r} AND value >= {v} AND (rank, value, neg_start, run_id) > ({r}, {v}, {n}, {i})", *nans]
    tie = f"rank = {r} AND value = {v} AND neg_start >= {n} AND (neg_start, run_id) > ({n}, {i})"
    return [tie, f"rank = {r} AND value > {v}", *nans] if rank == 0 else [tie]


class RunOrder:
    """Keeps `run_order` of one store (called by `RunIndex.refresh`, on the refresher's thread)."""

    def __init__(self, store: Store, margin: float = 60.0) -> None:
        self._store = store
        self._db = store.database
        # How far before a rebuild's start its catch-up copies versions from (see `rebuild`).
        self._margin_ns = int(margin * 1e9)
        self._retired: dict[int, float] = {}  # older generation -> when it may be dropped (monotonic)
        self._looked = False  # for older generations left by an earlier process (`upkeep`)

    def state(self) -> tuple[int, int]:
        """(generation searches read, 0 when none; rows it was built with)."""
        generation, rows = self._store.query_rows(
            f"SELECT maxIf(generation, key = {{k:String}}), argMaxIf(rows, generation, key = {{k:String}}) "
            f"FROM {self._db}.run_order_state", {"k": STATE_KEY})[0]
        return int(generation), int(rows)

    def add(self, source: str, params: dict[str, Any], generation: int) -> None:
        """The rows of `source` (run_index rows about to be written, with their version) into
        `generation`; again into a newer one if a rebuild elsewhere published it meanwhile."""
        self._store.maintain(_insert(self._db, source), {**params, "g": generation})
        latest, _ = self.state()
        if latest != generation:
            self._store.maintain(_insert(self._db, source), {**params, "g": latest})

    def follow(self, version: int, generation: int) -> None:
        """After a pass wrote its run_index rows (of `version`), whose run_order rows went into
        `generation` (`add`): when a rebuild elsewhere published a newer one meanwhile, its
        catch-up may have copied run_index before those rows were there; copy them now (rows
        it did copy are left alone)."""
        latest, _ = self.state()
        if latest > generation:  # (without FINAL: the rows of this version are this pass's)
            source = (f"{self._db}.run_index WHERE version = {{v:UInt64}} AND (run_id, version) NOT IN (SELECT "
                      f"run_id, version FROM {self._db}.{ORDER} WHERE generation = {{g:UInt32}} AND version = "
                      "{v:UInt64})")
            self._store.maintain(_insert(self._db, source), {"v": version, "g": latest})

    def retract(self) -> None:
        """Before the watermark of an index built again is written: no generation is read until
        one is built from the new rows (`rebuild`). The current one is of the index before: a
        run changed between its last pass and the build has no row of its current version there,
        and is not among the changed runs (its change is before the new watermark)."""
        generation, _ = self.state()
        if generation:
            self._store.maintain(f"INSERT INTO {self._db}.run_order_state (key, generation, rows) VALUES "
                                 "({k:String}, {g:UInt32}, 0)", {"k": RETRACTED_KEY, "g": generation})
            logger.info("run order: generation %d retracted until one is built from the new index", generation)

    def upkeep(self) -> None:
        """Build the first generation, or a new one once the current one holds REBUILD_GROWTH
        times the rows it was built with (stale rows) or after `retract`; drop retired
        generations (`tidy`)."""
        generation, rows = self.state()
        held = 0
        if generation:
            held = int(self._store.query_rows(f"SELECT count() FROM {self._db}.{ORDER} WHERE generation = "
                                              "{g:UInt32}", {"g": generation})[0][0])
        retracted = generation and self._store.query_rows(
            f"SELECT maxIf(generation, key = {{r:String}}) >= {{g:UInt32}} FROM {self._db}.run_order_state",
            {"r": RETRACTED_KEY, "g": generation})[0][0]
        if not generation or retracted or held > REBUILD_GROWTH * max(rows, 1):
            if generation:
                logger.info("run order: generation %d holds %d rows, built with %d: rebuilding", generation, held,
                            rows)
            self.rebuild()
        elif not self._looked:  # once per process: generations an earlier one retired but did not drop
            self._retire(generation)
        self._looked = True
        self.tidy()

    def _retire(self, generation: int) -> None:
        """Every generation older than `generation` is dropped DROP_GRACE_SECONDS from now."""
        older = self._store.query_rows(f"SELECT groupUniqArray(generation) FROM {self._db}.{ORDER} "
                                       "WHERE generation < {g:UInt32}", {"g": generation})[0][0]
        due = time.monotonic() + DROP_GRACE_SECONDS
        self._retired.update({int(old): min(due, self._retired.get(int(old), due)) for old in older})

    def tidy(self, now: float | None = None) -> None:
        """Drop the older generations whose grace has passed (each refresher pass calls this)."""
        now = time.monotonic() if now is None else now
        for old, due in sorted(self._retired.items()):
            if due <= now:
                self._store.maintain(drop_partition(self._store.layout, ORDER, old))
                del self._retired[old]

    def rebuild(self) -> int:
        """A new generation from every run_index row, published; the older ones are dropped by
        `tidy` DROP_GRACE_SECONDS later. Rows another refresher writes into an old generation
        meanwhile are copied over after publishing: every run_index row of a version since
        the build began, less `margin` (a version is taken when its insert starts; it commits
        later, and a cluster's clocks differ), that the build did not take."""
        db, started = self._db, time.monotonic()
        newest, since = self._store.query_rows(
            f"SELECT greatest((SELECT max(generation) FROM {db}.{ORDER}), (SELECT max(generation) FROM "
            f"{db}.run_order_state)), toUnixTimestamp64Nano(now64(9))")[0]
        generation = int(newest) + 1
        self._store.maintain(_insert(db, index_rows(db, "1")), {"g": generation})
        try:  # one part before searches read it: the build leaves dozens (at 10 M runs 40; candidates
            # took 94 ms while they merged, 16 ms merged). Right without it, only slower.
            self._store.maintain(optimize_final(self._store.layout, ORDER, generation))
        except StoreError as exc:
            logger.warning("run order: merging generation %d failed (%s); background merges will", generation, exc)
        rows = int(self._store.query_rows(f"SELECT count() FROM {db}.{ORDER} WHERE generation = {{g:UInt32}}",
                                          {"g": generation})[0][0])
        self._store.maintain(f"INSERT INTO {db}.run_order_state (key, generation, rows) VALUES "
                             "({k:String}, {g:UInt32}, {n:UInt64})", {"k": STATE_KEY, "g": generation, "n": rows})
        self._store.maintain(_insert(db, index_rows(db, "version >= {v:UInt64} AND (run_id, version) NOT IN (SELECT "
                                                 f"run_id, version FROM {db}.{ORDER} WHERE generation = {{g:UInt32}} "
                                                 "AND version >= {v:UInt64})")),
                             {"g": generation, "v": max(0, int(since) - self._margin_ns)})
        self._retire(generation)
        logger.info("run order: generation %d built (%d rows) in %.1f s", generation, rows, time.monotonic() - started)
        return rows
