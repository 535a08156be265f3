"""Run search through the real gRPC QueryService: scope, view, filters, ordering, keyset pages.

Runs are written straight into the store; every expectation is computed from
the same Python model of the seeded runs, with MLflow's ordering rules: missing
values last in either direction, NaN metrics after numbers but before missing
ones, ties broken by start_time DESC then run_id ASC.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import math
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pyarrow as pa
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.proto.v1 import common_pb2, query_pb2, query_pb2_grpc
from trackhouse.query import runorder as runorder_module
from trackhouse.query import search as search_module
from trackhouse.query.errors import InvalidArgument
from trackhouse.query.runindex import (
    FRESH_SETTINGS,
    STATE_KEY,
    Refresher,
    RunIndex,
    changed_since,
    fresh_sql,
    state_sql,
)
from trackhouse.query.search import RunSearch, SearchRequest
from trackhouse.query.settings import QuerySettings
from trackhouse.query.tokens import TokenCodec
from trackhouse.store import (
    ExperimentRecord,
    RunDetails,
    RunRecord,
    Store,
    StoreError,
    new_run_id,
    new_version,
    open_store,
)

T0 = 1_700_000_000_000
LRS = ["0.001", "0.01", "0.1", "1e-3", "10", "2", "abc"]
OPTIMIZERS = ["adam", "sgd", "rmsprop"]
XS = ["a'b", "back\\slash", "ünï", "", "tab\tx", "a", "b", "B", 'q"q']
STATUSES = ["RUNNING", "FINISHED", "FAILED"]


@dataclass
class Model:
    """What the seeded store holds, as search sees it."""

    info: RunRecord
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value per key

    @property
    def run_id(self) -> str:
        return self.info.run_id


def _metric_rows(run_id: str, key: str, latest: float, rng: random.Random) -> list[tuple[Any, ...]]:
    """Three points; the last has the greatest step, so it is the latest."""
    return [
        (run_id, key, 0, T0, rng.random() * 100),
        (run_id, key, 5, T0 + 1, rng.random() - 1),
        (run_id, key, 9, T0 + 2, latest),
    ]


def seed(store: Store) -> list[Model]:
    """~33 runs over e1, e2 and e3 with ties, missing keys, NaN/Inf, a deleted tag, deleted runs."""
    rng = random.Random(20240611)
    for eid in ("e1", "e2", "e3"):
        store.put_experiment(ExperimentRecord(eid, f"exp-{eid}", f"file:///{eid}", "active", T0, T0))
    models: list[Model] = []
    ids = sorted({f"{rng.getrandbits(40):010x}" for _ in range(40)})
    rng.shuffle(ids)
    special_losses = {3: math.nan, 4: math.inf, 6: -math.inf, 10: math.nan, 12: 0.0}
    for i in range(33):
        info = RunRecord(
            run_id=ids[i], experiment_id="e3" if i == 32 else ("e2" if i % 3 == 0 else "e1"),
            run_name="" if i % 11 == 0 else f"run-{i % 6}", user_id="ann", status=STATUSES[i % 3],
            start_time=T0 + (i % 5) * 1000, end_time=None if i % 4 == 0 else T0 + 10_000 + (i * 7) % 13,
            lifecycle_stage="deleted" if i in (7, 20) else "active", artifact_uri=f"file:///a/{ids[i]}",
        )
        m = Model(info)
        if i % 7 != 3:
            m.params["lr"] = LRS[i % len(LRS)]
        if i % 5 != 1:
            m.params["optimizer"] = OPTIMIZERS[i % 3]
        if i % 6 != 2:
            m.tags["x"] = XS[i % len(XS)]
        m.tags["i"] = str(i)
        if i % 8 != 5:
            m.metrics["loss"] = special_losses.get(i, round(rng.random(), 1))  # rounding makes ties
        if i % 2 == 0:
            m.metrics["acc"] = rng.choice([0.5, 0.75, rng.random()])
        models.append(m)
    # Run 14 was written active first; its newer version is deleted (ReplacingMergeTree).
    for m in models:
        if m.info.run_id == ids[14]:
            store.put_run(RunRecord(**{**m.info.__dict__, "lifecycle_stage": "active"}))
            m.info = RunRecord(**{**m.info.__dict__, "lifecycle_stage": "deleted"})
    # One INSERT per table (the store's own put_* write one run each: too slow for 33 runs).
    store.insert_rows("runs", (*RunRecord.__dataclass_fields__, "version"),
                      [(*m.info.__dict__.values(), new_version()) for m in models])
    store.insert_rows("params", ("run_id", "key", "value"),
                      [(m.run_id, k, v) for m in models for k, v in sorted(m.params.items())])
    store.insert_rows("tags", ("run_id", "key", "value", "deleted", "version"),
                      [(m.run_id, k, v, 0, 1) for m in models for k, v in sorted(m.tags.items())])
    rows = [row for m in models for key, latest in m.metrics.items()
            for row in _metric_rows(m.run_id, key, latest, rng)]
    # Runs 9 and 21: a tag x that was deleted is missing; run 2 had its x deleted and set again.
    store.put_tags(ids[9], [("x", "gone")], deleted=True)
    models[9].tags.pop("x", None)
    store.put_tags(ids[21], [("x", "gone")], deleted=True)
    models[21].tags.pop("x", None)
    store.put_tags(ids[2], [("x", "zzz")])
    models[2].tags["x"] = "zzz"
    rng.shuffle(rows)
    half = len(rows) // 2  # two INSERTs: latest_metrics holds two parts to combine
    for chunk in (rows[:half], rows[half:]):
        run_ids, keys, steps, tss, values = (list(c) for c in zip(*chunk, strict=True))
        store.insert_arrow("metrics", pa.table({
            "run_id": run_ids, "key": keys, "step": pa.array(steps, pa.int64()),
            "timestamp": pa.array(tss, pa.int64()), "value": pa.array(values, pa.float64()),
            "writer_id": ["w"] * len(chunk), "seq": pa.array([1] * len(chunk), pa.uint64()),
        }))
    return models


# -- the Python model of ordering ------------------------------------------------------------


def _value(m: Model, entity: str, key: str) -> Any:
    if entity == "metrics":
        return m.metrics.get(key)
    if entity == "params":
        return m.params.get(key)
    if entity == "tags":
        return m.tags.get(key)
    return getattr(m.info, key)


def _rank(v: Any) -> int:
    """MLflow: values first, then NaN, then missing — whatever the direction."""
    if v is None:
        return 2
    return 1 if isinstance(v, float) and math.isnan(v) else 0


def _parse(clause: str) -> tuple[str, str, bool]:
    words = clause.split()
    ascending = len(words) == 1 or words[1].upper() == "ASC"
    if words[0].endswith("`"):  # entity.`quoted key`
        entity, _, key = words[0][:-1].partition(".`")
        return entity, key, ascending
    entity, _, key = words[0].rpartition(".")
    return entity or "attributes", key, ascending


def expected_order(models: list[Model], order_by: list[str]) -> list[str]:
    keys = [_parse(c) for c in order_by]
    for tie in (("attributes", "start_time", False), ("attributes", "run_id", True)):
        if all(k[:2] != tie[:2] for k in keys):
            keys.append(tie)

    def compare(a: Model, b: Model) -> int:
        for entity, key, ascending in keys:
            va, vb = _value(a, entity, key), _value(b, entity, key)
            ra, rb = _rank(va), _rank(vb)
            if ra != rb:
                return -1 if ra < rb else 1
            if ra == 0 and va != vb:
                return (-1 if va < vb else 1) * (1 if ascending else -1)
        return 0

    return [m.run_id for m in sorted(models, key=functools.cmp_to_key(compare))]


def active(models: list[Model]) -> list[Model]:
    return [m for m in models if m.info.lifecycle_stage == "active"]


# -- fixtures and helpers ------------------------------------------------------------------------


@dataclass
class Env:
    stub: Any
    models: list[Model]
    store: Store

    def search(self, **kwargs: Any) -> Any:
        return self.stub.SearchRuns(query_pb2.SearchRunsRequest(**kwargs))

    def ids(self, **kwargs: Any) -> list[str]:
        response = self.search(**kwargs)
        assert response.next_page_token == ""
        return [r.info.run_id for r in response.runs]

    def walk(self, **kwargs: Any) -> list[str]:
        """Every page in turn; no page is empty and none but the last is short."""
        ids: list[str] = []
        token = ""
        size = kwargs["max_results"]
        for _ in range(1000):
            response = self.search(page_token=token, **kwargs)
            ids += [r.info.run_id for r in response.runs]
            token = response.next_page_token
            if not token:
                assert 0 < len(response.runs) <= size or ids == []
                return ids
            assert len(response.runs) == size
        raise AssertionError("paging does not end")

    def by_id(self, run_id: str) -> Model:
        return next(m for m in self.models if m.run_id == run_id)


@pytest.fixture(scope="module")
def env(chdb_dsn: str) -> Iterator[Env]:
    """One seeded store and server for the whole module: every test here only reads.

    Built like conftest's `server`, but once: seeding is the slow part.
    """
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0), store=store)
        address = thread.start()
        channel = grpc.insecure_channel(address)
        try:
            yield Env(query_pb2_grpc.QueryServiceStub(channel), models, store)
        finally:
            channel.close()
            thread.stop(grace=1.0)
    finally:
        store.close()


def direct_search(store: Store) -> RunSearch:
    """A RunSearch over `store` built as QueryApp.start builds it."""
    secret = store.meta_value("page_token_secret", lambda: "00" * 32)
    # The index state read by every search: tests change it under the search's feet
    # (test_the_index_state_is_held_... holds it).
    return RunSearch(store, TokenCodec(bytes.fromhex(secret)), QuerySettings(run_index_state_seconds=0))


def assert_code(code: grpc.StatusCode, call: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details()
    return str(err.details())


# -- ordering ----------------------------------------------------------------------------------


def test_default_order_is_start_time_desc_then_run_id(env: Env) -> None:
    ids = env.ids()
    assert ids == expected_order(active(env.models), [])
    # The seed has ties on start_time; the tiebreak decides within them.
    starts = [env.by_id(r).info.start_time for r in ids]
    assert starts == sorted(starts, reverse=True)
    assert len(set(starts)) < len(starts)


ORDERINGS = [
    [],
    ["metrics.loss ASC"],
    ["metrics.loss DESC"],
    ["metrics.loss"],
    ["metrics.acc DESC"],
    ["metrics.nosuch DESC"],
    ["params.optimizer"],
    ["params.optimizer DESC"],
    ["params.lr DESC"],
    ["tags.x"],
    ["tags.x DESC"],
    ["attributes.run_name"],
    ["attributes.run_name DESC"],
    ["attributes.end_time DESC"],
    ["attributes.start_time ASC"],
    ["attributes.status", "attributes.run_id DESC"],
    ["params.optimizer DESC", "metrics.loss ASC"],
    ["tags.x", "params.lr", "metrics.acc DESC"],
    ["metrics.acc", "metrics.loss DESC", "attributes.run_name"],
]


@pytest.mark.parametrize("order_by", ORDERINGS, ids=lambda o: ",".join(o) or "default")
def test_order_and_pages(env: Env, order_by: list[str]) -> None:
    expected = expected_order(active(env.models), order_by)
    assert env.ids(order_by=order_by) == expected
    # Keyset pages of 7: their concatenation is the single page, nothing lost or repeated.
    assert env.walk(order_by=order_by, max_results=7) == expected


@pytest.mark.parametrize(
    ("order_by", "size"),
    [
        *((["metrics.loss DESC", "tags.x"], size) for size in (1, 2, 3, 30, 31)),
        (["metrics.loss", "attributes.end_time DESC"], 1),  # every row is a cursor: NaN, ±inf, missing
        (["tags.x DESC", "params.lr"], 1),
    ],
)
def test_page_sizes_around_the_edges(env: Env, order_by: list[str], size: int) -> None:
    expected = expected_order(active(env.models), order_by)
    assert len(expected) == 30
    assert env.walk(order_by=order_by, max_results=size, run_view_type=common_pb2.ACTIVE_ONLY) == expected


def test_pages_with_a_filter_and_all_views(env: Env) -> None:
    order_by = ["params.lr", "metrics.loss DESC"]
    chosen = [m for m in env.models if m.info.experiment_id in ("e1", "e3") and "optimizer" in m.params]
    expected = expected_order(chosen, order_by)
    kwargs: dict[str, Any] = dict(experiment_ids=["e3", "e1"], filter="params.optimizer IN ('adam', 'sgd', 'rmsprop')",
                                  order_by=order_by, run_view_type=common_pb2.ALL)
    assert env.ids(**kwargs) == expected
    assert env.walk(max_results=7, **kwargs) == expected
    assert env.walk(max_results=4, **kwargs) == expected


def test_nan_latest_metrics_sort_after_numbers_and_before_missing(env: Env) -> None:
    for direction in ("ASC", "DESC"):
        ids = env.ids(order_by=[f"metrics.loss {direction}"])
        ranks = [_rank(env.by_id(r).metrics.get("loss")) for r in ids]
        assert ranks == sorted(ranks)
        assert ranks.count(1) == 2 and ranks.count(2) > 0
        # The infinities are numbers: at the ends of the numbers.
        numbers = [env.by_id(r).metrics["loss"] for r, k in zip(ids, ranks, strict=True) if k == 0]
        assert numbers[0] == (-math.inf if direction == "ASC" else math.inf)
        assert numbers[-1] == (math.inf if direction == "ASC" else -math.inf)


# -- scope, views, filters -------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiments", [["e1"], ["e2"], ["e3"], ["e1", "e2"], ["e2", "e1", "e2"], [], ["nope"], ["e3", "nope"]]
)
def test_experiment_scope(env: Env, experiments: list[str]) -> None:
    scope = [m for m in active(env.models) if not experiments or m.info.experiment_id in experiments]
    assert env.ids(experiment_ids=experiments) == expected_order(scope, [])


@pytest.mark.parametrize(
    ("view", "stages"),
    [
        (common_pb2.VIEW_TYPE_UNSPECIFIED, {"active"}),
        (common_pb2.ACTIVE_ONLY, {"active"}),
        (common_pb2.DELETED_ONLY, {"deleted"}),
        (common_pb2.ALL, {"active", "deleted"}),
    ],
)
def test_run_view_type(env: Env, view: int, stages: set[str]) -> None:
    scope = [m for m in env.models if m.info.lifecycle_stage in stages]
    assert env.ids(run_view_type=view) == expected_order(scope, [])
    if stages == {"deleted"}:
        assert len(scope) == 3  # including the run whose older version is active


def _lr(m: Model) -> float | None:
    try:
        return float(m.params["lr"])
    except (KeyError, ValueError):
        return None


FILTERS: list[tuple[str, Callable[[Model], bool]]] = [
    ("params.optimizer = 'adam'", lambda m: m.params.get("optimizer") == "adam"),
    ("params.lr > 0.005", lambda m: (_lr(m) or 0) > 0.005),
    ("params.lr <= 0.001", lambda m: _lr(m) is not None and _lr(m) <= 0.001),  # type: ignore[operator]
    ("params.lr = '0.01'", lambda m: m.params.get("lr") == "0.01"),
    ("params.lr > 0.005 AND params.optimizer = 'sgd'",
     lambda m: (_lr(m) or 0) > 0.005 and m.params.get("optimizer") == "sgd"),
    ("params.optimizer = 'adam' OR params.optimizer = 'sgd'",
     lambda m: m.params.get("optimizer") in ("adam", "sgd")),
    ("metrics.loss < 0.5 AND (tags.x = 'a''b' OR tags.x = 'back\\slash')",
     lambda m: m.metrics.get("loss", math.nan) < 0.5 and m.tags.get("x") in ("a'b", "back\\slash")),
    ("metrics.loss >= 0.5 OR metrics.acc = 0.75",
     lambda m: m.metrics.get("loss", math.nan) >= 0.5 or m.metrics.get("acc") == 0.75),
    ("tags.x = 'ünï'", lambda m: m.tags.get("x") == "ünï"),
    ("attributes.status = 'FAILED' and attributes.run_name != ''",
     lambda m: m.info.status == "FAILED" and m.info.run_name != ""),
    ("tags.x = 'gone'", lambda m: False),
]


@pytest.mark.parametrize(("text", "predicate"), FILTERS, ids=[f for f, _ in FILTERS])
def test_filters(env: Env, text: str, predicate: Callable[[Model], bool]) -> None:
    chosen = [m for m in active(env.models) if predicate(m)]
    assert env.ids(filter=text, order_by=["metrics.loss DESC"]) == expected_order(chosen, ["metrics.loss DESC"])


WINDOW_ORDERS = [[], ["attributes.start_time ASC", "attributes.run_name DESC"]]


@pytest.mark.parametrize("window", [2, 1000])
@pytest.mark.parametrize("order_by", WINDOW_ORDERS, ids=lambda o: ",".join(o) or "default")
def test_windowed_pages_equal_the_reference(env: Env, window: int, order_by: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Filtered pages in start-time order are found window by window (`search_window` runs,
    then 8x, then the rest): with windows far smaller than the matches, the first pages
    come from the second window or the rest, and every page must still be exact. The
    seed's ids are not minted by start time, which would send every window to today's
    plan (a cost decision, tested below): here every window counts as clustered."""
    monkeypatch.setattr(search_module, "_clustered", lambda rows: True)
    monkeypatch.setattr(search_module, "WINDOW_READ", 3)  # a window is read in several parts
    secret = env.store.meta_value("page_token_secret", lambda: "00" * 32)
    search = RunSearch(env.store, TokenCodec(bytes.fromhex(secret)), QuerySettings(search_window=window))
    for text, predicate in [*FILTERS[:2], *FILTERS[4:7], FILTERS[-1]]:  # "gone" matches nothing
        expected = expected_order([m for m in active(env.models) if predicate(m)], order_by)
        for size in (4, 100):
            ids: list[str] = []
            token = ""
            for _ in range(100):
                page = search.search(SearchRequest(filter=text, order_by=tuple(order_by), max_results=size,
                                                   page_token=token))
                assert len(page.runs) <= size
                ids += [r.info.run_id for r in page.runs]
                token = page.next_page_token
                if not token:
                    break
            assert ids == expected, (text, size)
            # Hydrated as GetRun says, whichever window found the run (repr: NaN metrics compare equal).
            for run in page.runs:
                [got] = env.store.get_run_details([run.info.run_id])
                assert (run.info, run.params, run.tags) == (got.info, got.params, got.tags)
                assert repr(sorted(run.metrics, key=lambda m: m.key)) == repr(sorted(got.metrics, key=lambda m: m.key))


def test_windows_are_used_only_for_ids_that_begin_with_their_start_time() -> None:
    minted = [(new_run_id(T0 + i), T0 + i) for i in range(10)]
    imported = [(uuid.uuid4().hex, T0 + i) for i in range(10)]
    assert search_module._clustered(minted)
    assert not search_module._clustered(imported)
    assert search_module._clustered(minted + imported[:1])  # a few imported runs among them
    assert not search_module._clustered(minted[:5] + imported[:5])


def test_page_content_is_hydrated(env: Env) -> None:
    response = env.search(experiment_ids=["e3"])
    [run] = response.runs
    m = env.by_id(run.info.run_id)
    assert run.info.experiment_id == "e3"
    assert run.info.run_name == m.info.run_name
    assert run.info.start_time == m.info.start_time
    assert {p.key: p.value for p in run.params} == m.params
    assert {t.key: t.value for t in run.tags} == m.tags
    assert {x.key: (x.value, x.step, x.count) for x in run.metrics} == {
        k: (v, 9, 3) for k, v in m.metrics.items()
    }
    assert env.stub.GetRun(query_pb2.GetRunRequest(run_id=m.run_id)) == run


@pytest.mark.parametrize("order_by", [[], ["attributes.end_time DESC"], ["metrics.loss"], ["params.lr DESC"]],
                         ids=lambda o: ",".join(o) or "default")
def test_every_run_of_a_page_is_what_get_run_says(env: Env, order_by: list[str]) -> None:
    """Pages ordered by attributes take each run's record from search_runs (phase one), others from runs:
    both must equal GetRun field by field — latest version (run 14), missing end_time, deleted tags."""
    response = env.search(order_by=order_by, run_view_type=common_pb2.ALL, max_results=1000)
    assert len(response.runs) == len(env.models)
    for run in response.runs:
        assert env.stub.GetRun(query_pb2.GetRunRequest(run_id=run.info.run_id)) == run
        assert run.info.lifecycle_stage == (
            common_pb2.DELETED if env.by_id(run.info.run_id).info.lifecycle_stage == "deleted" else common_pb2.ACTIVE)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [50_001, 2**31 - 1, -1, -50])
def test_max_results_out_of_range(env: Env, size: int) -> None:
    assert_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: env.search(max_results=size),
                f"max_results: {size} is outside 1..50000")


def test_max_results_limits(env: Env) -> None:
    assert len(env.search(max_results=50_000).runs) == 30
    assert len(env.search(max_results=0).runs) == 30


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"filter": "metrics.loss <"}, "at position 14"),
        ({"filter": "metrics.loss < 1 and"}, "at position 20"),
        ({"filter": "params.lr = 'x"}, "at position 12"),
        ({"filter": "bogus.lr = 'x'"}, "at position 0"),
        ({"filter": "x" * 10_001}, "10001"),
        ({"order_by": ["metrics.loss", "params.lr up"]}, "order_by[1] at position 10"),
        ({"order_by": ["attributes.nope"]}, "order_by[0] at position 11"),
    ],
)
def test_malformed_requests_are_invalid_arguments(env: Env, kwargs: dict[str, Any], fragment: str) -> None:
    assert_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: env.search(**kwargs), fragment)


def test_unknown_view_type(env: Env) -> None:
    assert_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: env.search(run_view_type=99), "run_view_type")


def test_get_run_errors(env: Env) -> None:
    assert_code(grpc.StatusCode.NOT_FOUND, lambda: env.stub.GetRun(query_pb2.GetRunRequest(run_id="nope")),
                "no run 'nope'")
    assert_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: env.stub.GetRun(query_pb2.GetRunRequest()), "run_id")


# -- page tokens -----------------------------------------------------------------------------------


def _flip(token: str, i: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:i] + alphabet[(alphabet.index(token[i]) + 1) % 64] + token[i + 1 :]


def _with_version(token: str, version: int) -> str:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return base64.urlsafe_b64encode(bytes([version]) + raw[1:]).decode().rstrip("=")


def test_page_tokens_are_refused_when_not_ours_for_this_question(env: Env) -> None:
    question: dict[str, Any] = dict(order_by=["metrics.loss DESC"], max_results=7)
    token = env.search(**question).next_page_token
    assert token
    assert len(env.search(page_token=token, **question).runs) == 7
    bad = {
        "flipped early": _flip(token, 3),
        "flipped middle": _flip(token, len(token) // 2),
        "flipped late": _flip(token, len(token) - 2),
        "truncated": token[:-4],
        "garbage": "not a token!",
        "version": _with_version(token, 2),
    }
    for name, tampered in bad.items():
        assert_code(grpc.StatusCode.INVALID_ARGUMENT, lambda t=tampered: env.search(page_token=t, **question),  # type: ignore[misc]
                    "page_token: "), name
    # Another page size is the same question: the cursor is a place in the order, not a count.
    rest = expected_order(active(env.models), ["metrics.loss DESC"])[7:15]
    assert [r.info.run_id for r in env.search(page_token=token, order_by=["metrics.loss DESC"], max_results=8).runs
            ] == rest
    others: list[dict[str, Any]] = [
        dict(order_by=["metrics.loss ASC"], max_results=7),
        dict(order_by=["metrics.loss DESC"], max_results=7, filter="params.lr > 0"),
        dict(order_by=["metrics.loss DESC"], max_results=7, experiment_ids=["e1"]),
        dict(order_by=["metrics.loss DESC"], max_results=7, run_view_type=common_pb2.ALL),
    ]
    for other in others:
        assert_code(grpc.StatusCode.INVALID_ARGUMENT, lambda o=other: env.search(page_token=token, **o),  # type: ignore[misc]
                    "belongs to another search")


def test_refused_tokens_never_reach_the_store(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    search = direct_search(env.store)
    req = SearchRequest(order_by=("tags.x",), max_results=5)
    token = search.search(req).next_page_token
    assert token
    executed: list[str] = []
    real = env.store.query_rows

    def spy(sql: str, *args: Any, **kwargs: Any) -> Any:
        executed.append(sql)
        return real(sql, *args, **kwargs)

    monkeypatch.setattr(env.store, "query_rows", spy)
    for tampered in (_flip(token, len(token) // 2), _with_version(token, 0), "@@@"):
        with pytest.raises(InvalidArgument, match="page_token: "):
            search.search(SearchRequest(order_by=("tags.x",), max_results=5, page_token=tampered))
    with pytest.raises(InvalidArgument, match="belongs to another search"):
        search.search(SearchRequest(order_by=("tags.x DESC",), max_results=5, page_token=token))
    assert executed == []


# -- total count -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "predicate"), FILTERS[:6], ids=[f for f, _ in FILTERS[:6]])
def test_total_counts_every_match_on_every_page(env: Env, text: str, predicate: Callable[[Model], bool]) -> None:
    chosen = [m for m in active(env.models) if predicate(m)]
    first = env.search(filter=text, max_results=2, include_total=True)
    assert first.HasField("total") and first.total == len(chosen)
    if first.next_page_token:
        second = env.search(filter=text, max_results=2, include_total=True, page_token=first.next_page_token)
        assert second.total == len(chosen)
    assert not env.search(filter=text, max_results=2).HasField("total")


def test_total_respects_scope_and_view(env: Env) -> None:
    assert env.search(experiment_ids=["e1"], run_view_type=common_pb2.ALL, include_total=True).total == len(
        [m for m in env.models if m.info.experiment_id == "e1"])
    assert env.search(run_view_type=common_pb2.DELETED_ONLY, include_total=True).total == 3
    assert env.search(experiment_ids=["nope"], include_total=True).total == 0


def test_in_on_string_attributes_and_aliases(env: Env) -> None:
    chosen = [m for m in active(env.models) if m.info.status in ("FAILED", "RUNNING") and m.info.run_name != "run-1"]
    text = "attributes.status IN ('FAILED', 'RUNNING') AND `Run name` NOT IN ('run-1')"
    assert env.ids(filter=text) == expected_order(chosen, [])
    assert env.ids(filter="run.status IN ('FAILED', 'RUNNING') AND run_name NOT IN ('run-1')") == env.ids(filter=text)
    one = env.models[0]
    assert env.ids(filter=f"attr.run_id IN ('{one.run_id}')", run_view_type=common_pb2.ALL) == [one.run_id]


# -- the run index (schema migration 8) ----------------------------------------------------------

ODD_KEYS = {"params": {"a.b": "2020-01-01", "x y": "12", "k" * 250: "long"},
            "tags": {"ü.tag": "2020-01-01 10:00:00", "mlflow.note": "v"},
            "metrics": {"eval.loss": math.nan, "val/acc": -math.inf, "z": -0.0}}


def _put_metrics(store: Store, run_id: str, values: dict[str, float], step: int = 0) -> None:
    keys = list(values)
    store.insert_arrow("metrics", pa.table({
        "run_id": [run_id] * len(keys), "key": keys, "step": pa.array([step] * len(keys), pa.int64()),
        "timestamp": pa.array([T0] * len(keys), pa.int64()), "value": pa.array(list(values.values()), pa.float64()),
        "writer_id": ["w"] * len(keys), "seq": pa.array([1] * len(keys), pa.uint64()),
    }))


@pytest.fixture(scope="module")
def indexed(chdb_dsn: str) -> Iterator[tuple[Store, list[Model]]]:
    """The seeded runs plus keys with dots, spaces, 250 characters, date-like strings, NaN, ±inf
    and -0.0, then one refresher pass (a first build in chunks of 5 runs) with no lag."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        odd = models[1]
        store.put_params(odd.run_id, list(ODD_KEYS["params"].items()))
        store.put_tags(odd.run_id, list(ODD_KEYS["tags"].items()))
        _put_metrics(store, odd.run_id, ODD_KEYS["metrics"])
        odd.params.update(ODD_KEYS["params"])
        odd.tags.update(ODD_KEYS["tags"])
        odd.metrics.update(ODD_KEYS["metrics"])
        index = RunIndex(store, lag=0.0, chunk_runs=5)
        assert index.refresh() == len(models)
        watermark, usable = index.state()
        changed = changed_since(store.database, str(watermark))
        assert usable and store.query_rows(f"SELECT count() FROM {changed}") == [(0,)]  # all from the index
        yield store, models
    finally:
        store.close()


INDEX_FILTERS: list[tuple[str, Callable[[Model], bool]]] = [
    *FILTERS,
    ("", lambda m: True),
    ("params.`a.b` = '2020-01-01'", lambda m: m.params.get("a.b") == "2020-01-01"),
    ("params.`x y` >= 12 AND params.`a.b` LIKE '2020%'", lambda m: m.params.get("x y") == "12"),
    (f"params.{'k' * 250} = 'long'", lambda m: m.params.get("k" * 250) == "long"),
    ("tags.`ü.tag` != 'x' AND tags.`mlflow.note` IN ('v')", lambda m: "ü.tag" in m.tags),
    ("metrics.`eval.loss` != 1", lambda m: "eval.loss" in m.metrics),  # NaN != 1
    ("metrics.`val/acc` < 0 OR metrics.z = 0", lambda m: "z" in m.metrics),
    ("metrics.loss > -1e308", lambda m: m.metrics.get("loss", math.nan) > -1e308),  # not NaN, not missing
    ("tags.x ILIKE 'B%' OR attributes.end_time > 0", lambda m: m.tags.get("x", "").lower().startswith("b")
     or (m.info.end_time or 0) > 0),
]


@pytest.mark.parametrize(("text", "predicate"), INDEX_FILTERS, ids=[f[:60] for f, _ in INDEX_FILTERS])
def test_counts_read_from_the_run_index_equal_the_reference(indexed: tuple[Store, list[Model]], text: str,
                                                            predicate: Callable[[Model], bool]) -> None:
    store, models = indexed
    for view, stages in (("ACTIVE_ONLY", {"active"}), ("ALL", {"active", "deleted"})):
        chosen = [m for m in models if m.info.lifecycle_stage in stages and predicate(m)]
        assert direct_search(store).count(SearchRequest(filter=text, view=view)) == len(chosen), view
    e2 = [m for m in active(models) if m.info.experiment_id == "e2" and predicate(m)]
    assert direct_search(store).count(SearchRequest(experiment_ids=("e2",), filter=text)) == len(e2)


def test_the_run_index_answers_even_without_the_per_key_copies(chdb_dsn: str) -> None:
    """Counts of unchanged runs come from the index: emptied copies do not change them."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        RunIndex(store, lag=0.0).refresh()
        text, predicate = FILTERS[4]
        expected = len([m for m in active(models) if predicate(m)])
        for table in ("search_params", "search_tags", "search_metrics"):
            store.command(f"TRUNCATE TABLE {store.database}.{table}")
        assert expected > 0 and direct_search(store).count(SearchRequest(filter=text)) == expected
        off = RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_index=0))
        assert off.count(SearchRequest(filter=text)) == 0  # the copies' plan: nothing left to match
    finally:
        store.close()


@contextlib.contextmanager
def _refreshed(chdb_dsn: str) -> Iterator[tuple[Store, list[Model], RunIndex, RunSearch]]:
    """A seeded store whose run index one refresher pass (no lag) has built, and a search on it."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        index = RunIndex(store, lag=0.0)
        index.refresh()
        yield store, models, index, direct_search(store)
    finally:
        store.close()


def test_index_pages_show_each_run_from_its_run_pages_row_as_hydration_by_id_would(
        chdb_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Params, tags (a deleted one gone) and latest metrics (NaN, -inf, -0.0, step, min, max, count)
    of every run of an index page come from run_pages, built whole then by a pass; a run changed
    since the watermark, or without a row there, is read by id."""
    with _refreshed(chdb_dsn) as (store, models, index, search):
        odd = models[1].run_id
        store.put_params(odd, list(ODD_KEYS["params"].items()))
        store.put_tags(odd, list(ODD_KEYS["tags"].items()))
        _put_metrics(store, odd, ODD_KEYS["metrics"])
        _put_metrics(store, odd, {"loss": 5.0, "acc": -0.0}, step=99)  # the latest points: a later step
        store.put_tags(odd, [("ü.tag", "")], deleted=True)
        models[1].metrics.update({**ODD_KEYS["metrics"], "loss": 5.0, "acc": -0.0})
        assert index.refresh() == 1  # the odd run's pages row written by a pass, the others' by the build
        db = store.database

        by_id: list[list[str]] = []
        real = store.run_details_steps

        def page() -> list[RunDetails]:
            found = search.search(SearchRequest(order_by=("metrics.loss",), view="ALL", max_results=1000))
            assert len(found.runs) == len(models)
            reference = store.run(real([r.info.run_id for r in found.runs]))
            assert repr(found.runs) == repr(reference)  # NaN: repr
            return found.runs

        def spy(run_ids: Sequence[str], infos: Any = None) -> Any:
            by_id.append(list(run_ids))
            return real(run_ids, infos)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(store, "run_details_steps", spy)
            runs = page()
            assert by_id == []  # nothing read by id
            hits = _spy_hits(mp)
            for order in ("metrics.loss", "metrics.loss DESC"):  # read from run_order: records from run_pages too
                request = SearchRequest(filter="metrics.loss > -1e308", order_by=(order,), max_results=5)
                ordered = search.search(request)
                assert hits.pop() is not None and by_id == []
                with_loss = [m for m in active(models) if m.metrics.get("loss", math.nan) > -1e308]
                assert [r.info.run_id for r in ordered.runs] == expected_order(with_loss, [order])[:5]
                assert repr(ordered.runs) == repr(store.run(real([r.info.run_id for r in ordered.runs])))
                without = RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_pages=0)).search(request)
                assert hits.pop() is not None and repr(without.runs) == repr(ordered.runs)
                assert by_id.pop() == [r.info.run_id for r in ordered.runs]
            off = RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_pages=0))
            assert repr(off.search(SearchRequest(order_by=("metrics.loss",), view="ALL", max_results=1000)).runs) \
                == repr(runs)
            assert sorted(by_id.pop()) == sorted(r.info.run_id for r in runs)  # turned off: every run by id
            shown = next(r for r in runs if r.info.run_id == odd)
            assert shown.params["k" * 250] == "long" and "ü.tag" not in shown.tags and shown.tags["mlflow.note"] == "v"
            latest = {m.key: (m.value, m.step) for m in shown.metrics}  # (the latest key reads -0.0 back as 0.0)
            assert repr([latest[k] for k in ("acc", "eval.loss", "loss", "val/acc", "z")]) == repr(
                [(0.0, 99), (math.nan, 0), (5.0, 99), (-math.inf, 0), (0.0, 0)])
            # Proof the rows are read: a newer row of the odd run shows (the newest of its rows wins).
            [(page_json, version)] = store.query_rows(f"SELECT page, version FROM {db}.run_pages FINAL "
                                                      "WHERE run_id = {r:String}", {"r": odd})
            record = json.loads(page_json)[3]
            record[1] = "planted name"  # run_name
            store.command(f"INSERT INTO {db}.run_pages VALUES ({{r:String}}, {{p:String}}, {{v:UInt64}})",
                          {"r": odd, "p": json.dumps([[["planted", "yes"]], [], [], record]), "v": version + 1})
            planted = search.search(SearchRequest(order_by=("metrics.loss",), view="ALL", max_results=1000))
            planted_run = next(r for r in planted.runs if r.info.run_id == odd)
            store.command(f"INSERT INTO {db}.run_pages VALUES ({{r:String}}, '[[], [], []]', {{v:UInt64}})",
                          {"r": models[4].run_id, "v": 2**63})  # a row of another shape: read by id
            with caplog.at_level(logging.WARNING, logger="trackhouse.query.runpages"):
                odd_shape = search.search(SearchRequest(order_by=("metrics.loss",), view="ALL", max_results=1000))
            assert by_id.pop() == [models[4].run_id] and "cannot be read" in caplog.text
            assert next(r for r in odd_shape.runs if r.info.run_id == models[4].run_id) == next(
                r for r in runs if r.info.run_id == models[4].run_id)
            assert (planted_run.params, planted_run.tags, planted_run.metrics) == ({"planted": "yes"}, {}, [])
            assert planted_run.info == RunRecord(**{**shown.info.__dict__, "run_name": "planted name"})
            # Changed since the watermark (a tag), or without a row: read by id, current.
            store.put_tags(models[2].run_id, [("fresh", "1")])
            store.command(f"DELETE FROM {db}.run_pages WHERE run_id IN ({{r:String}}, {{s:String}})",
                          {"r": odd, "s": models[3].run_id})
            runs = page()
            assert sorted(by_id[-1]) == sorted([odd, models[2].run_id, models[3].run_id, models[4].run_id])
            assert next(r for r in runs if r.info.run_id == models[2].run_id).tags["fresh"] == "1"


def test_counts_are_read_after_write_between_refresher_passes(chdb_dsn: str) -> None:
    with _refreshed(chdb_dsn) as (store, models, index, search):

        def count(text: str) -> int:
            return search.count(SearchRequest(filter=text))

        before = count("params.optimizer = 'adam'")
        adam = next(m for m in active(models) if m.params.get("optimizer") == "adam")
        store.put_run(RunRecord(**{**adam.info.__dict__, "lifecycle_stage": "deleted"}))  # deleted since
        new = RunRecord(new_run_id(T0 + 99), "e1", "fresh", "bob", "RUNNING", T0 + 99, None, "active", "")
        store.put_run(new)
        store.put_params(new.run_id, [("optimizer", "adam")])
        assert count("params.optimizer = 'adam'") == before  # one gone, one new
        store.put_tags(new.run_id, [("stage", "prod")])
        _put_metrics(store, new.run_id, {"loss": 0.25})
        assert count("tags.stage = 'prod' AND metrics.loss < 0.3") == 1

        def page(text: str) -> list[str]:
            found = search.search(SearchRequest(filter=text, order_by=("metrics.loss",), max_results=1000))
            ids = [r.info.run_id for r in found.runs]
            assert repr(found.runs) == repr(store.get_run_details(ids))  # records read from index rows (NaN: repr)
            return ids

        store.put_run(RunRecord(**{**new.__dict__, "status": "FINISHED", "end_time": T0 + 100}))
        adams = page("params.optimizer = 'adam'")
        assert new.run_id in adams and adam.run_id not in adams and len(adams) == before
        assert page("tags.stage = 'prod' AND metrics.loss < 0.3") == [new.run_id]
        store.put_tags(new.run_id, [("stage", "prod")], deleted=True)
        assert count("tags.stage = 'prod'") == 0
        assert page("tags.stage = 'prod'") == []
        store.put_params(new.run_id, list(ODD_KEYS["params"].items()))  # read back from rows computed now
        store.put_tags(new.run_id, list(ODD_KEYS["tags"].items()))
        _put_metrics(store, new.run_id, ODD_KEYS["metrics"])
        for text in ("params.`a.b` = '2020-01-01' AND tags.`ü.tag` LIKE '2020-01-01 %'",
                     "metrics.`eval.loss` != 1 AND metrics.`val/acc` < 0 AND metrics.z = 0"):
            assert count(text) == 1 and page(text) == [new.run_id], text
        assert index.refresh() >= 2  # the changed runs, recomputed
        assert page("params.optimizer = 'adam'") == adams
        assert count("params.optimizer = 'adam'") == before and count("tags.stage = 'prod'") == 0
        assert count("metrics.loss < 0.3 AND attributes.run_name = 'fresh'") == 1
        assert index.refresh() == 0  # nothing changed since


INDEX_ORDERS = [["metrics.loss DESC"], ["params.lr", "tags.x DESC"], ["metrics.acc ASC", "attributes.run_name"],
                ["tags.`ü.tag`", "metrics.`eval.loss` DESC"], ["attributes.end_time DESC"]]


@pytest.mark.parametrize("order_by", INDEX_ORDERS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize(("text", "predicate"), [INDEX_FILTERS[i] for i in (0, 5, 6, 11, 13, 17, 18)],
                         ids=lambda f: f[:40] if isinstance(f, str) else "")
def test_pages_read_from_the_run_index_equal_the_reference(indexed: tuple[Store, list[Model]], order_by: list[str],
                                                           text: str, predicate: Callable[[Model], bool]) -> None:
    store, models = indexed
    search = direct_search(store)
    want = expected_order([m for m in active(models) if predicate(m)], order_by)
    got: list[str] = []
    token = ""
    for _ in range(100):
        page = search.search(SearchRequest(filter=text, order_by=tuple(order_by), max_results=4, page_token=token))
        got += [r.info.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert got == want


def test_the_query_service_builds_the_run_index_and_searches_read_it(chdb_dsn: str) -> None:
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        query = QuerySettings(run_index_refresh_seconds=0.05, run_index_lag_seconds=0.0)
        thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0, query=query), store=store)
        address = thread.start()
        try:
            app = next(a for a in thread.server._apps if hasattr(a, "refresher"))
            assert app.refresher.first_pass.wait(30.0)
            text, predicate = FILTERS[4]
            for table in ("search_params", "search_tags", "search_metrics"):  # only the index can answer now
                store.command(f"TRUNCATE TABLE {store.database}.{table}")
            with grpc.insecure_channel(address) as channel:
                stub = query_pb2_grpc.QueryServiceStub(channel)
                found = stub.SearchRuns(query_pb2.SearchRunsRequest(filter=text, order_by=["metrics.loss DESC"],
                                                                    include_total=True, max_results=100))
            chosen = [m for m in active(models) if predicate(m)]
            assert found.total == len(chosen) > 0
            assert [r.info.run_id for r in found.runs] == expected_order(chosen, ["metrics.loss DESC"])
        finally:
            thread.stop(grace=1.0)
    finally:
        store.close()


def test_searches_fall_back_to_the_copies_when_the_index_cannot_answer(chdb_dsn: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Not built yet, a watermark older than run_changes keeps, or too many runs changed since:
    the per-key copies answer (an emptied index proves the index is not read)."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        text, predicate = FILTERS[4]
        expected = len([m for m in active(models) if predicate(m)])
        order = ("metrics.loss DESC",)
        want = expected_order([m for m in active(models) if predicate(m)], list(order))
        search = RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_index_state_seconds=0))  # no state held

        def answers() -> tuple[int, list[str]]:
            page = search.search(SearchRequest(filter=text, order_by=order, max_results=100, include_total=True))
            return page.total or 0, [r.info.run_id for r in page.runs]

        assert answers() == (expected, want)  # never built
        index = RunIndex(store, lag=0.0)
        index.refresh()
        store.command(f"TRUNCATE TABLE {store.database}.run_index")  # from here on the index answers nothing
        assert answers() == (0, [])  # proof that the index is read while it can answer
        store.put_tags(models[0].run_id, [("touched", "1")])
        store.put_tags(models[1].run_id, [("touched", "1")])
        monkeypatch.setattr(search_module, "MAX_CHANGED", 1)
        assert answers() == (expected, want)  # 2 runs changed since the watermark, more than MAX_CHANGED
        monkeypatch.undo()
        store.command(f"INSERT INTO {store.database}.run_index_state (key, watermark, runs) "
                      "VALUES ({k:String}, now64(6) - INTERVAL 30 DAY, 0)", {"k": STATE_KEY})
        store.command(f"OPTIMIZE TABLE {store.database}.run_index_state FINAL")
        assert index.state()[1] is True  # the latest pass still counts: max(watermark)
        store.command(f"TRUNCATE TABLE {store.database}.run_index_state")
        store.command(f"INSERT INTO {store.database}.run_index_state (key, watermark, runs) "
                      "VALUES ({k:String}, now64(6) - INTERVAL 30 DAY, 0)", {"k": STATE_KEY})
        assert index.state() == (None, False)  # older than run_changes keeps its rows
        store.command(f"INSERT INTO {store.database}.run_index_state (key, watermark, runs) "
                      "VALUES ('run_index', now64(6), 0), ('run_index@9', now64(6), 0), ('run_index@10', now64(6), 0)")
        assert index.state() == (None, False)  # refreshers from before migrations 9 and 10 vouch for nothing
        store.command(f"TRUNCATE TABLE {store.database}.run_pages")  # as migration 10 leaves a store
        assert answers() == (expected, want)
        assert index.refresh() == len(models)  # such an index is rebuilt whole, its pages with it
        assert store.query_rows(f"SELECT uniqExact(run_id) FROM {store.database}.run_pages") == [(len(models),)]
        assert answers() == (expected, want)
    finally:
        store.close()


def test_a_failed_refresher_pass_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky:
        calls = 0

        def refresh(self) -> int:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("store away")
            return 0

    refresher = Refresher(Flaky(), interval=0.01)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="trackhouse.query.runindex"):
        refresher.start()
        try:
            assert refresher.first_pass.wait(10.0)
        finally:
            refresher.stop()
    assert Flaky.calls >= 2 and refresher.passes >= 1
    assert any("refresh failed (store away)" in r.getMessage() for r in caplog.records)


def test_the_watermark_is_written_before_the_value_order_is_built(chdb_dsn: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Building (and merging) a generation takes minutes at 10 M runs: searches use the index meanwhile."""
    from trackhouse.query import runorder

    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        usable: list[bool] = []
        original = runorder.RunOrder.rebuild

        def rebuild(self: runorder.RunOrder) -> int:
            usable.append(RunIndex(store).state()[1])
            return original(self)

        monkeypatch.setattr(runorder.RunOrder, "rebuild", rebuild)
        assert RunIndex(store, lag=0.0).refresh() == len(models)
        assert usable == [True] and runorder.RunOrder(store).state()[0] == 1
    finally:
        store.close()


def test_a_failed_merge_after_the_build_leaves_a_usable_index(chdb_dsn: str, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from trackhouse.query import runindex, runorder

    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        monkeypatch.setattr(runindex, "optimize_final", lambda layout, table: "OPTIMIZE TABLE no_such.table FINAL")
        monkeypatch.setattr(runorder, "optimize_final", lambda layout, table, part: "OPTIMIZE TABLE no_such.t FINAL")
        with caplog.at_level(logging.WARNING):
            assert RunIndex(store, lag=0.0).refresh() == len(models)
        messages = [r.getMessage() for r in caplog.records]
        assert any("merging the built parts failed" in m for m in messages)
        assert any("merging generation 1 failed" in m for m in messages)
        assert runorder.RunOrder(store, margin=0.0).state()[0] == 1  # published all the same
        text, predicate = FILTERS[4]
        want = [m for m in active(models) if predicate(m)]
        assert direct_search(store).count(SearchRequest(filter=text)) == len(want)
        hits = _spy_hits(monkeypatch)
        assert _walk(direct_search(store), text, "metrics.loss", 2) == expected_order(want, ["metrics.loss"])
        assert hits and all(h is not None for h in hits[:-1])  # read from run_order
    finally:
        store.close()


# -- the run index's value order (runorder.py, schema migration 9) ---------------------------------

ORDER_METRICS = ["metrics.loss", "metrics.loss DESC", "metrics.acc DESC", "metrics.`eval.loss`",
                 "metrics.`eval.loss` DESC", "metrics.`val/acc`", "metrics.z DESC"]


def _spy_hits(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What every `_ordered_hits` of the test returns (None: the page read the index whole)."""
    seen: list[Any] = []
    original = RunSearch._ordered_hits

    def spy(self: RunSearch, *args: Any) -> Any:
        hits = yield from original(self, *args)
        seen.append(hits)
        return hits

    monkeypatch.setattr(RunSearch, "_ordered_hits", spy)
    return seen


def _spy_sql(monkeypatch: pytest.MonkeyPatch, store: Store) -> list[str]:
    """The SQL of every read the store runs from here on."""
    reads: list[str] = []
    execute = store._execute

    def spy(request: Any) -> Any:
        reads.append(request.sql)
        return execute(request)

    monkeypatch.setattr(store, "_execute", spy)
    return reads


def _walk(search: RunSearch, text: str, order_by: str, size: int, view: str = "ACTIVE_ONLY") -> list[str]:
    got: list[str] = []
    token = ""
    for _ in range(100):
        page = search.search(SearchRequest(filter=text, order_by=(order_by,), max_results=size, page_token=token,
                                           view=view))
        got += [r.info.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            return got
    raise AssertionError("more than 100 pages")


@pytest.mark.parametrize("order_by", ORDER_METRICS)
@pytest.mark.parametrize(("text", "predicate"), [
    *(INDEX_FILTERS[i] for i in (0, 5, 11, 13, 17, 18)),
    ("metrics.loss != 12345", lambda m: "loss" in m.metrics),  # NaN passes: read from run_order to the end
], ids=lambda f: f[:40] if isinstance(f, str) else "")
def test_pages_ordered_by_one_metric_stop_early_and_equal_the_reference(
        indexed: tuple[Store, list[Model]], monkeypatch: pytest.MonkeyPatch, order_by: str, text: str,
        predicate: Callable[[Model], bool]) -> None:
    """Candidates read 3 at a time at first (ties, NaN, ±inf, -0.0 and missing values across
    chunk edges), every page walked by its tokens, in both views."""
    store, models = indexed
    monkeypatch.setattr(search_module, "ORDER_CHUNK", 1)
    monkeypatch.setattr(search_module, "ORDER_GROWTH", 2)
    seen = _spy_hits(monkeypatch)
    for view, stages in (("ACTIVE_ONLY", {"active"}), ("ALL", {"active", "deleted"})):
        chosen = [m for m in models if m.info.lifecycle_stage in stages and predicate(m)]
        assert _walk(direct_search(store), text, order_by, 2, view) == expected_order(chosen, [order_by]), view
    key = order_by.split(".", 1)[1].split(" ")[0].strip("`")
    if sum(1 for m in active(models) if predicate(m) and key in m.metrics) > 2:
        assert seen[0] is not None  # the first page came from run_order: 3 runs with the key match


def test_a_page_ordered_by_one_metric_is_read_from_run_order(chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows taken out of run_order vanish from the page (the whole index would still have them);
    a filter too selective to stop early reads the index whole; so do large pages."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        RunIndex(store, lag=0.0).refresh()
        search, order = direct_search(store), ("metrics.loss",)
        want = expected_order(active(models), list(order))

        def page(size: int = 5, text: str = "") -> list[str]:
            found = search.search(SearchRequest(filter=text, order_by=order, max_results=size))
            return [r.info.run_id for r in found.runs]

        assert page() == want[:5]
        store.command(f"ALTER TABLE {store.database}.run_order DELETE WHERE run_id = {{r:String}} "
                      "SETTINGS mutations_sync = 2", {"r": want[1]})
        assert page() == [want[0], *want[2:6]]
        monkeypatch.setattr(search_module, "ORDER_CHUNK", 1)  # 6 candidates, 5 of them kept
        monkeypatch.setattr(search_module, "ORDER_CANDIDATES", 6)
        third = next(m for m in models if m.run_id == want[2])
        not_third = f"tags.i != '{third.tags['i']}'"
        assert page(5, not_third) == [want[0], want[1], *want[3:6]]  # gave up: the whole index answered
        monkeypatch.undo()
        assert RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_order_max_results=4)).search(
            SearchRequest(order_by=order, max_results=5)).runs[1].info.run_id == want[1]
        # Candidates run out: with a term on the order key no run missing it can match, otherwise
        # the index is read whole (the missing ones follow).
        seen = _spy_hits(monkeypatch)
        text, predicate = next(f for f in INDEX_FILTERS if f[0] == "metrics.loss > -1e308")
        finite = expected_order([m for m in active(models) if predicate(m)], list(order))
        assert page(100, text) == [r for r in finite if r != want[1]] and seen[-1] is not None
        assert page(100) == want and seen[-1] is None
    finally:
        store.close()


def test_run_order_follows_changes_and_is_rebuilt_once_stale_rows_pile_up(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from trackhouse.query import runorder

    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        models = seed(store)
        index, order = RunIndex(store, lag=0.0), runorder.RunOrder(store)
        index.refresh()
        generation, rows = order.state()
        live = sum(2 * len(m.metrics) for m in models)
        assert generation == 1 and rows == live
        search = direct_search(store)
        rng = random.Random(7)
        for round_ in range(3):  # new latest values: each pass adds rows, the old ones go stale
            for m in rng.sample(active(models), 6):
                m.metrics["loss"] = rng.choice([0.5, math.nan, rng.random()])
                _put_metrics(store, m.run_id, {"loss": m.metrics["loss"]}, step=100 + round_)  # the latest step
            for direction in ("", " DESC"):  # read after write: the changed runs come from their rows now
                assert _walk(search, "", "metrics.loss" + direction, 3) == expected_order(
                    active(models), ["metrics.loss" + direction])
            assert index.refresh() == 6
            for direction in ("", " DESC"):  # and from run_order once the pass took them in
                assert _walk(search, "", "metrics.loss" + direction, 3) == expected_order(
                    active(models), ["metrics.loss" + direction])
        held = store.query_rows(f"SELECT count() FROM {store.database}.run_order")[0][0]
        assert held > live and order.state() == (1, rows)
        monkeypatch.setattr(runorder, "REBUILD_GROWTH", 1.0)
        m = active(models)[0]
        store.put_tags(m.run_id, [("touched", "1")])
        assert index.refresh() == 1
        live = sum(2 * len(m.metrics) for m in models)  # some runs had no loss before
        assert order.state() == (2, live)  # rebuilt without the stale rows
        generations = f"SELECT generation, count() FROM {store.database}.run_order GROUP BY generation ORDER BY 1"
        assert [g for g, _ in store.query_rows(generations)] == [1, 2]  # the old one kept a while for reads
        assert _walk(search, "", "metrics.loss DESC", 4) == expected_order(active(models), ["metrics.loss DESC"])
        later = RunIndex(store, lag=0.0)  # another process: it finds generation 1 and retires it
        assert later.refresh() == 0 and [g for g, _ in store.query_rows(generations)] == [1, 2]
        later._order.tidy(now=math.inf)  # its grace over
        assert store.query_rows(generations) == [(2, live)]
        # An index built before migration 9 (no generation yet): the next pass builds one.
        store.command(f"TRUNCATE TABLE {store.database}.run_order_state")
        store.command(f"TRUNCATE TABLE {store.database}.run_order")
        assert _walk(search, "", "metrics.loss", 4) == expected_order(active(models), ["metrics.loss"])
        assert index.refresh() == 0 and order.state() == (1, live)
    finally:
        store.close()


def test_a_candidate_whose_run_no_longer_passes_the_filter_is_skipped_not_answered_as_changed(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass rewrote a run (a tag changed): its old run_order rows still pass the filter, its index
    row no longer does. The run is left out, and the page needs no rows computed now."""
    with _refreshed(chdb_dsn) as (store, models, index, search):
        text, order = "(tags.x = 'a' OR tags.x = 'b') AND metrics.loss > -1e308", "metrics.loss"
        matching = [m for m in active(models)
                    if m.tags.get("x") in ("a", "b") and m.metrics.get("loss", math.nan) > -1e308]
        first = next(r for r in expected_order(matching, [order]) if r in {m.run_id for m in matching})
        store.put_tags(first, [("x", "z")])
        assert index.refresh() == 1
        hits = _spy_hits(monkeypatch)
        ids = [r.info.run_id for r in search.search(SearchRequest(filter=text, order_by=(order,), max_results=3)).runs]
        rest = [m for m in matching if m.run_id != first]
        assert ids == expected_order(rest, [order])[:3] and first not in ids
        [(found, late)] = hits
        assert found and late == []


@pytest.mark.parametrize("order", ["metrics.loss", "metrics.loss DESC"])
def test_candidates_of_rows_an_earlier_pass_superseded_are_skipped_not_answered_as_changed(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """A pass that ended before the search moved three runs (new latest values: one to NaN); their
    old run_order rows stay until the next generation. Every page is right and none needs rows
    computed now: an old row is skipped whether the run's current row sorts later in the page,
    after it, or on an earlier page, where it was read at its place."""
    with _refreshed(chdb_dsn) as (store, models, index, search):
        ranked = expected_order(active(models), [order])
        by_id = {m.run_id: m for m in models}
        finite = [r for r in ranked if math.isfinite(by_id[r].metrics.get("loss", math.nan))]
        later, earlier, nearby = by_id[finite[0]], by_id[finite[6]], by_id[finite[3]]
        sign = 1 if order == "metrics.loss" else -1
        moves = {later.run_id: math.nan, earlier.run_id: -sign * 1e300,
                 nearby.run_id: nearby.metrics["loss"] + sign * 0.05}
        for run_id, loss in moves.items():
            by_id[run_id].metrics["loss"] = loss
            _put_metrics(store, run_id, {"loss": loss}, step=100)  # the latest step
        assert index.refresh() == 3
        db = store.database
        stale = store.query_rows(f"SELECT count() FROM {db}.run_order WHERE key = 'loss' AND run_id IN "
                                 f"{{r:Array(String)}} AND version < (SELECT max(version) FROM {db}.run_index)",
                                 {"r": list(moves)})[0][0]
        assert stale == 6  # their old rows (both directions) are still there to be read
        hits = _spy_hits(monkeypatch)
        assert _walk(search, "", order, 3) == expected_order(active(models), [order])
        assert sum(h is not None for h in hits) >= 4  # read from run_order
        assert [h[1] for h in hits if h is not None] == [[] for h in hits if h is not None]


@pytest.mark.parametrize("order", ["metrics.loss", "metrics.loss DESC"])
def test_a_runs_rows_superseded_beside_its_current_one_are_not_checked(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """Two passes over the first page's runs that change no value (a tag each time) leave each run
    three run_order rows at one place, newest first: the page is right, and each run is checked
    on run_index once, from its current row, not once per row."""
    with _refreshed(chdb_dsn) as (store, models, index, search):
        top = expected_order(active(models), [order])[:3]
        for value in ("1", "2"):
            store.put_tags(top[0], [("touched", value)])
            store.put_tags(top[1], [("touched", value)])
            store.put_tags(top[2], [("touched", value)])
            assert index.refresh() == 3
            for m in models:
                if m.run_id in top:
                    m.tags["touched"] = value
        db = store.database
        rows = store.query_rows(f"SELECT run_id, count() FROM {db}.run_order WHERE key = 'loss' "
                                "AND run_id IN {r:Array(String)} GROUP BY run_id", {"r": top})
        assert sorted(n for _, n in rows) == [6, 6, 6]  # three in each direction
        checked: list[list[str]] = []
        execute, all_ids = store._execute, {m.run_id for m in models}

        def spy(request: Any) -> Any:
            if f"FROM {db}.run_index WHERE start_time IN" in request.sql:
                checked.extend(v for v in (request.parameters or {}).values() if isinstance(v, list) and v
                            and set(v) <= all_ids)  # the candidates' ids
            return execute(request)

        monkeypatch.setattr(store, "_execute", spy)
        hits = _spy_hits(monkeypatch)
        page = search.search(SearchRequest(order_by=(order,), max_results=5))
        assert [r.info.run_id for r in page.runs] == expected_order(active(models), [order])[:5]
        assert hits[0] is not None and hits[0][1] == []  # from run_order, nothing answered as changed
        ids = [i for chunk in checked for i in chunk]
        assert set(top) <= set(ids) and len(ids) == len(set(ids))  # each run checked once


@pytest.mark.parametrize("order", ["metrics.loss", "metrics.loss DESC"])
def test_changed_runs_at_the_top_are_computed_a_chunk_at_a_time(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """Twenty runs changed since the watermark, all moved to the top of the order: a page of two
    computes the first chunk of them (3 x 3, in the page's order) and stops, for the tenth sorts
    after its three rows; walking every page stays right (later pages compute more chunks)."""
    with _refreshed(chdb_dsn) as (store, models, _index, search):
        sign = 1 if order == "metrics.loss" else -1
        moved = [m for m in active(models) if "loss" in m.metrics][:20]
        for i, m in enumerate(moved):
            m.metrics["loss"] = -sign * (1e290 * (20 - i))
            _put_metrics(store, m.run_id, {"loss": m.metrics["loss"]}, step=100)
        computed: list[list[int]] = []
        execute, all_ids = store._execute, {m.run_id for m in models}

        def spy(request: Any) -> Any:
            if "CAST(params, 'JSON')" in request.sql:  # rows computed now (runindex.fresh_sql)
                lists = [v for v in (request.parameters or {}).values()
                         if isinstance(v, list) and v and set(v) <= all_ids]
                computed.append(sorted(len(v) for v in lists))
            return execute(request)

        monkeypatch.setattr(store, "_execute", spy)
        page = search.search(SearchRequest(order_by=(order,), max_results=2))
        expected = expected_order(active(models), [order])
        assert [r.info.run_id for r in page.runs] == expected[:2] == [moved[0].run_id, moved[1].run_id]
        assert computed == [[3, 9, 20]]  # the hits read from the index, the chunk computed, all changed
        assert _walk(search, "", order, 2) == expected
        assert _walk(search, "metrics.loss < 0" if sign > 0 else "metrics.loss > 0", order, 3) == [
            r for r in expected if sign * by_loss(models)[r] < 0]


def test_rows_computed_now_hold_only_the_keys_a_read_asks_for(chdb_dsn: str) -> None:
    """A changed run's row computed for a page holds the keys its filter and order read, no more:
    a map the read does not name is empty."""
    with _refreshed(chdb_dsn) as (store, models, _index, _):
        run = next(m for m in models if len(m.params) > 1 and len(m.tags) > 1 and "loss" in m.metrics)
        tag = sorted(run.tags)[0]
        sql = fresh_sql(store.database, "{ids:Array(String)}", keys={"tags": "key IN {k:Array(String)}"})
        params, tags, metrics = store.query_rows(
            f"SELECT toJSONString(params), toJSONString(tags), toJSONString(metrics) FROM ({sql})",
            {"ids": [run.run_id], "k": [tag]}, settings=FRESH_SETTINGS)[0]
        assert (json.loads(params), json.loads(metrics)) == ({}, {})
        assert json.loads(tags) == {"k" + tag.encode().hex().upper(): run.tags[tag]}
        whole = fresh_sql(store.database, "{ids:Array(String)}")
        everything = store.query_rows(f"SELECT toJSONString(tags) FROM ({whole})", {"ids": [run.run_id]},
                                      settings=FRESH_SETTINGS)[0][0]
        assert len(json.loads(everything)) == len(run.tags) > 1


def by_loss(models: list[Model]) -> dict[str, float]:
    return {m.run_id: m.metrics.get("loss", math.nan) for m in models}


@pytest.mark.parametrize("order", ["metrics.loss", "metrics.loss DESC"])
def test_a_run_order_row_newer_than_its_runs_index_row_hides_nothing(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """Mid-pass, a pass that changes no value has written a run's new run_order rows (version + 1)
    but not yet its run_index row: the newer candidate is not confirmed by the check, and the run
    is shown at its place from its current row, not lost (found by review)."""
    with _refreshed(chdb_dsn) as (store, models, _index, search):
        db, want = store.database, expected_order(active(models), [order])[:5]
        store.command(f"INSERT INTO {db}.run_order (generation, key, descending, rank, value, neg_start, run_id, "
                      f"experiment_id, lifecycle_stage, version) SELECT generation, key, descending, rank, value, "
                      f"neg_start, run_id, experiment_id, lifecycle_stage, version + 1 FROM {db}.run_order "
                      f"WHERE run_id = '{want[1]}'")
        hits = _spy_hits(monkeypatch)
        assert [r.info.run_id for r in search.search(SearchRequest(order_by=(order,), max_results=5)).runs] == want
        assert hits[0] is not None  # from run_order


def test_the_index_state_is_held_for_its_seconds_and_pages_stay_right_meanwhile(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search service reads the run index's state once per `run_index_state_seconds`; a pass in
    between (a run moved to the top) leaves the held watermark behind, and the moved run is
    answered as a changed run: every page is right while the state is held, and after."""
    with _refreshed(chdb_dsn) as (store, models, index, _):
        clock = [1000.0]
        monkeypatch.setattr(search_module, "monotonic", lambda: clock[0])
        reads = _spy_sql(monkeypatch, store)
        search = RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_index_state_seconds=1.0))
        request = SearchRequest(order_by=("metrics.loss",), max_results=4)
        def states() -> int:
            return sum(sql == state_sql(store.database) for sql in reads)

        def page() -> list[str]:
            return [r.info.run_id for r in search.search(request).runs]

        assert page() == expected_order(active(models), ["metrics.loss"])[:4] and states() == 1
        moved = next(m for m in active(models) if m.run_id == expected_order(active(models), ["metrics.loss"])[3])
        moved.metrics["loss"] = -1e300
        _put_metrics(store, moved.run_id, {"loss": -1e300}, step=100)
        assert page() == expected_order(active(models), ["metrics.loss"])[:4] and states() == 1  # a changed run
        assert index.refresh() == 1  # its new run_order rows, and a watermark past its change
        assert page() == expected_order(active(models), ["metrics.loss"])[:4] and states() == 1  # held
        clock[0] += 1.0
        assert page() == expected_order(active(models), ["metrics.loss"])[:4] and states() == 2  # read again
        for wrong in (11, -1, math.nan, math.inf):
            with pytest.raises(ValueError, match="run_index_state_seconds"):
                QuerySettings(run_index_state_seconds=wrong)
        for name in ("TRACKHOUSE_QUERY_MAX_QUERY_SECONDS", "TRACKHOUSE_QUERY_MAX_RESULTS"):
            for text in ("nan", "1" + "0" * 400):
                with pytest.raises(ValueError, match=r"finite|whole number"):
                    QuerySettings.from_env({name: text})


def test_changed_runs_that_sort_after_a_full_page_are_not_computed_again(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs changed since the watermark are answered from rows computed now, but only those whose
    latest value of the page's metric sorts within the page: one that fell out of it is left out
    unread, one still within it (its value unchanged) and one that rose into it are computed."""
    with _refreshed(chdb_dsn) as (store, models, _index, _):
        reads = _spy_sql(monkeypatch, store)
        search = RunSearch(store, TokenCodec(b"k" * 32), QuerySettings(run_index_state_seconds=0))
        order = ["metrics.loss"]

        def page() -> list[str]:
            reads.clear()
            return [r.info.run_id for r in search.search(SearchRequest(order_by=tuple(order), max_results=4)).runs]

        def computed() -> bool:  # a read of rows computed now (runindex.fresh_sql)
            return any("CAST(params, 'JSON')" in sql for sql in reads)

        first = expected_order(active(models), order)
        fell = next(m for m in models if m.run_id == first[1])
        fell.metrics["loss"] = 1e300
        _put_metrics(store, fell.run_id, {"loss": 1e300}, step=100)
        assert page() == expected_order(active(models), order)[:4] and fell.run_id not in page()
        assert not computed()  # it changed, and sorts after the page: not computed again
        fifth = expected_order(active(models), order)[5]
        tie = next(m for m in models if m.run_id == expected_order(active(models), order)[4])
        _put_metrics(store, tie.run_id, {"loss": tie.metrics["loss"]}, step=100)  # same value: still within
        assert page() == expected_order(active(models), order)[:4] and computed()
        rose = next(m for m in models if m.run_id == fifth)
        rose.metrics["loss"] = -1e300
        _put_metrics(store, rose.run_id, {"loss": -1e300}, step=100)
        assert page() == expected_order(active(models), order)[:4] and rose.run_id in page() and computed()


def test_an_index_built_again_reads_no_generation_of_the_index_before_until_its_own_is_built(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build pass (a new state key after an upgrade, or a watermark too old) writes its watermark
    before its value order is built: a run created since the last pass has no row in the older
    generation and is not a changed run, so pages read the whole index until the new generation
    is published (the next pass builds it when this one's build failed)."""
    with _refreshed(chdb_dsn) as (store, models, index, _):
        base = active(models)[0]
        info = RunRecord(**{**base.info.__dict__, "run_id": "ffffffffff", "artifact_uri": "file:///a/new"})
        store.insert_rows("runs", (*RunRecord.__dataclass_fields__, "version"),
                          [(*info.__dict__.values(), new_version())])
        _put_metrics(store, info.run_id, {"loss": -1e300})
        added = Model(info, metrics={"loss": -1e300})
        store.command(f"TRUNCATE TABLE {store.database}.run_index_state")  # the next pass builds the index
        with monkeypatch.context() as patch:
            def failed(self: Any) -> int:
                raise StoreError("merge failed")
            patch.setattr(runorder_module.RunOrder, "rebuild", failed)
            assert index.refresh() == len(models) + 1
        hits = _spy_hits(monkeypatch)
        request = SearchRequest(filter="metrics.loss < 0.5", order_by=("metrics.loss",), max_results=3)
        want = expected_order([m for m in active([*models, added]) if m.metrics.get("loss", math.nan) < 0.5],
                              ["metrics.loss"])[:3]
        assert [r.info.run_id for r in direct_search(store).search(request).runs] == want and hits == []  # no run_order
        generations = f"SELECT max(generation) FROM {store.database}.run_order_state"
        assert store.query_rows(generations) == [(1,)]  # readers from before retract go on reading generation 1
        assert index.refresh() == 0  # upkeep builds the generation the build pass did not
        assert [r.info.run_id for r in direct_search(store).search(request).runs] == want and hits[-1] is not None


def test_a_first_generation_published_while_a_pass_writes_gets_that_passes_rows(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No generation yet when a pass starts (another refresher is building the first): one
    published before the pass's run_index rows gets them too."""
    with _refreshed(chdb_dsn) as (store, models, index, _):
        db = store.database
        store.command(f"TRUNCATE TABLE {db}.run_order_state")
        store.command(f"TRUNCATE TABLE {db}.run_order")
        order = ["metrics.loss"]
        moved = next(m for m in reversed(active(models)) if math.isfinite(m.metrics.get("loss", math.nan)))
        moved.metrics["loss"] = -1e300
        _put_metrics(store, moved.run_id, {"loss": -1e300}, step=100)
        maintain = store.maintain

        def rebuilt_before_pages(sql: str, parameters: dict[str, Any] | None = None) -> None:
            if sql.startswith(f"INSERT INTO {db}.run_pages"):
                runorder_module.RunOrder(store).rebuild()  # elsewhere, before this pass's run_index rows
            maintain(sql, parameters)

        monkeypatch.setattr(store, "maintain", rebuilt_before_pages)
        assert index.refresh() == 1
        monkeypatch.undo()
        hits = _spy_hits(monkeypatch)
        page = direct_search(store).search(SearchRequest(order_by=tuple(order), max_results=3))
        assert [r.info.run_id for r in page.runs] == expected_order(active(models), order)[:3] and hits[-1] is not None


def test_runs_without_metrics_get_one_generation_not_one_a_pass(chdb_dsn: str) -> None:
    """A generation with no rows (no run has a metric) is built once, not taken for a retracted one;
    searches read it."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        store.put_experiment(ExperimentRecord("e1", "exp-e1", "file:///e1", "active", T0, T0))
        store.put_run(RunRecord("aaaaaaaaaa", "e1", "r", "ann", "RUNNING", T0, None, "active", "file:///a"))
        index = RunIndex(store, lag=0.0)
        assert index.refresh() == 1 and index._order.state() == (1, 0)
        assert index.refresh() == 0 and index._order.state() == (1, 0)
        assert store.query_rows(f"SELECT {runorder_module.generation_sql(store.database)}") == [(1,)]
    finally:
        store.close()


def test_a_generation_published_while_a_pass_writes_gets_that_passes_rows(chdb_dsn: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Another refresher publishes a new generation (its catch-up copies run_index) between a
    pass's run_order rows and its run_index rows: the pass copies its rows into it afterwards."""
    with _refreshed(chdb_dsn) as (store, models, index, _):
        order = ["metrics.loss"]
        by_id = {m.run_id: m for m in models}
        last = next(by_id[r] for r in reversed(expected_order(active(models), order))
                    if math.isfinite(by_id[r].metrics.get("loss", math.nan)))
        last.metrics["loss"] = -1e300
        _put_metrics(store, last.run_id, {"loss": -1e300}, step=100)
        add = runorder_module.RunOrder.add

        def add_then_rebuilt(self: Any, source: str, params: dict[str, Any], generation: int) -> None:
            add(self, source, params, generation)
            runorder_module.RunOrder(store).rebuild()  # elsewhere, before this pass's run_index rows

        monkeypatch.setattr(runorder_module.RunOrder, "add", add_then_rebuilt)
        assert index.refresh() == 1
        monkeypatch.undo()
        page = direct_search(store).search(SearchRequest(order_by=tuple(order), max_results=3))
        assert [r.info.run_id for r in page.runs] == expected_order(active(models), order)[:3]
        assert page.runs[1].info.run_id == last.run_id  # after -inf


@pytest.mark.parametrize("order", ["metrics.loss", "metrics.loss DESC"])
def test_a_run_refreshed_while_a_value_ordered_search_runs_is_answered_from_its_rows_now(chdb_dsn: str,
                                                                                          order: str) -> None:
    """The search read the watermark; a pass then replaced the index row of a run it reads a
    candidate of, and the search misses the run's new run_order rows: the run is on the
    page all the same, answered as a changed run (from its rows computed now)."""
    with _refreshed(chdb_dsn) as (store, models, index, search):
        before = store.run(search._changed())
        third = expected_order(active(models), [order])[2]  # its old rows are read
        moved = next(m for m in models if m.run_id == third)
        top = -1e300 if order == "metrics.loss" else 1e300  # second now, after -inf (+inf descending)
        moved.metrics["loss"] = top
        _put_metrics(store, moved.run_id, {"loss": top}, step=100)  # the latest step
        assert index.refresh() == 1
        store.command(f"ALTER TABLE {store.database}.run_order DELETE WHERE run_id = {{r:String}} AND version = "
                      f"(SELECT max(version) FROM {store.database}.run_index WHERE run_id = {{r:String}}) "
                      "SETTINGS mutations_sync = 2", {"r": moved.run_id})

        def began_before(self: RunSearch) -> Any:
            return before
            yield  # a generator, as _changed is

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RunSearch, "_changed", began_before)
            found = search.search(SearchRequest(order_by=(order,), max_results=5))
        assert [r.info.run_id for r in found.runs] == expected_order(active(models), [order])[:5]
        assert found.runs[1].info.run_id == moved.run_id
