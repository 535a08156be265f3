"""kill -9 the server in the middle of streams, restart it: stored == sent, zero duplicates.

The server runs as a separate process (`trackhouse serve`) over its own store
directory, so it can be killed for real; the client library reconnects and
replays what was not acknowledged, and the (writer_id, seq) dedupe — reloaded
from the store after the restart — keeps every point exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import trackhouse.client as th

_ADDRESS = re.compile(r"gRPC \(ingest \+ query\): 127\.0\.0\.1:(\d+)")


class ServerProcess:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "trackhouse.cli.main", "serve", "--store", f"chdb://{self.data}",
               "--grpc-port", str(self.port), "--http-port", "0"]
        env = {**os.environ, "TRACKHOUSE_INGEST_FLUSH_INTERVAL": "0.05"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # the server prints its address once it serves
            match = _ADDRESS.search(line)
            if match:
                self.port = int(match.group(1))
                return
        raise RuntimeError(f"server exited with {self.proc.wait()} before serving")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._close()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_kill_9_mid_stream_then_restart_loses_and_duplicates_nothing(server_process: ServerProcess) -> None:
    settings = th.Settings(url=f"127.0.0.1:{server_process.port}", flush_interval=0.02, max_batch_points=500,
                           backoff_initial=0.05, backoff_max=0.5, rpc_timeout=60.0)
    client = th.connect(settings=settings)
    runs = [client.start_run(experiment="crash", name=f"rank-{i}") for i in range(3)]
    steps, keys = 3000, ("loss", "acc")

    def log(first: int, last: int) -> None:
        for step in range(first, last):
            for run in runs:
                run.log_metrics({k: step * 0.5 for k in keys}, step=step)

    log(0, 1000)
    assert client.flush(timeout=60)
    log(1000, 2000)                      # these are in flight or buffered when the server dies
    server_process.kill()
    log(2000, 2500)                      # logged while the server is down
    server_process.start()               # same port, same store: the client reconnects and replays
    log(2500, steps)
    assert client.flush(timeout=120), client.stats()
    for run in runs:
        for key in keys:
            table = client.metric_history(run.run_id, key)
            stored = table.column("step").to_pylist()
            assert len(stored) == steps, f"{run.run_id}/{key}: {len(stored)} points stored, {steps} sent"
            assert stored == list(range(steps)), f"{run.run_id}/{key}: lost or duplicated steps"
    client.close(timeout=30)
