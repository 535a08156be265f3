"""Settings of the query service: one frozen value object, read from the environment once.

Every variable (all optional):

    TRACKHOUSE_QUERY_DEFAULT_MAX_RESULTS    runs per search page when none is asked (default 1000, as MLflow)
    TRACKHOUSE_QUERY_MAX_RESULTS            largest page a search may ask for (default 50000, as MLflow)
    TRACKHOUSE_QUERY_HISTORY_PAGE           points per history page when none is asked (default 25000)
    TRACKHOUSE_QUERY_MAX_HISTORY_PAGE       largest history page (default 1000000)
    TRACKHOUSE_QUERY_MAX_FILTER_LENGTH      longest filter string accepted (default 10000 characters)
    TRACKHOUSE_QUERY_SEARCH_WINDOW          runs in the first window of a filtered page in start-time
                                            order; the second window is 8x this (default 2000)
    TRACKHOUSE_QUERY_MAX_EXPORT_RUNS        most runs in one metrics export (default 10000)
    TRACKHOUSE_QUERY_MAX_EXPORT_POINTS      most points in one metrics export (default 50000000)
    TRACKHOUSE_QUERY_MAX_QUERY_SECONDS      longest a store read may run (ClickHouse max_execution_time);
                                            past it the call fails with RESOURCE_EXHAUSTED (default 30.0)
    TRACKHOUSE_QUERY_SQL_MAX_EXECUTION_TIME seconds one SQL query may run (default 30)
    TRACKHOUSE_QUERY_SQL_MAX_RESULT_ROWS    rows one SQL answer may hold (default 10000000)
    TRACKHOUSE_QUERY_SQL_MAX_RESULT_BYTES   bytes one SQL answer may hold, uncompressed (default 268435456)
    TRACKHOUSE_QUERY_SQL_MAX_MEMORY_USAGE   bytes of memory one SQL query may use (default 4294967296)
    TRACKHOUSE_QUERY_SQL_MAX_QUERY_LENGTH   longest SQL text accepted (default 100000 characters)
    TRACKHOUSE_QUERY_RUN_INDEX              1: counts read the run index and this service refreshes it;
                                            0: neither (another replica may refresh it) (default 1)
    TRACKHOUSE_QUERY_RUN_INDEX_REFRESH_SECONDS  seconds between refresher passes (default 5)
    TRACKHOUSE_QUERY_RUN_INDEX_LAG_SECONDS  how far the watermark trails a pass's start: longer than
                                            an insert takes to commit (default 10)
    TRACKHOUSE_QUERY_RUN_ORDER_MAX_RESULTS  pages of up to this many runs ordered by one metric read
                                            the run index's value order; 0: they read the whole index
                                            (default 1000)
    TRACKHOUSE_QUERY_RUN_PAGES              1: pages from the run index show their runs from run_pages;
                                            0: every run read by id (default 1)
    TRACKHOUSE_QUERY_RUN_INDEX_STATE_SECONDS  seconds a search service holds the run index's state
                                            before reading it again; 0: every search, at most 10
                                            (default 1.0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class QuerySettings:
    default_max_results: int = 1000
    max_results: int = 50_000
    history_page: int = 25_000
    max_history_page: int = 1_000_000
    max_filter_length: int = 10_000
    # Runs in the first window of a filtered page in start-time order (search.py,
    # `_windowed_rows`; the second window is 8x this).
    search_window: int = 2_000
    # The run index (runindex.py, schema migration 8): 1 = searches read it once built, and
    # this service keeps it current, a pass every `run_index_refresh_seconds`, its watermark
    # `run_index_lag_seconds` behind the pass (longer than any insert takes to commit).
    run_index: int = 1
    run_index_refresh_seconds: float = 5.0
    run_index_lag_seconds: float = 10.0
    # Pages of up to this many runs ordered by one metric read the run index's value order
    # (runorder.py, schema migration 9) and stop early; 0 = never (they read the index whole).
    run_order_max_results: int = 1000
    # 1 = pages answered from the run index show their runs from run_pages (schema migration
    # 10), the runs changed since its watermark read by id; 0 = every run read by id.
    run_pages: int = 1
    # Seconds a search service holds the run index's state (watermark, run_order generation)
    # before reading it again; 0 = read it for every search; at most 10, well under run_order's
    # DROP_GRACE_SECONDS (a retired generation stays readable that long).
    run_index_state_seconds: float = 1.0
    max_export_runs: int = 10_000
    max_export_points: int = 50_000_000
    max_query_seconds: float = 30.0
    sql_max_execution_time: int = 30
    sql_max_result_rows: int = 10_000_000
    sql_max_result_bytes: int = 256 * 1024 * 1024
    sql_max_memory_usage: int = 4 * 1024 * 1024 * 1024
    sql_max_query_length: int = 100_000

    def __post_init__(self) -> None:
        for f in fields(self):
            try:  # NaN passes every comparison below; an int past a float's range cannot be one
                finite = math.isfinite(getattr(self, f.name))
            except OverflowError:
                finite = False
            if not finite:
                raise ValueError(f"query setting {f.name} must be a finite number, got {getattr(self, f.name)!r}")
            if f.name in ("run_index", "run_index_lag_seconds", "run_order_max_results", "run_pages",
                          "run_index_state_seconds") \
                    and getattr(self, f.name) >= 0:
                continue
            if getattr(self, f.name) <= 0:
                raise ValueError(f"query setting {f.name} must be > 0, got {getattr(self, f.name)!r}")
        if self.default_max_results > self.max_results:
            raise ValueError("default_max_results must not exceed max_results")
        if self.history_page > self.max_history_page:
            raise ValueError("history_page must not exceed max_history_page")
        if self.run_index_state_seconds > 10:
            raise ValueError("run_index_state_seconds must be at most 10 (a search reads the generation it "
                             f"holds, kept 120 s after it is retired), got {self.run_index_state_seconds!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> QuerySettings:
        env = os.environ if environ is None else environ
        values: dict[str, int | float] = {}
        for f in fields(cls):
            name = f"TRACKHOUSE_QUERY_{f.name.upper()}"
            if name in env:
                kind = float if f.type in ("float", float) else int
                try:
                    values[f.name] = kind(env[name])
                except ValueError:
                    what = "a number" if kind is float else "a whole number"
                    raise ValueError(f"{name}={env[name]!r} is not {what}") from None
        return cls(**values)  # type: ignore[arg-type]
