"""Compose the embedded deployment: one store, ingest and query on one gRPC server.

`EmbeddedServer` owns the gRPC server and the store it opened; the ingest and
query apps register their services on it, plus the standard gRPC health
service. The HTTP listener serves /metrics, /health, `POST /api/v1/sql` and the MLflow REST API,
whose writes reach ingest through `GrpcIngestPort` — a gRPC channel to the
ingest address (here our own port), as they would across processes. `start()`
returns the bound port (port 0 picks a free one, as tests do). `ServerThread`
runs one on its own event loop in a background thread, for callers that are not async (tests, benchmarks, the demo).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from trackhouse.cli.http import HttpListener, build_app
from trackhouse.ingest.app import IngestApp
from trackhouse.ingest.settings import IngestSettings
from trackhouse.query.app import QueryApp
from trackhouse.query.http.errors import IngestCallError
from trackhouse.query.http.mlflow_api import MlflowApi
from trackhouse.query.http.routes import mlflow_routes
from trackhouse.query.http.sql import sql_routes
from trackhouse.query.settings import QuerySettings
from trackhouse.store import Store, open_store

log = logging.getLogger(__name__)

SERVICES = ("trackhouse.v1.IngestService", "trackhouse.v1.QueryService")


@dataclass(frozen=True)
class ServerConfig:
    store: str
    database: str = "trackhouse"
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    # None: no HTTP listener (tests that need only gRPC); 0 picks a free port.
    http_port: int | None = None
    ingest: IngestSettings = field(default_factory=IngestSettings)
    query: QuerySettings = field(default_factory=QuerySettings)


class GrpcIngestPort:
    """The MLflow API's write seam over gRPC: unary IngestService calls, errors translated.

    grpc stays here (a seam module); the query package sees only IngestCallError.
    """

    def __init__(self, address: str, max_message_bytes: int, timeout: float = 60.0) -> None:
        from trackhouse.proto.v1 import ingest_pb2_grpc

        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ])
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise IngestCallError(exc.code().name, exc.details() or "") from None

    async def close(self) -> None:
        await self._channel.close()


def _dial_host(host: str) -> str:
    """Where to reach our own listener: a wildcard bind is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)


class EmbeddedServer:
    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self._given_store = store
        self.store: Store | None = store
        self.port = 0
        self.http_port = 0
        self.registry = CollectorRegistry()
        self._http: HttpListener | None = None
        self._server: Any = None
        self._apps: list[IngestApp | QueryApp] = []
        self._ingest_port: GrpcIngestPort | None = None

    async def start(self) -> int:
        cfg = self.config
        if self.store is None:
            self.store = await asyncio.to_thread(open_store, cfg.store, cfg.database)
        size = cfg.ingest.max_message_bytes
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ])
        self._apps = [IngestApp(self.store, cfg.ingest, self.registry), QueryApp(self.store, cfg.query)]
        for app in self._apps:
            await app.start(self._server)
        health_servicer = health.aio.HealthServicer()
        for name in ("", *SERVICES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        self.port = self._server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {cfg.host}:{cfg.grpc_port}")
        await self._server.start()
        log.info("trackhouse gRPC on %s:%d, store %s", cfg.host, self.port, self.store.dsn.redacted())
        if cfg.http_port is not None:
            query_app = self._apps[1]
            assert isinstance(query_app, QueryApp)
            self._ingest_port = GrpcIngestPort(f"{_dial_host(cfg.host)}:{self.port}", size)
            api = MlflowApi(self.store, query_app.search, query_app.history, self._ingest_port)
            http_app = build_app(self.registry, self.health, [*mlflow_routes(api), *sql_routes(query_app.sql)])
            self._http = HttpListener(http_app, cfg.host, cfg.http_port)
            try:
                self.http_port = await self._http.start()
            except OSError:
                self._http = None
                await self.stop(grace=0)  # the gRPC side is up already: take it down cleanly
                raise
            log.info("trackhouse HTTP on %s:%d", cfg.host, self.http_port)
        return self.port

    def health(self) -> dict[str, Any]:
        assert self.store is not None
        return {"status": "ok", "grpc_port": self.port, "store": self.store.dsn.redacted(),
                "database": self.store.database, "services": list(SERVICES)}

    @property
    def ingest(self) -> IngestApp:
        app = self._apps[0]
        assert isinstance(app, IngestApp)
        return app

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, flush what ingest buffered, close the store if we opened it."""
        if self._http is not None:
            await self._http.stop()
        if self._ingest_port is not None:
            await self._ingest_port.close()
        if self._server is not None:
            await self._server.stop(grace)
        for app in self._apps:
            await app.stop()
        if self._given_store is None and self.store is not None:
            await asyncio.to_thread(self.store.close)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available (the servers' loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a server dependency
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class ServerThread:
    """An EmbeddedServer on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.server = EmbeddedServer(config, store)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trackhouse-server", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.server.config.host}:{self.server.port}"

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> str:
        self._thread.start()
        self.run(self.server.start())
        return self.address

    def stop(self, grace: float = 5.0) -> None:
        try:
            self.run(self.server.stop(grace))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
