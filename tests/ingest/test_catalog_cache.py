"""The catalog's cache of runs: capped, and what it lets go is read again from the store unchanged.

The catalog runs over a fresh store; only the store's `get_runs` is wrapped, to count the reads
and to hold one (a read that began before a write and returns after it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.errors import FailedPrecondition, NotFound
from trackhouse.store import ACTIVE, DELETED, RunRecord, Store

CAP = 3


class RunReads:
    """Stands in for `store.get_runs`: records the ids of each read. `hold_next()`: the next read
    reads, then waits for `release` before it returns (`entered` is set once it has read)."""

    def __init__(self, store: Store) -> None:
        self._get_runs = store.get_runs
        self.reads: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._hold = False

    def hold_next(self) -> None:
        self._hold = True

    def __call__(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        self.reads.append(sorted(run_ids))
        runs = self._get_runs(run_ids)
        if self._hold:
            self._hold = False
            self.entered.set()
            assert self.release.wait(10), "the test never released the held read"
        return runs


def run_with_catalog(store: Store, monkeypatch: pytest.MonkeyPatch,
                     test: Callable[[Catalog, RunReads], Coroutine[Any, Any, None]]) -> None:
    reads = RunReads(store)
    monkeypatch.setattr(store, "get_runs", reads)

    async def body() -> None:
        catalog = Catalog(store, max_runs=CAP)
        await catalog.ensure_default_experiment()
        await asyncio.wait_for(test(catalog, reads), 30)

    asyncio.run(body())


async def create_runs(catalog: Catalog, count: int) -> list[str]:
    return [(await catalog.create_run("0", f"r{i}", "", 0, [], [])).run_id for i in range(count)]


async def writable(catalog: Catalog, run_id: str) -> bool:
    """What a metric batch for the run is told: True to write, False when the run is deleted."""
    runs = await catalog.find_metric_runs([run_id])
    try:
        catalog.check_runs_writable([run_id], runs)
    except FailedPrecondition:
        return False
    return True


def test_runs_past_the_cap_are_let_go_and_read_again_on_next_use(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(catalog: Catalog, reads: RunReads) -> None:
        run_ids = await create_runs(catalog, 2 * CAP)
        recent, early = run_ids[CAP:], run_ids[:CAP]
        found = await catalog.find_metric_runs(recent)
        assert sorted(found) == sorted(recent) and reads.reads == [], "a run within the cap was read again"
        for run_id in early:
            found = await catalog.find_metric_runs([run_id])
            assert found[run_id].run_name == f"r{run_ids.index(run_id)}"
            assert found[run_id].lifecycle_stage == ACTIVE
        assert reads.reads == [[r] for r in early]
        with pytest.raises(NotFound, match="no run 'nope'"):
            await catalog.find_metric_runs(["nope"])

    run_with_catalog(store, monkeypatch, test)


def test_a_batch_naming_more_runs_than_the_cap_finds_them_all(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(catalog: Catalog, reads: RunReads) -> None:
        run_ids = await create_runs(catalog, 3 * CAP)
        found = await catalog.find_metric_runs(run_ids)
        assert sorted(found) == sorted(run_ids)
        catalog.check_runs_writable(run_ids, found)

    run_with_catalog(store, monkeypatch, test)


def test_a_deleted_run_let_go_is_still_refused_and_a_restored_one_taken(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(catalog: Catalog, reads: RunReads) -> None:
        [run_id] = await create_runs(catalog, 1)
        await catalog.set_run_stage(run_id, DELETED)
        await create_runs(catalog, CAP)  # the deleted run's record is let go
        reads.reads.clear()
        assert not await writable(catalog, run_id)
        assert reads.reads == [[run_id]], "the deleted run was not read again from the store"
        with pytest.raises(FailedPrecondition, match="is deleted"):
            await catalog.writable_run(run_id)
        await catalog.set_run_stage(run_id, ACTIVE)
        await create_runs(catalog, CAP)
        assert await writable(catalog, run_id)

    run_with_catalog(store, monkeypatch, test)


def test_an_update_of_a_run_let_go_keeps_what_the_store_has(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(catalog: Catalog, reads: RunReads) -> None:
        [run_id] = await create_runs(catalog, 1)
        await catalog.update_run(run_id, "", 0, "renamed")
        await create_runs(catalog, CAP)
        updated = await catalog.update_run(run_id, "FINISHED", 0, "")
        assert (updated.run_name, updated.status) == ("renamed", "FINISHED") and updated.end_time

    run_with_catalog(store, monkeypatch, test)


def test_a_read_under_way_while_the_run_is_deleted_does_not_cache_the_run_active(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's read of a run (not cached) sees it active; the run is deleted, its record cached,
    then let go; the read returns after that. Were it cached, the deleted run would take metric
    batches (and an update would write it back active) until let go again."""

    async def test(catalog: Catalog, reads: RunReads) -> None:
        [run_id] = await create_runs(catalog, 1)
        await create_runs(catalog, CAP)
        reads.hold_next()
        batch = asyncio.ensure_future(catalog.find_metric_runs([run_id]))
        assert await asyncio.to_thread(reads.entered.wait, 10), "the batch never read the run"
        await catalog.set_run_stage(run_id, DELETED)
        await create_runs(catalog, CAP)  # the deleted record is let go
        reads.release.set()
        assert (await batch)[run_id].lifecycle_stage == ACTIVE  # read before the deletion
        assert not await writable(catalog, run_id), "a deleted run takes writes"
        with pytest.raises(FailedPrecondition, match="is deleted"):
            await catalog.update_run(run_id, "FINISHED", 0, "")

    run_with_catalog(store, monkeypatch, test)


def test_a_read_under_way_while_the_run_is_deleted_keeps_the_newer_record(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race without the cap in play: the record cached by the deletion outlives the read."""

    async def test(catalog: Catalog, reads: RunReads) -> None:
        [run_id] = await create_runs(catalog, 1)
        fresh = Catalog(store)  # as after a restart: the run is not in its cache
        reads.hold_next()
        batch = asyncio.ensure_future(fresh.find_metric_runs([run_id]))
        assert await asyncio.to_thread(reads.entered.wait, 10), "the batch never read the run"
        await fresh.set_run_stage(run_id, DELETED)
        reads.release.set()
        await batch
        assert not await writable(fresh, run_id), "the older record read replaced the deleted one"

    run_with_catalog(store, monkeypatch, test)
