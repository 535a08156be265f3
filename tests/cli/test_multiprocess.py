"""Separate processes: two `trackhouse ingest` replicas and one `trackhouse query` over a ClickHouse server.

The server is the chDB HTTP fixture of this test process (chDB allows one data path
per process, so the subprocesses reach it over HTTP, as replicas reach a real
server). The schema comes from `trackhouse migrate`. A client logs one known
series through both ingest addresses; the first replica is SIGKILLed mid-run; the
client moves to the second; the query service must see every point exactly once.
Readiness: each process prints its bound gRPC address once it serves.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import trackhouse.client as th
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.store import parse_dsn
from trackhouse.store.dsn import connect

STEPS = 3000
READY = re.compile(r"gRPC \((ingest|query)\): (\S+)")


@dataclass
class Service:
    proc: subprocess.Popen[str]
    lines: queue.SimpleQueue[str] = field(default_factory=queue.SimpleQueue)
    output: list[str] = field(default_factory=list)
    bound: str = ""
    reader: threading.Thread | None = None

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def address(self, timeout: float = 60.0) -> str:
        """Wait for the line the process prints once it serves; its gRPC address."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if m := READY.search(line):
                self.bound = m.group(2)
                return self.bound
        raise AssertionError(f"{self.proc.args} did not come up:\n{''.join(self.output)}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trackhouse.cli.main", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKHOUSE_")}
    env["TRACKHOUSE_INGEST_FLUSH_INTERVAL"] = "0.05"
    return env


@pytest.fixture
def services(clickhouse_http_url: str, database: str) -> Iterator[list[Service]]:
    store = ["--store", clickhouse_http_url, "--database", database]
    migrated = subprocess.run(_cli("migrate", *store), env=_env(), capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stderr
    started: list[Service] = []

    def start(*args: str) -> Service:
        proc = subprocess.Popen(_cli(*args, *store, "--port", "0", "--http-port", "0"), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        service = Service(proc)
        service.reader = threading.Thread(target=service.pump, daemon=True)
        service.reader.start()
        started.append(service)
        return service

    try:
        ingest_a, ingest_b = start("ingest"), start("ingest")
        ingest_a.address()
        query = start("query", "--ingest-address", ingest_b.address())
        query.address()
        yield [ingest_a, ingest_b, query]
    finally:
        for service in started:
            if service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
        for service in started:
            try:
                service.proc.wait(30)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(10)
            if service.reader is not None:
                service.reader.join(10)  # EOF once the process is gone
            if service.proc.stdout is not None:
                service.proc.stdout.close()
        client: Any = connect(parse_dsn(clickhouse_http_url))
        try:
            client.command(f"DROP DATABASE IF EXISTS {database}")
        finally:
            client.close()


def _history(query_address: str, run_id: str) -> np.ndarray[Any, Any]:
    with grpc.insecure_channel(query_address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)  # type: ignore[no-untyped-call]
        steps: list[np.ndarray[Any, Any]] = []
        token = ""
        while True:
            page = stub.GetMetricHistory(query_pb2.GetMetricHistoryRequest(
                run_id=run_id, key="loss", page_token=token), timeout=60)
            steps.append(np.frombuffer(page.steps, "<i8"))
            token = page.next_page_token
            if not token:
                return np.concatenate(steps)


def test_killing_an_ingest_replica_mid_run_loses_and_doubles_nothing(
        services: list[Service], tmp_path: Path) -> None:
    ingest_a = services[0]
    for s in services:
        assert s.proc.poll() is None, "".join(s.output)
    a, b, q = (s.bound for s in services)
    settings = th.Settings(flush_interval=0.02, max_batch_points=500, backoff_initial=0.05, backoff_max=0.5,
                           spool_dir=str(tmp_path / "spool"))
    client = th.connect(addresses=[a, b], query_url=q, settings=settings)
    try:
        run = client.start_run(name="multiprocess")
        half = STEPS // 2
        for step in range(half):
            run.log(step=step, loss=float(step))
        assert client.flush(timeout=60.0)  # the first half is acknowledged by replica a
        for step in range(half, STEPS):
            run.log(step=step, loss=float(step))
        ingest_a.proc.send_signal(signal.SIGKILL)  # mid-run: the second half is being sent to a
        ingest_a.proc.wait(30)
        assert client.flush(timeout=120.0)  # resent to replica b
        assert run.finish(timeout=60.0)
    finally:
        client.close(timeout=30.0)
    steps = _history(q, run.run_id)
    assert len(steps) == STEPS
    assert np.array_equal(np.sort(steps), np.arange(STEPS))
