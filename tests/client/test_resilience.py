"""Never lose a point: the real embedded server stopped and restarted, absent for a whole run,
offline runs, spool corruption, re-runs of sync, adoption of a dead process's spool.

Every test ends by asking the store itself: each point present exactly once.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import trackhouse.client as th
from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import Store

KEYS = ("loss", "acc", "lr")


class Servers:
    """Embedded servers over one test database, started and stopped at will (same port if asked)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.running: list[ServerThread] = []

    def start(self, port: int = 0) -> str:
        config = ServerConfig(store="", database=self.store.database, grpc_port=port,
                              ingest=IngestSettings(flush_interval=0.05))
        thread = ServerThread(config, store=self.store)
        address = thread.start()
        self.running.append(thread)
        return address

    def stop(self, grace: float = 0.0) -> None:
        self.running.pop().stop(grace=grace)

    def counts(self) -> tuple[int, int]:
        """(points stored, distinct (run, key, step)): equal means no duplicate."""
        rows = self.store.query_rows(
            f"SELECT count(), uniqExact(run_id, key, step) FROM {self.store.database}.metrics"
        )
        return int(rows[0][0]), int(rows[0][1])


@pytest.fixture
def servers(store: Store) -> Iterator[Servers]:
    s = Servers(store)
    try:
        yield s
    finally:
        while s.running:
            s.stop(grace=1.0)


def _settings(tmp_path: Path, **kw: Any) -> th.Settings:
    base: dict[str, Any] = dict(flush_interval=0.02, max_batch_points=500, backoff_initial=0.02, backoff_max=0.1,
                                spool_dir=str(tmp_path / "spool"), close_timeout=5.0, replay_orphans=False,
                                ack_timeout=1.0)
    return th.Settings(**{**base, **kw})


def _log(run: th.Run, steps: range) -> None:
    for step in steps:
        run.log(step=step, loss=1.0 / (step + 1), acc=step * 1e-3, lr=0.1)


def _let_go(client: th.Client) -> None:
    """Wait until a closed client's worker has let go of its spool, as a job's does before its process exits:
    ``close`` is bounded and may return while the worker still ends the stream, holding the spool's lock
    (a sync or an adoption then finds the directory "locked by a live process")."""
    worker = client._sender._worker
    assert worker is not None
    worker.join(30.0)
    assert not worker.is_alive()


def _until(client: th.Client, predicate: Callable[[dict[str, int]], bool], timeout: float = 15.0) -> bool:
    """Wait on the sender's condition (notified on acks, spills, reconnects, replays) for ``predicate``."""
    cond = client._sender._cond
    with cond:
        return bool(cond.wait_for(lambda: predicate(client.stats()), timeout))


@pytest.mark.parametrize("grace", [0.0, 60.0], ids=["spilled-to-disk", "kept-in-memory"])
def test_server_stopped_and_restarted_mid_run_every_point_once(
    servers: Servers, tmp_path: Path, grace: float
) -> None:
    address = servers.start()
    port = int(address.rsplit(":", 1)[1])
    client = th.connect(address, settings=_settings(tmp_path, spool_grace=grace))
    run = client.start_run(experiment="restart")
    _log(run, range(0, 2000))
    servers.stop(grace=0.0)  # batches in flight, some acked, some not
    _log(run, range(2000, 4000))  # never raises, never blocks
    assert _until(client, lambda s: s["reconnects"] >= 1)
    if grace == 0.0:
        assert _until(client, lambda s: s["points_spooled"] > 0 and s["batches_spilled"] > 0)
    servers.start(port)
    assert client.flush(timeout=30.0)
    stats = client.stats()
    assert stats["points_acked"] == stats["points_logged"] == 4000 * len(KEYS)
    assert servers.counts() == (4000 * len(KEYS), 4000 * len(KEYS))
    assert client.close(timeout=5.0)
    assert not Path(client.spool_path).exists()  # everything acknowledged: nothing left on disk


def test_server_absent_for_the_whole_run_then_sync(servers: Servers, tmp_path: Path) -> None:
    address = servers.start()
    client = th.connect(address, settings=_settings(tmp_path, spool_grace=0.0))
    run = client.start_run(experiment="absent")
    servers.stop()
    _log(run, range(3000))
    run.log_array("reward", range(5000), [0.5] * 5000)
    run.set_tags({"phase": "offline"})  # the server is away: spooled, not raised
    assert run.finish(timeout=0.5) is False  # bounded; its status update is spooled too
    assert client.close(timeout=1.0) is False
    _let_go(client)
    spool = Path(client.spool_path)
    assert spool.is_dir() and client.stats()["points_spooled"] == 3000 * len(KEYS) + 5000
    backup = tmp_path / "backup"
    shutil.copytree(spool, backup)

    address = servers.start()
    reports = th.sync(spool.parent, url=address)
    assert [r.complete for r in reports] == [True], [r.error for r in reports]
    assert reports[0].points == 3000 * len(KEYS) + 5000
    assert not spool.exists()
    assert servers.counts() == (14000, 14000)
    view = th.connect(address, settings=_settings(tmp_path)).get_run(run.run_id)
    assert view.status == "FINISHED" and view.tags["phase"] == "offline"

    shutil.copytree(backup, spool)  # syncing the same spool again stores nothing twice
    again = th.sync(spool, url=address)
    assert again[0].complete and again[0].duplicate_batches == again[0].batches > 0
    assert servers.counts() == (14000, 14000)


def test_offline_run_synced_twice_is_created_once(servers: Servers, tmp_path: Path) -> None:
    client = th.connect("127.0.0.1:9", mode="offline", settings=_settings(tmp_path))  # nothing listens: never used
    with client.start_run(experiment="offline-exp", name="o1", params={"lr": 0.1}) as run:
        _log(run, range(1000))
        run.log_params({"batch": 32})
    assert client.flush(timeout=5.0)
    assert client.close() is True
    spool = Path(client.spool_path)
    backup = tmp_path / "backup"
    shutil.copytree(spool, backup)

    address = servers.start()
    done = subprocess.run([sys.executable, "-m", "trackhouse.cli.main", "sync", str(spool.parent), "--url", address],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3,000 points" in done.stdout and "1 runs created" in done.stdout
    assert servers.counts() == (3000, 3000)
    reader = th.connect(address, settings=_settings(tmp_path))
    (found,) = reader.search_runs(experiment_names=["offline-exp"])
    assert found.name == "o1" and found.status == "FINISHED"
    assert found.params == {"lr": "0.1", "batch": "32"}

    shutil.copytree(backup, spool)  # a copy from before the first sync: the run is found, not made again
    (again,) = th.sync(spool, url=address)
    assert again.complete and again.runs_created == 0 and again.runs == {run.run_id: found.run_id}
    assert len(list(reader.search_runs(experiment_names=["offline-exp"]))) == 1
    assert servers.counts() == (3000, 3000)


def test_a_corrupt_segment_is_reported_and_the_rest_replayed(servers: Servers, tmp_path: Path) -> None:
    client = th.connect("127.0.0.1:9", mode="offline", settings=_settings(tmp_path, max_batch_points=100))
    run = client.start_run(experiment="corrupt")
    for step in range(50):
        run.log_metrics({f"k{i}": float(i) for i in range(10)}, step=step)
        client.flush(timeout=5.0)  # one 10-point... batch per step: 50 records
    client.close()
    spool = Path(client.spool_path)
    (segment,) = sorted(spool.glob("seg-*.spool"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the segment
    segment.write_bytes(bytes(data))

    address = servers.start()
    (report,) = th.sync(spool, url=address)
    assert report.complete and len(report.corruptions) == 1
    assert str(segment) in str(report.corruptions[0])
    assert report.points == 490  # one 10-point batch lost, every other replayed
    assert servers.counts() == (490, 490)
    kept = Path(report.directory)
    assert kept.name.endswith(".corrupt") and (kept / segment.name).exists()
    assert th.sync(spool.parent, url=address) == []  # kept for inspection, not replayed again


def test_a_restarted_process_replays_what_the_dead_one_spooled(servers: Servers, tmp_path: Path) -> None:
    """Exactly-once across process restarts: the next client adopts the orphaned spool."""
    address = servers.start()
    settings = _settings(tmp_path, spool_grace=0.0, url=address)
    first = th.connect(settings=settings)
    run = first.start_run(experiment="adopt")
    servers.stop()
    _log(run, range(500))
    first.close(timeout=2.0)  # the "dead" process: its points are spooled under its writer id
    _let_go(first)
    assert Path(first.spool_path).is_dir()

    servers.start(int(address.rsplit(":", 1)[1]))  # the same server address: its orphans are ours to replay
    second = th.connect(settings=dataclasses.replace(settings, replay_orphans=True))
    resumed = second.resume_run(run.run_id)  # resume the run by id, go on logging
    _log(resumed, range(500, 600))
    assert second.flush(timeout=30.0)
    assert _until(second, lambda s: s["spools_replayed"] == 1)
    assert not Path(first.spool_path).exists()
    assert servers.counts() == (1800, 1800)
    second.close()


def test_server_retry_delay_is_honoured(fake: Any, tmp_path: Path) -> None:
    conftest = sys.modules[type(fake.ingest).__module__]
    fake.ingest.plan = [conftest.Connection(abort_after=1, retry_delay="0.01")]
    slow = th.Settings(flush_interval=0.02, backoff_initial=60.0, backoff_max=60.0, spool_dir=str(tmp_path))
    client = th.connect(fake.address, settings=slow)
    client.start_run().log(step=0, x=1.0)
    assert client.flush(timeout=20.0)  # without the server's delay the client would wait 30-60 s
    assert client.stats()["reconnects"] == 1
    client.close()
