"""Settings of the `trackhouse serve` process: one frozen value object, read from the environment once.

Command-line flags override these. Every variable (all optional):

    TRACKHOUSE_SERVER_STORE       store DSN: chdb://PATH (embedded, default chdb://./trackhouse-data)
                                  or http(s)://[user[:password]@]host[:port] (a ClickHouse server)
    TRACKHOUSE_SERVER_DATABASE    database inside the store (default trackhouse)
    TRACKHOUSE_SERVER_HOST        address to bind (default 127.0.0.1, loopback only)
    TRACKHOUSE_SERVER_GRPC_PORT   gRPC port of `serve` (ingest and query) and of `ingest` (default
                                  50051; 0 picks a free one); `query` ignores it (--port, default 50052)
    TRACKHOUSE_SERVER_HTTP_PORT   HTTP port of `serve` and `query`: the MLflow REST API, POST
                                  /api/v1/sql, Prometheus /metrics and /health (default 5000, as
                                  MLflow's); `ingest` ignores it (--http-port: /metrics and /health,
                                  default 9100)
    TRACKHOUSE_SERVER_AUTH        auto (default): API tokens required iff HOST is not loopback; on; off
    TRACKHOUSE_SERVER_AUTH_CACHE_TTL  seconds a token lookup is cached; a revoke takes effect
                                  within it (default 5.0)
    TRACKHOUSE_SERVER_TLS_CERT    PEM certificate (chain) file: gRPC and HTTP serve TLS only (with _KEY)
    TRACKHOUSE_SERVER_TLS_KEY     PEM private key file of that certificate
    TRACKHOUSE_SERVER_INGEST_ADDRESS
                                  `trackhouse query` only: HOST:PORT of the ingest service (a load
                                  balancer in front of the replicas) for MLflow REST writes;
                                  unset: REST writes are refused

The ingest and query services read their own TRACKHOUSE_INGEST_* and
TRACKHOUSE_QUERY_* variables (trackhouse.ingest.settings, trackhouse.query.settings), and
the connection to a ClickHouse server TRACKHOUSE_STORE_* (trackhouse.store.settings).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from trackhouse.cli.guard import AUTH_MODES
from trackhouse.store import DEFAULT_DSN, parse_dsn
from trackhouse.store.schema import check_identifier

_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}")


@dataclass(frozen=True)
class ServerSettings:
    store: str = DEFAULT_DSN
    database: str = "trackhouse"
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 5000
    auth: str = "auto"
    auth_cache_ttl: float = 5.0
    tls_cert: str = ""
    tls_key: str = ""
    ingest_address: str = ""

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"TRACKHOUSE_SERVER_AUTH={self.auth!r}: use one of {', '.join(AUTH_MODES)}")
        if not 0 < self.auth_cache_ttl <= 300:
            raise ValueError(f"TRACKHOUSE_SERVER_AUTH_CACHE_TTL={self.auth_cache_ttl!r}: use 0 < seconds <= 300")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both TRACKHOUSE_SERVER_TLS_CERT and TRACKHOUSE_SERVER_TLS_KEY")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"TRACKHOUSE_SERVER_{name.upper()}={path!r}: not a readable file")
        parse_dsn(self.store)  # raises InvalidDSN saying what is accepted
        check_identifier(self.database)
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} {getattr(self, name)} is not a TCP port (0..65535)")
        if self.ingest_address and not _ADDRESS.fullmatch(self.ingest_address):
            raise ValueError(f"ingest address {self.ingest_address!r}: expected HOST:PORT")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        env = os.environ if environ is None else environ
        ports = {}
        for name, default in (("grpc_port", "50051"), ("http_port", "5000")):
            var = f"TRACKHOUSE_SERVER_{name.upper()}"
            value = env.get(var, default)
            if not value.isdigit():
                raise ValueError(f"{var}={value!r} is not a port number")
            ports[name] = int(value)
        ttl = env.get("TRACKHOUSE_SERVER_AUTH_CACHE_TTL", "5.0")
        try:
            cache_ttl = float(ttl)
        except ValueError:
            raise ValueError(f"TRACKHOUSE_SERVER_AUTH_CACHE_TTL={ttl!r} is not a number of seconds") from None
        return cls(
            store=env.get("TRACKHOUSE_SERVER_STORE", DEFAULT_DSN),
            database=env.get("TRACKHOUSE_SERVER_DATABASE", "trackhouse"),
            host=env.get("TRACKHOUSE_SERVER_HOST", "127.0.0.1"),
            ingest_address=env.get("TRACKHOUSE_SERVER_INGEST_ADDRESS", ""),
            **ports,
            auth=env.get("TRACKHOUSE_SERVER_AUTH", "auto").strip().lower(),
            auth_cache_ttl=cache_ttl,
            tls_cert=env.get("TRACKHOUSE_SERVER_TLS_CERT", ""),
            tls_key=env.get("TRACKHOUSE_SERVER_TLS_KEY", ""),
        )
