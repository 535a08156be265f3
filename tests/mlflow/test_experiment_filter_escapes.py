r"""Backslashes in experiments/search filters: the same rules as run search, and as MLflow.

MLflow's SearchExperimentsUtils reads a filter with sqlparse and keeps quoted text as
written, so `name = 'C:\new'` compares with C:\new and `name LIKE 'a\_b'` hands LIKE
the pattern a\_b. Experiment search filters in Python, so its LIKE and ILIKE must read
SQL's escapes as ClickHouse does for run search: \% \_ \\ match % _ \, a backslash
before any other character is itself; a pattern ending in a lone backslash is refused
(400 INVALID_PARAMETER_VALUE). The run-search side is tests/query/test_filter_escapes.py.
"""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Any

import pytest
import requests

from trackhouse.query import filters
from trackhouse.query.filters import FilterError
from trackhouse.query.http.experiments import Condition, matches, parse_filter
from trackhouse.store import ExperimentRecord, Store


def record(name: str) -> ExperimentRecord:
    return ExperimentRecord("1", name, "", "active", 1, 1)


def like(op: str, pattern: str, value: str) -> bool:
    """`name <op> '<pattern>'` on an experiment named `value`."""
    return matches(Condition("name", op, pattern), record(value), {})


# -- parsing: quoted values keep their backslashes ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"name = 'C:\new'", Condition("name", "=", r"C:\new")),
        (r"name LIKE 'a\_b'", Condition("name", "LIKE", r"a\_b")),
        (r"tags.x ILIKE '%\%'", Condition("tags.x", "ILIKE", r"%\%")),
        (r"tags.x != 'a\\b'", Condition("tags.x", "!=", r"a\\b")),
        (r"name = 'it\'s'", Condition("name", "=", r"it\'s")),  # the backslash stays; the quote does not close
        (r'name = "say \"hi\""', Condition("name", "=", r"say \"hi\"")),
        (r"name = '%\'", Condition("name", "=", "%\\")),  # not LIKE: a final backslash is just a character
        ("name = 'it''s'", Condition("name", "=", "it's")),  # a doubled quote is one quote (extension)
    ],
)
def test_quoted_values_keep_backslashes_as_written(text: str, expected: Condition) -> None:
    assert parse_filter(text) == [expected]


# Filters in MLflow's experiment grammar (no doubled quotes: MLflow keeps both).
MLFLOW_FILTERS = [
    r"name LIKE 'a\_b'",
    r"name = 'C:\new'",
    r"name = 'it\'s' AND tags.x = 'a\\b'",
    r"tags.x LIKE '%\\'",
    r"tags.x = '%\'",
    r'tags.x = "say \"hi\""',
    r"tags.`a\b` = 'v'",
    r"name ILIKE '%\%' AND tags.q != '\\\n'",
    r"attribute.name = 'C:\temp\x' AND creation_time > 5",
]


def _mlflow(text: str) -> list[Condition]:
    search_utils = pytest.importorskip("mlflow.utils.search_utils")
    parsed = search_utils.SearchExperimentsUtils.parse_search_filter(text)
    return [Condition(c["key"] if c["type"] == "attribute" else f"tags.{c['key']}", c["comparator"].upper(),
                      c["value"]) for c in parsed]


@pytest.mark.parametrize("text", MLFLOW_FILTERS)
def test_values_are_mlflows_experiment_values(text: str) -> None:
    assert parse_filter(text) == _mlflow(text)


@pytest.mark.parametrize("text", [t for t in MLFLOW_FILTERS if "creation_time" not in t])
def test_values_are_run_searchs(text: str) -> None:
    """The same filter text gives experiment search and run search the same values."""
    node = filters.parse_filter(re.sub(r"\bname\b", "run_name", text))
    items = [node] if isinstance(node, filters.Comparison) else list(getattr(node, "items", ()))
    assert [c.value for c in parse_filter(text)] == [c.value for c in items]


# -- LIKE patterns ending in a lone backslash are refused, as in run search -------------------------


@pytest.mark.parametrize(
    "text",
    [
        r"name LIKE '%\'",
        r"name ILIKE 'a\\\'",
        r"tags.x LIKE '\'",
        r"""name = 'a' AND tags.y ILIKE "b\\\" """,
        r"attribute.name LIKE 'x\\%\'",
    ],
)
def test_a_pattern_ending_in_a_lone_backslash_is_refused_as_run_search_refuses_it(text: str) -> None:
    lone = text.rstrip(" ").rindex("\\")  # the backslash just before the closing quote
    op = "ILIKE" if "ILIKE" in text else "LIKE"
    with pytest.raises(FilterError) as refused:
        parse_filter(text)
    message = str(refused.value)
    assert (refused.value.position, message.split(": ", 1)[0]) == (lone, f"at position {lone}")
    assert message.split(": ", 1)[1].startswith(f"invalid {op} pattern ")
    assert "lone backslash" in message and r"write \\" in message
    with pytest.raises(FilterError) as run_search:
        filters.parse_filter(re.sub(r"\b(attribute\.)?name\b", "run_name", text))
    assert str(run_search.value).split(": ", 1)[1] == message.split(": ", 1)[1]


@pytest.mark.parametrize("text", [r"name LIKE '%\\'", r"name = '%\'", r"tags.x != 'a\\\'"])
def test_other_values_and_paired_backslashes_are_accepted(text: str) -> None:
    assert len(parse_filter(text)) == 1


# -- matching: SQL's escapes, as ClickHouse runs LIKE for run search -----------------------------------


@pytest.mark.parametrize(
    ("op", "pattern", "value", "expected"),
    [
        ("LIKE", r"a\_b", "a_b", True),
        ("LIKE", r"a\_b", "axb", False),  # an escaped underscore is no wildcard
        ("LIKE", r"a\%", "a%", True),
        ("LIKE", r"a\%", "abc", False),
        ("LIKE", r"a\\b", "a\\b", True),  # \\ is one backslash
        ("LIKE", r"a\\b", "a\\\\b", False),
        ("LIKE", r"C:\new", r"C:\new", True),  # a backslash before another character is itself
        ("LIKE", r"C:\new", "C:new", False),
        ("LIKE", r"%\\", "back\\", True),
        ("LIKE", r"%\\%", "a\\b", True),
        ("LIKE", "a_b", "a_b", True),
        ("LIKE", "a_b", "a\nb", True),  # _ and % take any character, a newline too
        ("LIKE", "a%", "a\nb", True),
        ("LIKE", "%b%", "abc", True),
        ("LIKE", "abc", "ABC", False),
        ("ILIKE", r"A\_%", "a_bc", True),
        ("ILIKE", r"A\_%", "axbc", False),
        ("ILIKE", "é%", "ÉTÉ", True),
    ],
)
def test_like_reads_sql_escapes(op: str, pattern: str, value: str, expected: bool) -> None:
    assert like(op, pattern, value) is expected


def test_tag_patterns_read_the_same_escapes() -> None:
    (cond,) = parse_filter(r"tags.path LIKE 'C:\\%\_%'")
    assert matches(cond, record("e"), {"path": r"C:\x_y"})
    assert not matches(cond, record("e"), {"path": r"C:\xy"})
    assert not matches(cond, record("e"), {})


def test_like_and_ilike_match_exactly_as_clickhouse(store: Store) -> None:
    """Every pattern of up to 4 characters from \\ % _ a A that the parser accepts, against every
    value of up to 3 characters from \\ % _ a A and a newline: the same answers as the engine."""
    patterns = [p for size in range(5) for p in map("".join, itertools.product("\\%_aA", repeat=size))
                if (len(p) - len(p.rstrip("\\"))) % 2 == 0]
    values = [v for size in range(4) for v in map("".join, itertools.product("\\%_aA\n", repeat=size))]
    values += ["é", "É", "aé", "ÉA"]
    rows = store.query_rows(
        "SELECT p, v, like(v, p), ilike(v, p) FROM "
        "(SELECT arrayJoin({ps:Array(String)}) AS p, arrayJoin({vs:Array(String)}) AS v)",
        {"ps": patterns, "vs": values})
    assert len(rows) == len(patterns) * len(values)
    wrong = [(p, v, op) for p, v, like_it, ilike_it in rows
             for op, engine in (("LIKE", like_it), ("ILIKE", ilike_it)) if like(op, p, v) != bool(engine)]
    assert wrong[:20] == []


@pytest.mark.timeout(10)
def test_a_pattern_full_of_wildcards_does_not_backtrack_for_ever() -> None:
    """A regex of .* per % backtracks for ever here; the pieces between %s are found left to right."""
    pattern, value = "%a" * 30 + "%b", "a" * 5_000
    assert like("LIKE", pattern, value) is False
    assert like("LIKE", pattern, value + "b") is True


# -- end to end through MLflow's experiments/search endpoint ----------------------------------------


@pytest.fixture(scope="module")
def experiments(base_url: str) -> dict[str, str]:
    """Three experiments named <prefix>-a_b, -axb, -a\\b; tag `path` C:\\new, C:new, C:\\\\new."""
    prefix = f"esc-{uuid.uuid4().hex[:8]}"
    seeded = {"prefix": prefix}
    for suffix, path in [("a_b", r"C:\new"), ("axb", "C:new"), ("a\\b", r"C:\\new")]:
        resp = requests.post(f"{base_url}/api/2.0/mlflow/experiments/create", timeout=30, json={
            "name": f"{prefix}-{suffix}", "tags": [{"key": "path", "value": path}]})
        assert resp.status_code == 200, resp.text
        seeded[suffix] = resp.json()["experiment_id"]
    return seeded


def search(base_url: str, text: str) -> tuple[int, dict[str, Any]]:
    # requests, not MlflowClient: MLflow's client retries a 503 for minutes.
    resp = requests.post(f"{base_url}/api/2.0/mlflow/experiments/search",
                         json={"filter": text, "max_results": 1000}, timeout=30)
    return resp.status_code, resp.json()


def test_rest_experiment_search_reads_backslashes_as_run_search(base_url: str, experiments: dict[str, str]) -> None:
    prefix = experiments["prefix"]

    def names(text: str) -> list[str]:
        status, body = search(base_url, f"name LIKE '{prefix}-%' AND {text}")
        assert status == 200, body
        return sorted(e["name"][len(prefix) + 1:] for e in body.get("experiments", []))

    assert names(r"name LIKE '%-a\_b'") == ["a_b"]  # not axb: an escaped underscore is no wildcard
    assert names(r"name LIKE '%-a_b'") == ["a\\b", "a_b", "axb"]
    assert names(r"name ILIKE '%-A\\B'") == ["a\\b"]  # \\ in a pattern is one backslash
    assert names(rf"name = '{prefix}-a\b'") == ["a\\b"]  # = compares the text as written
    assert names(r"tags.path = 'C:\new'") == ["a_b"]  # not axb, whose path is C:new
    assert names(r"tags.path = 'C:\\new'") == ["a\\b"]
    assert names(r"tags.path LIKE 'C:\\\\%'") == ["a\\b"]


def test_rest_experiment_search_refuses_a_lone_backslash_pattern(base_url: str, experiments: dict[str, str]) -> None:
    status, body = search(base_url, r"name LIKE '%\'")
    assert (status, body.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), body
    assert "at position 12: invalid LIKE pattern" in body["message"] and "lone backslash" in body["message"]
    status, body = search(base_url, r"tags.path ILIKE 'C:\'")
    assert (status, body.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), body
    assert "invalid ILIKE pattern" in body["message"]
    status, body = search(base_url, rf"name LIKE '{experiments['prefix']}-a\\b'")
    assert status == 200 and [e["experiment_id"] for e in body["experiments"]] == [experiments["a\\b"]], body
