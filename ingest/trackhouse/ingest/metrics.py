"""The ingest service's Prometheus metrics.

Counters and gauges are read from the live objects at scrape time (a custom
collector), so the domain keeps one set of plain counters and nothing is
counted twice; the two histograms are observed once per flush, never per point.

    trackhouse_ingest_points_received_total      points accepted into the buffer
    trackhouse_ingest_points_flushed_total       points made durable by an INSERT
    trackhouse_ingest_flushes_total              INSERTs that succeeded
    trackhouse_ingest_flush_failures_total       INSERTs that failed
    trackhouse_ingest_rejections_total{reason}   rejected batches by reason (error kind)
    trackhouse_ingest_buffer_bytes               bytes buffered or being flushed
    trackhouse_ingest_buffer_budget_bytes        the buffer's byte budget
    trackhouse_ingest_open_streams               open StreamMetrics calls
    trackhouse_ingest_flush_rows                 rows per INSERT (histogram)
    trackhouse_ingest_flush_seconds              INSERT latency (histogram)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_ROW_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FlushHistograms:
    """Per-flush observations; `observe` is the flusher's `on_flush` callback."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Histogram("trackhouse_ingest_flush_rows", "Rows per INSERT", buckets=_ROW_BUCKETS,
                              registry=registry)
        self.seconds = Histogram("trackhouse_ingest_flush_seconds", "INSERT latency in seconds",
                                 buckets=_SECONDS_BUCKETS, registry=registry)

    def observe(self, rows: int, seconds: float) -> None:
        self.rows.observe(rows)
        self.seconds.observe(seconds)


class IngestCollector(Collector):
    """Reads counters and gauges from the running ingest app at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        s = self._read()
        yield CounterMetricFamily("trackhouse_ingest_points_received", "Points accepted into the buffer",
                                  value=s["points_received"])
        yield CounterMetricFamily("trackhouse_ingest_points_flushed", "Points made durable by an INSERT",
                                  value=s["points_flushed"])
        yield CounterMetricFamily("trackhouse_ingest_flushes", "INSERTs that succeeded", value=s["flushes"])
        yield CounterMetricFamily("trackhouse_ingest_flush_failures", "INSERTs that failed",
                                  value=s["flush_failures"])
        rejections = CounterMetricFamily("trackhouse_ingest_rejections", "Rejected metric batches by reason",
                                         labels=["reason"])
        for reason, count in sorted(s["rejections"].items()):
            rejections.add_metric([reason], count)
        yield rejections
        yield GaugeMetricFamily("trackhouse_ingest_buffer_bytes", "Bytes buffered or being flushed",
                                value=s["buffer_bytes"])
        yield GaugeMetricFamily("trackhouse_ingest_buffer_budget_bytes", "The buffer's byte budget",
                                value=s["buffer_budget_bytes"])
        yield GaugeMetricFamily("trackhouse_ingest_open_streams", "Open StreamMetrics calls",
                                value=s["open_streams"])
