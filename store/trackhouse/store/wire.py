"""Conversions between the store's records and the trackhouse.v1 wire messages.

Shared by the ingest and query services (which never import each other).
"""

from __future__ import annotations

from typing import Any

from trackhouse.proto.v1 import common_pb2 as pb
from trackhouse.store.records import ACTIVE, ExperimentRecord, RunDetails, RunRecord

STAGE_TO_PB = {ACTIVE: pb.ACTIVE, "deleted": pb.DELETED}


def status_name(status: int) -> str:
    """'' for RUN_STATUS_UNSPECIFIED, else the status's name ('FINISHED')."""
    return "" if status == pb.RUN_STATUS_UNSPECIFIED else str(pb.RunStatus.Name(status))


def experiment_to_pb(rec: ExperimentRecord) -> Any:
    return pb.Experiment(
        experiment_id=rec.experiment_id, name=rec.name, artifact_location=rec.artifact_location,
        lifecycle_stage=STAGE_TO_PB.get(rec.lifecycle_stage, pb.LIFECYCLE_STAGE_UNSPECIFIED),
        creation_time=rec.creation_time, last_update_time=rec.last_update_time,
    )


def run_info_to_pb(rec: RunRecord) -> Any:
    return pb.RunInfo(
        run_id=rec.run_id, experiment_id=rec.experiment_id, run_name=rec.run_name, user_id=rec.user_id,
        status=pb.RunStatus.Value(rec.status), start_time=rec.start_time, end_time=rec.end_time or 0,
        lifecycle_stage=STAGE_TO_PB.get(rec.lifecycle_stage, pb.LIFECYCLE_STAGE_UNSPECIFIED),
        artifact_uri=rec.artifact_uri,
    )


def run_to_pb(run: RunDetails) -> Any:
    return pb.Run(
        info=run_info_to_pb(run.info),
        params=[pb.Param(key=k, value=v) for k, v in run.params.items()],
        tags=[pb.Tag(key=k, value=v) for k, v in run.tags.items()],
        metrics=[
            pb.LatestMetric(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step,
                            min_value=m.min_value, max_value=m.max_value, count=m.count)
            for m in run.metrics
        ],
    )
