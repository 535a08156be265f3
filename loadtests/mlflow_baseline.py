"""The search_bench query set asked of a real `mlflow server` (SQLite, one worker: its best configuration).

    pip install -e ".[loadtests]"
    python loadtests/mlflow_baseline.py compare --runs 100000 --repeat 3   # both stores, one run
    python loadtests/mlflow_baseline.py search --runs 100000 --repeat 3    # MLflow only

Subcommands:

- `search`: writes N runs (loadtests/_searchdata.py `chunk_tables`: the same run
  ids, 8 params, 5 tags, 4 latest metrics and start times as search_bench) plus one
  long `loss` series straight into the SQLite database of an `mlflow server`
  (the server creates the schema; the rows are inserted as its SqlAlchemyStore
  holds them: seeding through the server runs at ~4 runs/s). Then times, through
  MlflowClient, the queries MLflow has an equivalent for: first page, filter +
  metric order, tag filter, the last full page (`page_1000`) by page token, and
  get_metric_history of the long series. MLflow has no OR filter, no count and no
  server-side downsampling: those keys are absent.
- `compare`: `search`, then (server stopped) search_bench.generate of the same N
  runs into a temporary trackhouse store and search_bench's query set on it, plus
  the raw history of a series as long as MLflow's (`history_raw`, paged as
  MLflow's client pages). Checks that both stores return the same run ids for the
  pages both answer, prints a side-by-side table with ratios (MLflow p50 /
  trackhouse p50), and as its last line one JSON object.

Timing is search_bench.timed on both sides: one warm-up call, then --repeat calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _searchdata as data
from search_bench import FILTER, timed

ORDER = "metrics.loss ASC"
TAG_FILTER = "tags.team = 'team-3'"
HISTORY_RUN = "0" * 31 + "1"  # MLflow's long series lives in its own experiment, outside the searches
TH_HISTORY_RUN = "history-raw"
# Queries whose pages both stores answer: their run ids must agree.
SHARED = ("first_page", "filter_metric_order", "tag_filter", "page_1000")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
         "--default-artifact-root", f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: uvicorn and huey workers end with it
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):  # up to 5 min: a loaded machine starts it slowly
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    _stop(proc)
    raise RuntimeError("mlflow server did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server and every worker it started (its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _mlflow_server(tmp: str) -> Iterator[str]:
    proc, url = _start(tmp)
    try:
        yield url
    finally:
        _stop(proc)


# -- seeding MLflow's SQLite database directly ----------------------------------------------


class _Sqlite:
    """INSERTs into MLflow's tables, by column name, checked against PRAGMA table_info."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self.cols = {t: {r[1]: r for r in con.execute(f"PRAGMA table_info({t})")}
                     for t in ("runs", "params", "tags", "metrics", "latest_metrics")}

    def insert(self, table: str, columns: dict[str, list[Any]]) -> None:
        names = list(columns)
        unknown = [c for c in names if c not in self.cols[table]]
        # NOT NULL without a default (PRAGMA: notnull=3, dflt_value=4) and not in the primary key's rowid.
        missing = [c for c, r in self.cols[table].items() if r[3] and r[4] is None and c not in columns]
        if unknown or missing:
            raise RuntimeError(f"{table}: columns {unknown} unknown, {missing} required by this MLflow's schema")
        self.con.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                             zip(*columns.values(), strict=True))


def _col(table: pa.Table, name: str) -> list[Any]:
    values: list[Any] = table.column(name).to_pylist()
    return values


def _seed_chunk(db: _Sqlite, tables: dict[str, pa.Table], experiments: list[str]) -> None:
    """One chunk of _searchdata runs, as SqlAlchemyStore.create_run + log_batch (+ delete_run) leave them."""
    runs = tables["runs"]
    n = runs.num_rows
    ids, start, end = _col(runs, "run_id"), _col(runs, "start_time"), _col(runs, "end_time")
    stage = _col(runs, "lifecycle_stage")
    names = _col(runs, "run_name")
    db.insert("runs", {
        "run_uuid": ids, "name": names, "source_type": ["UNKNOWN"] * n, "source_name": [""] * n,
        "entry_point_name": [""] * n, "user_id": _col(runs, "user_id"), "status": _col(runs, "status"),
        "start_time": start, "end_time": end,
        "deleted_time": [e or s if g == "deleted" else None for s, e, g in zip(start, end, stage, strict=True)],
        "source_version": [""] * n, "lifecycle_stage": stage, "artifact_uri": _col(runs, "artifact_uri"),
        "experiment_id": [int(experiments[int(e)]) for e in _col(runs, "experiment_id")],
    })
    for name in ("params", "tags"):
        t = tables[name]
        db.insert(name, {"key": _col(t, "key"), "value": _col(t, "value"), "run_uuid": _col(t, "run_id")})
    # create_run adds the run name as a tag too.
    db.insert("tags", {"key": ["mlflow.runName"] * n, "value": names, "run_uuid": ids})
    m = tables["metrics"]  # one point per (run, key): it is also the latest
    metric = {"key": _col(m, "key"), "value": _col(m, "value"), "timestamp": _col(m, "timestamp"),
              "step": _col(m, "step"), "is_nan": [False] * m.num_rows, "run_uuid": _col(m, "run_id")}
    db.insert("metrics", metric)
    db.insert("latest_metrics", metric)


def history_values(points: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(1).normal(size=points)


def seed_sqlite(path: str, experiments: list[str], history_experiment: str, runs: int, history_points: int,
                chunk: int) -> None:
    """`runs` runs in chunks of `chunk`: chunk_tables seeds by chunk start, so the same chunk size
    as trackhouse's generation is what makes the same runs."""
    con = sqlite3.connect(path, timeout=60)
    try:
        db = _Sqlite(con)
        started = time.monotonic()
        data.progress(0, runs, started)
        for lo in range(0, runs, chunk):
            n = min(chunk, runs - lo)
            _seed_chunk(db, data.chunk_tables(lo, n), experiments)
            data.progress(lo + n, runs, started)
        v = history_values(history_points)
        db.insert("runs", {
            "run_uuid": [HISTORY_RUN], "name": ["history"], "source_type": ["UNKNOWN"], "source_name": [""],
            "entry_point_name": [""], "user_id": ["bench"], "status": ["FINISHED"], "start_time": [data.T0],
            "end_time": [data.T0 + history_points], "source_version": [""], "lifecycle_stage": ["active"],
            "artifact_uri": ["s3://bucket/history"], "experiment_id": [int(history_experiment)]})
        db.insert("tags", {"key": ["mlflow.runName"], "value": ["history"], "run_uuid": [HISTORY_RUN]})
        steps = list(range(history_points))
        db.insert("metrics", {"key": ["loss"] * history_points, "value": v.tolist(),
                              "timestamp": [data.T0 + s for s in steps], "step": steps,
                              "is_nan": [False] * history_points, "run_uuid": [HISTORY_RUN] * history_points})
        db.insert("latest_metrics", {"key": ["loss"], "value": [float(v[-1])], "timestamp": [data.T0 + steps[-1]],
                                     "step": [steps[-1]], "is_nan": [False], "run_uuid": [HISTORY_RUN]})
        con.commit()
    finally:
        con.close()


# -- timing ------------------------------------------------------------------------------------


def last_page(active: int, size: int = 100) -> int:
    """search_bench's `page_1000`: page 1000, or the last full page when there are fewer."""
    return max(2, min(1000, active // size))


def _time_all(questions: dict[str, Callable[[], Any]], repeat: int, side: str) -> dict[str, dict[str, float]]:
    results = {}
    for name, fn in questions.items():
        results[name] = timed(fn, repeat)
        print(f"[{side}] {name:22s} p50 {results[name]['p50_ms']:10.1f} ms   p99 {results[name]['p99_ms']:10.1f} ms"
              f"   (load {_load()})", file=sys.stderr, flush=True)
    return results


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _keeping(pages: dict[str, list[str]], name: str, fn: Callable[[], list[str]]) -> Callable[[], None]:
    """`fn`, keeping the run ids of its last call (for the cross-store check)."""
    def call() -> None:
        pages[name] = fn()
    return call


def mlflow_side(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, list[str]], dict[str, Any]]:
    from mlflow.tracking import MlflowClient
    from mlflow.utils.search_utils import SearchUtils

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "3600")  # one filtered search can take minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    info: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="mlflow-baseline-") as tmp, _mlflow_server(tmp) as url:
        client = MlflowClient(url)
        exps = [client.create_experiment(f"bench-{e}") for e in range(data.EXPERIMENTS)]
        history_exp = client.create_experiment("history")
        print(f"[mlflow] writing {args.runs:,} runs into SQLite …", file=sys.stderr, flush=True)
        started = time.monotonic()
        seed_sqlite(f"{tmp}/mlflow.db", exps, history_exp, args.runs, args.history_points, args.chunk)
        info["seed_s"] = round(time.monotonic() - started, 1)
        with sqlite3.connect(f"{tmp}/mlflow.db") as con:
            active = con.execute("SELECT count(*) FROM runs WHERE lifecycle_stage = 'active' AND experiment_id IN "
                                 f"({','.join(exps)})").fetchone()[0]
            info["db_mb"] = round(os.path.getsize(f"{tmp}/mlflow.db") / 2**20)
        page = last_page(active)
        info.update(active_runs=active, page=page)
        # MLflow's page token is the offset, encoded: what a client holds after page - 1 pages.
        token = SearchUtils.create_page_token((page - 1) * 100)  # type: ignore[no-untyped-call]

        def ids(filter_string: str = "", order_by: list[str] | None = None, page_token: Any = None) -> list[str]:
            runs = client.search_runs(exps, filter_string, max_results=100, order_by=order_by, page_token=page_token)
            return [str(r.info.run_id) for r in runs]

        def history() -> list[str]:
            points = client.get_metric_history(HISTORY_RUN, "loss")
            if len(points) != args.history_points:
                raise RuntimeError(f"MLflow returned {len(points)} of {args.history_points} points")
            return []

        pages: dict[str, list[str]] = {}
        questions = {
            "first_page": _keeping(pages, "first_page", lambda: ids()),
            "filter_metric_order": _keeping(pages, "filter_metric_order", lambda: ids(FILTER, order_by=[ORDER])),
            "tag_filter": _keeping(pages, "tag_filter", lambda: ids(TAG_FILTER)),
            "page_1000": _keeping(pages, "page_1000", lambda: ids(page_token=token)),
            "history_full": _keeping(pages, "history", history),
        }
        print(f"[mlflow] seeded in {info['seed_s']} s; timing (load {_load()}) …", file=sys.stderr, flush=True)
        results = _time_all(questions, args.mlflow_repeat or args.repeat, "mlflow")
    info["load_after"] = os.getloadavg()
    return results, pages, info


def trackhouse_side(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, list[str]],
                                                       dict[str, Any]]:
    import search_bench as sb

    from trackhouse.query.history import HistoryRequest, MetricHistory
    from trackhouse.query.search import RunSearch, SearchRequest
    from trackhouse.query.settings import QuerySettings
    from trackhouse.query.tokens import TokenCodec
    from trackhouse.store import open_store

    info: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        store = open_store(f"chdb://{tmp}/data", "bench")
        try:
            started = time.monotonic()
            # Through the views (the production insert path): search_bench's direct fast path still
            # writes latest_metrics' pre-migration-4 `last` column and fails on this schema.
            sb.generate(store, args.runs, args.chunk, via_views=True)
            # A series as long as MLflow's, for raw history like for like; its run is deleted, so no search sees it.
            store.insert_rows("runs", ("run_id", "experiment_id", "run_name", "user_id", "status", "start_time",
                                       "end_time", "lifecycle_stage", "artifact_uri", "version"),
                              [(TH_HISTORY_RUN, "0", "history", "bench", "FINISHED", data.T0, data.T0,
                                "deleted", "s3://bucket/history", 1)])
            store.insert_arrow("metrics", pa.table({
                "run_id": [TH_HISTORY_RUN] * args.history_points, "key": ["loss"] * args.history_points,
                "step": np.arange(args.history_points, dtype=np.int64),
                "timestamp": data.T0 + np.arange(args.history_points, dtype=np.int64),
                "value": history_values(args.history_points), "writer_id": ["bench"] * args.history_points,
                "seq": np.ones(args.history_points, np.uint64)}))
            info["generate_s"] = round(time.monotonic() - started, 1)
            questions = sb.queries(store)
            codec = TokenCodec(bytes.fromhex(store.meta_value("page_token_secret", lambda: "ab" * 32)))
            settings = QuerySettings()
            search, history = RunSearch(store, codec, settings), MetricHistory(store, codec, settings)
            active = store.query_rows(
                f"SELECT count() FROM {store.t('search_runs')} FINAL WHERE lifecycle_stage = 'active'")[0][0]
            page = last_page(int(active))
            info.update(active_runs=int(active), page=page)
            page_token = sb.page_token(store, codec, page, 100)

            def ids(req: SearchRequest) -> list[str]:
                return [r.info.run_id for r in search.search(req).runs]

            def raw_history() -> list[str]:
                # Pages of settings.history_page (25,000) points, as MLflow's client pages.
                token, n = "", 0
                while True:
                    p = history.page(HistoryRequest(TH_HISTORY_RUN, "loss", page_token=token))
                    n += len(p.steps)
                    token = p.next_page_token
                    if not token:
                        break
                if n != args.history_points:
                    raise RuntimeError(f"trackhouse returned {n} of {args.history_points} points")
                return []

            pages: dict[str, list[str]] = {}
            shared = {
                "first_page": SearchRequest(max_results=100),
                "filter_metric_order": SearchRequest(filter=FILTER, order_by=(ORDER,), max_results=100),
                "tag_filter": SearchRequest(filter=TAG_FILTER, max_results=100),
                "page_1000": SearchRequest(max_results=100, page_token=page_token),
            }
            for name, req in shared.items():  # the same questions as search_bench.queries, keeping the ids
                questions[name] = _keeping(pages, name, lambda req=req: ids(req))  # type: ignore[misc]
            questions["history_raw"] = raw_history
            print(f"[trackhouse] generated in {info['generate_s']} s; timing (load {_load()}) …", file=sys.stderr,
                  flush=True)
            results = _time_all(questions, args.repeat, "trackhouse")
        finally:
            store.close()
    info["load_after"] = os.getloadavg()
    return results, pages, info


# -- report ------------------------------------------------------------------------------------

# (row label, MLflow key, trackhouse key): a None key is a question that side cannot answer.
ROWS = [
    ("first page, 100 runs", "first_page", "first_page"),
    ("filter + metric order", "filter_metric_order", "filter_metric_order"),
    ("tag filter", "tag_filter", "tag_filter"),
    ("OR filter + metric order", None, "or_filter"),
    ("page 1000 (last full page)", "page_1000", "page_1000"),
    ("count of filter matches", None, "count"),
    ("raw history (MLflow: get_metric_history)", "history_full", "history_raw"),
    ("history: MLflow raw vs 1 M → 1,000 buckets", "history_full", "history_1m_to_1000"),
    ("chart, 100 runs × 10k points", None, "chart_100_runs"),
]


def _ratios(m: dict[str, dict[str, float]], t: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for _, mk, tk in ROWS:
        if mk and tk and mk in m and tk in t:
            key = mk if mk == tk else f"{mk}/{tk}"
            out[key] = round(m[mk]["p50_ms"] / max(t[tk]["p50_ms"], 1e-3), 1)
    return out


def _cell(r: dict[str, dict[str, float]], key: str | None) -> str:
    if key is None or key not in r:
        return "(no equivalent)"
    return f"{r[key]['p50_ms']:,.1f} ms (p99 {r[key]['p99_ms']:,.1f})"


def print_table(report: dict[str, Any]) -> None:
    m, t = report["mlflow"], report["trackhouse"]
    print(f"\n{report['runs']:,} runs; p50 (p99) of {report['repeat']['mlflow']} (MLflow) / "
          f"{report['repeat']['trackhouse']} (trackhouse) calls after one warm-up; ratio = MLflow p50 / trackhouse p50")
    print(f"{'query':44}{'MLflow (SQLite, 1 worker)':>32}{'trackhouse (chDB)':>30}{'ratio':>10}")
    for label, mk, tk in ROWS:
        ratio = ""
        if mk and tk and mk in m and tk in t:
            ratio = f"{m[mk]['p50_ms'] / max(t[tk]['p50_ms'], 1e-3):,.1f}×"
        print(f"{label:44}{_cell(m, mk):>32}{_cell(t, tk):>30}{ratio:>10}")
    print(f"same run ids: {report['same_pages']}")


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return {"nproc": os.cpu_count(), "mem_gib": round(mem["MemTotal"] / 2**20, 1),
            "mem_available_gib": round(mem["MemAvailable"] / 2**20, 1)}


def _rounded(info: dict[str, Any]) -> dict[str, Any]:
    return {k: [round(x, 2) for x in v] if isinstance(v, tuple) else v for k, v in info.items()}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host = machine()
    m, m_pages, m_info = mlflow_side(args)
    t, t_pages, t_info = trackhouse_side(args)
    same = {name: m_pages.get(name) == t_pages.get(name) for name in SHARED}
    for name in SHARED:
        if not same[name]:
            a, b = m_pages.get(name) or [], t_pages.get(name) or []
            print(f"{name}: the pages differ: {len(set(a) & set(b))} of {len(a)} ids in common; first ids "
                  f"{a[:3]} vs {b[:3]}", file=sys.stderr)
    return {"runs": args.runs, "history_points": args.history_points, "mlflow": m, "trackhouse": t,
            "ratio": _ratios(m, t), "same_pages": same,
            "repeat": {"mlflow": args.mlflow_repeat or args.repeat, "trackhouse": args.repeat},
            "machine": {**host, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "mlflow": _rounded(m_info), "trackhouse": _rounded(t_info)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("search", "the search_bench query set against mlflow server"),
                        ("compare", "MLflow, then trackhouse, on the same runs: side-by-side table and ratios")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--runs", type=int, default=100_000)
        s.add_argument("--history-points", type=int, default=100_000)
        s.add_argument("--repeat", type=int, default=3, help="timed calls per query after one warm-up")
        s.add_argument("--mlflow-repeat", type=int, default=0, help="MLflow's calls, when not --repeat")
        s.add_argument("--chunk", type=int, default=500_000,
                       help="runs per generated chunk, both stores (the data depend on it)")
    args = parser.parse_args(argv)
    if args.command == "search":
        results, _, info = mlflow_side(args)
        print(json.dumps({**results, "machine": {**machine(), **_rounded(info)}}))
        return 0
    report = compare(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
