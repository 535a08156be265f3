"""A run's start and end (``lifecycle``): one handle per start_run, what a resumed run is given, which rank
of a shared run (``ranks="all"``) ends it, and the system sampler that lives and ends with its run."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

import trackhouse.client as th
from trackhouse.client.spool import RESUMED_TAG
from trackhouse.client.system import SystemSampler
from trackhouse.proto.rules import MAX_KEY_LENGTH
from trackhouse.proto.v1 import common_pb2


def _client(transport: th.MemoryTransport, tmp_path: Path, **kw: Any) -> th.Client:
    settings = th.Settings(flush_interval=0.02, spool_dir=str(tmp_path / "spool"), replay_orphans=False,
                           rendezvous_dir=str(tmp_path / "rdv"), rendezvous_timeout=20.0, **kw)  # fmt: skip
    return th.Client(transport, settings)


def _rank(transport: th.MemoryTransport, tmp_path: Path, rank: int, **kw: Any) -> th.Client:
    return _client(transport, tmp_path, ranks="all", rank=rank, world_size=2, job_id="job-1", **kw)


def _samplers_started(start: Any) -> tuple[Any, list[threading.Thread]]:
    """What ``start()`` returns, and the system-sampler threads it started."""
    before = set(threading.enumerate())
    result = start()
    return result, [t for t in threading.enumerate() if t not in before and t.name == "trackhouse-system"]


def _status(transport: th.MemoryTransport, run_id: str) -> str:
    return common_pb2.RunStatus.Name(transport.runs[run_id].status)


# -- start: one handle ----------------------------------------------------------------------------------


def test_rank_zero_of_a_shared_run_gets_one_handle_with_the_runs_experiment_and_name(tmp_path: Path) -> None:
    # It used to make a second handle, whose sampler logged every system step twice and outlived finish().
    transport = th.MemoryTransport()
    client = _rank(transport, tmp_path, 0, system_metrics_interval=600)
    run, threads = _samplers_started(lambda: client.start_run(experiment="exp", name="myrun"))
    assert (run.experiment_id, run.name) == (transport.runs[run.run_id].experiment_id, "myrun")
    assert run.experiment_id != "0" and len(threads) == 1
    run.finish()
    assert not threads[0].is_alive()
    client.close()


# -- start: what a resumed run is given ----------------------------------------------------------------


def test_resuming_a_run_by_id_sets_the_name_params_and_tags_given(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    first = _client(transport, tmp_path)
    run_id = first.start_run(experiment="e", params={"lr": 0.1}).run_id
    first.close()
    second = _client(transport, tmp_path, run_id=run_id)  # TRACKHOUSE_CLIENT_RUN_ID
    resumed = second.start_run(experiment="e", name="myname", params={"lr": 0.1, "batch": 32}, tags={"t": "x"})
    assert transport.params[run_id] == {"lr": "0.1", "batch": "32"}
    assert transport.tags[run_id]["t"] == "x"
    assert transport.runs[run_id].run_name == resumed.name == "myname"
    second.close()


def test_a_param_the_resumed_run_holds_with_another_value_raises_and_leaves_the_run_as_it_was(
        tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    first = _client(transport, tmp_path)
    run = first.start_run(params={"lr": 0.1})
    run.finish()
    first.close()
    second = _client(transport, tmp_path)
    with pytest.raises(th.InvalidArgument, match="lr"):
        second.start_run(run_id=run.run_id, params={"lr": 0.2}, tags={"t": "x"})
    assert transport.params[run.run_id] == {"lr": "0.1"}
    assert not {"t", RESUMED_TAG} & set(transport.tags[run.run_id])
    assert _status(transport, run.run_id) == "FINISHED"
    second.close()


def test_a_ranks_own_params_and_tags_are_kept_under_its_prefix(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # The same start_run runs on every rank: identical values are the run's; a rank's own value must not
    # fail the job, nor be dropped, nor replace rank 0's.
    transport = th.MemoryTransport()
    clients = [_rank(transport, tmp_path, rank) for rank in (0, 1)]
    run0 = clients[0].start_run(experiment="e", params={"lr": 0.1, "host": "n0"}, tags={"node": "n0"})
    with caplog.at_level(logging.WARNING, logger="trackhouse.client.lifecycle"):
        run1 = clients[1].start_run(experiment="e", params={"lr": 0.1, "host": "n1"}, tags={"node": "n1"})
    assert run1.run_id == run0.run_id
    assert transport.params[run0.run_id] == {"lr": "0.1", "host": "n0", "rank1/host": "n1"}
    assert {k: v for k, v in transport.tags[run0.run_id].items() if "node" in k} == {"node": "n0", "rank1/node": "n1"}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "params host" in warning and "rank1/<key>" in warning
    for client in clients:
        client.close()


def test_with_the_launchers_run_id_no_rank_fails_on_a_param_another_logged_first(tmp_path: Path) -> None:
    # Every rank resumes the launcher's run: there is no telling which sends its params first.
    transport = th.MemoryTransport()
    run_id = _client(transport, tmp_path).start_run().run_id
    late, early = (_rank(transport, tmp_path, rank, run_id=run_id) for rank in (0, 1))
    early.start_run(params={"seed": 1})
    late.start_run(params={"seed": 0})
    assert transport.params[run_id] == {"seed": "1", "rank0/seed": "0"}
    for client in (late, early):
        client.close()


def test_a_ranks_own_key_too_long_for_the_service_is_refused_on_every_rank(tmp_path: Path) -> None:
    for rank in (0, 1):
        with _rank(th.MemoryTransport(), tmp_path, rank) as client, pytest.raises(th.UsageError, match="limit"):
            client.start_run(params={"k" * MAX_KEY_LENGTH: 1})


# -- end: which rank ends a shared run -------------------------------------------------------------------


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_only_rank_zero_ends_a_shared_run(tmp_path: Path, status: str) -> None:
    transport = th.MemoryTransport()
    clients = [_rank(transport, tmp_path, rank) for rank in (0, 1)]
    run0, run1 = (client.start_run(experiment="e") for client in clients)
    run1.log(step=0, loss=1.0)
    assert run1.finish(status) is True  # rank 1 ran out of data first, or failed
    assert _status(transport, run0.run_id) == "RUNNING"
    assert transport.points(run0.run_id, "rank1/loss")  # flushed
    noted = {k: v for k, v in transport.tags[run0.run_id].items() if k.startswith("rank")}
    assert noted == ({} if status == "FINISHED" else {"rank1/status": status})
    run0.log(step=1, loss=0.5)  # rank 0 goes on
    assert run0.finish() is True
    assert _status(transport, run0.run_id) == "FINISHED"
    for client in clients:
        client.close()


@pytest.mark.parametrize("via", ["rendezvous", "launcher_run_id"])
def test_a_late_rank_does_not_set_a_run_rank_zero_ended_running_again(tmp_path: Path, via: str) -> None:
    transport = th.MemoryTransport()
    kw = {"run_id": _client(transport, tmp_path).start_run().run_id} if via == "launcher_run_id" else {}
    clients = [_rank(transport, tmp_path, rank, **kw) for rank in (0, 1)]
    run0 = clients[0].start_run(experiment="e")
    run0.finish()
    assert clients[1].start_run(experiment="e").run_id == run0.run_id
    assert _status(transport, run0.run_id) == "FINISHED"
    assert (RESUMED_TAG in transport.tags[run0.run_id]) == bool(kw)  # rank 0's resume, with the launcher's id
    for client in clients:
        client.close()


# -- the system sampler lives and ends with its run ----------------------------------------------------


def test_finish_stops_the_runs_sampler_and_lets_the_run_go(tmp_path: Path) -> None:
    # 30 finished runs used to leave 30 sampler threads, each keeping its Run alive, until close().
    client = _client(th.MemoryTransport(), tmp_path, system_metrics_interval=600)
    for _ in range(3):
        run, threads = _samplers_started(client.start_run)
        assert len(threads) == 1
        run.finish()
        assert not threads[0].is_alive()
        gone = weakref.ref(run)
        del run
        gc.collect()
        assert gone() is None
    assert client._samplers == []
    client.close()


def test_close_stops_the_samplers_within_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    stop = SystemSampler.stop

    def spy(self: SystemSampler, timeout: float = 5.0) -> bool:
        waits.append(timeout)
        return stop(self, timeout)

    monkeypatch.setattr(SystemSampler, "stop", spy)
    client = _client(th.MemoryTransport(), tmp_path, system_metrics_interval=600)
    _, threads = _samplers_started(lambda: [client.start_run() for _ in range(2)])
    assert client.close(timeout=1.0)
    assert waits and max(waits) <= 1.0  # each wait within the close deadline, not 5 s each
    assert not any(t.is_alive() for t in threads)


def test_close_lets_a_sampler_caught_mid_sample_log_it_first(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The sample is logged before close's last flush: delivered, not reported lost.
    sampling, go_on, stopping = threading.Event(), threading.Event(), threading.Event()

    def slow_probe() -> dict[str, float]:
        sampling.set()
        assert go_on.wait(30.0)
        return {"system/slow": 1.0}

    stop = SystemSampler.stop

    def told(self: SystemSampler, timeout: float = 5.0) -> bool:
        stopping.set()
        return stop(self, timeout)

    monkeypatch.setattr("trackhouse.client.system._HOST_PROBES", {"slow": slow_probe})
    monkeypatch.setattr(SystemSampler, "stop", told)
    transport = th.MemoryTransport()
    client = _client(transport, tmp_path, system_metrics_interval=0.1)
    run = client.start_run()
    assert sampling.wait(30.0)
    closed: list[bool] = []
    closer = threading.Thread(target=lambda: closed.append(client.close(timeout=30.0)))
    closer.start()
    assert stopping.wait(30.0)  # close is stopping the sampler: now let the sample end
    go_on.set()
    closer.join(30.0)
    assert closed == [True] and client.stats()["points_pending"] == 0
    assert [step for step, _, _ in transport.points(run.run_id, "system/slow")] == [0]


# -- the rendezvous asks the server whether a published run ended ------------------------------------------


class _NoQueryService(th.MemoryTransport):
    def get_run(self, request: Any) -> Any:
        raise th.ServerError("no query service at this address", "UNIMPLEMENTED")


@pytest.mark.parametrize("transport", [_NoQueryService(), th.MemoryTransport()], ids=["no_query_service", "online"])
def test_rank_zero_resumes_the_published_run_unless_the_server_says_it_ended(tmp_path: Path,
                                                                              transport: th.MemoryTransport) -> None:
    first = _rank(transport, tmp_path, 0)
    run = first.start_run(experiment="e")
    assert run.finish() is True
    later = _rank(transport, tmp_path, 0)
    again = later.start_run(experiment="e")  # the job id reused by a later launch
    # unreadable status: taken as an elastic restart (as before); FINISHED: another launch's, a new run
    assert (again.run_id == run.run_id) == isinstance(transport, _NoQueryService)
    for client in (first, later):
        client.close()


class _Flaky(th.MemoryTransport):
    def __init__(self, error: th.TrackhouseError) -> None:
        super().__init__()
        self.error: th.TrackhouseError | None = error

    def get_run(self, request: Any) -> Any:
        error, self.error = self.error, None
        if error is not None:
            raise error
        return super().get_run(request)


@pytest.mark.parametrize("error", [th.ServerUnavailable("restarting"), th.DeadlineExceeded("slow")],
                         ids=["unavailable", "deadline"])
def test_a_momentary_outage_does_not_resume_an_ended_run(tmp_path: Path, error: th.TrackhouseError) -> None:
    transport = _Flaky(error)
    first = _rank(transport, tmp_path, 0)
    run = first.start_run(experiment="e", params={"lr": "0.1"})
    assert run.finish() is True
    later = _rank(transport, tmp_path, 0)
    again = later.start_run(experiment="e", params={"lr": "0.2"})  # the job id reused; GetRun fails once
    assert again.run_id != run.run_id and transport.error is None
    assert _status(transport, run.run_id) == "FINISHED" and transport.params[run.run_id] == {"lr": "0.1"}
    for client in (first, later):
        client.close()


def test_a_refusal_other_than_unknowable_is_raised(tmp_path: Path) -> None:
    transport = _Flaky(th.ServerError("denied", "PERMISSION_DENIED"))
    first = _rank(transport, tmp_path, 0)
    first.start_run(experiment="e").finish()
    transport.error = th.ServerError("denied", "PERMISSION_DENIED")
    later = _rank(transport, tmp_path, 0)
    with pytest.raises(th.ServerError, match="PERMISSION_DENIED"):
        later.start_run(experiment="e")
    for client in (first, later):
        client.close()
