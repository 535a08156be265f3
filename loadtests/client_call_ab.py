"""The cost of one ``run.log_metrics`` of 20 values right after a training step (caches cold),
with this checkout's client against another checkout's, interleaved call by call in one
process so that machine load hits both alike.

    git archive OLD_COMMIT | tar -x -C /tmp/old
    python loadtests/client_call_ab.py --old /tmp/old/client
    python loadtests/client_call_ab.py --old /tmp/old/client --work 0      # warm: calls back to back

The other checkout's ``trackhouse.client`` package is imported under its own module
objects (``--old`` is its source root, the directory holding ``trackhouse/client``), so
each side runs its own ``Run`` and buffer over its own ``MemoryTransport``. Each sample
is the thread CPU time of one call (``time.thread_time_ns``) minus the median of the same
clock reads around nothing, after ``--work`` 128x128 matrix products (about 0.15 ms each
on one BLAS thread). ``--fresh``: every value a new float object each call, as a loop
that computes its metrics makes. No server, the sender idle. Prints medians and
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
from types import ModuleType
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported: one BLAS thread

import numpy as np

import trackhouse.client as th

KEYS = [f"metric_{k:02d}" for k in range(20)]


def _import_client(root: str) -> ModuleType:
    """``trackhouse.client`` from the source root ``root``, as module objects of its own: this
    checkout's stay in ``sys.modules``, the other's keep working through their own references."""
    ours = {name: mod for name, mod in sys.modules.items() if name.startswith("trackhouse.client")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        other = importlib.import_module("trackhouse.client")
    finally:
        sys.path.remove(root)
        for name in [n for n in sys.modules if n.startswith("trackhouse.client")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return other


def _client(api: Any, spool: Path) -> tuple[Any, Any]:
    client = api.Client(api.MemoryTransport(), api.Settings(flush_interval=600.0, max_batch_points=10**9,
                                                            memory_budget=2**34, spool_dir=str(spool),
                                                            replay_orphans=False))
    return client, client.start_run(experiment="call-ab")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old", required=True, help="the other checkout's client root (holds trackhouse/client)")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--work", type=int, default=6, help="128x128 matrix products before each call (0: warm)")
    parser.add_argument("--fresh", action="store_true", help="new float objects for every value of every call")
    args = parser.parse_args()
    old = _import_client(str(Path(args.old).resolve()))
    assert old.Run is not th.Run
    spool = Path(os.environ.get("TMPDIR", "/tmp")) / "trackhouse-call-ab"
    old_client, old_run = _client(old, spool)
    new_client, new_run = _client(th, spool)
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
            if args.fresh:
                for i, key in enumerate(KEYS):
                    row[key] = step * 1e-3 + i
            else:
                row["metric_00"] = step * 1e-3
            t0 = clock()
            call(step)
            samples[name].append(clock() - t0)
        if step % 500 == 499:
            new_client._batcher.discard()
            old_client._batcher.discard()
    empty = statistics.median(samples["empty"])
    result: dict[str, object] = {"work": args.work, "fresh": args.fresh, "calls": args.calls, "clock_reads_ns": empty}
    for name in ("old", "new"):
        v = sorted(samples[name])
        result[f"{name}_us_per_call"] = round((statistics.median(v) - empty) / 1e3, 2)
        result[f"{name}_p10_us"] = round((v[len(v) // 10] - empty) / 1e3, 2)
        print(f"{name}: {result[f'{name}_us_per_call']:.2f} us per call of 20 values (median; "
              f"p10 {result[f'{name}_p10_us']:.2f})")
    result["machine"] = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    logging.getLogger("trackhouse").setLevel(logging.ERROR)  # else close() reports the discarded points
    for client in (new_client, old_client):
        client._batcher.discard()
        client.close(timeout=1.0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
