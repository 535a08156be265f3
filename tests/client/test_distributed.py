"""ranks='all' rendezvous: one run per launch, resumed by an elastic restart unless the server says it ended; job ids
from the launchers (SLURM steps, Open MPI / PMIx); which rank samples a node's GPUs."""

from __future__ import annotations

import json
import logging
import threading
import time
import types
from collections.abc import Callable
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
            end: str | None = "FINISHED", settings: Any = None, **kw: Any) -> str:
    """One launch of two ranks, rank 0 ends the run with ``end`` (None: it crashed); the run id. Rank 1 first:
    it waits for rank 0's file (or, on a reused job id, for rank 0 to replace it)."""
    runs: dict[int, th.Run] = {}
    clients = {rank: th.Client(transport, settings(rank) if settings else _settings(tmp_path, rank=rank, **kw))
               for rank in (0, 1)}
    joiner = threading.Thread(target=lambda: runs.setdefault(1, clients[1].start_run(experiment="e")))
    if rank1_first:
        joiner.start()
    runs[0] = clients[0].start_run(experiment="e", params=params)
    if not rank1_first:
        joiner.start()
    joiner.join(30.0)
    assert runs[1].run_id == runs[0].run_id
    if end is not None:
        runs[0].finish(end)
    for client in clients.values():
        client.close()
    return runs[0].run_id


@pytest.fixture
def new_processes(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call between launches: the next launch's processes start after the earlier ones ended."""
    return lambda: monkeypatch.setattr(distributed, "PROCESS_STARTED_MS", int(time.time() * 1000) + 1)


@pytest.mark.parametrize("rank1_first", [True, False], ids=["rank1_first", "rank0_first"])
@pytest.mark.parametrize("end", ["FINISHED", "KILLED"])
def test_a_later_launch_with_the_same_job_id_starts_a_new_run(tmp_path: Path, new_processes: Callable[[], None],
                                                              end: str, rank1_first: bool) -> None:
    # Two srun steps of one sbatch, or a reused torchrun --rdzv-id: the old run stays ended, untouched, and
    # every rank of the later launch (_launch checks rank 1) logs into the new run.
    transport = th.MemoryTransport()
    first = _launch(transport, tmp_path, {"lr": "0.1"}, end=end)
    new_processes()
    second = _launch(transport, tmp_path, {"lr": "0.2"}, rank1_first=rank1_first)
    assert second != first
    assert common_pb2.RunStatus.Name(transport.runs[first].status) == end
    assert transport.params == {first: {"lr": "0.1"}, second: {"lr": "0.2"}}


def test_rank_zero_says_when_a_job_id_was_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 new_processes: Callable[[], None]) -> None:
    transport = th.MemoryTransport()
    _launch(transport, tmp_path, {})
    new_processes()
    with caplog.at_level(logging.WARNING, logger="trackhouse.client.distributed"):
        _launch(transport, tmp_path, {}, rank1_first=False)
    assert [r.getMessage() for r in caplog.records if "earlier launch with job id 'job-123'" in r.getMessage()]


@pytest.mark.parametrize("end", [None, "FAILED"], ids=["crashed_running", "failed"])
def test_an_elastic_restart_resumes_its_launchs_run(tmp_path: Path, new_processes: Callable[[], None],
                                                    end: str | None) -> None:
    transport = th.MemoryTransport()
    first = _launch(transport, tmp_path, {"lr": "0.1"}, end=end)
    new_processes()  # torchrun restarts every worker
    again = _launch(transport, tmp_path, {"lr": "0.1"})
    assert again == first and len(transport.runs) == 1
    assert transport.runs[first].status == common_pb2.FINISHED


@pytest.mark.parametrize("counts", [(1, 0), (0, 1)], ids=["rank0_node_restarted", "other_node_restarted"])
def test_nodes_with_different_restart_counts_share_one_run(tmp_path: Path, new_processes: Callable[[], None],
                                                           counts: tuple[int, int]) -> None:
    # torchrun keeps TORCHELASTIC_RESTART_COUNT per agent (node): after a failure, or a membership change
    # (not counted), nodes disagree. Rank 0 on node A, rank 1 on node B.
    transport = th.MemoryTransport()
    first = _launch(transport, tmp_path, {}, end="FAILED")
    new_processes()

    def on_node(rank: int) -> Settings:
        env = Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", "RANK": str(rank), "WORLD_SIZE": "2",
                                 "TORCHELASTIC_RUN_ID": "job-123", "TORCHELASTIC_RESTART_COUNT": str(counts[rank])})
        launcher = {k: v for k, v in vars(env).items() if v != getattr(Settings(), k)}  # what the env set
        return Settings(**{**vars(_settings(tmp_path, rank=rank, rendezvous_timeout=5.0)), **launcher})

    for rank1_first in (True, False):
        assert _launch(transport, tmp_path, {}, end=None, settings=on_node, rank1_first=rank1_first) == first
    assert len(transport.runs) == 1


def _path(tmp_path: Path) -> Path:
    return distributed.rendezvous_file(_settings(tmp_path), "e", "", 0)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_other_ranks_skip_a_run_another_launch_ended_until_rank_zero_replaces_it(tmp_path: Path) -> None:
    path = _path(tmp_path)
    _write(path, json.dumps({"run_id": "old"}))
    rank0, rank1 = (_settings(tmp_path, rank=r) for r in (0, 1))
    before = distributed.PROCESS_STARTED_MS - 1
    ended = {"old": before}.get
    polls: list[float] = []

    def rank0_publishes(delay: float) -> None:  # runs when rank 1 would sleep: rank 0 publishes then
        polls.append(delay)
        assert distributed.shared_run_id(path, rank0, lambda: "new", ended) == ("new", True)

    run_id, created = distributed.shared_run_id(path, rank1, lambda: pytest.fail("rank 1 must not create"),
                                                ended, sleep=rank0_publishes)
    assert (run_id, created) == ("new", False) and len(polls) == 1


def test_a_late_rank_takes_a_run_that_ended_after_it_started(tmp_path: Path) -> None:
    # Rank 0 finished before this rank's first start_run: the same launch, not another one's.
    path = _path(tmp_path)
    _write(path, json.dumps({"run_id": "ours"}))
    ended = {"ours": distributed.PROCESS_STARTED_MS + 1}.get
    assert distributed.shared_run_id(path, _settings(tmp_path, rank=1), lambda: "x", ended,
                                     sleep=lambda _: pytest.fail("must not wait")) == ("ours", False)


def test_a_file_in_an_older_format_is_not_resumed(tmp_path: Path) -> None:
    path = _path(tmp_path)
    _write(path, "0123456789abcdef")  # a bare run id: which launch wrote it is unknown
    assert distributed.shared_run_id(path, _settings(tmp_path, rank=0), lambda: "new") == ("new", True)
    written = json.loads(path.read_text())
    assert written["run_id"] == "new" and written["published_ms"] >= distributed.PROCESS_STARTED_MS


def test_a_file_with_a_restart_count_is_read_by_its_run_id(tmp_path: Path) -> None:
    # Written by the previous version: the count is ignored, the run's status decides.
    path = _path(tmp_path)
    _write(path, json.dumps({"run_id": "old", "restart_count": 3}))
    assert distributed.shared_run_id(path, _settings(tmp_path, rank=0), lambda: "new") == ("old", False)
    assert distributed.shared_run_id(path, _settings(tmp_path, rank=1), lambda: "x") == ("old", False)


def test_offline_ranks_take_the_file_as_it_is(tmp_path: Path, new_processes: Callable[[], None]) -> None:
    # No server to ask: a reused job id joins the earlier launch's (local) run; documented.
    transport = th.MemoryTransport()
    first = _launch(transport, tmp_path, {}, mode="offline")
    new_processes()
    assert _launch(transport, tmp_path, {}, mode="offline") == first


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
        ({"LOCAL_RANK": "3"}, 3),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 1),
        ({"MPI_LOCALRANKID": "2"}, 2),
        ({"SLURM_LOCALID": "1"}, 1),
        ({}, 0),
    ],
)
def test_local_rank_comes_from_the_launcher(env: dict[str, str], expected: int) -> None:
    assert _env(**env).local_rank == expected


def test_negative_local_rank_is_refused() -> None:
    with pytest.raises(th.UsageError, match=r"Settings\.local_rank must be >= 0"):
        Settings(local_rank=-1)


def test_only_a_nodes_first_rank_samples_its_gpus() -> None:
    assert distributed.samples_gpus(Settings(rank=5, world_size=8, local_rank=0))
    assert not distributed.samples_gpus(Settings(rank=5, world_size=8, local_rank=1))


class _CountingTransport(th.MemoryTransport):
    """Counts GetRun calls; ``unavailable`` of them first fail as a momentary outage."""

    def __init__(self, unavailable: int = 0) -> None:
        super().__init__()
        self.get_runs = 0
        self.unavailable = unavailable

    def get_run(self, request: Any) -> Any:
        self.get_runs += 1
        if self.unavailable:
            self.unavailable -= 1
            raise th.ServerUnavailable("momentarily down")
        return super().get_run(request)


@pytest.mark.parametrize("rank1_first", [True, False], ids=["rank1_first", "rank0_first"])
def test_a_fresh_file_costs_the_other_ranks_no_query(tmp_path: Path, rank1_first: bool) -> None:
    transport = _CountingTransport()
    _launch(transport, tmp_path, {}, rank1_first=rank1_first)
    assert transport.get_runs == 0


def test_a_file_published_after_this_process_started_is_taken_without_asking(tmp_path: Path) -> None:
    path = _path(tmp_path)
    _write(path, json.dumps({"run_id": "ours", "published_ms": distributed.PROCESS_STARTED_MS}))
    assert distributed.shared_run_id(path, _settings(tmp_path, rank=1), lambda: "x",
                                     lambda _: pytest.fail("must not ask the server"),
                                     sleep=lambda _: pytest.fail("must not wait")) == ("ours", False)


def test_rank_zero_asks_again_while_the_server_does_not_answer(tmp_path: Path, new_processes: Callable[[], None],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # A momentary outage must not make a later launch resume the earlier launch's FINISHED run.
    transport = _CountingTransport()
    first = _launch(transport, tmp_path, {"lr": "0.1"})
    new_processes()
    transport.unavailable = 1
    second = _launch(transport, tmp_path, {"lr": "0.2"})
    assert second != first and transport.get_runs >= 2
    assert transport.runs[first].status == common_pb2.FINISHED
    assert transport.params == {first: {"lr": "0.1"}, second: {"lr": "0.2"}}


@pytest.mark.parametrize("rank", [0, 1])
def test_a_server_that_never_answers_fails_the_rendezvous_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  rank: int) -> None:
    path = _path(tmp_path)
    _write(path, json.dumps({"run_id": "old"}))
    clock = [0.0]  # the module's monotonic clock, advanced by its sleep hook only
    monkeypatch.setattr(distributed, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    waits: list[float] = []

    def wait(delay: float) -> None:
        waits.append(delay)
        clock[0] += delay

    def down(_: str) -> int | None:
        raise th.ServerUnavailable("down")

    with pytest.raises(th.TrackhouseError, match="could not learn from the server") as raised:
        distributed.shared_run_id(path, _settings(tmp_path, rank=rank, rendezvous_timeout=5.0), lambda: "new",
                                  down, sleep=wait)
    assert not isinstance(raised.value, th.ServerUnavailable) and 5.0 <= sum(waits) < 6.0


def test_a_rank_reads_again_a_file_rank_zero_rewrote_with_the_same_run(tmp_path: Path) -> None:
    # Rank 1 saw "old" ended by an earlier launch; rank 0 (its status unknowable) resumed it and republished:
    # rank 1 must take the rewritten file, not skip it until rendezvous_timeout.
    path = _path(tmp_path)
    _write(path, json.dumps({"run_id": "old"}))
    rank0, rank1 = (_settings(tmp_path, rank=r) for r in (0, 1))
    polls: list[float] = []

    def rank0_resumes(delay: float) -> None:
        if polls:
            pytest.fail("rank 1 skipped the file rank 0 rewrote")
        polls.append(delay)
        assert distributed.shared_run_id(path, rank0, lambda: "new", lambda _: None) == ("old", False)

    assert distributed.shared_run_id(path, rank1, lambda: pytest.fail("rank 1 must not create"),
                                     {"old": distributed.PROCESS_STARTED_MS - 1}.get,
                                     sleep=rank0_resumes) == ("old", False)
