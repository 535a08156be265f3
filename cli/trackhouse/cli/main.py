"""The `trackhouse` command.

    trackhouse serve    run ingest and query in one process on one store (embedded by default)
    trackhouse ingest   run the ingest service alone (a replica over a ClickHouse server)
    trackhouse query    run the query service and MLflow REST API alone (a replica over a ClickHouse server)
    trackhouse migrate  create or upgrade the schema of a store, then exit (safe from several replicas)
    trackhouse sync     upload a client spool directory (offline runs, undelivered points)
    trackhouse token    create, list and revoke API tokens (docs/security.md)
    trackhouse sql      run one read-only SELECT (docs/sql.md) and print the answer

`trackhouse COMMAND --help` explains each command's options.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from trackhouse.store.settings import StoreSettings

log = logging.getLogger("trackhouse")


def _store_options(parser: argparse.ArgumentParser, env: ServerSettings) -> None:
    parser.add_argument("--store", default=env.store, metavar="DSN",
                        help="chdb://PATH (embedded ClickHouse, default %(default)s) or http(s)://host:port "
                             "(a ClickHouse server); env TRACKHOUSE_SERVER_STORE")
    parser.add_argument("--database", default=env.database,
                        help="database inside the store (default %(default)s); env TRACKHOUSE_SERVER_DATABASE")
    parser.add_argument("--cluster", default=None, metavar="NAME",
                        help="ClickHouse cluster (remote_servers) for Replicated + Distributed tables and "
                             "DDL ON CLUSTER; env TRACKHOUSE_STORE_CLUSTER")


def _listen_options(parser: argparse.ArgumentParser, env: ServerSettings, grpc_default: int, http_default: int,
                    http_help: str) -> None:
    parser.add_argument("--host", default=env.host,
                        help="address to bind (default %(default)s: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", "--grpc-port", dest="grpc_port", type=int, default=grpc_default,
                        help="gRPC port (default %(default)s; 0 picks a free port)")
    parser.add_argument("--http-port", type=int, default=http_default,
                        help=f"HTTP port: {http_help} (default %(default)s; 0 picks a free port)")


def _security_options(parser: argparse.ArgumentParser, env: ServerSettings) -> None:
    """Auth and TLS, the same for every command that serves (serve, ingest, query)."""
    parser.add_argument("--auth", choices=("auto", "on", "off"), default=env.auth,
                        help="require API tokens: auto (default %(default)s from TRACKHOUSE_SERVER_AUTH) = on "
                             "iff --host is not loopback")
    parser.add_argument("--tls-cert", default=env.tls_cert, metavar="PEM",
                        help="certificate file: serve gRPC and HTTP over TLS (with --tls-key)")
    parser.add_argument("--tls-key", default=env.tls_key, metavar="PEM", help="private key file of --tls-cert")


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
                       help="HTTP port: the MLflow REST API, POST /api/v1/sql, Prometheus /metrics and /health "
                            "(default %(default)s; 0 picks a free port)")
    _security_options(serve, env)
    serve.add_argument("--demo", action="store_true",
                       help="seed a small demo sweep (once per store) so there is data to look at")
    for name, grpc_port, http_port, what, http_help in (
            ("ingest", env.grpc_port, 9100, "the ingest service", "Prometheus /metrics and /health"),
            ("query", 50052, env.http_port, "the query service and the MLflow REST API",
             "MLflow REST API, POST /api/v1/sql, /metrics and /health")):
        service = sub.add_parser(name, help=f"run {what} alone over a ClickHouse server",
                                 description=f"Run {what} as one stateless replica over a store (a ClickHouse "
                                             "server: http(s)://…); run as many as needed behind a load balancer. "
                                             "The schema must be current: run `trackhouse migrate` first.")
        _store_options(service, env)
        _listen_options(service, env, grpc_port, http_port, http_help)
        _security_options(service, env)
    query = sub.choices["query"]
    query.add_argument("--ingest-address", default=env.ingest_address or None, metavar="HOST:PORT",
                       help="the ingest service (its load balancer) for MLflow REST writes; unset: REST writes "
                            "are refused; env TRACKHOUSE_SERVER_INGEST_ADDRESS")
    migrate = sub.add_parser("migrate", help="create or upgrade the schema of a store, then exit",
                             description="Apply the schema migrations a store is missing. Idempotent, and safe "
                                         "to run from several replicas at once (one applies, the others wait).")
    _store_options(migrate, env)
    sync.add_parser(sub)
    tokens.add_parser(sub, lambda p: _store_options(p, env))
    sqlcmd.add_parser(sub)
    return parser


def _store_settings(args: argparse.Namespace) -> StoreSettings:
    settings = StoreSettings.from_env()
    cluster = getattr(args, "cluster", None)
    return settings if cluster is None else dataclasses.replace(settings, cluster=cluster)


async def _serve(args: argparse.Namespace) -> int:
    env = ServerSettings.from_env()
    services = ("ingest", "query") if args.command == "serve" else (args.command,)
    config = ServerConfig(store=args.store, database=args.database, host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, ingest=IngestSettings.from_env(), query=QuerySettings.from_env(),
                          services=services, ingest_address=getattr(args, "ingest_address", None),
                          store_settings=_store_settings(args), migrate=args.command == "serve",
                          auth=args.auth, auth_cache_ttl=env.auth_cache_ttl, tls_cert=args.tls_cert,
                          tls_key=args.tls_key)
    server = EmbeddedServer(config)
    port = await server.start()
    address = f"{args.host}:{port}"
    scheme = "https" if config.tls else "http"
    tls = " (TLS)" if config.tls else ""
    auth = f"  auth: {'on: API tokens required' if config.auth_on else 'off (loopback only)'}\n"
    store = f"  store: {server.store.dsn.redacted() if server.store else config.store} (database {config.database})"
    if args.command == "serve":
        print(f"trackhouse serving\n  gRPC (ingest + query): {address}{tls}\n{auth}"
              f"  HTTP: {scheme}://{args.host}:{server.http_port} — MLflow REST API (MLFLOW_TRACKING_URI), "
              f"POST /api/v1/sql, /metrics (Prometheus), /health\n{store}\n  Python: import trackhouse.client as th; "
              f"client = th.connect({address!r})", flush=True)
    else:
        routes = ("MLflow REST API, POST /api/v1/sql, /metrics, /health" if args.command == "query"
                  else "/metrics, /health")
        print(f"trackhouse {args.command} serving\n  gRPC ({args.command}): {address}{tls}\n{auth}"
              f"  HTTP: {scheme}://{args.host}:{server.http_port} — {routes}\n{store}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seeding = asyncio.create_task(_seed_demo(address)) if getattr(args, "demo", False) else None
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
    store = open_store(args.store, args.database, migrate=False, settings=_store_settings(args))
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
                       auth=getattr(args, "auth", env.auth), auth_cache_ttl=env.auth_cache_ttl,
                       tls_cert=getattr(args, "tls_cert", env.tls_cert), tls_key=getattr(args, "tls_key", env.tls_key),
                       ingest_address=getattr(args, "ingest_address", None) or "")
        if args.command == "token":
            return tokens.run(args, _store_settings(args))
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
