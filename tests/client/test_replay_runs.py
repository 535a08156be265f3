"""Replay and the runs a spool names: runs created elsewhere, refused runs, final statuses a run outlived.

Offline spools are written by real offline clients; the server is the library's
``MemoryTransport`` (its ``search_runs`` has no filter: a run is found by its local id
only through the maps of the same sync), or the real embedded server where an
earlier sync's run must be found by its ``trackhouse.local_run_id`` tag.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import trackhouse.client as th
from trackhouse.client import runmap
from trackhouse.client.memory import MemoryTransport
from trackhouse.client.replay import adopt_orphans, replay_dir, sync
from trackhouse.client.runmap import RESUMED_TAG
from trackhouse.client.settings import Settings
from trackhouse.client.spool import OPS, Kind, Record, WriterSpool, read_meta, scan, segments, writer_dirs
from trackhouse.proto.points import batch_points
from trackhouse.proto.v1 import common_pb2, ingest_pb2


def _offline(tmp_path: Path, **fields: Any) -> th.Client:
    settings = th.Settings(mode="offline", spool_dir=str(tmp_path / "spool"), replay_orphans=False, **fields)
    return th.Client(MemoryTransport(), settings)


def _ranks(tmp_path: Path) -> tuple[list[Path], str]:
    """A ``ranks=all`` job logged offline: rank 1 logs into rank 0's local run id (no CreateRun of its own)."""
    dirs, run_id = [], ""
    for rank in (0, 1):
        client = _offline(tmp_path, ranks="all", rank=rank, world_size=2, job_id="job1",
                          rendezvous_dir=str(tmp_path / "rdv"))
        run = client.start_run(experiment="e", name="n")
        run_id = run_id or run.run_id
        assert run.run_id == run_id
        for step in range(10):
            run.log(step=step, loss=float(step))
        run.set_tags({f"rank{rank}": "x"})
        run.finish()
        client.close()
        dirs.append(Path(client.spool_path))
    return dirs, run_id


def _resumed(tmp_path: Path) -> tuple[list[Path], str]:
    """An offline job restarted offline: the second process resumes the first one's local run id."""
    first = _offline(tmp_path)
    run = first.start_run(name="job")
    for step in range(10):
        run.log(step=step, loss=float(step))
    first.close()
    second = _offline(tmp_path)
    again = second.start_run(run_id=run.run_id)
    for step in range(10, 20):
        again.log(step=step, loss=float(step))
    again.set_tags({"restarted": "yes"})
    again.finish()
    second.close()
    return [Path(first.spool_path), Path(second.spool_path)], run.run_id


@pytest.mark.parametrize("job", [_ranks, _resumed])
def test_a_directory_logging_into_a_run_another_one_created_is_delivered_after_it(
    tmp_path: Path, job: Callable[[Path], tuple[list[Path], str]]
) -> None:
    """The run's points were sent under its local id, all rejected, and the directory deleted."""
    (creator, user), local = job(tmp_path)
    root = creator.parent
    creator, user = creator.rename(root / "b-creator"), user.rename(root / "a-user")  # the user is synced first
    server = MemoryTransport()

    reports = sync(root, transport=server)

    assert server.point_count() == 20 and not any(r.rejected_points for r in reports)
    assert [r.complete for r in reports] == [True, True], [r.error for r in reports]
    (run,) = server.runs.values()
    assert reports[0].runs == reports[1].runs == {local: run.run_id}
    assert len(server.tags[run.run_id]) >= 2 and run.status == common_pb2.FINISHED
    assert writer_dirs(root) == []


def test_a_run_on_no_server_yet_keeps_the_directory_until_its_creator_is_synced(server: Any, tmp_path: Path) -> None:
    (rank0, rank1), local = _ranks(tmp_path)
    settings = th.Settings(url=server.address)

    (first,) = sync(rank1, settings=settings)

    assert not first.complete and first.missing_runs == [local]
    assert local in first.error and "sync the spool directory that created it first" in first.error
    assert (rank1 / OPS).exists() and segments(rank1)  # kept, nothing sent
    assert server.store.query_rows(f"SELECT count() FROM {server.store.database}.metrics")[0][0] == 0

    (created,) = sync(rank0, settings=settings)  # its own sync, a later day: rank 1 finds the run by its tag
    (second,) = sync(rank1, settings=settings)

    assert created.complete and second.complete, second.error
    assert second.runs == created.runs and second.runs_created == 0
    assert server.store.query_rows(f"SELECT count() FROM {server.store.database}.metrics")[0][0] == 20
    with th.connect(f"grpc://{server.address}") as reader:
        view = reader.get_run(created.runs[local])
    assert set(view.metrics) == {"rank0/loss", "rank1/loss"} and {"rank0", "rank1"} <= set(view.tags)
    assert sync(tmp_path / "spool", settings=settings) == []


def _batches(directory: Path) -> list[ingest_pb2.MetricBatch]:
    return [ingest_pb2.MetricBatch.FromString(r.payload) for path in segments(directory) for r in scan(path)
            if isinstance(r, Record)]


def test_a_run_the_server_refuses_to_create_is_set_aside_and_the_others_delivered(tmp_path: Path) -> None:
    """The refusal used to end every sync of the directory: its other run was never delivered."""
    client = _offline(tmp_path)
    good = client.start_run(name="good", params={"lr": 1})
    bad = client.start_run(name="bad", experiment_id="42", params={"lr": 2})  # an experiment not on the server
    for step in range(5):
        good.log(step=step, loss=1.0)
        bad.log(step=step, loss=2.0)
    good.finish()
    bad.finish("FAILED")
    client.close()
    original = Path(client.spool_path)
    assert any(len(b.run_ids) == 2 for b in _batches(original))  # points of both runs in one batch
    server, root = MemoryTransport(), tmp_path / "spool"

    (first,) = sync(root, transport=server)

    (run,) = server.runs.values()
    assert server.point_count() == 5 and [v for _, _, v in server.points(run.run_id, "loss")] == [1.0] * 5
    assert run.run_name == "good" and run.status == common_pb2.FINISHED and server.params[run.run_id] == {"lr": "1"}
    (aside,) = writer_dirs(root)
    assert not first.complete and first.set_aside == {bad.run_id: str(aside)}
    assert bad.run_id in first.error and "NOT_FOUND" in first.error and str(aside) in first.error
    assert not original.exists() and read_meta(aside)["set_aside_from"] == first.writer_id
    assert {tuple(b.run_ids) for b in _batches(aside)} == {(bad.run_id,)}
    assert sum(batch_points(b) for b in _batches(aside)) == 5

    (again,) = sync(root, transport=server)  # still refused: reported again, nothing else sent

    assert not again.complete and bad.run_id in again.error and str(aside) in again.error
    assert len(server.runs) == 1 and server.point_count() == 5 and aside.exists()

    server.experiments["42"] = common_pb2.Experiment(experiment_id="42", name="restored")  # the cause is gone
    (last,) = sync(root, transport=server)

    assert last.complete, last.error
    created = server.runs[last.runs[bad.run_id]]
    assert created.status == common_pb2.FAILED and server.params[created.run_id] == {"lr": "2"}
    assert [(s, v) for s, _, v in server.points(created.run_id, "loss")] == [(s, 2.0) for s in range(5)]
    assert server.point_count() == 10 and writer_dirs(root) == []


_T = 1_700_000_000_000  # when the dead process recorded the run's end (ms)


def _dead_process_spool(root: Path, run_id: str) -> Path:
    """What an online process left when it died: a batch and its run's final status, never delivered."""
    spool = WriterSpool(root, "dead", 1 << 20, {"mode": "online", "url": Settings().url})
    spool.append_batch(ingest_pb2.MetricBatch(
        writer_id="dead", seq=1, run_ids=[run_id], keys=["loss"], key_index=struct.pack("<I", 0),
        steps=struct.pack("<q", 1), timestamps=struct.pack("<q", _T), values=struct.pack("<d", 0.5),
    ).SerializeToString())  # fmt: skip
    update = ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.FAILED, end_time=_T)
    spool.append_op(Kind.UPDATE_RUN, update.SerializeToString())
    spool.close(ops_done=False)
    return spool.path


def _resume(server: MemoryTransport, run_id: str, at: int) -> None:
    server.set_tags(ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key=RESUMED_TAG, value=str(at))]))
    server.update_run(ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.RUNNING))


def _finish(server: MemoryTransport, run_id: str, at: int) -> None:
    server.update_run(ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.FINISHED, end_time=at))


@pytest.mark.parametrize(("since", "status", "end_time"), [
    pytest.param(lambda server, run_id: _resume(server, run_id, _T + 1000), common_pb2.RUNNING, 0,
                 id="resumed-after-it"),  # a restarted job is logging into it
    pytest.param(lambda server, run_id: _finish(server, run_id, _T + 1000), common_pb2.FINISHED, _T + 1000,
                 id="ended-again-after-it"),
    pytest.param(lambda server, run_id: _resume(server, run_id, _T - 1000), common_pb2.FAILED, _T,
                 id="resumed-before-it"),
    pytest.param(lambda server, run_id: None, common_pb2.FAILED, _T, id="nothing-since"),
])  # fmt: skip
def test_adoption_applies_a_dead_processs_final_status_only_to_a_run_that_did_not_outlive_it(
    tmp_path: Path, since: Callable[[MemoryTransport, str], None], status: int, end_time: int
) -> None:
    """A restarted job resumed the run; the adoption of its dead predecessor's spool marked it FAILED."""
    server = MemoryTransport()
    run_id = server.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    directory = _dead_process_spool(tmp_path, run_id)
    since(server, run_id)

    (report,) = adopt_orphans(server, Settings(spool_dir=str(tmp_path)), "own")

    assert report.complete and not directory.exists()
    assert server.points(run_id, "loss") == [(1, _T, 0.5)]
    assert (server.runs[run_id].status, server.runs[run_id].end_time) == (status, end_time)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_a_run_resumed_by_a_client_outlives_its_dead_predecessors_final_status(tmp_path: Path, mode: str) -> None:
    """``resume_run`` records when it resumed (``RESUMED_TAG``), so the adoption of the process that died
    before it, or the sync of an offline restart, does not mark the restarted job's run FAILED."""
    server = MemoryTransport()
    run_id = server.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    _dead_process_spool(tmp_path / "dead", run_id)
    client = th.Client(server, th.Settings(mode=mode, spool_dir=str(tmp_path / "restarted"), replay_orphans=False))
    client.resume_run(run_id)
    assert client.close()

    restarted = sync(tmp_path / "restarted", transport=server)  # offline: its tag reaches the server now
    reports = [*restarted, *adopt_orphans(server, Settings(spool_dir=str(tmp_path / "dead")), "own")]

    assert all(r.complete for r in reports) and len(reports) == 1 + (mode == "offline")
    assert (server.runs[run_id].status, server.runs[run_id].end_time) == (common_pb2.RUNNING, 0)
    assert server.points(run_id, "loss") == [(1, _T, 0.5)]


class _DiesAfter(MemoryTransport):
    """Stores ``n`` batches, then goes away (the sync stops part-way)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def _store(self, batch: ingest_pb2.MetricBatch) -> ingest_pb2.BatchAck:
        if self.batches_stored >= self.n:
            self.available = False
        return super()._store(batch)


def _killed_around_recording_the_set_aside(monkeypatch: pytest.MonkeyPatch, *, after: bool) -> None:
    real = runmap.write_json_atomic

    def write(path: Path, value: Any) -> None:
        if after or path.name != runmap.ASIDE:
            real(path, value)
        if path.name == runmap.ASIDE:  # built; recorded or not, not yet renamed into place: the process dies
            monkeypatch.undo()
            raise OSError("killed")

    monkeypatch.setattr(runmap, "write_json_atomic", write)


@pytest.mark.parametrize("interrupt", ["server-gone-after-4-batches", "killed-after-recording-the-set-aside",
                                       "killed-before-recording-the-set-aside"])
def test_a_refused_run_accepted_after_an_interrupted_sync_has_every_point_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt: str
) -> None:
    """Batches stripped of a refused run's points were acknowledged under the directory's (writer, seq),
    and the run was set aside only at the end of the sync: stopped before, its points came back as
    duplicates once the server accepted the run, and were never stored. Stopped after its set-aside copy
    was built but before it was recorded, that hidden copy of its points used to stay for good."""
    client = _offline(tmp_path, max_batch_points=2)
    good = client.start_run(name="good")
    bad = client.start_run(name="bad", experiment_id="42")  # an experiment not on the server (yet)
    for step in range(10):
        good.log(step=step, loss=1.0)
        bad.log(step=step, loss=2.0)
        client.flush(5)  # one batch a step, with both runs' points
    good.finish()
    bad.finish()
    client.close()
    root, server = tmp_path / "spool", _DiesAfter(4 if interrupt.startswith("server") else 10**9)
    if interrupt.startswith("killed"):
        _killed_around_recording_the_set_aside(monkeypatch, after=interrupt.startswith("killed-after"))

    first = replay_dir(Path(client.spool_path), server, max_attempts=1, backoff=(0.0, 0.0))

    assert not first.complete and first.error and Path(client.spool_path).exists()
    server.available, server.n = True, 10**9
    server.experiments["42"] = common_pb2.Experiment(experiment_id="42", name="restored")  # the run is accepted
    reports = [r for _ in range(3) for r in sync(root, transport=server)]  # until nothing is left

    assert writer_dirs(root) == [] and reports[-1].complete, [r.error for r in reports]
    runs = {run.run_name: run.run_id for run in server.runs.values()}
    assert sorted(runs) == ["bad", "good"] and len(server.runs) == 2
    assert [(s, v) for s, _, v in server.points(runs["bad"], "loss")] == [(s, 2.0) for s in range(10)]
    assert [(s, v) for s, _, v in server.points(runs["good"], "loss")] == [(s, 1.0) for s in range(10)]
    assert server.point_count() == 20
    assert sorted(p.name for p in root.iterdir()) == []  # no hidden staging copy left either
