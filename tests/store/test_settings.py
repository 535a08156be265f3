"""StoreSettings: how the services reach a ClickHouse server, from the environment."""

from __future__ import annotations

import pytest

from trackhouse.store import parse_dsn
from trackhouse.store.dsn import server_options
from trackhouse.store.settings import StoreSettings


def test_defaults_and_environment() -> None:
    assert StoreSettings.from_env({}) == StoreSettings()
    s = StoreSettings.from_env({
        "TRACKHOUSE_STORE_USER": "ingest", "TRACKHOUSE_STORE_PASSWORD": "pw",
        "TRACKHOUSE_STORE_CONNECT_TIMEOUT": "3", "TRACKHOUSE_STORE_QUERY_TIMEOUT": "60",
        "TRACKHOUSE_STORE_COMPRESS": "zstd", "TRACKHOUSE_STORE_CA_CERT": "/etc/ca.pem",
        "TRACKHOUSE_STORE_CLUSTER": "main", "TRACKHOUSE_STORE_MIGRATION_LOCK_TIMEOUT": "30",
    })
    assert s == StoreSettings("ingest", "pw", 3.0, 60.0, "zstd", True, "/etc/ca.pem", "main", 30.0)


@pytest.mark.parametrize("env, match", [
    ({"TRACKHOUSE_STORE_COMPRESS": "snappy"}, "compress"),
    ({"TRACKHOUSE_STORE_QUERY_TIMEOUT": "0"}, "query_timeout"),
    ({"TRACKHOUSE_STORE_CONNECT_TIMEOUT": "soon"}, "not a number"),
    ({"TRACKHOUSE_STORE_VERIFY": "maybe"}, "VERIFY"),
    ({"TRACKHOUSE_STORE_CLUSTER": "a;b"}, "cluster name"),
    ({"TRACKHOUSE_STORE_VERIFY": "0", "TRACKHOUSE_STORE_CA_CERT": "/ca.pem"}, "verify is off"),
])
def test_impossible_values_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StoreSettings.from_env(env)


def test_server_options_prefer_settings_over_the_dsn_and_pass_tls_only_for_https() -> None:
    dsn = parse_dsn("https://alice:secret@ch.example:8443")
    opts = server_options(dsn, StoreSettings(user="bob", verify=True, ca_cert="/ca.pem", compress="none"))
    assert opts["username"] == "bob" and opts["password"] == "secret"
    assert opts["verify"] is True and opts["ca_cert"] == "/ca.pem" and opts["compress"] is False
    plain = server_options(parse_dsn("http://ch:8123"), None)
    assert "verify" not in plain and plain["compress"] == "lz4" and plain["send_receive_timeout"] == 300.0


def test_cluster_mode_refuses_the_embedded_store(chdb_dsn: str) -> None:
    from trackhouse.store import InvalidDSN, open_store

    with pytest.raises(InvalidDSN, match="cluster mode needs a ClickHouse server"):
        open_store(chdb_dsn, "x", settings=StoreSettings(cluster="main"))
