"""Delivery against the fake ingest: reconnect + resend, dedupe, rejection, bounded flush/close."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import trackhouse.client as th
from trackhouse.proto.points import batch_columns, batch_points

FAST = th.Settings(flush_interval=0.05, max_batch_points=100, backoff_initial=0.01, backoff_max=0.05)


@pytest.fixture
def client(fake: Any) -> Iterator[th.Client]:
    c = th.connect(fake.address, settings=FAST)
    try:
        yield c
    finally:
        c.close(timeout=5.0)


def _stored_points(fake: Any, writer_id: str) -> list[tuple[int, float]]:
    points = []
    for (writer, _), batch in sorted(fake.ingest.stored.items()):
        assert writer == writer_id
        cols = batch_columns(batch)
        points += list(zip(cols.steps.tolist(), cols.values.tolist(), strict=True))
    return points


def test_dropped_streams_are_resent_and_every_point_stored_once(fake: Any, client: th.Client) -> None:
    fake.ingest.plan = [_connection(fake, abort_after=3), _connection(fake, abort_after=2)]
    run = client.start_run(experiment="e")
    for step in range(1000):
        run.log(step=step, loss=float(step))
    assert client.flush(timeout=10.0)

    stats = client.stats()
    assert stats["points_acked"] == stats["points_logged"] == 1000
    assert stats["points_pending"] == 0 and stats["batches_pending"] == 0
    assert stats["reconnects"] >= 2 and stats["batches_duplicate"] >= 1
    assert fake.ingest.connections >= 3
    seqs = sorted(seq for _, seq in fake.ingest.stored)
    assert seqs == list(range(1, len(seqs) + 1))  # strictly increasing from 1, no gap
    assert len(fake.ingest.received) > len(seqs)  # some batches travelled twice
    assert sorted(_stored_points(fake, client.writer_id)) == [(s, float(s)) for s in range(1000)]


def _connection(fake: Any, **kwargs: Any) -> Any:
    # The plan's element type lives in conftest.py, which tests cannot import by
    # name under --import-mode=importlib; build it through the fake's module.
    import sys

    module = sys.modules[type(fake.ingest).__module__]
    return module.Connection(**kwargs)


def test_rejected_batch_is_counted_and_logged_once(
    fake: Any, client: th.Client, caplog: pytest.LogCaptureFixture
) -> None:
    run = client.start_run()
    with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
        run.log(step=0, bad=1.0)
        assert client.flush(timeout=10.0)
        run.log(step=1, good=2.0)
        assert client.flush(timeout=10.0)
    stats = client.stats()
    assert stats["batches_rejected"] == 1 and stats["points_rejected"] == 1
    assert stats["points_acked"] == 1 and stats["points_pending"] == 0
    warnings = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(warnings) == 1 and "key 'bad' is not allowed" in warnings[0].getMessage()


def test_a_server_that_stores_fewer_points_than_sent_is_reported_not_silent(
    fake: Any, client: th.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A server older than the row form reads a batch of rows as empty and acks 0 points: the
    client counts them lost and says why, once per batch, instead of counting them acked."""
    store = fake.ingest._store

    def old_server(batch: Any) -> Any:
        ack = store(batch)
        ack.points = len(batch.steps) // 8  # the column form only, as servers before fields 10-16
        return ack

    fake.ingest._store = old_server
    said = threading.Event()
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: said.set()  # type: ignore[method-assign]
    # On the root logger, after caplog's handler: set once the record is captured (on the
    # client's logger it ran before the record reached caplog, and the test could read too early).
    logging.getLogger().addHandler(handler)
    try:
        run = client.start_run()
        with caplog.at_level(logging.ERROR, logger="trackhouse.client"):
            run.log(step=0, loss=1.0, acc=2.0)
            assert client.flush(timeout=10.0)
            assert said.wait(10.0)  # the ack reader logs after the counts a flush waits on
    finally:
        logging.getLogger().removeHandler(handler)
    stats = client.stats()
    assert (stats["points_acked"], stats["points_lost"], stats["points_pending"]) == (0, 2, 0)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "stored 0 of 2 points" in errors[0] and "upgrade it" in errors[0]


def test_flush_returns_false_on_timeout_and_true_once_acked(fake: Any, client: th.Client) -> None:
    fake.ingest.plan = [_connection(fake, ack=False)]
    run = client.start_run()
    run.log(step=0, loss=1.0)
    assert run.flush(timeout=0.2) is False
    assert client.stats()["points_pending"] == 1
    fake.ingest.release.set()
    assert run.flush(timeout=10.0) is True


def test_server_away_then_back(fake: Any, restart_fake: Any) -> None:
    port = int(fake.address.rsplit(":", 1)[1])
    client = th.connect(fake.address, settings=FAST)
    run = client.start_run()
    fake.stop()
    for step in range(250):
        run.log(step=step, x=1.0)  # never raises, never blocks
    assert client.flush(timeout=0.3) is False
    back = restart_fake(type(fake.ingest)(), port)
    assert client.flush(timeout=10.0) is True
    assert sum(batch_points(b) for b in back.ingest.stored.values()) == 250
    assert client.close(timeout=5.0)


def test_close_is_bounded_and_reports_undelivered(caplog: pytest.LogCaptureFixture, fake: Any) -> None:
    client = th.connect(fake.address, settings=FAST)
    run = client.start_run()
    fake.stop()
    run.log(step=0, x=1.0)
    with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
        assert client.close(timeout=0.3) is False
    assert any("1 of 1 logged points undelivered" in r.getMessage() for r in caplog.records)
    assert client.close() is True  # idempotent


def test_unary_errors_are_translated(client: th.Client) -> None:
    run = client.start_run(experiment="e", params={"lr": 1})
    with pytest.raises(th.InvalidArgument, match="already logged") as info:
        run.log_params({"lr": 2})
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(th.ServerError):  # the fake has no query service
        client.get_run(run.run_id)


def test_unreachable_server_raises_server_unavailable() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = th.connect(f"127.0.0.1:{port}", settings=th.Settings(rpc_timeout=0.5))
    try:
        with pytest.raises(th.ServerUnavailable):
            client.start_run(experiment_id="0")
    finally:
        client.close(timeout=1.0)


def _wait_received(fake: Any, n: int, timeout: float = 5.0) -> bool:
    with fake.ingest.cond:
        return bool(fake.ingest.cond.wait_for(lambda: len(fake.ingest.received) >= n, timeout))


def test_size_trigger_sends_without_flush(fake: Any) -> None:
    client = th.connect(fake.address, settings=th.Settings(flush_interval=600.0, max_batch_points=50))
    try:
        run = client.start_run()
        for step in range(49):
            run.log(step=step, x=1.0)
        assert not _wait_received(fake, 1, timeout=0.1)  # below the size, far from the interval
        run.log(step=49, x=1.0)
        assert _wait_received(fake, 1)
        assert len(fake.ingest.received) == 1
    finally:
        client.close(timeout=5.0)


def test_interval_trigger_sends_without_flush(fake: Any) -> None:
    client = th.connect(fake.address, settings=th.Settings(flush_interval=0.05))
    try:
        client.start_run().log(step=0, x=1.0)
        assert _wait_received(fake, 1)
    finally:
        client.close(timeout=5.0)


def test_atexit_delivers_what_a_script_left_unflushed(fake: Any, tmp_path: Any) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, trackhouse.client as th\n"
        "client = th.connect(sys.argv[1], settings=th.Settings(flush_interval=600.0))\n"
        "run = client.start_run()\n"
        "for step in range(100):\n"
        "    run.log(step=step, loss=1.0)\n"
    )
    done = subprocess.run([sys.executable, str(script), fake.address], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert sum(batch_points(b) for b in fake.ingest.stored.values()) == 100


class _HungFirstStream(th.MemoryTransport):
    """Its first metric stream takes the batches, never acks them and ignores ``cancel``: the
    receive gRPC once left pending after a server's GOAWAY (its reader never saw the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.streams = 0

    def stream_metrics(self, requests: Iterator[bytes]) -> Any:
        self.streams += 1
        if self.streams > 1:
            return super().stream_metrics(requests)
        release = self.release

        class Hung:
            def __iter__(self) -> Iterator[Any]:
                release.wait()
                return iter(())

            def cancel(self) -> None:
                pass

            def ended(self, timeout: float) -> bool:
                return release.wait(timeout)

        return Hung()


def test_a_stream_that_never_ends_after_cancel_is_abandoned_and_its_batches_resent(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    transport = _HungFirstStream()
    client = th.Client(transport, th.Settings(flush_interval=0.02, ack_timeout=0.2, backoff_initial=0.01,
                                              backoff_max=0.05, spool_dir=str(tmp_path), replay_orphans=False))
    try:
        run = client.start_run(experiment="hung")
        with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
            for step in range(500):
                run.log(step=step, loss=float(step))
            assert client.flush(timeout=10.0)
        assert transport.streams >= 2 and client.stats()["reconnects"] >= 1
        assert [v for s, _, v in transport.points(run.run_id, "loss")] == [float(s) for s in range(500)]
        assert any("never ended" in r.getMessage() for r in caplog.records)
    finally:
        transport.release.set()  # the abandoned reader returns; its end belongs to an old generation
        client.close(timeout=5.0)
