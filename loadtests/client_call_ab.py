"""The cost of one ``run.log_metrics`` of 20 values right after a training step (caches cold),
with this checkout's ``Batcher`` against the ``batcher.py`` of another checkout, interleaved
call by call in one process so that machine load hits both alike.

    git archive OLD_COMMIT | tar -x -C /tmp/old
    python loadtests/client_call_ab.py --old /tmp/old/client/trackhouse/client/batcher.py
    python loadtests/client_call_ab.py --old ... --work 0      # warm: calls back to back

Both sides use this checkout's ``Run``; only the buffer it appends to differs. Each
sample is the thread CPU time of one call (``time.thread_time_ns``) minus the median
of the same clock reads around nothing, after ``--work`` 128x128 matrix products
(about 1 ms on one BLAS thread). No server, the sender idle. Prints medians and
percentiles, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported: one BLAS thread

import numpy as np

import trackhouse.client as th
from trackhouse.client.run import Run

KEYS = [f"metric_{k:02d}" for k in range(20)]


def _load_batcher(path: str) -> object:
    spec = importlib.util.spec_from_file_location("old_batcher", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_batcher"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old", required=True, help="path of the other checkout's client/trackhouse/client/batcher.py")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--work", type=int, default=6, help="128x128 matrix products before each call (0: warm)")
    args = parser.parse_args()
    old = _load_batcher(args.old)
    spool = Path(os.environ.get("TMPDIR", "/tmp")) / "trackhouse-call-ab"
    client = th.Client(th.MemoryTransport(), th.Settings(flush_interval=600.0, max_batch_points=10**9,
                                                         memory_budget=2**34, spool_dir=str(spool),
                                                         replay_orphans=False))
    new_run = client.start_run(experiment="call-ab")
    new_batcher, old_batcher = client._batcher, old.Batcher(10**9)  # type: ignore[attr-defined]
    client._batcher = old_batcher
    old_run = Run(client, new_run.run_id, new_run.experiment_id, "old")
    client._batcher = new_batcher
    a = np.random.default_rng(1).random((128, 128))
    out = np.empty_like(a)
    row = dict.fromkeys(KEYS, 0.5)
    calls: dict[str, Callable[[int], None]] = {
        "empty": lambda step: None,
        "old": lambda step: old_run.log_metrics(row, step=step),
        "new": lambda step: new_run.log_metrics(row, step=step),
    }
    samples: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.thread_time_ns
    for step in range(args.calls):
        for name, call in calls.items() if step % 2 else reversed(calls.items()):
            for _ in range(args.work):
                np.matmul(a, a, out=out)
            row["metric_00"] = step * 1e-3
            t0 = clock()
            call(step)
            samples[name].append(clock() - t0)
        if step % 500 == 499:
            new_batcher.discard()
            old_batcher.discard()
    empty = statistics.median(samples["empty"])
    result: dict[str, object] = {"work": args.work, "calls": args.calls, "clock_reads_ns": empty}
    for name in ("old", "new"):
        v = sorted(samples[name])
        result[f"{name}_us_per_call"] = round((statistics.median(v) - empty) / 1e3, 2)
        result[f"{name}_p10_us"] = round((v[len(v) // 10] - empty) / 1e3, 2)
        print(f"{name}: {result[f'{name}_us_per_call']:.2f} us per call of 20 values (median; "
              f"p10 {result[f'{name}_p10_us']:.2f})")
    result["machine"] = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    new_batcher.discard()
    logging.getLogger("trackhouse").setLevel(logging.ERROR)  # else close() reports the discarded points
    client.close(timeout=1.0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
