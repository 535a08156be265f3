"""The HTTP listener of a trackhouse process: one ASGI app under uvicorn, in the server's loop.

Owns the socket (bound here, so the port is known before serving and port 0
works as in tests) and the uvicorn server. The routes come from the services:
`/metrics` (Prometheus text, from the process's registry) and `/health` here;
the query service adds its own (the MLflow REST API) as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator, Sequence
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the trackhouse process owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def build_app(registry: CollectorRegistry, health: Callable[[], dict[str, Any]],
              routes: Sequence[BaseRoute] = ()) -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(health())

    return Starlette(routes=[Route("/metrics", metrics), Route("/health", healthz), *routes])


class HttpListener:
    """Serves `app` on host:port; over TLS when given a PEM certificate and key."""

    def __init__(self, app: Any, host: str, port: int, tls_cert: str = "", tls_key: str = "") -> None:
        self._app = app
        self._tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key} if tls_cert else {}
        self._host = host
        self._port = port
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot bind HTTP to {self._host}:{self._port}: {exc.strerror}") from None
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off",
                                **self._tls)  # type: ignore[arg-type]
        try:
            config.load()  # reads the certificate and key now: a bad file fails start(), not the task
        except (OSError, ValueError) as exc:
            sock.close()
            raise OSError(f"cannot serve HTTPS with {self._tls.get('ssl_certfile')}: {exc}") from None
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="trackhouse-http")
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None
