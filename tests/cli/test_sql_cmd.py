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
