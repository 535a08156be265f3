"""The metric stream over ``grpc.aio``: one event-loop thread per transport, nothing polling.

A seam module (imports ``grpc``), used only by ``transport.py``. Why it exists: the
synchronous stack keeps, for an open stream, a channel-spin thread that wakes every
200 ms and makes the thread reading acks wake every 100 ms
(``grpc._common.MAXIMUM_WAIT_TIMEOUT``), and sends each message from a request-consumer
thread that then waits for the send to complete. Measured on the 2-core benchmark VM: an
open, idle synchronous stream costs 2.2-3.6 ms of CPU a second; the same stream on
``grpc.aio`` 0.4 (the C-core's own threads), because its completion-queue poller blocks
without a deadline and the loop sleeps in ``epoll`` until something arrives. At two
batches a second the Python-side threads cost 3.7 ms/s synchronous, 1.9 ms/s here.

``AioStreams`` owns the loop thread (started with the first stream), and one ``grpc.aio``
channel per address, created on the loop. ``AioAckStream`` is one call: a feeder thread
moves the caller's blocking request iterator into the loop (it waits in ``queue.get``,
free when idle), a task writes the requests in order, another reads acks into a
``queue.SimpleQueue`` that ``__iter__`` blocks on without a timeout.

Fork: ``grpc.aio`` cannot be used in a child forked from a process that used it (the
child crashes: the poller thread is not there, measured), so a forked child's transport
uses the synchronous stream (``GrpcTransport.reopen``); the parent's loop, channels and
calls are left alone in the child (their sockets are the parent's).

Invariants: every ``grpc.aio`` object is created and used on the loop thread only; the
ack queue ends with exactly one ``_End``; nothing here blocks longer than the bounds the
caller gives (``close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from trackhouse.client.errors import ServerUnavailable, TrackhouseError, error_for_code
from trackhouse.proto.v1 import ingest_pb2


@dataclass(frozen=True)
class _End:
    """The last item of an ack queue: how the call ended (None: the server closed it normally)."""

    error: BaseException | None


class AioAckStream:
    """One StreamMetrics call on the loop; ``AckStream`` for the sender (iterate for acks, ``cancel``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, call: Any, requests: Iterator[bytes],
                 translate: Callable[[BaseException], TrackhouseError], on_unavailable: Callable[[], None]) -> None:
        self._loop = loop
        self._call = call
        self._translate = translate
        self._on_unavailable = on_unavailable
        self._acks: queue.SimpleQueue[ingest_pb2.BatchAck | _End] = queue.SimpleQueue()
        self._pending: asyncio.Queue[bytes | None] | None = None
        self._ended = False
        self._requests = requests

    async def start(self) -> None:
        """On the loop: the writer and reader tasks; then the feeder thread (started by the caller)."""
        self._pending = asyncio.Queue()
        self._tasks = (asyncio.ensure_future(self._write()), asyncio.ensure_future(self._read()))

    def feed(self) -> None:
        """On a thread of its own: hand each request to the loop, then the half-close."""
        try:
            for item in self._requests:
                if not self._post(item):
                    return
        finally:
            self._post(None)

    def _post(self, item: bytes | None) -> bool:
        pending = self._pending
        assert pending is not None
        try:
            self._loop.call_soon_threadsafe(pending.put_nowait, item)
        except RuntimeError:  # the loop is closed: the transport was closed
            self._end(None)
            return False
        return True

    async def _write(self) -> None:
        assert self._pending is not None
        try:
            while (item := await self._pending.get()) is not None:
                await self._call.write(item)
            await self._call.done_writing()
        except (asyncio.InvalidStateError, grpc.RpcError, asyncio.CancelledError):
            pass  # the call ended: the reader reports how

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            while (ack := await self._call.read()) is not grpc.aio.EOF:
                self._acks.put(ack)
            code = await self._call.code()  # EOF: the call ended, normally unless it says otherwise
            if code != grpc.StatusCode.OK:
                error = error_for_code(code.name, await self._call.details() or code.name)
        except asyncio.CancelledError:
            error = error_for_code("CANCELLED", "cancelled by the client")
        except grpc.RpcError as exc:
            error = self._translate(exc)
        except Exception as exc:  # never leave the iterating thread waiting
            error = TrackhouseError(repr(exc))
        if isinstance(error, ServerUnavailable):
            self._on_unavailable()  # the next stream opens on the next replica
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._acks.put(_End(error))

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]:
        while not isinstance(item := self._acks.get(), _End):
            yield item
        self._acks.put(item)  # a second iteration ends at once too
        if item.error is not None:
            raise item.error

    def cancel(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._call.cancel)
        except RuntimeError:  # the loop is closed: nothing runs the call any more
            self.end_closed()

    def end_closed(self) -> None:
        """End the ack iteration (the transport closed the loop: no task will)."""
        self._end(error_for_code("CANCELLED", "the transport was closed"))


_forked = False  # set in a child forked from a process that started a loop here: grpc.aio is unusable
_started = False  # a loop (and so grpc.aio) was started in this process


def _after_fork_in_child() -> None:
    global _forked
    _forked = _forked or _started


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """Whether this process may use ``grpc.aio`` (not a fork child of one that did)."""
    return not _forked


class AioStreams:
    """The event-loop thread of one transport and its ``grpc.aio`` channels (one per address)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._channels: dict[tuple[str, bool], Any] = {}
        self._streams: weakref.WeakSet[AioAckStream] = weakref.WeakSet()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        global _started
        with self._lock:
            if self._loop is None:
                _started = True
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="trackhouse-stream", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def open(self, target: str, secure: bool, make_channel: Callable[[], Any], method: str,
             requests: Iterator[bytes], metadata: Any, translate: Callable[[BaseException], TrackhouseError],
             on_unavailable: Callable[[], None], timeout: float) -> AioAckStream:
        """Start a stream-stream call of ``method`` on the channel to ``target`` (created by
        ``make_channel`` on the loop, once); requests are sent as they are (already serialized)."""
        loop = self._running_loop()

        async def start() -> AioAckStream:
            channel = self._channels.get((target, secure))
            if channel is None:
                channel = self._channels[(target, secure)] = make_channel()
            call = channel.stream_stream(method, request_serializer=None,
                                         response_deserializer=ingest_pb2.BatchAck.FromString)(metadata=metadata)
            stream = AioAckStream(loop, call, requests, translate, on_unavailable)
            await stream.start()
            return stream

        stream = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout)
        with self._lock:
            self._streams.add(stream)
        threading.Thread(target=stream.feed, name="trackhouse-stream-feed", daemon=True).start()
        return stream

    def close(self, timeout: float = 1.0) -> None:
        """Close the channels (cancelling their calls) and stop the loop, within ``timeout``."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            channels, self._channels = list(self._channels.values()), {}
            streams = list(self._streams)
        if loop is None or thread is None:
            return

        async def shut() -> None:  # closing a channel ends its calls; then no task may be left pending
            await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # a timeout or a dead loop: stop it anyway, the thread is a daemon
            asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        for stream in streams:  # whatever the loop did not end before it stopped
            stream.end_closed()
