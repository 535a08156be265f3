"""The SQL sandbox reaches a ClickHouse server exactly as the store's own connections do.

clickhouse-connect's `get_client` is replaced by a recorder (no server speaks HTTPS
with a private CA here): what the sandbox asks for is compared with what the
store's reader asked for, option by option. tests/query/test_sql_store_access.py
checks the same against the HTTP fixture, with credentials given only as settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import clickhouse_connect
import pytest

from trackhouse.store import Store, parse_dsn
from trackhouse.store.schema import sandbox_database
from trackhouse.store.settings import StoreSettings

SETTINGS = StoreSettings(user="svc", password="from-env", connect_timeout=3.0, query_timeout=60.0,
                         compress="zstd", ca_cert="/etc/trackhouse/ca.pem")


@dataclass
class _Answer:
    result_rows: list[tuple[Any, ...]]


@dataclass
class RecordedClient:
    """Stands in for a clickhouse-connect client: answers the sandbox's parse query."""

    options: dict[str, Any]
    database: str = ""
    queries: list[str] = field(default_factory=list)

    def query(self, sql: str, **_: Any) -> _Answer:
        self.queries.append(sql)
        return _Answer([("{}", "SELECT 1", True)])

    def close(self) -> None:
        pass


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordedClient]]:
    clients: list[RecordedClient] = []

    def get_client(**options: Any) -> RecordedClient:
        clients.append(RecordedClient(options))
        return clients[-1]

    monkeypatch.setattr(clickhouse_connect, "get_client", get_client)
    yield clients


def without_settings(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "settings"}  # ClickHouse settings differ by role


def test_sandbox_connects_with_the_store_settings(opened: list[RecordedClient]) -> None:
    store = Store(parse_dsn("https://dsn-user:dsn-pw@db.example:8443"), "trackhouse", readers=1, settings=SETTINGS)
    store.open()
    try:
        writer, reader = opened
        store.sandbox.parse("SELECT 1", {"readonly": 2})
        sandbox = opened[-1]
    finally:
        store.close()
    assert len(opened) == 3 and sandbox.queries
    assert without_settings(sandbox.options) == without_settings(reader.options) == without_settings(writer.options)
    assert sandbox.options["username"] == "svc" and sandbox.options["password"] == "from-env"
    assert sandbox.options["ca_cert"] == "/etc/trackhouse/ca.pem" and sandbox.options["verify"] is True
    assert sandbox.options["connect_timeout"] == 3.0 and sandbox.options["send_receive_timeout"] == 60.0
    assert sandbox.options["compress"] == "zstd"
    assert sandbox.database == sandbox_database("trackhouse")
