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
  Empty buckets are absent.
- `export`: the raw points of many runs × keys as one Arrow table in long
  format (run_id, key, step, timestamp, value), ordered by run, key, step,
  timestamp, value; bounded by a row budget so one request cannot exhaust memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trackhouse.query.errors import InvalidArgument
from trackhouse.query.settings import QuerySettings
from trackhouse.store import Store

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
    params: dict[str, Any] = {"runs": list(run_ids)}
    where = ["run_id IN {runs:Array(String)}"]
    if min_step is not None:
        where.append("step >= {lo:Int64}")
        params["lo"] = min_step
    if max_step is not None:
        where.append("step <= {hi:Int64}")
        params["hi"] = max_step
    return " AND ".join(where), params


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
        ids = _check_runs(req.run_ids, MAX_CHART_RUNS)
        if not req.key:
            raise InvalidArgument("key: required")
        if not 0 < req.buckets <= MAX_BUCKETS:
            raise InvalidArgument(f"buckets: {req.buckets} is outside 1..{MAX_BUCKETS}")
        where, params = _range_where(ids, req.min_step, req.max_step)
        where += " AND key = {key:String}"
        params["key"] = req.key
        metrics = self._store.t("metrics")
        lo, hi = req.min_step, req.max_step
        if lo is None or hi is None:
            found = self._store.query_rows(
                f"SELECT min(step), max(step), count() FROM {metrics} WHERE {where}", params)[0]
            if not found[2]:
                return Buckets([], lo or 0, hi or 0)
            lo = int(found[0]) if lo is None else lo
            hi = int(found[1]) if hi is None else hi
        if hi < lo:
            raise InvalidArgument(f"min_step {lo} is greater than max_step {hi}")
        params.update(b_lo=lo, b_width=hi - lo + 1, b_n=req.buckets)
        # Int128 arithmetic: (step - lo) * N cannot overflow whatever the steps.
        bucket = ("toInt64(intDiv((toInt128(step) - {b_lo:Int64}) * {b_n:Int64}, "
                  "toInt128({b_width:Int64})))")
        numbers = "NOT isNaN(value)"
        table = self._store.query_arrow(
            f"SELECT run_id, {bucket} AS b, "
            f"argMinIf(step, (value, step), {numbers}) AS min_step, minIf(value, {numbers}) AS min_value, "
            f"argMaxIf(step, (value, -step), {numbers}) AS max_step, maxIf(value, {numbers}) AS max_value, "
            f"countIf({numbers}) AS numbers, count() AS count "
            f"FROM {metrics} WHERE {where} GROUP BY run_id, b ORDER BY run_id, b",
            params,
        )
        return Buckets(_split(table, ids), lo, hi)

    def export(self, req: ExportRequest) -> Any:
        """Raw points of runs × keys as one pyarrow Table in long format (blocking)."""
        ids = _check_runs(req.run_ids, self._settings.max_export_runs)
        where, params = _range_where(ids, req.min_step, req.max_step)
        if req.keys:
            where += " AND key IN {keys:Array(String)}"
            params["keys"] = list(req.keys)
        budget = self._settings.max_export_points
        table = self._store.query_arrow(
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
    runs = np.asarray(table.column("run_id").to_pylist(), dtype=object)
    cols = {name: table.column(name).to_numpy() for name in
            ("b", "min_step", "min_value", "max_step", "max_value", "numbers", "count")}
    nothing = cols["numbers"] == 0  # a bucket of NaNs only: no min, no max
    cols["min_value"] = np.where(nothing, np.nan, cols["min_value"])
    cols["max_value"] = np.where(nothing, np.nan, cols["max_value"])
    series = []
    for run_id in ids:
        rows = runs == run_id
        if not rows.any():
            continue
        series.append(BucketSeries(
            run_id, cols["b"][rows].astype(np.int64), cols["min_step"][rows].astype(np.int64),
            cols["min_value"][rows].astype(np.float64), cols["max_step"][rows].astype(np.int64),
            cols["max_value"][rows].astype(np.float64), cols["count"][rows].astype(np.int64),
        ))
    return series
