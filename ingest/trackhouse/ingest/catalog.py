"""Experiments, runs, params and tags: the small, mutable side of ingest, with MLflow's rules.

Owns the validation and semantics of the lifecycle RPCs:
- experiment names are unique: a new experiment may not take a deleted one's name
  (MLflow's rule: restore the deleted one instead); "0" / "Default" exists;
- a run belongs to an active experiment; deleted runs accept no writes;
- params are write-once per (run, key): the same value again is accepted,
  another value is InvalidArgument naming both values;
- tags are last-write-wins; deleting a tag that is not there is NotFound;
- deleted runs and experiments keep their data and can be restored; deleting an
  experiment deletes its active runs, restoring it restores the runs deleted with it
  (in one INSERT; calling again completes a cascade that was cut short);
- experiment tags live in their own table, `experiment_tags` (migration 6);
- limits as MLflow's: key ≤ 250 characters, param value ≤ 6,000, tag value ≤ 5,000.

Keeps a cache of run states so metric batches are checked without a store
round trip per batch. Writes that must not race (param write-once, experiment
names) are serialized by one lock in this process.

The cache is an LRU of at most `max_runs` records (MAX_CACHED_RUNS unless the settings
say otherwise). It is write-through: a record is cached only once the store has it (a
failed write drops the record), so a record let go is read again from the store on its
next use and comes back the same. One read could bring back an older record: a store read
under way while this catalog writes the run returns what it read before the write; were
the written record let go before the read ends, the read would cache the older one, and
a deleted run would take writes again. So a read does not cache a run written while it
was under way (`_read_runs`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Iterable, Sequence

from trackhouse.ingest.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from trackhouse.ingest.lru import LRU
from trackhouse.proto.rules import (
    MAX_EXPERIMENT_TAG_VALUE,
    MAX_PARAM_VALUE,
    MAX_RUN_NAME,
    MAX_TAG_VALUE,
    items_problem,
)
from trackhouse.store import (
    ACTIVE,
    DELETED,
    RUN_STATUSES,
    TERMINAL_STATUSES,
    ExperimentRecord,
    RunRecord,
    Store,
    new_run_id,
    new_version,
)

DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"
MAX_EXPERIMENT_NAME = 500
# Runs whose records are cached (IngestSettings.max_cached_runs, the same default).
MAX_CACHED_RUNS = 200_000
# The runs table's columns, named as the record's fields (the store reads RunRecord(*row) in this order).
_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_items(items: Sequence[tuple[str, str]], field: str, max_value: int) -> None:
    if (problem := items_problem(items, field, max_value)) is not None:
        raise InvalidArgument(problem)


class Catalog:
    def __init__(self, store: Store, artifact_root: str = "./mlartifacts",
                 max_runs: int = MAX_CACHED_RUNS) -> None:
        self._store = store
        self._artifact_root = artifact_root.rstrip("/")
        self._runs: LRU[str, RunRecord] = LRU(max_runs)
        self._reads: dict[str, int] = {}  # run -> store reads of it under way
        self._written: dict[str, int] = {}  # run being read -> number of its latest write here
        self._writes = 0  # run records written (or dropped after a failed write) here
        self._lock = asyncio.Lock()

    # -- experiments ---------------------------------------------------------------

    async def ensure_default_experiment(self) -> None:
        if await self._store.call(self._store.get_experiment, experiment_id=DEFAULT_EXPERIMENT_ID) is None:
            await self._put_experiment(DEFAULT_EXPERIMENT_ID, DEFAULT_EXPERIMENT_NAME, "")

    async def create_experiment(self, name: str, artifact_location: str = "") -> ExperimentRecord:
        name = name.strip()
        if not name:
            raise InvalidArgument("name: an experiment needs a non-empty name")
        if len(name) > MAX_EXPERIMENT_NAME:
            raise InvalidArgument(f"name: {len(name)} characters, limit {MAX_EXPERIMENT_NAME}")
        async with self._lock:
            existing = await self._store.call(self._store.get_experiment, name=name)  # the active one first
            if existing is not None and existing.lifecycle_stage == ACTIVE:
                raise AlreadyExists(f"experiment {name!r} already exists (id {existing.experiment_id})")
            if existing is not None:
                raise AlreadyExists(f"experiment {name!r} already exists in deleted state (id "
                                    f"{existing.experiment_id}); restore it, or restore and rename it to free the name")
            # 62 random bits as a decimal string: unique across ingest replicas without coordination.
            experiment_id = str(secrets.randbits(62))
            return await self._put_experiment(experiment_id, name, artifact_location)

    async def _put_experiment(self, experiment_id: str, name: str, location: str) -> ExperimentRecord:
        t = now_ms()
        rec = ExperimentRecord(
            experiment_id, name, location or f"{self._artifact_root}/{experiment_id}", ACTIVE, t, t
        )
        await self._store.call(self._store.put_experiment, rec)
        return rec

    async def get_experiment(self, *, experiment_id: str = "", name: str = "") -> ExperimentRecord:
        if experiment_id:
            rec = await self._store.call(self._store.get_experiment, experiment_id=experiment_id)
        elif name:
            rec = await self._store.call(self._store.get_experiment, name=name)
        else:
            raise InvalidArgument("experiment_id or name: one is required")
        if rec is None:
            raise NotFound(f"no experiment {'with id ' + repr(experiment_id) if experiment_id else repr(name)}")
        return rec

    async def update_experiment(self, experiment_id: str, new_name: str) -> ExperimentRecord:
        new_name = new_name.strip()
        if not new_name:
            raise InvalidArgument("new_name: an experiment needs a non-empty name")
        if len(new_name) > MAX_EXPERIMENT_NAME:
            raise InvalidArgument(f"new_name: {len(new_name)} characters, limit {MAX_EXPERIMENT_NAME}")
        async with self._lock:
            rec = await self.get_experiment(experiment_id=experiment_id)
            if rec.lifecycle_stage != ACTIVE:
                raise FailedPrecondition(f"experiment {experiment_id} is deleted; restore it to rename it")
            other = await self._store.call(self._store.get_experiment, name=new_name)
            if other is not None and other.lifecycle_stage == ACTIVE and other.experiment_id != experiment_id:
                raise AlreadyExists(f"experiment {new_name!r} already exists (id {other.experiment_id})")
            return await self._replace_experiment(rec, name=new_name)

    async def set_experiment_stage(self, experiment_id: str, stage: str) -> ExperimentRecord:
        """Delete (stage DELETED) or restore (ACTIVE) an experiment, and its runs with it.

        MLflow's cascade: deleting marks the active runs deleted; restoring brings back those
        deleted no earlier than the experiment was (a run deleted before stays deleted). The runs
        go in one INSERT. A call cut short (a client deadline, a store error) may leave part of
        the cascade undone; calling again completes it, so each direction writes in the order
        that lets a retry find what is left (see `_delete_experiment`, `_restore_experiment`).
        Under the lock throughout: lifecycle and run updates read a run and write it whole, so
        an update interleaved with the cascade could undo it.
        """
        if stage not in (ACTIVE, DELETED):
            raise ValueError(f"stage: {stage!r}, expected {ACTIVE!r} or {DELETED!r}")
        async with self._lock:
            rec = await self.get_experiment(experiment_id=experiment_id)
            if stage == DELETED:
                return await self._delete_experiment(rec)
            return await self._restore_experiment(rec)

    async def _delete_experiment(self, rec: ExperimentRecord) -> ExperimentRecord:
        # The experiment first: its deletion time is how a restore tells the runs deleted with it.
        # Already deleted (a retry), its runs are still swept: any left active by an interrupted
        # cascade (or restore) is deleted now, after that time, so a restore brings it back too.
        updated = rec if rec.lifecycle_stage == DELETED else await self._replace_experiment(rec, stage=DELETED)
        runs = await self._store.call(self._runs_of, rec.experiment_id, ACTIVE, 0)
        await self._put_runs(runs, DELETED)
        return updated

    async def _restore_experiment(self, rec: ExperimentRecord) -> ExperimentRecord:
        if rec.lifecycle_stage == ACTIVE:
            return rec  # restored, runs included: they are written before the experiment
        other = await self._store.call(self._store.get_experiment, name=rec.name)
        if other is not None and other.lifecycle_stage == ACTIVE and other.experiment_id != rec.experiment_id:
            raise AlreadyExists(f"cannot restore: another experiment is named {rec.name!r}")
        # The runs first: the deleted record's time tells which runs were deleted with it, and it is
        # lost once the experiment is active. Cut short here, the experiment is still deleted (with
        # some runs active again), and a retry restores the rest by the same time.
        runs = await self._store.call(self._runs_of, rec.experiment_id, DELETED, rec.last_update_time)
        await self._put_runs(runs, ACTIVE)
        return await self._replace_experiment(rec, stage=ACTIVE)

    def _runs_of(self, experiment_id: str, stage: str, since: int) -> list[RunRecord]:
        # Blocking (store thread). The experiment's runs at `stage` since `since` (ms; a run's
        # version is the time it was last written, in ns), whole, through the store's bound SQL.
        rows = self._store.query_rows(
            f"SELECT {', '.join(_RUN_FIELDS)} FROM {self._store.t('runs')} FINAL "
            "WHERE experiment_id = {e:String} AND lifecycle_stage = {s:String} "
            "AND intDiv(version, 1000000) >= {t:Int64}",
            {"e": experiment_id, "s": stage, "t": since},
        )
        return [RunRecord(*row) for row in rows]

    async def _replace_experiment(self, rec: ExperimentRecord, *, name: str | None = None,
                                  stage: str | None = None) -> ExperimentRecord:
        new = ExperimentRecord(rec.experiment_id, rec.name if name is None else name, rec.artifact_location,
                               rec.lifecycle_stage if stage is None else stage, rec.creation_time,
                               max(now_ms(), rec.last_update_time))
        await self._store.call(self._store.put_experiment, new)
        return new

    async def set_experiment_tags(self, experiment_id: str, tags: Sequence[tuple[str, str]]) -> None:
        _check_items(tags, "tags", MAX_EXPERIMENT_TAG_VALUE)
        rec = await self.get_experiment(experiment_id=experiment_id)
        if rec.lifecycle_stage != ACTIVE:
            raise FailedPrecondition(f"experiment {experiment_id} is deleted; restore it to tag it")
        await self._store.call(self._store.put_experiment_tags, experiment_id, list(tags))

    async def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        rec = await self.get_experiment(experiment_id=experiment_id)
        if rec.lifecycle_stage != ACTIVE:
            raise FailedPrecondition(f"experiment {experiment_id} is deleted; restore it to change its tags")
        tags = await self._store.call(self._store.get_experiment_tags, [experiment_id])
        if key not in tags[experiment_id]:
            raise NotFound(f"no tag {key!r} on experiment {experiment_id}")
        await self._store.call(self._store.put_experiment_tags, experiment_id, [(key, "")], True)

    async def _delete_tag(self, run_id: str, key: str, what: str) -> None:
        rows = await self._store.call(
            self._store.query_rows,
            f"SELECT count() FROM {self._store.t('tags')} FINAL "
            "WHERE run_id = {r:String} AND key = {k:String} AND deleted = 0",
            {"r": run_id, "k": key},
        )
        if not rows or not rows[0][0]:
            raise NotFound(f"no tag {key!r} on {what}")
        await self._store.call(self._store.put_tags, run_id, [(key, "")], True)

    # -- runs --------------------------------------------------------------------------

    async def create_run(
        self, experiment_id: str, run_name: str, user_id: str, start_time: int,
        params: Sequence[tuple[str, str]], tags: Sequence[tuple[str, str]],
    ) -> RunRecord:
        experiment_id = experiment_id or DEFAULT_EXPERIMENT_ID
        if len(run_name) > MAX_RUN_NAME:
            raise InvalidArgument(f"run_name: {len(run_name)} characters, limit {MAX_RUN_NAME}")
        if start_time < 0:
            raise InvalidArgument("start_time: must be >= 0 (ms since the epoch)")
        _check_items(params, "params", MAX_PARAM_VALUE)
        _check_items(tags, "tags", MAX_TAG_VALUE)
        if len({k for k, _ in params}) != len(params):
            raise InvalidArgument("params: the same key appears twice")
        experiment = await self.get_experiment(experiment_id=experiment_id)
        if experiment.lifecycle_stage != ACTIVE:
            raise FailedPrecondition(f"experiment {experiment_id} is deleted; restore it to add runs")
        start_time = start_time or now_ms()
        run_id = new_run_id(start_time)
        rec = RunRecord(
            run_id=run_id, experiment_id=experiment_id, run_name=run_name or f"run-{run_id[-8:]}",
            user_id=user_id, status="RUNNING", start_time=start_time, end_time=None,
            lifecycle_stage=ACTIVE, artifact_uri=f"{experiment.artifact_location}/{run_id}/artifacts",
        )
        await self._store.call(self._store.put_run, rec)
        if params:
            await self._store.call(self._store.put_params, run_id, list(params))
        if tags:
            await self._store.call(self._store.put_tags, run_id, list(tags))
        self._cache(rec)
        return rec

    async def get_runs(self, run_ids: Iterable[str]) -> dict[str, RunRecord]:
        """Run records by id (cached); unknown ids are absent from the result."""
        wanted = set(run_ids)
        # Taken before the read: a record let go meanwhile must not make a known run unknown.
        found = {r: rec for r in wanted if (rec := self._runs.get(r)) is not None}
        missing = [r for r in wanted if r not in found]
        if not missing:
            return found
        found.update(await self._read_runs(missing))
        # The cache's record where it has one: one written here while the store was read is newer.
        return {r: self._runs.get(r, rec) for r, rec in found.items()}

    async def _read_runs(self, run_ids: list[str]) -> dict[str, RunRecord]:
        """Read runs from the store and cache them, except those written here meanwhile."""
        start = self._writes
        for r in run_ids:
            self._reads[r] = self._reads.get(r, 0) + 1
        try:
            loaded = await self._store.call(self._store.get_runs, run_ids)
            for run_id, rec in loaded.items():
                if self._written.get(run_id, start) <= start:  # not written since this read began
                    self._runs[run_id] = rec
            return loaded
        finally:
            for r in run_ids:
                left = self._reads.pop(r) - 1
                if left:
                    self._reads[r] = left
                else:
                    self._written.pop(r, None)

    def _cache(self, rec: RunRecord) -> None:
        """Cache a record the store now has (or, `_uncache`, drop one it may have)."""
        self._note_write(rec.run_id)
        self._runs[rec.run_id] = rec

    def _uncache(self, run_id: str) -> None:
        self._note_write(run_id)
        self._runs.pop(run_id)

    def _note_write(self, run_id: str) -> None:
        # Reads of the run under way read it before this write: they must not cache what they read.
        self._writes += 1
        if run_id in self._reads:
            self._written[run_id] = self._writes

    async def writable_run(self, run_id: str) -> RunRecord:
        run = (await self.get_runs([run_id])).get(run_id)
        if run is None:
            raise NotFound(f"run_id: no run {run_id!r}")
        if run.lifecycle_stage != ACTIVE:
            raise FailedPrecondition(f"run {run_id} is deleted; restore it before writing to it")
        return run

    async def update_run(self, run_id: str, status: str, end_time: int, run_name: str) -> RunRecord:
        if status and status not in RUN_STATUSES:
            raise InvalidArgument(f"status: {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if end_time < 0:
            raise InvalidArgument("end_time: must be >= 0 (ms since the epoch)")
        if len(run_name) > MAX_RUN_NAME:
            raise InvalidArgument(f"run_name: {len(run_name)} characters, limit {MAX_RUN_NAME}")
        async with self._lock:
            run = await self.writable_run(run_id)
            status = status or run.status
            if not end_time and status in TERMINAL_STATUSES:
                end_time = run.end_time or now_ms()
            rec = RunRecord(
                run.run_id, run.experiment_id, run_name or run.run_name, run.user_id, status,
                run.start_time, end_time or run.end_time, run.lifecycle_stage, run.artifact_uri,
            )
            await self._store.call(self._store.put_run, rec)
            self._cache(rec)
            return rec

    async def set_run_stage(self, run_id: str, stage: str) -> RunRecord:
        """Delete (stage DELETED) or restore (ACTIVE) a run; its data stays."""
        async with self._lock:
            run = (await self.get_runs([run_id])).get(run_id)
            if run is None:
                raise NotFound(f"run_id: no run {run_id!r}")
            if stage == ACTIVE:
                experiment = await self.get_experiment(experiment_id=run.experiment_id)
                if experiment.lifecycle_stage != ACTIVE:
                    raise FailedPrecondition(f"experiment {run.experiment_id} is deleted; restore it first")
            if run.lifecycle_stage == stage:
                return run
            return (await self._put_runs([run], stage))[0]

    async def _put_runs(self, runs: Sequence[RunRecord], stage: str) -> list[RunRecord]:
        """Write `runs` at `stage` in one INSERT, and the cache with them.

        A caller cancelled meanwhile (a client's deadline) does not stop the INSERT in the store's
        thread: it waits for it before it gives up, so the lock it holds also covers the cache
        update, and metric batches are refused from the moment the deletion is stored.
        """
        recs = [dataclasses.replace(run, lifecycle_stage=stage) for run in runs]
        if recs:
            write = asyncio.ensure_future(self._write_runs(recs))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait({write})
                raise
        return recs

    async def _write_runs(self, recs: Sequence[RunRecord]) -> None:
        version = new_version()
        rows = [(*dataclasses.astuple(rec), version) for rec in recs]
        try:
            await self._store.call(self._store.insert_rows, "runs", (*_RUN_FIELDS, "version"), rows)
        except BaseException:
            # Some rows may have landed (a large INSERT is split into blocks): let the next check read the store.
            for rec in recs:
                self._uncache(rec.run_id)
            raise
        for rec in recs:
            self._cache(rec)

    async def delete_tag(self, run_id: str, key: str) -> None:
        await self.writable_run(run_id)
        await self._delete_tag(run_id, key, f"run {run_id}")

    # -- params and tags -------------------------------------------------------------------

    async def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        _check_items(params, "params", MAX_PARAM_VALUE)
        given: dict[str, str] = {}
        for key, value in params:
            if given.setdefault(key, value) != value:
                raise InvalidArgument(f"params: key {key!r} given twice with different values")
        async with self._lock:
            await self.writable_run(run_id)
            stored = await self._store.call(self._store.get_params, run_id, list(given))
            for key, old in stored.items():
                if old != given[key]:
                    raise InvalidArgument(
                        f"params: changing param values is not allowed. Param with key={key!r} was "
                        f"already logged with value={old!r} for run {run_id}; attempted value={given[key]!r}"
                    )
            new = [(k, v) for k, v in given.items() if k not in stored]
            if new:
                await self._store.call(self._store.put_params, run_id, new)

    async def set_tags(self, run_id: str, tags: Sequence[tuple[str, str]]) -> None:
        _check_items(tags, "tags", MAX_TAG_VALUE)
        await self.writable_run(run_id)
        await self._store.call(self._store.put_tags, run_id, list(tags))

    async def find_metric_runs(self, run_ids: Sequence[str], allowed: frozenset[str] | None = None
                               ) -> dict[str, RunRecord]:
        """The runs a metric batch names; NotFound unless each exists (and is one of `allowed`'s)."""
        runs = await self.get_runs(run_ids)
        for i, run_id in enumerate(run_ids):
            run = runs.get(run_id)
            if run is None or (allowed is not None and run.experiment_id not in allowed):
                raise NotFound(f"run_ids[{i}]: no run {run_id!r}")
        return runs

    def check_runs_writable(self, run_ids: Sequence[str], runs: dict[str, RunRecord]) -> None:
        """FailedPrecondition unless every run accepts writes.

        Synchronous, so that a caller can check and act with no await in between: the cached
        record, else the one `find_metric_runs` gave (`runs`). That one is as of the batch's
        arrival: when the run's record was let go from the cache meanwhile, a lifecycle change
        made since then is not seen, as it would not have been by a batch checked at arrival.
        """
        for i, run_id in enumerate(run_ids):
            if self._runs.get(run_id, runs[run_id]).lifecycle_stage != ACTIVE:
                raise FailedPrecondition(f"run_ids[{i}]: run {run_id} is deleted")
