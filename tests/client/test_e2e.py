"""The client against the real embedded server (ingest + query over chDB), in-process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import trackhouse.client as th

STEPS = 1000


@pytest.fixture
def client(server: Any) -> Iterator[th.Client]:
    c = th.connect(f"grpc://{server.address}", settings=th.Settings(flush_interval=0.05))
    try:
        yield c
    finally:
        c.close(timeout=10.0)


def _loss(run: int, step: int) -> float:
    return 1.0 / (step + 1) + run * 0.1


def test_log_three_runs_and_read_back(server: Any, client: th.Client) -> None:
    runs = [
        client.start_run(experiment="sweep-1", name=f"lr={lr}", params={"lr": lr}, tags={"team": "rl"})
        for lr in (0.1, 0.01, 0.001)
    ]
    for step in range(STEPS):
        for i, run in enumerate(runs):
            run.log(step=step, loss=_loss(i, step), acc=step / STEPS)
    assert client.flush(timeout=30.0)
    stats = client.stats()
    assert stats["points_acked"] == stats["points_logged"] == 3 * 2 * STEPS
    assert stats["batches_rejected"] == 0 and stats["points_pending"] == 0
    rows = server.store.query_rows(f"SELECT count() FROM {server.store.database}.metrics")
    assert rows[0][0] == 3 * 2 * STEPS

    for i, run in enumerate(runs):
        run.finish()
        view = client.get_run(run.run_id)
        assert view.run_id == run.run_id and view.experiment_id == run.experiment_id
        assert view.status == "FINISHED" and view.end_time is not None and view.end_time >= view.start_time
        assert view.lifecycle_stage == "active"
        assert view.params == {"lr": str((0.1, 0.01, 0.001)[i])}
        assert view.tags["team"] == "rl"
        assert view.metrics == {"loss": _loss(i, STEPS - 1), "acc": (STEPS - 1) / STEPS}

        table = client.metric_history(run.run_id, "loss")
        assert table.column_names == ["step", "timestamp", "value"]
        np.testing.assert_array_equal(table["step"].to_numpy(), np.arange(STEPS))
        np.testing.assert_array_equal(table["value"].to_numpy(), [_loss(i, s) for s in range(STEPS)])
        assert str(table.schema.field("timestamp").type) == "int64"

    part = client.metric_history(runs[0].run_id, "acc", min_step=10, max_step=19)
    np.testing.assert_array_equal(part["step"].to_numpy(), np.arange(10, 20))


def test_search_runs_filter_order_and_pages(client: th.Client) -> None:
    runs = []
    for i in range(7):
        run = client.start_run(experiment="search", name=f"r{i}", params={"i": i})
        run.log(step=0, loss=float(i))
        runs.append(run)
    other = client.start_run(experiment="elsewhere", name="x")
    other.log(step=0, loss=0.0)
    assert client.flush(timeout=30.0)

    found = list(client.search_runs(
        experiment_names=["search"], filter="metrics.loss < 5", order_by=["metrics.loss DESC"], page_size=2,
    ))  # fmt: skip
    assert [r.name for r in found] == ["r4", "r3", "r2", "r1", "r0"]
    assert found[0].metrics["loss"] == 4.0

    by_id = list(client.search_runs([runs[0].experiment_id], order_by=["metrics.loss ASC"], max_results=3))
    assert [r.name for r in by_id] == ["r0", "r1", "r2"]
    everything = {r.run_id for r in client.search_runs(page_size=3)}
    assert {r.run_id for r in runs} | {other.run_id} <= everything


def test_params_and_tags_round_trip(client: th.Client) -> None:
    run = client.start_run(experiment_id="0", params={"a": 1}, tags={"t": "x"})
    run.log_params({"b": "two", "a": 1})  # the same value again is accepted
    run.set_tags({"t": "y", "u": "z"})
    with pytest.raises(th.InvalidArgument):
        run.log_params({"a": 2})
    view = client.get_run(run.run_id)
    assert view.params == {"a": "1", "b": "two"}
    assert view.tags["t"] == "y" and view.tags["u"] == "z"
    assert view.status == "RUNNING" and view.end_time is None


def test_context_manager_marks_failed_on_exception(client: th.Client) -> None:
    with pytest.raises(RuntimeError), client.start_run(experiment="cm") as run:
        run.log(step=1, loss=1.0)
        raise RuntimeError("boom")
    view = client.get_run(run.run_id)
    assert view.status == "FAILED" and view.metrics == {"loss": 1.0}
    with pytest.raises(th.UsageError, match="finished"):
        run.log(step=2, loss=1.0)


def test_context_manager_marks_finished(client: th.Client) -> None:
    with client.start_run(experiment="cm") as run:
        run.log_metrics({"x": 1}, step=5, timestamp=1_700_000_000_000)
    view = client.get_run(run.run_id)
    assert view.status == "FINISHED"
    table = client.metric_history(run.run_id, "x")
    assert table.to_pydict() == {"step": [5], "timestamp": [1_700_000_000_000], "value": [1.0]}


def test_unknown_run_is_not_found(client: th.Client) -> None:
    with pytest.raises(th.NotFound):
        client.get_run("0" * 32)


def test_create_experiment_then_duplicate_name(client: th.Client) -> None:
    exp_id = client.create_experiment("e2e-create")
    run = client.start_run(experiment="e2e-create", name="r")
    assert run.experiment_id == exp_id
    with pytest.raises(th.AlreadyExists, match="e2e-create"):
        client.create_experiment("e2e-create")
    with pytest.raises(th.UsageError):
        client.create_experiment("  ")
    run.finish()
