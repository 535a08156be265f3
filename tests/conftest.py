"""Shared fixtures: one embedded chDB engine per test session, a fresh database per test.

chDB allows one data path per process, so every test in this process shares one
path (a session temp dir) and isolates itself in its own database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import Store, open_store


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("chdb")
    return f"chdb://{path}"


@pytest.fixture
def database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(chdb_dsn: str, database: str) -> Iterator[Store]:
    s = open_store(chdb_dsn, database)
    try:
        yield s
    finally:
        s.close()


@dataclass
class RunningServer:
    address: str
    store: Store
    thread: ServerThread


@pytest.fixture
def server(store: Store) -> Iterator[RunningServer]:
    """The real embedded ingest + query gRPC server on 127.0.0.1, port 0, over this test's database.

    Flushes quickly (50 ms) so tests that wait for acks do not wait on the default age.
    """
    config = ServerConfig(
        store="", database=store.database, grpc_port=0,
        ingest=IngestSettings(flush_interval=0.05),
    )
    thread = ServerThread(config, store=store)
    address = thread.start()
    try:
        yield RunningServer(address, store, thread)
    finally:
        thread.stop(grace=1.0)
