"""MLflow's tracking server (SQLite) against trackhouse, through MLflow's own client, in one run.

    python loadtests/mlflow_compare.py              # the figures of docs/benchmarks.md
    python loadtests/mlflow_compare.py --runs 10000 --seconds 5   # a quicker look

Starts both servers as subprocesses: `mlflow server` over SQLite with `--workers 1`
(MLflow's best configuration, measured before the project started) and `trackhouse serve` (embedded chDB).
Then, against each, with `MlflowClient` only:

1. log_batch throughput: 4 client processes, each calling log_batch with 1,000
   metrics (10 keys × 100 steps) in a loop for --seconds; points/s over all four.
   All servers run at once and take turns, --rounds times (median reported), so a
   change of load on the shared machine hits each alike.
2. filtered search at --runs runs (default 100,000; each with params optimizer/lr
   and one `loss` point, written straight into each store before the server reads
   them): `metrics.loss < 0.5 and params.optimizer = 'adam'` ordered by
   `metrics.loss ASC`, 100 results. First (cold) call timed; trackhouse also best of 3.
   Both servers must return the same 100 run ids.
3. history of one 100,000-point metric (logged through log_batch):
   get_metric_history, best of 2.

4. the ceiling: the log_batch workload of 1. against loadtests/_null_mlflow.py, a
   server that parses each request and stores nothing. With the four client
   processes on the same cores as the servers, MLflow's client itself bounds
   every server's figure; this one shows where (`--log-only` runs 1. and 4. only).

Prints both sets of figures and the ratios; the last line is one JSON object.
Requires the `loadtests` extra (full `mlflow`, for its server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILTER = "metrics.loss < 0.5 and params.optimizer = 'adam'"
ORDER = ["metrics.loss ASC"]
OPTIMIZERS = ("adam", "sgd", "rmsprop")
BATCH_KEYS, BATCH_STEPS = 10, 100  # 1,000 metrics per log_batch (MLflow's limit)
HISTORY_POINTS = 100_000
T0 = 1_700_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} in {timeout} s")


@contextmanager
def process(cmd: list[str], health: str, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log, "wb") as out:
        # Its own process group: `mlflow server` starts uvicorn and job consumers that outlive a
        # SIGTERM to the parent alone.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            wait_http(health, proc)
            yield
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the data set: the same runs for both stores ------------------------------------------


def dataset(n: int) -> list[tuple[str, str, str, float, int]]:
    """(run_id, optimizer, lr, loss, start_time) per run; seeded, so both stores get the same."""
    rng = random.Random(42)
    return [(uuid.UUID(int=rng.getrandbits(128)).hex, OPTIMIZERS[i % 3], str(rng.choice((0.1, 0.01, 0.001))),
             rng.random(), T0 + i) for i in range(n)]


def fill_sqlite(db: Path, experiment_id: str, rows: list[tuple[str, str, str, float, int]]) -> None:
    """Insert runs, params, metrics and latest_metrics as MLflow's SqlAlchemyStore would hold them."""
    con = sqlite3.connect(db)
    cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in
            ("runs", "params", "metrics", "latest_metrics", "tags")}

    def insert(table: str, values: list[dict[str, Any]]) -> None:
        names = [c for c in cols[table] if c in values[0]]
        con.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [[v[c] for c in names] for v in values])

    insert("runs", [dict(run_uuid=r, name=f"run-{i}", source_type="LOCAL", source_name="", entry_point_name="",
                         user_id="bench", status="FINISHED", start_time=st, end_time=st + 1, source_version="",
                         lifecycle_stage="active", artifact_uri=f"/tmp/a/{r}", experiment_id=int(experiment_id))
                    for i, (r, _, _, _, st) in enumerate(rows)])
    insert("params", [dict(key=k, value=v, run_uuid=r) for r, o, lr, _, _ in rows
                      for k, v in (("optimizer", o), ("lr", lr))])
    metric = [dict(key="loss", value=loss, timestamp=st, step=0, is_nan=False, run_uuid=r)
              for r, _, _, loss, st in rows]
    insert("metrics", metric)
    insert("latest_metrics", metric)
    insert("tags", [dict(key="mlflow.runName", value=f"run-{i}", run_uuid=r) for i, (r, *_) in enumerate(rows)])
    con.commit()
    con.close()


def fill_trackhouse(dsn: str, experiment_id: str, rows: list[tuple[str, str, str, float, int]]) -> None:
    """Insert the same runs into trackhouse's base tables (its views keep the rest). Own process: chDB locks."""
    import numpy as np
    import pyarrow as pa

    from trackhouse.store import ExperimentRecord, new_version, open_store

    store = open_store(dsn)
    try:
        store.put_experiment(ExperimentRecord(experiment_id, "bench-search", "/tmp/a", "active", T0, T0))
        v = new_version()
        store.insert_rows("runs", ("run_id", "experiment_id", "run_name", "user_id", "status", "start_time",
                                   "end_time", "lifecycle_stage", "artifact_uri", "version"),
                          [(r, experiment_id, f"run-{i}", "bench", "FINISHED", st, st + 1, "active", f"/tmp/a/{r}", v)
                           for i, (r, _, _, _, st) in enumerate(rows)])
        store.insert_rows("params", ("run_id", "key", "value"),
                          [(r, k, val) for r, o, lr, _, _ in rows for k, val in (("optimizer", o), ("lr", lr))])
        store.insert_rows("tags", ("run_id", "key", "value", "deleted", "version"),
                          [(r, "mlflow.runName", f"run-{i}", 0, v) for i, (r, *_) in enumerate(rows)])
        n = len(rows)
        store.insert_arrow("metrics", pa.table({
            "run_id": [r[0] for r in rows], "key": ["loss"] * n, "step": np.zeros(n, np.int64),
            "timestamp": np.array([r[4] for r in rows], np.int64), "value": np.array([r[3] for r in rows]),
            "writer_id": ["bench-fill"] * n, "seq": np.ones(n, np.uint64),
        }))
    finally:
        store.close()


# -- workloads, through MlflowClient ------------------------------------------------------


def _log_worker(uri: str, experiment_id: str, seconds: float, barrier: Any, out: Any) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment_id).info.run_id
    keys = [f"m{k}" for k in range(BATCH_KEYS)]

    def batch(call: int) -> list[Any]:
        base = call * BATCH_STEPS
        return [Metric(k, float(s), T0 + base + s, base + s) for s in range(BATCH_STEPS) for k in keys]

    client.log_batch(run_id, metrics=batch(0))  # warm: connection, caches
    barrier.wait()
    calls, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        calls += 1
        client.log_batch(run_id, metrics=batch(calls))
    out.put((calls * BATCH_KEYS * BATCH_STEPS, time.perf_counter() - started, calls, time.process_time() - cpu))


def log_throughput(uri: str, experiment_id: str, seconds: float, clients: int = 4) -> tuple[float, float]:
    """(points/s over all clients, client CPU ms per 1,000-metric call: building it, sending it)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_log_worker, args=(uri, experiment_id, seconds, barrier, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    rate = sum(r[0] for r in results) / max(r[1] for r in results)
    return rate, 1000 * sum(r[3] for r in results) / max(1, sum(r[2] for r in results))


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def log_rounds(uris: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """log_batch throughput of every server, in interleaved rounds: a change of load hits all alike."""
    from mlflow import MlflowClient

    experiments = {name: MlflowClient(tracking_uri=uri).create_experiment(f"bench-log-{uuid.uuid4().hex[:6]}")
                   for name, uri in uris.items()}
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in uris}
    for r in range(args.rounds):
        for name, uri in uris.items():
            print(f"[{name}] log_batch from 4 processes for {args.seconds} s (round {r + 1}/{args.rounds}) …",
                  file=sys.stderr, flush=True)
            rounds[name].append(log_throughput(uri, experiments[name], args.seconds))
    return {name: {"log_batch_points_per_s": statistics.median(rate for rate, _ in got),
                   "log_batch_rounds": [round(rate) for rate, _ in got],
                   "client_cpu_ms_per_call": statistics.median(cpu for _, cpu in got)}
            for name, got in rounds.items()}


def questions(name: str, uri: str, search_experiment: str, args: argparse.Namespace) -> dict[str, Any]:
    """The filtered search and the metric history, through MlflowClient."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    print(f"[{name}] filtered search at {args.runs:,} runs …", file=sys.stderr, flush=True)

    def search() -> list[str]:
        runs = client.search_runs([search_experiment], FILTER, order_by=ORDER, max_results=100)
        return [r.info.run_id for r in runs]

    first, ids = timed(search)
    repeats = [timed(search)[0] for _ in range(args.search_repeats)]

    print(f"[{name}] history of a {HISTORY_POINTS:,}-point metric …", file=sys.stderr, flush=True)
    run_id = client.create_run(search_experiment).info.run_id
    for start in range(0, HISTORY_POINTS, 1000):
        client.log_batch(run_id, metrics=[Metric("hist", i * 0.5, T0 + i, i) for i in range(start, start + 1000)])
    history = []
    for _ in range(2):
        seconds, points = timed(lambda: client.get_metric_history(run_id, "hist"))
        assert len(points) == HISTORY_POINTS, (name, len(points))
        history.append(seconds)
    return {"search_first_s": first, "search_best_s": min([first, *repeats]), "search_ids": ids,
            "history_s": min(history)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [] if args.log_only else dataset(args.runs)
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-compare-"))
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "1800", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    os.environ.update(env)
    uris = {name: f"http://127.0.0.1:{free_port()}" for name in ("mlflow", "trackhouse", "null_server")}
    ports = {name: uri.rsplit(":", 1)[1] for name, uri in uris.items()}
    try:
        with contextlib.ExitStack() as servers:
            # MLflow: its server creates the schema; the runs go straight into SQLite.
            db = tmp / "mlflow.db"
            servers.enter_context(process(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                 "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1",
                 "--port", ports["mlflow"], "--workers", "1"],
                f"{uris['mlflow']}/health", tmp / "mlflow.log"))
            from mlflow import MlflowClient

            mlflow_experiment = MlflowClient(tracking_uri=uris["mlflow"]).create_experiment("bench-search")
            # trackhouse: fill the store in its own process first (one chDB process per path), then serve it.
            dsn = f"chdb://{tmp / 'trackhouse'}"
            if not args.log_only:
                print(f"[mlflow] writing {args.runs:,} runs into SQLite …", file=sys.stderr, flush=True)
                fill_sqlite(db, mlflow_experiment, rows)
                print(f"[trackhouse] writing {args.runs:,} runs into the store …", file=sys.stderr, flush=True)
                filler = mp.get_context("spawn").Process(target=fill_trackhouse, args=(dsn, "4242", rows))
                filler.start()
                filler.join()
            servers.enter_context(process(
                [sys.executable, "-m", "trackhouse.cli.main", "serve", "--store", dsn, "--grpc-port", "0",
                 "--http-port", ports["trackhouse"]], f"{uris['trackhouse']}/health", tmp / "trackhouse.log"))
            servers.enter_context(process(
                [sys.executable, str(Path(__file__).resolve().parent / "_null_mlflow.py"), ports["null_server"]],
                f"{uris['null_server']}/health", tmp / "null.log"))
            results = log_rounds(uris, args)
            if not args.log_only:
                results["mlflow"].update(questions("mlflow", uris["mlflow"], mlflow_experiment, args))
                results["trackhouse"].update(questions("trackhouse", uris["trackhouse"], "4242", args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m, t, c = results["mlflow"], results["trackhouse"], results["null_server"]
    ratio = {"log_batch": t["log_batch_points_per_s"] / m["log_batch_points_per_s"],
             # The most any server could show through MlflowClient on this machine.
             "log_batch_ceiling": c["log_batch_points_per_s"] / m["log_batch_points_per_s"]}
    if not args.log_only:
        ratio.update(search_first=m["search_first_s"] / t["search_first_s"],
                     search_best=m["search_best_s"] / t["search_best_s"], history=m["history_s"] / t["history_s"])
    return {
        "runs": args.runs, "seconds": args.seconds, "rounds": args.rounds, "log_only": args.log_only,
        "search_results_agree": None if args.log_only else m.pop("search_ids") == t.pop("search_ids"),
        "mlflow": m, "trackhouse": t, "null_server": c, "ratio": ratio,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": {"nproc": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                 * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs for the filtered search (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="log_batch round length (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="log_batch rounds per server, interleaved; the median is reported (default %(default)s)")
    parser.add_argument("--search-repeats", type=int, default=2, help="extra search calls after the first")
    parser.add_argument("--log-only", action="store_true",
                        help="only the log_batch phase (no search data, no history): a quick throughput look")
    args = parser.parse_args()
    r = run(args)
    m, t, c, ratio = r["mlflow"], r["trackhouse"], r["null_server"], r["ratio"]
    print(f"\nMLflow drop-in, {r['runs']:,} runs, MlflowClient against each server "
          f"(nproc {r['machine']['nproc']}, {r['machine']['mem_gib']} GiB, load average {r['load_average']})")
    print(f"{'':34}{'mlflow (sqlite)':>18}{'trackhouse':>14}{'ratio':>9}")
    print(f"{'log_batch, 4 processes (points/s)':34}{m['log_batch_points_per_s']:>18,.0f}"
          f"{t['log_batch_points_per_s']:>14,.0f}{ratio['log_batch']:>8.1f}×")
    print(f"{'  client CPU per call (ms)':34}{m['client_cpu_ms_per_call']:>18.1f}{t['client_cpu_ms_per_call']:>14.1f}")
    print(f"{'  null server (ceiling, points/s)':34}{c['log_batch_points_per_s']:>32,.0f}"
          f"{ratio['log_batch_ceiling']:>8.1f}×   client CPU per call {c['client_cpu_ms_per_call']:.1f} ms")
    if args.log_only:
        print(json.dumps(r))
        return
    print(f"{'filtered search, first call (s)':34}{m['search_first_s']:>18.3f}{t['search_first_s']:>14.3f}"
          f"{ratio['search_first']:>8.1f}×")
    print(f"{'filtered search, best (s)':34}{m['search_best_s']:>18.3f}{t['search_best_s']:>14.3f}"
          f"{ratio['search_best']:>8.1f}×")
    print(f"{'history, 100k points (s)':34}{m['history_s']:>18.3f}{t['history_s']:>14.3f}{ratio['history']:>8.1f}×")
    print(f"search results agree: {r['search_results_agree']}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
