"""Tests for trackhouse.store.dsn and schema.check_identifier: pure parsing, no engine."""

from __future__ import annotations

import os

import pytest

from trackhouse.store import DSN, InvalidDSN, StoreError, parse_dsn
from trackhouse.store.schema import check_identifier


def test_chdb_relative_path_is_made_absolute(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dsn = parse_dsn("chdb://./data/th")
    assert dsn == DSN(scheme="chdb", path=os.path.realpath(os.path.join(tmp_path, "data", "th")))
    assert dsn.embedded
    assert dsn.redacted() == f"chdb://{dsn.path}"


def test_chdb_absolute_path(tmp_path: os.PathLike[str]) -> None:
    path = os.path.realpath(tmp_path)
    assert parse_dsn(f"chdb://{path}/x") == DSN(scheme="chdb", path=f"{path}/x")
    assert parse_dsn(f"chdb://{path}/with%20space").path == f"{path}/with space"


@pytest.mark.parametrize("text", ["chdb://", "chdb://:memory:", "chdb://memory"])
def test_chdb_needs_a_data_directory(text: str) -> None:
    with pytest.raises(InvalidDSN, match=r"needs a data directory, e\.g\. chdb://\./trackhouse-data"):
        parse_dsn(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://ch", DSN("http", host="ch", port=8123)),
        ("https://ch", DSN("https", host="ch", port=8443)),
        ("http://ch:9000", DSN("http", host="ch", port=9000)),
        ("https://bob@ch.example.com", DSN("https", host="ch.example.com", port=8443, username="bob")),
        ("http://bob:s%40cr%3At@ch:18123", DSN("http", host="ch", port=18123, username="bob", password="s@cr:t")),
        ("HTTP://CH:8123", DSN("http", host="ch", port=8123)),
    ],
)
def test_http_dsns(text: str, expected: DSN) -> None:
    dsn = parse_dsn(text)
    assert dsn == expected
    assert not dsn.embedded


def test_redacted_http_dsn_hides_the_password() -> None:
    dsn = parse_dsn("https://bob:hunter2@ch:8443")
    assert dsn.redacted() == "https://bob@ch:8443"
    assert "hunter2" not in dsn.redacted()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ftp://ch", "unsupported store; use chdb://PATH (embedded) or http(s)://host:port"),
        ("clickhouse://ch:9000", "unsupported store"),
        ("./trackhouse-data", "unsupported store"),
        ("", "unsupported store"),
        ("http://", "no host; expected http://host:port"),
        ("https://:8443", "no host; expected https://host:port"),
        ("http://ch:port", "bad port"),
        ("http://ch:99999", "bad port"),
    ],
)
def test_bad_dsns_say_what_is_accepted(text: str, fragment: str) -> None:
    with pytest.raises(InvalidDSN) as info:
        parse_dsn(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value)
    # One hierarchy: an InvalidDSN is a StoreError and a ValueError.
    assert isinstance(info.value, StoreError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["trackhouse", "_t", "T_123", "a" * 64])
def test_plain_identifiers_pass(name: str) -> None:
    assert check_identifier(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "", "1abc", "a-b", "a.b", "a b", "db; DROP TABLE x", "db`", "db'--", 'db"', "a" * 65,
        "db\n", "db\nDROP", "dé", "db\x00",
    ],
)
def test_injection_like_identifiers_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid database name"):
        check_identifier(name)
