"""Downsampled history (min and max per bucket, one run or up to 100) and long-format export, via gRPC.

Every expectation is recomputed with numpy from the points written, bucket by bucket.
"""

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
from trackhouse.query.downsample import BucketRequest, MetricCharts, rollup_level
from trackhouse.query.errors import InvalidArgument
from trackhouse.query.settings import QuerySettings
from trackhouse.store import Store, open_store

SPIKY = "spiky"
RUNS = [f"chart-{i:03d}" for i in range(101)]


@dataclass
class Points:
    steps: np.ndarray[Any, np.dtype[np.int64]]
    timestamps: np.ndarray[Any, np.dtype[np.int64]]
    values: np.ndarray[Any, np.dtype[np.float64]]


def _insert(store: Store, run_ids: list[str], key: str, pts: list[Points]) -> None:
    store.insert_arrow("metrics", pa.table({
        "run_id": [r for r, p in zip(run_ids, pts, strict=True) for _ in range(len(p.steps))],
        "key": [key] * sum(len(p.steps) for p in pts),
        "step": pa.array(np.concatenate([p.steps for p in pts])),
        "timestamp": pa.array(np.concatenate([p.timestamps for p in pts])),
        "value": pa.array(np.concatenate([p.values for p in pts])),
        "writer_id": ["w"] * sum(len(p.steps) for p in pts),
        "seq": pa.array(np.ones(sum(len(p.steps) for p in pts), np.uint64)),
    }))


def spiky(rng: np.random.Generator, n: int) -> Points:
    """Noise with single-point spikes, NaN, ±inf, duplicate steps and negative steps."""
    steps = rng.integers(-100, 5_000, n).astype(np.int64)
    values = rng.normal(size=n)
    spikes = rng.choice(n, 20, replace=False)
    values[spikes] = rng.choice([1e6, -1e6], 20)
    values[rng.choice(n, 30, replace=False)] = np.nan
    values[rng.choice(n, 3, replace=False)] = np.inf
    return Points(steps, (1_700_000_000_000 + np.arange(n)).astype(np.int64), values)


@dataclass
class Env:
    stub: Any
    series: dict[tuple[str, str], Points]


@pytest.fixture(scope="module")
def env(chdb_dsn: str) -> Iterator[Env]:
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    rng = np.random.default_rng(5)
    series: dict[tuple[str, str], Points] = {}
    try:
        for key, runs, n in ((SPIKY, RUNS[:1], 20_000), ("loss", RUNS, 300)):
            pts = [spiky(rng, n) for _ in runs]
            for r, p in zip(runs, pts, strict=True):
                series[r, key] = p
            half = len(runs) // 2 or 1  # two INSERTs: the read combines parts
            _insert(store, runs[:half], key, pts[:half])
            if runs[half:]:
                _insert(store, runs[half:], key, pts[half:])
        thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0), store=store)
        address = thread.start()
        channel = grpc.insecure_channel(address)
        try:
            yield Env(query_pb2_grpc.QueryServiceStub(channel), series)
        finally:
            channel.close()
            thread.stop(grace=1.0)
    finally:
        store.close()


def expected_buckets(p: Points, n: int, lo: int, hi: int) -> dict[int, tuple[Any, ...]]:
    keep = (p.steps >= lo) & (p.steps <= hi)
    steps, values = p.steps[keep], p.values[keep]
    b = ((steps.astype(object) - lo) * n) // (hi - lo + 1)  # Python ints: any int64 range, no overflow
    out: dict[int, tuple[Any, ...]] = {}
    for i in np.unique(b):
        s, v = steps[b == i], values[b == i]
        num = ~np.isnan(v)
        if num.any():
            lo_v, hi_v = v[num].min(), v[num].max()
            lo_s = int(s[num][v[num] == lo_v].min())
            hi_s = int(s[num][v[num] == hi_v].min())
        else:
            lo_v = hi_v = np.nan
            lo_s = hi_s = 0
        out[int(i)] = (lo_s, float(lo_v), hi_s, float(hi_v), len(v))
    return out


def got_buckets(s: Any) -> dict[int, tuple[Any, ...]]:
    cols = [np.frombuffer(getattr(s, name), dtype) for name, dtype in (
        ("bucket", "<i8"), ("min_steps", "<i8"), ("min_values", "<f8"), ("max_steps", "<i8"),
        ("max_values", "<f8"), ("counts", "<i8"))]
    out: dict[int, tuple[Any, ...]] = {}
    for i, lo_s, lo_v, hi_s, hi_v, c in zip(*cols, strict=True):
        nan = np.isnan(lo_v)
        out[int(i)] = (0 if nan else int(lo_s), float(lo_v), 0 if nan else int(hi_s), float(hi_v), int(c))
    return out


def _same(a: dict[int, tuple[Any, ...]], b: dict[int, tuple[Any, ...]]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert repr(a[k]) == repr(b[k]), k  # repr: NaN equals NaN


@pytest.mark.parametrize(("buckets", "lo", "hi"), [(1000, None, None), (7, None, None), (1, None, None),
                                                   (50_000, None, None), (100, 10, 2_000), (3, 0, 0),
                                                   (100, 0, 4_999), (5, -1_000, 3_999), (51, None, None)])
def test_one_run_keeps_min_and_max_of_every_bucket(env: Env, buckets: int, lo: int | None, hi: int | None) -> None:
    p = env.series[RUNS[0], SPIKY]
    req = query_pb2.GetMetricBucketsRequest(run_ids=[RUNS[0]], key=SPIKY, buckets=buckets)
    if lo is not None:
        req.min_step, req.max_step = lo, hi
    got = env.stub.GetMetricBuckets(req)
    b_lo = int(p.steps.min()) if lo is None else lo
    b_hi = int(p.steps.max()) if hi is None else hi
    assert (got.min_step, got.max_step, got.buckets) == (b_lo, b_hi, buckets)
    [s] = got.series
    _same(got_buckets(s), expected_buckets(p, buckets, b_lo, b_hi))
    if lo is None:
        assert sum(np.frombuffer(s.counts, "<i8")) == len(p.steps)
    if lo is None and buckets >= 1000:  # fine buckets: ±inf cannot hide the spikes
        # No spike is lost: the ±1e6 points are some buckets' max or min.
        assert np.count_nonzero(np.frombuffer(s.max_values, "<f8") == 1e6) >= 1
        assert np.count_nonzero(np.frombuffer(s.min_values, "<f8") == -1e6) >= 1


@pytest.mark.parametrize(("lo", "hi", "n", "given", "level"), [
    (0, 4_999, 100, (True, True), 10),  # buckets of 50 steps from 0: cells of 10
    (-1_000, 3_999, 5, (True, True), 1_000),  # buckets of 1,000 steps: the coarse cells
    (-100, 4_999, 51, (False, False), 10),  # bounds from the data need not fall on cells
    (-100, 4_999, 51, (True, True), 10),
    (-95, 4_999, 51, (True, False), 0),  # a given bound inside a cell: points beyond it count
    (0, 999_999, 1_000, (False, False), 1_000),  # the benchmark's 1M-point series
    (0, 9_999, 1_000, (False, False), 10),  # the benchmark's chart
    (-100, 4_999, 1_000, (False, False), 0),  # buckets of 5.1 steps: points
    (3, 3, 1, (False, False), 1_000),  # one bucket: any cell lies inside it
])
def test_rollup_level_only_when_every_bucket_is_whole_cells(
        lo: int, hi: int, n: int, given: tuple[bool, bool], level: int) -> None:
    assert rollup_level(lo, hi, n, *given) == level


def test_chart_of_a_hundred_runs_shares_one_step_range(env: Env) -> None:
    runs = list(reversed(RUNS[1:101]))
    got = env.stub.GetMetricBuckets(query_pb2.GetMetricBucketsRequest(run_ids=runs, key="loss", buckets=40))
    lo = min(int(env.series[r, "loss"].steps.min()) for r in runs)
    hi = max(int(env.series[r, "loss"].steps.max()) for r in runs)
    assert (got.min_step, got.max_step) == (lo, hi)
    assert [s.run_id for s in got.series] == runs  # the order asked
    for s in got.series:
        _same(got_buckets(s), expected_buckets(env.series[s.run_id, "loss"], 40, lo, hi))


def test_runs_without_points_are_absent(env: Env) -> None:
    got = env.stub.GetMetricBuckets(query_pb2.GetMetricBucketsRequest(run_ids=["nope", RUNS[5]], key="loss"))
    assert [s.run_id for s in got.series] == [RUNS[5]]
    assert got.buckets == 1000
    empty = env.stub.GetMetricBuckets(query_pb2.GetMetricBucketsRequest(run_ids=["nope"], key="loss"))
    assert list(empty.series) == []


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.mark.parametrize("buckets", [1000, 7, 100_000])
@pytest.mark.parametrize(("lo", "hi"), [(INT64_MIN, INT64_MAX), (INT64_MIN, None), (None, INT64_MAX),
                                        (INT64_MIN, -1), (-(2**62) - 1, 2**62)])
def test_step_range_as_wide_as_int64(env: Env, buckets: int, lo: int | None, hi: int | None) -> None:
    """A width hi - lo + 1 past Int64 (up to 2**64) is bucketed exactly, not divided by a wrapped zero."""
    p = env.series[RUNS[0], SPIKY]
    req = query_pb2.GetMetricBucketsRequest(run_ids=[RUNS[0]], key=SPIKY, buckets=buckets)
    if lo is not None:
        req.min_step = lo
    if hi is not None:
        req.max_step = hi
    got = env.stub.GetMetricBuckets(req)
    b_lo = int(p.steps.min()) if lo is None else lo
    b_hi = int(p.steps.max()) if hi is None else hi
    assert (got.min_step, got.max_step) == (b_lo, b_hi)
    [s] = got.series
    assert all(0 <= b < buckets for b in np.frombuffer(s.bucket, "<i8"))
    _same(got_buckets(s), expected_buckets(p, buckets, b_lo, b_hi))


@pytest.mark.parametrize("store_url", ["chdb", "http"], indirect=True)
def test_steps_at_both_ends_of_int64(store: Store) -> None:
    """Bounds found from the data span all of int64 (width 2**64), on each deployment."""
    steps = np.array([INT64_MIN, INT64_MIN + 1, -1, 0, INT64_MAX - 1, INT64_MAX], dtype=np.int64)
    pts = Points(steps, np.arange(6, dtype=np.int64), np.arange(6, dtype=np.float64))
    _insert(store, ["wide"], "loss", [pts])
    charts = MetricCharts(store, QuerySettings())
    for n, lo, hi in ((1000, None, None), (3, None, None), (2, INT64_MIN, None), (7, None, INT64_MAX)):
        got = charts.buckets(BucketRequest(("wide",), "loss", buckets=n, min_step=lo, max_step=hi))
        assert (got.lo, got.hi) == (INT64_MIN, INT64_MAX)
        [s] = got.series
        _same({int(b): (int(a), float(v), int(c), float(w), int(k)) for b, a, v, c, w, k in zip(
            s.bucket, s.min_step, s.min_value, s.max_step, s.max_value, s.count, strict=True)},
            expected_buckets(pts, n, INT64_MIN, INT64_MAX))
    with pytest.raises(InvalidArgument, match=r"min_step: .* outside the int64 range"):
        charts.buckets(BucketRequest(("wide",), "loss", min_step=INT64_MIN - 1))


@pytest.mark.parametrize(("lo", "hi"), [(INT64_MIN, INT64_MIN), (INT64_MAX, INT64_MAX), (10**6, 10**6 + 5),
                                        (-5_000, -1_000)])
def test_a_given_step_range_without_points_has_no_series(env: Env, lo: int, hi: int) -> None:
    got = env.stub.GetMetricBuckets(query_pb2.GetMetricBucketsRequest(
        run_ids=[RUNS[0]], key=SPIKY, buckets=10, min_step=lo, max_step=hi))
    assert (got.min_step, got.max_step, list(got.series)) == (lo, hi, [])


def _steps(first: int, last: int) -> Points:
    steps = np.arange(first, last + 1, dtype=np.int64)
    return Points(steps, steps + 1_700_000_000_000, np.sin(steps.astype(np.float64)))


@pytest.mark.parametrize(("first", "last", "buckets", "lo", "hi"), [
    (0, 999, 10, None, None),  # buckets of whole cells (g=10): the rollup
    (0, 999, 7, None, None),  # buckets of 142.9 steps: the points
    (0, 999, 10, 0, None),  # one bound given: the other found from the points
    (0, 999, 10, None, 999),
])
def test_points_logged_between_the_two_reads_stay_out_of_the_chart(
        store: Store, monkeypatch: pytest.MonkeyPatch, first: int, last: int, buckets: int,
        lo: int | None, hi: int | None) -> None:
    """The step range is found by a first read; points logged before the second read lie outside it
    and are left out (found bounds on cell boundaries here: see the next test otherwise)."""
    old = _steps(first, last)
    _insert(store, ["live"], "loss", [old])
    read_rows = store.query_rows
    reads = []

    def then_log_more(*args: Any, **kwargs: Any) -> Any:
        rows = read_rows(*args, **kwargs)
        if not reads:  # right after the read that found the step range: the run logs on
            _insert(store, ["live", "live"], "loss", [_steps(last + 1, last + 600), _steps(first - 600, first - 1)])
        reads.append(rows)
        return rows

    monkeypatch.setattr(store, "query_rows", then_log_more)
    got = MetricCharts(store, QuerySettings()).buckets(
        BucketRequest(("live",), "loss", buckets=buckets, min_step=lo, max_step=hi))
    assert len(reads) == 1 and (got.lo, got.hi) == (first, last)
    [s] = got.series
    assert s.bucket.min() >= 0 and s.bucket.max() < buckets, s.bucket
    assert int(s.count.sum()) == len(old.steps)
    assert first <= min(s.min_step.min(), s.max_step.min()) and max(s.min_step.max(), s.max_step.max()) <= last
    expected = expected_buckets(old, buckets, first, last)
    _same({int(b): (int(a), float(v), int(c), float(w), int(n)) for b, a, v, c, w, n in zip(
        s.bucket, s.min_step, s.min_value, s.max_step, s.max_value, s.count, strict=True)}, expected)


def test_points_logged_between_the_reads_stay_in_the_buckets_when_an_edge_cell_reaches_past_the_range(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found bounds inside cells of 1,000 (steps 5..1,994, 2 buckets): the rollup is kept, so the edge
    cells may count points logged since the range was read, in the edge buckets, never outside 0..N-1."""
    old = _steps(5, 1_994)
    _insert(store, ["live"], "loss", [old])
    read_rows = store.query_rows

    def then_log_more(*args: Any, **kwargs: Any) -> Any:
        rows = read_rows(*args, **kwargs)
        monkeypatch.setattr(store, "query_rows", read_rows)
        _insert(store, ["live", "live"], "loss", [_steps(1_995, 2_594), _steps(-595, 4)])
        return rows

    monkeypatch.setattr(store, "query_rows", then_log_more)
    got = MetricCharts(store, QuerySettings()).buckets(BucketRequest(("live",), "loss", buckets=2))
    assert (got.lo, got.hi) == (5, 1_994)
    [s] = got.series
    assert sorted(s.bucket.tolist()) == [0, 1]
    assert int(s.count.sum()) == len(old.steps) + 5 + 5  # steps 0..4 and 1,995..1,999 share the edge cells


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"run_ids": RUNS, "key": "loss"}, "at most 100"),
    ({"run_ids": [], "key": "loss"}, "run_ids"),
    ({"run_ids": [""], "key": "loss"}, "run_ids"),
    ({"run_ids": ["a"], "key": ""}, "key"),
    ({"run_ids": ["a"], "key": "loss", "buckets": -1}, "buckets"),
    ({"run_ids": ["a"], "key": "loss", "buckets": 100_001}, "buckets"),
    ({"run_ids": ["a"], "key": "loss", "min_step": 5, "max_step": 4}, "greater than"),
])
def test_bucket_requests_out_of_range(env: Env, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        env.stub.GetMetricBuckets(query_pb2.GetMetricBucketsRequest(**kwargs))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.details()


def _expected_long(env: Env, runs: list[str], keys: list[str]) -> list[tuple[Any, ...]]:
    rows = [(r, k, int(s), int(t), float(v)) for (r, k), p in env.series.items() if r in runs and k in keys
            for s, t, v in zip(p.steps, p.timestamps, p.values, strict=True)]
    return sorted(rows, key=lambda x: (x[0], x[1], x[2], x[3], np.isnan(x[4]), 0.0 if np.isnan(x[4]) else x[4]))


def test_export_round_trips_runs_by_keys_as_arrow(env: Env) -> None:
    runs = [RUNS[0], RUNS[3], RUNS[7]]
    got = env.stub.ExportMetrics(query_pb2.ExportMetricsRequest(run_ids=runs))
    table = pa.ipc.open_stream(got.arrow_stream).read_all()
    assert table.column_names == ["run_id", "key", "step", "timestamp", "value"]
    assert table.schema.field("value").type == pa.float64() and table.schema.field("step").type == pa.int64()
    expected = _expected_long(env, runs, ["loss", SPIKY])
    assert got.rows == table.num_rows == len(expected)
    assert repr(list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))) == repr(expected)
    only = env.stub.ExportMetrics(query_pb2.ExportMetricsRequest(run_ids=runs, keys=["loss"], min_step=0, max_step=99))
    rows = pa.ipc.open_stream(only.arrow_stream).read_all().to_pylist()
    assert {r["key"] for r in rows} == {"loss"} and all(0 <= r["step"] <= 99 for r in rows)
    assert len(rows) == len([x for x in _expected_long(env, runs, ["loss"]) if 0 <= x[2] <= 99])
