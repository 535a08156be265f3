"""ClickHouse's HTTP interface served from chDB: a test fixture, not a product.

No ClickHouse server can be installed where CI runs, so this serves the part of
the HTTP protocol that clickhouse-connect 1.12 speaks (read from its
`driver/_backend/httpcommon.py` and `http_sync.py`) on top of the real engine,
chDB, over the data path the test session already uses (one path per process).

Requests (POST or GET on `/`; `GET /ping` and `GET /` answer `Ok.`):

- the statement is the `query` URL parameter followed by the body, or the body
  alone; `INSERT … FORMAT <fmt>` then a newline starts the data: the rest of the
  body (clickhouse-connect's Native inserts), or the whole body when the INSERT
  is the `query` parameter (its Arrow inserts). Data goes to chDB's streaming
  insert; any other statement runs as one chDB query.
- `param_<name>` binds server-side parameters; `database` is the current
  database; `default_format` the output format when the SQL names none;
  `session_id` pins the request to one chDB connection kept for the session
  (sessions never expire before the fixture stops); `query_id` is echoed.
  Transport parameters are consumed here; every other parameter is a setting,
  applied with SET for this request only.
- `multipart/form-data` bodies (clickhouse-connect's form encoding of large
  bind parameters) carry `query` and `param_*` fields; external data is refused
  (NOT_IMPLEMENTED).
- a `Content-Encoding` of lz4, zstd, gzip or deflate on the body is decoded.
- user and password: HTTP basic auth, `X-ClickHouse-User`/`-Key`, or the
  `user`/`password` parameters; a wrong one gets AUTHENTICATION_FAILED.

Replies carry the body in the requested format, compressed with the first of
the client's `Accept-Encoding` codecs this fixture knows when the request set
`enable_http_compression=1` (or left it at the engine's default, 1 in chDB), and the headers clickhouse-connect reads:
X-ClickHouse-Summary (JSON), -Format (only for statements with a result),
-Timezone, -Query-Id, -Server-Display-Name. Errors are an HTTP 4xx/5xx (the
server's own code-to-status mapping) with `Code: N. DB::Exception: …` as the
body and X-ClickHouse-Exception-Code. With `wait_end_of_query=1` (what
clickhouse-connect sends for non-streaming queries) the result is complete
before the reply starts; without it, stream-safe formats are streamed chunk by
chunk from chDB, and an error after the first chunk aborts the connection.

Not served: the native-compressed (`compress`/`decompress`) block format,
progress headers, external data, query cancellation, roles and quotas.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import gzip
import json
import queue
import re
import socket
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import chdb
import lz4.frame  # type: ignore[import-untyped]
import uvicorn
from backports import zstd
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

# URL parameters the HTTP handler consumes itself; anything else is a setting.
TRANSPORT_PARAMS = frozenset({
    "query", "database", "default_format", "session_id", "session_timeout", "session_check", "query_id",
    "quota_key", "compress", "decompress", "buffer_size", "wait_end_of_query", "client_protocol_version",
    "role", "user", "password", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "enable_http_compression", "cancel_http_readonly_queries_on_client_close",
})
STREAM_SAFE_FORMATS = frozenset({"Native", "TabSeparated", "TSV", "CSV", "RowBinary", "JSONEachRow"})
_TSV = "text/tab-separated-values; charset=UTF-8"
CONTENT_TYPES = {"TabSeparated": _TSV, "TSV": _TSV, "CSV": "text/csv; charset=UTF-8",
                 "JSON": "application/json; charset=UTF-8", "JSONEachRow": "application/x-ndjson; charset=UTF-8"}
# The server's exceptionCodeToHTTPStatus, for the codes tests can meet.
HTTP_STATUS = {
    **dict.fromkeys((6, 25, 26, 27, 36, 38, 41, 42, 43, 53, 62, 72, 117), 400),  # parse, syntax, bad arguments
    **dict.fromkeys((46, 47, 50, 56, 60, 63, 73, 81, 115), 404),  # unknown table, database, setting, ...
    516: 403, 48: 501, 159: 504,
}
_INSERT_HEAD = re.compile(rb"\s*(INSERT\s.*?)\s+FORMAT\s+(\w+)[ \t]*\r?\n", re.IGNORECASE | re.DOTALL)
_INSERT_PARAM = re.compile(r"\s*(INSERT\s.*?)\s+FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_CODE = re.compile(r"Code: (\d+)\.")
_COMMENTS = re.compile(r"(--[^\n]*|/\*.*?\*/)", re.DOTALL)
_RESULT_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "VALUES"})
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ChError(Exception):
    """A ClickHouse exception: its code and its `Code: N. DB::Exception: …` text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def from_engine(cls, exc: BaseException) -> ChError:
        # chDB cannot decode a message quoting bytes that are not UTF-8 (a name spelled with
        # `\xNN`); the server sends such bytes as they are: kept here as surrogates.
        raw = exc.object if isinstance(exc, UnicodeDecodeError) else None
        message = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(exc)
        match = _CODE.search(message)
        if match is None:
            return cls(1001, f"Code: 1001. DB::Exception: {message}. (STD_EXCEPTION)")
        return cls(int(match.group(1)), message[match.start():].strip())


@dataclass
class Statement:
    """One request, parsed: what to run and how (pure data; no I/O)."""

    sql: str
    data: bytes | None = None  # insert data, when `sql` is `INSERT … ` without FORMAT
    data_format: str = ""
    params: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    database: str = ""
    session_id: str = ""
    default_format: str = "TabSeparated"
    wait_end: bool = False

    @property
    def output_format(self) -> str:
        match = _TRAILING_FORMAT.search(self.sql)
        return match.group(1) if match else self.default_format

    @property
    def has_result(self) -> bool:
        """Whether the server would answer with a result (and an X-ClickHouse-Format header)."""
        if self.data is not None:
            return False
        words = _COMMENTS.sub(" ", self.sql).lstrip(" \t\r\n(").split(None, 1)
        return bool(words) and words[0].upper() in _RESULT_KEYWORDS

    @property
    def changes_connection(self) -> bool:
        words = _COMMENTS.sub(" ", self.sql).split(None, 1)
        return bool(words) and words[0].upper() in ("SET", "USE")


def decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "zstd":
        return zstd.decompress(body)
    if encoding == "lz4":  # one frame per block, concatenated
        out, rest = bytearray(), body
        while rest:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out += decompressor.decompress(rest)
            rest = decompressor.unused_data
        return bytes(out)
    raise ChError(48, f"Code: 48. DB::Exception: Unsupported Content-Encoding {encoding!r}. (NOT_IMPLEMENTED)")


def parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            raise ChError(48, "Code: 48. DB::Exception: External data is not served by this fixture. (NOT_IMPLEMENTED)")
        payload = part.get_payload(decode=True)
        fields[str(name)] = payload.decode() if isinstance(payload, bytes) else ""
    return fields


def parse_statement(params: dict[str, str], body: bytes) -> Statement:
    """Split URL parameters and the (decoded) body into a Statement, as the server's HTTP handler does."""
    stmt = Statement(sql="", database=params.get("database", ""), session_id=params.get("session_id", ""),
                     default_format=params.get("default_format") or "TabSeparated",
                     wait_end=params.get("wait_end_of_query") == "1")
    for key, value in params.items():
        if key.startswith("param_"):
            stmt.params[key[6:]] = value
        elif key not in TRANSPORT_PARAMS:
            if not _SETTING_NAME.fullmatch(key):
                raise ChError(115, f"Code: 115. DB::Exception: Unknown setting '{key}'. (UNKNOWN_SETTING)")
            stmt.settings[key] = value
    query = params.get("query", "")
    head = _INSERT_PARAM.match(query) if query else None
    if head is not None:
        stmt.sql, stmt.data_format, stmt.data = head.group(1), head.group(2), body
        return stmt
    if not query:
        head_b = _INSERT_HEAD.match(body, 0, 1 << 16)
        if head_b is not None:
            stmt.sql, stmt.data_format = head_b.group(1).decode(), head_b.group(2).decode()
            stmt.data = body[head_b.end():]
            return stmt
    text = body.decode("utf-8", errors="surrogateescape")
    stmt.sql = f"{query}\n{text}" if query and text else (query or text)
    if not stmt.sql.strip():
        raise ChError(62, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
    return stmt


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Outcome:
    body: bytes | Iterator[bytes]
    summary: dict[str, str]


class Engine:
    """chDB connections to one data path: a pool for sessionless requests, one per session."""

    def __init__(self, path: str, pool_size: int = 4) -> None:
        self.path = path
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._readonly_idle: dict[str, queue.LifoQueue[Any]] = {}
        self._slots = threading.BoundedSemaphore(pool_size)
        self._sessions: dict[str, tuple[Any, threading.Lock]] = {}
        self._lock = threading.Lock()
        first = chdb.connect(path)
        about = first.query("SELECT version(), timezone()", "TabSeparated").bytes().decode()
        self.version, self.timezone = about.split()
        # The engine's default decides whether a request that does not say gets a compressed reply
        # (chDB's is 1: clickhouse-connect then sends Accept-Encoding without enable_http_compression).
        compression = first.query("SELECT value FROM system.settings WHERE name = 'enable_http_compression'", "TSV")
        self.compress_by_default = compression.bytes().strip() == b"1"
        self._idle.put(first)

    def close(self) -> None:
        with self._lock:
            conns = [c for c, _ in self._sessions.values()]
            self._sessions.clear()
        for pool in (self._idle, *self._readonly_idle.values()):
            while not pool.empty():
                conns.append(pool.get_nowait())
        for conn in conns:
            conn.close()

    def execute(self, stmt: Statement) -> Outcome:
        """Run `stmt` on a connection; a streamed outcome hands the connection back when the stream ends."""
        if stmt.session_id:
            with self._lock:
                if stmt.session_id not in self._sessions:
                    self._sessions[stmt.session_id] = (chdb.connect(self.path), threading.Lock())
                conn, lock = self._sessions[stmt.session_id]
            if not lock.acquire(blocking=False):
                raise ChError(373, f"Code: 373. DB::Exception: Session {stmt.session_id} is locked by a "
                                   "concurrent client. (SESSION_IS_LOCKED)")
            return self._run_then(conn, stmt, restore=False, release=lambda _: lock.release())
        # readonly cannot be set back on a chDB connection ("Cannot modify 'readonly' setting
        # in readonly mode"), where a server applies it to one query: such requests run on
        # connections kept apart, one pool per readonly value, which keep that one setting
        # (every other setting is restored after each request, as on the shared pool).
        readonly = stmt.settings.get("readonly")
        with self._lock:
            pool = self._idle if readonly is None else self._readonly_idle.setdefault(str(readonly), queue.LifoQueue())
        self._slots.acquire()
        try:
            conn = pool.get_nowait()
        except queue.Empty:
            conn = chdb.connect(self.path)

        def release(reusable: bool) -> None:
            if reusable and not stmt.changes_connection:
                pool.put(conn)
            else:  # a SET or USE outside a session lasts for that request only: drop the connection
                conn.close()
            self._slots.release()

        return self._run_then(conn, stmt, restore=True, release=release)

    def _run_then(self, conn: Any, stmt: Statement, *, restore: bool, release: Any) -> Outcome:
        """`_run`, then `release(reusable)` exactly once: now, or when a streamed body ends."""
        once = threading.Lock()

        def release_once(reusable: bool) -> None:
            if once.acquire(blocking=False):
                release(reusable)

        try:
            outcome = self._run(conn, stmt, restore=restore, on_stream_end=release_once)
        except ChError:
            release_once(True)
            raise
        except BaseException:
            release_once(False)
            raise
        if not isinstance(outcome.body, Iterator):
            release_once(True)
        return outcome

    def _run(self, conn: Any, stmt: Statement, *, restore: bool, on_stream_end: Any) -> Outcome:
        applied: list[str] = []
        streaming = False
        try:
            if stmt.database:
                conn.query(f"USE `{stmt.database.replace('`', '``')}`", "TabSeparated")
            for key, value in stmt.settings.items():
                conn.query(f"SET {key} = {_quote(value)}", "TabSeparated")
                if key != "readonly":  # stays: the connection is in its readonly pool
                    applied.append(key)
            if stmt.data is not None:
                with conn.send_insert(stmt.sql, stmt.data_format) as inserter:
                    if stmt.data:
                        inserter.append(stmt.data)
                    result = inserter.finish()
                summary = {"written_rows": str(result.rows_written), "written_bytes": str(result.bytes_written)}
                return Outcome(b"", _summary(summary))
            fmt = stmt.output_format
            if not stmt.wait_end and stmt.has_result and fmt in STREAM_SAFE_FORMATS:
                stream = conn.send_query(stmt.sql, fmt, params=stmt.params)
                first = stream.fetch()  # errors found while planning still become a proper HTTP error
                streaming = True
                rest = _chunks(conn, stream, first, applied if restore else [], stmt, on_stream_end)
                # Started at once, so that closing (or collecting) it always runs its cleanup.
                return Outcome(_prepend(next(rest, b""), rest), _summary({}))
            result = conn.query(stmt.sql, fmt, params=stmt.params)
            summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read()),
                       "elapsed_ns": str(int(result.elapsed() * 1e9))}
            return Outcome(result.bytes(), _summary(summary))
        except (RuntimeError, UnicodeDecodeError) as exc:  # chdb.ChdbError, the streaming inserter's
            raise ChError.from_engine(exc) from None    # RuntimeError, a message chDB could not decode
        finally:
            if restore and not streaming:
                _restore(conn, applied, bool(stmt.database))


def _chunks(conn: Any, stream: Any, first: Any, applied: list[str], stmt: Statement, on_end: Any) -> Iterator[bytes]:
    """The rest of a streamed result; hands the connection back (clean) when it ends or is abandoned."""
    ok = False
    try:
        chunk = first
        while chunk is not None:
            yield chunk.bytes()
            chunk = stream.fetch()
        ok = True
    finally:
        if not ok:
            stream.close()
        _restore(conn, applied, bool(stmt.database))
        on_end(ok)


def _prepend(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield head
        yield from rest
    finally:
        rest.close()  # type: ignore[attr-defined]


def _restore(conn: Any, settings: list[str], database: bool) -> None:
    for key in settings:
        conn.query(f"SET {key} = DEFAULT", "TabSeparated")
    if database:
        conn.query("USE default", "TabSeparated")


def _summary(values: dict[str, str]) -> dict[str, str]:
    """X-ClickHouse-Summary's keys; values are strings, as the server sends them."""
    keys = ("read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read", "result_rows",
            "result_bytes", "elapsed_ns")
    return {k: values.get(k, "0") for k in keys}


# -- the HTTP side ----------------------------------------------------------------------------------


def _compressor(name: str) -> tuple[bytes, Any, Any]:
    """(header, compress(chunk), flush()) of one response-body codec."""
    if name == "lz4":
        lz = lz4.frame.LZ4FrameCompressor()
        return lz.begin(), lz.compress, lz.flush
    if name == "zstd":
        zs = zstd.ZstdCompressor()
        return b"", zs.compress, zs.flush
    zl = zlib.compressobj(wbits=31 if name == "gzip" else 15)
    return b"", zl.compress, zl.flush


def _encoded(chunks: Iterator[bytes], name: str) -> Iterator[bytes]:
    head, compress, flush = _compressor(name)
    try:
        for chunk in chunks:
            out = head + compress(chunk)
            head = b""
            if out:
                yield out
        yield head + flush()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _response_codec(request: Request, params: dict[str, str], default: bool) -> str:
    if params.get("enable_http_compression", "1" if default else "0") != "1":
        return ""
    for token in request.headers.get("accept-encoding", "").split(","):
        name = token.split(";")[0].strip().lower()
        if name in ("lz4", "zstd", "gzip", "deflate"):
            return name
    return ""


def _credentials(request: Request, params: dict[str, str]) -> tuple[str, str]:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("basic "):
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return user, password
    if "x-clickhouse-user" in request.headers:
        return request.headers["x-clickhouse-user"], request.headers.get("x-clickhouse-key", "")
    return params.get("user", "default"), params.get("password", "")


class App:
    """The ASGI side: request → Statement → Engine (on a worker thread) → reply."""

    def __init__(self, engine: Engine, user: str, password: str) -> None:
        self.engine = engine
        self.user, self.password = user, password
        self.display_name = "chdb-http-fixture"
        self.starlette = Starlette(routes=[
            Route("/", self.handle, methods=["GET", "POST"]),
            Route("/ping", self.ping, methods=["GET", "HEAD"]),
        ])

    async def ping(self, _: Request) -> Response:
        return PlainTextResponse("Ok.\n")

    async def handle(self, request: Request) -> Response:
        params = dict(request.query_params)
        query_id = params.get("query_id") or str(uuid.uuid4())
        headers = {"X-ClickHouse-Server-Display-Name": self.display_name, "X-ClickHouse-Query-Id": query_id,
                   "X-ClickHouse-Timezone": self.engine.timezone}
        try:
            if _credentials(request, params) != (self.user, self.password):
                raise ChError(516, f"Code: 516. DB::Exception: {_credentials(request, params)[0]}: Authentication "
                                   "failed: password is incorrect, or there is no user with such name. "
                                   "(AUTHENTICATION_FAILED)")
            if request.method == "GET" and "query" not in params:
                return PlainTextResponse("Ok.\n")
            if params.get("compress") == "1" or params.get("decompress") == "1":
                raise ChError(48, "Code: 48. DB::Exception: ClickHouse-native compressed blocks are not served "
                                  "by this fixture. (NOT_IMPLEMENTED)")
            body = decode_body(await request.body(), request.headers.get("content-encoding", ""))
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                params.update(parse_form(content_type, body))
                body = b""
            stmt = parse_statement(params, body)
            outcome = await anyio.to_thread.run_sync(self.engine.execute, stmt)
        except ChError as exc:
            text = exc.text if "(version " in exc.text else f"{exc.text} (version {self.engine.version})"
            headers["X-ClickHouse-Exception-Code"] = str(exc.code)
            return Response((text + "\n").encode("utf-8", "surrogateescape"), media_type="text/plain; charset=UTF-8",
                            status_code=HTTP_STATUS.get(exc.code, 500), headers=headers)
        headers["X-ClickHouse-Summary"] = json.dumps(outcome.summary)
        media_type = "text/plain; charset=UTF-8"
        if stmt.has_result:
            headers["X-ClickHouse-Format"] = stmt.output_format
            media_type = CONTENT_TYPES.get(stmt.output_format, "application/octet-stream")
        codec = _response_codec(request, params, self.engine.compress_by_default)
        if codec:
            headers["Content-Encoding"] = codec
        if isinstance(outcome.body, bytes):
            body_bytes = b"".join(_encoded(iter([outcome.body]), codec)) if codec else outcome.body
            return Response(body_bytes, headers=headers, media_type=media_type)
        chunks = _encoded(outcome.body, codec) if codec else outcome.body
        return StreamingResponse(chunks, headers=headers, media_type=media_type)


class ChHttpServer:
    """ClickHouse's HTTP interface for chDB at `path`, on 127.0.0.1 (port 0: the OS picks), in a thread."""

    def __init__(self, path: str, *, user: str = "default", password: str = "", pool_size: int = 4) -> None:
        self.path = path
        self.user, self.password = user, password
        self._pool_size = pool_size
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The URL with credentials, as a trackhouse store DSN."""
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"

    def start(self) -> str:
        self._engine = Engine(self.path, self._pool_size)
        app = App(self._engine, self.user, self.password)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)  # listening before serving: clients may connect at once
        self.port = sock.getsockname()[1]
        # Long keep-alive: a pooled client connection never meets a server-side close between tests.
        # Large URLs: bind parameters ride in the query string (ClickHouse accepts up to 1 MiB).
        config = uvicorn.Config(app.starlette, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=600, timeout_graceful_shutdown=5,
                                h11_max_incomplete_event_size=1 << 20)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                        name="chhttp-fixture", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        if self._engine is not None:
            self._engine.close()
        self._server = self._thread = self._engine = None
