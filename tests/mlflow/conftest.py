"""Fixtures for the MLflow drop-in tests: a real server (gRPC + HTTP on port 0) and MLflow's own client.

One server per module (chDB: one engine per process; a fresh database per module) keeps
these tests fast; tests isolate themselves with their own experiments.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from trackhouse.cli.server import ServerThread


@pytest.fixture(scope="module")
def mlflow_server(module_server_factory: Any) -> Iterator[ServerThread]:
    with module_server_factory(http=True) as thread:
        yield thread


@pytest.fixture(scope="module")
def base_url(mlflow_server: ServerThread) -> str:
    return f"http://127.0.0.1:{mlflow_server.server.http_port}"


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=base_url)
