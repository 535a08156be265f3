"""The client over several ingest replicas: one stops, the client moves to the next, nothing is lost or doubled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import trackhouse.client as th
from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.client.errors import UsageError
from trackhouse.client.settings import parse_urls
from trackhouse.ingest.settings import IngestSettings
from trackhouse.store import Store, open_store


@pytest.fixture
def two_servers(store: Store, store_url: str) -> Iterator[list[ServerThread]]:
    stores = [store, open_store(store_url, store.database, migrate=False)]
    threads = [ServerThread(ServerConfig(store="", database=store.database, grpc_port=0,
                                         ingest=IngestSettings(flush_interval=0.02)), store=s) for s in stores]
    try:
        for thread in threads:
            thread.start()
        yield threads
    finally:
        for thread in threads:
            if thread._thread.is_alive():
                thread.stop(grace=0.5)
        stores[1].close()


def test_the_client_fails_over_to_the_next_replica(two_servers: list[ServerThread], store: Store,
                                                   tmp_path: Path) -> None:
    a, b = two_servers
    settings = th.Settings(flush_interval=0.02, backoff_initial=0.05, backoff_max=0.2, spool_dir=str(tmp_path))
    client = th.connect(addresses=[a.address, b.address], settings=settings)
    try:
        run = client.start_run(name="failover")
        for step in range(100):
            run.log(step=step, loss=float(step))
        assert client.flush(timeout=30.0)
        a.stop(grace=0.5)  # the first replica goes away; unary calls and the stream move to b
        for step in range(100, 200):
            run.log(step=step, loss=float(step))
        assert client.flush(timeout=60.0)
        run.finish()
    finally:
        client.close(timeout=30.0)
    rows = store.query_rows(f"SELECT count(), uniqExact(step), min(step), max(step) FROM {store.t('metrics')} "
                            "WHERE run_id = {r:String}", {"r": run.run_id})
    assert rows == [(200, 200, 0, 199)]


def test_addresses_are_parsed_as_a_list_of_replicas() -> None:
    assert parse_urls("a:1, grpcs://b:2") == [("a:1", False), ("b:2", True)]
    with pytest.raises(UsageError, match="empty address"):
        parse_urls("a:1,,b:2")
    with pytest.raises(UsageError, match="addresses"):
        th.connect(addresses="a:1")  # type: ignore[arg-type]
