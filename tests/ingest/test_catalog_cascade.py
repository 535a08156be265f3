"""Deleting or restoring an experiment cascades to its runs: in one INSERT, and to completion on retry.

The catalog runs over a fresh store; only the store's `insert_rows` is wrapped, to count the
INSERTs into `runs` and to make the store fail (or hang) in the middle of a cascade.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from trackhouse.ingest.catalog import Catalog, now_ms
from trackhouse.ingest.errors import FailedPrecondition
from trackhouse.store import ACTIVE, DELETED, Store, StoreUnavailable

RUNS = 5


class RunWrites:
    """Stands in for `store.insert_rows`: records the rows of each INSERT into `runs`.

    `allow`: rows that may still land; an INSERT past it writes what is allowed and fails, as a
    store that goes away in the middle of a cascade. `hold`: INSERTs into `runs` wait for it.
    """

    def __init__(self, store: Store) -> None:
        self._insert = store.insert_rows
        self.inserts: list[int] = []
        self.allow: int | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __call__(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if table != "runs":
            self._insert(table, columns, rows)
            return
        self.entered.set()
        assert self.hold.wait(10), "the test never released the held INSERT"
        if self.allow is not None and len(rows) > self.allow:
            landed, self.allow = list(rows)[: self.allow], 0
            if landed:
                self._insert(table, columns, landed)
            raise StoreUnavailable("injected: the store went away in the middle of the cascade")
        if self.allow is not None:
            self.allow -= len(rows)
        self.inserts.append(len(rows))
        self._insert(table, columns, rows)


class Rig:
    def __init__(self, store: Store, writes: RunWrites) -> None:
        self.store = store
        self.writes = writes
        self.catalog = Catalog(store)
        self.experiment_id = ""
        self.run_ids: list[str] = []

    async def start(self) -> None:
        self.experiment_id = (await self.catalog.create_experiment(f"cascade-{now_ms()}")).experiment_id
        for i in range(RUNS):
            run = await self.catalog.create_run(self.experiment_id, f"r{i}", "", 0, [], [])
            self.run_ids.append(run.run_id)
        self.writes.inserts.clear()  # the runs' creation went through insert_rows too
        self.writes.entered.clear()

    def stages(self) -> list[str]:
        """The runs' stages as the store has them (not the catalog's cache)."""
        runs = self.store.get_runs(self.run_ids)
        return [runs[r].lifecycle_stage for r in self.run_ids]

    def experiment_stage(self) -> str:
        rec = self.store.get_experiment(experiment_id=self.experiment_id)
        assert rec is not None
        return rec.lifecycle_stage

    async def set_stage_cut_short_then_again(self, stage: str) -> Any:
        """``set_experiment_stage`` failed by the store after two writes, then retried."""
        self.writes.allow = 2
        with pytest.raises(StoreUnavailable, match="injected"):
            await self.catalog.set_experiment_stage(self.experiment_id, stage)
        self.writes.allow = None
        return await self.catalog.set_experiment_stage(self.experiment_id, stage)

    async def assert_writable(self, writable: bool) -> None:
        """What a metric batch is told, from the catalog's cache, for each run."""
        for run_id in self.run_ids:
            runs = await self.catalog.find_metric_runs([run_id])
            if writable:
                self.catalog.check_runs_writable([run_id], runs)
            else:
                with pytest.raises(FailedPrecondition):
                    self.catalog.check_runs_writable([run_id], runs)


def run_with_rig(store: Store, monkeypatch: pytest.MonkeyPatch,
                 test: Callable[[Rig], Coroutine[Any, Any, None]]) -> None:
    writes = RunWrites(store)
    monkeypatch.setattr(store, "insert_rows", writes)

    async def body() -> None:
        rig = Rig(store, writes)
        await rig.start()
        await asyncio.wait_for(test(rig), 30)

    asyncio.run(body())


def next_millisecond() -> None:
    """Spin to the next millisecond: the cascade tells runs apart by deletion time (ms)."""
    start = now_ms()
    while now_ms() == start:
        pass


def test_the_cascade_writes_all_runs_in_one_insert(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(rig: Rig) -> None:
        await rig.catalog.set_experiment_stage(rig.experiment_id, DELETED)
        assert rig.writes.inserts == [RUNS]
        assert rig.stages() == [DELETED] * RUNS
        await rig.catalog.set_experiment_stage(rig.experiment_id, ACTIVE)
        assert rig.writes.inserts == [RUNS, RUNS]
        assert rig.stages() == [ACTIVE] * RUNS
        await rig.assert_writable(True)

    run_with_rig(store, monkeypatch, test)


def test_a_delete_interrupted_midway_completes_on_retry(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails after the experiment record and two runs: the retry must still delete the
    other runs (not return early because the experiment is already deleted)."""

    async def test(rig: Rig) -> None:
        retried = await rig.set_stage_cut_short_then_again(DELETED)
        assert retried.lifecycle_stage == DELETED and rig.experiment_stage() == DELETED
        assert rig.stages() == [DELETED] * RUNS, "runs left active in a deleted experiment"
        await rig.assert_writable(False)
        # Deleted with the experiment, by either attempt: all come back with it.
        await rig.catalog.set_experiment_stage(rig.experiment_id, ACTIVE)
        assert rig.stages() == [ACTIVE] * RUNS
        await rig.assert_writable(True)

    run_with_rig(store, monkeypatch, test)


def test_a_restore_interrupted_midway_completes_on_retry(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(rig: Rig) -> None:
        early = rig.run_ids[0]  # deleted before the experiment: stays deleted through its restore
        await rig.catalog.set_run_stage(early, DELETED)
        next_millisecond()
        await rig.catalog.set_experiment_stage(rig.experiment_id, DELETED)
        restored = await rig.set_stage_cut_short_then_again(ACTIVE)
        assert restored.lifecycle_stage == ACTIVE and rig.experiment_stage() == ACTIVE
        assert rig.stages() == [DELETED] + [ACTIVE] * (RUNS - 1), "runs left deleted in a restored experiment"

    run_with_rig(store, monkeypatch, test)


def test_a_cascade_cancelled_during_its_insert_leaves_the_cache_true_to_the_store(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gRPC deadline cancels the delete while the runs' INSERT is in the store's thread; the
    INSERT lands all the same, so metric batches for those runs must be refused from then on."""

    async def test(rig: Rig) -> None:
        await rig.assert_writable(True)  # the runs are in the catalog's cache
        rig.writes.hold.clear()
        deleting = asyncio.ensure_future(rig.catalog.set_experiment_stage(rig.experiment_id, DELETED))
        assert await asyncio.to_thread(rig.writes.entered.wait, 10), "the cascade never reached its INSERT"
        deleting.cancel()
        rig.writes.hold.set()
        with pytest.raises(asyncio.CancelledError):
            await deleting
        assert rig.stages() == [DELETED] * RUNS
        await rig.assert_writable(False)

    run_with_rig(store, monkeypatch, test)
