"""The read side of ``MemoryTransport``: runs and metric series, answered as the query service answers.

Pure functions over the transport's state (it calls them under its lock):

- ``run_view``: a run as GetRun shows it (its params, tags and latest metrics);
- ``search``: one page of SearchRuns, in the service's order (start time descending,
  then run id ascending: MLflow's tiebreak, a total order), scoped by experiment ids
  and run view; ``total`` when asked;
- ``history_page``: one page of GetMetricHistory, in (step, timestamp, value) order.

Pages are keyset cursors as the service's: a token holds the last row's place and the
question it belongs to (not the page size), so the next page may ask for any size, and a
token of another question, or no token at all, is InvalidArgument. Sizes are the service's
defaults (``QuerySettings``). Filters and ``order_by`` are not implemented: they are refused
(InvalidArgument) rather than answered wrongly.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trackhouse.client.errors import InvalidArgument
from trackhouse.proto.v1 import common_pb2, query_pb2

# The query service's defaults (QuerySettings): runs per page asked for none, and at most.
DEFAULT_MAX_RESULTS, MAX_RESULTS = 1000, 50_000
# Points per history page asked for none, and at most.
HISTORY_PAGE, MAX_HISTORY_PAGE = 25_000, 1_000_000
_VIEWS = {
    common_pb2.ACTIVE_ONLY: (common_pb2.ACTIVE,),
    common_pb2.DELETED_ONLY: (common_pb2.DELETED,),
    common_pb2.ALL: (common_pb2.ACTIVE, common_pb2.DELETED),
}

_Point = tuple[int, int, float]


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, "INVALID_ARGUMENT")


def _token(question: list[Any], cursor: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps([question, cursor]).encode()).decode()


def _cursor(token: str, question: list[Any], types: tuple[type, ...]) -> list[Any]:
    """The cursor in ``token`` when it is a token of ``question``; InvalidArgument otherwise."""
    try:
        asked, cursor = json.loads(base64.urlsafe_b64decode(token.encode()))
        ok = asked == question and [type(c) for c in cursor] == list(types)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise _invalid("page_token: not a page token of this question (malformed, or of another search)")
    return list(cursor)


def run_view(info: common_pb2.RunInfo, params: Mapping[str, str], tags: Mapping[str, str],
             metrics: Mapping[str, Sequence[_Point]]) -> common_pb2.Run:
    latest = []
    for key, series in metrics.items():
        step, ts, value = max(series)
        values = [v for _, _, v in series]
        latest.append(common_pb2.LatestMetric(key=key, value=value, timestamp=ts, step=step,
                                              min_value=min(values), max_value=max(values), count=len(series)))
    return common_pb2.Run(
        info=info, metrics=latest,
        params=[common_pb2.Param(key=k, value=v) for k, v in params.items()],
        tags=[common_pb2.Tag(key=k, value=v) for k, v in tags.items()],
    )  # fmt: skip


def _place(info: common_pb2.RunInfo) -> tuple[int, str]:
    return -info.start_time, info.run_id


def search(request: query_pb2.SearchRunsRequest, runs: Sequence[common_pb2.RunInfo],
           view: Callable[[common_pb2.RunInfo], common_pb2.Run]) -> query_pb2.SearchRunsResponse:
    """One page of the runs in scope, newest first."""
    if request.filter or request.order_by:
        raise _invalid("MemoryTransport.search_runs takes no filter or order_by: test those against a server")
    run_view_type = request.run_view_type or common_pb2.ACTIVE_ONLY
    if run_view_type not in _VIEWS:
        raise _invalid(f"run_view_type: unknown value {request.run_view_type}")
    if not 0 <= request.max_results <= MAX_RESULTS:
        raise _invalid(f"max_results: {request.max_results} is outside 1..{MAX_RESULTS}")
    limit = request.max_results or DEFAULT_MAX_RESULTS
    question = [sorted(request.experiment_ids), run_view_type]
    scope = set(request.experiment_ids)
    matches = sorted((info for info in runs if info.lifecycle_stage in _VIEWS[run_view_type]
                      and (not scope or info.experiment_id in scope)), key=_place)  # fmt: skip
    total = len(matches)
    if request.page_token:
        start_time, run_id = _cursor(request.page_token, question, (int, str))
        matches = [info for info in matches if _place(info) > (-start_time, run_id)]
    page = matches[:limit]
    token = _token(question, [page[-1].start_time, page[-1].run_id]) if len(matches) > limit else ""
    response = query_pb2.SearchRunsResponse(runs=[view(info) for info in page], next_page_token=token)
    if request.include_total:
        response.total = total
    return response


def check_history(request: query_pb2.GetMetricHistoryRequest) -> None:
    """InvalidArgument for a history request the service refuses before it looks for the run."""
    if not request.run_id or not request.key:
        raise _invalid("run_id and key: both are required")
    if not 0 <= request.max_results <= MAX_HISTORY_PAGE:
        raise _invalid(f"max_results: {request.max_results} is outside 1..{MAX_HISTORY_PAGE}")


def history_page(request: query_pb2.GetMetricHistoryRequest, series: Sequence[_Point]) -> query_pb2.MetricHistory:
    """One page of ``series`` in the step range, in (step, timestamp, value) order."""
    low = request.min_step if request.HasField("min_step") else None
    high = request.max_step if request.HasField("max_step") else None
    points = sorted(p for p in series if (low is None or p[0] >= low) and (high is None or p[0] <= high))
    question = [request.run_id, request.key, low, high]
    limit = request.max_results or HISTORY_PAGE
    cursor = None
    if request.page_token:
        step, ts, skip = _cursor(request.page_token, question, (int, int, int))
        cursor = (step, ts)
        # From the cursor's (step, timestamp) on, less the points of it earlier pages returned.
        points = [p for p in points if (p[0], p[1]) >= cursor][skip:]
    page, token = points[:limit], ""
    if len(points) > limit:
        last = (page[-1][0], page[-1][1])
        tied = sum(1 for p in page if (p[0], p[1]) == last) + (skip if last == cursor else 0)
        token = _token(question, [*last, tied])
    steps, times, values = (np.array(c, dtype) for c, dtype in
                            zip(zip(*page, strict=True) if page else ((), (), ()), ("<i8", "<i8", "<f8"),
                                strict=True))  # fmt: skip
    return query_pb2.MetricHistory(run_id=request.run_id, key=request.key, steps=steps.tobytes(),
                                   timestamps=times.tobytes(), values=values.tobytes(), next_page_token=token)
