"""`trackhouse token create|list|revoke` against a store."""

from __future__ import annotations

import pytest

from trackhouse.cli.main import main
from trackhouse.store import open_store
from trackhouse.store.auth import digest, parse_bearer


def test_create_list_revoke(chdb_dsn: str, database: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--store", chdb_dsn, "--database", database]
    assert main(["token", "create", "--name", "ci", "--scope", "write", "--experiment", "3", *where]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    token_id, secret = parse_bearer(f"Bearer {token}")
    assert main(["token", "list", *where]) == 0
    listing = capsys.readouterr().out
    assert token_id in listing and "write" in listing and "ci" in listing and secret not in listing
    store = open_store(chdb_dsn, database)
    try:
        record = store.get_token(token_id)
        assert record is not None and record.secret_sha256 == digest(secret) and record.experiment_ids == ("3",)
        assert main(["token", "revoke", token_id, *where]) == 0
        assert (got := store.get_token(token_id)) is not None and got.revoked
        assert "revoked token" in capsys.readouterr().out
    finally:
        store.close()
    assert main(["token", "list", *where]) == 0
    assert token_id not in capsys.readouterr().out
    assert main(["token", "revoke", "0" * 16, *where]) == 1
    assert main(["token", "create", "--name", "x", "--scope", "write", "--experiment", "a b", *where]) == 2
    assert "experiment id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["token", "create", "--name", "x", "--scope", "root", *where])
