"""run_pages (schema migration 10): what a page shows of each run, one row per run.

A page of runs shows each run's record, params, tags (not deleted) and latest metrics
(value, timestamp, step, min, max, count): all of it is one row per run here. Read by
run id from the four run-major tables, the record from `runs` and the rest from three
more, that is 140-190 ms for a page of 100 at 10 M runs (docs/search.md, "Sixth
pass"): each table holds several rows per run, and a page's runs are spread over the
whole of each. The refresher (runindex.py) writes a run's row here in the passes that
write its run_index row: a page answered from the index reads its runs' rows here,
one small table sorted by run id, and only the runs changed since the watermark
(whose rows may be stale) by id.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import orjson

from trackhouse.store import RunDetails, RunRecord, Store
from trackhouse.store.reads import Rows, Steps
from trackhouse.store.records import LatestMetricRecord
from trackhouse.store.schema import check_identifier, latest_step, latest_timestamp, latest_value

logger = logging.getLogger(__name__)

PAGES = "run_pages"
RECORD = tuple(f.name for f in fields(RunRecord))[1:]  # a run's record after its id; search_runs and
# run_index hold it under the same names (schema migrations 2, 8)
# How `page` is written whatever the profile: 64-bit integers as numbers, tuples as arrays.
PAGE_SETTINGS = "SETTINGS output_format_json_quote_64bit_integers = 0, enable_named_columns_in_function_tuple = 0"
_BITS, _FLOAT = struct.Struct("<Q"), struct.Struct("<d")


def _float(bits: int) -> float:
    return float(_FLOAT.unpack(_BITS.pack(bits))[0])


def newest(rows: Iterable[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Each run's row (run_id, version, …) of the greatest version: what FINAL keeps of a
    ReplacingMergeTree(version), chosen here from a read of unmerged parts."""
    found: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        if row[0] not in found or row[1] > found[row[0]][1]:
            found[row[0]] = row
    return found


def _details(run_id: str, page: str) -> RunDetails | None:
    """The RunDetails a `page` holds; None (the run is read by id) for a page of another shape
    than pages_sql writes (written by an earlier build of migration 10), logged."""
    try:
        params, tags, metrics, record = orjson.loads(page)
        return RunDetails(RunRecord(run_id, *record), dict(params), dict(tags), [
            LatestMetricRecord(k, _float(v), ts, step, _float(lo), _float(hi), n)
            for k, v, ts, step, lo, hi, n in metrics])
    except (ValueError, TypeError, struct.error) as exc:
        logger.warning("run_pages: the row of run %s cannot be read (%s); reading the run by id", run_id, exc)
        return None


def record_sql(db: str, where: str) -> str:
    """run_id and the latest version of each field of the record of the runs meeting `where`."""
    # argMax skips NULLs: a tuple keeps the latest version's end_time even when it is NULL.
    record = ", ".join(f"tupleElement(argMax(tuple({c}), version), 1) AS {c}" for c in RECORD)
    return f"SELECT run_id, {record} FROM {db}.runs {where} GROUP BY run_id"


def params_sql(db: str, where: str) -> str:
    """(run_id, key, value) of each param of the runs meeting `where` (params are write-once)."""
    return f"SELECT run_id, key, any(value) AS value FROM {db}.params {where} GROUP BY run_id, key"


def tags_sql(db: str, where: str) -> str:
    """(run_id, key, value, deleted): the last write of each tag of the runs meeting `where`."""
    return (f"SELECT run_id, key, argMax(value, version) AS value, argMax(deleted, version) AS deleted "
            f"FROM {db}.tags {where} GROUP BY run_id, key")


def latest_sql(db: str, where: str) -> str:
    """(run_id, key, lk, lo, hi, count): each latest metric of the runs meeting `where`, `lk` its
    packed latest key (schema.latest_value and friends decode it)."""
    return (f"SELECT run_id, key, max(last_key) AS lk, min(min_value) AS lo, max(max_value) AS hi, "
            f"sum(count) AS count FROM {db}.latest_metrics {where} GROUP BY run_id, key")


def pages_sql(db: str, runs: str, version: str = "toUnixTimestamp64Nano(now64(9))") -> str:
    """run_pages rows of the runs meeting `runs` (a condition on run_id: our own SQL, values bound
    by the caller), of `version` (now, in ns), to insert with PAGE_SETTINGS. `page` is one JSON
    array [params, tags, metrics, record]: [key, value] pairs, then [key, value, timestamp, step,
    min, max, count] lists (the floats as their bits), each sorted by key, as hydration by id
    returns them; then the record's fields (RECORD)."""
    check_identifier(db)
    w = f"WHERE {runs}"
    bits = "reinterpretAsUInt64"  # a float as its bits: JSON has no NaN, ±inf or -0.0
    metric = (f"(key, {bits}({latest_value('lk')}), {latest_timestamp('lk')}, {latest_step('lk')}, "
              f"{bits}(lo), {bits}(hi), count)")
    record = ", ".join(f"r.{c}" for c in RECORD)
    return (f"SELECT r.run_id AS run_id, toJSONString((p.a, t.a, m.a, ({record}))) AS page, {version} AS version "
            f"FROM ({record_sql(db, w)}) AS r "
            f"LEFT JOIN (SELECT run_id, arraySort(groupArray((key, value))) AS a FROM ({params_sql(db, w)}) "
            f"GROUP BY run_id) AS p ON p.run_id = r.run_id "
            f"LEFT JOIN (SELECT run_id, arraySort(groupArray((key, value))) AS a FROM ({tags_sql(db, w)}) "
            f"WHERE deleted = 0 GROUP BY run_id) AS t ON t.run_id = r.run_id "
            f"LEFT JOIN (SELECT run_id, arraySort(groupArray({metric})) AS a FROM ({latest_sql(db, w)}) "
            f"GROUP BY run_id) AS m ON m.run_id = r.run_id")


def page_details_steps(store: Store, run_ids: Sequence[str], infos: Mapping[str, RunRecord] | None,
                       changed: Collection[str]) -> Steps[list[RunDetails]]:
    """RunDetails of `run_ids` (in that order; unknown runs left out): from their run_pages rows,
    except the `changed` runs (changed since the index's watermark: their rows may be stale) and
    any run without a row, which are read by id (`Store.run_details_steps`, with `infos`)."""
    wanted = [r for r in run_ids if r not in changed]
    rows = newest((yield Rows(f"SELECT run_id, version, page FROM {store.t(PAGES)} "
                              "WHERE run_id IN {ids:Array(String)}", {"ids": wanted}))) if wanted else {}
    pages = {r: d for r, (_, _, page) in rows.items() if (d := _details(r, page)) is not None}
    rest = [r for r in run_ids if r not in pages]
    by_id = {d.info.run_id: d for d in (yield from store.run_details_steps(rest, infos))} if rest else {}
    return [pages[r] if r in pages else by_id[r] for r in run_ids if r in pages or r in by_id]
