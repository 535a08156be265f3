"""`trackhouse token create|list|revoke`: API token management, straight against the store.

Managing tokens needs write access to the store itself (its DSN and, for a
ClickHouse server, its credentials): whoever holds that is an administrator by
definition, so these commands take no token. `create` prints the token once;
only its SHA-256 is stored. A running server sees a new or revoked token within
its cache TTL (TRACKHOUSE_SERVER_AUTH_CACHE_TTL, 5 s by default).

An embedded store (chdb://PATH) admits one process at a time: manage its tokens
while the server is stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

from trackhouse.store import open_store
from trackhouse.store.auth import Scope, check_experiment_ids, mint
from trackhouse.store.settings import StoreSettings


def add_parser(subparsers: Any, store_options: Callable[[argparse.ArgumentParser], None]) -> None:
    token = subparsers.add_parser("token", help="create, list and revoke API tokens",
                                  description=__doc__.split("\n\n")[1] if __doc__ else None)
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--name", required=True, help="who or what uses the token (shown by list)")
    create.add_argument("--scope", required=True, choices=[s.label for s in Scope],
                        help="read: queries; write: read + logging; admin: everything")
    create.add_argument("--experiment", action="append", default=[], metavar="ID", dest="experiments",
                        help="restrict the token to this experiment id (repeatable); default: all experiments")
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    revoke = actions.add_parser("revoke", help="revoke a token by its id (the 16 hex digits after th_)")
    revoke.add_argument("token_id")
    for parser in (create, listing, revoke):
        store_options(parser)


def run(args: argparse.Namespace, settings: StoreSettings | None = None) -> int:
    store = open_store(args.store, args.database, settings=settings)
    try:
        if args.token_command == "create":
            token, record = mint(args.name, Scope.parse(args.scope), check_experiment_ids(args.experiments))
            store.put_token(record)
            where = ", experiments " + ", ".join(record.experiment_ids) if record.experiment_ids else ""
            print(f"created token {record.token_id} ({record.name!r}, scope {record.scope}{where}).\n"
                  f"It is shown only now; store it safely:\n{token}")
            return 0
        if args.token_command == "list":
            rows = [t for t in store.list_tokens() if args.all or not t.revoked]
            print(f"{'ID':<17}{'SCOPE':<7}{'CREATED':<21}{'STATE':<9}{'EXPERIMENTS':<20}NAME")
            for t in rows:
                created = datetime.datetime.fromtimestamp(t.created_at / 1000, datetime.UTC)
                created_text = created.strftime("%Y-%m-%d %H:%M:%S")
                print(f"{t.token_id:<17}{t.scope:<7}{created_text:<21}{'revoked' if t.revoked else 'live':<9}"
                      f"{','.join(t.experiment_ids) or '(all)':<20}{t.name}")
            return 0
        found = store.get_token(args.token_id.removeprefix("th_")[:16])
        if found is None:
            print(f"trackhouse: error: no token {args.token_id!r}")
            return 1
        store.put_token(dataclasses.replace(found, revoked=True))
        print(f"revoked token {found.token_id} ({found.name!r}); servers refuse it within their cache TTL")
        return 0
    finally:
        store.close()
