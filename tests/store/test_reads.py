"""Reads as steps: one generator, driven on blocking clients (`run`) or the async client (`arun`)."""

from __future__ import annotations

import asyncio

import pytest

from trackhouse.store import QueryFailed, RunRecord, Store
from trackhouse.store.reads import Arrow, Rows, Steps


def _steps(store: Store) -> Steps[tuple[int, int]]:
    rows = yield Rows("SELECT {a:UInt8} + 1", {"a": 1})
    table = yield Arrow(f"SELECT count() AS n FROM {store.t('runs')}")
    return int(rows[0][0]), int(table.column("n")[0].as_py())


def _run(store: Store) -> None:
    store.put_run(RunRecord("r" * 32, "0", "n", "u", "RUNNING", 1, None, "active", ""))


def test_run_and_arun_give_the_same_answers(store: Store) -> None:
    _run(store)

    async def body() -> None:
        await store.open_async()
        try:
            assert (store._async is None) == store.dsn.embedded  # a server store reads on the async client
            assert await store.arun(_steps(store)) == store.run(_steps(store)) == (2, 1)
            details = await store.arun(store.run_details_steps(["r" * 32, "missing"]))
            assert details == store.get_run_details(["r" * 32, "missing"])
            assert [d.info.run_id for d in details] == ["r" * 32]
        finally:
            await store.close_async()

    asyncio.run(body())


def test_arun_translates_engine_errors(store: Store) -> None:
    def bad() -> Steps[None]:
        yield Rows(f"SELECT no_such_column FROM {store.t('runs')}")

    async def body() -> None:
        await store.open_async()
        try:
            with pytest.raises(QueryFailed):
                await store.arun(bad())
        finally:
            await store.close_async()

    asyncio.run(body())
