"""Fuzz ingest over real gRPC: random and mutated messages; a healthy stream alongside stays exact.

One in-process server per module (port 0). Every fuzz example is sent to it as raw
bytes (valid MetricBatch messages with bytes flipped, cut or appended; random
bytes to every IngestService method) or as generated MetricBatch messages (unicode
keys, random run ids, wrong column lengths, huge counts and sequence numbers).
Every answer must be a proper status: an ack (STORED, DUPLICATE, or REJECTED with
a client-error code) or an RPC error with a client-error code — never UNKNOWN or
INTERNAL. Meanwhile a well-formed stream sends batches one after another; each
test waits until it has been acked further than before (progress, not timing),
and the last test checks its points are stored exactly once.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc

# Each example is a round trip to a real server: a fifth of the profile's examples.
SERVER_EXAMPLES = max(10, settings().max_examples // 5)
SERVICE = "/trackhouse.v1.IngestService/"
METHODS = [
    "CreateExperiment", "GetExperiment", "CreateRun", "UpdateRun", "LogParams", "SetTags", "LogMetrics",
    "DeleteRun", "RestoreRun", "DeleteTag", "UpdateExperiment", "DeleteExperiment", "RestoreExperiment",
    "SetExperimentTags", "DeleteExperimentTag",
]
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
ACK_CODES = {c.value[0] for c in CLIENT_ERRORS}
HEALTHY_POINTS = 50


class Healthy:
    """A well-formed stream sending batch after batch (the next once the last is acked)."""

    def __init__(self, stub: Any, run_id: str) -> None:
        self.run_id = run_id
        self.acked = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call = stub.StreamMetrics(iter(self._requests.get, None), timeout=600)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _batch(self, seq: int) -> Any:
        steps = np.arange((seq - 1) * HEALTHY_POINTS, seq * HEALTHY_POINTS, dtype="<i8")
        return ingest_pb2.MetricBatch(
            writer_id="healthy", seq=seq, run_ids=[self.run_id], keys=["loss"],
            key_index=np.zeros(len(steps), "<u4").tobytes(), steps=steps.tobytes(),
            timestamps=np.full(len(steps), 1_000, "<i8").tobytes(), values=(steps * 0.5).astype("<f8").tobytes())

    def _run(self) -> None:
        try:
            seq = 1
            while not self._stop.is_set():
                self._requests.put(self._batch(seq))
                ack = next(self._call)
                assert (ack.seq, ack.status) == (seq, ingest_pb2.STORED), ack
                with self._progress:
                    self.acked = seq
                    self._progress.notify_all()
                seq += 1
        except BaseException as exc:  # reported by the test that waits on progress
            self.failure = exc
            with self._progress:
                self._progress.notify_all()
        finally:
            self._requests.put(None)

    def advance(self, batches: int = 2) -> None:
        """Wait until `batches` more batches are acked (it fails if the stream broke or stalls for 60 s)."""
        with self._progress:
            target = self.acked + batches
            assert self._progress.wait_for(lambda: self.acked >= target or self.failure is not None, 60)
        assert self.failure is None, self.failure

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> int:
        if self._stop.is_set():
            return self.acked
        self._stop.set()
        self._thread.join(60)
        assert self.failure is None, self.failure
        list(self._call)
        return self.acked


@pytest.fixture(scope="module")
def fuzz_server(module_server_factory: Any) -> Iterator[tuple[ServerThread, grpc.Channel, str]]:
    with module_server_factory() as thread, grpc.insecure_channel(thread.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        run = stub.CreateRun(ingest_pb2.CreateRunRequest(run_name="fuzz"))
        yield thread, channel, run.run_id


@pytest.fixture(scope="module")
def healthy(fuzz_server: tuple[ServerThread, grpc.Channel, str]) -> Iterator[Healthy]:
    channel = fuzz_server[1]
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    other = stub.CreateRun(ingest_pb2.CreateRunRequest(run_name="healthy"))
    stream = Healthy(stub, other.run_id)
    yield stream
    stream.stop()


@pytest.fixture(autouse=True)
def healthy_keeps_progressing(healthy: Healthy) -> Iterator[None]:
    """After each test (all of its examples), the healthy stream is acked further still."""
    yield
    if not healthy.stopped:
        healthy.advance(1)


def _valid_batch(run_id: str, seq: int = 1, writer: str = "") -> Any:
    n = 8
    return ingest_pb2.MetricBatch(
        writer_id=writer or f"fz-{uuid.uuid4().hex[:8]}", seq=seq, run_ids=[run_id], keys=["a", "b"],
        key_index=np.arange(n, dtype="<u4").__mod__(2).astype("<u4").tobytes(),
        steps=np.arange(n, dtype="<i8").tobytes(), timestamps=np.full(n, 5, "<i8").tobytes(),
        values=np.ones(n, "<f8").tobytes())


def _check_ack(ack: Any) -> None:
    assert ack.status in (ingest_pb2.STORED, ingest_pb2.DUPLICATE, ingest_pb2.REJECTED), ack
    if ack.status == ingest_pb2.REJECTED:
        assert ack.code in ACK_CODES and ack.message, ack


def _call_raw(channel: grpc.Channel, method: str, payload: bytes) -> None:
    call = channel.unary_unary(SERVICE + method)
    try:
        reply = call(payload, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (method, exc.code(), exc.details())
        return
    if method == "LogMetrics":
        _check_ack(ingest_pb2.BatchAck.FromString(reply))


def _stream_raw(channel: grpc.Channel, payloads: list[bytes]) -> None:
    call = channel.stream_stream(SERVICE + "StreamMetrics")
    try:
        for reply in call(iter(payloads), timeout=30):
            _check_ack(ingest_pb2.BatchAck.FromString(reply))
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "append", "insert"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(max_examples=SERVER_EXAMPLES)
@given(st.data())
def test_mutated_metric_batches(fuzz_server: tuple[ServerThread, grpc.Channel, str], healthy: Healthy,
                                data: st.DataObject) -> None:
    _, channel, run_id = fuzz_server
    valid = _valid_batch(run_id).SerializeToString()
    payloads = data.draw(st.lists(mutated(valid), min_size=1, max_size=3))
    _call_raw(channel, "LogMetrics", payloads[0])
    _stream_raw(channel, payloads)


@settings(max_examples=SERVER_EXAMPLES)
@given(st.sampled_from(METHODS), st.binary(max_size=64))
def test_random_bytes_to_every_method(fuzz_server: tuple[ServerThread, grpc.Channel, str], healthy: Healthy,
                                      method: str, payload: bytes) -> None:
    _call_raw(fuzz_server[1], method, payload)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x10" + b"\xff" * 10 + b"\x01"])
def test_undecodable_messages_are_invalid_argument(fuzz_server: tuple[ServerThread, grpc.Channel, str],
                                                   payload: bytes) -> None:
    """Regression: bytes that do not parse were answered UNKNOWN (gRPC's answer to a deserializer error)."""
    _, channel, run_id = fuzz_server
    for method in ("LogMetrics", "CreateRun", "GetExperiment"):
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(SERVICE + method)(payload, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in (info.value.details() or "")
    # On a stream, the batches before the bad one are answered, then the stream ends INVALID_ARGUMENT.
    good = _valid_batch(run_id).SerializeToString()
    call = channel.stream_stream(SERVICE + "StreamMetrics")(iter([good, payload, good]), timeout=30)
    assert ingest_pb2.BatchAck.FromString(next(call)).status == ingest_pb2.STORED
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _column(draw: st.DrawFn, n: int, width: int) -> bytes:
    length = draw(st.sampled_from([n * width, n * width + 1, max(0, n - 1) * width, 0, (n + 1) * width]))
    return draw(st.binary(min_size=length, max_size=length))


@st.composite
def random_batches(draw: st.DrawFn, run_id: str) -> Any:
    n = draw(st.integers(0, 20))
    names = st.text(max_size=30)
    return ingest_pb2.MetricBatch(
        writer_id=draw(st.one_of(names, st.just("fz-" + uuid.uuid4().hex[:8]), st.text(min_size=120, max_size=140))),
        seq=draw(st.one_of(st.integers(0, 3), st.just(2**64 - 1), st.integers(0, 2**64 - 1))),
        run_ids=draw(st.lists(st.one_of(st.just(run_id), names), max_size=3)),
        keys=draw(st.lists(st.one_of(st.sampled_from(["loss", "a/b c:d"]), names, st.text(min_size=251, max_size=260)),
                           max_size=4)),
        run_index=_column(draw, n, 4), key_index=_column(draw, n, 4), steps=_column(draw, n, 8),
        timestamps=_column(draw, n, 8), values=_column(draw, n, 8))


@settings(max_examples=SERVER_EXAMPLES)
@given(st.data())
def test_random_field_values(fuzz_server: tuple[ServerThread, grpc.Channel, str], healthy: Healthy,
                             data: st.DataObject) -> None:
    _, channel, run_id = fuzz_server
    batches = data.draw(st.lists(random_batches(run_id), min_size=1, max_size=3))
    _call_raw(channel, "LogMetrics", batches[0].SerializeToString())
    _stream_raw(channel, [b.SerializeToString() for b in batches])


def test_huge_counts_are_refused(fuzz_server: tuple[ServerThread, grpc.Channel, str], healthy: Healthy) -> None:
    _, channel, run_id = fuzz_server
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    too_many_keys = _valid_batch(run_id)
    too_many_keys.keys.extend(f"k{i}" for i in range(20_000))
    too_many_points = _valid_batch(run_id)
    n = 1_000_001
    too_many_points.key_index = bytes(4 * n)
    too_many_points.steps = too_many_points.timestamps = too_many_points.values = bytes(8 * n)
    for batch in (too_many_keys, too_many_points):
        ack = stub.LogMetrics(batch, timeout=60)
        assert (ack.status, ack.code) == (ingest_pb2.REJECTED, grpc.StatusCode.INVALID_ARGUMENT.value[0]), ack
    params = ingest_pb2.LogParamsRequest(run_id=run_id)
    params.params.add(key="k" * 300, value="v")
    with pytest.raises(grpc.RpcError) as info:
        stub.LogParams(params, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    healthy.advance()


def test_healthy_stream_kept_being_acked_and_stored_exactly(
        fuzz_server: tuple[ServerThread, grpc.Channel, str], healthy: Healthy) -> None:
    """Runs last in this module: the stream alongside the fuzzing made progress and lost nothing."""
    thread, _, _ = fuzz_server
    healthy.advance()
    acked = healthy.stop()
    store = thread.server.store
    assert store is not None
    rows = store.query_rows(
        f"SELECT count(), uniqExact(step), min(step), max(step) FROM {store.database}.metrics "
        "WHERE run_id = {r:String} AND key = 'loss'", {"r": healthy.run_id})
    assert rows[0] == (acked * HEALTHY_POINTS, acked * HEALTHY_POINTS, 0, acked * HEALTHY_POINTS - 1)
