"""Apply the schema migrations to a store, safely from several migrators at once.

Each migration is claimed by creating its lock table (`layout.migration_lock`):
CREATE TABLE without IF NOT EXISTS succeeds for exactly one of several racing
migrators (on a cluster, for the first entry of the distributed DDL queue). The
winner runs the migration's statements and records the version only after the
last one returned; the others wait until the version is recorded and go on.
The lock tables stay as markers. A claim older than `migration_lock_timeout`
whose version was never recorded (its migrator died) is dropped and taken over;
the statements are idempotent (IF NOT EXISTS), but a back-fill the dead migrator
had half done is not undone (docs/deploy.md, "Migrations").
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from trackhouse.store import layout, schema
from trackhouse.store.errors import QueryFailed, StoreError

if TYPE_CHECKING:
    from trackhouse.store.store import Store

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1


def migrate(store: Store) -> list[int]:
    """Create the database and apply missing migrations; return the versions this call applied."""
    store.command(layout.create_database(store.layout))
    for statement in layout.render(schema.MIGRATIONS_TABLE, store.layout):
        store.command(statement)
    applied = []
    for migration in schema.MIGRATIONS:
        if _applied(store, migration.version) or not _claim(store, migration.version):
            continue
        for template in migration.statements:
            for statement in layout.render(template, store.layout):
                store.command(statement)
        store.insert_rows(
            "schema_migrations", ("version", "description"), [(migration.version, migration.description)]
        )
        applied.append(migration.version)
    return applied


def _applied(store: Store, version: int) -> bool:
    rows = store.query_rows(f"SELECT count() FROM {store.t('schema_migrations')} WHERE version = {{v:UInt32}}",
                            {"v": version})
    return bool(rows and rows[0][0])


def _claim(store: Store, version: int) -> bool:
    """Own migration `version` (True), or wait until another migrator applied it (False)."""
    name, create = layout.migration_lock(store.layout, version)
    timeout = store.settings.migration_lock_timeout
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.command(create)
        except QueryFailed as exc:
            if "TABLE_ALREADY_EXISTS" not in str(exc) and "Code: 57." not in str(exc):
                raise
        else:
            return not _applied(store, version)  # it may have finished just before our CREATE
        if _applied(store, version):
            return False
        age = _table_age(store, name)
        if age is not None and age > timeout:
            log.warning("migration %d: taking over %s, left %.0f s ago by a migrator that did not finish",
                        version, store.t(name), age)
            store.command(f"DROP TABLE IF EXISTS {store.t(name)}{store.layout.on_cluster}")
            continue
        if time.monotonic() > deadline:
            raise StoreError(
                f"migration {version}: another migrator holds {store.t(name)} and has not finished after "
                f"{timeout:.0f} s; if it died, drop that table (DROP TABLE {store.t(name)}) and run migrate again")
        time.sleep(POLL_SECONDS)  # polling the store: there is no notification to wait on


def _table_age(store: Store, name: str) -> float | None:
    rows = store.query_rows("SELECT dateDiff('second', metadata_modification_time, now()) FROM system.tables "
                            "WHERE database = {d:String} AND name = {n:String}", {"d": store.database, "n": name})
    return float(rows[0][0]) if rows else None
