"""Replay a writer's spool directory to the server: ``trackhouse sync`` and orphan adoption.

A spool directory holds one writer's batches and run operations (``spool.py``).
``replay_dir`` takes the directory's lock (a live writer or another replayer is
never raced; a forked child does not keep it: ``spool.hold_lock``), then:

1. maps its run ids to the server's (``runmap.py``): creates the runs an offline
   writer recorded, once; finds the runs it logged into without creating them (another
   rank's, a resumed one) or keeps the directory, naming the run, when one is on no
   server yet; sets aside a run whose creation the server refuses for good, and goes
   on with the others; then sends params and tags;
2. streams the batches in seq order with the writer's own ``(writer_id, seq)``
   — the server's dedupe makes a replay, or a second replay, exactly-once in
   effect — at most ``policy.REPLAY_WINDOW`` bytes in flight, reconnecting with
   backoff from the first unacknowledged batch when a stream fails or stalls (no ack
   for ``ack_timeout`` with batches in flight: ``policy.stalled``);
3. sends the final run statuses, but not one the run outlived (``runmap.superseded``:
   the run was resumed, or ended again, after it); then deletes the directory.
   Damaged records are reported (``Corruption``, once each however many streams read
   them) and skipped; the files that held them are kept in ``<writer_id>.corrupt/``,
   which syncs ignore.

``replay_dir`` never raises for server or disk errors: a server that stays away, a
segment that cannot be read or decoded, a directory whose files fail (an ``OSError``,
reported as a ``SpoolError`` naming it) end the replay with ``report.error`` and the
directory kept; so one bad directory never stops ``sync`` or ``adopt_orphans``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trackhouse.client import policy
from trackhouse.client.errors import ServerUnavailable, SpoolError, TrackhouseError
from trackhouse.client.runmap import ASIDE, RunMap
from trackhouse.client.settings import Settings
from trackhouse.client.spool import (
    LOCK,
    META,
    OPS,
    RUNS,
    Corruption,
    Record,
    hold_lock,
    read_meta,
    release_lock,
    remove_dir,
    rename_aside,
    scan,
    scan_ops,
    segments,
    writer_dirs,
)  # fmt: skip
from trackhouse.client.transport import AckStream, Transport, queued_requests
from trackhouse.proto.v1 import ingest_pb2

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
    missing_runs: list[str] = field(default_factory=list)  # logged into, created elsewhere, on no server yet
    set_aside: dict[str, str] = field(default_factory=dict)  # refused offline run id -> directory keeping it


def replay_dir(directory: Path, transport: Transport, *, progress: Progress | None = None,
               max_attempts: int = 8, backoff: tuple[float, float] = (0.5, 10.0), ack_timeout: float = 60.0,
               known: Mapping[str, str] | None = None) -> ReplayReport:
    """Replay one writer directory (see the module docstring); never raises for server or disk errors.

    ``known``: offline run id -> server run id mappings made by the other directories of a sync.
    """
    report = ReplayReport(str(directory), writer_id=str(read_meta(directory).get("writer_id", "")))
    try:
        try:
            _replay_locked(directory, transport, report, progress, max_attempts, backoff, ack_timeout, known)
        except OSError as exc:  # lock, stat, runs.json, removal: the client's error, naming the directory
            raise SpoolError(f"cannot replay spool directory {directory}: {exc}") from exc
    except TrackhouseError as exc:
        report.error = str(exc)
    return report


def _replay_locked(directory: Path, transport: Transport, report: ReplayReport, progress: Progress | None,
                   max_attempts: int, backoff: tuple[float, float], ack_timeout: float,
                   known: Mapping[str, str] | None) -> None:
    lock = hold_lock(directory)
    if lock is None:
        report.error = _LOCKED
        return
    try:
        meta = read_meta(directory)
        ops = _records(directory / OPS, report) if (directory / OPS).exists() else []
        runs = RunMap(directory, transport, offline=meta.get("mode") == "offline", known=known)
        try:
            runs.create(ops)
            if runs.refused and meta.get("set_aside_from"):  # a set-aside run, refused again: nothing else here
                report.error = "; ".join(runs.refused.values()) + f"; its records stay in {directory}"
                return
            # before any batch their points are stripped from is acknowledged: whatever stops this sync
            aside = runs.set_aside(meta, ops)
            runs.check(ops)
            report.ops += runs.send_ops(ops, final=False)
            _send_batches(directory, transport, runs, report, progress, max_attempts, backoff, ack_timeout)
            report.ops += runs.send_ops(ops, final=True)
        finally:
            report.runs, report.runs_created, report.missing_runs = dict(runs.mapped), runs.created, runs.missing
        _remove(directory, report)
        # a run set aside by an earlier, interrupted sync may have been delivered since (its directory gone)
        report.set_aside = {local: str(kept) for local, kept in aside.items() if kept.exists()}
        report.complete = not report.set_aside
        report.error = "; ".join(f"{runs.refused[local]}; its records are kept in {kept}, tried again by every "
                                 "sync" for local, kept in report.set_aside.items())
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


def _send_batches(directory: Path, transport: Transport, runs: RunMap, report: ReplayReport,
                  progress: Progress | None, max_attempts: int, backoff: tuple[float, float],
                  ack_timeout: float) -> None:
    files = segments(directory)
    total = sum(f.stat().st_size for f in files)
    acked_through = 0  # highest seq answered; a resend skips up to it
    for attempt in range(max_attempts):
        stream = _Stream(files, runs, acked_through, total, report, progress)
        try:
            stream.run(transport, ack_timeout)
            return
        except ServerUnavailable as exc:
            acked_through = stream.acked_through
            if attempt + 1 == max_attempts:
                raise ServerUnavailable(f"gave up after {max_attempts} attempts ({exc}); run the sync again later"
                                        ) from exc
            delay = policy.backoff_delay(attempt, initial=backoff[0], maximum=backoff[1],
                                         retry_after=exc.retry_after, rand=random.uniform)
            logger.warning("trackhouse spool replay: stream failed (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)  # a CLI / background replay; nothing else waits on this thread


class _Stream:
    """One StreamMetrics call replaying segment files from the first unanswered batch.

    Three threads: the feeder reads the files and queues batches (within the window), a
    reader takes the acks, and ``run``'s thread waits for the end, cancelling the call
    when it stalls; a stalled call's reader, which may never see the end, is abandoned
    (``_abandoned``: its late acks change nothing).
    """

    def __init__(self, files: list[Path], runs: RunMap, acked_through: int, total: int,
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
        self._stream_error: Exception | None = None  # what ended the call, when it failed
        self._stopped = self._fed_all = self._ended = self._abandoned = False
        self._last_progress = time.monotonic()  # the last ack, or the first batch in flight after none

    def _requests(self, out: queue.SimpleQueue[bytes | None]) -> None:
        try:
            self._feed(out)
        except Exception as exc:  # an unreadable file, a record that is no MetricBatch, a missing run
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
                batch = ingest_pb2.MetricBatch.FromString(item.payload)
                size = len(item.payload)
                # None: answered already, or all its points are refused runs' (set aside, not sent)
                sent = None if batch.seq <= self.acked_through else self._runs.outgoing(batch, item.payload)
                with self._cond:
                    if sent is None:
                        self._done_bytes += size
                        continue
                    self._cond.wait_for(lambda: self._window < policy.REPLAY_WINDOW or self._stopped)
                    if self._stopped:
                        return
                    if not self._in_flight:  # the ack timeout runs from here, not from the last ack
                        self._last_progress = time.monotonic()
                    self._in_flight[batch.seq] = (size, sent[1])
                    self._window += size
                    self._cond.notify_all()
                out.put(sent[0])
        with self._cond:
            self._fed_all = True

    def run(self, transport: Transport, ack_timeout: float) -> None:
        """Stream until every batch is answered; ``ServerUnavailable`` when the call fails, stalls or ends
        early, ``SpoolError`` when the spool could not be read, the feeder's ``TrackhouseError``."""
        out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        feeder = threading.Thread(target=self._requests, args=(out,), daemon=True, name="trackhouse-sync-feed")
        feeder.start()
        stream = None
        try:
            stream = transport.stream_metrics(queued_requests(out))
            threading.Thread(target=self._read, args=(stream,), daemon=True, name="trackhouse-sync-acks").start()
            self._wait_end(ack_timeout)
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
            out.put(None)
            if stream is not None:
                stream.cancel()
            feeder.join()  # stopped: it ends at its next batch; no two attempts' feeders overlap
        if isinstance(self._error, TrackhouseError):
            raise self._error
        if self._error is not None:
            raise SpoolError(f"cannot replay {self._path}: {type(self._error).__name__}: {self._error}"
                             ) from self._error
        if self._stream_error is not None:
            raise self._stream_error
        if self._in_flight or not self._fed_all:
            raise ServerUnavailable(f"the metric stream ended with {len(self._in_flight)} batches unanswered")

    def _wait_end(self, ack_timeout: float) -> None:
        with self._cond:
            while not self._ended:
                now = time.monotonic()
                if policy.stalled(in_flight=bool(self._in_flight), last_progress=self._last_progress, now=now,
                                  timeout=ack_timeout):
                    self._abandoned = True
                    raise ServerUnavailable(f"no ack for {ack_timeout:g} s with {len(self._in_flight)} batches in "
                                            "flight (a hung server, or a connection gone half-open)")
                self._cond.wait(self._last_progress + ack_timeout - now if self._in_flight else None)

    def _read(self, stream: AckStream) -> None:
        try:
            for ack in stream:
                self._on_ack(ack)
        except Exception as exc:  # the transport's TrackhouseError; ``run`` raises it
            self._stream_error = exc
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _on_ack(self, ack: ingest_pb2.BatchAck) -> None:
        with self._cond:
            if self._abandoned:
                return
            size, points = self._in_flight.pop(ack.seq, (0, 0))
            self._window -= size
            self._last_progress = time.monotonic()
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
            done = self._done_bytes
        if self._progress is not None:
            self._progress(done, self._total)


def _remove(directory: Path, report: ReplayReport) -> None:
    """Delete a replayed directory; keep segments that held damaged records, renamed."""
    damaged = {Path(c.path).name for c in report.corruptions}
    if not damaged:
        remove_dir(directory)  # renamed aside first: no second syncer locks a LOCK created anew in it
        return
    target = directory.with_name(directory.name + ".corrupt")
    shutil.rmtree(target, ignore_errors=True)
    kept = rename_aside(directory, target)  # with its LOCK, before anything in it is deleted
    # renamed: its damaged segments and meta.json are kept. Not (its parent is not writable): kept in place with
    # its LOCK (still held) and run maps too, and a later sync replays the damaged segments again
    spare = {META, *damaged} if kept == target else {META, LOCK, RUNS, ASIDE, *damaged}
    if kept != target:
        logger.warning("trackhouse spool: cannot rename %s to %s; its damaged segments are kept in place",
                       directory, target.name)
    for path in kept.iterdir():
        if path.name not in spare:
            with contextlib.suppress(OSError):
                path.unlink()
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
        # never raises: a bad directory does not stop the others
        report = replay_dir(directory, transport, ack_timeout=settings.ack_timeout)
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

    ``url`` / ``settings`` default to ``Settings.from_env()`` (its ack timeout and backoff
    apply); ``progress(directory, bytes done, bytes total)`` is called as acks arrive. A
    directory that logged into a run another one of the sync creates (another rank's) is
    replayed again after it.
    """
    from trackhouse.client.transport import GrpcTransport

    settings = Settings.from_env() if settings is None else settings
    own = transport is None
    if transport is None:
        target = settings.url if url is None else url
        transport = GrpcTransport(target, settings.query_url, rpc_timeout=settings.rpc_timeout,
                                  token=settings.token, tls_ca=settings.tls_ca)
    known: dict[str, str] = {}  # offline run id -> server run id, from every directory so far
    via: Transport = transport

    def replay(directory: Path) -> ReplayReport:
        step = None if progress is None else (lambda done, total: progress(directory, done, total))
        report = replay_dir(directory, via, progress=step, backoff=(settings.backoff_initial, settings.backoff_max),
                            ack_timeout=settings.ack_timeout, known=known)
        known.update(report.runs)
        return report

    try:
        reports = [replay(directory) for directory in writer_dirs(Path(path))]
        return [replay(Path(r.directory)) if r.missing_runs and set(r.missing_runs) <= known.keys() else r
                for r in reports]
    finally:
        if own:
            transport.close()
