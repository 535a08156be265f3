"""A batch without points, or naming runs none of its points belongs to, is answered at once and never
buffered: it cannot hang its caller, the acks behind it, the flusher or another client's writes.

Such a batch has nothing to flush, and only a flush answers a buffered batch; while it sat in the buffer
its names were charged against the byte budget, so one batch naming a run many times could keep
every other client out. The service refuses it (REJECTED, INVALID_ARGUMENT, as any bad batch: the
client never sends one), by the rules it shares with MemoryTransport; and the flusher, should a batch
without rows ever be buffered, answers it without an INSERT instead of spinning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trackhouse.client as th
from trackhouse.cli.server import ServerThread
from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.convert import DecodedBatch, decode_batch
from trackhouse.ingest.errors import InvalidArgument
from trackhouse.ingest.flusher import Flusher, flush_due, seconds_until_due
from trackhouse.ingest.intake import Outcome, Verdict
from trackhouse.ingest.progress import WriterProgress
from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.rules import MAX_BATCH_RUNS
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc

STORED, REJECTED = ingest_pb2.STORED, ingest_pb2.REJECTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
# Long enough for a loaded machine, far shorter than the age limit of the servers below: an answer within
# it did not wait for a flush by age. A hang fails the test with DEADLINE_EXCEEDED instead of hanging it.
DEADLINE = 3.0


def refused_for_no_points(ack: Any, seq: int) -> bool:
    return (ack.seq, ack.status, ack.points, ack.code) == (seq, REJECTED, 0, INVALID_ARGUMENT) and (
        "no points" in ack.message)


@pytest.fixture
def slow_ager(start_server: Callable[..., AbstractContextManager[ServerThread]]) -> Iterator[ServerThread]:
    """A server whose buffer waits 30 s for age but flushes at 10 rows: prompt acks come from a full
    buffer or a refusal, never from the age limit."""
    with start_server(ingest=IngestSettings(flush_interval=30.0, flush_rows=10)) as thread:
        yield thread


def _stub_and_run(thread: ServerThread) -> tuple[grpc.Channel, Any, str]:
    channel = grpc.insecure_channel(thread.address)
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    return channel, stub, stub.CreateRun(ingest_pb2.CreateRunRequest(run_name="r")).run_id


# -- answered at once, over the real server -------------------------------------------------------------


def test_log_metrics_answers_a_batch_without_points_at_once(slow_ager: ServerThread, make_batch: Any) -> None:
    channel, stub, run_id = _stub_and_run(slow_ager)
    with channel:
        ack = stub.LogMetrics(make_batch(writer_id="u", seq=1, run_ids=[run_id], points=0), timeout=DEADLINE)
        assert refused_for_no_points(ack, 1), ack
        ack = stub.LogMetrics(make_batch(writer_id="u", seq=2, run_ids=[run_id], points=3), timeout=DEADLINE)
        assert (ack.seq, ack.status, ack.points) == (2, STORED, 3)


def test_a_stream_answers_a_batch_without_points_at_once_and_goes_on(slow_ager: ServerThread,
                                                                       make_batch: Any, open_stream: Any) -> None:
    channel, stub, run_id = _stub_and_run(slow_ager)
    with channel:
        stream = open_stream(stub, DEADLINE)
        stream.send(make_batch(writer_id="s", seq=1, run_ids=[run_id], points=0))
        assert refused_for_no_points(stream.ack(), 1)  # alone: no later batch fills the buffer for it
        stream.send(make_batch(writer_id="s", seq=2, run_ids=[run_id], points=0, keys=()))  # not even keys
        assert refused_for_no_points(stream.ack(), 2)
        stream.send(make_batch(writer_id="s", seq=3, run_ids=[run_id], points=10))
        ack = stream.ack()
        assert (ack.seq, ack.status, ack.points) == (3, STORED, 10)
        assert stream.close() == []


@pytest.mark.parametrize(("points", "says"), [(0, "no points"), (1, "run_ids[1]")])
def test_a_batch_naming_a_run_many_times_does_not_keep_another_client_out(
        start_server: Callable[..., AbstractContextManager[ServerThread]], make_batch: Any, points: int,
        says: str) -> None:
    """The reviewer's case: a batch naming one run 200 times was charged 64 bytes a name, 12,864 bytes
    against a 10,000-byte budget, and (with no points) never flushed: another client's 100-point batch
    waited for room for ever. Now it is refused, and the other client's batch is stored at once."""
    settings = IngestSettings(flush_interval=0.05, buffer_bytes=10_000, max_batch_points=200)
    with start_server(ingest=settings) as thread:
        channel, stub, run_id = _stub_and_run(thread)
        with channel:
            app = thread.server.ingest
            greedy = make_batch(writer_id="greedy", seq=1, run_ids=[run_id] * 200, run_index=[0] * points,
                               points=points)

            async def enter() -> asyncio.Future[Outcome]:
                # The greedy client's batch goes the servicer's own way in (decode, runs, room, buffer),
                # on the server's loop, so it is in before the other client's batch arrives.
                return asyncio.ensure_future(await app.intake.accept(greedy))

            greedy_outcome = thread.run(enter(), timeout=DEADLINE)
            other = make_batch(writer_id="other", seq=1, run_ids=[run_id], points=100)
            ack = stub.LogMetrics(other, timeout=DEADLINE)
            assert (ack.seq, ack.status, ack.points) == (1, STORED, 100)
            outcome = thread.run(asyncio.wait_for(greedy_outcome, DEADLINE), timeout=DEADLINE)
            assert outcome.verdict is Verdict.REJECTED and isinstance(outcome.error, InvalidArgument)
            assert says in str(outcome.error)
            assert app.buffer.peak_bytes <= settings.buffer_bytes


# -- the service and MemoryTransport refuse the same batches ---------------------------------------------


def _memory_ack(transport: th.MemoryTransport, batch: Any) -> Any:
    (ack,) = list(transport.stream_metrics(iter([batch.SerializeToString()])))
    return ack


@pytest.mark.parametrize(("shape", "says"), [
    (dict(points=0), "steps and row_values: the batch has no points"),
    (dict(points=4, copies=MAX_BATCH_RUNS + 1), f"run_ids: {MAX_BATCH_RUNS + 1} run ids in one batch, limit "
                                                 f"{MAX_BATCH_RUNS}"),
    (dict(points=4, copies=2), "run_ids[1]"),
])  # fmt: skip
def test_memory_transport_refuses_what_the_service_refuses(make_batch: Any, shape: dict[str, int],
                                                          says: str) -> None:
    transport = th.MemoryTransport()
    experiment = transport.create_experiment(ingest_pb2.CreateExperimentRequest(name="e")).experiment_id
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id=experiment)).run_id
    batch = make_batch(run_ids=[run_id] * shape.get("copies", 1), run_index=[0] * shape["points"],
                       points=shape["points"])
    with pytest.raises(InvalidArgument) as info:
        decode_batch(batch, IngestSettings())
    assert says in str(info.value)
    ack = _memory_ack(transport, batch)
    assert (ack.status, ack.code, ack.message) == (REJECTED, INVALID_ARGUMENT, str(info.value))
    assert transport.point_count() == 0


# -- the flusher waits when it has nothing to do, and answers a batch without rows -------------------------

FLUSH = IngestSettings(flush_rows=100, flush_interval=2.0, buffer_bytes=10_000, max_batch_points=200)


@given(rows=st.integers(0, 1_000), oldest=st.one_of(st.none(), st.floats(0, 1e6)),
       age=st.floats(0, 10), nbytes=st.integers(0, 20_000), room_wanted=st.booleans())
def test_when_no_flush_is_due_the_flusher_sleeps_a_while(rows: int, oldest: float | None, age: float,
                                                          nbytes: int, room_wanted: bool) -> None:
    """`run` flushes when `flush_due`, else waits `seconds_until_due`: 0 there would spin the loop."""
    now = (oldest or 0.0) + age
    if not flush_due(rows, oldest, nbytes, now, FLUSH, room_wanted):
        wait = seconds_until_due(oldest, now, FLUSH)
        assert wait is None or wait > 0, (rows, oldest, now)


def _without_points(seq: int) -> DecodedBatch:
    """What `decode_batch` no longer lets through: a batch of no points (naming a run and a key)."""
    return DecodedBatch(writer_id="w", seq=seq, run_ids=("r1",), keys=("loss",),
                        run_index=np.zeros(0, np.uint32), key_index=np.zeros(0, np.uint32),
                        steps=np.zeros(0, np.int64), timestamps=np.zeros(0, np.int64), values=np.zeros(0, np.float64))


async def _committed_nothing(writer_id: str) -> int:
    return 0


@pytest.mark.parametrize("urgent", [True, False])
def test_a_buffered_batch_without_rows_is_answered_without_an_insert(urgent: bool) -> None:
    async def body() -> None:
        now = [0.0]
        buf, progress, tables = MetricBuffer(FLUSH.buffer_bytes), WriterProgress(_committed_nothing), []

        async def insert(table: Any) -> None:
            tables.append(table)

        flusher = Flusher(buf, progress, insert, FLUSH, clock=lambda: now[0])
        task = asyncio.ensure_future(flusher.run())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        progress.track("w", 1, done)
        buf.add(_without_points(1), done, now[0], urgent=urgent)
        if not urgent:
            now[0] = FLUSH.flush_interval  # old enough
            buf.changed.set()
        await asyncio.wait_for(done, DEADLINE)
        assert tables == [] and buf.nbytes == 0 and len(buf) == 0
        flusher.stop()
        await asyncio.wait_for(task, DEADLINE)

    asyncio.run(body())
