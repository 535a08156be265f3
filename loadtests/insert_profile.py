"""Where the ingest INSERT spends its CPU: the metrics table with each set of views.

Inserts the same 250k-row Arrow tables (shaped exactly as the ingest flusher
builds them: dictionary-encoded run_id/key/writer_id) into a fresh `metrics` table
carrying one set of materialized views per variant, all in one process and one
run, so the variants compare side by side on a noisy machine. Prints, per variant,
the median CPU per row of the calling thread and of the whole process (the
INSERT and the views it fires; ClickHouse spreads that work over its own threads,
so the process column is the cost), then one JSON line. Background merges are
stopped unless --merges is given, so the figures are the INSERT's own work.

    .venv/bin/python loadtests/insert_profile.py [--inserts 8] [--rows 250000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np

from trackhouse.ingest.convert import DecodedBatch, to_arrow
from trackhouse.store import schema
from trackhouse.store.store import open_store


def _ddl(version: int) -> dict[str, str]:
    """The CREATE statements of one migration, by the object they create."""
    out = {}
    for stmt in schema.MIGRATIONS[version - 1].statements:
        words = stmt.split()
        if words[0] != "CREATE":
            continue
        name = next(w for w in words if w.startswith("{db}.")).split(".", 1)[1].rstrip("(")
        out[name] = stmt
    return out


def _variant_ddl() -> dict[str, list[str]]:
    m1, m2, m3, m4, m8 = (_ddl(v) for v in (1, 2, 3, 4, 8))
    base = [m1["metrics"]]
    progress = [m1["writer_progress"], m1["writer_progress_mv"]]
    latest_v1 = [m1["latest_metrics"], m1["latest_metrics_mv"], m2["search_metrics"], m2["search_metrics_mv"]]
    latest_v4 = [m4[n] for n in ("latest_metrics", "search_metrics", "search_metrics_mv", "latest_metrics_mv")]
    rollup_v3 = list(m3.values())
    rollup_v4 = [m3["metric_rollup"]] + [m4[n] for n in ("metric_cells", "metric_rollup_10_mv",
                                                           "metric_rollup_1000_mv", "metric_cells_mv")]
    return {
        "metrics only": base,
        "+ writer_progress view": base + progress,
        "+ latest_metrics, tuple max (migr. 1)": base + progress + latest_v1,
        "+ latest_metrics, packed key (migr. 4)": base + progress + latest_v4,
        "all views, migrations 1-3": base + progress + latest_v1 + rollup_v3,
        "all views, migration 4": base + progress + latest_v4 + rollup_v4,
        "all views, migration 8 (+ run_changes)": base + progress + latest_v4 + rollup_v4
        + [m8["run_changes"], m8["run_changes_latest_metrics_mv"]],
    }


def _batches(rows: int, seed: int, runs: int = 64, keys: int = 50) -> DecodedBatch:
    rng = np.random.default_rng(seed)
    steps_per_run = rows // (runs * keys)
    n = steps_per_run * runs * keys
    run_index = np.repeat(np.arange(runs, dtype=np.uint32), steps_per_run * keys)
    key_index = np.tile(np.repeat(np.arange(keys, dtype=np.uint32), steps_per_run), runs)
    steps = np.tile(np.arange(steps_per_run, dtype=np.int64) + seed * steps_per_run, runs * keys)
    return DecodedBatch(
        writer_id=f"w{seed}", seq=seed + 1,
        run_ids=tuple(f"{i:032x}" for i in range(runs)),
        keys=tuple(f"metric_{k}" for k in range(keys)),
        run_index=run_index, key_index=key_index, steps=steps,
        timestamps=1_700_000_000_000 + steps * 10, values=rng.random(n),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inserts", type=int, default=8, help="inserts per variant (default 8)")
    ap.add_argument("--rows", type=int, default=250_000, help="rows per insert (default 250,000)")
    ap.add_argument("--merges", action="store_true",
                    help="leave background merges running (their CPU then lands in the process column)")
    ap.add_argument("--only", help="run only variants whose name contains this text")
    args = ap.parse_args()

    tables = [to_arrow([_batches(args.rows, seed)]) for seed in range(args.inserts)]
    rows = tables[0].num_rows
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="th-insert-profile-") as tmp:
        for i, (name, ddl) in enumerate(_variant_ddl().items()):
            if args.only and args.only not in name:
                continue
            if not ddl:
                continue
            store = open_store(f"chdb://{tmp}/db", database=f"v{i}", readers=1, migrate=False)
            store.command(f"CREATE DATABASE IF NOT EXISTS v{i}")
            if not args.merges:
                store.command("SYSTEM STOP MERGES")  # the insert's own work only
            for stmt in ddl:
                store.command(stmt.format(db=f"v{i}"))
            thread, process, wall = [], [], []
            for n, table in enumerate(tables):
                t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                store.insert_arrow("metrics", table)
                wall.append(time.perf_counter() - t0)
                thread.append(time.thread_time() - c0)
                process.append(time.process_time() - p0)
                print(f"\r{name:45s} insert {n + 1}/{len(tables)}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            results[name] = {
                "thread_ns_per_row": round(statistics.median(thread) / rows * 1e9),
                "process_ns_per_row": round(statistics.median(process) / rows * 1e9),
                "wall_ms_per_insert": round(statistics.median(wall) * 1000, 1),
            }
            store.close()
    print(f"\n{'variant':45s} {'thread ns/row':>14s} {'process ns/row':>15s} {'wall ms/insert':>15s}")
    for name, r in results.items():
        print(f"{name:45s} {r['thread_ns_per_row']:14d} {r['process_ns_per_row']:15d} {r['wall_ms_per_insert']:15.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
