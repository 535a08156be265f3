"""MLflow's metric-history endpoints (metrics/get-history, metrics/get-history-bulk-interval),
over the query domain's `MetricHistory`; `MlflowApi` routes them here."""

from __future__ import annotations

from typing import Any

import numpy as np

from trackhouse.query.history import HistoryRequest, MetricHistory
from trackhouse.query.http import convert
from trackhouse.query.http.convert import Body, body_run_id, integer, strings, text
from trackhouse.query.http.errors import invalid
from trackhouse.query.scope import allowed_experiments

JSON = dict[str, Any]

MAX_RUNS_BULK_HISTORY = 100
MAX_RESULTS_PER_RUN = 2500
# Points read per run before sampling (QuerySettings.max_history_page's default).
BULK_HISTORY_POINTS = 1_000_000


class MlflowHistories:
    def __init__(self, history: MetricHistory) -> None:
        self._history = history

    async def get_metric_history(self, body: Body) -> JSON:
        key = text(body, "metric_key", required=True)
        page = await self._history.apage(HistoryRequest(
            run_id=body_run_id(body), key=key, max_results=integer(body, "max_results", 0) or 0,
            page_token=text(body, "page_token"), allowed_experiments=allowed_experiments()))
        out: JSON = {"metrics": convert.points(key, page.steps, page.timestamps, page.values)}
        if page.next_page_token:
            out["next_page_token"] = page.next_page_token
        return out

    async def get_metric_history_bulk_interval(self, body: Body) -> JSON:
        run_ids = strings(body, "run_ids")
        key = text(body, "metric_key", required=True)
        if not run_ids:
            raise invalid("Missing value for required parameter 'run_ids'.")
        if len(run_ids) > MAX_RUNS_BULK_HISTORY:
            raise invalid(f"GetMetricHistoryBulkInterval request must specify at most {MAX_RUNS_BULK_HISTORY} "
                          f"run_ids. Received {len(run_ids)} run_ids.")
        limit = integer(body, "max_results", MAX_RESULTS_PER_RUN) or 0
        if not 1 <= limit <= MAX_RESULTS_PER_RUN:
            raise invalid(f"max_results must be between 1 and {MAX_RESULTS_PER_RUN}.")
        start, end = integer(body, "start_step"), integer(body, "end_step")
        if (start is None) != (end is None):
            raise invalid("If either start step or end step are specified, both must be specified.")
        if start is not None and end is not None and start > end:
            raise invalid(f"end_step must be greater than start_step. Found start_step={start} and end_step={end}.")
        allowed = allowed_experiments()
        pages = [await self._history.apage(HistoryRequest(
            run_id=r, key=key, min_step=start, max_step=end, max_results=BULK_HISTORY_POINTS,
            allowed_experiments=allowed)) for r in run_ids]
        # MLflow's sampling: up to max_results steps of the union, evenly spaced, first and last included.
        steps = np.unique(np.concatenate([p.steps for p in pages])) if pages else np.empty(0, np.int64)
        if len(steps) > limit:
            steps = steps[np.unique(np.linspace(0, len(steps) - 1, limit).round().astype(np.int64))]
        out = []
        for run_id, p in zip(run_ids, pages, strict=True):
            keep = np.isin(p.steps, steps)
            out += convert.points(key, p.steps[keep], p.timestamps[keep], p.values[keep], run_id)
        return {"metrics": out}

