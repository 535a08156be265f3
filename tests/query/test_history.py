"""Metric history through the real gRPC QueryService: columnar pages, ties, step ranges, errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.store import RunRecord, Store, open_store

RUN = "run-history"
N = 10_000


@dataclass
class Series:
    steps: np.ndarray[Any, np.dtype[np.int64]]
    timestamps: np.ndarray[Any, np.dtype[np.int64]]
    values: np.ndarray[Any, np.dtype[np.float64]]

    def sorted(self, lo: int | None = None, hi: int | None = None) -> Series:
        """The points in (step, timestamp, value) order (NaN after numbers), within [lo, hi]."""
        keep = np.ones(len(self.steps), bool)
        if lo is not None:
            keep &= self.steps >= lo
        if hi is not None:
            keep &= self.steps <= hi
        s, t, v = self.steps[keep], self.timestamps[keep], self.values[keep]
        order = np.lexsort((v, t, s))
        return Series(s[order], t[order], v[order])


def make_series(rng: np.random.Generator) -> Series:
    """10,000 points: many duplicate (step, timestamp) pairs, one group spanning several pages,
    identical duplicates, negative steps, NaN and ±Inf values."""
    steps = rng.integers(-50, 3_000, N).astype(np.int64)
    timestamps = (1_700_000_000_000 + rng.integers(0, 3, N)).astype(np.int64)
    values = rng.normal(size=N)
    steps[:1_000] = 777  # one (step, timestamp) group of 1,000 points: more than 3 pages of 333
    timestamps[:1_000] = 1_700_000_000_001
    values[:400] = 0.5  # of which 400 identical points
    values[rng.choice(N, 300, replace=False)] = np.nan
    values[rng.choice(N, 50, replace=False)] = np.inf
    values[rng.choice(N, 50, replace=False)] = -np.inf
    return Series(steps, timestamps, values)


def insert(store: Store, run_id: str, key: str, series: Series, parts: int = 4) -> None:
    """In shuffled order over several INSERTs, so the engine has to sort across parts."""
    order = np.random.default_rng(1).permutation(len(series.steps))
    for chunk in np.array_split(order, parts):
        store.insert_arrow("metrics", pa.table({
            "run_id": [run_id] * len(chunk), "key": [key] * len(chunk),
            "step": pa.array(series.steps[chunk]), "timestamp": pa.array(series.timestamps[chunk]),
            "value": pa.array(series.values[chunk]),
            "writer_id": ["w"] * len(chunk), "seq": pa.array(np.ones(len(chunk), np.uint64)),
        }))


@dataclass
class Env:
    stub: Any
    series: Series

    def page(self, **kwargs: Any) -> Any:
        return self.stub.GetMetricHistory(query_pb2.GetMetricHistoryRequest(**kwargs))

    def walk(self, **kwargs: Any) -> tuple[Series, int]:
        """Every page concatenated, and how many pages there were."""
        parts: list[Series] = []
        token = ""
        while True:
            reply = self.page(page_token=token, **kwargs)
            assert (reply.run_id, reply.key) == (kwargs["run_id"], kwargs["key"])
            parts.append(Series(np.frombuffer(reply.steps, "<i8"), np.frombuffer(reply.timestamps, "<i8"),
                                np.frombuffer(reply.values, "<f8")))
            assert len(parts[-1].steps) == len(parts[-1].timestamps) == len(parts[-1].values)
            token = reply.next_page_token
            if not token:
                break
            assert len(parts[-1].steps) == kwargs.get("max_results", 25_000)
            assert len(parts) <= N, "paging does not end"
        joined = Series(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("steps", "timestamps", "values")))
        return joined, len(parts)


def assert_same(got: Series, want: Series) -> None:
    np.testing.assert_array_equal(got.steps, want.steps)
    np.testing.assert_array_equal(got.timestamps, want.timestamps)
    # Bit for bit: NaN where NaN, the same infinities, nothing lost or repeated.
    assert got.values.tobytes() == want.values.tobytes()


@pytest.fixture(scope="module")
def env(chdb_dsn: str) -> Iterator[Env]:
    """One seeded store and server for the module (every test here only reads); built like conftest's."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        series = seed(store)
        thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0), store=store)
        channel = grpc.insecure_channel(thread.start())
        try:
            yield Env(query_pb2_grpc.QueryServiceStub(channel), series)
        finally:
            channel.close()
            thread.stop(grace=1.0)
    finally:
        store.close()


def seed(store: Store) -> Series:
    """Write the series of RUN/loss and its neighbours; return the series."""
    series = make_series(np.random.default_rng(42))
    store.put_run(RunRecord(RUN, "e1", "r", "ann", "RUNNING", 1, None, "active", "file:///a"))
    store.put_run(RunRecord("other-run", "e1", "r", "ann", "RUNNING", 1, None, "active", "file:///b"))
    insert(store, RUN, "loss", series)
    # Neighbours that must never leak in: another key of the run, the same key of another run.
    insert(store, RUN, "acc", Series(series.steps[:500], series.timestamps[:500], series.values[:500] + 1), 1)
    insert(store, "other-run", "loss", Series(series.steps[:500], series.timestamps[:500],
                                              series.values[:500] + 2), 1)
    return series


def test_whole_series_in_one_page(env: Env) -> None:
    got, pages = env.walk(run_id=RUN, key="loss")
    assert pages == 1
    assert_same(got, env.series.sorted())


@pytest.mark.parametrize(("size", "lo", "hi"), [(1, 10, 40), (7, 776, 778)])
def test_small_pages_through_ties(env: Env, size: int, lo: int, hi: int) -> None:
    want = env.series.sorted(lo, hi)
    got, pages = env.walk(run_id=RUN, key="loss", max_results=size, min_step=lo, max_step=hi)
    assert_same(got, want)
    assert pages == -(-len(want.steps) // size)


@pytest.mark.parametrize("size", [333, 999, 1_000, 9_999, 10_000])
def test_pages_concatenate_to_the_series(env: Env, size: int) -> None:
    got, pages = env.walk(run_id=RUN, key="loss", max_results=size)
    assert_same(got, env.series.sorted())
    assert pages == -(-N // size)


@pytest.mark.parametrize(("lo", "hi"), [(0, 2_999), (777, 777), (-50, -1), (100, 1_500), (3_000, 4_000), (5, 4)])
def test_step_range_with_pages(env: Env, lo: int, hi: int) -> None:
    want = env.series.sorted(lo, hi)
    got, pages = env.walk(run_id=RUN, key="loss", max_results=333, min_step=lo, max_step=hi)
    assert_same(got, want)
    assert pages == max(1, -(-len(want.steps) // 333))


def test_open_ended_step_ranges(env: Env) -> None:
    got, _ = env.walk(run_id=RUN, key="loss", max_results=333, min_step=2_500)
    assert_same(got, env.series.sorted(lo=2_500))
    got, _ = env.walk(run_id=RUN, key="loss", max_results=333, max_step=10)
    assert_same(got, env.series.sorted(hi=10))


def test_unknown_key_of_a_known_run_is_empty(env: Env) -> None:
    reply = env.page(run_id=RUN, key="nosuch")
    assert (reply.steps, reply.timestamps, reply.values, reply.next_page_token) == (b"", b"", b"", "")


def assert_invalid(call: Any, fragment: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    assert err.code() == code, err.details()
    assert fragment in err.details()


def test_unknown_run_is_not_found(env: Env) -> None:
    assert_invalid(lambda: env.page(run_id="nope", key="loss"), "no run 'nope'", grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"run_id": RUN}, "run_id and key"),
        ({"key": "loss"}, "run_id and key"),
        ({"run_id": RUN, "key": "loss", "max_results": -1}, "max_results: -1 is outside 1..1000000"),
        ({"run_id": RUN, "key": "loss", "max_results": 1_000_001}, "max_results: 1000001 is outside"),
        ({"run_id": RUN, "key": "loss", "page_token": "garbage!"}, "page_token: "),
    ],
)
def test_bad_requests(env: Env, kwargs: dict[str, Any], fragment: str) -> None:
    assert_invalid(lambda: env.page(**kwargs), fragment)


def test_page_size_may_change_from_page_to_page(env: Env) -> None:
    """A token names a place in the series, not a page size (as MLflow's offset tokens)."""
    sizes = iter([333, 1, 999, 7, 2_500, 10_000])
    parts, token = [], ""
    while True:
        reply = env.page(run_id=RUN, key="loss", max_results=next(sizes, 1_000), page_token=token)
        parts.append(Series(np.frombuffer(reply.steps, "<i8"), np.frombuffer(reply.timestamps, "<i8"),
                            np.frombuffer(reply.values, "<f8")))
        token = reply.next_page_token
        if not token:
            break
    assert [len(p.steps) for p in parts] == [333, 1, 999, 7, 2_500, N - 3_840]
    assert_same(Series(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("steps", "timestamps", "values"))),
                env.series.sorted())


def test_tokens_belong_to_one_question(env: Env) -> None:
    token = env.page(run_id=RUN, key="loss", max_results=333).next_page_token
    assert token
    others: list[dict[str, Any]] = [
        {"run_id": RUN, "key": "acc", "max_results": 333},
        {"run_id": "other-run", "key": "loss", "max_results": 333},
        {"run_id": RUN, "key": "loss", "max_results": 333, "min_step": 0},
        {"run_id": RUN, "key": "loss", "max_results": 333, "max_step": 2_999},
    ]
    for other in others:
        assert_invalid(lambda o=other: env.page(page_token=token, **o), "belongs to another search")
    tampered = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    assert_invalid(lambda: env.page(run_id=RUN, key="loss", max_results=333, page_token=tampered), "page_token: ")
