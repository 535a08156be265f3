"""The `trackhouse` command.

    trackhouse serve    run ingest and query in one process on one store (embedded by default)
    trackhouse migrate  create or upgrade the schema of a store, then exit
    trackhouse sync     upload a client spool directory (offline runs, undelivered points)
    trackhouse token    create, list and revoke API tokens (docs/security.md)
    trackhouse sql      run one read-only SELECT (docs/sql.md) and print the answer

`trackhouse COMMAND --help` explains each command's options.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from trackhouse.cli import sqlcmd, sync, tokens
from trackhouse.cli.server import EmbeddedServer, ServerConfig, new_event_loop
from trackhouse.cli.settings import ServerSettings
from trackhouse.client import TrackhouseError
from trackhouse.ingest.settings import IngestSettings
from trackhouse.query.errors import QueryError
from trackhouse.query.settings import QuerySettings
from trackhouse.store import StoreError, open_store

log = logging.getLogger("trackhouse")


def _store_options(parser: argparse.ArgumentParser, env: ServerSettings) -> None:
    parser.add_argument("--store", default=env.store, metavar="DSN",
                        help="chdb://PATH (embedded ClickHouse, default %(default)s) or http(s)://host:port "
                             "(a ClickHouse server); env TRACKHOUSE_SERVER_STORE")
    parser.add_argument("--database", default=env.database,
                        help="database inside the store (default %(default)s); env TRACKHOUSE_SERVER_DATABASE")


def build_parser(env: ServerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trackhouse",
        description="Experiment tracking for massive run volumes: gRPC ingest, a columnar ClickHouse "
                    "store, MLflow-style search.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run ingest and query in one process on one store",
                           description="Run the ingest and query gRPC services in one process over one "
                                       "store (embedded chDB by default). Ctrl-C stops it after flushing.")
    _store_options(serve, env)
    serve.add_argument("--host", default=env.host,
                       help="address to bind (default %(default)s: this machine only)")
    serve.add_argument("--grpc-port", type=int, default=env.grpc_port,
                       help="gRPC port for ingest and query (default %(default)s; 0 picks a free port)")
    serve.add_argument("--http-port", type=int, default=env.http_port,
                       help="HTTP port: Prometheus /metrics and /health (default %(default)s; 0 picks a free port)")
    serve.add_argument("--auth", choices=("auto", "on", "off"), default=env.auth,
                       help="require API tokens: auto (default %(default)s from TRACKHOUSE_SERVER_AUTH) = on "
                            "iff --host is not loopback")
    serve.add_argument("--tls-cert", default=env.tls_cert, metavar="PEM",
                       help="certificate file: serve gRPC and HTTP over TLS (with --tls-key)")
    serve.add_argument("--tls-key", default=env.tls_key, metavar="PEM", help="private key file of --tls-cert")
    serve.add_argument("--demo", action="store_true",
                       help="seed a small demo sweep (once per store) so there is data to look at")
    migrate = sub.add_parser("migrate", help="create or upgrade the schema of a store, then exit",
                             description="Apply the schema migrations a store is missing. Idempotent.")
    _store_options(migrate, env)
    sync.add_parser(sub)
    tokens.add_parser(sub, lambda p: _store_options(p, env))
    sqlcmd.add_parser(sub)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    env = ServerSettings.from_env()
    config = ServerConfig(store=args.store, database=args.database, host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, ingest=IngestSettings.from_env(), query=QuerySettings.from_env(),
                          auth=args.auth, auth_cache_ttl=env.auth_cache_ttl, tls_cert=args.tls_cert,
                          tls_key=args.tls_key)
    server = EmbeddedServer(config)
    port = await server.start()
    address = f"{args.host}:{port}"
    scheme = "https" if config.tls else "http"
    print(f"trackhouse serving\n  gRPC (ingest + query): {address}{' (TLS)' if config.tls else ''}\n"
          f"  auth: {'on: API tokens required' if config.auth_on else 'off (loopback only)'}\n"
          f"  HTTP: {scheme}://{args.host}:{server.http_port} — MLflow REST API (MLFLOW_TRACKING_URI), "
          f"/metrics (Prometheus), /health\n  store: {config.store} "
          f"(database {config.database})\n  Python: import trackhouse.client as th; "
          f"client = th.connect({address!r})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seeding = asyncio.create_task(_seed_demo(address)) if args.demo else None
    await stop.wait()
    if seeding is not None:
        seeding.cancel()
    print("stopping: flushing buffered points…", flush=True)
    await server.stop()
    return 0


async def _seed_demo(address: str) -> None:
    from trackhouse.cli import demo

    try:
        run_ids = await asyncio.to_thread(demo.seed, address)
    except Exception as exc:  # the server keeps serving; the demo is a convenience
        log.error("demo seeding failed: %s", exc)
        return
    if run_ids:
        print(f"demo: seeded {len(run_ids)} runs in experiment {demo.EXPERIMENT!r}", flush=True)
    else:
        print(f"demo: experiment {demo.EXPERIMENT!r} exists already; not seeding again", flush=True)


def _migrate(args: argparse.Namespace) -> int:
    store = open_store(args.store, args.database, migrate=False)
    try:
        applied = store.migrate()
        version = store.schema_version()
    finally:
        store.close()
    print(f"schema at version {version}" + (f" (applied {applied})" if applied else " (nothing to do)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        env = ServerSettings.from_env()
        args = build_parser(env).parse_args(argv)
        if args.command == "sync":
            return sync.run(args)
        if args.command == "sql":
            return sqlcmd.run(args)
        ServerSettings(args.store, args.database, getattr(args, "host", env.host),
                       getattr(args, "grpc_port", env.grpc_port), getattr(args, "http_port", env.http_port),
                       getattr(args, "auth", env.auth), env.auth_cache_ttl, getattr(args, "tls_cert", env.tls_cert),
                       getattr(args, "tls_key", env.tls_key))
        if args.command == "token":
            return tokens.run(args)
        if args.command == "migrate":
            return _migrate(args)
        loop = new_event_loop()
        try:
            return loop.run_until_complete(_serve(args))
        finally:
            loop.close()
    except (StoreError, ValueError, OSError, TrackhouseError, QueryError) as exc:
        print(f"trackhouse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
