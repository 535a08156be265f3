"""MemoryTransport answers and refuses as the real server does.

Every test runs twice, against ``MemoryTransport`` and against the real embedded server
(ingest + query over chDB, ``GrpcTransport``), and asserts the same thing of both: a user's
test that passes on the stand-in must pass on the server, so the two cannot drift apart.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest

import trackhouse.client as th
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2

Request = Callable[[th.Transport, str], Any]


@pytest.fixture(scope="module")
def module_server(module_server_factory: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    """One real server for the module (a server per test costs seconds): tests keep to experiments of
    their own (``_experiment``) and count runs of the default one before and after."""
    with module_server_factory() as thread:
        yield thread


@pytest.fixture(params=["memory", "server"])
def transport(request: pytest.FixtureRequest) -> Iterator[th.Transport]:
    if request.param == "memory":
        yield th.MemoryTransport()
        return
    grpc_transport = th.GrpcTransport(request.getfixturevalue("module_server").address)
    try:
        yield grpc_transport
    finally:
        grpc_transport.close()


@pytest.fixture
def client(transport: th.Transport) -> Iterator[th.Client]:
    c = th.Client(transport, th.Settings(flush_interval=0.05, replay_orphans=False))
    try:
        yield c
    finally:
        c.close(timeout=10.0)


def _name() -> str:
    return f"e-{uuid.uuid4().hex[:8]}"


def _experiment(transport: th.Transport, name: str = "") -> str:
    """A new experiment of this test's own (the module's server outlives the test)."""
    return str(transport.create_experiment(ingest_pb2.CreateExperimentRequest(name=name or _name())).experiment_id)


def _run(transport: th.Transport, experiment_id: str = "0", **fields: Any) -> common_pb2.RunInfo:
    return transport.create_run(ingest_pb2.CreateRunRequest(experiment_id=experiment_id, **fields))


def _search(transport: th.Transport, **fields: Any) -> query_pb2.SearchRunsResponse:
    return transport.search_runs(query_pb2.SearchRunsRequest(**fields))


def _batch(run_ids: list[str], seq: int, key: str = "loss", writer: str = "w") -> bytes:
    """One point (step 0, timestamp 1,000 ms, value 0.5) of each of ``run_ids``, under ``key``."""
    n = len(run_ids)
    return ingest_pb2.MetricBatch(
        writer_id=writer, seq=seq, run_ids=run_ids, keys=[key],
        run_index=np.arange(n, dtype="<u4").tobytes(), key_index=np.zeros(n, "<u4").tobytes(),
        steps=np.zeros(n, "<i8").tobytes(), timestamps=np.full(n, 1000, "<i8").tobytes(),
        values=np.full(n, 0.5, "<f8").tobytes(),
    ).SerializeToString()  # fmt: skip


def _acks(transport: th.Transport, *batches: bytes) -> list[tuple[int, int, int, int]]:
    """(seq, status, points, code) of each batch, sent one stream each (one ack each, in order)."""
    acks = []
    for batch in batches:
        (ack,) = list(transport.stream_metrics(iter([batch])))
        acks.append((ack.seq, ack.status, ack.points, ack.code))
    return acks


# -- run search --------------------------------------------------------------------------------------------


def test_search_runs_lists_the_newest_first_then_by_run_id(transport: th.Transport) -> None:
    eid = _experiment(transport)
    runs = [_run(transport, eid, start_time=t) for t in (1_000, 3_000, 2_000, 2_000, 2_000)]
    expected = [r.run_id for r in sorted(runs, key=lambda r: (-r.start_time, r.run_id))]
    assert [r.info.run_id for r in _search(transport, experiment_ids=[eid]).runs] == expected

    pages, token = [], ""
    while True:  # two at a time, by the page token: the same order, each run once
        page = _search(transport, experiment_ids=[eid], max_results=2, page_token=token)
        pages.append([r.info.run_id for r in page.runs])
        if not (token := page.next_page_token):
            break
    assert pages == [expected[0:2], expected[2:4], expected[4:]]


def test_client_search_runs_max_results_gives_the_newest(client: th.Client) -> None:
    name = _name()
    runs = [client.start_run(experiment=name, start_time=t) for t in (1_000, 2_000, 3_000)]
    assert [r.run_id for r in client.search_runs(experiment_names=[name], max_results=1)] == [runs[2].run_id]
    assert [r.run_id for r in client.search_runs(experiment_names=[name], page_size=2)] == [
        r.run_id for r in reversed(runs)]


def test_search_runs_limits_max_results_counts_and_refuses_a_bad_token(transport: th.Transport) -> None:
    eid = _experiment(transport)
    for _ in range(3):
        _run(transport, eid)
    assert _search(transport, experiment_ids=[eid], max_results=2, include_total=True).total == 3
    assert not _search(transport, experiment_ids=[eid]).HasField("total")
    token = _search(transport, experiment_ids=[eid], max_results=1).next_page_token
    assert len(_search(transport, experiment_ids=[eid], page_token=token).runs) == 2
    for bad in (dict(max_results=-1), dict(max_results=50_001), dict(page_token="not-a-token"),
                dict(page_token=token, run_view_type=common_pb2.ALL)):  # a token of another search
        with pytest.raises(th.InvalidArgument):
            _search(transport, experiment_ids=[eid], **bad)


def test_search_runs_honours_the_run_view(transport: th.Transport, client: th.Client) -> None:
    eid = _experiment(transport)
    run_id = _run(transport, eid).run_id
    views = {view: [r.info.run_id for r in _search(transport, experiment_ids=[eid], run_view_type=view).runs]
             for view in (common_pb2.VIEW_TYPE_UNSPECIFIED, common_pb2.ACTIVE_ONLY, common_pb2.DELETED_ONLY,
                          common_pb2.ALL)}  # fmt: skip
    assert views == {common_pb2.VIEW_TYPE_UNSPECIFIED: [run_id], common_pb2.ACTIVE_ONLY: [run_id],
                     common_pb2.DELETED_ONLY: [], common_pb2.ALL: [run_id]}  # fmt: skip
    assert list(client.search_runs([eid], run_view="deleted_only")) == []
    assert client.get_run(run_id).lifecycle_stage == "active"
    with pytest.raises(th.InvalidArgument):
        _search(transport, run_view_type=9)


# -- runs ----------------------------------------------------------------------------------------------------


def test_an_unnamed_run_is_named_after_its_id(transport: th.Transport, client: th.Client) -> None:
    info = _run(transport)
    assert info.run_name == f"run-{info.run_id[-8:]}"
    run = client.start_run()
    assert run.name == f"run-{run.run_id[-8:]}" == client.get_run(run.run_id).name


def test_no_experiment_id_means_the_default_experiment(transport: th.Transport) -> None:
    info = transport.create_run(ingest_pb2.CreateRunRequest(tags=[common_pb2.Tag(key="team", value="rl")]))
    assert info.experiment_id == "0" and info.lifecycle_stage == common_pb2.ACTIVE
    info.run_name = "changed by the caller"  # an answer is the caller's: the run keeps its name
    run = transport.get_run(query_pb2.GetRunRequest(run_id=info.run_id))
    assert {t.key: t.value for t in run.tags} == {"team": "rl"} and run.info.run_name != info.run_name


def test_a_final_status_without_end_time_is_stamped_now_once(transport: th.Transport) -> None:
    run_id = _run(transport).run_id
    running = transport.update_run(ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.RUNNING))
    assert running.end_time == 0
    before = time.time_ns() // 1_000_000
    finished = transport.update_run(ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.FINISHED))
    assert before <= finished.end_time <= time.time_ns() // 1_000_000
    failed = transport.update_run(ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.FAILED))
    assert (failed.status, failed.end_time) == (common_pb2.FAILED, finished.end_time)  # the first end stays


def test_log_params_stores_all_or_nothing(transport: th.Transport) -> None:
    run_id = _run(transport).run_id

    def log(**params: str) -> None:
        transport.log_params(ingest_pb2.LogParamsRequest(
            run_id=run_id, params=[common_pb2.Param(key=k, value=v) for k, v in params.items()]))

    log(x="1")
    with pytest.raises(th.InvalidArgument):
        log(y="2", x="3")
    with pytest.raises(th.InvalidArgument):
        transport.log_params(ingest_pb2.LogParamsRequest(run_id=run_id, params=[
            common_pb2.Param(key="z", value="1"), common_pb2.Param(key="z", value="2")]))
    log(x="1", w="4")  # the same value again is accepted
    run = transport.get_run(query_pb2.GetRunRequest(run_id=run_id))
    assert {p.key: p.value for p in run.params} == {"x": "1", "w": "4"}


def _status(transport: th.Transport, run_id: str, status: int) -> Any:
    return transport.update_run(ingest_pb2.UpdateRunRequest(run_id=run_id, status=status))


def _param(transport: th.Transport, run_id: str, key: str, value: str = "1") -> Any:
    return transport.log_params(ingest_pb2.LogParamsRequest(run_id=run_id, params=[
        common_pb2.Param(key=key, value=value)]))


def _tag(transport: th.Transport, run_id: str, key: str, value: str = "1") -> Any:
    return transport.set_tags(ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key=key, value=value)]))


REFUSED: dict[str, Request] = {
    "unknown status": lambda t, r: _status(t, r, 77),
    "negative end_time": lambda t, r: t.update_run(ingest_pb2.UpdateRunRequest(run_id=r, end_time=-1)),
    "long run_name on update": lambda t, r: t.update_run(ingest_pb2.UpdateRunRequest(run_id=r, run_name="n" * 251)),
    "long run_name": lambda t, r: _run(t, run_name="n" * 251),
    "negative start_time": lambda t, r: _run(t, start_time=-1),
    "bad param key on create": lambda t, r: _run(t, params=[common_pb2.Param(key="a!", value="1")]),
    "param key twice on create": lambda t, r: _run(t, params=[common_pb2.Param(key="a", value="1")] * 2),
    "bad tag key on create": lambda t, r: _run(t, tags=[common_pb2.Tag(key="", value="1")]),
    "bad param key": lambda t, r: _param(t, r, "a!"),
    "long param value": lambda t, r: _param(t, r, "a", "v" * 6001),
    "bad tag key": lambda t, r: _tag(t, r, "a!"),
    "long tag value": lambda t, r: _tag(t, r, "a", "v" * 5001),
    "blank experiment name": lambda t, r: t.create_experiment(ingest_pb2.CreateExperimentRequest(name="  ")),
    "experiment by nothing": lambda t, r: t.get_experiment(ingest_pb2.GetExperimentRequest()),
    "run by no id": lambda t, r: t.get_run(query_pb2.GetRunRequest()),
    "history of no key": lambda t, r: t.get_metric_history(query_pb2.GetMetricHistoryRequest(run_id=r)),
    "history page of -1": lambda t, r: t.get_metric_history(query_pb2.GetMetricHistoryRequest(
        run_id=r, key="loss", max_results=-1)),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_as_invalid_argument_and_nothing_changes(transport: th.Transport, name: str) -> None:
    run_id = _run(transport).run_id
    before = transport.get_run(query_pb2.GetRunRequest(run_id=run_id))
    runs = _search(transport, include_total=True).total
    with pytest.raises(th.InvalidArgument):
        REFUSED[name](transport, run_id)
    assert transport.get_run(query_pb2.GetRunRequest(run_id=run_id)) == before
    assert _search(transport, include_total=True).total == runs


def test_experiment_names_are_stripped(transport: th.Transport) -> None:
    name = _name()
    eid = _experiment(transport, f" {name} ")
    found = transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name))
    assert (found.experiment_id, found.name, found.lifecycle_stage) == (eid, name, common_pb2.ACTIVE)
    with pytest.raises(th.AlreadyExists):
        _experiment(transport, name)


# -- metric batches ------------------------------------------------------------------------------------------


def test_a_batch_is_checked_for_rules_then_runs_then_duplicates(transport: th.Transport) -> None:
    run_id = _run(transport).run_id
    stored, dup, rejected = ingest_pb2.STORED, ingest_pb2.DUPLICATE, ingest_pb2.REJECTED
    assert _acks(transport,
                 _batch([run_id], 1),
                 _batch(["f" * 32], 1),  # a seq already stored, naming an unknown run: NOT_FOUND
                 _batch([run_id], 1, key="bad!"),  # ... breaking a rule: INVALID_ARGUMENT
                 _batch(["f" * 32], 1, key="bad!"),  # both: the rule first
                 _batch([run_id], 1),
                 ) == [(1, stored, 1, 0), (1, rejected, 0, 5), (1, rejected, 0, 3), (1, rejected, 0, 3),
                       (1, dup, 1, 0)]  # fmt: skip


def test_metric_history_is_in_step_then_timestamp_order(client: th.Client) -> None:
    run = client.start_run()
    for step, ts in ((3, 5_000), (1, 9_000), (2, 2_000), (1, 1_000)):
        run.log_metrics({"loss": float(step)}, step=step, timestamp=ts)
    assert client.flush(timeout=30.0)
    table = client.metric_history(run.run_id, "loss")
    assert table["step"].to_pylist() == [1, 1, 2, 3]
    assert table["timestamp"].to_pylist() == [1_000, 9_000, 2_000, 5_000]
    view = client.get_run(run.run_id)
    assert view.metrics == {"loss": 3.0}


def test_metric_history_pages_split_no_points_of_one_step_and_time(client: th.Client) -> None:
    run = client.start_run()
    points = [(0, 7, 5.0), (1, 1_000, 0.3), (1, 1_000, 0.1), (2, 500, 1.0), (1, 1_000, 0.2)]
    for step, ts, value in points:
        run.log_metrics({"loss": value}, step=step, timestamp=ts)
    assert client.flush(timeout=30.0)
    request = query_pb2.GetMetricHistoryRequest(run_id=run.run_id, key="loss", max_results=2)
    pages, tokens = [], []
    while True:
        page = client.transport.get_metric_history(request)
        tokens.append(page.next_page_token)
        columns = (np.frombuffer(page.steps, "<i8"), np.frombuffer(page.timestamps, "<i8"),
                   np.frombuffer(page.values, "<f8"))
        pages.append(list(zip(*(c.tolist() for c in columns), strict=True)))
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert pages == [[(0, 7, 5.0), (1, 1_000, 0.1)], [(1, 1_000, 0.2), (1, 1_000, 0.3)], [(2, 500, 1.0)]]
    with pytest.raises(th.InvalidArgument):  # a token of another series
        client.transport.get_metric_history(query_pb2.GetMetricHistoryRequest(
            run_id=run.run_id, key="other", page_token=tokens[0]))
