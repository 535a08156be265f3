"""Auth on a real embedded server: tokens on every RPC and HTTP endpoint, scopes, experiment-scoped tokens."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import trackhouse.client as th
from trackhouse.cli.guard import auth_enabled
from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, query_pb2, query_pb2_grpc
from trackhouse.store import Store
from trackhouse.store.auth import Scope, mint


@dataclass
class Secured:
    thread: ServerThread
    tokens: dict[str, str]
    experiments: tuple[str, str]
    runs: tuple[str, str]  # one run in each experiment

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.thread.server.http_port}"


def _token(store: Store, name: str, scope: Scope, experiments: tuple[str, ...] = ()) -> str:
    token, record = mint(name, scope, experiments)
    store.put_token(record)
    return token


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def secured(store: Store, start_server: Callable[..., AbstractContextManager[ServerThread]]) -> Iterator[Secured]:
    admin = _token(store, "admin", Scope.ADMIN)
    with start_server(http=True, auth="on") as thread, grpc.insecure_channel(thread.address) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        exps = tuple(ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=n), metadata=_md(admin))
                     .experiment_id for n in ("mine", "theirs"))
        runs = tuple(ingest.CreateRun(ingest_pb2.CreateRunRequest(experiment_id=e, run_name=f"r-{e}"),
                                      metadata=_md(admin)).run_id for e in exps)
        tokens = {
            "admin": admin, "read": _token(store, "reader", Scope.READ), "write": _token(store, "writer", Scope.WRITE),
            "scoped": _token(store, "scoped", Scope.WRITE, (exps[0],)),
        }
        yield Secured(thread, tokens, exps, runs)  # type: ignore[arg-type]


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()  # type: ignore[no-any-return]


def test_auto_means_on_unless_loopback() -> None:
    assert not auth_enabled("auto", "127.0.0.1") and not auth_enabled("auto", "::1")
    assert not auth_enabled("auto", "localhost")
    assert auth_enabled("auto", "0.0.0.0") and auth_enabled("auto", "10.1.2.3") and auth_enabled("auto", "::")
    assert auth_enabled("on", "127.0.0.1") and not auth_enabled("off", "0.0.0.0")
    with pytest.raises(ValueError, match="auth mode"):
        auth_enabled("maybe", "127.0.0.1")


def test_grpc_without_a_valid_token_is_unauthenticated_and_health_stays_open(secured: Secured) -> None:
    with grpc.insecure_channel(secured.thread.address) as channel:
        query = query_pb2_grpc.QueryServiceStub(channel)
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        assert _code(lambda: query.SearchRuns(query_pb2.SearchRunsRequest())) == grpc.StatusCode.UNAUTHENTICATED
        bogus = _md("th_0123456789abcdef_" + "A" * 43)
        assert _code(lambda: ingest.CreateRun(ingest_pb2.CreateRunRequest(), metadata=bogus)) \
            == grpc.StatusCode.UNAUTHENTICATED
        acks = ingest.StreamMetrics(iter([ingest_pb2.MetricBatch(writer_id="w", seq=1)]))
        assert _code(lambda: list(acks)) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_scopes(secured: Secured) -> None:
    with grpc.insecure_channel(secured.thread.address) as channel:
        query = query_pb2_grpc.QueryServiceStub(channel)
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        read = _md(secured.tokens["read"])
        assert len(query.SearchRuns(query_pb2.SearchRunsRequest(), metadata=read).runs) == 2
        assert ingest.GetExperiment(ingest_pb2.GetExperimentRequest(name="mine"), metadata=read).name == "mine"
        assert _code(lambda: ingest.CreateRun(ingest_pb2.CreateRunRequest(), metadata=read)) \
            == grpc.StatusCode.PERMISSION_DENIED
        write = _md(secured.tokens["write"])
        assert ingest.CreateRun(ingest_pb2.CreateRunRequest(), metadata=write).run_id


def _batch(run_id: str, seq: int = 1) -> Any:
    return ingest_pb2.MetricBatch(
        writer_id=f"w-{run_id}", seq=seq, run_ids=[run_id], keys=["loss"],
        key_index=np.zeros(3, "<u4").tobytes(), steps=np.arange(3, dtype="<i8").tobytes(),
        timestamps=np.full(3, 1000, "<i8").tobytes(), values=np.ones(3, "<f8").tobytes())


def test_experiment_scoped_token_sees_and_writes_only_its_experiments(secured: Secured) -> None:
    mine, theirs = secured.runs
    md = _md(secured.tokens["scoped"])
    with grpc.insecure_channel(secured.thread.address) as channel:
        query = query_pb2_grpc.QueryServiceStub(channel)
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        # Search is filtered, not refused: asking for the other experiment finds nothing.
        assert [r.info.run_id for r in query.SearchRuns(query_pb2.SearchRunsRequest(), metadata=md).runs] == [mine]
        other = query_pb2.SearchRunsRequest(experiment_ids=[secured.experiments[1]], include_total=True)
        page = query.SearchRuns(other, metadata=md)
        assert list(page.runs) == [] and page.total == 0
        assert query.GetRun(query_pb2.GetRunRequest(run_id=mine), metadata=md).info.run_id == mine
        not_found = grpc.StatusCode.NOT_FOUND
        assert _code(lambda: query.GetRun(query_pb2.GetRunRequest(run_id=theirs), metadata=md)) == not_found
        history = query_pb2.GetMetricHistoryRequest(run_id=theirs, key="loss")
        assert _code(lambda: query.GetMetricHistory(history, metadata=md)) == not_found
        buckets = query_pb2.GetMetricBucketsRequest(run_ids=[mine, theirs], key="loss")
        assert _code(lambda: query.GetMetricBuckets(buckets, metadata=md)) == not_found
        # Writes to the other experiment's runs are refused as if the run did not exist.
        params = ingest_pb2.LogParamsRequest(run_id=theirs, params=[common_pb2.Param(key="a", value="1")])
        assert _code(lambda: ingest.LogParams(params, metadata=md)) == not_found
        assert _code(lambda: ingest.DeleteRun(ingest_pb2.RunRef(run_id=theirs), metadata=md)) == not_found
        create = ingest_pb2.CreateRunRequest(experiment_id=secured.experiments[1])
        assert _code(lambda: ingest.CreateRun(create, metadata=md)) == not_found
        assert _code(lambda: ingest.GetExperiment(ingest_pb2.GetExperimentRequest(name="theirs"), metadata=md)) \
            == not_found
        assert _code(lambda: ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name="new"), metadata=md)) \
            == grpc.StatusCode.PERMISSION_DENIED
        acks = list(ingest.StreamMetrics(iter([_batch(theirs), _batch(mine)]), metadata=md))
        assert [a.status for a in acks] == [ingest_pb2.REJECTED, ingest_pb2.STORED]
        assert acks[0].code == not_found.value[0]
        assert ingest.LogParams(ingest_pb2.LogParamsRequest(run_id=mine, params=[common_pb2.Param(key="a", value="1")]),
                                metadata=md) is not None


def test_client_sends_its_token(secured: Secured) -> None:
    with pytest.raises(th.TrackhouseError):
        list(th.connect(secured.thread.address, settings=th.Settings(rpc_timeout=5)).search_runs())
    client = th.connect(secured.thread.address, token=secured.tokens["write"], settings=th.Settings(rpc_timeout=5))
    try:
        run = client.start_run(experiment="mine", name="client-run")
        run.log(step=1, loss=0.5)
        run.finish()
        found = list(client.search_runs(filter="attributes.run_name = 'client-run'"))
        assert [(r.name, r.experiment_id) for r in found] == [("client-run", secured.experiments[0])]
    finally:
        client.close()


def _http(url: str, token: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode()}


def test_http_auth_and_scopes(secured: Secured) -> None:
    base = secured.http + "/api/2.0/mlflow"
    status, body = _http(base + "/runs/search", body={})
    assert status == 401 and body["error_code"] == "UNAUTHENTICATED"
    assert _http(secured.http + "/health")[0] == 200
    assert _http(secured.http + "/metrics")[0] == 401
    assert _http(secured.http + "/metrics", secured.tokens["read"])[0] == 200
    status, body = _http(base + "/runs/create", secured.tokens["read"], {"experiment_id": secured.experiments[0]})
    assert status == 403 and body["error_code"] == "PERMISSION_DENIED"
    status, body = _http(base + "/runs/create", secured.tokens["write"], {"experiment_id": secured.experiments[0]})
    assert status == 200, body
    run_id = body["run"]["info"]["run_id"]
    status, body = _http(base + "/runs/log-metric", secured.tokens["write"],
                         {"run_id": run_id, "key": "x", "value": 1.0, "timestamp": 1, "step": 0})
    assert status == 200, body


def test_http_experiment_scoped_token(secured: Secured) -> None:
    base, token = secured.http + "/api/2.0/mlflow", secured.tokens["scoped"]
    mine, theirs = secured.runs
    status, body = _http(base + "/runs/search", token, {"experiment_ids": list(secured.experiments)})
    assert status == 200 and [r["info"]["run_id"] for r in body["runs"]] == [mine]
    status, body = _http(base + "/experiments/search", token, {})
    assert status == 200 and [e["name"] for e in body["experiments"]] == ["mine"]
    assert _http(f"{base}/runs/get?run_id={theirs}", token)[0] == 404
    assert _http(f"{base}/experiments/get?experiment_id={secured.experiments[1]}", token)[0] == 404
    assert _http(f"{base}/metrics/get-history?run_id={theirs}&metric_key=loss", token)[0] == 404
    status, body = _http(base + "/runs/log-metric", token,
                         {"run_id": theirs, "key": "x", "value": 1.0, "timestamp": 1, "step": 0})
    assert status == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    status, _ = _http(base + "/runs/log-metric", token,
                      {"run_id": mine, "key": "x", "value": 1.0, "timestamp": 1, "step": 0})
    assert status == 200


def test_mlflow_client_sends_mlflow_tracking_token(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=secured.http).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secured.tokens["scoped"])
    names = [e.name for e in MlflowClient(tracking_uri=secured.http).search_experiments()]
    assert names == ["mine"]


def test_auth_on_with_no_tokens_refuses_everything(
        store: Store, start_server: Callable[..., AbstractContextManager[ServerThread]]) -> None:
    with start_server(auth="on") as thread, grpc.insecure_channel(thread.address) as channel:
        query = query_pb2_grpc.QueryServiceStub(channel)
        assert _code(lambda: query.SearchRuns(query_pb2.SearchRunsRequest())) == grpc.StatusCode.UNAUTHENTICATED


def test_separate_ingest_and_query_services_check_tokens_as_serve_does(
        store: Store, start_server: Callable[..., AbstractContextManager[ServerThread]]) -> None:
    """`trackhouse ingest` / `trackhouse query`: the same interceptors and HTTP middleware as `serve`;
    the query service's REST writes reach the separate ingest service as the caller."""
    admin, read = _token(store, "admin", Scope.ADMIN), _token(store, "reader", Scope.READ)
    with start_server(http=True, auth="on", services=("ingest",)) as ingest_thread, \
            start_server(http=True, auth="on", services=("query",),
                         ingest_address=ingest_thread.address) as query_thread, \
            grpc.insecure_channel(ingest_thread.address) as ingest_channel, \
            grpc.insecure_channel(query_thread.address) as query_channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        query = query_pb2_grpc.QueryServiceStub(query_channel)
        assert _code(lambda: ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name="e"))) \
            == grpc.StatusCode.UNAUTHENTICATED
        experiment = ingest.CreateExperiment(ingest_pb2.CreateExperimentRequest(name="e"),
                                             metadata=_md(admin)).experiment_id
        assert _code(lambda: query.SearchRuns(query_pb2.SearchRunsRequest())) == grpc.StatusCode.UNAUTHENTICATED
        query.SearchRuns(query_pb2.SearchRunsRequest(experiment_ids=[experiment]), metadata=_md(read))
        for thread in (ingest_thread, query_thread):
            http = f"http://127.0.0.1:{thread.server.http_port}"
            assert _http(http + "/metrics")[0] == 401
            assert _http(http + "/health")[0] == 200
        base = f"http://127.0.0.1:{query_thread.server.http_port}/api/2.0/mlflow"
        assert _http(base + "/runs/search", body={})[0] == 401
        status, body = _http(base + "/runs/create", read, {"experiment_id": experiment})
        assert status == 403 and body["error_code"] == "PERMISSION_DENIED", body  # the scope of the path
        status, body = _http(base + "/runs/create", admin, {"experiment_id": experiment})
        assert status == 200, body


def test_ingest_and_query_commands_take_the_auth_and_tls_options() -> None:
    from trackhouse.cli.main import build_parser
    from trackhouse.cli.settings import ServerSettings

    for command in ("serve", "ingest", "query"):
        args = build_parser(ServerSettings()).parse_args(
            [command, "--auth", "on", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
        assert (args.auth, args.tls_cert, args.tls_key) == ("on", "c.pem", "k.pem"), command


def test_sql_is_read_scope_and_an_experiment_scoped_token_reads_only_its_rows(secured: Secured) -> None:
    query = {"query": "SELECT experiment_id, count() AS runs FROM runs GROUP BY experiment_id "
                      "ORDER BY experiment_id", "format": "json"}
    url = secured.http + "/api/v1/sql"
    assert _http(url, None, query)[0] == 401
    status, body = _http(url, secured.tokens["read"], query)
    assert status == 200, body
    assert [c["name"] for c in body["columns"]] == ["experiment_id", "runs"]
    assert {row[0] for row in body["rows"]} >= set(secured.experiments)
    status, body = _http(url, secured.tokens["scoped"], query)
    assert status == 200, body
    assert [row[0] for row in body["rows"]] == [secured.experiments[0]]
    # The same over gRPC, through the client: filtered, not refused.
    for token, expected in ((secured.tokens["scoped"], [secured.experiments[0]]),
                            (secured.tokens["read"], sorted(secured.experiments))):
        client = th.connect(secured.thread.address, token=token, settings=th.Settings(rpc_timeout=10))
        try:
            table = client.sql("SELECT DISTINCT experiment_id FROM runs WHERE experiment_id IN "
                               f"('{secured.experiments[0]}', '{secured.experiments[1]}') ORDER BY experiment_id")
            assert table.column("experiment_id").to_pylist() == expected
        finally:
            client.close()
