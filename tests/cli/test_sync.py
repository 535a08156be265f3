"""`trackhouse sync` against a server that stops answering: it ends, says why, keeps the spool."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from trackhouse.cli.main import main
from trackhouse.client.spool import WriterSpool, segments
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc

_HANG_GUARD = 20.0  # seconds; only a guard against a hang, never reached by a passing test


class _Silent(ingest_pb2_grpc.IngestServiceServicer):
    """Reads every batch and never acks (a hung store, a half-open connection); ends when the client
    cancels the call."""

    def StreamMetrics(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        ended = threading.Event()
        context.add_callback(ended.set)
        for _ in request_iterator:
            pass
        ended.wait(_HANG_GUARD)
        return iter(())


@pytest.fixture
def silent_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(_Silent(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait(5.0)


def _spool(root: Path) -> Path:
    spool = WriterSpool(root, "w1", 1 << 20, {"mode": "online", "url": "x"})
    for seq in (1, 2):
        spool.append_batch(ingest_pb2.MetricBatch(
            writer_id="w1", seq=seq, run_ids=["r"], keys=["loss"], key_index=struct.pack("<I", 0),
            steps=struct.pack("<q", seq), timestamps=struct.pack("<q", 1000), values=struct.pack("<d", 0.5),
        ).SerializeToString())  # fmt: skip
    spool.close(ops_done=True)
    return spool.path


def test_sync_against_a_server_that_never_acks_ends_with_the_reason(
    silent_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to wait for the acks for ever, holding the directory's lock."""
    directory = _spool(tmp_path / "spool")
    for name, value in (("ACK_TIMEOUT", "0.2"), ("BACKOFF_INITIAL", "0.01"), ("BACKOFF_MAX", "0.01")):
        monkeypatch.setenv(f"TRACKHOUSE_CLIENT_{name}", value)
    codes: list[int] = []
    command = threading.Thread(target=lambda: codes.append(main(["sync", str(tmp_path / "spool"), "--quiet",
                                                                 "--url", silent_server])), daemon=True)
    command.start()
    command.join(_HANG_GUARD)

    assert not command.is_alive(), "trackhouse sync hung"
    assert codes == [1]
    out = capsys.readouterr().out
    assert f"{directory}: INCOMPLETE" in out and "no ack for 0.2 s" in out and "run the sync again" in out
    assert len(segments(directory)) == 1  # kept for a later sync


def test_sync_names_runs_waiting_for_another_directory_and_runs_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a report holds besides its error reaches the user: which run waits for which sync, and where
    a refused run's records are kept (the blanket "run the sync again" fitted neither)."""
    import trackhouse.client as th
    from trackhouse.client.replay import ReplayReport

    report = ReplayReport(str(tmp_path / "w2"), error="run r-1 is on no server yet", missing_runs=["r-1"],
                          set_aside={"r-2": str(tmp_path / "w3")})
    monkeypatch.setattr(th, "sync", lambda *args, **kwargs: [report])
    assert main(["sync", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'w2'}: INCOMPLETE (run r-1 is on no server yet);" in out
    assert "run r-1 was created by another directory, not synced yet" in out
    assert f"offline run r-2 refused by the server: its records are kept in {tmp_path / 'w3'}" in out
    assert "run the sync again" not in out
