"""Client settings: one frozen value object, and the only place that reads ``os.environ``.

``Settings()`` holds the defaults; ``Settings.from_env()`` overlays the
``TRACKHOUSE_CLIENT_*`` variables documented on the class. ``__post_init__``
rejects impossible values at start-up, so a bad configuration fails when the
client is created rather than inside the background sender.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from trackhouse.client.errors import UsageError

_PREFIX = "TRACKHOUSE_CLIENT_"
_SCHEMES = ("grpc", "grpcs")


@dataclass(frozen=True)
class Settings:
    """How the client talks to trackhouse. Every field has an environment variable.

    ``TRACKHOUSE_CLIENT_URL``
        Ingest service address: ``host:port``, ``grpc://host:port`` or
        ``grpcs://host:port`` (TLS with the system roots). Default ``127.0.0.1:50051``.
    ``TRACKHOUSE_CLIENT_QUERY_URL``
        Query service address, same forms. Unset: the ingest address (``trackhouse serve``
        runs both services on one port).
    ``TRACKHOUSE_CLIENT_FLUSH_INTERVAL``
        Seconds a logged point may wait in the buffer before it is sent. Default 1.0.
    ``TRACKHOUSE_CLIENT_MAX_BATCH_POINTS``
        Points per metric batch; reaching it in the buffer wakes the sender at once.
        Default 10000.
    ``TRACKHOUSE_CLIENT_FLUSH_TIMEOUT``
        Default deadline in seconds of ``Run.flush()``. Default 10.0.
    ``TRACKHOUSE_CLIENT_CLOSE_TIMEOUT``
        Default deadline in seconds of ``Run.finish()``, ``Client.close()`` and of the
        close at interpreter exit. Default 30.0.
    ``TRACKHOUSE_CLIENT_RPC_TIMEOUT``
        Deadline in seconds of each unary call (create run, log params, reads). Default 30.0.
    ``TRACKHOUSE_CLIENT_BACKOFF_INITIAL`` / ``TRACKHOUSE_CLIENT_BACKOFF_MAX``
        First and largest delay in seconds between reconnects of the metric stream
        (exponential, jittered). Defaults 0.5 and 30.0.
    ``TRACKHOUSE_CLIENT_USER``
        ``user_id`` recorded on new runs. Default: the login name.
    """

    url: str = "127.0.0.1:50051"
    query_url: str | None = None
    flush_interval: float = 1.0
    max_batch_points: int = 10_000
    flush_timeout: float = 10.0
    close_timeout: float = 30.0
    rpc_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    user: str = ""

    def __post_init__(self) -> None:
        parse_url(self.url)
        if self.query_url is not None:
            parse_url(self.query_url)
        for name in ("flush_interval", "flush_timeout", "close_timeout", "rpc_timeout", "backoff_initial"):
            if not getattr(self, name) > 0:
                raise UsageError(f"Settings.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_batch_points < 1:
            raise UsageError(f"Settings.max_batch_points must be >= 1, got {self.max_batch_points!r}")
        if self.backoff_max < self.backoff_initial:
            raise UsageError(
                f"Settings.backoff_max ({self.backoff_max}) must be >= backoff_initial ({self.backoff_initial})"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overlaid by ``TRACKHOUSE_CLIENT_*`` variables, overlaid by ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(_PREFIX + field.name.upper())
            if raw is None or raw.strip() == "":
                continue
            values[field.name] = _convert(field.name, raw.strip(), _CONVERTERS.get(field.name, str))
        if "user" not in values:
            values["user"] = _login_name()
        values.update(overrides)
        return cls(**values)

    @property
    def effective_query_url(self) -> str:
        return self.url if self.query_url is None else self.query_url


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "flush_interval": float,
    "max_batch_points": int,
    "flush_timeout": float,
    "close_timeout": float,
    "rpc_timeout": float,
    "backoff_initial": float,
    "backoff_max": float,
}


def _convert(name: str, raw: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(raw)
    except ValueError:
        kind = getattr(convert, "__name__", "value")
        raise UsageError(f"{_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers; the user id is optional
        return ""


def parse_url(url: str) -> tuple[str, bool]:
    """``host:port`` / ``grpc://host:port`` / ``grpcs://host:port`` -> (gRPC target, use TLS)."""
    if not url or not isinstance(url, str):
        raise UsageError(f"a trackhouse URL is 'host:port' or 'grpc://host:port', got {url!r}")
    if "://" not in url:
        return url, False
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.netloc or parts.path not in ("", "/"):
        raise UsageError(
            f"unsupported trackhouse URL {url!r}: use 'host:port', 'grpc://host:port' or 'grpcs://host:port'"
        )
    return parts.netloc, parts.scheme == "grpcs"
