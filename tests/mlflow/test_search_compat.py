"""Searches through MLflow's own client: its paging of search_runs / search_experiments, and the
filter syntax MLflow accepts (IS NULL, experiment_id, quoted tag keys) — or refuses, with a 400."""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

T0 = 1_700_000_000_000
METRIC = [1.0, 1.0, 0.5, math.nan, None, -math.inf, 2.0]  # ties, NaN, missing


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def runs24(client: Any) -> tuple[str, list[dict[str, Any]]]:
    """An experiment of 24 runs: start times and metric values tie, some NaN, some missing;
    every third run is a child (tags.mlflow.parentRunId), every fourth has param p."""
    exp_id = client.create_experiment(unique("runs24"))

    def create(i: int) -> dict[str, Any]:
        start = T0 + (i % 5) * 1000
        tags = {"mlflow.parentRunId": "parent"} if i % 3 == 0 else {}
        run_id = client.create_run(exp_id, start_time=start, run_name=f"r{i:02d}", tags=tags).info.run_id
        m = METRIC[i % len(METRIC)]
        if m is not None or i % 4 == 0:
            client.log_batch(run_id, metrics=[] if m is None else [Metric("m", m, T0, 0)],
                             params=[Param("p", str(i))] if i % 4 == 0 else [])
        return {"run_id": run_id, "start": start, "m": m, "child": i % 3 == 0, "p": i % 4 == 0}

    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent writes share the server's flushes
        return exp_id, list(pool.map(create, range(24)))


def expected(runs: list[dict[str, Any]], by_metric: bool) -> list[str]:
    """MLflow's order: metrics.m DESC (values, then NaN, then missing), then start_time DESC, run_id."""
    def rank(r: dict[str, Any]) -> int:
        return 2 if r["m"] is None else 1 if math.isnan(r["m"]) else 0

    def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
        if by_metric and rank(a) != rank(b):
            return rank(a) - rank(b)
        if by_metric and rank(a) == 0 and a["m"] != b["m"]:
            return -1 if a["m"] > b["m"] else 1
        if a["start"] != b["start"]:
            return -1 if a["start"] > b["start"] else 1
        return -1 if a["run_id"] < b["run_id"] else int(a["run_id"] > b["run_id"])

    return [r["run_id"] for r in sorted(runs, key=functools.cmp_to_key(compare))]


@pytest.fixture
def fluent(base_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """mlflow's fluent API on this server, fetching 10 runs a page (MLflow: 10,000)."""
    import mlflow
    import mlflow.tracking.fluent

    monkeypatch.setattr(mlflow.tracking.fluent, "NUM_RUNS_PER_PAGE_PANDAS", 10)
    mlflow.set_tracking_uri(base_url)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri("")


@pytest.mark.parametrize("order_by", [None, ["metrics.m DESC"]])
def test_mlflow_search_runs_pages_with_a_smaller_last_page(fluent: Any, runs24: tuple[str, list[dict[str, Any]]],
                                                           order_by: list[str] | None) -> None:
    """max_results=16: MLflow asks for 10, then for the remaining 6 with the first page's token."""
    exp_id, runs = runs24
    want = expected(runs, by_metric=order_by is not None)
    df = fluent.search_runs(experiment_ids=[exp_id], max_results=16, order_by=order_by)
    assert list(df["run_id"]) == want[:16]
    found = fluent.search_runs(experiment_ids=[exp_id], max_results=23, order_by=order_by, output_format="list")
    assert [r.info.run_id for r in found] == want[:23]  # 10, 10, then 3
    assert len(fluent.search_runs(experiment_ids=[exp_id], order_by=order_by, output_format="list")) == 24


def test_mlflow_search_experiments_pages_with_a_smaller_last_page(client: Any) -> None:
    from mlflow.utils import get_results_from_paginated_fn

    prefix = unique("pages")
    for i in range(7):
        client.create_experiment(f"{prefix}-{i}")
    text = f"name LIKE '{prefix}-%'"
    want = [e.experiment_id for e in client.search_experiments(filter_string=text, max_results=100)]

    def page(size: int, token: str | None) -> Any:
        return client.search_experiments(filter_string=text, max_results=size, page_token=token)

    assert [e.experiment_id for e in get_results_from_paginated_fn(page, 3, 5)] == want[:5]  # 3, then 2
    assert [e.experiment_id for e in get_results_from_paginated_fn(page, 2, 7)] == want
    token = page(3, None).token
    with pytest.raises(MlflowException, match="belongs to another search"):
        client.search_experiments(filter_string=f"name LIKE '{prefix}-1%'", max_results=3, page_token=token)


# -- IS NULL / IS NOT NULL in run search ------------------------------------------------------------


@pytest.mark.parametrize(("text", "predicate"), [
    ("tags.mlflow.parentRunId IS NULL", lambda r: not r["child"]),  # the top-level runs
    ("tags.mlflow.parentRunId IS NOT NULL", lambda r: r["child"]),
    ("params.p IS NULL and tags.`mlflow.parentRunId` is not null", lambda r: r["child"] and not r["p"]),
    ("params.p IS NOT NULL AND metrics.m > 0.7", lambda r: r["p"] and r["m"] is not None and r["m"] > 0.7),
])
def test_is_null_in_run_search(client: Any, runs24: tuple[str, list[dict[str, Any]]], text: str,
                               predicate: Any) -> None:
    exp_id, runs = runs24
    found = client.search_runs([exp_id], text, order_by=["metrics.m DESC"], max_results=1000)
    assert [r.info.run_id for r in found] == expected([r for r in runs if predicate(r)], by_metric=True)


RUN_FILTERS = ["tags.x IS NULL", "params.x IS NOT NULL", "tag.`a b` is null", "metrics.m IS NULL",
               "attributes.end_time IS NULL", "attributes.run_name IS NOT NULL", "run_name IS NULL",
               "tags.x IS", "tags.x IS NOT", "tags.x = NULL", "tags.x IS NULL AND params.y = 'a'"]


@pytest.mark.parametrize("text", RUN_FILTERS)
def test_run_filters_are_accepted_as_mlflow_accepts_them(base_url: str, text: str) -> None:
    from mlflow.utils.search_utils import SearchUtils

    try:
        SearchUtils.parse_search_filter(text)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    resp = requests.post(f"{base_url}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": ["0"], "filter": text}, timeout=30)
    assert resp.status_code == (200 if mlflow_accepts else 400), resp.text
    if not mlflow_accepts:
        body = resp.json()
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "position" in body["message"]


def test_is_null_on_metrics_and_attributes_says_where_it_applies(base_url: str) -> None:
    resp = requests.post(f"{base_url}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": ["0"], "filter": "metrics.m IS NULL"}, timeout=30)
    assert resp.status_code == 400
    assert "IS NULL is not allowed for metrics: IS NULL and IS NOT NULL apply to tags and params only" in \
        resp.json()["message"]


# -- experiment search ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tagged(client: Any) -> tuple[str, list[str]]:
    """Three experiments: tagged {"x y": "1", "t": "a"}, {"t": "b"}, and none."""
    prefix = unique("etags")
    ids = [client.create_experiment(f"{prefix}-0", tags={"x y": "1", "t": "a"}),
           client.create_experiment(f"{prefix}-1", tags={"t": "b"}),
           client.create_experiment(f"{prefix}-2")]
    return prefix, ids


@pytest.mark.parametrize(("text", "chosen"), [
    ("tags.t IS NULL", [2]),
    ("tags.t IS NOT NULL", [0, 1]),
    ("tag.`x y` IS NULL", [1, 2]),
    ('tags."x y" = \'1\'', [0]),
    ('tags."x y" is not null AND tags.t = "a"', [0]),
    ("experiment_id = '{0}'", [0]),
    ('attribute.experiment_id = "{1}"', [1]),
    ("experiment_id != '{0}'", [1, 2]),
    ("experiment_id IN ('{0}', '{2}', 'nope')", [0, 2]),
    ("experiment_id NOT IN ('{0}', '{2}')", [1]),
    ("experiment_id not in ('{1}',) and tags.t IS NOT NULL", [0]),
])
def test_experiment_filters_mlflow_accepts(client: Any, tagged: tuple[str, list[str]], text: str,
                                           chosen: list[int]) -> None:
    from mlflow.utils.search_utils import SearchExperimentsUtils

    prefix, ids = tagged
    text = text.format(*ids)
    SearchExperimentsUtils.parse_search_filter(text)  # MLflow's own parser accepts it
    found = client.search_experiments(filter_string=f"name LIKE '{prefix}-%' AND {text}")
    assert sorted(e.experiment_id for e in found) == sorted(ids[i] for i in chosen)


@pytest.mark.parametrize(("text", "fragment"), [
    ("name IS NULL", "IS NULL / IS NOT NULL is only supported for tags, not for attribute 'name'"),
    ("experiment_id IS NOT NULL", "only supported for tags, not for attribute 'experiment_id'"),
    ("name IN ('a')", "IN is not supported for name; only experiment_id compares with a list"),
    ("tags.t NOT IN ('a')", "NOT IN is not supported for tags.t"),
    ("experiment_id IN (1, 2)", "experiment_id IN and NOT IN take a list of quoted strings"),
    ("experiment_id IN ()", "experiment_id IN and NOT IN take a list of quoted strings"),
    ("experiment_id = 1", "experiment_id compares quoted strings with = != LIKE ILIKE"),
    ("experiment_id > '1'", "experiment_id compares quoted strings"),
    ("tags.t IS", "expected NULL or NOT NULL after IS"),
    ("tags.t IS NOT", "expected NULL or NOT NULL after IS"),
    ("tags.t IS NULL 'a'", "expected AND between comparisons at position 15"),
    ("tags.t = NULL", "tags.t compares quoted strings"),
])
def test_bad_experiment_filters_are_400_saying_what_is_wrong(base_url: str, text: str, fragment: str) -> None:
    from mlflow.utils.search_utils import SearchExperimentsUtils

    with pytest.raises(MlflowException):  # MLflow refuses it too
        _mlflow_filter(SearchExperimentsUtils, text)
    resp = requests.post(f"{base_url}/api/2.0/mlflow/experiments/search", json={"filter": text}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert fragment in resp.json()["message"], resp.json()["message"]


def _mlflow_filter(utils: Any, text: str) -> None:
    """MLflow's parse and its match (which refuses some comparators the parse lets through)."""
    from mlflow.entities import Experiment, ExperimentTag

    utils.filter([Experiment("1", "n", "", "active", tags=[ExperimentTag("t", "a")])], text)
