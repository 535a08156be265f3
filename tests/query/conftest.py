"""Fixtures of the SQL endpoint's tests: one seeded store per deployment, per module.

Two experiments: "1" (a learning-rate sweep of 6 runs, tagged sweep=lr, with a
`loss` curve each) and "2" (two runs of another project). Runs, params, tags and
metrics are written through the store, as ingest writes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from trackhouse.store import ExperimentRecord, RunRecord, Store, open_store, parse_dsn

T0 = 1_700_000_000_000
SWEEP = [(f"{i:032x}", lr) for i, lr in enumerate(["0.1", "0.01", "0.001", "0.1", "0.01", "0.001"], start=1)]
OTHER = [(f"{i:032x}", "0.5") for i in range(101, 103)]
STEPS = 100


def loss_curve(run_index: int, lr: str) -> np.ndarray:
    steps = np.arange(STEPS, dtype=np.float64)
    return 1.0 / (1.0 + float(lr) * 10 * steps) + run_index * 0.001


def seed(store: Store) -> None:
    for exp_id, name in (("1", "sweep"), ("2", "other")):
        store.put_experiment(ExperimentRecord(exp_id, name, "", "active", T0, T0))
    runs = [(rid, "1", lr) for rid, lr in SWEEP] + [(rid, "2", lr) for rid, lr in OTHER]
    columns: dict[str, list[object]] = {k: [] for k in ("run_id", "key", "step", "timestamp", "value")}
    for index, (run_id, exp_id, lr) in enumerate(runs):
        store.put_run(RunRecord(run_id, exp_id, f"run-{index}", "alice", "FINISHED", T0 + index, T0 + 10_000,
                                "active", ""))
        store.put_params(run_id, [("lr", lr), ("batch", "32")])
        store.put_tags(run_id, [("sweep", "lr" if exp_id == "1" else "none")])
        values = loss_curve(index, lr)
        columns["run_id"] += [run_id] * STEPS
        columns["key"] += ["loss"] * STEPS
        columns["step"] += list(range(STEPS))
        # run i logs one point every (i + 1) * 10 ms
        columns["timestamp"] += [T0 + s * (index + 1) * 10 for s in range(STEPS)]
        columns["value"] += list(values)
    n = len(columns["run_id"])
    store.insert_arrow("metrics", pa.table({
        **{k: pa.array(v) for k, v in columns.items()},
        "writer_id": ["w"] * n, "seq": pa.array(np.ones(n, np.uint64)),
    }))
    store.put_tags(SWEEP[0][0], [("note", "deleted later")])
    store.put_tags(SWEEP[0][0], [("note", "")], deleted=True)
    store.put_experiment_tags("1", [("owner", "vision"), ("old", "x")])
    store.put_experiment_tags("1", [("old", "")], deleted=True)
    store.put_experiment_tags("2", [("owner", "nlp")])


@pytest.fixture(scope="module", params=["chdb", "http"])
def sql_store(request: pytest.FixtureRequest, chdb_dsn: str) -> Iterator[Store]:
    """A seeded store (module scope) over each deployment."""
    url = chdb_dsn if request.param == "chdb" else str(request.getfixturevalue("clickhouse_http_url"))
    store = open_store(url, f"t_{uuid.uuid4().hex[:12]}")
    seed(store)
    try:
        yield store
    finally:
        store.close()
        if not parse_dsn(url).embedded:
            from trackhouse.store.dsn import connect

            client = connect(parse_dsn(url))
            for db in (store.database, store.database + "_sql"):
                client.command(f"DROP DATABASE IF EXISTS {db}")
            client.close()
