"""Metric history: the raw points of one series, in pages, as columns.

Points come in (step, timestamp, value) order from the metrics table, whose
sort key keeps one run's series contiguous. Pages are keyset cursors on
(step, timestamp) plus how many points of that exact (step, timestamp) the
previous pages already returned, so equal points are never split or repeated.
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
class HistoryPage:
    steps: np.ndarray[Any, np.dtype[np.int64]]
    timestamps: np.ndarray[Any, np.dtype[np.int64]]
    values: np.ndarray[Any, np.dtype[np.float64]]
    next_page_token: str


class MetricHistory:
    def __init__(self, store: Store, tokens: TokenCodec, settings: QuerySettings) -> None:
        self._store = store
        self._tokens = tokens
        self._settings = settings

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
        question = fingerprint(req.run_id, req.key, req.min_step, req.max_step, limit)
        params: dict[str, Any] = {"run": req.run_id, "key": req.key}
        where = ["run_id = {run:String}", "key = {key:String}"]
        if req.min_step is not None:
            where.append("step >= {lo:Int64}")
            params["lo"] = req.min_step
        if req.max_step is not None:
            where.append("step <= {hi:Int64}")
            params["hi"] = req.max_step
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
