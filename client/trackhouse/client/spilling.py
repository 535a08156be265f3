"""The sender's disk side: spooling run operations, releasing acknowledged records, spilling
unacknowledged batches when ``policy`` says, and going on when the disk fails.

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

    def _housekeep(self, now: float) -> None:
        """Spool ops handed over, release acked records, spill what policy says."""
        offline, paused = self._settings.offline, now < self._spool_paused_until
        with self._cond:  # an operation is held all along (``queues_ops``): retried after it is spooled
            (released, self._released), ops = (self._released, []), []
            if not (offline and paused):  # offline, operations wait in their queue for the disk
                ops, self._ops_in = self._ops_in, []
                self._ops_retry.ops += [] if offline else ops
        for loc in released:
            self.spool.release(loc)
        for i, op in enumerate(ops):
            try:
                self.spool.append_op(OP_KINDS[type(op)], op.SerializeToString())
            except SpoolError as exc:
                self._spool_failed(exc, "run operations are still sent, not recorded" if not offline
                                   else "run operations wait in memory")
                if offline:
                    with self._cond:
                        self._ops_in[:0] = ops[i:]
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
