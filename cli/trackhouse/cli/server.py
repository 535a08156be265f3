"""Compose a trackhouse process: one store, the ingest and/or query services on one gRPC server.

`EmbeddedServer` owns the gRPC server and the store it opened; the apps it runs
(`ServerConfig.services`: both for `trackhouse serve`, one for `trackhouse
ingest` / `trackhouse query`) register their services on it, plus the standard
gRPC health service. The HTTP listener serves /metrics, /health and, with the
query service, `POST /api/v1/sql` and the MLflow REST API, whose writes reach ingest through
`GrpcIngestPort` — a gRPC channel to the ingest address (our own port when
ingest runs here, else `ServerConfig.ingest_address`, a load balancer in front
of the ingest replicas). `start()`
returns the bound port (port 0 picks a free one, as tests do). `ServerThread`
runs one on its own event loop in a background thread, for callers that are not async (tests, benchmarks, the demo).

Security (docs/security.md): with auth on (`auth_enabled`: TRACKHOUSE_SERVER_AUTH, `auto` =
on iff the bind address is not loopback) both listeners check API tokens (cli/guard.py);
with a cert and key both serve TLS. The MLflow API's writes then reach ingest over a
private unix socket (a TLS hop to our own port would need the certificate to name it),
still carrying the caller's own token, so they are authorized as the caller.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from trackhouse.cli.guard import GrpcAuthInterceptor, HttpAuthMiddleware, auth_enabled
from trackhouse.cli.http import HttpListener, build_app
from trackhouse.ingest.app import IngestApp
from trackhouse.ingest.settings import IngestSettings
from trackhouse.query.app import QueryApp
from trackhouse.query.http.errors import IngestCallError
from trackhouse.query.http.mlflow_api import MlflowApi
from trackhouse.query.http.routes import mlflow_routes
from trackhouse.query.http.sql import sql_routes
from trackhouse.query.scope import sql_experiments
from trackhouse.query.settings import QuerySettings
from trackhouse.store import Store, StoreError, open_store
from trackhouse.store.auth import Authenticator, current_principal
from trackhouse.store.settings import StoreSettings

log = logging.getLogger(__name__)

SERVICES = {"ingest": "trackhouse.v1.IngestService", "query": "trackhouse.v1.QueryService"}


class _Malformed:
    """A request whose bytes are not the method's message: answered INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, error: Exception) -> None:
        self.message = f"malformed request: the message does not parse ({error})"


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever hostile bytes make a parser raise
            return _Malformed(exc)

    return deserialize


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class _Checked:
    """A request stream that ends at the first malformed message and remembers it.

    It is read on the handler's own tasks (StreamMetrics reads in a task of its
    own), so it must not abort the call itself: the wrapper aborts once the
    handler has answered what came before.
    """

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests
        self.malformed: _Malformed | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for request in self._requests:
            if isinstance(request, _Malformed):
                self.malformed = request
                return
            yield request

    async def refuse(self, context: grpc.aio.ServicerContext) -> None:
        if self.malformed is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.malformed.message)


async def _replies(result: Any) -> AsyncIterator[Any]:
    """The replies of a streaming behaviour: an async generator, or a coroutine that
    writes through its context (as the auth interceptor's refusals do)."""
    if hasattr(result, "__aiter__"):
        async for reply in result:
            yield reply
    else:
        await result


class MalformedRequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bytes that do not parse as the request message end the call with INVALID_ARGUMENT.

    gRPC answers a deserializer's exception with UNKNOWN; a client cannot tell that
    from a server bug. Requests are parsed leniently and refused here instead.
    """

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _lenient(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await _refuse(request, context)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=parse, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await _refuse(request, context)
                async for reply in _replies(inner_us(request, context)):
                    yield reply

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                checked = _Checked(requests)
                reply = await inner_su(checked.__aiter__(), context)
                await checked.refuse(context)
                return reply

            return handler._replace(request_deserializer=parse, stream_unary=stream_unary)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            checked = _Checked(requests)
            async for reply in _replies(inner_ss(checked.__aiter__(), context)):
                yield reply
            await checked.refuse(context)

        return handler._replace(request_deserializer=parse, stream_stream=stream_stream)


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
    # auto: auth on iff `host` is not loopback; on; off.
    auth: str = "auto"
    # Seconds a token lookup is cached: a revoke takes effect within it.
    auth_cache_ttl: float = 5.0
    # PEM files: both set, both listeners serve TLS only.
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        if not self.services or set(self.services) - set(SERVICES):
            raise ValueError(f"services {self.services!r}: run 'ingest', 'query' or both")
        if self.ingest_address is not None and "ingest" in self.services:
            raise ValueError("ingest_address is for a query service without ingest in the same process")

    @property
    def auth_on(self) -> bool:
        return auth_enabled(self.auth, self.host)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


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
            bearer = current_principal().bearer  # act as the HTTP caller, never as more
            metadata = (("authorization", bearer),) if bearer else None
            return await getattr(self._stub, method)(request, timeout=self._timeout, metadata=metadata)
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
        self._socket_dir: str | None = None
        self.authenticator: Authenticator | None = None

    def _start_auth(self, store: Store) -> list[Any]:
        """The interceptors of the gRPC server: the token check when auth is on."""
        cfg = self.config
        if not cfg.auth_on:
            log.warning("auth is off (TRACKHOUSE_SERVER_AUTH=%s, bind %s): every caller may read and write",
                        cfg.auth, cfg.host)
            return []

        async def load(token_id: str) -> Any:
            return await store.call(store.get_token, token_id)

        self.authenticator = Authenticator(load, ttl=cfg.auth_cache_ttl)
        tokens = store.list_tokens()
        live = sum(1 for t in tokens if not t.revoked)
        log.info("auth is on: %d live API token(s)%s", live, "" if live else (
            "; every call will be refused until one exists: trackhouse token create --name NAME "
            "--scope admin --store DSN"))
        return [GrpcAuthInterceptor(self.authenticator)]

    def _bind_grpc(self) -> int:
        cfg = self.config
        address = f"{cfg.host}:{cfg.grpc_port}"
        if not cfg.tls:
            return int(self._server.add_insecure_port(address))
        with open(cfg.tls_key, "rb") as key, open(cfg.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        return int(self._server.add_secure_port(address, credentials))

    def _internal_address(self) -> str:
        """Where the MLflow API reaches ingest: our own port, or a private unix socket under TLS."""
        if not self.config.tls:
            return f"{_dial_host(self.config.host)}:{self.port}"
        self._socket_dir = tempfile.mkdtemp(prefix="trackhouse-")  # mode 0700: this user only
        address = f"unix:{self._socket_dir}/ingest.sock"
        if not self._server.add_insecure_port(address):
            raise OSError(f"cannot bind the internal socket {address}")
        return address

    async def start(self) -> int:
        cfg = self.config
        if self.store is None:
            self.store = await asyncio.to_thread(self._open_store)
        size = cfg.ingest.max_message_bytes
        interceptors = await asyncio.to_thread(self._start_auth, self.store)
        self._server = grpc.aio.server(interceptors=[MalformedRequestGuard(), *interceptors], options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ])
        self._apps = [IngestApp(self.store, cfg.ingest, self.registry) if name == "ingest"
                      else QueryApp(self.store, cfg.query, self.registry) for name in cfg.services]
        for app in self._apps:
            await app.start(self._server)
        health_servicer = health.aio.HealthServicer()
        for name in ("", *(SERVICES[s] for s in cfg.services)):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        self.port = self._bind_grpc()
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {cfg.host}:{cfg.grpc_port}")
        # Where the MLflow API reaches an ingest service in this process.
        internal = self._internal_address() if cfg.http_port is not None and "ingest" in cfg.services else ""
        await self._server.start()
        log.info("trackhouse %s gRPC on %s:%d, store %s", "+".join(cfg.services), cfg.host, self.port,
                 self.store.dsn.redacted())
        if cfg.http_port is not None:
            try:
                self.http_port = await self._start_http(internal)
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

    async def _start_http(self, internal: str) -> int:
        """The HTTP listener: /metrics, /health and, with the query service, the MLflow REST API.

        `internal`: this process's own ingest (see `_internal_address`), or "" without one.
        """
        cfg = self.config
        assert self.store is not None
        routes = []
        query_app = next((a for a in self._apps if isinstance(a, QueryApp)), None)
        if query_app is not None:
            if internal:
                self._ingest_port = GrpcIngestPort(internal, cfg.ingest.max_message_bytes)
            elif cfg.ingest_address is not None:
                self._ingest_port = GrpcIngestPort(cfg.ingest_address, cfg.ingest.max_message_bytes)
            port = self._ingest_port if self._ingest_port is not None else NoIngestPort()
            routes = [*mlflow_routes(MlflowApi(self.store, query_app.search, query_app.history, port)),
                      *sql_routes(query_app.sql, sql_experiments)]
        http_app: Any = build_app(self.registry, self.health, routes)
        if self.authenticator is not None:
            http_app = HttpAuthMiddleware(http_app, self.authenticator)
        self._http = HttpListener(http_app, cfg.host, cfg.http_port or 0, cfg.tls_cert, cfg.tls_key)
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
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

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
