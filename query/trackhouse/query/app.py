"""The query service's lifecycle: build search and history over a store, register the servicer.

Does not own the store or the gRPC server (the CLI composes those), so the
same app runs embedded beside ingest or alone.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from prometheus_client import CollectorRegistry

from trackhouse.proto.v1 import query_pb2_grpc
from trackhouse.query.downsample import MetricCharts
from trackhouse.query.history import MetricHistory
from trackhouse.query.runindex import Refresher, RunIndex, RunIndexCollector
from trackhouse.query.scope import sql_experiments
from trackhouse.query.search import RunSearch
from trackhouse.query.service import QueryServicer
from trackhouse.query.settings import QuerySettings
from trackhouse.query.sql import SqlQueries
from trackhouse.query.tokens import TokenCodec
from trackhouse.store import Store

TOKEN_SECRET_KEY = "page_token_secret"


class QueryApp:
    def __init__(self, store: Store, settings: QuerySettings | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.settings = settings or QuerySettings()
        self.registry = registry
        self.refresher: Refresher | None = None

    async def start(self, server: Any) -> None:
        store = self.store
        store.limit_reads(self.settings.max_query_seconds)
        await store.open_async()  # a ClickHouse server: reads on the async client (HTTP, aiohttp)
        # Shared through the store, so every query replica accepts every other's tokens.
        secret = await store.call(store.meta_value, TOKEN_SECRET_KEY, lambda: secrets.token_hex(32))
        tokens = TokenCodec(bytes.fromhex(secret))
        self.search = RunSearch(store, tokens, self.settings)
        self.history = MetricHistory(store, tokens, self.settings)
        self.charts = MetricCharts(store, self.settings)
        self.sql = SqlQueries(store, self.settings)
        self.servicer = QueryServicer(store, self.search, self.history, self.charts, self.sql,
                                      sql_scope=sql_experiments)
        query_pb2_grpc.add_QueryServiceServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]
        if self.settings.run_index:
            index = RunIndex(store, lag=self.settings.run_index_lag_seconds)
            self.refresher = Refresher(index, self.settings.run_index_refresh_seconds)
            if self.registry is not None:
                self.registry.register(RunIndexCollector(self.refresher, index))
            self.refresher.start()

    async def stop(self) -> None:
        if self.refresher is not None:
            await asyncio.to_thread(self.refresher.stop)
        await self.store.close_async()
