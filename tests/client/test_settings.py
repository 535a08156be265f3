"""Settings: defaults, TRACKHOUSE_CLIENT_* overlay, rejection of impossible values, URL forms."""

from __future__ import annotations

import dataclasses

import pytest

from trackhouse.client import Settings, UsageError
from trackhouse.client.settings import parse_url


def test_from_env_reads_every_documented_variable() -> None:
    env = {
        "TRACKHOUSE_CLIENT_URL": "grpc://ingest:1",
        "TRACKHOUSE_CLIENT_QUERY_URL": "query:2",
        "TRACKHOUSE_CLIENT_FLUSH_INTERVAL": "0.25",
        "TRACKHOUSE_CLIENT_MAX_BATCH_POINTS": "500",
        "TRACKHOUSE_CLIENT_FLUSH_TIMEOUT": "3",
        "TRACKHOUSE_CLIENT_CLOSE_TIMEOUT": "4",
        "TRACKHOUSE_CLIENT_RPC_TIMEOUT": "5",
        "TRACKHOUSE_CLIENT_BACKOFF_INITIAL": "0.1",
        "TRACKHOUSE_CLIENT_BACKOFF_MAX": "2",
        "TRACKHOUSE_CLIENT_USER": "alice",
        "UNRELATED": "x",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        url="grpc://ingest:1", query_url="query:2", flush_interval=0.25, max_batch_points=500,
        flush_timeout=3.0, close_timeout=4.0, rpc_timeout=5.0, backoff_initial=0.1, backoff_max=2.0,
        user="alice",
    )  # fmt: skip
    assert s.effective_query_url == "query:2"
    documented = Settings.__doc__ or ""
    for field in dataclasses.fields(Settings):
        assert f"TRACKHOUSE_CLIENT_{field.name.upper()}" in documented


def test_from_env_defaults_and_overrides() -> None:
    s = Settings.from_env({"TRACKHOUSE_CLIENT_USER": "bob", "TRACKHOUSE_CLIENT_FLUSH_INTERVAL": ""})
    assert s == Settings(user="bob")
    assert s.effective_query_url == s.url
    assert Settings.from_env({"TRACKHOUSE_CLIENT_USER": "b"}, max_batch_points=7).max_batch_points == 7


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TRACKHOUSE_CLIENT_MAX_BATCH_POINTS": "many"}, "MAX_BATCH_POINTS='many' is not a valid int"),
        ({"TRACKHOUSE_CLIENT_FLUSH_INTERVAL": "0"}, "flush_interval must be > 0"),
        ({"TRACKHOUSE_CLIENT_MAX_BATCH_POINTS": "0"}, "max_batch_points must be >= 1"),
        ({"TRACKHOUSE_CLIENT_BACKOFF_MAX": "0.1"}, "backoff_max"),
        ({"TRACKHOUSE_CLIENT_URL": "http://x:1"}, "unsupported trackhouse URL"),
    ],
)
def test_impossible_values_are_rejected_at_start(env: dict[str, str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", **env})


def test_settings_are_frozen_values() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.url = "x:1"  # type: ignore[misc]
    assert Settings() == s and hash(Settings()) == hash(s)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051", False)),
        ("grpc://host:1", ("host:1", False)),
        ("grpcs://host:443/", ("host:443", True)),
    ],
)
def test_url_forms(url: str, expected: tuple[str, bool]) -> None:
    assert parse_url(url) == expected
