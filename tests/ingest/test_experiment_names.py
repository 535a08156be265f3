"""Experiment names over the gRPC API: a deleted experiment keeps its name (MLflow's rule)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import common_pb2, ingest_pb2


@pytest.fixture(scope="module")
def module_server(module_server_factory: Any) -> Iterator[Any]:
    with module_server_factory() as thread:
        yield thread


@pytest.fixture
def server(module_server: ServerThread) -> ServerThread:
    """Overrides the per-test server: `channel` and `ingest` use the module's."""
    return module_server


def test_a_deleted_experiments_name_cannot_be_taken_and_restoring_it_still_works(ingest: Any) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    exp = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=name))
    ingest.DeleteExperiment(ingest_pb2.ExperimentRef(experiment_id=exp.experiment_id))
    with pytest.raises(grpc.RpcError) as info:
        ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f" {name} "))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
    assert "deleted state" in info.value.details() and exp.experiment_id in info.value.details()

    back = ingest.RestoreExperiment(ingest_pb2.ExperimentRef(experiment_id=exp.experiment_id))
    assert back.lifecycle_stage == common_pb2.ACTIVE
    assert ingest.GetExperiment(ingest_pb2.GetExperimentRequest(name=name)).experiment_id == exp.experiment_id
