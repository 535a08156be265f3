"""Fixtures for the MLflow drop-in tests: a real server (gRPC + HTTP on port 0) and MLflow's own client.

One server per module (chDB: one engine per process; a fresh database per module) keeps
these tests fast; tests isolate themselves with their own experiments.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import open_store


@pytest.fixture(scope="module")
def mlflow_server(chdb_dsn: str) -> Iterator[ServerThread]:
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    config = ServerConfig(store="", database=store.database, grpc_port=0, http_port=0,
                          ingest=IngestSettings(flush_interval=0.05))
    thread = ServerThread(config, store=store)
    try:
        thread.start()
        yield thread
    finally:
        thread.stop(grace=1.0)
        store.close()


@pytest.fixture(scope="module")
def base_url(mlflow_server: ServerThread) -> str:
    return f"http://127.0.0.1:{mlflow_server.server.http_port}"


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=base_url)
