"""The ingest service's lifecycle: build its parts, start the flusher, drain on stop.

`IngestApp` owns the buffer, the flusher task, the catalog and the servicer; it
does not own the store or the gRPC server (the CLI composes those), so the
same app runs embedded (beside the query service) or alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.flusher import Flusher
from trackhouse.ingest.intake import Intake
from trackhouse.ingest.metrics import FlushHistograms, IngestCollector
from trackhouse.ingest.progress import WriterProgress
from trackhouse.ingest.service import IngestServicer
from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.v1 import ingest_pb2_grpc
from trackhouse.store import Store

log = logging.getLogger(__name__)


class IngestApp:
    def __init__(self, store: Store, settings: IngestSettings | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.settings = settings or IngestSettings()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._flusher_task: asyncio.Task[None] | None = None

    async def start(self, server: Any) -> None:
        """Create the parts on the running loop and register the service on `server`."""
        store = self.store

        async def insert(table: Any) -> None:
            await store.call(store.insert_metrics, table)

        async def load_committed(writer_id: str) -> int:
            return await store.call(store.writer_max_seq, writer_id)

        self.catalog = Catalog(store, max_runs=self.settings.max_cached_runs)
        await self.catalog.ensure_default_experiment()
        self.buffer = MetricBuffer(self.settings.buffer_bytes)
        self.progress = WriterProgress(load_committed, self.settings.max_cached_writers)
        histograms = FlushHistograms(self.registry)
        self.flusher = Flusher(self.buffer, self.progress, insert, self.settings, on_flush=histograms.observe)
        self.intake = Intake(self.catalog, self.buffer, self.progress, self.settings)
        self.servicer = IngestServicer(self.catalog, self.intake, self.settings.max_streams_per_connection)
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]
        self.registry.register(IngestCollector(self.counters))
        self._flusher_task = asyncio.create_task(self.flusher.run(), name="trackhouse-flusher")

    def counters(self) -> dict[str, Any]:
        """The live counters and gauges (what /metrics shows)."""
        return {
            "points_received": self.intake.points_received,
            "points_flushed": self.flusher.stats.rows,
            "flushes": self.flusher.stats.flushes,
            "flush_failures": self.flusher.stats.failures,
            "rejections": dict(self.intake.rejected),
            "buffer_bytes": self.buffer.nbytes,
            "buffer_budget_bytes": self.buffer.budget_bytes,
            "open_streams": self.servicer.open_streams,
        }

    async def stop(self) -> None:
        """Flush what is buffered, then stop the flusher."""
        if self._flusher_task is None:
            return
        self.flusher.stop()
        await self._flusher_task
        self._flusher_task = None
