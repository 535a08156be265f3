"""The `trackhouse` command: help, settings validation, migrate."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from trackhouse.cli.main import main
from trackhouse.cli.settings import ServerSettings
from trackhouse.store.schema import MIGRATIONS


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "migrate"):
        assert command in out


def test_bad_store_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--store", "mysql://x"]) == 2
    assert "unsupported store" in capsys.readouterr().err


def test_bad_database_name_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--store", "chdb:///tmp/x", "--database", "a;DROP"]) == 2
    assert "invalid database name" in capsys.readouterr().err


def test_settings_from_env_and_validation() -> None:
    s = ServerSettings.from_env({"TRACKHOUSE_SERVER_GRPC_PORT": "0", "TRACKHOUSE_SERVER_HTTP_PORT": "5001",
                                 "TRACKHOUSE_SERVER_DATABASE": "tx"})
    assert (s.grpc_port, s.http_port, s.database) == (0, 5001, "tx")
    with pytest.raises(ValueError, match="TRACKHOUSE_SERVER_GRPC_PORT"):
        ServerSettings.from_env({"TRACKHOUSE_SERVER_GRPC_PORT": "http"})
    with pytest.raises(ValueError, match="not a TCP port"):
        ServerSettings(http_port=70000)


def test_migrate_in_a_subprocess_is_idempotent(tmp_path: object) -> None:
    # A separate process: chDB allows one data path per process.
    store = f"chdb://{tmp_path}/data"
    db = f"m_{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "trackhouse.cli.main", "migrate", "--store", store, "--database", db]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    every = [m.version for m in MIGRATIONS]
    assert f"schema at version {every[-1]} (applied {every})" in first.stdout
    assert "nothing to do" in second.stdout
