"""Shared fixtures: one embedded chDB engine per test session, a fresh database per test.

chDB allows one data path per process, so every test in this process shares one
path (a session temp dir) and isolates itself in its own database.

The same engine is also served over ClickHouse's HTTP interface
(`clickhouse_http_url`, tests/support/chhttp.py), or a real ClickHouse server is
used when TRACKHOUSE_TEST_CLICKHOUSE_URL is set. `store_url` picks the
deployment the `store` fixture opens: the embedded engine unless a test asks for
"http" (`@pytest.mark.parametrize("store_url", ["http"], indirect=True)`);
tests/store runs every `store` test over both.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import Store, open_store, parse_dsn
from trackhouse.store.dsn import connect

CLICKHOUSE_URL_ENV = "TRACKHOUSE_TEST_CLICKHOUSE_URL"
FUZZ_EXAMPLES_ENV = "TRACKHOUSE_FUZZ_EXAMPLES"

# Fuzz tests (hypothesis): modest by default so the suite stays fast; `--hypothesis-profile=soak`
# or TRACKHOUSE_FUZZ_EXAMPLES=N runs more. No deadline: a shared CI machine must not turn a
# slow example into a failure (hangs are caught by pytest-timeout instead).
settings.register_profile(
    "default",
    max_examples=int(os.environ.get(FUZZ_EXAMPLES_ENV, "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "soak",
    parent=settings.get_profile("default"),
    max_examples=int(os.environ.get(FUZZ_EXAMPLES_ENV, "20000")),
)
settings.load_profile("default")
DEPLOYMENTS = ("chdb", "http")


def _load_support(name: str) -> ModuleType:
    """Import tests/support/<name>.py by path.

    tests/ is not on sys.path (importlib import mode; pytest's pythonpath lists only
    the six source roots, and tests/test_layout.py keeps it so), so the support
    modules are loaded from their files, once, under a private module name.
    """
    module_name = f"_trackhouse_test_support_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).parent / "support" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chhttp = _load_support("chhttp")


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("chdb")
    return f"chdb://{path}"


@pytest.fixture
def database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def chhttp_module() -> ModuleType:
    """tests/support/chhttp.py, for the tests of the fixture itself."""
    return chhttp


@pytest.fixture(scope="session")
def clickhouse_http_url(chdb_dsn: str) -> Iterator[str]:
    """A ClickHouse HTTP endpoint as a store DSN: $TRACKHOUSE_TEST_CLICKHOUSE_URL, else chDB served over HTTP.

    The fixture serves the session's own chDB path (one path per process), so the
    embedded and HTTP deployments see the same databases.
    """
    url = os.environ.get(CLICKHOUSE_URL_ENV, "")
    if url:
        yield url
        return
    server = chhttp.ChHttpServer(parse_dsn(chdb_dsn).path, password="fixture")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def store_url(request: pytest.FixtureRequest, chdb_dsn: str) -> str:
    """The DSN `store` opens: chdb_dsn, or clickhouse_http_url when parametrized (indirectly) with "http"."""
    deployment = getattr(request, "param", "chdb")
    assert deployment in DEPLOYMENTS, f"store_url: unknown deployment {deployment!r}, use one of {DEPLOYMENTS}"
    return chdb_dsn if deployment == "chdb" else str(request.getfixturevalue("clickhouse_http_url"))


@pytest.fixture
def store(store_url: str, database: str) -> Iterator[Store]:
    s = open_store(store_url, database)
    try:
        yield s
    finally:
        s.close()
        if not parse_dsn(store_url).embedded:
            _drop_database(store_url, database)  # a real server outlives the session: leave nothing behind


def _drop_database(url: str, database: str) -> None:
    client: Any = connect(parse_dsn(url))
    try:
        client.command(f"DROP DATABASE IF EXISTS {database}")
    finally:
        client.close()


@dataclass
class RunningServer:
    address: str
    store: Store
    thread: ServerThread


@contextmanager
def running_server(store: Store, http: bool = False, **config_fields: Any) -> Iterator[ServerThread]:
    """The real embedded server (gRPC, and HTTP when asked) on 127.0.0.1, free ports, over `store`.

    Flushes quickly (50 ms) so tests that wait for acks do not wait on the default age.
    `config_fields` override ServerConfig fields (auth="on", tls_cert=..., ...).
    """
    config_fields.setdefault("ingest", IngestSettings(flush_interval=0.05))
    config = ServerConfig(store="", database=store.database, grpc_port=0, http_port=0 if http else None,
                          **config_fields)
    thread = ServerThread(config, store=store)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop(grace=1.0)


@pytest.fixture(scope="session")
def module_server_factory(chdb_dsn: str) -> Callable[..., AbstractContextManager[ServerThread]]:
    """For module-scoped servers: `with module_server_factory(http=True) as thread:` — a server over
    a fresh database of its own, closed with it."""

    @contextmanager
    def start(http: bool = False) -> Iterator[ServerThread]:
        store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
        try:
            with running_server(store, http) as thread:
                yield thread
        finally:
            store.close()

    return start


@pytest.fixture
def http_server(store: Store) -> Iterator[ServerThread]:
    """The embedded server with its HTTP listener too (MLflow REST, /metrics, /health), free ports."""
    with running_server(store, http=True) as thread:
        yield thread


@pytest.fixture
def server(store: Store) -> Iterator[RunningServer]:
    """The real embedded ingest + query gRPC server on 127.0.0.1, port 0, over this test's database."""
    with running_server(store) as thread:
        yield RunningServer(thread.address, store, thread)


@pytest.fixture
def start_server(store: Store) -> Callable[..., AbstractContextManager[ServerThread]]:
    """`with start_server(http=True, auth="on") as thread:` — the embedded server over `store`,
    with ServerConfig fields overridden (auth, TLS files, ...)."""

    def start(http: bool = False, **config_fields: Any) -> AbstractContextManager[ServerThread]:
        return running_server(store, http, **config_fields)

    return start
