"""Compose a trackhouse process: one store, the ingest and/or query services on one gRPC server.

`EmbeddedServer` owns the gRPC server and the store it opened; the apps it runs
(`ServerConfig.services`: both for `trackhouse serve`, one for `trackhouse
ingest` / `trackhouse query`) register their services on it, plus the standard
gRPC health service. The HTTP listener serves /metrics, /health and, with the
query service, the MLflow REST API, whose writes reach ingest through
`GrpcIngestPort` — a gRPC channel to the ingest address (our own port when
ingest runs here, else `ServerConfig.ingest_address`, a load balancer in front
of the ingest replicas). `start()`
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
from trackhouse.query.settings import QuerySettings
from trackhouse.store import Store, StoreError, open_store
from trackhouse.store.settings import StoreSettings

log = logging.getLogger(__name__)

SERVICES = {"ingest": "trackhouse.v1.IngestService", "query": "trackhouse.v1.QueryService"}


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
    services: tuple[str, ...] = ("ingest", "query")
    # Query without ingest in the process: where MLflow REST writes go (None: refused).
    ingest_address: str | None = None
    store_settings: StoreSettings = field(default_factory=StoreSettings)
    # Migrate on start (serve); separate services check the version instead (`trackhouse migrate`).
    migrate: bool = True

    def __post_init__(self) -> None:
        if not self.services or set(self.services) - set(SERVICES):
            raise ValueError(f"services {self.services!r}: run 'ingest', 'query' or both")
        if self.ingest_address is not None and "ingest" in self.services:
            raise ValueError("ingest_address is for a query service without ingest in the same process")


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


class NoIngestPort:
    """The write seam of a query service started without an ingest address: writes are refused."""

    async def call(self, method: str, request: Any) -> Any:
        raise IngestCallError("UNAVAILABLE", f"{method}: this query service has no ingest address "
                                             "(trackhouse query --ingest-address HOST:PORT); it serves reads only")

    async def close(self) -> None:
        return None


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
            self.store = await asyncio.to_thread(self._open_store)
        size = cfg.ingest.max_message_bytes
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ])
        self._apps = [IngestApp(self.store, cfg.ingest, self.registry) if name == "ingest"
                      else QueryApp(self.store, cfg.query) for name in cfg.services]
        for app in self._apps:
            await app.start(self._server)
        health_servicer = health.aio.HealthServicer()
        for name in ("", *(SERVICES[s] for s in cfg.services)):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        self.port = self._server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {cfg.host}:{cfg.grpc_port}")
        await self._server.start()
        log.info("trackhouse %s gRPC on %s:%d, store %s", "+".join(cfg.services), cfg.host, self.port,
                 self.store.dsn.redacted())
        if cfg.http_port is not None:
            try:
                self.http_port = await self._start_http()
            except OSError:
                self._http = None
                await self.stop(grace=0)  # the gRPC side is up already: take it down cleanly
                raise
            log.info("trackhouse HTTP on %s:%d", cfg.host, self.http_port)
        return self.port

    def _open_store(self) -> Store:
        cfg = self.config
        store = open_store(cfg.store, cfg.database, migrate=cfg.migrate, settings=cfg.store_settings)
        if not cfg.migrate:
            try:
                store.check_schema()
            except StoreError:
                store.close()
                raise
        return store

    async def _start_http(self) -> int:
        cfg = self.config
        assert self.store is not None
        routes = []
        query_app = next((a for a in self._apps if isinstance(a, QueryApp)), None)
        if query_app is not None:
            if "ingest" in cfg.services:
                self._ingest_port = GrpcIngestPort(f"{_dial_host(cfg.host)}:{self.port}", cfg.ingest.max_message_bytes)
            elif cfg.ingest_address is not None:
                self._ingest_port = GrpcIngestPort(cfg.ingest_address, cfg.ingest.max_message_bytes)
            port = self._ingest_port if self._ingest_port is not None else NoIngestPort()
            routes = mlflow_routes(MlflowApi(self.store, query_app.search, query_app.history, port))
        self._http = HttpListener(build_app(self.registry, self.health, routes), cfg.host, cfg.http_port or 0)
        return await self._http.start()

    def health(self) -> dict[str, Any]:
        assert self.store is not None
        return {"status": "ok", "grpc_port": self.port, "store": self.store.dsn.redacted(),
                "database": self.store.database, "services": [SERVICES[s] for s in self.config.services]}

    @property
    def ingest(self) -> IngestApp:
        app = next((a for a in self._apps if isinstance(a, IngestApp)), None)
        assert app is not None, "this server runs no ingest service"
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
