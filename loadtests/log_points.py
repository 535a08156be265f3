"""How fast the Python client logs points into a trackhouse server, end to end.

    python loadtests/log_points.py                       # starts an embedded server itself
    python loadtests/log_points.py --url 127.0.0.1:50051 # against `make run`

Logs --points points (default 1,000,000) into one run with --keys metric keys per
step through `run.log_metrics`, then waits until every point is acknowledged
(durable), then checks the store holds exactly that many. Prints a summary and,
as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import embedded_server, rss_mb

import trackhouse.client as th


def bench(address: str, points: int, keys: int) -> dict[str, float]:
    client = th.connect(address)
    run = client.start_run(experiment="bench-log-points", name=f"{points} points")
    names = [f"metric_{k}" for k in range(keys)]
    steps = points // keys
    row = dict.fromkeys(names, 0.0)
    t0 = time.perf_counter()
    for step in range(steps):
        for name in names:
            row[name] = step * 0.001
        run.log_metrics(row, step=step)
        if step % max(1, steps // 10) == 0:
            print(f"\r  logged {step * keys:>10,} / {steps * keys:,} points", end="", file=sys.stderr, flush=True)
    t_logged = time.perf_counter()
    if not run.flush(timeout=600):
        raise SystemExit("flush did not complete within 600 s")
    t_acked = time.perf_counter()
    print(file=sys.stderr)
    stored = sum(int(m) for m in _counts(client, run.run_id, names))
    run.finish()
    client.close()
    total = steps * keys
    return {
        "points": total,
        "log_calls_points_per_s": total / (t_logged - t0),
        "end_to_end_points_per_s": total / (t_acked - t0),
        "ns_per_value_log_metrics": (t_logged - t0) / total * 1e9,
        "stored": stored,
        "lost": total - stored,
    }


def _counts(client: th.Client, run_id: str, names: list[str]) -> list[int]:
    return [client.metric_history(run_id, name).num_rows for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="server address (default: start an embedded server)")
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10)
    args = parser.parse_args()
    if args.url:
        result = bench(args.url, args.points, args.keys)
    else:
        with embedded_server() as (address, pid):
            result = bench(address, args.points, args.keys)
            result["server_rss_mb"] = rss_mb(pid)
    print(f"logged {result['points']:,} points: log calls {result['log_calls_points_per_s']:,.0f} points/s, "
          f"end to end (acknowledged) {result['end_to_end_points_per_s']:,.0f} points/s, "
          f"stored {result['stored']:,}, lost {result['lost']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
