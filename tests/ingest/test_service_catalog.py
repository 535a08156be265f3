"""The lifecycle RPCs over the real embedded gRPC server: experiments, runs, params, tags.

These tests touch only what they create (names are unique), so the module shares one server
over one fresh database: migrating a database per test would dominate the run time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2, query_pb2_grpc


@pytest.fixture(scope="module")
def module_server(module_server_factory: Any) -> Iterator[Any]:
    with module_server_factory() as thread:
        yield thread


@pytest.fixture
def server(module_server: ServerThread) -> ServerThread:
    """Overrides the per-test server: `channel`, `ingest` and `run_id` use the module's."""
    return module_server


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fails_with(code: grpc.StatusCode, rpc: Any, request: Any, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        rpc(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()


def get_run(channel: grpc.Channel, run_id: str) -> Any:
    return query_pb2_grpc.QueryServiceStub(channel).GetRun(query_pb2.GetRunRequest(run_id=run_id), timeout=10)


# -- experiments -------------------------------------------------------------------------


def test_create_and_get_experiment(ingest: Any) -> None:
    name = unique("vision")
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f"  {name}  "))
    assert exp.name == name and exp.experiment_id.isdigit() and exp.experiment_id != "0"
    assert exp.lifecycle_stage == common_pb2.ACTIVE
    assert exp.artifact_location.endswith("/" + exp.experiment_id)
    assert exp.creation_time > 0
    assert ingest.GetExperiment(ingest_pb2.GetExperimentRequest(experiment_id=exp.experiment_id)) == exp
    assert ingest.GetExperiment(ingest_pb2.GetExperimentRequest(name=name)) == exp


def test_experiment_keeps_a_given_artifact_location(ingest: Any) -> None:
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=unique("e"), artifact_location="s3://b/x"))
    assert exp.artifact_location == "s3://b/x"


def test_duplicate_experiment_name_is_already_exists(ingest: Any) -> None:
    name = unique("dup")
    first = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=name))
    fails_with(grpc.StatusCode.ALREADY_EXISTS, ingest.CreateExperiment,
               ingest_pb2.CreateExperimentRequest(name=name), repr(name), first.experiment_id)


def test_a_deleted_experiments_name_cannot_be_taken_and_restoring_it_still_works(ingest: Any) -> None:
    name = unique("gone")
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=name))
    ingest.DeleteExperiment(ingest_pb2.ExperimentRef(experiment_id=exp.experiment_id))
    with pytest.raises(grpc.RpcError) as info:
        ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f" {name} "))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
    assert "deleted state" in info.value.details() and exp.experiment_id in info.value.details()

    back = ingest.RestoreExperiment(ingest_pb2.ExperimentRef(experiment_id=exp.experiment_id))
    assert back.lifecycle_stage == common_pb2.ACTIVE
    assert ingest.GetExperiment(ingest_pb2.GetExperimentRequest(name=name)).experiment_id == exp.experiment_id


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_experiment_name_is_invalid(ingest: Any, name: str) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.CreateExperiment,
               ingest_pb2.CreateExperimentRequest(name=name), "name")


def test_too_long_experiment_name_is_invalid(ingest: Any) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.CreateExperiment,
               ingest_pb2.CreateExperimentRequest(name="x" * 501), "name", "500")


def test_unknown_experiment_is_not_found(ingest: Any) -> None:
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.GetExperiment,
               ingest_pb2.GetExperimentRequest(experiment_id="12345"), "12345")
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.GetExperiment,
               ingest_pb2.GetExperimentRequest(name="nope"), "nope")


def test_get_experiment_needs_an_id_or_a_name(ingest: Any) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.GetExperiment, ingest_pb2.GetExperimentRequest(),
               "experiment_id or name")


def test_default_experiment_exists(ingest: Any) -> None:
    exp = ingest.GetExperiment(ingest_pb2.GetExperimentRequest(experiment_id="0"))
    assert exp.name == "Default" and exp.lifecycle_stage == common_pb2.ACTIVE
    assert ingest.GetExperiment(ingest_pb2.GetExperimentRequest(name="Default")).experiment_id == "0"


# -- runs ----------------------------------------------------------------------------------


def test_create_run_defaults(ingest: Any, channel: grpc.Channel) -> None:
    run = ingest.CreateRun(ingest_pb2.CreateRunRequest(
        user_id="ada", tags=[common_pb2.Tag(key="team", value="ml")],
        params=[common_pb2.Param(key="lr", value="0.1"), common_pb2.Param(key="bs", value="32")]))
    assert run.experiment_id == "0" and len(run.run_id) == 32
    assert run.status == common_pb2.RUNNING and run.start_time > 0 and run.end_time == 0
    assert run.run_name == f"run-{run.run_id[-8:]}" and run.user_id == "ada"
    full = get_run(channel, run.run_id)
    assert full.info == run
    assert {p.key: p.value for p in full.params} == {"lr": "0.1", "bs": "32"}
    assert {t.key: t.value for t in full.tags} == {"team": "ml"}


def test_create_run_in_an_experiment_with_a_start_time(ingest: Any) -> None:
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=unique("e")))
    run = ingest.CreateRun(ingest_pb2.CreateRunRequest(
        experiment_id=exp.experiment_id, run_name="named", start_time=1_700_000_000_000))
    assert (run.experiment_id, run.run_name, run.start_time) == (exp.experiment_id, "named", 1_700_000_000_000)
    assert run.artifact_uri == f"{exp.artifact_location}/{run.run_id}/artifacts"
    assert int(run.run_id[:12], 16) == 1_700_000_000_000  # the id starts with the start time


def test_run_ids_sort_by_start_time(ingest: Any) -> None:
    starts = [1_700_000_000_000 + d for d in (5, 0, 86_400_000, 1, 1)]
    ids = [ingest.CreateRun(ingest_pb2.CreateRunRequest(start_time=t)).run_id for t in starts]
    assert len(set(ids)) == len(ids)  # two runs of the same millisecond still get two ids
    assert [int(i[:12], 16) for i in sorted(ids)] == sorted(starts)


def test_create_run_in_an_unknown_experiment_is_not_found(ingest: Any) -> None:
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.CreateRun,
               ingest_pb2.CreateRunRequest(experiment_id="999"), "999")


def test_create_run_with_a_bad_param_key_is_invalid(ingest: Any) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.CreateRun, ingest_pb2.CreateRunRequest(params=[
        common_pb2.Param(key="ok", value="1"), common_pb2.Param(key="bad key!", value="2")]),
        "params[1].key", "bad key!")


def test_create_run_with_a_bad_tag_or_a_repeated_param_is_invalid(ingest: Any) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.CreateRun, ingest_pb2.CreateRunRequest(
        tags=[common_pb2.Tag(key="t", value="x" * 5001)]), "tags[0].value", "5000")
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.CreateRun, ingest_pb2.CreateRunRequest(params=[
        common_pb2.Param(key="a", value="1"), common_pb2.Param(key="a", value="1")]), "params")


def test_update_run_round_trip(ingest: Any, channel: grpc.Channel, run_id: str) -> None:
    updated = ingest.UpdateRun(ingest_pb2.UpdateRunRequest(
        run_id=run_id, status=common_pb2.FINISHED, end_time=1_800_000_000_000, run_name="renamed"))
    assert (updated.status, updated.end_time, updated.run_name) == (
        common_pb2.FINISHED, 1_800_000_000_000, "renamed")
    assert get_run(channel, run_id).info == updated


def test_update_run_to_a_terminal_status_sets_the_end_time(ingest: Any, channel: grpc.Channel,
                                                           run_id: str) -> None:
    updated = ingest.UpdateRun(ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.FAILED))
    assert updated.status == common_pb2.FAILED and updated.end_time >= updated.start_time
    assert get_run(channel, run_id).info.end_time == updated.end_time
    renamed = ingest.UpdateRun(ingest_pb2.UpdateRunRequest(run_id=run_id, run_name="only-the-name"))
    assert (renamed.status, renamed.end_time, renamed.run_name) == (
        common_pb2.FAILED, updated.end_time, "only-the-name")


def test_update_run_with_an_unknown_status_number_is_invalid(ingest: Any, run_id: str) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.UpdateRun,
               ingest_pb2.UpdateRunRequest(run_id=run_id, status=99), "status", "99")


def test_create_run_with_a_negative_start_time_is_invalid(ingest: Any) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.CreateRun,
               ingest_pb2.CreateRunRequest(start_time=-1), "start_time")


def test_update_unknown_run_is_not_found(ingest: Any) -> None:
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.UpdateRun,
               ingest_pb2.UpdateRunRequest(run_id="f" * 32, status=common_pb2.FINISHED), "f" * 32)


# -- params and tags ------------------------------------------------------------------------


def test_params_are_write_once(ingest: Any, channel: grpc.Channel, run_id: str) -> None:
    def log(**params: str) -> None:
        ingest.LogParams(ingest_pb2.LogParamsRequest(
            run_id=run_id, params=[common_pb2.Param(key=k, value=v) for k, v in params.items()]), timeout=10)

    log(lr="0.1", depth="3")  # lr again with the same value: fine
    log(depth="3")
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.LogParams, ingest_pb2.LogParamsRequest(
        run_id=run_id, params=[common_pb2.Param(key="lr", value="0.2")]), "'lr'", "'0.1'", "'0.2'")
    assert {p.key: p.value for p in get_run(channel, run_id).params} == {"lr": "0.1", "depth": "3"}


def test_log_params_to_an_unknown_run_is_not_found(ingest: Any) -> None:
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.LogParams, ingest_pb2.LogParamsRequest(
        run_id="0" * 32, params=[common_pb2.Param(key="a", value="1")]))


def test_tags_are_last_write_wins(ingest: Any, channel: grpc.Channel, run_id: str) -> None:
    for value in ("one", "two", "three"):
        ingest.SetTags(ingest_pb2.SetTagsRequest(run_id=run_id, tags=[
            common_pb2.Tag(key="stage", value=value), common_pb2.Tag(key=f"seen.{value}", value="y")]))
    tags = {t.key: t.value for t in get_run(channel, run_id).tags}
    assert tags == {"stage": "three", "seen.one": "y", "seen.two": "y", "seen.three": "y"}


def test_set_tags_validates(ingest: Any, run_id: str) -> None:
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.SetTags, ingest_pb2.SetTagsRequest(
        run_id=run_id, tags=[common_pb2.Tag(key="", value="x")]), "tags[0].key")
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.SetTags, ingest_pb2.SetTagsRequest(
        run_id="0" * 32, tags=[common_pb2.Tag(key="a", value="x")]))
