"""Probe for issue 4: one wide row per run (a "run index") against today's search plan.

Not a product path: it measures whether a layout that keeps each run's filterable
state in one row — record fields plus params, tags and latest metric values as
JSON columns, whose paths ClickHouse stores as separate typed subcolumns — answers
the search_bench query set at 10 M runs, and what keeping such rows current costs.
docs/search.md ("A wide run index, probed at 10 M runs") has the figures.

    python loadtests/search_bench.py --runs 10000000 --path P --generate-only
    python loadtests/run_index_probe.py build --path P      # wide_json from the search copies
    python loadtests/run_index_probe.py time --path P       # today's queries vs the wide table
    python loadtests/run_index_probe.py refresh --path P --pattern newest   # or random
    python loadtests/run_index_probe.py lookup --path Q     # by-id lookups, 10 M rows, 3 layouts
    python loadtests/run_index_probe.py value-order --path P  # early stop on a value-ordered copy

`refresh` rewrites the wide rows of 1,000 runs ten times, computed by id from the
run-major source tables (what a background refresher would do), then times the
queries with those parts unmerged and again after OPTIMIZE.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_bench

from trackhouse.query.runindex import key_path
from trackhouse.store import Store, open_store
from trackhouse.store.schema import latest_value

DB = "bench"
WIDE = f"{DB}.wide_json"
FILTER = "metrics.`loss`.:Float64 < 0.5 AND params.`optimizer`.:String = 'adam'"


def _map(table: str, value: str, where: str, kind: str) -> str:
    return (f"SELECT run_id, CAST(mapFromArrays(groupArray(toString(key)), groupArray({value})), "
            f"'Map(String,{kind})') AS m FROM {table} {where} GROUP BY run_id")


def build(store: Store) -> None:
    """wide_json from the search copies (every run), then OPTIMIZE: the merged state."""
    store.command(f"DROP TABLE IF EXISTS {WIDE}")
    store.command(f"""CREATE TABLE {WIDE} (start_time Int64, run_id String, experiment_id LowCardinality(String),
        lifecycle_stage LowCardinality(String), version UInt64, params JSON, tags JSON, metrics JSON)
        ENGINE = ReplacingMergeTree(version) ORDER BY (start_time, run_id)""")
    started = time.monotonic()
    store.command(f"""INSERT INTO {WIDE}
        SELECT r.start_time, r.run_id, r.experiment_id, r.lifecycle_stage, r.version, p.m, t.m, m.m
        FROM (SELECT * FROM {DB}.search_runs FINAL) AS r
        LEFT JOIN ({_map(f'{DB}.search_params', 'value', '', 'String')}) AS p ON p.run_id = r.run_id
        LEFT JOIN ({_map(f'{DB}.search_tags FINAL', 'value', 'WHERE deleted = 0', 'String')}) AS t
            ON t.run_id = r.run_id
        LEFT JOIN ({_map(f'{DB}.search_metrics FINAL', latest_value('last_key'), '', 'Float64')}) AS m
            ON m.run_id = r.run_id
        SETTINGS max_memory_usage = 20000000000, join_algorithm = 'parallel_hash'""")
    built = time.monotonic() - started
    store.command(f"OPTIMIZE TABLE {WIDE} FINAL")
    size = store.query_rows(
        "SELECT formatReadableSize(sum(data_compressed_bytes)), sum(rows) FROM system.parts "
        f"WHERE database = '{DB}' AND table = 'wide_json' AND active")[0]
    print(f"built in {built:.0f} s, optimized in {time.monotonic() - started - built:.0f} s: {size}")


def wide_queries(final: bool) -> dict[str, str]:
    """The search_bench questions on the wide table (ids only: what phase one needs)."""
    w = f"{WIDE}{' FINAL' if final else ''}"
    active = "lifecycle_stage = 'active'"
    return {
        "first_page": f"SELECT run_id FROM {w} WHERE {active} ORDER BY start_time DESC, run_id LIMIT 101",
        "filter_metric_order": f"SELECT run_id FROM {w} WHERE {active} AND {FILTER} "
                               "ORDER BY metrics.`loss`.:Float64, start_time DESC, run_id LIMIT 101",
        "tag_filter": f"SELECT run_id FROM {w} WHERE {active} AND tags.`team`.:String = 'team-3' "
                      "ORDER BY start_time DESC, run_id LIMIT 101",
        "or_filter": f"SELECT run_id FROM {w} WHERE {active} AND (params.`optimizer`.:String = 'sgd' "
                     "OR tags.`stage`.:String = 'prod') ORDER BY isNull(metrics.`accuracy`.:Float64), "
                     "metrics.`accuracy`.:Float64 DESC, start_time DESC, run_id LIMIT 101",
        "count": f"SELECT count() FROM {w} WHERE {active} AND {FILTER}",
    }


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def time_all(store: Store, repeat: int, today: bool = True) -> None:
    """Today's plan (search_bench's queries, hydration included) and the wide table's, interleaved."""
    old = search_bench.queries(store)
    variants: dict[str, dict[str, Callable[[], Any]]] = {}
    for name in wide_queries(True):
        row: dict[str, Callable[[], Any]] = {"today": old[name]} if today else {}
        for final in (True, False):
            sql = wide_queries(final)[name]
            row["wide FINAL" if final else "wide, no FINAL"] = lambda s=sql: store.query_rows(s)
        variants[name] = row
    print(f"load average {os.getloadavg()}", flush=True)
    for name, row in variants.items():
        print(f"{name:20s} " + "   ".join(f"{v}: {_median_ms(fn, repeat):8.1f} ms" for v, fn in row.items()),
              flush=True)
    print(f"load average {os.getloadavg()}", flush=True)
    check = wide_queries(True)
    for name in ("filter_metric_order", "tag_filter"):
        ids = [r.info.run_id for r in old[name]().runs]
        same = ids == [r[0] for r in store.query_rows(check[name])][:len(ids)]
        print(f"{name}: the wide table's page {'equals' if same else 'DIFFERS FROM'} today's", flush=True)


def _refresh_select(ids: list[str]) -> str:
    """The wide rows of `ids`, computed by id from the run-major sources (latest state)."""
    w = "PREWHERE run_id IN (" + ",".join(f"'{i}'" for i in ids) + ")"  # ids read from the store itself
    return f"""
        SELECT r.start_time, r.run_id, r.experiment_id, r.lifecycle_stage, r.v + 1000000000, p.m, t.m, m.m
        FROM (SELECT run_id, argMax(start_time, version) AS start_time, argMax(experiment_id, version)
                  AS experiment_id, argMax(lifecycle_stage, version) AS lifecycle_stage, max(version) AS v
              FROM {DB}.runs {w} GROUP BY run_id) AS r
        LEFT JOIN ({_map(f'{DB}.params', 'value', w, 'String')}) AS p ON p.run_id = r.run_id
        LEFT JOIN ({_map(f'(SELECT run_id, key, argMax(value, version) AS value, argMax(deleted, version) '
                         f'AS deleted FROM {DB}.tags {w} GROUP BY run_id, key)', 'value', 'WHERE deleted = 0',
                         'String')}) AS t ON t.run_id = r.run_id
        LEFT JOIN ({_map(f'(SELECT run_id, key, max(last_key) AS lk FROM {DB}.latest_metrics {w} '
                         'GROUP BY run_id, key)', latest_value('lk'), '', 'Float64')}) AS m ON m.run_id = r.run_id"""


def refresh(store: Store, pattern: str, repeat: int) -> None:
    if pattern == "newest":  # what training updates touch: the runs started last
        pool = [r[0] for r in store.query_rows(
            f"SELECT run_id FROM {DB}.search_runs FINAL ORDER BY start_time DESC LIMIT 1000")]
    else:
        pool = [r[0] for r in store.query_rows(f"SELECT run_id FROM {DB}.runs WHERE rand() % 500 = 0 LIMIT 20000")]
    rng = random.Random(3)
    print(f"load average {os.getloadavg()}", flush=True)
    took = []
    for _ in range(10):
        ids = rng.sample(pool, min(1000, len(pool)))
        started = time.perf_counter()
        store.command(f"INSERT INTO {WIDE} {_refresh_select(ids)}")
        took.append((time.perf_counter() - started) * 1000)
    print(f"refresh of 1,000 {pattern} runs from the sources, 10 times: median {statistics.median(took):.0f} ms, "
          f"all {[round(t) for t in took]}", flush=True)
    for label in ("10 refresh parts unmerged", "after OPTIMIZE FINAL"):
        if label.startswith("after"):
            store.command(f"OPTIMIZE TABLE {WIDE} FINAL")
        sql = wide_queries(True)
        print(f"{label}: " + ", ".join(f"{name} {_median_ms(lambda s=s: store.query_rows(s), repeat):.0f} ms"
                                       for name, s in sql.items()), flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


LOOKUP_LAYOUTS = {
    "granules of 8,192": "",
    "granules of 256": "SETTINGS index_granularity = 256",
    "granules of 256, 4-8 KB blocks": "SETTINGS index_granularity = 256, min_compress_block_size = 4096, "
                                      "max_compress_block_size = 8192",
}


def lookup(store: Store, rows: int) -> None:
    """What looking up random run ids costs in a runs-shaped table of `rows` rows, by layout."""
    tables = {}
    for i, (label, settings) in enumerate(LOOKUP_LAYOUTS.items()):
        table = tables[label] = f"{DB}.lookup_{i}"
        if store.query_rows(f"EXISTS TABLE {table}")[0][0]:
            continue
        store.command(f"""CREATE TABLE {table} (run_id String, experiment_id String, run_name String,
            user_id String, status LowCardinality(String), start_time Int64, end_time Nullable(Int64),
            lifecycle_stage LowCardinality(String), artifact_uri String, version UInt64)
            ENGINE = ReplacingMergeTree(version) ORDER BY run_id {settings}""")
        store.command(f"""INSERT INTO {table} SELECT lower(hex(MD5(toString(number)))), toString(number % 20),
            concat('run-', toString(number)), 'user', 'FINISHED', 1700000000000 + number * 10,
            1700000000000 + number * 10 + 5000, 'active',
            concat('s3://bucket/', lower(hex(MD5(toString(number)))), '/artifacts'), 1 FROM numbers({rows})""")
        store.command(f"OPTIMIZE TABLE {table} FINAL")
    rng = random.Random(1)
    print(f"load average {os.getloadavg()}", flush=True)
    for n in (1, 100, 500):
        for label, table in tables.items():
            ids = [f"'{x[0]}'" for x in store.query_rows(
                f"SELECT lower(hex(MD5(toString(arrayJoin({[rng.randrange(rows) for _ in range(n)]})))))")]
            cells = []
            for cols in ("run_id, lifecycle_stage, experiment_id", "*"):
                sql = f"SELECT {cols} FROM {table} FINAL PREWHERE run_id IN ({','.join(ids)})"
                cells.append(f"{_median_ms(lambda s=sql: store.query_rows(s), 3):7.1f} ms")
            print(f"{n:4d} ids  {label:32s} 3 columns {cells[0]}   all columns {cells[1]}", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


def _value(key: str) -> str:
    return f"reinterpretAsFloat64(metrics.{key_path(key)}.:Int64)"


VALUE_ORDER_CASES = {  # name: (metric, ascending, filter over run_index)
    "filter_metric_order": ("loss", True,
                            f"{_value('loss')} < 0.5 AND params.{key_path('optimizer')}.:String = 'adam'"),
    "or_filter": ("accuracy", False,
                  f"(params.{key_path('optimizer')}.:String = 'sgd' OR tags.{key_path('stage')}.:String = 'prod')"),
}


def _early_stop_page(store: Store, key: str, ascending: bool, where: str, chunk: int) -> tuple[list[str], int]:
    """The first 101 runs passing `where` in `key` order: candidates read from metric_order a chunk
    at a time from the best value on, each verified on its run_index row (the filter, and that its
    value is current). The cursor is the value alone: a probe, not exact for ties."""
    found: list[str] = []
    last, reads, direction = None, 0, "ASC" if ascending else "DESC"
    while len(found) < 101:
        after = "" if last is None else f"AND value {'>' if ascending else '<'} {{last:Float64}}"
        cands = store.query_rows(f"SELECT run_id, start_time, value FROM {DB}.metric_order WHERE key = {{k:String}} "
                                 f"{after} ORDER BY key {direction}, value {direction} LIMIT {chunk}",
                                 {"k": key, "last": last})
        reads += 1
        if not cands:
            break
        last = cands[-1][2]
        ok = dict(store.query_rows(
            f"SELECT run_id, {_value(key)} FROM {DB}.run_index FINAL WHERE start_time IN {{t:Array(Int64)}} "
            f"AND run_id IN {{i:Array(String)}} AND lifecycle_stage = 'active' AND {where}",
            {"t": sorted({c[1] for c in cands}), "i": [c[0] for c in cands]}))
        found += [c[0] for c in cands if ok.get(c[0]) == c[2]]
    return found[:101], reads


def value_order(store: Store, repeat: int) -> None:
    """metric_order (key, value, start_time, run_id), from run_index (build it first: search_bench
    --run-index), then the early-stop page against a scan of the index, for two chunk sizes."""
    store.command(f"DROP TABLE IF EXISTS {DB}.metric_order")
    store.command(f"CREATE TABLE {DB}.metric_order (key LowCardinality(String), value Float64, start_time Int64, "
                  "run_id String) ENGINE = MergeTree ORDER BY (key, value, start_time, run_id) "
                  "SETTINGS index_granularity = 1024")
    started = time.monotonic()
    for key in ("loss", "accuracy"):
        store.maintain(f"INSERT INTO {DB}.metric_order SELECT '{key}', {_value(key)}, start_time, run_id "
                       f"FROM {DB}.run_index FINAL WHERE NOT isNaN(ifNull({_value(key)}, nan))")
    store.command(f"OPTIMIZE TABLE {DB}.metric_order FINAL")
    print(f"metric_order built in {time.monotonic() - started:.0f} s; load average {os.getloadavg()}", flush=True)
    for name, (key, ascending, where) in VALUE_ORDER_CASES.items():
        scan = (f"SELECT run_id FROM {DB}.run_index FINAL WHERE lifecycle_stage = 'active' AND {where} ORDER BY "
                f"isNaN({_value(key)}), {_value(key)} {'ASC' if ascending else 'DESC'}, start_time DESC, run_id "
                "LIMIT 101")
        ref = [r[0] for r in store.query_rows(scan)]
        print(f"{name}: scan of the index {_median_ms(lambda s=scan: store.query_rows(s), repeat):.0f} ms", flush=True)
        for chunk in (300, 1000):
            ids, reads = _early_stop_page(store, key, ascending, where, chunk)
            ms = _median_ms(lambda k=key, a=ascending, w=where, c=chunk: _early_stop_page(store, k, a, w, c), repeat)
            print(f"{name}: early stop, chunks of {chunk}: {ms:.0f} ms, {reads} read(s), "
                  f"{'same runs as' if set(ids) == set(ref) else 'NOT the same runs as'} the scan", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("build", "time", "refresh", "lookup", "value-order"))
    parser.add_argument("--path", required=True, help="a search_bench store (chDB data directory)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pattern", choices=("newest", "random"), default="newest")
    parser.add_argument("--rows", type=int, default=10_000_000, help="lookup: rows per table")
    parser.add_argument("--no-today", action="store_true", help="time the wide table only")
    args = parser.parse_args(argv)
    store = open_store(f"chdb://{args.path}", DB, migrate=args.what != "lookup")
    if args.what == "lookup":
        store.command(f"CREATE DATABASE IF NOT EXISTS {DB}")
    try:
        if args.what == "build":
            build(store)
        elif args.what == "time":
            time_all(store, args.repeat, not args.no_today)
        elif args.what == "lookup":
            lookup(store, args.rows)
        elif args.what == "value-order":
            value_order(store, args.repeat)
        else:
            refresh(store, args.pattern, args.repeat)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
