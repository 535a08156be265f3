"""ranks='all' rendezvous: one run per launch, resumed only by an elastic restart of that launch; job ids
from the launchers (SLURM steps, Open MPI / PMIx); which rank samples a node's GPUs."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

import trackhouse.client as th
from trackhouse.client import distributed
from trackhouse.client.settings import Settings
from trackhouse.proto.v1 import common_pb2


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(ranks="all", world_size=2, job_id="job-123", rendezvous_dir=str(tmp_path / "rdv"),
                                spool_dir=str(tmp_path / "spool"), replay_orphans=False, rendezvous_timeout=20.0,
                                flush_interval=0.02)  # fmt: skip
    base.update(kw)
    return Settings(**base)


def _launch(transport: th.MemoryTransport, tmp_path: Path, params: dict[str, Any], *, rank1_first: bool = True,
            **kw: Any) -> str:
    """One launch of two ranks, both finish; the run id. Rank 1 first: it waits for rank 0's file.
    A launch reusing a job id starts rank 0 first: its rank 1 could not tell the earlier file from its own."""
    runs: dict[int, th.Run] = {}
    clients = {rank: th.Client(transport, _settings(tmp_path, rank=rank, **kw)) for rank in (0, 1)}
    joiner = threading.Thread(target=lambda: runs.setdefault(1, clients[1].start_run(experiment="e")))
    if rank1_first:
        joiner.start()
    runs[0] = clients[0].start_run(experiment="e", params=params)
    if not rank1_first:
        joiner.start()
    joiner.join(30.0)
    assert runs[1].run_id == runs[0].run_id
    runs[0].finish()
    for client in clients.values():
        client.close()
    return runs[0].run_id


def test_a_later_launch_with_the_same_job_id_starts_a_new_run(tmp_path: Path) -> None:
    # Two srun steps of one sbatch, or a reused torchrun --rdzv-id: the old run stays FINISHED, untouched.
    transport = th.MemoryTransport()
    first = _launch(transport, tmp_path, {"lr": "0.1"})
    second = _launch(transport, tmp_path, {"lr": "0.2"}, rank1_first=False)
    assert second != first
    assert transport.runs[first].status == common_pb2.FINISHED
    assert transport.params == {first: {"lr": "0.1"}, second: {"lr": "0.2"}}


def test_rank_zero_says_when_a_job_id_was_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    transport = th.MemoryTransport()
    _launch(transport, tmp_path, {})
    with caplog.at_level(logging.WARNING, logger="trackhouse.client.distributed"):
        _launch(transport, tmp_path, {}, rank1_first=False)
    assert [r.getMessage() for r in caplog.records if "earlier launch with job id 'job-123'" in r.getMessage()]


def test_an_elastic_restart_resumes_its_launchs_run(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    first = _launch(transport, tmp_path, {"lr": "0.1"})
    again = _launch(transport, tmp_path, {"lr": "0.1"}, restart_count=1)  # TORCHELASTIC_RESTART_COUNT=1
    assert again == first and len(transport.runs) == 1


def _path(tmp_path: Path) -> Path:
    return distributed.rendezvous_file(_settings(tmp_path), "e", "", 0)


def _write(path: Path, run_id: str, restart_count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "restart_count": restart_count}))


@pytest.mark.parametrize("stale", [0, 3], ids=["earlier_restart", "other_launch"])
def test_other_ranks_wait_for_the_file_of_their_own_restart(tmp_path: Path, stale: int) -> None:
    # A file left by restart 0 (or by another launch that restarted 3 times) is not restart 1's.
    path = _path(tmp_path)
    _write(path, "old", stale)
    rank0, rank1 = (_settings(tmp_path, rank=r, restart_count=1) for r in (0, 1))
    polls: list[float] = []

    def rank0_publishes(delay: float) -> None:  # runs when rank 1 would sleep: rank 0 publishes then
        polls.append(delay)
        distributed.shared_run_id(path, rank0, lambda: "new")

    run_id, created = distributed.shared_run_id(path, rank1, lambda: pytest.fail("rank 1 must not create"),
                                                sleep=rank0_publishes)
    assert polls and not created
    assert run_id == ("old" if stale < 1 else "new")  # restart 0's run is resumed by rank 0, republished


def test_a_file_in_an_older_format_is_not_resumed(tmp_path: Path) -> None:
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("0123456789abcdef")  # a bare run id: which launch wrote it is unknown
    assert distributed.shared_run_id(path, _settings(tmp_path, rank=0, restart_count=5), lambda: "new") == (
        "new", True)



def _env(**env: str) -> Settings:
    return Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", **env})


@pytest.mark.parametrize(
    ("env", "job_id"),
    [
        # two srun steps of one sbatch script are two launches
        ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}, "77.0"),
        ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "1"}, "77.1"),
        ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "1", "SLURM_RESTART_COUNT": "2"}, "77.1+requeue2"),
        ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}, "77"),
        # plain mpirun: Open MPI 5 (PRRTE) and 4; inside an sbatch script the launcher's id wins
        ({"PMIX_NAMESPACE": "prterun-host-12345@1", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"},
         "prterun-host-12345@1"),
        ({"OMPI_MCA_ess_base_jobid": "3841654785"}, "3841654785"),
        ({"TORCHELASTIC_RUN_ID": "abc", "PMIX_NAMESPACE": "slurm.pmix.77.0"}, "abc"),
        ({"TORCHELASTIC_RUN_ID": "none", "PMIX_NAMESPACE": "slurm.pmix.77.0"}, "slurm.pmix.77.0"),
        ({"TRACKHOUSE_CLIENT_JOB_ID": "mine", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, "mine"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, ""),  # MPICH's Hydra: no per-launch id, the user sets one
    ],
)
def test_job_id_identifies_one_launch(env: dict[str, str], job_id: str) -> None:
    assert _env(**env).job_id == job_id


def test_plain_mpirun_needs_no_extra_setup(tmp_path: Path) -> None:
    s = _env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
             PMIX_NAMESPACE="prterun-host-12345@1", TRACKHOUSE_CLIENT_RANKS="all")
    client = th.Client(th.MemoryTransport(), Settings(**{**vars(s), "rendezvous_dir": str(tmp_path / "rdv"),
                                                         "spool_dir": str(tmp_path / "spool")}))
    assert client.start_run().run_id
    client.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TORCHELASTIC_RESTART_COUNT": "2", "LOCAL_RANK": "3"}, (2, 3)),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, (0, 1)),
        ({"MPI_LOCALRANKID": "2"}, (0, 2)),
        ({"SLURM_LOCALID": "1", "TRACKHOUSE_CLIENT_RESTART_COUNT": "4"}, (4, 1)),
        ({}, (0, 0)),
    ],
)
def test_restart_count_and_local_rank_come_from_the_launcher(env: dict[str, str], expected: tuple[int, int]) -> None:
    s = _env(**env)
    assert (s.restart_count, s.local_rank) == expected


@pytest.mark.parametrize("field", ["restart_count", "local_rank"])
def test_negative_restart_count_or_local_rank_is_refused(field: str) -> None:
    with pytest.raises(th.UsageError, match=rf"Settings\.{field} must be >= 0"):
        Settings(**{field: -1})


def test_only_a_nodes_first_rank_samples_its_gpus() -> None:
    assert distributed.samples_gpus(Settings(rank=5, world_size=8, local_rank=0))
    assert not distributed.samples_gpus(Settings(rank=5, world_size=8, local_rank=1))
