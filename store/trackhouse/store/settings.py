"""How the services connect to a ClickHouse server: one frozen value object, read from the environment once.

Applies to http(s):// stores; the embedded chDB store ignores everything but
`cluster` (which it refuses: chDB has no cluster). Every variable (all optional):

    TRACKHOUSE_STORE_USER               user (default: the DSN's, else "default")
    TRACKHOUSE_STORE_PASSWORD           password (default: the DSN's, else empty)
    TRACKHOUSE_STORE_CONNECT_TIMEOUT    seconds to open a connection (default 10)
    TRACKHOUSE_STORE_QUERY_TIMEOUT      seconds a request may take to answer (default 300)
    TRACKHOUSE_STORE_COMPRESS           lz4 (default), zstd, gzip, or none: HTTP compression of
                                        inserts and results
    TRACKHOUSE_STORE_VERIFY             1 (default) / 0: verify the server's TLS certificate
    TRACKHOUSE_STORE_CA_CERT            PEM file of the CA that signed the server's certificate
                                        (default: the system roots; "certifi" for certifi's)
    TRACKHOUSE_STORE_CLUSTER            cluster name from the server's remote_servers: Replicated
                                        engines, Distributed tables, DDL ON CLUSTER (default: none)
    TRACKHOUSE_STORE_MIGRATION_LOCK_TIMEOUT
                                        seconds a `migrate` waits for another migrator, and after
                                        which a claim left by a dead one is taken over (default 3600)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from trackhouse.store.schema import check_identifier

COMPRESSIONS = ("lz4", "zstd", "gzip", "none")
_PREFIX = "TRACKHOUSE_STORE_"


@dataclass(frozen=True)
class StoreSettings:
    user: str | None = None
    password: str | None = None
    connect_timeout: float = 10.0
    query_timeout: float = 300.0
    compress: str = "lz4"
    verify: bool = True
    ca_cert: str | None = None
    cluster: str | None = None
    migration_lock_timeout: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "query_timeout", "migration_lock_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"store setting {name} must be > 0, got {getattr(self, name)!r}")
        if self.compress not in COMPRESSIONS:
            raise ValueError(f"store setting compress={self.compress!r}: use one of {', '.join(COMPRESSIONS)}")
        if self.cluster is not None:
            check_identifier(self.cluster, "cluster name")
        if self.ca_cert is not None and not self.verify:
            raise ValueError("store settings: ca_cert is given but verify is off; drop one of them")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreSettings:
        env = os.environ if environ is None else environ

        def number(name: str, default: float) -> float:
            raw = env.get(_PREFIX + name, "")
            try:
                return float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{_PREFIX}{name}={raw!r} is not a number") from None

        verify = env.get(_PREFIX + "VERIFY", "1").strip().lower()
        if verify not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{_PREFIX}VERIFY={verify!r}: use 1 or 0")
        return cls(
            user=env.get(_PREFIX + "USER") or None,
            password=env.get(_PREFIX + "PASSWORD"),
            connect_timeout=number("CONNECT_TIMEOUT", 10.0),
            query_timeout=number("QUERY_TIMEOUT", 300.0),
            compress=env.get(_PREFIX + "COMPRESS", "lz4").strip().lower() or "lz4",
            verify=verify in ("1", "true", "yes"),
            ca_cert=env.get(_PREFIX + "CA_CERT") or None,
            cluster=env.get(_PREFIX + "CLUSTER") or None,
            migration_lock_timeout=number("MIGRATION_LOCK_TIMEOUT", 3600.0),
        )
