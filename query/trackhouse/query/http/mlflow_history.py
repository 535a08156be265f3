"""MLflow's metric-history endpoints (metrics/get-history, metrics/get-history-bulk-interval),
over the query domain's `MetricHistory`; `MlflowApi` routes them here.

get-history without max_results answers the whole series, as MLflow does (its RestStore
makes one call and never follows next_page_token). It is written page after page as a
`StreamedJson`, so the server holds one page (QuerySettings.history_page points) at a
time, however long the series. The first page is read before the answer starts, so a
bad request is still MLflow's error body. With max_results it is one page and a token.

get-history-bulk-interval is `MetricHistory.sample`: MLflow 3's per-run sampling, done
in the store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import orjson

from trackhouse.query.history import HistoryPage, HistoryRequest, MetricHistory, SampleRequest
from trackhouse.query.http import convert
from trackhouse.query.http.convert import Body, body_run_id, integer, strings, text
from trackhouse.query.http.errors import invalid
from trackhouse.query.scope import allowed_experiments

JSON = dict[str, Any]

MAX_RUNS_BULK_HISTORY = 100
MAX_RESULTS_PER_RUN = 2500


@dataclass(frozen=True)
class StreamedJson:
    """A JSON answer sent as it is made: `chunks` are its bytes; the routes stream them."""

    chunks: AsyncIterator[bytes]


class MlflowHistories:
    def __init__(self, history: MetricHistory) -> None:
        self._history = history

    async def get_metric_history(self, body: Body) -> JSON | StreamedJson:
        key = text(body, "metric_key", required=True)
        size = integer(body, "max_results")
        if size is not None and size <= 0:
            raise invalid(f"Invalid value {size} for parameter 'max_results' supplied. It must be a positive integer.")
        # At most the server's page: MLflow's client asks 25,000 a page and follows the token.
        limit = min(size, self._history.max_page) if size else 0
        req = HistoryRequest(run_id=body_run_id(body), key=key, max_results=limit,
                             page_token=text(body, "page_token"), allowed_experiments=allowed_experiments())
        page = await self._history.apage(req)
        if size is None and page.next_page_token:
            return StreamedJson(self._whole_series(req, page))
        out: JSON = {"metrics": convert.points(key, page.steps, page.timestamps, page.values)}
        if page.next_page_token:
            out["next_page_token"] = page.next_page_token
        return out

    async def _whole_series(self, req: HistoryRequest, page: HistoryPage) -> AsyncIterator[bytes]:
        """{"metrics": [...]}: `page` and every page after it, in page order, one page in memory."""
        yield b'{"metrics":['
        comma = b""
        while True:
            if len(page.steps):
                points = convert.points(req.key, page.steps, page.timestamps, page.values)
                yield comma + orjson.dumps(points)[1:-1]  # the items, without the list's brackets
                comma = b","
            if not page.next_page_token:
                break
            page = await self._history.apage(replace(req, page_token=page.next_page_token))
        yield b"]}"

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
        sampled = await self._history.asample(SampleRequest(
            tuple(run_ids), key, limit, start, end, allowed_experiments()))
        out = []
        for run_id in run_ids:  # in the order asked, a run asked twice twice, as MLflow
            if (p := sampled.get(run_id)) is not None:
                out += convert.points(key, p.steps, p.timestamps, p.values, run_id)
        return {"metrics": out}
