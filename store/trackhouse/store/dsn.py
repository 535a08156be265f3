"""Parse a store DSN into a value object; open ClickHouse clients from it.

Two deployments, one client library (clickhouse-connect):

    chdb://PATH                 embedded engine in this process; PATH relative or
                                absolute (chdb:///abs/path); default ./trackhouse-data
    http(s)://[user[:pw]@]host[:port]   a ClickHouse server

The database trackhouse uses is not part of the DSN's path semantics for chDB
(where the path is a directory), so it is a separate setting everywhere.
This module is the only place that constructs clickhouse-connect clients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from trackhouse.store.errors import InvalidDSN, StoreUnavailable, translate
from trackhouse.store.settings import StoreSettings

DEFAULT_DSN = "chdb://./trackhouse-data"


@dataclass(frozen=True)
class DSN:
    scheme: str  # "chdb", "http" or "https"
    path: str = ""  # chdb: absolute data directory
    host: str = ""
    port: int = 0
    username: str = "default"
    password: str = ""

    @property
    def embedded(self) -> bool:
        return self.scheme == "chdb"

    def redacted(self) -> str:
        if self.embedded:
            return f"chdb://{self.path}"
        return f"{self.scheme}://{self.username}@{self.host}:{self.port}"


def parse_dsn(dsn: str) -> DSN:
    """Parse `dsn`; raise InvalidDSN with what is wrong and what is accepted."""
    if dsn.startswith("chdb://"):
        path = dsn[len("chdb://") :]
        if not path or path in (":memory:", "memory"):
            raise InvalidDSN(
                f"{dsn!r}: the embedded store needs a data directory, e.g. chdb://./trackhouse-data"
            )
        return DSN(scheme="chdb", path=os.path.realpath(unquote(path)))
    parsed = urlparse(dsn)
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise InvalidDSN(f"{dsn!r}: no host; expected {parsed.scheme}://host:port")
        default_port = 8443 if parsed.scheme == "https" else 8123
        try:
            port = parsed.port or default_port
        except ValueError as exc:
            raise InvalidDSN(f"{dsn!r}: bad port ({exc})") from None
        return DSN(
            scheme=parsed.scheme,
            host=parsed.hostname,
            port=port,
            username=unquote(parsed.username) if parsed.username else "default",
            password=unquote(parsed.password) if parsed.password else "",
        )
    raise InvalidDSN(
        f"{dsn!r}: unsupported store; use chdb://PATH (embedded) or http(s)://host:port (ClickHouse server)"
    )


def server_options(dsn: DSN, options: StoreSettings | None) -> dict[str, Any]:
    """clickhouse-connect keyword arguments for a server DSN: credentials, timeouts, compression, TLS."""
    o = options or StoreSettings()
    kwargs: dict[str, Any] = {
        "interface": dsn.scheme,
        "host": dsn.host,
        "port": dsn.port,
        "username": o.user if o.user is not None else dsn.username,
        "password": o.password if o.password is not None else dsn.password,
        "connect_timeout": o.connect_timeout,
        "send_receive_timeout": o.query_timeout,
        "compress": False if o.compress == "none" else o.compress,
    }
    if dsn.scheme == "https":
        kwargs["verify"] = o.verify
        if o.ca_cert is not None:
            kwargs["ca_cert"] = o.ca_cert
    return kwargs


def connect(dsn: DSN, settings: dict[str, Any] | None = None, options: StoreSettings | None = None) -> Any:
    """Open one clickhouse-connect client for `dsn` (does I/O).

    `settings` are ClickHouse settings sent with every request; `options` say how to
    reach a server (ignored by the embedded store).
    """
    import clickhouse_connect
    from clickhouse_connect.driver import exceptions as ch

    try:
        if dsn.embedded:
            os.makedirs(dsn.path, exist_ok=True)
            return clickhouse_connect.get_client(interface="chdb", path=dsn.path, settings=settings)
        return clickhouse_connect.get_client(**server_options(dsn, options), settings=settings,
                                             autogenerate_session_id=False)
    except ch.ProgrammingError as exc:
        # chDB allows one data path per process.
        raise StoreUnavailable(
            f"cannot open {dsn.redacted()}: {exc} (the embedded store allows one data path per process)"
        ) from None
    except Exception as exc:
        raise translate(exc) from None


async def connect_async(dsn: DSN, settings: dict[str, Any] | None = None,
                        options: StoreSettings | None = None) -> Any:
    """Open clickhouse-connect's async (aiohttp) client for a server DSN (does I/O)."""
    import clickhouse_connect

    if dsn.embedded:
        raise InvalidDSN("the embedded store has no async client; run its calls on a thread (Store.call)")
    try:
        return await clickhouse_connect.get_async_client(**server_options(dsn, options), settings=settings,
                                                         autogenerate_session_id=False)
    except Exception as exc:
        raise translate(exc) from None
