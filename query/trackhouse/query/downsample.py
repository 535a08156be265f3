"""Metric history for charts: downsampling to buckets that keep the extremes, and long-format export.

Owns two reads of the `metrics` table, both done inside ClickHouse so the
server never moves a million points through Python:

- `buckets`: one key of 1..MAX_CHART_RUNS runs cut into N equal step ranges
  over the runs' common step range (so the buckets of every run line up on
  one chart). Per bucket: the smallest value and a step where it occurs, the
  greatest value and a step where it occurs, and the number of points. A spike
  inside a bucket is therefore always kept: it is that bucket's min or max.
  NaN points are counted but never a min or max; ±inf are numbers.
  Bucket i holds the steps s with floor((s - lo) * N / (hi - lo + 1)) == i.
  Empty buckets are absent. A bound not given is found by a first read; the
  second read is bounded to [lo, hi] all the same, so points logged between
  the two reads never fall outside buckets 0..N-1. Any int64 bounds work:
  hi - lo + 1 reaches 2**64, so wide ranges are bucketed in Int128.
- `export`: the raw points of many runs × keys as one Arrow table in long
  format (run_id, key, step, timestamp, value), ordered by run, key, step,
  timestamp, value; bounded by a row budget so one request cannot exhaust memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trackhouse.proto.rules import INT64_MAX, INT64_MIN
from trackhouse.query.errors import InvalidArgument
from trackhouse.query.history import step_range
from trackhouse.query.settings import QuerySettings
from trackhouse.store import Store
from trackhouse.store.reads import Arrow, Rows, Steps
from trackhouse.store.schema import MAX_KEY, MIN_KEY, ROLLUP_LEVELS, cell_of, decode_step, decode_value

MAX_CHART_RUNS = 100
MAX_BUCKETS = 100_000

I64 = np.ndarray[Any, np.dtype[np.int64]]
F64 = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True)
class BucketRequest:
    run_ids: tuple[str, ...]
    key: str
    buckets: int = 1000
    min_step: int | None = None
    max_step: int | None = None


@dataclass(frozen=True)
class BucketSeries:
    """One run's buckets, in bucket order; arrays of equal length."""

    run_id: str
    bucket: I64
    min_step: I64
    min_value: F64
    max_step: I64
    max_value: F64
    count: I64


@dataclass(frozen=True)
class Buckets:
    """Every asked run that has points in range, in the order asked; [lo, hi] is the bucketed step range."""

    series: list[BucketSeries]
    lo: int
    hi: int


@dataclass(frozen=True)
class ExportRequest:
    run_ids: tuple[str, ...]
    keys: tuple[str, ...] = ()  # empty: every key
    min_step: int | None = None
    max_step: int | None = None


def _range_where(run_ids: tuple[str, ...], min_step: int | None, max_step: int | None) -> tuple[str, dict[str, Any]]:
    for name, bound in (("min_step", min_step), ("max_step", max_step)):
        if bound is not None and not INT64_MIN <= bound <= INT64_MAX:
            raise InvalidArgument(f"{name}: {bound} is outside the int64 range")
    params: dict[str, Any] = {"runs": list(run_ids)}
    where = ["run_id IN {runs:Array(String)}"]
    step_range(where, params, min_step, max_step)
    return " AND ".join(where), params


def rollup_level(lo: int, hi: int, n: int, lo_given: bool, hi_given: bool) -> int:
    """The widest rollup cell whose boundaries every bucket boundary falls on (0: none).

    Bucket i starts at lo + ceil(i * width / n). Cells are [c*g, c*g + g). A bound the
    caller gave must be a cell boundary too (points beyond it exist and must not count);
    a bound found from the data need not be: only points logged since that read lie
    beyond it, and the cell at that end may count them (in the bucket at that end, never
    outside 0..N-1). Requiring it too would read every raw point for most live charts,
    whose last step is rarely a multiple of a cell.
    """
    width = hi - lo + 1
    if width * n >= 2**62 or lo < -(2**62):  # cells use Int64 arithmetic (cell * g, (step - lo) * n)
        return 0
    i = np.arange(1, n, dtype=np.int64)
    starts = lo - (-(i * width) // n)
    for g in reversed(ROLLUP_LEVELS):
        if (lo_given and lo % g) or (hi_given and (hi + 1) % g):
            continue
        if not np.any(starts % g):
            return g
    return 0


def _bucket_of(step: str, int64: bool) -> str:
    """floor((step - lo) * N / width) with bound parameters; Int64 when it cannot overflow."""
    if int64:
        return f"intDiv(({step} - {{b_lo:Int64}}) * {{b_n:Int64}}, {{b_width:Int64}})"
    # Int128 arithmetic: (step - lo) * N < 2**81 and width <= 2**64, whatever the int64 bounds.
    return f"toInt64(intDiv((toInt128({step}) - {{b_lo:Int64}}) * {{b_n:Int64}}, {{b_width:Int128}}))"


def _bucket_select(bucket: str, kmin: str, kmax: str, numbers: str, count: str, source: str) -> str:
    """Per (run, bucket): the packed extremes (schema.MIN_KEY/MAX_KEY) decoded into steps and values."""
    return (
        f"SELECT run_id, b, {decode_step('kmin', False)} AS min_step, {decode_value('kmin')} AS min_value, "
        f"{decode_step('kmax', True)} AS max_step, {decode_value('kmax')} AS max_value, numbers, count FROM ("
        f"SELECT run_id, {bucket} AS b, {kmin} AS kmin, {kmax} AS kmax, {numbers} AS numbers, {count} AS count "
        f"FROM {source} GROUP BY run_id, b) ORDER BY run_id, b"
    )


def _cells_where(where: str, g: int) -> str:
    """The step bounds of `where` as cell bounds (cells lie wholly inside, `rollup_level`)."""
    return (where.replace("step >= {lo:Int64}", f"cell >= {cell_of('{lo:Int64}', g)}")
            .replace("step <= {hi:Int64}", f"cell <= {cell_of('{hi:Int64}', g)}"))


def _key_where(run_ids: tuple[str, ...], key: str, lo: int | None, hi: int | None) -> tuple[str, dict[str, Any]]:
    where, params = _range_where(run_ids, lo, hi)
    params["key"] = key
    return where + " AND key = {key:String}", params


def _check_runs(run_ids: tuple[str, ...], limit: int) -> tuple[str, ...]:
    ids = tuple(dict.fromkeys(run_ids))  # keep the order asked, drop repeats
    if not ids or not all(ids):
        raise InvalidArgument("run_ids: at least one, and none empty")
    if len(ids) > limit:
        raise InvalidArgument(f"run_ids: {len(ids)} runs, at most {limit} per request")
    return ids


class MetricCharts:
    def __init__(self, store: Store, settings: QuerySettings) -> None:
        self._store = store
        self._settings = settings

    def buckets(self, req: BucketRequest) -> Buckets:
        """Downsample one key of up to MAX_CHART_RUNS runs (blocking; run it on the store's thread)."""
        return self._store.run(self._buckets(req))

    async def abuckets(self, req: BucketRequest) -> Buckets:
        return await self._store.arun(self._buckets(req))

    def _buckets(self, req: BucketRequest) -> Steps[Buckets]:
        ids = _check_runs(req.run_ids, MAX_CHART_RUNS)
        if not req.key:
            raise InvalidArgument("key: required")
        if not 0 < req.buckets <= MAX_BUCKETS:
            raise InvalidArgument(f"buckets: {req.buckets} is outside 1..{MAX_BUCKETS}")
        where, params = _key_where(ids, req.key, req.min_step, req.max_step)
        lo, hi = req.min_step, req.max_step
        if lo is None or hi is None:
            # Without bounds the coarsest cells know the step range; with one, only points do.
            table, cond = ((self._store.t("metric_rollup"), f"{where} AND g = {ROLLUP_LEVELS[-1]}")
                           if lo is None and hi is None else (self._store.t("metrics"), where))
            found = (yield Rows(
                f"SELECT min(min_step), max(max_step), count() FROM {table} WHERE {cond}"
                if lo is None and hi is None else
                f"SELECT min(step), max(step), count() FROM {table} WHERE {cond}", params))[0]
            if not found[2]:
                return Buckets([], lo or 0, hi or 0)
            lo = int(found[0]) if lo is None else lo
            hi = int(found[1]) if hi is None else hi
            # Points logged from now on may lie beyond [lo, hi]: the buckets of them would too.
            where, params = _key_where(ids, req.key, lo, hi)
        if hi < lo:
            raise InvalidArgument(f"min_step {lo} is greater than max_step {hi}")
        params.update(b_lo=lo, b_width=hi - lo + 1, b_n=req.buckets)
        g = rollup_level(lo, hi, req.buckets, req.min_step is not None, req.max_step is not None)
        sql = self._cells_sql(where, g) if g else self._points_sql(where, lo, hi, req.buckets)
        return Buckets(_split((yield Arrow(sql, params)), ids), lo, hi)

    def _points_sql(self, where: str, lo: int, hi: int, n: int) -> str:
        """Buckets from the points themselves."""
        numbers = "NOT isNaN(value)"
        return _bucket_select(
            _bucket_of("step", (hi - lo + 1) * n < 2**63),
            f"minIf({MIN_KEY}, {numbers})", f"maxIf({MAX_KEY}, {numbers})",
            f"countIf({numbers})", "count()", f"{self._store.t('metrics')} WHERE {where}")

    def _cells_sql(self, where: str, g: int) -> str:
        """Buckets from cells of `g` steps, each inside one bucket (`rollup_level`)."""
        # A cell's steps in range share one bucket: that of its first step in range.
        first = f"greatest(cell * {g}, {{b_lo:Int64}})"
        return _bucket_select(
            _bucket_of(first, True), "min(min_key)", "max(max_key)", "sum(numbers)", "sum(count)",
            f"{self._store.t('metric_rollup')} WHERE {_cells_where(where, g)} AND g = {g}")

    def export(self, req: ExportRequest) -> Any:
        """Raw points of runs × keys as one pyarrow Table in long format (blocking)."""
        return self._store.run(self._export(req))

    async def aexport(self, req: ExportRequest) -> Any:
        return await self._store.arun(self._export(req))

    def _export(self, req: ExportRequest) -> Steps[Any]:
        ids = _check_runs(req.run_ids, self._settings.max_export_runs)
        where, params = _range_where(ids, req.min_step, req.max_step)
        if req.keys:
            where += " AND key IN {keys:Array(String)}"
            params["keys"] = list(req.keys)
        budget = self._settings.max_export_points
        table = yield Arrow(
            f"SELECT run_id, toString(key) AS key, step, timestamp, value FROM {self._store.t('metrics')} "
            f"WHERE {where} ORDER BY run_id, key, step, timestamp, value LIMIT {int(budget) + 1}",
            params,
        )
        if table.num_rows > budget:
            raise InvalidArgument(
                f"export: more than {budget} points; ask for fewer runs or keys, or a step range")
        return table


def _split(table: Any, ids: tuple[str, ...]) -> list[BucketSeries]:
    """Cut the grouped rows (sorted by run_id) into one series per run, in the order asked."""
    runs = table.column("run_id").to_pylist()
    if not runs:  # a given step range without points
        return []
    cols = {name: table.column(name).to_numpy() for name in
            ("b", "min_step", "min_value", "max_step", "max_value", "numbers", "count")}
    nothing = cols["numbers"] == 0  # a bucket of NaNs only: no min, no max
    cols["min_value"] = np.where(nothing, np.nan, cols["min_value"])
    cols["max_value"] = np.where(nothing, np.nan, cols["max_value"])
    cols["min_step"] = np.where(nothing, 0, cols["min_step"])
    cols["max_step"] = np.where(nothing, 0, cols["max_step"])
    # Rows are sorted by run_id: each run is one slice [start, end).
    starts = [i for i in range(len(runs)) if i == 0 or runs[i] != runs[i - 1]]
    slices = {runs[a]: slice(a, b) for a, b in zip(starts, [*starts[1:], len(runs)], strict=True)}
    return [
        BucketSeries(
            run_id, cols["b"][rows].astype(np.int64), cols["min_step"][rows].astype(np.int64),
            cols["min_value"][rows].astype(np.float64), cols["max_step"][rows].astype(np.int64),
            cols["max_value"][rows].astype(np.float64), cols["count"][rows].astype(np.int64),
        )
        for run_id in ids if (rows := slices.get(run_id)) is not None
    ]
