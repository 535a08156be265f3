"""What logging costs a training loop: ns per value of each logging API, and the slowdown
of a simulated training loop (1 ms steps, 20 metrics a step) with logging against without.

    python loadtests/client_overhead.py                        # starts an embedded server (a separate process)
    python loadtests/client_overhead.py --url 127.0.0.1:50051  # against a running server

The client streams to a real server in another process while the figures are taken,
so the background sender's CPU (encoding, gRPC) is part of what the loop pays. The
step's work is numpy (BLAS releases the GIL, as CUDA launches and waits do); without-
and with-logging trials alternate, and the slowdown is the median of their ratios.
At the end every point is flushed and the acknowledged count checked. Prints a
summary and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import embedded_server

import trackhouse.client as th

KEYS = [f"metric_{k:02d}" for k in range(20)]


def ns_per_value_log(run: th.Run, calls: int) -> float:
    kw = dict.fromkeys(KEYS, 0.5)
    t0 = time.perf_counter()
    for step in range(calls):
        run.log(step=step, **kw)
    return (time.perf_counter() - t0) / (calls * len(KEYS)) * 1e9


def ns_per_value_log_metrics(run: th.Run, calls: int) -> float:
    row = dict.fromkeys(KEYS, 0.5)
    t0 = time.perf_counter()
    for step in range(calls):
        row["metric_00"] = step * 1e-3  # a real loop updates its values
        run.log_metrics(row, step=step)
    return (time.perf_counter() - t0) / (calls * len(KEYS)) * 1e9


def ns_per_value_array(run: th.Run, values: int, chunk: int) -> float:
    steps = np.arange(chunk, dtype=np.int64)
    data = np.random.default_rng(0).random(chunk)
    calls = max(1, values // chunk)
    t0 = time.perf_counter()
    for i in range(calls):
        run.log_array(f"reward_{i % 4}", steps, data)
    return (time.perf_counter() - t0) / (calls * chunk) * 1e9


def _workload(step_ms: float) -> Callable[[], None]:
    """A numpy step calibrated to about ``step_ms`` milliseconds."""
    n = 64
    while True:
        a = np.random.default_rng(1).random((n, n))
        t0 = time.perf_counter()
        for _ in range(20):
            a @ a
        took = (time.perf_counter() - t0) / 20 * 1e3
        if took >= step_ms or n > 2048:
            break
        n = int(n * 1.25)
    reps = max(1, round(step_ms / took))

    def step() -> None:
        for _ in range(reps):
            a @ a

    return step


def step_loop_slowdown(run: th.Run, step_ms: float, steps: int, trials: int) -> tuple[float, float]:
    """(median slowdown %, measured ms per step without logging)."""
    work = _workload(step_ms)
    row = dict.fromkeys(KEYS, 0.0)
    ratios, base = [], []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(steps):
            work()
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for step in range(steps):
            work()
            row["metric_00"] = step
            run.log_metrics(row, step=step)
        logged = time.perf_counter() - t0
        ratios.append(logged / plain - 1)
        base.append(plain / steps * 1e3)
    return statistics.median(ratios) * 100, statistics.median(base)


def bench(address: str, args: argparse.Namespace) -> dict[str, float]:
    client = th.connect(address, settings=th.Settings.from_env(url=address, spool_dir=args.spool_dir))
    run = client.start_run(experiment="bench-client-overhead")
    result = {
        "ns_per_value_log": statistics.median(ns_per_value_log(run, args.calls) for _ in range(3)),
        "ns_per_value_log_metrics": statistics.median(ns_per_value_log_metrics(run, args.calls) for _ in range(3)),
        "ns_per_value_array": statistics.median(
            ns_per_value_array(run, args.array_values, args.chunk) for _ in range(3)
        ),
    }
    result["values_per_s_array"] = 1e9 / result["ns_per_value_array"]
    result["step_loop_slowdown_pct"], result["step_ms"] = step_loop_slowdown(run, 1.0, args.steps, args.trials)
    if not client.flush(timeout=600):
        raise SystemExit("flush did not complete within 600 s")
    stats = client.stats()
    result["points_logged"] = stats["points_logged"]
    result["points_lost"] = stats["points_logged"] - stats["points_acked"]
    run.finish()
    client.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="server address (default: start an embedded server)")
    parser.add_argument("--calls", type=int, default=50_000, help="log / log_metrics calls of 20 values per pass")
    parser.add_argument("--array-values", type=int, default=5_000_000, help="values per log_array pass")
    parser.add_argument("--chunk", type=int, default=100_000, help="values per log_array call")
    parser.add_argument("--steps", type=int, default=2000, help="steps per slowdown trial")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--spool-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trackhouse-bench-spool"))
    args = parser.parse_args()
    if args.url:
        result = bench(args.url, args)
    else:
        with embedded_server() as (address, _pid):
            result = bench(address, args)
    print(f"log(**20 metrics):       {result['ns_per_value_log']:8.0f} ns per value (target <= 2000)")
    print(f"log_metrics(dict of 20): {result['ns_per_value_log_metrics']:8.0f} ns per value")
    print(f"log_array({args.chunk:,} values): {result['ns_per_value_array']:8.2f} ns per value = "
          f"{result['values_per_s_array'] / 1e6:,.0f} M values/s (target >= 50 M)")
    print(f"1 ms step loop ({result['step_ms']:.2f} ms measured), 20 metrics a step: "
          f"{result['step_loop_slowdown_pct']:+.2f} % slowdown (target <= 1 %)")
    print(f"{result['points_logged']:,} points logged, {result['points_lost']:,} not acknowledged")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
