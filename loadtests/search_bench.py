"""Run search, history downsampling and charts at scale, straight against the store.

    python loadtests/search_bench.py --runs 1000000            # generate into a temp dir, then time
    python loadtests/search_bench.py --runs 10000000 --path /data/bench10m --generate-only
    python loadtests/search_bench.py --path /data/bench10m --no-generate   # time an existing store

Generates N runs (loadtests/_searchdata.py: 8 params, 5 tags, 4 latest metrics
per run) by Arrow bulk insert in chunks of 500k runs with a progress bar, plus one
1,000,000-point series and 100 runs x 10,000 points for the chart. Then times the
fixed query set through the query service's own domain objects (RunSearch,
MetricCharts) on the store opened in this process (chDB: one process per path),
with ClickHouse's defaults (the query condition cache is on, as in production).
Prints p50/p99 per query; the last line is one JSON object keyed by query.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _searchdata as data

from trackhouse.query.downsample import BucketRequest, MetricCharts
from trackhouse.query.runindex import RunIndex
from trackhouse.query.search import RunSearch, SearchRequest
from trackhouse.query.settings import QuerySettings
from trackhouse.query.tokens import TokenCodec, fingerprint
from trackhouse.store import Store, new_version, open_store

HISTORY_RUN = "history-1m"
CHART_RUNS = [f"chart-{i:03d}" for i in range(100)]
FILTER = "metrics.loss < 0.5 and params.optimizer = 'adam'"
OR_FILTER = "params.optimizer = 'sgd' OR tags.stage = 'prod'"

# Views the bench's fast path replaces by writing every copy itself, in key order.
OPTIMIZED = ("runs", "params", "tags", "metrics", "latest_metrics", "search_runs", "search_params", "search_tags",
             "search_metrics", "metric_rollup")
VIEWS = ("search_runs_mv", "search_params_mv", "search_tags_mv", "search_metrics_mv",
         "latest_metrics_mv", "writer_progress_mv",
         *(f"run_changes_{t}_mv" for t in ("runs", "params", "tags", "latest_metrics")))


def _ids(run_ids: pa.Array, rows: np.ndarray[Any, Any]) -> pa.Array:
    """Run ids (fixed 32 characters) at `rows`, gathered as one numpy byte matrix."""
    fixed = np.frombuffer(run_ids.buffers()[2], dtype="S32", count=len(run_ids), offset=32 * run_ids.offset)
    offsets = np.arange(0, 32 * len(rows) + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(rows), pa.py_buffer(offsets), pa.py_buffer(fixed[rows].tobytes()))


def _take(table: pa.Table, rows: np.ndarray[Any, Any], n: int) -> pa.Table:
    """`table` at `rows`; its run_id column (row r is run r % n) by `_ids`, the rest by Arrow."""
    ids = table.column("run_id").chunk(0)[:n]
    rest = [c for c in table.column_names if c != "run_id"]
    taken = table.select(rest).take(pa.array(rows))
    return pa.table({"run_id": _ids(ids, rows % n), **dict(zip(rest, taken.columns, strict=True))}).select(
        table.column_names)


def packed_latest(step: np.ndarray[Any, Any], timestamp: np.ndarray[Any, Any],
                  value: np.ndarray[Any, Any]) -> pa.Array:
    """schema.LATEST_KEY computed in numpy: step ‖ timestamp ‖ value as one little-endian UInt256.

    Arrow has no 256-bit integer; ClickHouse reads a 32-byte fixed binary into UInt256.
    """
    u63 = np.uint64(1 << 63)
    bits = (value + 0.0).view(np.uint64)  # + 0.0: -0.0 and 0.0 are one value
    words = np.zeros((len(step), 4), np.uint64)
    words[:, 0] = np.where(bits >= u63, ~bits, bits | u63)
    words[:, 1] = timestamp.astype(np.int64).view(np.uint64) ^ u63
    words[:, 2] = step.astype(np.int64).view(np.uint64) ^ u63
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(step), [None, pa.py_buffer(words.tobytes())])


def sorted_chunk(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Every table of one chunk (base tables and search copies) sorted by its ORDER BY.

    ClickHouse checks whether an inserted block is already in sorting-key order and
    skips the sort when it is: what made inserts slow was sorting random 32-hex ids,
    and every view sorting the same rows again by another key. Here the run ids are
    sorted once (numpy, fixed-width bytes); every other order is index arithmetic on
    the chunk's layout (long tables are key-major: row i belongs to run i % n) or a
    stable numpy sort of one short value column within one key.
    """
    runs = tables["runs"]
    n = runs.num_rows
    ids = runs.column("run_id").combine_chunks()
    by_id = np.argsort(np.frombuffer(ids.buffers()[2], dtype="S32", count=n, offset=32 * ids.offset), kind="stable")
    start = runs.column("start_time").to_numpy()
    out = {
        "runs": _take(runs, by_id, n),
        "search_runs": _take(runs.select(["start_time", "run_id", "experiment_id", "run_name", "user_id", "status",
                                          "end_time", "lifecycle_stage", "artifact_uri", "version"]),
                             by_id[np.argsort(start[by_id], kind="stable")], n),
    }
    for name in ("params", "tags", "metrics"):
        t = tables[name].combine_chunks()
        keys = t.column("key").to_numpy(zero_copy_only=False)[::n]  # one per block of n rows
        blocks = np.argsort(keys.astype(str), kind="stable") * n  # block offsets in key order
        run_major = (by_id[:, None] + blocks[None, :]).ravel()  # (run_id, key)
        key_major = (blocks[:, None] + by_id[None, :]).ravel()  # (key, run_id)
        out[name] = _take(t, run_major, n)
        if name == "params":  # (key, value, run_id): within each key, a stable sort by value
            values = t.column("value").to_numpy(zero_copy_only=False)
            order = np.concatenate([
                rows[np.argsort(values[rows].astype(bytes), kind="stable")]
                for rows in key_major.reshape(len(blocks), n)])
            out["search_params"] = _take(t.select(["key", "value", "run_id"]), order, n)
        elif name == "tags":
            out["search_tags"] = _take(t.select(["key", "run_id", "value", "deleted", "version"]), key_major, n)
        else:
            last = packed_latest(t.column("step").to_numpy(), t.column("timestamp").to_numpy(),
                                 t.column("value").to_numpy())
            latest = pa.table({"run_id": t.column("run_id"), "key": t.column("key"), "last_key": last,
                               "min_value": t.column("value"), "max_value": t.column("value"),
                               "count": pa.array(np.ones(t.num_rows, np.uint64))})
            out["latest_metrics"] = _take(latest, run_major, n)
            out["search_metrics"] = _take(latest.select(["key", "run_id", "last_key"]), key_major, n)
    return out


def _points(run_ids: list[str], key: str, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    total = n * len(run_ids)
    values = np.cumsum(rng.normal(0, 0.01, total)) + rng.normal(0, 0.05, total)
    values[rng.choice(total, max(1, total // 10_000), replace=False)] *= 100  # spikes
    return pa.table({
        "run_id": pa.array(np.repeat(np.array(run_ids), n)), "key": pa.array(np.full(total, key)),
        "step": pa.array(np.tile(np.arange(n, dtype=np.int64), len(run_ids))),
        "timestamp": pa.array(data.T0 + np.arange(total, dtype=np.int64)),
        "value": pa.array(values), "writer_id": pa.array(np.full(total, "bench")),
        "seq": pa.array(np.ones(total, np.uint64)),
    })


def _check_copies(store: Store) -> None:
    """Each search copy holds what its source holds (fingerprints: count and sum of row hashes)."""
    pairs = [("runs", "search_runs", "run_id, start_time, lifecycle_stage"),
             ("params", "search_params", "run_id, key, value"),
             ("tags", "search_tags", "run_id, key, value, deleted"),
             ("latest_metrics", "search_metrics", "run_id, key, last_key")]
    for source, copy, cols in pairs:
        a, b = (store.query_rows(f"SELECT count(), sum(cityHash64({cols})) FROM {store.t(t)}")[0]
                for t in (source, copy))
        if a != b:
            raise RuntimeError(f"{copy} differs from {source}: {b} != {a}")


def generate(store: Store, runs: int, chunk: int, via_views: bool = False, random_ids: bool = False) -> None:
    """N runs in chunks; by default every table written directly in key order (views detached)."""
    store.insert_rows("experiments", ("experiment_id", "name", "artifact_location", "lifecycle_stage",
                                      "creation_time", "last_update_time", "version"), data.experiment_rows())
    if via_views:  # the production path: base tables only, views write the copies
        data.generate(store.insert_arrow, runs, chunk, random_ids=random_ids)
    else:
        for view in VIEWS:
            store.command(f"DETACH TABLE {store.t(view)}")
        try:
            started = time.monotonic()
            data.progress(0, runs, started)
            for start in range(0, runs, chunk):
                n = min(chunk, runs - start)
                for table, rows in sorted_chunk(data.chunk_tables(start, n, random_ids=random_ids)).items():
                    store.insert_arrow(table, rows)
                data.progress(start + n, runs, started)
            store.insert_rows("writer_progress", ("writer_id", "max_seq"), [("bench", 1)])
        finally:
            for view in VIEWS:
                store.command(f"ATTACH TABLE {store.t(view)}")
        _check_copies(store)
    for lo in range(0, 1_000_000, 250_000):  # the 1M-point series, in four INSERTs
        t = _points([HISTORY_RUN], "loss", 1_000_000, 1)
        store.insert_arrow("metrics", t.slice(lo, 250_000))
    store.insert_arrow("metrics", _points(CHART_RUNS, "loss", 10_000, 2))


def touch_newest(store: Store, n: int) -> None:
    """A tag written on each of the `n` newest runs (one INSERT): they change after the watermark."""
    ids = [r[0] for r in store.query_rows(
        f"SELECT run_id FROM {store.t('search_runs')} FINAL ORDER BY start_time DESC LIMIT {int(n)}")]
    store.insert_rows("tags", ("run_id", "key", "value", "deleted", "version"),
                      [(i, "touched", "1", 0, new_version()) for i in ids])
    print(f"{len(ids):,} newest runs changed since the watermark", file=sys.stderr)


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()  # warm-up: not counted
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1)}


def steps(store: Store, fn: Callable[[], Any], repeat: int) -> list[tuple[float, str]]:
    """(p50 ms, the first words of its SQL) of each store call `fn` makes, in order (`repeat` runs
    of `fn`, calls matched by position: a query whose calls vary between runs shows the first run's)."""
    calls: list[list[tuple[float, str]]] = []
    real = store._execute

    def timed_call(request: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(request)
        finally:
            calls[-1].append(((time.perf_counter() - started) * 1000, " ".join(request.sql.split())[:90]))

    store._execute = timed_call  # type: ignore[method-assign]
    try:
        for _ in range(repeat):
            calls.append([])
            fn()
    finally:
        del store._execute
    first = calls[0]
    return [(float(np.median([c[i][0] for c in calls if len(c) > i])), sql) for i, (_, sql) in enumerate(first)]


def page_token(store: Store, codec: TokenCodec, page: int, size: int) -> str:
    """The token a client holds after walking `page - 1` pages of the default order."""
    row = store.query_rows(
        f"SELECT start_time, run_id FROM {store.t('search_runs')} FINAL WHERE lifecycle_stage = 'active' "
        f"ORDER BY start_time DESC, run_id LIMIT 1 OFFSET {(page - 1) * size - 1}")[0]
    return codec.encode(fingerprint([], "", (), "ACTIVE_ONLY", size), [row[0], row[1]])


def queries(store: Store, run_index: bool = False) -> dict[str, Callable[[], Any]]:
    """The fixed query set; with `run_index`, plus baselines timed in the same run: `count_copies`,
    the count on the per-key copies alone (the plan before the run index), and the two pages
    ordered by one metric read from the whole index (`*_scan`: the plan before run_order), and the
    filtered page with every run read by id (`filter_metric_order_by_id`: before run_pages)."""
    codec = TokenCodec(bytes.fromhex(store.meta_value("page_token_secret", lambda: "ab" * 32)))
    settings = QuerySettings.from_env()  # TRACKHOUSE_QUERY_* as the service reads them
    search, charts = RunSearch(store, codec, settings), MetricCharts(store, settings)
    copies = RunSearch(store, codec, replace(settings, run_index=0))
    scan = RunSearch(store, codec, replace(settings, run_order_max_results=0))
    by_id = RunSearch(store, codec, replace(settings, run_pages=0))
    baseline = {
        "count_copies": lambda: copies.count(SearchRequest(filter=FILTER)),
        "filter_metric_order_scan": lambda: scan.search(
            SearchRequest(filter=FILTER, order_by=("metrics.loss ASC",), max_results=100)),
        "or_filter_scan": lambda: scan.search(SearchRequest(
            filter=OR_FILTER, order_by=("metrics.accuracy DESC",), max_results=100)),
        "filter_metric_order_by_id": lambda: by_id.search(
            SearchRequest(filter=FILTER, order_by=("metrics.loss ASC",), max_results=100)),
    } if run_index else {}
    runs = store.query_rows(f"SELECT count() FROM {store.t('search_runs')} FINAL WHERE lifecycle_stage = 'active'")
    token = page_token(store, codec, max(2, min(1000, int(runs[0][0]) // 100)), 100)
    return {
        "first_page": lambda: search.search(SearchRequest(max_results=100)),
        "filter_metric_order": lambda: search.search(
            SearchRequest(filter=FILTER, order_by=("metrics.loss ASC",), max_results=100)),
        "tag_filter": lambda: search.search(SearchRequest(filter="tags.team = 'team-3'", max_results=100)),
        "or_filter": lambda: search.search(SearchRequest(
            filter=OR_FILTER, order_by=("metrics.accuracy DESC",),
            max_results=100)),
        "page_1000": lambda: search.search(SearchRequest(max_results=100, page_token=token)),
        "count": lambda: search.count(SearchRequest(filter=FILTER)),
        **baseline,
        "history_1m_to_1000": lambda: charts.buckets(BucketRequest((HISTORY_RUN,), "loss", 1000)),
        "chart_100_runs": lambda: charts.buckets(BucketRequest(tuple(CHART_RUNS), "loss", 1000)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--path", help="chDB data directory (default: a temporary one)")
    parser.add_argument("--no-generate", action="store_true", help="time an already generated store")
    parser.add_argument("--chunk", type=int, default=500_000, help="runs per INSERT (default 500k)")
    parser.add_argument("--via-views", action="store_true",
                        help="insert base tables only and let the views write the copies (slow: ~5k runs/s)")
    parser.add_argument("--random-ids", action="store_true",
                        help="random run ids, as MLflow makes them (runs imported with their own ids); by "
                             "default ids as trackhouse mints them, beginning with the start time")
    parser.add_argument("--generate-only", action="store_true", help="generate (use with --path) and stop")
    parser.add_argument("--optimize", action="store_true",
                        help="OPTIMIZE TABLE ... FINAL every table before timing: the steady state after merges")
    parser.add_argument("--run-index", action="store_true",
                        help="build the run index (or refresh it) before timing, and time the count on the "
                             "per-key copies too (count_copies)")
    parser.add_argument("--changed", type=int, default=0,
                        help="with --run-index: write a tag on this many of the newest runs after the index "
                             "is current, so searches answer them from the per-key copies (runs being "
                             "trained); after timing, time the refresher pass that takes them in")
    parser.add_argument("--steps", action="store_true",
                        help="after timing each query, time each of its store calls (p50 of --repeat runs; "
                             "the start of its SQL): where the query's time goes")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="time only these queries")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    for name in ("trackhouse.query.runindex", "trackhouse.query.runorder"):  # the build's progress
        logging.getLogger(name).setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        path = args.path or str(Path(tmp) / "data")
        store = open_store(f"chdb://{path}", "bench")
        try:
            if not args.no_generate:
                started = time.monotonic()
                generate(store, args.runs, args.chunk, args.via_views, args.random_ids)
                elapsed = time.monotonic() - started
                print(f"generated {args.runs:,} runs in {elapsed:.0f} s ({args.runs / elapsed:,.0f} runs/s)",
                      file=sys.stderr)
            results: dict[str, dict[str, float]] = {}
            if args.generate_only:
                return 0
            if args.optimize:
                started = time.monotonic()
                for table in OPTIMIZED:
                    store.command(f"OPTIMIZE TABLE {store.t(table)} FINAL")
                print(f"optimized in {time.monotonic() - started:.0f} s", file=sys.stderr)
            if args.run_index:
                started = time.monotonic()
                done = RunIndex(store, lag=0.0).refresh()
                print(f"run index: {done:,} runs built or refreshed in {time.monotonic() - started:.0f} s",
                      file=sys.stderr)
                if args.optimize:
                    store.command(f"OPTIMIZE TABLE {store.t('run_index')} FINAL")
                if args.changed:
                    touch_newest(store, args.changed)
            print(f"load average {os.getloadavg()} (before timing)", file=sys.stderr)
            for name, fn in queries(store, args.run_index).items():
                if args.only and name not in args.only:
                    continue
                results[name] = timed(fn, args.repeat)
                print(f"{name:22s} p50 {results[name]['p50_ms']:9.1f} ms   p99 {results[name]['p99_ms']:9.1f} ms",
                      flush=True)
                if args.steps:
                    for ms, sql in steps(store, fn, args.repeat):
                        print(f"    {ms:8.1f} ms  {sql}", flush=True)
            if args.run_index and args.changed:
                started = time.monotonic()
                done = RunIndex(store, lag=0.0).refresh()
                print(f"run index: a pass over {done:,} changed runs took {(time.monotonic() - started) * 1000:.0f} ms",
                      file=sys.stderr)
        finally:
            store.close()
    print(f"load average {os.getloadavg()} (after timing)", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
