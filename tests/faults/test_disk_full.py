"""The embedded store's disk really fills up: a clear error, nothing acknowledged lost,
no corruption, and normal service once space returns.

The server runs as its own process (`trackhouse serve`) with its chDB data on a small
tmpfs mounted by the test, which a filler file then fills to the last byte. Mounting
needs root (CAP_SYS_ADMIN); where the test cannot mount, it says so and skips — the
injected-error variant in test_faults.py still covers the code path.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import trackhouse.client as th
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc

from ..ingest.test_crash import ServerProcess

_SIZE_MB = 160


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_SIZE_MB}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write a file until the filesystem refuses: the disk is then full."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(filler, "ab", buffering=0) as f:  # the last partial megabyte too
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _batch(run_id: str, seq: int, steps: range) -> ingest_pb2.MetricBatch:
    n = len(steps)
    return ingest_pb2.MetricBatch(
        writer_id="disk-full-probe", seq=seq, run_ids=[run_id], keys=["probe"],
        key_index=np.zeros(n, "<u4").tobytes(), steps=np.array(steps, "<i8").tobytes(),
        timestamps=np.full(n, 1_700_000_000_000, "<i8").tobytes(), values=np.ones(n, "<f8").tobytes())


def test_disk_full_is_a_clear_error_and_service_returns_with_space(small_disk: Path) -> None:
    server = ServerProcess(small_disk / "data")
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        settings = th.Settings(url=address, flush_interval=0.02, backoff_initial=0.05, backoff_max=0.5,
                               rpc_timeout=30.0, spool_dir=str(small_disk.parent / "spool"))
        client = th.connect(settings=settings)
        run = client.start_run(experiment="disk", name="full")
        run.log_array("before", np.arange(5_000), np.ones(5_000))
        assert client.flush(timeout=60)

        filler = _fill(small_disk)
        with grpc.insecure_channel(address) as channel:  # a direct write: what does the server answer?
            ingest = ingest_pb2_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                ingest.LogMetrics(_batch(run.run_id, 1, range(100)), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "disk" in (err.value.details() or "").lower()
        run.log_array("during", np.arange(20_000), np.arange(20_000, dtype=np.float64))
        assert not client.flush(timeout=2)  # nothing of it can be acknowledged while the disk is full
        assert client.stats()["points_acked"] == 5_000
        assert server.proc is not None and server.proc.poll() is None  # the server is still up

        filler.unlink()  # space returns: the client's retries go through by themselves
        assert client.flush(timeout=120)
        run.finish()
        client.close()

        server.stop()  # and the store reopens intact
        server.start()
        reader = th.connect(f"127.0.0.1:{server.port}", settings=th.Settings(rpc_timeout=30.0))
        try:
            rows = reader.sql("SELECT key, count() AS n, uniqExact(step) AS steps, sum(value) AS total "
                              f"FROM metrics WHERE run_id = '{run.run_id}' GROUP BY key ORDER BY key").to_pylist()
        finally:
            reader.close()
        assert rows == [
            {"key": "before", "n": 5_000, "steps": 5_000, "total": 5_000.0},
            {"key": "during", "n": 20_000, "steps": 20_000, "total": float(sum(range(20_000)))},
        ]
    finally:
        server.stop()
        os.sync()
