"""`trackhouse sql`: the answer printed as a table (or CSV / JSON), errors on stderr with exit 2."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from trackhouse.cli.main import main
from trackhouse.store import Store


def _seed(store: Store) -> None:
    path = Path(__file__).parent.parent / "query" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_th_sql_seed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_th_sql_seed"] = module
    spec.loader.exec_module(module)
    module.seed(store)


def test_sql_against_a_server_prints_a_table(store: Store, server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _seed(store)
    assert main(["sql", "SELECT experiment_id, count() AS n FROM runs GROUP BY experiment_id ORDER BY 1",
                 "--url", server.address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["experiment_id", "|", "n"]
    assert [line.split() for line in out[2:4]] == [["1", "|", "6"], ["2", "|", "2"]]
    assert out[-1] == "(2 rows)"


def test_sql_refusal_is_a_clear_error(store: Store, server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "SELECT * FROM system.tables", "--url", server.address]) == 2
    assert "system tables are not allowed" in capsys.readouterr().err


def test_sql_against_a_store_as_json(chdb_dsn: str, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _seed(store)
    assert main(["sql", "SELECT count() AS n FROM metrics", "--store", chdb_dsn, "--database", store.database,
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[800]]
    assert main(["sql", "SELECT 1 SETTINGS readonly = 0", "--store", chdb_dsn, "--database", store.database]) == 2
    assert "SETTINGS clauses are not allowed" in capsys.readouterr().err


def test_sql_bare_store_reads_the_server_variables(chdb_dsn: str, store: Store, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # As `migrate` and `token` do: a bare --store is TRACKHOUSE_SERVER_STORE, the database TRACKHOUSE_SERVER_DATABASE.
    _seed(store)
    monkeypatch.setenv("TRACKHOUSE_SERVER_STORE", chdb_dsn)
    monkeypatch.setenv("TRACKHOUSE_SERVER_DATABASE", store.database)
    assert main(["sql", "SELECT count() AS n FROM runs", "--store", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[8]]


def test_sql_store_reads_the_store_connection_variables(chdb_dsn: str, store: Store, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # TRACKHOUSE_STORE_* reach the store: a cluster is refused on the embedded store (ignored before).
    monkeypatch.setenv("TRACKHOUSE_STORE_CLUSTER", "c1")
    assert main(["sql", "SELECT 1", "--store", chdb_dsn, "--database", store.database]) == 2
    assert "cluster 'c1': cluster mode needs a ClickHouse server" in capsys.readouterr().err


def test_sql_store_without_query_says_what_to_write(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--store", "SELECT 1"]) == 2
    assert "--store took 'SELECT 1' as its DSN" in capsys.readouterr().err


def test_sql_url_wins_over_the_client_query_url(store: Store, server: Any, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _seed(store)
    monkeypatch.setenv("TRACKHOUSE_CLIENT_QUERY_URL", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("TRACKHOUSE_CLIENT_RPC_TIMEOUT", "3")
    assert main(["sql", "SELECT count() AS n FROM runs", "--url", server.address, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[8]]


def test_sql_without_url_reads_the_client_variables(store: Store, server: Any, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _seed(store)
    monkeypatch.setenv("TRACKHOUSE_CLIENT_URL", server.address)
    monkeypatch.delenv("TRACKHOUSE_CLIENT_QUERY_URL", raising=False)
    assert main(["sql", "SELECT count() AS n FROM runs", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[8]]
