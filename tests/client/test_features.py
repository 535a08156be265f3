"""MemoryTransport for users' tests, log_array, distributed ranks, resume, system metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import trackhouse.client as th
from trackhouse.client.system import SystemSampler


def _client(transport: th.MemoryTransport, tmp_path: Path, **kw: Any) -> th.Client:
    settings = th.Settings(flush_interval=0.02, backoff_initial=0.01, backoff_max=0.05, spool_dir=str(tmp_path),
                           rendezvous_dir=str(tmp_path / "rdv"), rendezvous_timeout=20.0, **kw)  # fmt: skip
    return th.Client(transport, settings)


def test_memory_transport_is_a_whole_server_for_unit_tests(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    client = _client(transport, tmp_path)
    run = client.start_run(experiment="unit", params={"lr": 0.1}, tags={"t": "x"})
    for step in range(3):
        run.log(step=step, loss=1.0 / (step + 1))
    run.log_array("reward", np.arange(100, 105), np.linspace(0, 1, 5), timestamps=np.full(5, 7))
    assert client.flush(timeout=10.0)
    assert [p[0::2] for p in transport.points(run.run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert transport.points(run.run_id, "reward")[-1] == (104, 7, 1.0)
    view = client.get_run(run.run_id)
    assert view.params == {"lr": "0.1"} and view.metrics["loss"] == 1 / 3
    assert client.metric_history(run.run_id, "reward", min_step=103)["step"].to_pylist() == [103, 104]
    with pytest.raises(th.InvalidArgument):
        run.log_params({"lr": 0.2})

    transport.available = False  # the "server" goes away: logging goes on, nothing is lost
    run.log(step=3, loss=0.25)
    run.set_tags({"t": "y"})  # spooled, retried when it is back
    assert client.flush(timeout=0.2) is False
    transport.available = True
    assert client.flush(timeout=10.0)
    run.finish()
    assert client.close(timeout=5.0)
    assert transport.point_count() == 9 and transport.batches_stored >= 2
    assert transport.tags[run.run_id]["t"] == "y"
    assert transport.runs[run.run_id].status == 3  # FINISHED


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.log_array("k", [1.5, 2.5], [1.0, 2.0]), "steps must be a 1-D integer array"),
        (lambda r: r.log_array("k", [1, 2], [1.0]), "as long as steps"),
        (lambda r: r.log_array("k", [1, 2], ["a", "b"]), "numeric array"),
        (lambda r: r.log_array("", [1], [1.0]), "non-empty strings"),
        (lambda r: r.log_array("k", np.array([2**63], np.uint64), [1.0]), "do not fit in int64"),
        (lambda r: r.log_array("k", [1], [1.0], timestamps=[1, 2]), "timestamps must be as long"),
    ],
)
def test_log_array_misuse_raises_at_once(tmp_path: Path, call: Any, match: str) -> None:
    client = _client(th.MemoryTransport(), tmp_path)
    run = client.start_run()
    with pytest.raises(th.UsageError, match=match):
        call(run)
    assert client.stats()["points_logged"] == 0
    client.close()


def test_log_array_copies_the_callers_arrays(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    client = _client(transport, tmp_path)
    run = client.start_run()
    steps, values = np.arange(3), np.array([1.0, 2.0, 3.0])
    run.log_array("v", steps, values)
    values[:] = -1  # the caller reuses its buffer at once
    assert client.flush(timeout=10.0)
    assert [v for _, _, v in transport.points(run.run_id, "v")] == [1.0, 2.0, 3.0]
    client.close()


def test_rank_zero_mode_other_ranks_make_no_call(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    transport.available = False  # any call would fail: there must be none
    client = _client(transport, tmp_path, rank=1, world_size=2)
    run = client.start_run(experiment="ddp", params={"lr": 1})
    assert not run.enabled
    run.log(step=0, loss=1.0)
    run.log_array("x", [0], [1.0])
    run.log_params({"a": 1})
    assert run.finish() is True and client.stats()["points_logged"] == 0
    client.close()


def test_all_ranks_share_one_run_with_their_rank_in_the_keys(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    runs: dict[int, th.Run] = {}

    def rank(n: int) -> None:
        client = _client(transport, tmp_path, ranks="all", rank=n, world_size=3, job_id="slurm-42")
        run = client.start_run(experiment="ddp", name="r")
        run.log(step=0, loss=float(n))
        assert client.flush(timeout=10.0)
        runs[n] = run

    threads = [threading.Thread(target=rank, args=(n,)) for n in (2, 1, 0)]  # rank 0 last: the others wait
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert {r.run_id for r in runs.values()} == {runs[0].run_id} and len(transport.runs) == 1
    assert {k for k in transport.metrics[runs[0].run_id]} == {"rank0/loss", "rank1/loss", "rank2/loss"}

    again = _client(transport, tmp_path, ranks="all", rank=0, world_size=3, job_id="slurm-42")
    resumed = again.start_run(experiment="ddp", name="r")
    assert resumed.run_id == runs[0].run_id  # an elastic restart resumes it: the run is not FINISHED
    assert resumed.finish() is True
    later = _client(transport, tmp_path, ranks="all", rank=0, world_size=3, job_id="slurm-42")
    assert later.start_run(experiment="ddp", name="r").run_id != runs[0].run_id  # another launch of that id: not


def test_all_ranks_without_a_job_id_says_what_to_set(tmp_path: Path) -> None:
    client = _client(th.MemoryTransport(), tmp_path, ranks="all", rank=0, world_size=2)
    with pytest.raises(th.UsageError, match="TRACKHOUSE_CLIENT_JOB_ID"):
        client.start_run()


def test_run_id_setting_resumes_the_run(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    first = _client(transport, tmp_path)
    run = first.start_run(experiment="resume")
    run.finish()
    second = _client(transport, tmp_path, run_id=run.run_id)
    resumed = second.start_run()
    assert resumed.run_id == run.run_id and resumed.experiment_id == run.experiment_id
    assert transport.runs[run.run_id].status == 1  # RUNNING again
    resumed.log(step=1, loss=0.5)
    assert second.flush(timeout=10.0)
    assert transport.points(run.run_id, "loss")[0][2] == 0.5


def test_system_metrics_are_sampled_off_the_training_thread(tmp_path: Path) -> None:
    sampler = SystemSampler(lambda metrics, step: None, 1.0)
    metrics, _ = sampler.sample((0.0, 0.0))
    assert {"system/cpu_percent", "system/rss_bytes"} <= set(metrics)
    assert metrics["system/rss_bytes"] > 1e6
    logged = threading.Event()
    seen: list[dict[str, float]] = []

    def log(m: dict[str, float], step: int) -> None:
        seen.append(m)
        logged.set()

    live = SystemSampler(log, 0.01)
    live.start()
    assert logged.wait(10.0)
    live.stop()
    assert "system/cpu_percent" in seen[0]


def test_one_run_logged_from_several_threads_delivers_every_point_once(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(spool_dir=str(tmp_path), flush_interval=0.005, max_batch_points=64,
                                              replay_orphans=False))
    run = client.start_run(experiment="threads")

    def log(t: int) -> None:
        for step in range(1_000):
            run.log(step=step, **{f"t{t}": float(step), "shared": float(t)})

    threads = [threading.Thread(target=log, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(30.0)
    for t in range(4):
        assert sorted(p[0] for p in transport.points(run.run_id, f"t{t}")) == list(range(1_000))
    assert sorted(p[2] for p in transport.points(run.run_id, "shared")) == [float(t) for t in range(4) for _ in
                                                                            range(1_000)]
    stats = client.stats()
    assert stats["points_logged"] == stats["points_acked"] == 8_000 and stats["points_pending"] == 0
    assert stats["batches_acked"] > 1
    client.close()
