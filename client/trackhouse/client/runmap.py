"""The runs of a replay: which server run each run id of a spool directory stands for.

An offline writer logs under local run ids (its CreateRun records carry them in the
``LOCAL_RUN_TAG`` tag). ``RunMap`` gives every run id of a directory its server id
before anything that names it is sent, and saves what it mapped in ``runs.json``
first. A local id is looked up, in order, in ``runs.json``, in the mappings other
directories of the same sync made (``known``), in the sibling directories'
``runs.json`` and among the server's runs by their ``LOCAL_RUN_TAG`` (an earlier
sync's run, even from a copy of the spool); then:

- an id with a CreateRun record here is created (a ``find``-then-create, so never twice);
- an id without one (another rank's run in a ``ranks=all`` job, or a run an earlier
  offline process created and this one resumed) must be on the server already: a
  server run id of that name is used as it is; otherwise the id is *missing* and
  ``NotFound`` is raised, naming it, before any batch that names it is sent: the
  directory is kept for a sync after the one that creates the run.

A CreateRun the server refuses for good (``REFUSALS``: a run name over the limit, an
experiment since deleted) is the run's own failure, not the directory's: the run is
*refused*, its operations and points are not sent (``outgoing`` takes them out of
mixed batches) and ``set_aside`` copies them to a writer directory of their own, a
complete offline spool (new writer id, the same seqs) that every later sync tries
again and reports while the server refuses it. It is written before any batch is sent,
and the run recorded in ``aside.json`` (``ASIDE``): a later sync of the directory, after
one that stopped part-way, leaves the run to that spool even once the server accepts it
(the stripped batches were acknowledged: only the set-aside spool still has its points).
Online directories name server runs only: their ids are sent as they are.

``send_ops`` sends the operations; a final status the run has outlived (``superseded``:
it was resumed, or ended again, after the status was recorded) is not applied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trackhouse.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServerUnavailable,
    SpoolError,
    TrackhouseError,
)
from trackhouse.client.ops import Op, call_op
from trackhouse.client.spool import (
    EXPERIMENT_TAG,
    LOCAL_RUN_TAG,
    OPS,
    RESUMED_TAG,
    RUNS,
    Corruption,
    Kind,
    Record,
    WriterSpool,
    scan,
    segments,
    write_json_atomic,
)  # fmt: skip
from trackhouse.client.transport import Transport
from trackhouse.proto.points import batch_columns, batch_points
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2

logger = logging.getLogger(__name__)

# What a server answers a CreateRun that fails again however often it is sent: the run's own fault.
REFUSALS = (InvalidArgument, NotFound, FailedPrecondition, AlreadyExists)
ASIDE = "aside.json"  # refused local run id -> why: runs whose records a set-aside directory holds
_ASIDE = uuid.UUID("5b0b8a4e-3f55-4a53-9d7e-5c1f0d6f2a61")  # namespace of set-aside writer ids
_SEGMENT_BYTES = 64 * 1024 * 1024
# On a run: when (ms since the epoch) a process last resumed it; ``superseded`` compares it.
_OPS: dict[Kind, type[Op]] = {Kind.LOG_PARAMS: ingest_pb2.LogParamsRequest, Kind.SET_TAGS: ingest_pb2.SetTagsRequest,
                              Kind.UPDATE_RUN: ingest_pb2.UpdateRunRequest}
_FINAL = frozenset({common_pb2.FINISHED, common_pb2.FAILED, common_pb2.KILLED})


def load_runs(directory: Path, name: str = RUNS) -> dict[str, str]:
    """``directory``'s saved local -> server run id map ({} when there is none or it is unreadable)."""
    try:
        loaded = json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def run_of(record: Record) -> str:
    """The run id an operation record names (a CreateRun's: its local id)."""
    if record.kind is Kind.CREATE_RUN:
        tags = ingest_pb2.CreateRunRequest.FromString(record.payload).tags
        return next((t.value for t in tags if t.key == LOCAL_RUN_TAG), "")
    return str(_OPS[record.kind].FromString(record.payload).run_id)


class RunMap:
    """The run ids of one directory's replay (see the module docstring); used by one thread at a time."""

    def __init__(self, directory: Path, transport: Transport, *, offline: bool,
                 known: Mapping[str, str] | None = None) -> None:
        self._directory, self._transport, self._offline = directory, transport, offline
        self._known = known or {}
        self.mapped = load_runs(directory)  # local -> server, as saved in runs.json
        self.aside = load_runs(directory, ASIDE)  # local -> why: set aside by an earlier sync (never sent here)
        self.refused: dict[str, str] = dict(self.aside)  # local -> why the server refuses to create it
        self.missing: list[str] = []
        self.created = 0
        self._server_ids: set[str] = set()  # ids named here that are server runs already

    def create(self, ops: list[Record]) -> None:
        """Map (or create) every run with a CreateRun record; a refused one is recorded, not raised."""
        for record in ops:
            if record.kind is not Kind.CREATE_RUN:
                continue
            local = run_of(record)
            if not local or local in self.refused or local in self.mapped or self._lookup(local):
                continue
            request = ingest_pb2.CreateRunRequest.FromString(record.payload)
            try:
                self._save(local, self._create(request))
            except REFUSALS as exc:
                why = f"run {local} ({_short(request.run_name)}): the server refuses to create it: {exc}"
                logger.error("trackhouse spool: %s", why)
                self.refused[local] = why
                continue
            self.created += 1

    def _create(self, request: ingest_pb2.CreateRunRequest) -> str:
        name = next((t.value for t in request.tags if t.key == EXPERIMENT_TAG), "")
        if name:
            request.experiment_id = _experiment_id(self._transport, name)
            kept = [t for t in request.tags if t.key != EXPERIMENT_TAG]
            del request.tags[:]
            request.tags.extend(kept)
        return str(self._transport.create_run(request).run_id)

    def check(self, ops: list[Record]) -> None:
        """Resolve every run the operations name, so that none is sent while a run is missing."""
        for record in ops:
            run_id = run_of(record)
            if record.kind is not Kind.CREATE_RUN and run_id not in self.refused:
                self.server_id(run_id)

    def server_id(self, run_id: str) -> str:
        """The server's id for ``run_id``; ``NotFound`` when an offline directory's id is on no server run."""
        if not self._offline or run_id in self._server_ids:
            return run_id
        if run_id in self.mapped or self._lookup(run_id):
            return self.mapped[run_id]
        if self._is_server_run(run_id):
            self._server_ids.add(run_id)
            return run_id
        self.missing.append(run_id)
        raise NotFound(f"run {run_id} is not on the server yet: {self._directory} logged into it without creating "
                       "it (another rank's run, or a run an earlier offline process created); sync the spool "
                       "directory that created it first, then this one again (it is kept)", "NOT_FOUND")

    def _lookup(self, local: str) -> bool:
        """Map ``local`` from what an earlier or another directory's sync did; True when found."""
        found = self._known.get(local) or _sibling_mapping(self._directory, local) or _find_run(self._transport, local)
        if found:
            self._save(local, found)
        return bool(found)

    def _save(self, local: str, server: str) -> None:
        self.mapped[local] = server
        write_json_atomic(self._directory / RUNS, self.mapped)  # before any batch refers to it

    def set_aside(self, meta: Mapping[str, Any], ops: list[Record]) -> dict[str, Path]:
        """Write the set-aside directory of each refused run before any batch it is stripped from is sent;
        refused run -> its directory. Built hidden, recorded in ``ASIDE``, then renamed into place: a crash
        at any point leaves the run either not recorded (sent from here, or built again) or recorded and
        its directory whole (hidden: renamed by the next sync; else in place, or delivered since). The
        staging copy of a run not recorded (a sync stopped before) is deleted: nothing refers to it."""
        for local in {run_of(r) for r in ops if r.kind is Kind.CREATE_RUN} - self.aside.keys():
            shutil.rmtree(_staging(aside_path(self._directory, meta, local)), ignore_errors=True)
        for local, why in self.refused.items():
            final = aside_path(self._directory, meta, local)
            staging = _staging(final)
            if local not in self.aside:
                set_aside(self._directory, meta, ops, local, why, staging)
                self.aside[local] = why
                write_json_atomic(self._directory / ASIDE, self.aside)
            if staging.exists():
                staging.rename(final)
                _fsync_dir(final.parent)
        return {local: aside_path(self._directory, meta, local) for local in self.refused}

    def _is_server_run(self, run_id: str) -> bool:
        try:
            self._transport.get_run(query_pb2.GetRunRequest(run_id=run_id))
        except NotFound:
            return False
        except ServerUnavailable:
            raise
        except TrackhouseError as exc:  # no query service: nothing confirms the run, so nothing is sent
            raise NotFound(f"cannot check that run {run_id}, which {self._directory} logged into without creating "
                           f"it, exists (the query service answered: {exc}); kept", "NOT_FOUND") from exc
        return True

    def send_ops(self, ops: list[Record], *, final: bool) -> int:
        """Send params and tags (``final``: the run updates) in the order recorded, not those of refused
        runs nor a final status the run outlived (``superseded``); how many were sent."""
        recorded_ms = int((self._directory / OPS).stat().st_mtime * 1000) if final and ops else 0
        sent = 0
        for record in ops:
            if (record.kind is Kind.UPDATE_RUN) != final or record.kind is Kind.CREATE_RUN:
                continue
            op = _OPS[record.kind].FromString(record.payload)
            if op.run_id in self.refused:
                continue
            op.run_id = self.server_id(op.run_id)
            try:
                if isinstance(op, ingest_pb2.UpdateRunRequest):
                    stale = superseded(self._transport, op, recorded_ms)
                    if stale:
                        logger.warning("trackhouse spool: final status of run %s not applied: %s", op.run_id, stale)
                        continue
                call_op(self._transport, op)
            except ServerUnavailable:
                raise
            except TrackhouseError as exc:  # refused for good (e.g. a param logged with another value)
                logger.warning("trackhouse spool: %s refused by the server: %s", record.kind.name, exc)
            sent += 1
        return sent

    def outgoing(self, batch: ingest_pb2.MetricBatch, payload: bytes) -> tuple[bytes, int] | None:
        """``payload`` (``batch``) as it is sent, and its points: refused runs' points taken out, run ids
        mapped; None when nothing of it is left to send. ``NotFound`` for a missing run."""
        changed = False
        if self.refused and any(r in self.refused for r in batch.run_ids):
            part = only_runs(batch, lambda r: r not in self.refused)
            if part is None:
                return None
            batch, changed = part, True
        mapped = [self.server_id(r) for r in batch.run_ids]
        if mapped != list(batch.run_ids):
            del batch.run_ids[:]
            batch.run_ids.extend(mapped)
            changed = True
        return (bytes(batch.SerializeToString()) if changed else payload), batch_points(batch)


def only_runs(batch: ingest_pb2.MetricBatch, keep: Callable[[str], bool]) -> ingest_pb2.MetricBatch | None:
    """The points of ``batch`` whose run ``keep(run_id)`` accepts, as a batch of the column form with the
    same writer and seq; None when none is."""
    kept = [i for i, r in enumerate(batch.run_ids) if keep(r)]
    if not kept:
        return None
    cols = batch_columns(batch)
    renumber = np.zeros(len(batch.run_ids), np.uint32)
    renumber[kept] = np.arange(len(kept), dtype=np.uint32)
    mask = np.isin(cols.run_index, kept)
    if not mask.any():
        return None
    out = ingest_pb2.MetricBatch(
        writer_id=batch.writer_id, seq=batch.seq, run_ids=[batch.run_ids[i] for i in kept], keys=list(batch.keys),
        key_index=cols.key_index[mask].astype("<u4").tobytes(), steps=cols.steps[mask].astype("<i8").tobytes(),
        timestamps=cols.timestamps[mask].astype("<i8").tobytes(), values=cols.values[mask].astype("<f8").tobytes(),
    )  # fmt: skip
    if len(kept) > 1:  # one run: the index column may be left out
        out.run_index = renumber[cols.run_index[mask]].astype("<u4").tobytes()
    return out


def aside_path(directory: Path, meta: Mapping[str, Any], local: str) -> Path:
    """Where run ``local`` of ``directory`` is set aside: its writer id is derived from theirs."""
    return directory.parent / uuid.uuid5(_ASIDE, f"{meta.get('writer_id', directory.name)}/{local}").hex


def _staging(final: Path) -> Path:
    return final.with_name(f".{final.name}.building")  # ``writer_dirs`` skips it


def set_aside(directory: Path, meta: Mapping[str, Any], ops: list[Record], local: str, reason: str,
              path: Path) -> None:
    """Copy run ``local``'s operations and points to a writer directory of their own, ``path`` (synced).

    Its writer id is ``aside_path``'s (derived from the directory's and the run's), and it holds the
    run's points under their original seqs: building it again gives the same batches, stored once.
    """
    shutil.rmtree(path, ignore_errors=True)  # half-built by an interrupted sync
    keep = {k: v for k, v in meta.items() if k not in ("writer_id", "pid", "host")}
    writer = aside_path(directory, meta, local).name
    spool = WriterSpool(path.parent, path.name, _SEGMENT_BYTES, {**keep, "writer_id": writer,
                        "set_aside_from": str(meta.get("writer_id", "")), "refused": reason})
    try:
        for record in ops:
            if run_of(record) == local:
                spool.append_op(record.kind, record.payload)
        for segment in segments(directory):
            for item in scan(segment):
                if isinstance(item, Corruption):  # reported by the replay's stream already
                    continue
                try:
                    part = only_runs(ingest_pb2.MetricBatch.FromString(item.payload), lambda r: r == local)
                except Exception as exc:  # no MetricBatch (protobuf's DecodeError), columns that do not check out
                    raise SpoolError(f"cannot set run {local} aside: {segment}: {exc}") from exc
                if part is not None:
                    part.writer_id = writer
                    spool.append_batch(part.SerializeToString())
    finally:
        spool.close(ops_done=False)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "...")


def _sibling_mapping(directory: Path, local: str) -> str:
    """The server id a sibling directory's ``runs.json`` holds for ``local`` (another rank's spool), or ""."""
    for sibling in directory.parent.iterdir() if directory.parent.is_dir() else ():
        if sibling != directory and (sibling / RUNS).is_file():
            found = load_runs(sibling).get(local)
            if found:
                return found
    return ""


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


def superseded(transport: Transport, update: ingest_pb2.UpdateRunRequest, recorded_ms: int) -> str:
    """Why a spooled final status must not be applied to its run (already mapped), or "" when it must.

    A final status (and end time) recorded at time T by a process that has since died is stale
    when the run lived on after T: the server's run ended again later (its end_time is past T),
    or a process resumed it after T (its ``RESUMED_TAG`` is past T): a restarted job logging into
    it must not see it marked FAILED by the adoption of its dead predecessor's spool. T is the
    update's end_time (``Run.finish`` sets it), else ``recorded_ms``. Not a final status, no query
    service, no such run: applied as it is (the update then says what is wrong).
    """
    if update.status not in _FINAL:
        return ""
    try:
        run = transport.get_run(query_pb2.GetRunRequest(run_id=update.run_id))
    except ServerUnavailable:
        raise
    except TrackhouseError:
        return ""
    at = update.end_time or recorded_ms
    if run.info.end_time > at:
        return f"the run ended again later (end time {run.info.end_time} > {at})"
    resumed = max((int(t.value) for t in run.tags if t.key == RESUMED_TAG and t.value.isdigit()), default=0)
    if resumed > at:
        return f"the run was resumed after it (at {resumed} > {at})"
    return ""
