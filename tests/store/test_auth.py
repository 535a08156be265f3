"""API tokens: minting, hashing, parsing, the cached authenticator, scope rules, and the store's token table."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from trackhouse.store import Store, TokenRecord
from trackhouse.store.auth import (
    OPEN,
    Authenticator,
    PermissionDenied,
    Principal,
    Scope,
    Unauthenticated,
    authorize,
    digest,
    grpc_scope,
    http_scope,
    mint,
    parse_bearer,
)


def test_mint_stores_only_a_hash_of_the_secret() -> None:
    token, record = mint("ci", Scope.WRITE, ["7", "7", "8"])
    token_id, secret = parse_bearer(f"Bearer {token}")
    assert token_id == record.token_id and secret not in repr(record)
    assert record.secret_sha256 == digest(secret) and record.experiment_ids == ("7", "8")
    assert record.scope == "write" and not record.revoked


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic dXNlcjpwdw==", "Bearer th_zz_x",
                                    "Bearer th_0123456789abcdef_short", "Bearer " + "a" * 5000])
def test_malformed_credentials_are_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        parse_bearer(header)


def test_mint_refuses_bad_names_and_experiment_ids() -> None:
    with pytest.raises(ValueError, match="name"):
        mint("  ", Scope.READ)
    with pytest.raises(ValueError, match="experiment id"):
        mint("x", Scope.READ, ["1' OR 1=1"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_authenticator_caches_lookups_and_sees_a_revoke_after_the_ttl() -> None:
    token, record = mint("job", Scope.READ, ["1"])
    table = {record.token_id: record}
    loads: list[str] = []

    async def load(token_id: str) -> TokenRecord | None:
        loads.append(token_id)
        return table.get(token_id)

    clock = FakeClock()
    auth = Authenticator(load, ttl=5.0, clock=clock)
    principal = asyncio.run(auth.authenticate(f"Bearer {token}"))
    assert principal == Principal("job", Scope.READ, frozenset({"1"}))
    assert principal.bearer == f"Bearer {token}"
    table[record.token_id] = dataclasses.replace(record, revoked=True)
    clock.now += 4.9
    asyncio.run(auth.authenticate(f"Bearer {token}"))  # cached: still valid within the TTL
    assert len(loads) == 1
    clock.now += 0.2
    with pytest.raises(Unauthenticated, match="revoked"):
        asyncio.run(auth.authenticate(f"Bearer {token}"))
    assert len(loads) == 2


def test_wrong_secret_for_a_known_id_is_refused() -> None:
    token, record = mint("job", Scope.ADMIN)

    async def load(token_id: str) -> TokenRecord | None:
        return record if token_id == record.token_id else None

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated):
        asyncio.run(Authenticator(load).authenticate(f"Bearer {forged}"))
    other, _ = mint("other", Scope.ADMIN)
    with pytest.raises(Unauthenticated):
        asyncio.run(Authenticator(load).authenticate(f"Bearer {other}"))


def test_scopes_are_ordered() -> None:
    reader = Principal("r", Scope.READ)
    authorize(reader, Scope.READ, "x")
    with pytest.raises(PermissionDenied, match="needs write"):
        authorize(reader, Scope.WRITE, "x")
    authorize(OPEN, Scope.ADMIN, "x")


def test_every_rpc_is_classified_and_unknown_ones_need_admin() -> None:
    assert grpc_scope("/trackhouse.v1.QueryService/SearchRuns") == Scope.READ
    assert grpc_scope("/trackhouse.v1.IngestService/GetExperiment") == Scope.READ
    assert grpc_scope("/trackhouse.v1.IngestService/StreamMetrics") == Scope.WRITE
    assert grpc_scope("/trackhouse.v1.QueryService/SomethingNew") == Scope.ADMIN
    assert grpc_scope("/grpc.health.v1.Health/Check") is None


def test_every_generated_rpc_has_a_scope() -> None:
    from trackhouse.proto.v1 import ingest_pb2, query_pb2
    from trackhouse.store.auth import GRPC_SCOPES

    for module in (ingest_pb2, query_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in GRPC_SCOPES, method.full_name


def test_http_paths() -> None:
    assert http_scope("/health") is None
    assert http_scope("/metrics") == Scope.READ
    assert http_scope("/api/2.0/mlflow/runs/search") == Scope.READ
    assert http_scope("/ajax-api/2.0/mlflow/runs/log-batch") == Scope.WRITE
    assert http_scope("/something/else") == Scope.ADMIN


def test_store_keeps_tokens_and_a_revoke_is_a_newer_version(store: Store) -> None:
    _, a = mint("a", Scope.READ, ["1", "2"])
    _, b = mint("b", Scope.ADMIN)
    store.put_token(a)
    store.put_token(b)
    assert store.get_token(a.token_id) == a
    assert store.get_token("0" * 16) is None
    store.put_token(dataclasses.replace(a, revoked=True))
    assert store.get_token(a.token_id) == dataclasses.replace(a, revoked=True)
    assert {t.token_id: t.revoked for t in store.list_tokens()} == {a.token_id: True, b.token_id: False}
