"""Run search as MLflow's client uses it: page tokens across page sizes, IS NULL / IS NOT NULL.

MLflow's client asks for the remainder on its last page (`get_results_from_paginated_fn`:
10,000 then 5,000 for max_results=15,000), so a token must work whatever the next page's
size; every run must still come exactly once. `tags.<key> IS NULL` (MLflow: tags and params
only) matches the runs without the key. Each is checked on every plan a page can take: the
per-key copies, windows, the run index (with runs changed since its watermark) and its
value order (run_order), against a Python model of the seeded runs.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pytest

from trackhouse.query.errors import InvalidArgument
from trackhouse.query.filters import (
    PARAMS,
    TAGS,
    Binder,
    Comparison,
    FilterError,
    compile_filter,
    parse_filter,
)
from trackhouse.query.runindex import RunIndex
from trackhouse.query.search import RunSearch, SearchRequest
from trackhouse.query.settings import QuerySettings
from trackhouse.query.tokens import TokenCodec
from trackhouse.store import ExperimentRecord, RunRecord, Store, new_run_id, new_version, open_store

T0 = 1_700_000_000_000
METRIC = [1.0, 1.0, 0.5, math.nan, None, -math.inf, 2.0, 1.0, math.nan]  # ties, NaN, missing
PARAM = ["a", "b", "a", None, "10"]
TAG = ["x", None, "y", "x", ""]  # "" is a value, not a missing tag


@dataclass
class Model:
    info: RunRecord
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _metrics(store: Store, rows: Sequence[tuple[str, str, float]]) -> None:
    n = len(rows)
    store.insert_arrow("metrics", pa.table({
        "run_id": [r[0] for r in rows], "key": [r[1] for r in rows], "step": pa.array([0] * n, pa.int64()),
        "timestamp": pa.array([T0] * n, pa.int64()), "value": pa.array([r[2] for r in rows], pa.float64()),
        "writer_id": ["w"] * n, "seq": pa.array([1] * n, pa.uint64()),
    }))


def _run(i: int, start: int) -> Model:
    return Model(RunRecord(run_id=new_run_id(start), experiment_id="e1", run_name=f"r{i:02d}", user_id="u",
                           status="FINISHED", start_time=start, end_time=None, lifecycle_stage="active",
                           artifact_uri=""))


def seed(store: Store) -> list[Model]:
    """40 runs with ties on start_time and on every key, NaN and missing values; then one pass
    of the run index, then changes it has not taken in (a tag deleted, a tag set, new runs)."""
    store.put_experiment(ExperimentRecord("e1", "e1", "", "active", T0, T0))
    models = []
    for i in range(40):
        m = _run(i, T0 + (i % 4) * 1000)
        if METRIC[i % len(METRIC)] is not None:
            m.metrics["m"] = METRIC[i % len(METRIC)]  # type: ignore[assignment]
        if PARAM[i % len(PARAM)] is not None:
            m.params["p"] = PARAM[i % len(PARAM)]  # type: ignore[assignment]
        if TAG[i % len(TAG)] is not None:
            m.tags["t"] = TAG[i % len(TAG)]  # type: ignore[assignment]
        if i % 3 == 0:
            m.tags["mlflow.parentRunId"] = "parent"
        models.append(m)
    _write(store, models)
    assert RunIndex(store, lag=0.0).refresh() == len(models)
    store.put_tags(models[0].info.run_id, [("t", "")], deleted=True)  # had "x"
    models[0].tags.pop("t")
    store.put_tags(models[1].info.run_id, [("t", "late")])  # had none
    models[1].tags["t"] = "late"
    late = [_run(40 + i, T0 + 1000) for i in range(3)]
    late[0].metrics["m"], late[1].params["p"], late[2].tags["t"] = 1.0, "a", "x"
    _write(store, late)
    return models + late


def _write(store: Store, models: list[Model]) -> None:
    store.insert_rows("runs", (*RunRecord.__dataclass_fields__, "version"),
                      [(*m.info.__dict__.values(), new_version()) for m in models])
    store.insert_rows("params", ("run_id", "key", "value"),
                      [(m.info.run_id, k, v) for m in models for k, v in m.params.items()])
    store.insert_rows("tags", ("run_id", "key", "value", "deleted", "version"),
                      [(m.info.run_id, k, v, 0, 1) for m in models for k, v in m.tags.items()])
    rows = [(m.info.run_id, k, v) for m in models for k, v in m.metrics.items()]
    if rows:
        _metrics(store, rows)


def _value(m: Model, entity: str, key: str) -> Any:
    return {"metrics": m.metrics, "params": m.params, "tags": m.tags}[entity].get(key) if entity != "attributes" \
        else getattr(m.info, key)


def _rank(v: Any) -> int:
    return 2 if v is None else 1 if isinstance(v, float) and math.isnan(v) else 0


def expected_order(models: list[Model], order_by: Sequence[str]) -> list[str]:
    """MLflow's order: per key values, then NaN, then missing; ties by start_time DESC, run_id."""
    keys = []
    for clause in order_by:
        name, _, direction = clause.partition(" ")
        entity, _, key = name.partition(".")
        keys.append((entity, key, direction != "DESC"))
    keys += [("attributes", "start_time", False), ("attributes", "run_id", True)]

    def compare(a: Model, b: Model) -> int:
        for entity, key, ascending in keys:
            va, vb = _value(a, entity, key), _value(b, entity, key)
            if _rank(va) != _rank(vb):
                return -1 if _rank(va) < _rank(vb) else 1
            if _rank(va) == 0 and va != vb:
                return (-1 if va < vb else 1) * (1 if ascending else -1)
        return 0

    return [m.info.run_id for m in sorted(models, key=functools.cmp_to_key(compare))]


@pytest.fixture(scope="module")
def seeded(chdb_dsn: str) -> Iterator[tuple[Store, list[Model]]]:
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        yield store, seed(store)
    finally:
        store.close()


# Every plan a page can take. "index": pages of up to 4 runs ordered by one metric read run_order,
# larger ones the index whole, so a walk whose size changes moves between the two.
PLANS: dict[str, QuerySettings] = {
    "copies": QuerySettings(run_index=0),
    "windows": QuerySettings(run_index=0, search_window=2),
    "index": QuerySettings(run_index_state_seconds=0, run_order_max_results=4),
}
SIZES = (5, 2, 9, 1, 4, 13)


def _search(store: Store, plan: str) -> RunSearch:
    secret = store.meta_value("page_token_secret", lambda: "00" * 32)
    return RunSearch(store, TokenCodec(bytes.fromhex(secret)), PLANS[plan])


def walk(search: RunSearch, sizes: Sequence[int], text: str = "", order_by: Sequence[str] = ()) -> list[str]:
    """Every page in turn, the i-th of sizes[i % len(sizes)] runs, each page's token passed on."""
    ids: list[str] = []
    token = ""
    for i in range(200):
        size = sizes[i % len(sizes)]
        page = search.search(SearchRequest(filter=text, order_by=tuple(order_by), max_results=size,
                                           page_token=token))
        ids += [r.info.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            return ids
        assert len(page.runs) == size
    raise AssertionError("paging does not end")


ORDERS = [[], ["metrics.m DESC"], ["metrics.m"], ["params.p DESC", "metrics.m"], ["tags.t", "attributes.run_name DESC"]]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("order_by", ORDERS, ids=lambda o: ",".join(o) or "default")
def test_a_token_works_whatever_the_next_page_size(seeded: tuple[Store, list[Model]], plan: str,
                                                   order_by: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    store, models = seeded
    hits: list[Any] = []  # what each page's read of run_order found (None: it read the index whole)
    original = RunSearch._ordered_hits

    def spy(self: RunSearch, *args: Any) -> Any:
        hits.append((yield from original(self, *args)))
        return hits[-1]

    monkeypatch.setattr(RunSearch, "_ordered_hits", spy)
    want = expected_order(models, order_by)
    got = walk(_search(store, plan), SIZES, order_by=order_by)
    assert got == want and len(set(got)) == len(models)
    if plan == "index" and len(order_by) == 1 and order_by[0].startswith("metrics."):
        sizes: list[int] = []  # the walk's pages: those of up to 4 runs read run_order, the others the index
        while sum(sizes) < len(got):
            sizes.append(SIZES[len(sizes) % len(SIZES)])
        assert len(hits) == sum(1 for s in sizes if s <= 4) < len(sizes)
        assert any(h is not None for h in hits)
    text = "params.p != 'b'"  # a filter on a key: windows, and the index's filter
    want = expected_order([m for m in models if m.params.get("p", "b") != "b"], order_by)
    assert walk(_search(store, plan), SIZES[::-1], text, order_by) == want


def test_mlflow_clients_last_page_asks_for_the_remainder(seeded: tuple[Store, list[Model]]) -> None:
    """mlflow.search_runs(max_results=15000) over >10,000 runs asks 10,000 then 5,000 with the token."""
    store, models = seeded
    search = _search(store, "copies")
    first = search.search(SearchRequest(order_by=("metrics.m DESC",), max_results=25))
    rest = search.search(SearchRequest(order_by=("metrics.m DESC",), max_results=15,
                                       page_token=first.next_page_token))
    assert [r.info.run_id for r in first.runs + rest.runs] == expected_order(models, ["metrics.m DESC"])[:40]


def test_a_token_is_still_refused_for_another_question(seeded: tuple[Store, list[Model]]) -> None:
    store, _ = seeded
    search = _search(store, "copies")
    token = search.search(SearchRequest(order_by=("metrics.m DESC",), max_results=5)).next_page_token
    for other in (SearchRequest(order_by=("metrics.m",), max_results=5, page_token=token),
                  SearchRequest(order_by=("metrics.m DESC",), filter="tags.t = 'x'", max_results=7,
                                page_token=token),
                  SearchRequest(order_by=("metrics.m DESC",), view="ALL", max_results=5, page_token=token)):
        with pytest.raises(InvalidArgument, match="belongs to another search"):
            search.search(other)


# -- IS NULL / IS NOT NULL ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "entity", "key", "op"), [
    ("tags.mlflow.parentRunId IS NULL", TAGS, "mlflow.parentRunId", "IS NULL"),
    ("params.p IS NOT NULL", PARAMS, "p", "IS NOT NULL"),
    ("tag.`x y` is null", TAGS, "x y", "IS NULL"),
    ('param."a.b"  IS\tnot   NULL', PARAMS, "a.b", "IS NOT NULL"),
])
def test_is_null_parses(text: str, entity: str, key: str, op: str) -> None:
    assert parse_filter(text) == Comparison(entity, key, op, None)


@pytest.mark.parametrize(("text", "position", "fragment"), [
    ("metrics.m IS NULL", 10, "IS NULL is not allowed for metrics"),
    ("attributes.end_time IS NOT NULL", 20, "IS NOT NULL is not allowed for attribute 'end_time'"),
    ("run_name IS NULL", 9, "IS NULL is not allowed for attribute 'run_name'"),
    ("tags.t IS", 9, "expected NULL or NOT NULL after IS, found end of input"),
    ("tags.t IS NOT", 13, "expected NULL after IS NOT, found end of input"),
    ("tags.t IS 'x'", 10, "expected NULL or NOT NULL after IS, found \"'x'\""),
    ("tags.t IS NULL 'x'", 15, "expected AND, OR or the end of the filter"),
    ("tags.t = NULL", 9, "expected a value: a quoted string or a number"),
    ("tags.t NOT NULL", 7, "expected a comparison operator"),
])
def test_bad_is_null_is_refused_with_a_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    assert info.value.position == position and fragment in str(info.value), str(info.value)


def test_is_null_compiles_to_bound_sql() -> None:
    binder = Binder()
    node = parse_filter("tags.`x'; DROP TABLE runs --` IS NULL AND params.`{p0:String}` IS NOT NULL")
    assert node is not None
    sql = compile_filter(node, "db", binder)
    assert list(binder.params.values()) == ["x'; DROP TABLE runs --", "{p0:String}"]
    assert "DROP" not in sql and "NOT IN (SELECT run_id FROM db.tags FINAL" in sql


def _has(kind: str, key: str) -> Callable[[Model], bool]:
    return lambda m: key in (m.tags if kind == "tags" else m.params)


NULL_FILTERS: list[tuple[str, Callable[[Model], bool]]] = [
    ("tags.mlflow.parentRunId IS NULL", lambda m: not _has("tags", "mlflow.parentRunId")(m)),
    ("tags.t IS NULL", lambda m: not _has("tags", "t")(m)),
    ("tags.t IS NOT NULL", _has("tags", "t")),
    ("params.p IS NULL", lambda m: not _has("params", "p")(m)),
    ("params.p IS NOT NULL AND tags.t IS NULL", lambda m: _has("params", "p")(m) and not _has("tags", "t")(m)),
    ("tags.t IS NULL OR metrics.m > 0.7", lambda m: not _has("tags", "t")(m) or m.metrics.get("m", math.nan) > 0.7),
    ("tags.nosuch IS NULL", lambda m: True),
    ("params.nosuch IS NOT NULL", lambda m: False),
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(("text", "predicate"), NULL_FILTERS, ids=[f for f, _ in NULL_FILTERS])
def test_is_null_matches_runs_without_the_key(seeded: tuple[Store, list[Model]], plan: str, text: str,
                                              predicate: Callable[[Model], bool]) -> None:
    store, models = seeded
    chosen = [m for m in models if predicate(m)]
    search = _search(store, plan)
    assert search.count(SearchRequest(filter=text)) == len(chosen)
    # Ordered by the key the filter names too: its rows ride on the order key's join (`split_pushed`).
    for order_by in ([], ["metrics.m DESC"], ["params.p"], ["tags.t DESC"]):
        assert walk(search, (8, 100), text, order_by) == expected_order(chosen, order_by), order_by


@pytest.mark.parametrize(("text", "predicate"), NULL_FILTERS[:5], ids=[f for f, _ in NULL_FILTERS[:5]])
def test_is_null_over_the_run_major_tables(seeded: tuple[Store, list[Model]], text: str,
                                           predicate: Callable[[Model], bool]) -> None:
    """`filters.compile_filter` (over `runs FINAL`) gives the same runs as search."""
    store, models = seeded
    node, binder = parse_filter(text), Binder()
    assert node is not None
    sql = f"SELECT run_id FROM {store.database}.runs FINAL WHERE {compile_filter(node, store.database, binder)}"
    assert sorted(r[0] for r in store.query_rows(sql, binder.params)) == sorted(
        m.info.run_id for m in models if predicate(m))
