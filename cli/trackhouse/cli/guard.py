"""The auth seams of a trackhouse process: a gRPC server interceptor and an ASGI middleware.

Both read `authorization: Bearer …` (gRPC metadata, HTTP header), turn it into a
`Principal` with the shared `Authenticator` (token lookups cached for a few
seconds), check the scope the call needs (`trackhouse.store.auth.grpc_scope`,
`http_scope`) and bind the principal for the duration of the call, where
handlers read it with `current_principal()`. Refusals: UNAUTHENTICATED /
PERMISSION_DENIED on gRPC; 401 / 403 with MLflow's error body on HTTP.

`auth_enabled()` is the rule of TRACKHOUSE_SERVER_AUTH: `auto` turns auth on iff
the bind address is not loopback.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson

from trackhouse.store.auth import (
    Authenticator,
    AuthError,
    PermissionDenied,
    Principal,
    authorize,
    bind_principal,
    grpc_scope,
    http_scope,
    unbind_principal,
)

log = logging.getLogger(__name__)

AUTH_MODES = ("auto", "on", "off")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost, or a wildcard: reachable from elsewhere
        return False


def auth_enabled(mode: str, host: str) -> bool:
    if mode not in AUTH_MODES:
        raise ValueError(f"auth mode {mode!r}: use one of {', '.join(AUTH_MODES)}")
    return mode == "on" or (mode == "auto" and not is_loopback(host))


def _header(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _code(exc: AuthError) -> grpc.StatusCode:
    return grpc.StatusCode.PERMISSION_DENIED if isinstance(exc, PermissionDenied) else grpc.StatusCode.UNAUTHENTICATED


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorizes every RPC except the health service's."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        required = grpc_scope(details.method)
        if handler is None or required is None:
            return handler
        try:
            principal = await self._authenticator.authenticate(_header(details.invocation_metadata))
            authorize(principal, required, details.method)
        except AuthError as exc:
            return _refusal(handler, _code(exc), str(exc))
        return _bound(handler, principal)


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    return _same_kind(handler, refuse, refuse)


def _bound(handler: Any, principal: Principal) -> Any:
    """`handler` with `principal` bound while its behaviour runs."""
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = bind_principal(principal)
        try:
            return await inner(request, context)
        finally:
            unbind_principal(token)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # Each RPC runs in its own task: bound for the whole stream, tasks it starts inherit it.
        bind_principal(principal)
        async for item in inner(request, context):
            yield item

    return _same_kind(handler, unary, streaming)


def _same_kind(handler: Any, unary_response: Any, stream_response: Any) -> Any:
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, **kw)
    return grpc.stream_stream_rpc_method_handler(stream_response, **kw)


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class HttpAuthMiddleware:
    """ASGI middleware: every HTTP path but /health needs a token with the path's scope.

    Refusals carry MLflow's error body: {"error_code": "UNAUTHENTICATED" | "PERMISSION_DENIED",
    "message": …}. The principal is bound (contextvar) and also left in `request.state.principal`.
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self._app = app
        self._authenticator = authenticator

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        required = http_scope(scope["path"])
        if required is None:
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        try:
            principal = await self._authenticator.authenticate(headers.get("authorization"))
            authorize(principal, required, f"{scope['method']} {scope['path']}")
        except AuthError as exc:
            denied = isinstance(exc, PermissionDenied)
            await _send_error(send, 403 if denied else 401,
                              "PERMISSION_DENIED" if denied else "UNAUTHENTICATED", str(exc))
            return
        scope.setdefault("state", {})["principal"] = principal
        token = bind_principal(principal)
        try:
            await self._app(scope, receive, send)
        finally:
            unbind_principal(token)


async def _send_error(send: Callable[[Any], Awaitable[None]], status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error_code": code, "message": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="trackhouse"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
