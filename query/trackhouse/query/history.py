"""Metric history: the raw points of one series, in pages, as columns; and evenly spread samples of runs.

Points come in (step, timestamp, value) order from the metrics table, whose
sort key keeps one run's series contiguous. Pages are keyset cursors on
(step, timestamp) plus how many points of that exact (step, timestamp) the
previous pages already returned, so equal points are never split or repeated.
A page token belongs to one run, key and step range, not to a page size: the
next page may ask for another max_results (as MLflow's offset tokens allow).

`sample` is MLflow's get-history-bulk-interval (SqlAlchemyStore, MLflow 3): per
run, at most max_results points evenly spread over its points in range, the
last always kept (and the first, when max_results > 1); chosen inside the store
in one read, so only the chosen points reach Python, however long the runs are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trackhouse.query.errors import InvalidArgument, NotFound
from trackhouse.query.settings import QuerySettings
from trackhouse.query.tokens import TokenCodec, fingerprint
from trackhouse.store import Store
from trackhouse.store.reads import Arrow, Steps


@dataclass(frozen=True)
class HistoryRequest:
    run_id: str
    key: str
    min_step: int | None = None
    max_step: int | None = None
    max_results: int = 0
    page_token: str = ""
    # The caller's experiments (None: all): a run outside them is NOT_FOUND, as if absent.
    allowed_experiments: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SampleRequest:
    run_ids: tuple[str, ...]
    key: str
    max_results: int  # points per run
    min_step: int | None = None
    max_step: int | None = None
    allowed_experiments: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Points:
    """Points of one run in (step, timestamp, value) order; arrays of equal length."""

    steps: np.ndarray[Any, np.dtype[np.int64]]
    timestamps: np.ndarray[Any, np.dtype[np.int64]]
    values: np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True)
class HistoryPage(Points):
    next_page_token: str


# MLflow's sampling, as a condition on a point's index i (from 0) among a run's n points in
# range, k = max_results. MLflow numbers the points into NTILE(k) tiles (the first n % k tiles
# one point longer than the rest, q = n / k points), keeps the first point of every tile, then
# puts the last point in place of the last one kept (k points, first and last included; k = 1:
# the last point only). Tile t starts at t * q + min(t, r), r = n % k. greatest(q, 1) keeps
# the modulo defined where n <= k has already decided.
_KEEP = (
    "n <= {k:Int64} OR i = n - 1 OR (i != ({k:Int64} - 1) * intDiv(n, {k:Int64}) + n % {k:Int64} AND "
    "if(i < (n % {k:Int64}) * (intDiv(n, {k:Int64}) + 1), i % (intDiv(n, {k:Int64}) + 1) = 0, "
    "(i - n % {k:Int64}) % greatest(intDiv(n, {k:Int64}), 1) = 0))"
)


class MetricHistory:
    def __init__(self, store: Store, tokens: TokenCodec, settings: QuerySettings) -> None:
        self._store = store
        self._tokens = tokens
        self._settings = settings

    @property
    def max_page(self) -> int:
        """The most points a page may hold (TRACKHOUSE_QUERY_MAX_HISTORY_PAGE)."""
        return self._settings.max_history_page

    def page(self, req: HistoryRequest) -> HistoryPage:
        """One page of points (blocking; run it on the store's thread)."""
        return self._store.run(self._page(req))

    async def apage(self, req: HistoryRequest) -> HistoryPage:
        """One page of points, on the store's async client (or its thread pool)."""
        return await self._store.arun(self._page(req))

    def _page(self, req: HistoryRequest) -> Steps[HistoryPage]:
        if not req.run_id or not req.key:
            raise InvalidArgument("run_id and key: both are required")
        limit = req.max_results or self._settings.history_page
        if not 0 < limit <= self._settings.max_history_page:
            raise InvalidArgument(f"max_results: {limit} is outside 1..{self._settings.max_history_page}")
        run = (yield from self._store.runs_steps([req.run_id])).get(req.run_id)
        allowed = req.allowed_experiments
        if run is None or (allowed is not None and run.experiment_id not in allowed):
            raise NotFound(f"run_id: no run {req.run_id!r}")
        # Not the page size: a client may change max_results from one page to the next.
        question = fingerprint(req.run_id, req.key, req.min_step, req.max_step)
        params: dict[str, Any] = {"run": req.run_id, "key": req.key}
        where = ["run_id = {run:String}", "key = {key:String}"]
        step_range(where, params, req.min_step, req.max_step)
        skip = 0
        if req.page_token:
            step, ts, skip = self._tokens.decode(req.page_token, question)
            where.append("(step > {cs:Int64} OR (step = {cs:Int64} AND timestamp >= {ct:Int64}))")
            params.update(cs=int(step), ct=int(ts))
        sql = (f"SELECT step, timestamp, value FROM {self._store.t('metrics')} WHERE {' AND '.join(where)} "
               f"ORDER BY step, timestamp, value LIMIT {int(skip)}, {limit + 1}")
        table = yield Arrow(sql, params)
        steps = table.column("step").to_numpy().astype(np.int64, copy=False)
        tss = table.column("timestamp").to_numpy().astype(np.int64, copy=False)
        values = table.column("value").to_numpy().astype(np.float64, copy=False)
        token = ""
        if len(steps) > limit:
            steps, tss, values = steps[:limit], tss[:limit], values[:limit]
            last_s, last_t = int(steps[-1]), int(tss[-1])
            tied = int(np.count_nonzero((steps == last_s) & (tss == last_t)))
            # Points of the same (step, ts) returned by earlier pages are still to skip.
            if req.page_token and last_s == step and last_t == ts:
                tied += int(skip)
            token = self._tokens.encode(question, [last_s, last_t, tied])
        return HistoryPage(steps, tss, values, token)

    def sample(self, req: SampleRequest) -> dict[str, Points]:
        """Up to max_results points of each run with points in range, by run id (blocking)."""
        return self._store.run(self._sample(req))

    async def asample(self, req: SampleRequest) -> dict[str, Points]:
        return await self._store.arun(self._sample(req))

    def _sample(self, req: SampleRequest) -> Steps[dict[str, Points]]:
        ids = tuple(dict.fromkeys(req.run_ids))
        if not ids or not all(ids) or not req.key:
            raise InvalidArgument("run_ids and key: both are required, and no run id empty")
        if req.max_results < 1:
            raise InvalidArgument(f"max_results: {req.max_results} is not a positive number of points per run")
        runs = yield from self._store.runs_steps(ids)
        allowed = req.allowed_experiments
        for run_id in ids:
            run = runs.get(run_id)
            if run is None or (allowed is not None and run.experiment_id not in allowed):
                raise NotFound(f"run_id: no run {run_id!r}")
        params: dict[str, Any] = {"runs": list(ids), "key": req.key, "k": req.max_results}
        where = ["run_id IN {runs:Array(String)}", "key = {key:String}"]
        step_range(where, params, req.min_step, req.max_step)
        table = yield Arrow(
            "SELECT run_id, step, timestamp, value FROM ("
            "SELECT run_id, step, timestamp, value, toInt64(row_number() OVER w) - 1 AS i, "
            "toInt64(count() OVER (PARTITION BY run_id)) AS n "
            f"FROM {self._store.t('metrics')} WHERE {' AND '.join(where)} "
            "WINDOW w AS (PARTITION BY run_id ORDER BY step, timestamp, value)"
            f") WHERE {_KEEP} ORDER BY run_id, i",
            params,
        )
        return _by_run(table)


def _by_run(table: Any) -> dict[str, Points]:
    """Cut rows sorted by run_id into one Points per run."""
    runs = table.column("run_id").to_pylist()
    steps = table.column("step").to_numpy().astype(np.int64, copy=False)
    tss = table.column("timestamp").to_numpy().astype(np.int64, copy=False)
    values = table.column("value").to_numpy().astype(np.float64, copy=False)
    starts = [i for i in range(len(runs)) if i == 0 or runs[i] != runs[i - 1]]
    return {runs[a]: Points(steps[a:b], tss[a:b], values[a:b])
            for a, b in zip(starts, [*starts[1:], len(runs)], strict=True)}


def step_range(where: list[str], params: dict[str, Any], low: int | None, high: int | None) -> None:
    """Add the bounds a request gives its steps (bound parameters) to `where` and `params` (history,
    samples and charts)."""
    if low is not None:
        where.append("step >= {lo:Int64}")
        params["lo"] = low
    if high is not None:
        where.append("step <= {hi:Int64}")
        params["hi"] = high
