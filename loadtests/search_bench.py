"""Run search, history downsampling and charts at scale, straight against the store.

    python loadtests/search_bench.py --runs 1000000            # generate into a temp dir, then time
    python loadtests/search_bench.py --runs 10000000 --path /data/bench10m --keep
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
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _searchdata as data

from trackhouse.query.downsample import BucketRequest, MetricCharts
from trackhouse.query.search import RunSearch, SearchRequest
from trackhouse.query.settings import QuerySettings
from trackhouse.query.tokens import TokenCodec, fingerprint
from trackhouse.store import Store, open_store

HISTORY_RUN = "history-1m"
CHART_RUNS = [f"chart-{i:03d}" for i in range(100)]
FILTER = "metrics.loss < 0.5 and params.optimizer = 'adam'"


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


def generate(store: Store, runs: int) -> None:
    store.insert_rows("experiments", ("experiment_id", "name", "artifact_location", "lifecycle_stage",
                                      "creation_time", "last_update_time", "version"), data.experiment_rows())
    data.generate(store.insert_arrow, runs)
    for lo in range(0, 1_000_000, 250_000):  # the 1M-point series, in four INSERTs
        t = _points([HISTORY_RUN], "loss", 1_000_000, 1)
        store.insert_arrow("metrics", t.slice(lo, 250_000))
    store.insert_arrow("metrics", _points(CHART_RUNS, "loss", 10_000, 2))


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()  # warm-up: not counted
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1)}


def page_token(store: Store, codec: TokenCodec, page: int, size: int) -> str:
    """The token a client holds after walking `page - 1` pages of the default order."""
    row = store.query_rows(
        f"SELECT start_time, run_id FROM {store.t('search_runs')} FINAL WHERE lifecycle_stage = 'active' "
        f"ORDER BY start_time DESC, run_id LIMIT 1 OFFSET {(page - 1) * size - 1}")[0]
    return codec.encode(fingerprint([], "", (), "ACTIVE_ONLY", size), [row[0], row[1]])


def queries(store: Store) -> dict[str, Callable[[], Any]]:
    codec = TokenCodec(bytes.fromhex(store.meta_value("page_token_secret", lambda: "ab" * 32)))
    settings = QuerySettings()
    search, charts = RunSearch(store, codec, settings), MetricCharts(store, settings)
    runs = store.query_rows(f"SELECT count() FROM {store.t('search_runs')} FINAL WHERE lifecycle_stage = 'active'")
    token = page_token(store, codec, max(2, min(1000, int(runs[0][0]) // 100)), 100)
    return {
        "first_page": lambda: search.search(SearchRequest(max_results=100)),
        "filter_metric_order": lambda: search.search(
            SearchRequest(filter=FILTER, order_by=("metrics.loss ASC",), max_results=100)),
        "tag_filter": lambda: search.search(SearchRequest(filter="tags.team = 'team-3'", max_results=100)),
        "or_filter": lambda: search.search(SearchRequest(
            filter="params.optimizer = 'sgd' OR tags.stage = 'prod'", order_by=("metrics.accuracy DESC",),
            max_results=100)),
        "page_1000": lambda: search.search(SearchRequest(max_results=100, page_token=token)),
        "count": lambda: search.count(SearchRequest(filter=FILTER)),
        "history_1m_to_1000": lambda: charts.buckets(BucketRequest((HISTORY_RUN,), "loss", 1000)),
        "chart_100_runs": lambda: charts.buckets(BucketRequest(tuple(CHART_RUNS), "loss", 1000)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--path", help="chDB data directory (default: a temporary one)")
    parser.add_argument("--no-generate", action="store_true", help="time an already generated store")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="time only these queries")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        path = args.path or str(Path(tmp) / "data")
        store = open_store(f"chdb://{path}", "bench")
        try:
            if not args.no_generate:
                started = time.monotonic()
                generate(store, args.runs)
                print(f"generated {args.runs:,} runs in {time.monotonic() - started:.0f} s", file=sys.stderr)
            results = {}
            for name, fn in queries(store).items():
                if args.only and name not in args.only:
                    continue
                results[name] = timed(fn, args.repeat)
                print(f"{name:22s} p50 {results[name]['p50_ms']:9.1f} ms   p99 {results[name]['p99_ms']:9.1f} ms",
                      flush=True)
        finally:
            store.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
