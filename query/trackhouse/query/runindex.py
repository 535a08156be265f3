"""The run index (schema migration 8): one wide row per run, kept current by a refresher.

A row holds a run's record and its params, tags (not deleted) and latest metric
values as JSON columns, each key one typed subcolumn, so a count or a filtered
page reads a few subcolumns of one table instead of joining a set of run ids per
filter term (docs/search.md, "The run index": 0.4-0.6 s for a count at 10 M runs
where the per-key copies take 8-18 s).

Writes never touch it. Views on `runs`, `params`, `tags` and `latest_metrics` note
each changed run in `run_changes` (with the store's time); `RunIndex.refresh`
recomputes the rows of the runs changed since its last watermark from the
run-major tables and then moves the watermark to the pass's start minus `lag`
(inserts still in flight when the pass began are committed by then). So every
change older than the watermark is in the index, and a search reads the index
for runs not changed since and the per-key copies for the few that were:
results stay read-after-write. The first pass builds every row (in chunks, with
progress in the log); until it ends, searches do not use the index. Each later pass
writes the same runs' rows of the index's value order (runorder.py) and of
run_pages (runpages.py) first, so up to the watermark all three are current.

A key becomes the JSON path `k` + its UTF-8 bytes in hex: never pasted as text,
and a dot in a key does not nest. Metric values are stored as their Int64 bit
pattern: JSON drops NaN and ±inf, and infers a type per value otherwise.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from trackhouse.query.filters import ATTRIBUTES, METRICS, PARAMS, And, Binder, Comparison, Node, Or, condition
from trackhouse.query.plan import value_condition
from trackhouse.query.runorder import RunOrder, generation_sql
from trackhouse.query.runpages import PAGE_SETTINGS, PAGES, latest_sql, pages_sql, params_sql, record_sql, tags_sql
from trackhouse.store import Store, StoreError
from trackhouse.store.layout import optimize_final
from trackhouse.store.schema import RUN_CHANGES_TTL_DAYS, check_identifier, latest_value

logger = logging.getLogger(__name__)

INDEX = "run_index"
# The key of the refresher's rows in run_index_state: readers take only theirs, so a
# watermark written by a refresher from before migration 11 (keys "run_index", "run_index@9",
# "run_index@10") never vouches for rows that refresher did not write (migration 9's index,
# the pages of 10 and 11: 11 made run_pages again, empty).
STATE_KEY = "run_index@11"
# Runs per chunk of the first build: bounds the join's memory (maps of this many runs).
BUILD_CHUNK_RUNS = 1_000_000
# Settings of every query that turns maps into JSON (inserts, and reads of `fresh_sql`): string
# values stay strings (the JSON type would otherwise store '2020-01-01' as a Date).
FRESH_SETTINGS = {"input_format_try_infer_dates": 0, "input_format_try_infer_datetimes": 0}
_INSERT_SETTINGS = "SETTINGS " + ", ".join(f"{k} = {v}" for k, v in FRESH_SETTINGS.items())


def key_path(key: str) -> str:
    """The JSON path of a param, tag or metric key: `k` + its UTF-8 bytes in upper-case hex."""
    return "k" + key.encode().hex().upper()


def key_column(entity: str, key: str) -> tuple[str, str]:
    """(expression of one key's value on a run_index row, NULL when the run lacks it; its type)."""
    path = key_path(key)
    if entity == METRICS:
        return f"reinterpretAsFloat64(metrics.{path}.:Int64)", "Float64"
    return f"{'params' if entity == PARAMS else 'tags'}.{path}.:String", "String"


def compile_index_filter(node: Node, binder: Binder) -> str:
    """The filter as a boolean expression over the columns of `run_index` (same semantics as
    `plan.compile_search_filter`: the same conditions on the same values)."""
    if isinstance(node, And | Or):
        joiner = " AND " if isinstance(node, And) else " OR "
        return "(" + joiner.join(compile_index_filter(item, binder) for item in node.items) + ")"
    c: Comparison = node
    if c.entity == ATTRIBUTES:
        return condition(c.key, c, binder)
    return value_condition(c, binder, key_column(c.entity, c.key)[0])


def _map(source: str, value: str, where: str, kind: str) -> str:
    return (f"SELECT run_id, CAST(mapFromArrays(groupArray(concat('k', hex(key))), groupArray({value})), "
            f"'Map(String, {kind})') AS m FROM ({source}) {where} GROUP BY run_id")


def rows_sql(db: str, runs: str, version: str = "toUnixTimestamp64Nano(now64(9))",
             keys: dict[str, str] | None = None) -> str:
    """run_index rows, recomputed from the run-major tables, of the runs meeting `runs` (a
    condition on run_id: our own SQL; values bound by the caller), of `version` (now, in ns).
    `keys`, for a read that needs only some: per map ("params", "tags", "metrics"), a condition
    on `key` (our own SQL, values bound) that keeps the keys it reads; a map it does not name is
    left empty, unread."""
    check_identifier(db)
    w = f"WHERE {runs}"
    sources = {"params": (params_sql, "value", "", "String"),
               "tags": (tags_sql, "value", "WHERE deleted = 0", "String"),
               "metrics": (latest_sql, f"reinterpretAsInt64({latest_value('lk')})", "", "Int64")}
    columns, joins = [], []
    for name, (source, value, where, kind) in sources.items():
        if keys is not None and name not in keys:
            columns.append(f"CAST(map(), 'Map(String, {kind})') AS {name}")
            continue
        only = "" if keys is None else f" AND {keys[name]}"
        columns.append(f"{name[0]}.m AS {name}")
        joins.append(f"LEFT JOIN ({_map(source(db, w + only), value, where, kind)}) AS {name[0]} "
                     f"ON {name[0]}.run_id = r.run_id")
    return (f"SELECT r.start_time AS start_time, r.run_id AS run_id, r.experiment_id AS experiment_id, "
            f"r.run_name AS run_name, r.user_id AS user_id, r.status AS status, r.end_time AS end_time, "
            f"r.lifecycle_stage AS lifecycle_stage, r.artifact_uri AS artifact_uri, {', '.join(columns)}, "
            f"{version} AS version FROM ({record_sql(db, w)}) AS r {' '.join(joins)}")


def fresh_sql(db: str, ids: str, version: str = "toUnixTimestamp64Nano(now64(9))",
              keys: dict[str, str] | None = None) -> str:
    """The current rows of the runs `ids` (a bound array), computed now from the run-major tables
    (a few granules each: run_id leads their keys) with run_index's columns and types, so the
    index's filter and order expressions read them as they read the index (`keys`: only those,
    as `rows_sql` says)."""
    return (f"SELECT * REPLACE (CAST(params, 'JSON') AS params, CAST(tags, 'JSON') AS tags, "
            f"CAST(metrics, 'JSON') AS metrics) FROM ({rows_sql(db, f'run_id IN {ids}', version, keys)})")



def changed_runs_sql(db: str, watermark: str, limit: int) -> str:
    """(run_id, start_time) of up to `limit` runs changed at or after `watermark`."""
    return (f"SELECT run_id, any(start_time) FROM {db}.runs WHERE run_id IN {changed_since(db, watermark)} "
            f"GROUP BY run_id LIMIT {int(limit)}")


def changed_since(db: str, watermark: str) -> str:
    """The subquery of runs changed at or after `watermark` (a bound Int64 of µs since the epoch)."""
    return f"(SELECT run_id FROM {db}.run_changes WHERE changed_at >= fromUnixTimestamp64Micro({watermark}))"


def state_sql(db: str) -> str:
    """(watermark in µs or NULL, whether it is recent enough to use, the generation of run_order
    to read or 0): the index is usable when a pass has finished within the life of `run_changes`
    rows (a day to spare)."""
    return (f"SELECT toUnixTimestamp64Micro(max(watermark)), count() > 0 AND max(watermark) > "
            f"now64(6) - INTERVAL {RUN_CHANGES_TTL_DAYS - 1} DAY, {generation_sql(db)} FROM {db}.run_index_state "
            f"WHERE key = '{STATE_KEY}'")


class RunIndex:
    """Refreshes the run index of one store (blocking calls; `Refresher` runs them on a thread)."""

    def __init__(self, store: Store, lag: float = 10.0, chunk_runs: int = BUILD_CHUNK_RUNS) -> None:
        self._store = store
        self._db = store.database
        self._lag_us = int(lag * 1_000_000)
        self._chunk_runs = chunk_runs
        self._order = RunOrder(store, margin=lag + 60.0)
        self.watermark_us: int | None = None  # the last one this object set (µs since the epoch)

    def state(self) -> tuple[int | None, bool]:
        watermark, usable, _ = self._store.query_rows(state_sql(self._db))[0]
        return (int(watermark) if usable else None), bool(usable)

    def refresh(self) -> int:
        """One pass: recompute the rows of runs changed since the watermark (all rows on the first
        pass, or when the watermark is older than `run_changes` keeps), then move the watermark.
        Returns how many runs it recomputed."""
        db = self._db
        now_us, now_ns, runs_total = self._store.query_rows(
            f"SELECT toUnixTimestamp64Micro(now64(6)), toUnixTimestamp64Nano(now64(9)), "
            f"(SELECT count() FROM {db}.search_runs)")[0]
        watermark, usable = self.state()
        started = time.monotonic()
        build = watermark is None or not usable
        if build:
            done = self._build(int(runs_total))
        else:
            changed = changed_since(db, "{w:Int64}")
            done = int(self._store.query_rows(f"SELECT uniqExact(run_id) FROM {changed}", {"w": watermark})[0][0])
            generation = self._order.state()[0]
            if done:
                # Their value-order rows first (runorder.py), of the version their index rows get:
                # a search keeps a candidate only while its version is its run's in the index. A
                # run written meanwhile is after the watermark this pass sets: searches answer it
                # as changed until the next pass, which writes both again.
                params = {"w": watermark, "v": int(now_ns)}
                if generation:
                    self._order.add(f"({fresh_sql(db, changed, '{v:UInt64}')})", params, generation)
                self._store.maintain(f"INSERT INTO {db}.{PAGES} {pages_sql(db, f'run_id IN {changed}', '{v:UInt64}')} "
                                     f"{PAGE_SETTINGS}", params)
                self._store.maintain(f"INSERT INTO {db}.{INDEX} {rows_sql(db, f'run_id IN {changed}', '{v:UInt64}')} "
                                     f"{_INSERT_SETTINGS}", params)
                self._order.follow(int(now_ns), generation)  # (also from none: a first build elsewhere)
        if build:  # searches read no generation of the index before this build (RunOrder.retract)
            self._order.retract()
        self._store.maintain(f"INSERT INTO {db}.run_index_state (key, watermark, runs) "
                             "VALUES ({k:String}, fromUnixTimestamp64Micro({w:Int64}), {n:UInt64})",
                             {"k": STATE_KEY, "w": int(now_us) - self._lag_us, "n": done})
        self.watermark_us = int(now_us) - self._lag_us
        if done:
            logger.debug("run index: %d runs refreshed in %.2f s", done, time.monotonic() - started)
        # After the watermark: a new generation takes minutes at 10 M runs (build and merge), and
        # searches meanwhile read the current one (or the whole index), not a growing set of changed runs.
        if build:
            try:  # every index row has a new version: a new generation (the next pass retries, not the index)
                self._order.rebuild()
            except StoreError as exc:
                logger.warning("run index: building its value order failed (%s); the next pass retries", exc)
        else:
            self._order.upkeep()
        return done

    def _build(self, runs: int) -> int:
        """Every row, in chunks of about `chunk_runs` runs: ranges of run ids (cut at a sample's
        quantiles), so each chunk reads only its range of every run-major table (run_id leads
        their sorting keys) and the join's memory stays bounded."""
        db, chunks = self._db, max(1, -(-runs // self._chunk_runs))
        sample = self._store.query_rows(
            f"SELECT arraySort(groupArraySample({{n:UInt32}})(run_id)) FROM {db}.runs", {"n": 100 * chunks})[0][0]
        bounds = sorted({sample[len(sample) * i // chunks] for i in range(1, chunks)}) if chunks > 1 else []
        edges: list[str | None] = [None, *bounds, None]
        logger.info("run index: building the rows of %d runs in %d chunk(s); searches use the per-key "
                    "copies until it is done", runs, len(edges) - 1)
        started = time.monotonic()
        for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
            cond = " AND ".join([*(["run_id >= {lo:String}"] if lo is not None else []),
                                 *(["run_id < {hi:String}"] if hi is not None else [])]) or "1"
            for table, sql in ((PAGES, f"{pages_sql(db, cond)} {PAGE_SETTINGS}"),
                               (INDEX, f"{rows_sql(db, cond)} {_INSERT_SETTINGS}")):
                self._store.maintain(f"INSERT INTO {db}.{table} {sql}", {"lo": lo, "hi": hi})
            if len(edges) > 2:
                logger.info("run index: chunk %d/%d built (%.0f s)", i + 1, len(edges) - 1, time.monotonic() - started)
        # One part: FINAL over the chunks' parts cost 2.7x (a count at 10 M: 1,074 ms over 7 parts,
        # 400 ms merged; the merge took 45 s). Background merges leave parts that large alone.
        for table in (PAGES, INDEX):
            try:  # the index is right without it, only slower: never rebuild over a failed merge
                self._store.maintain(optimize_final(self._store.layout, table))
            except StoreError as exc:
                logger.warning("run index: merging the built parts failed (%s: %s); background merges will",
                               table, exc)
        try:  # for the log only: a read timing out here must not throw the build away
            built = int(self._store.query_rows(f"SELECT count() FROM {self._db}.{INDEX} FINAL")[0][0])
        except StoreError:
            built = runs
        logger.info("run index: %d runs built in %.1f s", built, time.monotonic() - started)
        return built


class Refresher:
    """A daemon thread running `RunIndex.refresh` every `interval` seconds until `stop`."""

    def __init__(self, index: RunIndex, interval: float) -> None:
        self._index = index
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = self.failures = self.last_runs = 0
        self.last_seconds = 0.0
        self.first_pass = threading.Event()  # set once a pass has succeeded (the index is built)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trackhouse-run-index", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.last_runs = self._index.refresh()
                self.last_seconds = time.monotonic() - started
                self.passes += 1
                self.first_pass.set()
            except Exception as exc:  # the store away, say: searches fall back, the next pass retries
                self.failures += 1
                logger.warning("run index: refresh failed (%s); retrying in %.0f s", exc, self._interval)
            self._stop.wait(self._interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)



class RunIndexCollector(Collector):
    """The refresher's Prometheus metrics, read from it at scrape time (no store I/O):

        trackhouse_query_run_index_passes_total           refresher passes that succeeded
        trackhouse_query_run_index_failures_total         passes that failed (retried)
        trackhouse_query_run_index_last_pass_runs         runs the last pass recomputed
        trackhouse_query_run_index_last_pass_seconds      how long it took
        trackhouse_query_run_index_watermark_age_seconds  now minus the watermark it set (NaN before)
    """

    def __init__(self, refresher: Refresher, index: RunIndex) -> None:
        self._refresher = refresher
        self._index = index

    def collect(self) -> Iterator[Any]:
        r, name = self._refresher, "trackhouse_query_run_index_"
        yield CounterMetricFamily(name + "passes", "Run index refresher passes that succeeded", value=r.passes)
        yield CounterMetricFamily(name + "failures", "Run index refresher passes that failed", value=r.failures)
        yield GaugeMetricFamily(name + "last_pass_runs", "Runs the last pass recomputed", value=r.last_runs)
        yield GaugeMetricFamily(name + "last_pass_seconds", "Seconds the last pass took", value=r.last_seconds)
        mark = self._index.watermark_us
        age = float("nan") if mark is None else time.time() - mark / 1e6
        yield GaugeMetricFamily(name + "watermark_age_seconds", "Seconds since the run index's watermark",
                                value=age)
