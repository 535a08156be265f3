"""Replay a writer's spool directory to the server: ``trackhouse sync`` and orphan adoption.

A spool directory holds one writer's batches and run operations (``spool.py``).
``replay_dir`` takes the directory's lock (a live writer or another replayer is
never raced; a forked child does not keep it: ``spool.hold_lock``), then:

1. creates the runs an offline writer recorded, once: the local -> server run id
   map is saved in ``runs.json`` before any batch that needs it is sent, and a
   run is first looked up by its ``trackhouse.local_run_id`` tag, so a re-run —
   even from a copy of the spool taken before the first sync — finds the run
   instead of creating another; then sends params and tags;
2. streams the batches in seq order with the writer's own ``(writer_id, seq)``
   — the server's dedupe makes a replay, or a second replay, exactly-once in
   effect — at most ``policy.REPLAY_WINDOW`` bytes in flight, reconnecting with
   backoff from the first unacknowledged batch when a stream fails;
3. sends the final run statuses; then deletes the directory. Damaged records are
   reported (``Corruption``, once each however many streams read them) and skipped;
   the files that held them are kept in ``<writer_id>.corrupt/``, which syncs ignore.

``replay_dir`` never raises for server or disk errors: a server that stays away, a
segment that cannot be read or decoded, a directory whose files fail (an ``OSError``,
reported as a ``SpoolError`` naming it) end the replay with ``report.error`` and the
directory kept; so one bad directory never stops ``sync`` or ``adopt_orphans``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trackhouse.client import policy
from trackhouse.client.errors import AlreadyExists, NotFound, ServerUnavailable, SpoolError, TrackhouseError
from trackhouse.client.settings import Settings
from trackhouse.client.spool import (
    EXPERIMENT_TAG,
    LOCAL_RUN_TAG,
    OPS,
    RUNS,
    Corruption,
    Kind,
    Record,
    hold_lock,
    read_meta,
    release_lock,
    scan,
    scan_ops,
    segments,
    write_json_atomic,
    writer_dirs,
)  # fmt: skip
from trackhouse.client.transport import Transport
from trackhouse.proto.points import batch_points
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
_LOCKED = "locked by a live process (its writer is still running)"


@dataclass
class ReplayReport:
    """What one replay did. ``complete``: everything was answered and the directory removed."""

    directory: str
    writer_id: str = ""
    batches: int = 0
    points: int = 0
    duplicate_batches: int = 0
    rejected_points: int = 0
    runs_created: int = 0
    runs: dict[str, str] = field(default_factory=dict)  # offline run id -> server run id
    ops: int = 0
    corruptions: list[Corruption] = field(default_factory=list)
    complete: bool = False
    error: str = ""


def replay_dir(directory: Path, transport: Transport, *, progress: Progress | None = None,
               max_attempts: int = 8, backoff: tuple[float, float] = (0.5, 10.0)) -> ReplayReport:
    """Replay one writer directory (see the module docstring); never raises for server or disk errors."""
    report = ReplayReport(str(directory), writer_id=str(read_meta(directory).get("writer_id", "")))
    try:
        try:
            _replay_locked(directory, transport, report, progress, max_attempts, backoff)
        except OSError as exc:  # lock, stat, runs.json, removal: the client's error, naming the directory
            raise SpoolError(f"cannot replay spool directory {directory}: {exc}") from exc
    except TrackhouseError as exc:
        report.error = str(exc)
    return report


def _replay_locked(directory: Path, transport: Transport, report: ReplayReport, progress: Progress | None,
                   max_attempts: int, backoff: tuple[float, float]) -> None:
    lock = hold_lock(directory)
    if lock is None:
        report.error = _LOCKED
        return
    try:
        runs = _load_runs(directory)
        ops = _records(directory / OPS, report) if (directory / OPS).exists() else []
        _create_runs(directory, transport, ops, runs, report)
        report.runs = dict(runs)
        _send_ops(transport, ops, runs, report, final=False)
        _send_batches(directory, transport, runs, report, progress, max_attempts, backoff)
        _send_ops(transport, ops, runs, report, final=True)
        _remove(directory, report)
        report.complete = True
    finally:
        release_lock(lock)


def _records(path: Path, report: ReplayReport) -> list[Record]:
    out = []
    for item in scan_ops(path):
        if isinstance(item, Corruption):
            report.corruptions.append(item)
            logger.error("trackhouse spool: corrupt record skipped: %s", item)
        else:
            out.append(item)
    return out


def _load_runs(directory: Path) -> dict[str, str]:
    try:
        loaded = json.loads((directory / RUNS).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _create_runs(directory: Path, transport: Transport, ops: list[Record], runs: dict[str, str],
                 report: ReplayReport) -> None:
    for record in ops:
        if record.kind is not Kind.CREATE_RUN:
            continue
        request = ingest_pb2.CreateRunRequest.FromString(record.payload)
        tags = {t.key: t.value for t in request.tags}
        local = tags.get(LOCAL_RUN_TAG, "")
        if not local or local in runs:
            continue
        found = _find_run(transport, local)
        if found:
            runs[local] = found
            write_json_atomic(directory / RUNS, runs)
            continue
        name = tags.get(EXPERIMENT_TAG)
        if name:
            request.experiment_id = _experiment_id(transport, name)
            kept = [t for t in request.tags if t.key != EXPERIMENT_TAG]
            del request.tags[:]
            request.tags.extend(kept)
        runs[local] = transport.create_run(request).run_id
        write_json_atomic(directory / RUNS, runs)  # before any batch refers to it
        report.runs_created += 1


def _find_run(transport: Transport, local: str) -> str:
    """The server run created from offline run ``local`` by an earlier sync, or ""."""
    request = query_pb2.SearchRunsRequest(filter=f"tags.`{LOCAL_RUN_TAG}` = '{local}'", max_results=1,
                                          run_view_type=common_pb2.ALL)
    try:
        runs = transport.search_runs(request).runs
    except ServerUnavailable:
        raise
    except TrackhouseError:  # no query service at this address: fall back to runs.json alone
        return ""
    return str(runs[0].info.run_id) if runs else ""


def _experiment_id(transport: Transport, name: str) -> str:
    try:
        return str(transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name)).experiment_id)
    except NotFound:
        pass
    try:
        return str(transport.create_experiment(ingest_pb2.CreateExperimentRequest(name=name)).experiment_id)
    except AlreadyExists:
        return str(transport.get_experiment(ingest_pb2.GetExperimentRequest(name=name)).experiment_id)


def _send_ops(transport: Transport, ops: list[Record], runs: dict[str, str], report: ReplayReport, *,
              final: bool) -> None:
    for record in ops:
        if (record.kind is Kind.UPDATE_RUN) != final or record.kind is Kind.CREATE_RUN:
            continue
        try:
            if record.kind is Kind.LOG_PARAMS:
                params = ingest_pb2.LogParamsRequest.FromString(record.payload)
                params.run_id = runs.get(params.run_id, params.run_id)
                transport.log_params(params)
            elif record.kind is Kind.SET_TAGS:
                tags = ingest_pb2.SetTagsRequest.FromString(record.payload)
                tags.run_id = runs.get(tags.run_id, tags.run_id)
                transport.set_tags(tags)
            else:
                update = ingest_pb2.UpdateRunRequest.FromString(record.payload)
                update.run_id = runs.get(update.run_id, update.run_id)
                transport.update_run(update)
        except ServerUnavailable:
            raise
        except TrackhouseError as exc:  # refused for good (e.g. a param logged with another value)
            logger.warning("trackhouse spool: %s refused by the server: %s", record.kind.name, exc)
        report.ops += 1


def _send_batches(directory: Path, transport: Transport, runs: dict[str, str], report: ReplayReport,
                  progress: Progress | None, max_attempts: int, backoff: tuple[float, float]) -> None:
    files = segments(directory)
    total = sum(f.stat().st_size for f in files)
    acked_through = 0  # highest seq answered; a resend skips up to it
    for attempt in range(max_attempts):
        stream = _Stream(files, runs, acked_through, total, report, progress)
        try:
            stream.run(transport)
            return
        except ServerUnavailable as exc:
            acked_through = stream.acked_through
            delay = policy.backoff_delay(attempt, initial=backoff[0], maximum=backoff[1],
                                         retry_after=exc.retry_after, rand=random.uniform)
            logger.warning("trackhouse spool replay: stream failed (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)  # a CLI / background replay; nothing else waits on this thread
    raise ServerUnavailable(f"gave up after {max_attempts} attempts; run the sync again later")


class _Stream:
    """One StreamMetrics call replaying segment files from the first unanswered batch."""

    def __init__(self, files: list[Path], runs: dict[str, str], acked_through: int, total: int,
                 report: ReplayReport, progress: Progress | None) -> None:
        self._files, self._runs, self._report, self._progress = files, runs, report, progress
        self.acked_through = acked_through
        self._total = total
        self._cond = threading.Condition()
        self._in_flight: dict[int, tuple[int, int]] = {}  # seq -> (bytes, points)
        self._window = 0
        self._done_bytes = 0
        # Each damaged record is reported once, whichever attempt's feeder reaches it first
        # (the previous attempt's feeder has ended: ``run`` joins it).
        self._reported = {(c.path, c.offset) for c in report.corruptions}
        self._path: Path | None = None  # the file the feeder is reading
        self._error: Exception | None = None  # what stopped the feeder; ``run`` raises it

    def _requests(self, out: queue.SimpleQueue[bytes | None]) -> None:
        try:
            self._feed(out)
        except Exception as exc:  # an unreadable file, a record that is no MetricBatch
            self._error = exc
        finally:
            out.put(None)  # always end the request stream: else the call and ``run`` wait forever

    def _feed(self, out: queue.SimpleQueue[bytes | None]) -> None:
        for path in self._files:
            self._path = path
            for item in scan(path):
                if isinstance(item, Corruption):
                    if (item.path, item.offset) not in self._reported:
                        self._reported.add((item.path, item.offset))
                        self._report.corruptions.append(item)
                        logger.error("trackhouse spool: corrupt record skipped: %s", item)
                    continue
                payload = item.payload
                batch = ingest_pb2.MetricBatch.FromString(payload)
                size = len(payload)
                if batch.seq <= self.acked_through:
                    self._done_bytes += size
                    continue
                if any(r in self._runs for r in batch.run_ids):
                    mapped = [self._runs.get(r, r) for r in batch.run_ids]
                    del batch.run_ids[:]
                    batch.run_ids.extend(mapped)
                    payload = batch.SerializeToString()
                with self._cond:
                    self._cond.wait_for(lambda: self._window < policy.REPLAY_WINDOW or self._stopped)
                    if self._stopped:
                        return
                    self._in_flight[batch.seq] = (size, batch_points(batch))
                    self._window += size
                out.put(payload)

    _stopped = False

    def run(self, transport: Transport) -> None:
        """Stream until every batch is answered; ``SpoolError`` when the spool could not be read."""
        out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        feeder = threading.Thread(target=self._requests, args=(out,), daemon=True, name="trackhouse-sync-feed")
        feeder.start()

        def requests() -> Iterator[bytes]:
            while (item := out.get()) is not None:
                yield item

        stream = None
        try:
            stream = transport.stream_metrics(requests())
            for ack in stream:
                self._on_ack(ack)
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
            out.put(None)
            if stream is not None:
                stream.cancel()
            feeder.join()  # stopped: it ends at its next batch; no two attempts' feeders overlap
        if isinstance(self._error, SpoolError):
            raise self._error
        if self._error is not None:
            raise SpoolError(f"cannot replay {self._path}: {type(self._error).__name__}: {self._error}"
                             ) from self._error

    def _on_ack(self, ack: ingest_pb2.BatchAck) -> None:
        with self._cond:
            size, points = self._in_flight.pop(ack.seq, (0, 0))
            self._window -= size
            self._cond.notify_all()
        self.acked_through = max(self.acked_through, ack.seq)
        report = self._report
        report.batches += 1
        report.points += points
        report.duplicate_batches += ack.status == ingest_pb2.DUPLICATE
        if ack.status == ingest_pb2.REJECTED:
            report.rejected_points += points
            logger.warning("trackhouse spool: batch seq=%d rejected: %s", ack.seq, ack.message)
        self._done_bytes += size
        if self._progress is not None:
            self._progress(self._done_bytes, self._total)


def _remove(directory: Path, report: ReplayReport) -> None:
    """Delete a replayed directory; keep segments that held damaged records, renamed."""
    damaged = {Path(c.path).name for c in report.corruptions}
    if not damaged:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in directory.iterdir():
        if path.name not in damaged and path.name != "meta.json":
            with contextlib.suppress(OSError):
                path.unlink()
    kept = directory.with_name(directory.name + ".corrupt")
    shutil.rmtree(kept, ignore_errors=True)
    directory.rename(kept)
    report.directory = str(kept)


def adopt_orphans(transport: Transport, settings: Settings, own_writer: str) -> list[ReplayReport]:
    """Replay spools that dead online clients of the same server left in ``settings.spool_dir``."""
    reports = []
    for directory in writer_dirs(Path(settings.spool_dir).absolute()):
        meta = read_meta(directory)
        if directory.name == own_writer or meta.get("mode") != "online" or meta.get("url") != settings.url:
            continue
        if not any(directory.glob("*.spool")):
            continue
        report = replay_dir(directory, transport)  # never raises: a bad directory does not stop the others
        if report.complete:
            logger.info("trackhouse: replayed %d points left in %s by an earlier process", report.points, directory)
        elif report.error != _LOCKED:
            logger.warning("trackhouse: could not replay %s, left by an earlier process (kept for a later try): %s",
                           directory, report.error)
        reports.append(report)
    return reports


def sync(path: str | os.PathLike[str], *, url: str | None = None, settings: Settings | None = None,
         transport: Transport | None = None, progress: Callable[[Path, int, int], None] | None = None,
         ) -> list[ReplayReport]:
    """Upload a spool (a spool root or one writer's directory) to the server; safe to re-run.

    ``url`` / ``settings`` default to ``Settings.from_env()``; ``progress(directory,
    bytes done, bytes total)`` is called as acks arrive.
    """
    from trackhouse.client.transport import GrpcTransport

    settings = Settings.from_env() if settings is None else settings
    own = transport is None
    if transport is None:
        target = settings.url if url is None else url
        transport = GrpcTransport(target, settings.query_url, rpc_timeout=settings.rpc_timeout,
                                  token=settings.token, tls_ca=settings.tls_ca)
    try:
        reports = []
        for directory in writer_dirs(Path(path)):
            step = None if progress is None else (lambda done, total, d=directory: progress(d, done, total))
            reports.append(replay_dir(directory, transport, progress=step))
        return reports
    finally:
        if own:
            transport.close()
