"""The embedded server's HTTP listener: Prometheus /metrics reflects ingest, /health answers."""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np

from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc


def _get(thread: ServerThread, path: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{thread.server.http_port}{path}", timeout=10) as resp:
        return resp.headers["content-type"], resp.read().decode()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_points_flushes_and_rejections(http_server: ServerThread) -> None:
    with grpc.insecure_channel(http_server.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        run = stub.CreateRun(ingest_pb2.CreateRunRequest(experiment_id="0"))
        n = 500
        good = ingest_pb2.MetricBatch(
            writer_id="w", seq=1, run_ids=[run.run_id], keys=["loss"],
            key_index=np.zeros(n, "<u4").tobytes(), steps=np.arange(n, dtype="<i8").tobytes(),
            timestamps=np.full(n, 1, "<i8").tobytes(), values=np.ones(n, "<f8").tobytes(),
        )
        bad = ingest_pb2.MetricBatch(  # one point of a run that does not exist
            writer_id="w", seq=2, run_ids=["nope"], keys=["loss"], key_index=np.zeros(1, "<u4").tobytes(),
            steps=np.zeros(1, "<i8").tobytes(), timestamps=np.ones(1, "<i8").tobytes(),
            values=np.ones(1, "<f8").tobytes(),
        )
        acks = list(stub.StreamMetrics(iter([good, bad])))
    assert [a.status for a in acks] == [ingest_pb2.STORED, ingest_pb2.REJECTED]
    content_type, text = _get(http_server, "/metrics")
    assert content_type.startswith("text/plain")
    s = _samples(text)
    assert s["trackhouse_ingest_points_received_total"] == n
    assert s["trackhouse_ingest_points_flushed_total"] == n
    assert s["trackhouse_ingest_flushes_total"] >= 1
    assert s['trackhouse_ingest_rejections_total{reason="NotFound"}'] == 1
    assert s["trackhouse_ingest_flush_rows_sum"] == n
    assert s["trackhouse_ingest_buffer_bytes"] == 0
    assert s["trackhouse_ingest_open_streams"] == 0


def test_health(http_server: ServerThread) -> None:
    content_type, text = _get(http_server, "/health")
    body = json.loads(text)
    assert content_type == "application/json"
    assert body["status"] == "ok" and body["grpc_port"] == http_server.server.port


def test_grpc_health_service(http_server: ServerThread) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(http_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "trackhouse.v1.IngestService", "trackhouse.v1.QueryService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_report_the_run_index_refresher(http_server: ServerThread) -> None:
    app = next(a for a in http_server.server._apps if getattr(a, "refresher", None) is not None)
    assert app.refresher.first_pass.wait(30.0)  # the first pass (a build) runs at start
    s = _samples(_get(http_server, "/metrics")[1])
    assert s["trackhouse_query_run_index_passes_total"] >= 1
    assert s["trackhouse_query_run_index_failures_total"] == 0
    assert s["trackhouse_query_run_index_last_pass_seconds"] >= 0
    assert 0 <= s["trackhouse_query_run_index_watermark_age_seconds"] < 3600
    assert "trackhouse_query_run_index_last_pass_runs" in s
