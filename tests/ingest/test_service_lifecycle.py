"""The lifecycle RPCs added for MLflow: delete/restore runs and experiments, tag deletes,
experiment renames and tags, and the unary LogMetrics (durable on reply, deduplicated)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest

from trackhouse.proto.v1 import common_pb2, ingest_pb2


def fails_with(code: grpc.StatusCode, call: Any, request: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def test_delete_and_restore_run(ingest: Any, run_id: str, make_batch: Any) -> None:
    deleted = ingest.DeleteRun(ingest_pb2.RunRef(run_id=run_id))
    assert deleted.lifecycle_stage == common_pb2.DELETED
    assert ingest.DeleteRun(ingest_pb2.RunRef(run_id=run_id)).lifecycle_stage == common_pb2.DELETED  # idempotent
    fails_with(grpc.StatusCode.FAILED_PRECONDITION, ingest.SetTags,
               ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key="a", value="b")]))
    ack = ingest.LogMetrics(make_batch(writer_id=uuid.uuid4().hex, run_ids=[run_id]))
    assert ack.status == ingest_pb2.REJECTED and ack.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert ingest.RestoreRun(ingest_pb2.RunRef(run_id=run_id)).lifecycle_stage == common_pb2.ACTIVE
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.DeleteRun, ingest_pb2.RunRef(run_id="0" * 32))


def test_log_metrics_is_durable_on_reply_and_deduplicated(ingest: Any, run_id: str, make_batch: Any,
                                                          server: Any) -> None:
    writer = uuid.uuid4().hex
    started = time.monotonic()
    ack = ingest.LogMetrics(make_batch(writer_id=writer, seq=1, run_ids=[run_id], points=10))
    assert (ack.status, ack.seq, ack.points) == (ingest_pb2.STORED, 1, 10)
    # Woken at once, not after the flush interval's age limit.
    assert time.monotonic() - started < 5
    rows = server.store.query_rows(f"SELECT count() FROM {server.store.t('metrics')} WHERE run_id = {{r:String}}",
                                   {"r": run_id})
    assert rows[0][0] == 10
    again = ingest.LogMetrics(make_batch(writer_id=writer, seq=1, run_ids=[run_id], points=10))
    assert again.status == ingest_pb2.DUPLICATE
    bad = ingest.LogMetrics(make_batch(writer_id=writer, seq=2, run_ids=["nope"]))
    assert bad.status == ingest_pb2.REJECTED and bad.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_stored_batch_resent_after_its_run_was_deleted_is_still_a_duplicate(
        ingest: Any, run_id: str, make_batch: Any) -> None:
    writer = uuid.uuid4().hex
    stored = ingest.LogMetrics(make_batch(writer_id=writer, seq=1, run_ids=[run_id]))
    assert stored.status == ingest_pb2.STORED
    ingest.DeleteRun(ingest_pb2.RunRef(run_id=run_id))
    again = ingest.LogMetrics(make_batch(writer_id=writer, seq=1, run_ids=[run_id]))
    assert (again.status, again.points, again.code) == (ingest_pb2.DUPLICATE, 4, 0), again.message
    new = ingest.LogMetrics(make_batch(writer_id=writer, seq=2, run_ids=[run_id]))
    assert new.status == ingest_pb2.REJECTED and new.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_delete_tag(ingest: Any, run_id: str) -> None:
    ingest.SetTags(ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key="a", value="b")]))
    ingest.DeleteTag(ingest_pb2.DeleteTagRequest(run_id=run_id, key="a"))
    assert "a" in fails_with(grpc.StatusCode.NOT_FOUND, ingest.DeleteTag,
                             ingest_pb2.DeleteTagRequest(run_id=run_id, key="a"))


def test_rename_experiment(ingest: Any) -> None:
    a = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f"a-{uuid.uuid4().hex}"))
    b = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f"b-{uuid.uuid4().hex}"))
    renamed = ingest.UpdateExperiment(ingest_pb2.UpdateExperimentRequest(experiment_id=a.experiment_id,
                                                                         new_name=a.name + "-x"))
    assert renamed.name == a.name + "-x" and renamed.last_update_time >= a.last_update_time
    fails_with(grpc.StatusCode.ALREADY_EXISTS, ingest.UpdateExperiment,
               ingest_pb2.UpdateExperimentRequest(experiment_id=a.experiment_id, new_name=b.name))
    fails_with(grpc.StatusCode.INVALID_ARGUMENT, ingest.UpdateExperiment,
               ingest_pb2.UpdateExperimentRequest(experiment_id=a.experiment_id, new_name=" "))


def test_delete_experiment_cascades_to_its_runs_and_restore_brings_them_back(ingest: Any) -> None:
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f"c-{uuid.uuid4().hex}"))
    early = ingest.CreateRun(ingest_pb2.CreateRunRequest(experiment_id=exp.experiment_id))
    kept = ingest.CreateRun(ingest_pb2.CreateRunRequest(experiment_id=exp.experiment_id))
    ingest.DeleteRun(ingest_pb2.RunRef(run_id=early.run_id))
    time.sleep(0.002)  # distinct millisecond: the cascade tells runs apart by deletion time
    gone = ingest.DeleteExperiment(ingest_pb2.ExperimentRef(experiment_id=exp.experiment_id))
    assert gone.lifecycle_stage == common_pb2.DELETED
    fails_with(grpc.StatusCode.FAILED_PRECONDITION, ingest.CreateRun,
               ingest_pb2.CreateRunRequest(experiment_id=exp.experiment_id))
    fails_with(grpc.StatusCode.FAILED_PRECONDITION, ingest.RestoreRun, ingest_pb2.RunRef(run_id=kept.run_id))
    back = ingest.RestoreExperiment(ingest_pb2.ExperimentRef(experiment_id=exp.experiment_id))
    assert back.lifecycle_stage == common_pb2.ACTIVE
    # The run deleted before the experiment stays deleted; the one deleted with it is back.
    assert ingest.DeleteRun(ingest_pb2.RunRef(run_id=early.run_id)).lifecycle_stage == common_pb2.DELETED
    ingest.SetTags(ingest_pb2.SetTagsRequest(run_id=kept.run_id, tags=[common_pb2.Tag(key="k", value="v")]))


def test_experiment_tags(ingest: Any) -> None:
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f"t-{uuid.uuid4().hex}"))
    ingest.SetExperimentTags(ingest_pb2.SetExperimentTagsRequest(
        experiment_id=exp.experiment_id, tags=[common_pb2.Tag(key="team", value="x")]))
    ingest.DeleteExperimentTag(ingest_pb2.DeleteExperimentTagRequest(experiment_id=exp.experiment_id, key="team"))
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.DeleteExperimentTag,
               ingest_pb2.DeleteExperimentTagRequest(experiment_id=exp.experiment_id, key="team"))
    fails_with(grpc.StatusCode.NOT_FOUND, ingest.SetExperimentTags,
               ingest_pb2.SetExperimentTagsRequest(experiment_id="999", tags=[]))
