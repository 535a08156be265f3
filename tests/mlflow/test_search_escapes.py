r"""Backslashes in runs/search filters through the REST API, as MLflow's server reads them.

MLflow keeps quoted filter text as written, so `tags.x LIKE 'a\_b'` is an escaped, literal
underscore and `params.path = 'C:\new'` compares with C:\new. A LIKE pattern ending in a
lone backslash is the request's fault: 400 INVALID_PARAMETER_VALUE (never 503, which
MLflow's client retries). The parser-level tests are in tests/query/test_filter_escapes.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests
from mlflow.entities import Param, RunTag


@pytest.fixture(scope="module")
def runs(client: Any) -> dict[str, Any]:
    """An experiment of three runs: {"exp": id, name: run id}."""
    exp_id = client.create_experiment(f"escapes-{uuid.uuid4().hex[:8]}")
    seeded = {"exp": exp_id}
    for name, tag, path in [("plain", "a_b", r"C:\new"), ("wild", "axb", "C:new"), ("back\\", "a\\b", r"C:\\new")]:
        run = client.create_run(exp_id, run_name=name)
        client.log_batch(run.info.run_id, params=[Param("path", path)], tags=[RunTag("x", tag)])
        seeded[name] = run.info.run_id
    return seeded


def search(base_url: str, exp_id: str, text: str) -> tuple[int, dict[str, Any]]:
    # requests, not MlflowClient: MLflow's client retries a 503 for minutes.
    resp = requests.post(f"{base_url}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [exp_id], "filter": text}, timeout=30)
    return resp.status_code, resp.json()


def test_client_search_compares_backslashes_as_mlflow_does(client: Any, runs: dict[str, Any]) -> None:
    def names(text: str) -> list[str]:
        return sorted(r.info.run_name for r in client.search_runs([runs["exp"]], text))

    assert names(r"tags.x LIKE 'a\_b'") == ["plain"]  # not "wild": an escaped underscore is no wildcard
    assert names(r"params.path = 'C:\new'") == ["plain"]  # not "wild", whose value is C:new
    assert names(r"params.path = 'C:\\new'") == ["back\\"]
    assert names(r"tags.x = 'a\b'") == ["back\\"]


def test_a_lone_backslash_pattern_is_a_bad_request(base_url: str, runs: dict[str, Any]) -> None:
    status, body = search(base_url, runs["exp"], r"tags.x LIKE '%\'")
    assert (status, body.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), body
    assert "invalid LIKE pattern" in body["message"] and "lone backslash" in body["message"]
    status, body = search(base_url, runs["exp"], r"attributes.run_name ILIKE '%\'")
    assert (status, body.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), body
    # The filter of the report: a pattern ending in an escaped backslash runs, as in MLflow.
    status, body = search(base_url, runs["exp"], r"attributes.run_name LIKE '%\\'")
    assert status == 200, body
    assert [r["info"]["run_id"] for r in body["runs"]] == [runs["back\\"]]


def test_an_engine_refusal_is_a_bad_request_not_unavailable(base_url: str, runs: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a refused value get past the parser, ClickHouse's error still comes back as 400."""
    monkeypatch.setattr("trackhouse.query.filters._FilterParser.check_pattern", lambda *args: None)
    status, body = search(base_url, runs["exp"], r"tags.x LIKE '%\'")
    assert (status, body.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), body
    assert body["message"].startswith("the store refused a value of the request: Invalid escape sequence")
