"""A scripted session through MLflow's own client against a trackhouse server, field by field."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_experiments_create_get_search_rename_tag_delete_restore(client: Any) -> None:
    name = unique("exp")
    exp_id = client.create_experiment(name, artifact_location="s3://bucket/x", tags={"team": "vision"})
    assert isinstance(exp_id, str) and exp_id.isdigit()
    exp = client.get_experiment(exp_id)
    assert (exp.experiment_id, exp.name, exp.artifact_location, exp.lifecycle_stage) == (
        exp_id, name, "s3://bucket/x", "active")
    assert exp.tags == {"team": "vision"}
    assert exp.creation_time == exp.last_update_time > 0
    assert client.get_experiment_by_name(name).experiment_id == exp_id
    assert client.get_experiment_by_name(unique("none")) is None

    client.set_experiment_tag(exp_id, "stage", "dev")
    client.delete_experiment_tag(exp_id, "team")
    assert client.get_experiment(exp_id).tags == {"stage": "dev"}

    client.rename_experiment(exp_id, name + "-renamed")
    assert client.get_experiment(exp_id).name == name + "-renamed"
    found = client.search_experiments(filter_string=f"name = '{name}-renamed' and tags.stage = 'dev'")
    assert [e.experiment_id for e in found] == [exp_id]
    assert [e.experiment_id for e in client.search_experiments(filter_string=f"name LIKE '{name}%'")] == [exp_id]

    client.delete_experiment(exp_id)
    assert client.get_experiment(exp_id).lifecycle_stage == "deleted"
    assert exp_id not in {e.experiment_id for e in client.search_experiments()}
    deleted = client.search_experiments(view_type=ViewType.DELETED_ONLY, filter_string=f"name LIKE '{name}%'")
    assert [e.experiment_id for e in deleted] == [exp_id]
    client.restore_experiment(exp_id)
    assert client.get_experiment(exp_id).lifecycle_stage == "active"


def test_default_experiment_and_search_experiments_order(client: Any) -> None:
    default = client.get_experiment("0")
    assert (default.name, default.lifecycle_stage) == ("Default", "active")
    prefix = unique("ord")
    ids = [client.create_experiment(f"{prefix}-{i}") for i in range(3)]
    page = client.search_experiments(filter_string=f"name LIKE '{prefix}%'", max_results=2)
    # MLflow's default order: creation_time DESC, experiment_id ASC.
    assert [e.experiment_id for e in page] == ids[::-1][:2] and page.token
    rest = client.search_experiments(filter_string=f"name LIKE '{prefix}%'", max_results=2, page_token=page.token)
    assert [e.experiment_id for e in rest] == [ids[0]] and rest.token is None
    by_name = client.search_experiments(filter_string=f"name LIKE '{prefix}%'", order_by=["name DESC"])
    assert [e.name for e in by_name] == [f"{prefix}-2", f"{prefix}-1", f"{prefix}-0"]


def test_duplicate_experiment_is_resource_already_exists(client: Any) -> None:
    name = unique("dup")
    client.create_experiment(name)
    with pytest.raises(MlflowException) as info:
        client.create_experiment(name)
    assert info.value.error_code == "RESOURCE_ALREADY_EXISTS"


def test_runs_log_batch_get_history_and_lifecycle(client: Any) -> None:
    exp_id = client.create_experiment(unique("runs"))
    run = client.create_run(exp_id, run_name="first", tags={"kind": "baseline"}, start_time=1_700_000_000_000)
    info = run.info
    assert len(info.run_id) == 32 and int(info.run_id, 16) >= 0
    assert (info.experiment_id, info.run_name, info.status, info.lifecycle_stage, info.start_time) == (
        exp_id, "first", "RUNNING", "active", 1_700_000_000_000)
    assert info.end_time is None
    assert run.data.tags == {"kind": "baseline", "mlflow.runName": "first"}

    metrics = [Metric("loss", 1.0 / (i + 1), 1_700_000_000_000 + i, i) for i in range(1000)]
    client.log_batch(info.run_id, metrics=metrics, params=[Param("lr", "0.01"), Param("opt", "adam")],
                     tags=[RunTag("note", "hello")])
    client.log_metric(info.run_id, "acc", float("nan"), timestamp=5, step=3)
    client.log_param(info.run_id, "lr", "0.01")  # the same value again is fine
    client.set_tag(info.run_id, "mlflow.runName", "renamed")
    client.set_terminated(info.run_id, "FINISHED", end_time=1_700_000_100_000)

    got = client.get_run(info.run_id)
    assert (got.info.status, got.info.end_time, got.info.run_name) == ("FINISHED", 1_700_000_100_000, "renamed")
    assert got.data.params == {"lr": "0.01", "opt": "adam"}
    assert got.data.tags == {"kind": "baseline", "mlflow.runName": "renamed", "note": "hello"}
    assert got.data.metrics["loss"] == pytest.approx(1.0 / 1000)  # latest = greatest (step, timestamp, value)
    assert math.isnan(got.data.metrics["acc"])

    history = client.get_metric_history(info.run_id, "loss")
    assert [(m.step, m.timestamp) for m in history] == [(i, 1_700_000_000_000 + i) for i in range(1000)]
    assert [m.value for m in history] == [1.0 / (i + 1) for i in range(1000)]
    assert all(m.key == "loss" for m in history)

    with pytest.raises(MlflowException) as info_err:
        client.log_param(info.run_id, "lr", "0.1")
    assert info_err.value.error_code == "INVALID_PARAMETER_VALUE"

    client.delete_tag(info.run_id, "note")
    assert "note" not in client.get_run(info.run_id).data.tags
    with pytest.raises(MlflowException) as absent:
        client.delete_tag(info.run_id, "note")
    assert absent.value.error_code == "RESOURCE_DOES_NOT_EXIST"

    client.delete_run(info.run_id)
    assert client.get_run(info.run_id).info.lifecycle_stage == "deleted"
    assert client.search_runs([exp_id]) == []
    assert [r.info.run_id for r in client.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)] == [info.run_id]
    with pytest.raises(MlflowException) as deleted:
        client.log_metric(info.run_id, "loss", 0.5)
    assert deleted.value.error_code == "INVALID_PARAMETER_VALUE"
    client.restore_run(info.run_id)
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [info.run_id]


def test_search_runs_filters_ordering_and_pages(client: Any) -> None:
    exp_id = client.create_experiment(unique("search"))
    run_ids = []
    for i in range(7):
        run = client.create_run(exp_id, run_name=f"r{i}", start_time=1_000 + i)
        client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.1 * i, 1, 0)],
                         params=[Param("opt", "adam" if i % 2 == 0 else "sgd")])
        run_ids.append(run.info.run_id)

    # Default order: start_time DESC, then run_id.
    assert [r.info.run_id for r in client.search_runs([exp_id])] == run_ids[::-1]
    found = client.search_runs([exp_id], "metrics.loss < 0.45 and params.opt = 'adam'",
                               order_by=["metrics.loss DESC"])
    assert [r.info.run_id for r in found] == [run_ids[4], run_ids[2], run_ids[0]]
    assert [r.data.metrics["loss"] for r in found] == pytest.approx([0.4, 0.2, 0.0])
    assert [r.info.run_name for r in client.search_runs([exp_id], "attributes.run_name = 'r3'")] == ["r3"]

    seen, token = [], None
    while True:
        page = client.search_runs([exp_id], order_by=["metrics.loss ASC"], max_results=3, page_token=token)
        seen += [r.info.run_id for r in page]
        token = page.token
        if not token:
            break
    assert seen == run_ids

    with pytest.raises(MlflowException) as bad:
        client.search_runs([exp_id], "metrics.loss <<< 1")
    assert bad.value.error_code == "INVALID_PARAMETER_VALUE"


def test_terminated_status_and_update(client: Any) -> None:
    run = client.create_run("0")
    assert run.info.experiment_id == "0" and run.info.run_name  # a generated name, also a tag
    assert run.data.tags["mlflow.runName"] == run.info.run_name
    client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED), name="stopped")
    got = client.get_run(run.info.run_id)
    assert (got.info.status, got.info.run_name, got.data.tags["mlflow.runName"]) == ("KILLED", "stopped", "stopped")
    assert got.info.end_time is not None


def test_fluent_api_session(base_url: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(base_url)
    try:
        mlflow.set_experiment(unique("fluent"))
        with mlflow.start_run(run_name="fluent-run") as run:
            mlflow.log_params({"a": 1, "b": "x"})
            for step in range(5):
                mlflow.log_metric("m", step * 2.0, step=step)
            mlflow.set_tag("k", "v")
        got = mlflow.get_run(run.info.run_id)
        assert got.info.status == "FINISHED" and got.info.run_name == "fluent-run"
        assert got.data.params == {"a": "1", "b": "x"}
        assert got.data.metrics == {"m": 8.0}
        assert got.data.tags["k"] == "v" and got.data.tags["mlflow.runName"] == "fluent-run"
    finally:
        mlflow.set_tracking_uri("")
