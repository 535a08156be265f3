"""The same questions asked of a real `mlflow server` (SQLite, one worker: its best configuration).

    pip install -e ".[loadtests]"
    python loadtests/mlflow_baseline.py search --runs 100000 --repeat 3

Subcommands (one per benchmark family; `ingest` may follow):

- `search`: creates N runs (8 params, 5 tags, 4 metrics, as loadtests/_searchdata.py)
  through MlflowClient.log_batch, then times the search_bench query set where
  MLflow has an equivalent (first page, filter + metric order, tag filter, page
  1000 via page tokens, history of one long series). MLflow has no OR filter,
  no count and no server-side downsampling: those keys are absent. Last line:
  one JSON object keyed by query, like search_bench.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _searchdata as data
from search_bench import timed


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


def _seed(client: Any, exp: str, runs: int) -> None:
    from mlflow.entities import Metric, Param, RunTag

    tables = data.chunk_tables(0, runs)
    params, tags, metrics = (tables[t].to_pylist() for t in ("params", "tags", "metrics"))
    by_run: dict[str, dict[str, list[Any]]] = {}
    for row in params:
        by_run.setdefault(row["run_id"], {"p": [], "t": [], "m": []})["p"].append(Param(row["key"], row["value"]))
    for row in tags:
        by_run[row["run_id"]]["t"].append(RunTag(row["key"], row["value"]))
    for row in metrics:
        by_run[row["run_id"]]["m"].append(Metric(row["key"], row["value"], row["timestamp"], row["step"]))
    started = time.monotonic()
    done = 0

    def one(parts: dict[str, list[Any]]) -> None:
        run = client.create_run(exp)
        client.log_batch(run.info.run_id, metrics=parts["m"], params=parts["p"], tags=parts["t"])

    # A few clients at once: the server's best seeding rate (MEASURED.md: 4 clients ~2x one).
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(one, by_run.values()):
            done += 1
            if done % 250 == 0:
                data.progress(done, runs, started)
    data.progress(runs, runs, started)


def search(args: argparse.Namespace) -> dict[str, Any]:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="mlflow-baseline-") as tmp:
        proc, url = _start(tmp)
        try:
            client = MlflowClient(url)
            exp = client.create_experiment("bench")
            _seed(client, exp, args.runs)
            long_run = client.create_run(exp).info.run_id
            values = np.random.default_rng(1).normal(size=args.history_points)
            for lo in range(0, args.history_points, 1000):
                client.log_batch(long_run, metrics=[Metric("loss", float(v), data.T0 + lo + j, lo + j)
                                                    for j, v in enumerate(values[lo : lo + 1000])])
            pages: list[str] = []
            token = None
            for _ in range(min(999, args.runs // 100 - 1)):
                token = client.search_runs([exp], max_results=100, page_token=token).token
                pages.append(token)
            questions: dict[str, Callable[[], Any]] = {
                "first_page": lambda: client.search_runs([exp], max_results=100),
                "filter_metric_order": lambda: client.search_runs(
                    [exp], "metrics.loss < 0.5 and params.optimizer = 'adam'", order_by=["metrics.loss ASC"],
                    max_results=100),
                "tag_filter": lambda: client.search_runs([exp], "tags.team = 'team-3'", max_results=100),
                "page_1000": lambda: client.search_runs([exp], max_results=100, page_token=pages[-1]),
                "history_full": lambda: client.get_metric_history(long_run, "loss"),
            }
            return {name: timed(fn, args.repeat) for name, fn in questions.items()}
        finally:
            _stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="the search_bench query set against mlflow server")
    s.add_argument("--runs", type=int, default=100_000)
    s.add_argument("--history-points", type=int, default=100_000)
    s.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    results = search(args)
    for name, r in results.items():
        print(f"{name:22s} p50 {r['p50_ms']:9.1f} ms   p99 {r['p99_ms']:9.1f} ms")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
