"""The gRPC metric stream's ack reader: it waits without polling between batches, and still
sees every ack and the end of the call (cancel, server gone) while it waits."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from trackhouse.client.errors import TrackhouseError
from trackhouse.client.transport import AckStream, GrpcTransport, queued_requests
from trackhouse.proto.v1 import ingest_pb2


def _batch(seq: int) -> bytes:
    return ingest_pb2.MetricBatch(writer_id="w", seq=seq, run_ids=["r"], keys=["k"], key_index=b"\0" * 4,
                                  steps=b"\0" * 8, timestamps=b"\0" * 8, values=b"\0" * 8).SerializeToString()


class _Reader:
    """Iterates an ack stream on its own thread, as the sender does."""

    def __init__(self, stream: AckStream) -> None:
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.error: TrackhouseError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream: AckStream) -> None:
        try:
            for ack in stream:
                self.acks.put(ack.seq)
        except TrackhouseError as exc:
            self.error = exc
        self.ended.set()


@pytest.fixture
def stream(fake: Any) -> Iterator[tuple[queue.SimpleQueue[bytes | None], AckStream, _Reader]]:
    transport = GrpcTransport(fake.address)
    q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    opened = transport.stream_metrics(queued_requests(q))
    yield q, opened, _Reader(opened)
    q.put(None)
    opened.cancel()
    transport.close()


def test_acks_of_batches_sent_after_an_idle_reader_arrive(stream: Any) -> None:
    q, _, reader = stream
    for seq in (1, 2, 3):  # the reader waits idle between them (nothing unanswered)
        q.put(_batch(seq))
        assert reader.acks.get(timeout=10.0) == seq
    assert not reader.ended.is_set()


def test_a_half_closed_stream_ends_the_idle_reader(stream: Any) -> None:
    q, _, reader = stream
    q.put(_batch(1))
    assert reader.acks.get(timeout=10.0) == 1
    q.put(None)  # the server then ends the call normally
    assert reader.ended.wait(10.0) and reader.error is None


def test_cancel_ends_the_idle_reader(stream: Any) -> None:
    q, opened, reader = stream
    q.put(_batch(1))
    assert reader.acks.get(timeout=10.0) == 1
    opened.cancel()
    assert reader.ended.wait(10.0) and reader.error is not None


def test_a_server_gone_while_the_reader_is_idle_ends_it(fake: Any, stream: Any) -> None:
    q, _, reader = stream
    q.put(_batch(1))
    assert reader.acks.get(timeout=10.0) == 1
    fake.stop()
    assert reader.ended.wait(10.0) and reader.error is not None
