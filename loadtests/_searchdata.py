"""Synthetic runs for the search benchmarks: realistic params, tags and metrics, generated in chunks.

Everything is built column-wise with numpy and written straight into the store
with one Arrow INSERT per table per chunk (500k runs by default), so ten
million runs stream in bounded memory. Distributions (seeded, reproducible):

- 20 experiments, Zipf-like sizes; 2 % of runs deleted; statuses mostly FINISHED;
  start_time increasing over a year with jitter.
- params (8 per run): optimizer (4 values, adam ~45 %), lr (8 values), batch_size,
  model (20), dropout, epochs, layers, seed (unique per run).
- tags (5 per run): team (12), stage (dev/staging/prod), git_commit (2,000),
  mlflow.user (200), mlflow.source.name (50).
- latest metrics (4 per run): loss ~ lognormal around 0.5, accuracy, val_loss,
  lr — one point each at the run's last step (what search sees).
"""

from __future__ import annotations

import binascii
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

T0 = 1_700_000_000_000
OPTIMIZERS = np.array(["adam", "sgd", "rmsprop", "adamw"])
OPTIMIZER_P = [0.45, 0.25, 0.1, 0.2]
LRS = np.array(["0.1", "0.03", "0.01", "0.003", "0.001", "0.0003", "0.0001", "1e-5"])
MODELS = np.array([f"resnet{d}" for d in (18, 34, 50, 101, 152)] +
                  [f"vit-{s}" for s in ("t", "s", "b", "l", "h")] +
                  [f"gpt-{n}m" for n in (10, 50, 125, 350, 760)] +
                  [f"mlp-{w}" for w in (64, 128, 256, 512, 1024)])
TEAMS = np.array([f"team-{i}" for i in range(12)])
STAGES = np.array(["dev", "staging", "prod"])
STATUSES = np.array(["FINISHED", "FAILED", "KILLED", "RUNNING"])
STATUS_P = [0.8, 0.1, 0.04, 0.06]
EXPERIMENTS = 20
COMMITS = np.array([f"{(i * 2654435761) % (1 << 28):07x}" for i in range(2_000)])


def run_ids(raw: bytes, start_time: Any = None) -> pa.Array:
    """32-hex run ids from 16 random bytes each, built as one Arrow buffer (no Python per row).

    With `start_time` (ms, one per run): the ids trackhouse mints (`store.new_run_id`), the
    first 12 hex digits the start time, then 80 random bits; without: random ids, as MLflow
    makes them (runs imported with their own ids).
    """
    n = len(raw) // 16
    if start_time is None:
        data = binascii.hexlify(raw)
    else:
        stamp = np.asarray(start_time, ">u8").view(np.uint8).reshape(n, 8)[:, 2:]
        rand = np.frombuffer(raw, np.uint8).reshape(n, 16)[:, 6:]
        data = np.hstack([np.frombuffer(binascii.hexlify(np.ascontiguousarray(part).tobytes()), "S1").reshape(n, -1)
                          for part in (stamp, rand)]).tobytes()
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))


def _pick(rng: np.random.Generator, choices: Any, n: int, p: Any = None) -> pa.Array:
    idx = rng.choice(len(choices), n, p=p).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(idx), pa.array(np.asarray(choices))).cast(pa.string())


def _num(values: Any) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _prefixed(prefix: str, values: Any) -> pa.Array:
    return pc.binary_join_element_wise(prefix, _num(values), "")


def _experiment_weights() -> np.ndarray[Any, Any]:
    w = 1.0 / np.arange(1, EXPERIMENTS + 1)
    return np.asarray(w / w.sum())


def chunk_tables(start: int, n: int, seed: int = 7, random_ids: bool = False) -> dict[str, pa.Table]:
    """The rows of runs [start, start + n): one Arrow table per store table.

    Run ids as trackhouse mints them (they begin with the start time), or with
    `random_ids` as MLflow makes them; everything else is the same either way.
    """
    rng = np.random.default_rng(seed * 1_000_003 + start)
    raw = rng.bytes(16 * n)
    index = np.arange(start, start + n)
    start_time = T0 + index * 3 + rng.integers(0, 3, n)  # ~3 ms apart: ties are rare, not absent
    ids = run_ids(raw, None if random_ids else start_time)
    status_idx = rng.choice(len(STATUSES), n, p=STATUS_P)
    end = start_time + rng.integers(60_000, 36_000_000, n)
    runs = pa.table({
        "run_id": ids, "experiment_id": _num(rng.choice(EXPERIMENTS, n, p=_experiment_weights())),
        "run_name": _prefixed("run-", index), "user_id": _prefixed("user-", index % 200),
        "status": pa.array(STATUSES[status_idx]), "start_time": pa.array(start_time, pa.int64()),
        "end_time": pa.array(end, pa.int64(), mask=status_idx == 3),
        "lifecycle_stage": pa.array(np.where(rng.random(n) < 0.02, "deleted", "active")),
        "artifact_uri": pc.binary_join_element_wise("s3://bucket/", ids, ""),
        "version": pa.array(np.ones(n, np.uint64)),
    })
    params = {
        "optimizer": _pick(rng, OPTIMIZERS, n, OPTIMIZER_P),
        "lr": _pick(rng, LRS, n),
        "batch_size": _pick(rng, ["16", "32", "64", "128", "256", "512"], n),
        "model": _pick(rng, MODELS, n),
        "dropout": _pick(rng, ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5"], n),
        "epochs": _num(rng.integers(1, 200, n)),
        "layers": _num(rng.integers(2, 48, n)),
        "seed": _num(index),
    }
    tags = {
        "team": _pick(rng, TEAMS, n), "stage": _pick(rng, STAGES, n, [0.7, 0.2, 0.1]),
        "git_commit": _pick(rng, COMMITS, n),
        "mlflow.user": _prefixed("user-", index % 200),
        "mlflow.source.name": _prefixed("train_", rng.integers(0, 50, n)),
    }
    loss = rng.lognormal(np.log(0.5), 0.6, n)
    metrics = {
        "loss": loss, "accuracy": np.clip(1 - loss / 3 + rng.normal(0, 0.05, n), 0, 1),
        "val_loss": loss * rng.uniform(1.0, 1.3, n), "lr": rng.uniform(1e-5, 0.1, n),
    }
    steps = rng.integers(100, 100_000, n)
    return {
        "runs": runs,
        "params": _long(ids, params, {}),
        "tags": _long(ids, tags, {"deleted": (pa.uint8(), 0), "version": (pa.uint64(), 1)}),
        "metrics": _long_metrics(ids, metrics, steps, end),
    }


def _long(ids: pa.Array, cols: dict[str, pa.Array], extra: dict[str, Any]) -> pa.Table:
    # Key-major row order: the store sorts on insert, so the order here does not matter.
    keys = list(cols)
    n = len(ids)
    table = {
        "run_id": pa.concat_arrays([ids] * len(keys)),
        "key": pa.array(np.repeat(np.array(keys), n)),
        "value": pa.concat_arrays([cols[k] for k in keys]),
    }
    for name, (kind, value) in extra.items():
        table[name] = pa.array(np.full(n * len(keys), value), kind)
    return pa.table(table)


def _long_metrics(ids: pa.Array, cols: dict[str, Any], steps: Any, end: Any) -> pa.Table:
    keys = list(cols)
    n, k = len(ids), len(keys)
    return pa.table({
        "run_id": pa.concat_arrays([ids] * k), "key": pa.array(np.repeat(np.array(keys), n)),
        "step": pa.array(np.tile(steps, k), pa.int64()), "timestamp": pa.array(np.tile(end, k), pa.int64()),
        "value": pa.array(np.concatenate([cols[key] for key in keys]), pa.float64()),
        "writer_id": pa.array(np.full(n * k, "bench")), "seq": pa.array(np.ones(n * k, np.uint64)),
    })


def progress(done: int, total: int, started: float, out: Any = sys.stderr) -> None:
    width = 40
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-9)
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} runs  {rate:,.0f} runs/s")
    if done >= total:
        out.write("\n")
    out.flush()


def generate(insert: Callable[[str, pa.Table], None], total: int, chunk: int = 500_000, seed: int = 7,
             random_ids: bool = False) -> None:
    """Insert `total` runs through `insert(table, arrow)` in chunks, with a progress bar."""
    started = time.monotonic()
    progress(0, total, started)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        for table, data in chunk_tables(start, n, seed, random_ids).items():
            insert(table, data)
        progress(start + n, total, started)


def experiment_rows() -> list[tuple[Any, ...]]:
    return [(str(e), f"bench-{e}", f"s3://bucket/{e}", "active", T0, T0, 1) for e in range(EXPERIMENTS)]
