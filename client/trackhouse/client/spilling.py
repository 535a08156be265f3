"""The sender's disk side: spooling run operations (and forgetting them once delivered), releasing
acknowledged records, spilling unacknowledged batches when ``policy`` says, spooling everything left
at close (``_finish``), and going on when the disk fails.

A mixin of ``Sender``: its state, under its lock, written by its worker only. A spool write
that fails (disk full, an I/O error: a ``SpoolError``) loses nothing and stops nothing: the
batch stays in memory and is still sent, an offline operation stays queued, and spooling
pauses for ``SPOOL_RETRY`` seconds, one error logged each time. Offline, the spool is the
delivery: a batch that met a failing disk waits in memory, and is spooled (then counted in
``points_offline``) when the disk works again; at close what is still in memory is reported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from trackhouse.client import policy
from trackhouse.client.errors import SpoolError
from trackhouse.client.ops import OP_KINDS, Op, PendingOps
from trackhouse.client.outbox import Outbox
from trackhouse.client.settings import Settings
from trackhouse.client.spool import Location, WriterSpool

logger = logging.getLogger(__name__)

SPOOL_RETRY = 5.0  # seconds without spooling after a failed write


class Spilling:
    """``Sender``'s spool handling (see the module docstring)."""

    spool: WriterSpool
    _cond: threading.Condition
    _clock: Callable[[], float]
    _settings: Settings
    _outbox: Outbox
    _counts: dict[str, int]
    _released: list[Location]
    _ops_in: list[Op]
    _ops_retry: PendingOps
    _away_since: float | None
    _spill_warned: bool
    _spool_paused_until: float
    _deadline: float | None
    _end_stream: Callable[[], None]

    def _finish(self) -> None:
        """At close: spool every unacknowledged batch (synced) before anything that may wait, then give the
        operations thread until close's deadline for a last try (they are in the spool; left there if not)."""
        try:
            self._spool_paused_until = 0.0  # a last try of the disk too
            self._housekeep(self._clock())
            if self._ops_in:  # offline, the disk failed them again
                logger.error("trackhouse: %d run operations could not be spooled to %s and are lost",
                             len(self._ops_in), self.spool.path)
            self._spill(policy.Spill.ALL)
            deadline = self._clock() if self._deadline is None else self._deadline  # None: the worker failed
            self._ops_retry.stop(deadline)
            self._end_stream()
            self._ops_retry.join(deadline - self._clock())
            with self._cond:
                ops_done = not self._settings.offline and not self._ops_retry.ops  # offline: kept
            self.spool.close(ops_done=ops_done)
        except Exception:
            logger.exception("trackhouse: could not spool undelivered batches to %s", self.spool.path)
        with self._cond:
            self._cond.notify_all()

    def _forget_delivered_ops(self) -> None:
        """Online, once every operation recorded was delivered and no batch on disk is left to replay them
        for: empty the record (``queues_ops`` is then False: later operations go direct again)."""
        with self._cond:
            done = self.spool.ops and not self._ops_retry.ops and not self._ops_in and not self.spool.records
        if done and not self._settings.offline:
            self.spool.clear_ops()

    def _housekeep(self, now: float) -> None:
        """Spool ops handed over, release acked records, spill what policy says."""
        offline, paused = self._settings.offline, now < self._spool_paused_until
        with self._cond:
            (released, self._released), ops = (self._released, []), list(self._ops_in)
        for loc in released:
            self.spool.release(loc)
        if ops and not (offline and paused):  # offline, operations wait in their queue for the disk
            recorded = self._record_ops(ops)
            with self._cond:  # held in ``_ops_in`` until recorded (``queues_ops``), sent only then
                moved = ops if not offline else ops[:recorded]
                del self._ops_in[:len(moved)]
                if not offline:
                    self._ops_retry.add(moved)
            if recorded < len(ops):
                return
        if paused:
            return
        with self._cond:
            s = self._settings
            decision = policy.spill_decision(memory_bytes=self._outbox.memory_bytes, budget=s.memory_budget,
                                             away_since=self._away_since, now=now, grace=s.spool_grace)
            if offline and self._outbox.memory_bytes:  # batches that met a failing disk
                decision = policy.Spill.ALL
        if decision is not policy.Spill.NONE:
            self._spill(decision)

    def _record_ops(self, ops: list[Op]) -> int:
        """Append ``ops`` to the spool in order; how many were written before the disk failed."""
        for i, op in enumerate(ops):
            try:
                self.spool.append_op(OP_KINDS[type(op)], op.SerializeToString())
            except SpoolError as exc:
                self._spool_failed(exc, "run operations are still sent, not recorded" if not self._settings.offline
                                   else "run operations wait in memory")
                return i
        return len(ops)

    def _spill(self, decision: policy.Spill) -> None:
        with self._cond:
            candidates = self._outbox.in_memory()
        keep = 0 if decision is policy.Spill.ALL else self._settings.memory_budget // 2
        spilled = 0
        try:
            for entry in candidates:
                batch = entry.batch
                if self._outbox.memory_bytes <= keep or batch is None:
                    break
                loc = self.spool.append_batch(batch)
                with self._cond:
                    if self._settings.offline:  # the record is the delivery
                        self._counts["points_offline"] += entry.points if self._outbox.acked(entry.seq) else 0
                    elif not self._outbox.spilled(entry, loc):  # acked while it was written
                        self._released.append(loc)
                        continue
                    else:
                        self._counts["batches_spilled"] += 1
                    self._cond.notify_all()
                spilled += 1
            self.spool.sync()
        except SpoolError as exc:
            self._spool_failed(exc, "unacknowledged batches stay in memory")
            return
        if spilled and not self._spill_warned and not self._settings.offline:
            self._spill_warned = True
            why = "the server is unreachable" if decision is policy.Spill.ALL else "memory budget exceeded"
            logger.warning("trackhouse: %s; spooling unacknowledged batches to %s", why, self.spool.path)

    def _spool_batch(self, batch: bytes) -> Location | None:
        """Append an offline batch; None when the disk failed (it then waits in memory)."""
        if self._clock() < self._spool_paused_until:
            return None
        try:
            return self.spool.append_batch(batch)
        except SpoolError as exc:
            self._spool_failed(exc, "offline batches wait in memory")
            return None

    def _sync_spool(self) -> None:
        try:
            self.spool.sync()
        except SpoolError as exc:
            self._spool_failed(exc, "batches written since the last sync may not be durable")

    def _spool_failed(self, exc: SpoolError, consequence: str) -> None:
        logger.error("trackhouse: cannot write the spool (%s); %s; trying again in %.0f s",
                     exc, consequence, SPOOL_RETRY)
        self._spool_paused_until = self._clock() + SPOOL_RETRY
