"""API tokens and who may do what: minting, verifying, scopes, the current principal.

Shared by ingest, query and the CLI (hence here, beside the records); imports no
gRPC and no HTTP library. The seams that read headers (cli/guard.py) call
`Authenticator.authenticate` and `authorize`, then bind the `Principal` for the
call with `bind_principal`; handlers read it with `current_principal()` and pass
what the domain needs (the allowed experiment ids) into it explicitly, as bound
values — domain code running on the store's threads never reads the contextvar.

    AuthError               base
    ├── Unauthenticated     no token, a malformed, unknown or revoked one   → UNAUTHENTICATED / 401
    └── PermissionDenied    a valid token whose scope does not allow this    → PERMISSION_DENIED / 403

Tokens look like `th_<id>_<secret>`: `id` (16 hex digits) is public and is the
store's key; `secret` (32 random bytes, urlsafe base64) is shown once and stored
only as its SHA-256, compared in constant time. Lookups are cached for a few
seconds (`Authenticator`), so a revoke takes effect within that TTL.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from trackhouse.store.records import TokenRecord

PREFIX = "th"
_TOKEN = re.compile(r"th_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_EXPERIMENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_NAME = 200


class AuthError(Exception):
    """Base of authentication and authorization errors."""


class Unauthenticated(AuthError):
    pass


class PermissionDenied(AuthError):
    pass


class Scope(IntEnum):
    """Ordered: each scope allows everything the ones below it allow."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Scope:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"scope {name!r}: use read, write or admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and scope, and the experiments it may touch (None: all)."""

    name: str
    scope: Scope
    experiments: frozenset[str] | None = None
    # The caller's own `authorization` value, so a server-internal hop (the MLflow API's
    # writes through gRPC) acts as the caller, never as more.
    bearer: str = field(default="", repr=False, compare=False)

    def sees(self, experiment_id: str) -> bool:
        return self.experiments is None or experiment_id in self.experiments


# What a call sees when the server runs without auth (loopback, TRACKHOUSE_SERVER_AUTH=auto/off).
OPEN = Principal("anonymous (auth off)", Scope.ADMIN)
_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("trackhouse_principal", default=OPEN)


def current_principal() -> Principal:
    """The principal of the call being handled (OPEN when auth is off)."""
    return _CURRENT.get()


def bind_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _CURRENT.set(principal)


def unbind_principal(token: contextvars.Token[Principal]) -> None:
    _CURRENT.reset(token)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_experiment_ids(ids: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(ids))
    for eid in out:
        if not _EXPERIMENT_ID.fullmatch(eid):
            raise ValueError(f"experiment id {eid!r}: expected letters, digits, '_', '.', ':' or '-'")
    return out


def mint(name: str, scope: Scope, experiment_ids: Iterable[str] = (), now_ms: int | None = None,
         ) -> tuple[str, TokenRecord]:
    """A new token: (the token to show once, the record to store)."""
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"token name: 1..{MAX_NAME} characters required")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    created = int(time.time() * 1000) if now_ms is None else now_ms
    record = TokenRecord(token_id, name, digest(secret), scope.label, check_experiment_ids(experiment_ids), created)
    return f"{PREFIX}_{token_id}_{secret}", record


def parse_bearer(authorization: str | None) -> tuple[str, str]:
    """(token id, secret) from an `authorization` value; Unauthenticated if absent or malformed."""
    if not authorization:
        raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>'")
    kind, _, token = authorization.strip().partition(" ")
    match = _TOKEN.fullmatch(token.strip()) if kind.lower() == "bearer" else None
    if match is None:
        raise Unauthenticated("invalid credentials: expected 'authorization: Bearer th_…' with a trackhouse token")
    return match.group(1), match.group(2)


def principal_of(record: TokenRecord | None, secret: str, bearer: str) -> Principal:
    """The principal a stored token grants, if `secret` is its secret and it is live."""
    # Compare a digest even for an unknown id, so timing does not tell ids apart.
    expected = record.secret_sha256 if record is not None else digest("")
    if not hmac.compare_digest(expected, digest(secret)) or record is None or record.revoked:
        raise Unauthenticated("invalid credentials: unknown or revoked token")
    experiments = frozenset(record.experiment_ids) if record.experiment_ids else None
    return Principal(record.name, Scope.parse(record.scope), experiments, bearer)


def authorize(principal: Principal, required: Scope, what: str) -> None:
    if principal.scope < required:
        raise PermissionDenied(f"token {principal.name!r} has scope {principal.scope.label}; "
                               f"{what} needs {required.label}")


class Authenticator:
    """Bearer value → Principal, with token records cached for `ttl` seconds.

    `load` reads one token record from the store by id (None if unknown). Misses are
    cached too (an unknown id costs one store read per TTL, however often it is
    tried); the cache is cleared when it reaches `max_entries`.
    """

    def __init__(self, load: Callable[[str], Awaitable[TokenRecord | None]], ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self._load = load
        self._ttl = ttl
        self._clock = clock
        self._max_entries = max_entries
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        token_id, secret = parse_bearer(authorization)
        now = self._clock()
        hit = self._cache.get(token_id)
        if hit is not None and hit[0] > now:
            record = hit[1]
        else:
            record = await self._load(token_id)
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            self._cache[token_id] = (now + self._ttl, record)
        return principal_of(record, secret, authorization or "")


# -- what each call needs ------------------------------------------------------------------
# gRPC: every method is listed; an unlisted one (a new RPC nobody classified yet) needs
# admin, so forgetting to classify a method can only make it stricter. None: open.
_INGEST = "/trackhouse.v1.IngestService/"
_QUERY = "/trackhouse.v1.QueryService/"
GRPC_SCOPES: dict[str, Scope] = {
    **{_QUERY + m: Scope.READ for m in (
        "SearchRuns", "GetRun", "GetMetricHistory", "GetMetricBuckets", "ExportMetrics")},
    _INGEST + "GetExperiment": Scope.READ,
    **{_INGEST + m: Scope.WRITE for m in (
        "CreateExperiment", "CreateRun", "UpdateRun", "LogParams", "SetTags", "StreamMetrics", "LogMetrics",
        "DeleteRun", "RestoreRun", "DeleteTag", "UpdateExperiment", "DeleteExperiment", "RestoreExperiment",
        "SetExperimentTags", "DeleteExperimentTag")},
}
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)

MLFLOW_PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
MLFLOW_READS = frozenset({
    "experiments/get", "experiments/get-by-name", "experiments/search", "runs/get", "runs/search",
    "metrics/get-history", "metrics/get-history-bulk-interval",
})
# /metrics shows server-wide counters (no experiment data): any valid token may scrape it.
HTTP_SCOPES: dict[str, Scope | None] = {"/health": None, "/metrics": Scope.READ}


def grpc_scope(method: str) -> Scope | None:
    """The scope a gRPC method needs (None: open to all)."""
    if method.startswith(OPEN_GRPC_PREFIXES):
        return None
    return GRPC_SCOPES.get(method, Scope.ADMIN)


def http_scope(path: str) -> Scope | None:
    """The scope an HTTP path needs (None: open). MLflow endpoints: reads READ, the rest WRITE."""
    if path in HTTP_SCOPES:
        return HTTP_SCOPES[path]
    for prefix in MLFLOW_PREFIXES:
        if path.startswith(prefix):
            return Scope.READ if path[len(prefix):] in MLFLOW_READS else Scope.WRITE
    return Scope.ADMIN
