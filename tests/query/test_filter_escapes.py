r"""Backslashes in filters, as MLflow reads them, and LIKE patterns the engine cannot run.

MLflow tokenizes a filter with sqlparse and keeps quoted text as written: nothing is
unescaped, so `params.path = 'C:\new'` compares with C:\new and `tags.x LIKE 'a\_b'`
hands LIKE the pattern a\_b (SQL's escaped, literal underscore). A LIKE pattern ending
in a lone backslash makes ClickHouse fail (Code 25); the parser refuses it instead,
as a FilterError (INVALID_ARGUMENT / 400), never a store error (UNAVAILABLE / 503).

Parsing is checked against MLflow's own parser, the refusals against the engine's, and
both end to end through the gRPC search; tests/mlflow/test_search_escapes.py does the
same through the REST API.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.query.filters import (
    ATTRIBUTES,
    PARAMS,
    TAGS,
    And,
    Comparison,
    FilterError,
    Node,
    parse_filter,
)
from trackhouse.store import QueryFailed, RunRecord, Store, open_store

C = Comparison


def parse(text: str) -> Node:
    node = parse_filter(text)
    assert node is not None
    return node


# -- quoted text keeps its backslashes ------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        (r"'a\_b'", r"a\_b"),
        (r"'C:\new'", r"C:\new"),
        (r"'a\\b'", r"a\\b"),
        (r"'it\'s'", r"it\'s"),  # a backslash before the quote does not close the string
        (r'"say \"hi\""', r"say \"hi\""),
        (r"'%\'", "%\\"),  # ... unless no later quote can: then the backslash ends the value
        (r"'\'", "\\"),
        (r"'\t\u00e9'", r"\t\u00e9"),
        ("'it''s'", "it's"),  # a doubled quote stays one quote (extension)
    ],
)
def test_quoted_values_keep_backslashes_as_written(literal: str, value: str) -> None:
    assert parse(f"tags.t = {literal}") == C(TAGS, "t", "=", value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"tags.`a\b` = 'v'", C(TAGS, "a\\b", "=", "v")),
        (r'tags."a\b" = "v"', C(TAGS, "a\\b", "=", "v")),
        (r"params.p IN ('C:\new', 'a\_b')", C(PARAMS, "p", "IN", (r"C:\new", r"a\_b"))),
        (r"attributes.run_name NOT IN ('\x', 'y\\')", C(ATTRIBUTES, "run_name", "NOT IN", (r"\x", "y\\\\"))),
        (r"tags.x LIKE 'a\_b'", C(TAGS, "x", "LIKE", r"a\_b")),
        (r"attributes.run_name ILIKE '%\%'", C(ATTRIBUTES, "run_name", "ILIKE", r"%\%")),
    ],
)
def test_keys_lists_and_patterns_keep_backslashes(text: str, expected: Comparison) -> None:
    assert parse(text) == expected


def test_a_string_runs_past_a_backslash_quote_as_in_mlflow() -> None:
    # sqlparse reads 'a\' AND tags.y = ' as one string, so MLflow refuses this filter too;
    # the other quote, or the comparison last, writes a value ending in a backslash.
    with pytest.raises(FilterError, match="unterminated string"):
        parse_filter(r"tags.x = 'a\' AND tags.y = 'b'")
    expected = And((C(TAGS, "x", "=", "a\\"), C(TAGS, "y", "=", "b")))
    assert parse(r"""tags.x = "a\" AND tags.y = 'b'""") == expected
    assert parse(r"tags.y = 'b' AND tags.x = 'a\'") == And(expected.items[::-1])


# Filters in MLflow's own grammar (AND of comparisons; no doubled quotes, which MLflow keeps).
MLFLOW_FILTERS = [
    r"tags.x LIKE 'a\_b'",
    r"params.path = 'C:\new'",
    r"tags.x = 'it\'s'",
    r"tags.x = 'a\\b'",
    r"tags.x LIKE '%\\'",
    r"tags.x = '%\'",
    r'tags.x = "say \"hi\""',
    r"tags.`a\b` = 'v'",
    r'tags."a\b" = "v"',
    r"attributes.run_name ILIKE '%\%' AND params.q != '\\\n'",
    r"tags.x = 'a' AND params.y != '\'",
    r"attributes.run_id IN ('a', 'b') AND tags.t = 'C:\temp\x'",
]
_MLFLOW_ENTITIES = {"tag": TAGS, "parameter": PARAMS, "attribute": ATTRIBUTES}


@pytest.mark.parametrize("text", MLFLOW_FILTERS)
def test_values_are_mlflows(text: str) -> None:
    search_utils = pytest.importorskip("mlflow.utils.search_utils")
    theirs = [C(_MLFLOW_ENTITIES[c["type"]], c["key"], c["comparator"].upper(), c["value"])
              for c in search_utils.SearchUtils.parse_search_filter(text)]
    node = parse(text)
    ours = list(node.items) if not isinstance(node, Comparison) else [node]
    assert ours == theirs


# -- LIKE patterns the engine cannot run are refused ---------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        r"tags.x LIKE '%\'",
        r"attributes.run_name LIKE '%\'",
        r"run_name ILIKE 'a\\\'",
        r"params.p LIKE '\'",
        r"""tags.x LIKE 'a' OR tags.y ILIKE "b\\\" """,
        r"tags.`k\` LIKE 'x\\%\'",
    ],
)
def test_like_patterns_ending_in_a_lone_backslash_are_refused(text: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    position = text.rstrip(" ").rindex("\\")  # the lone backslash, just before the closing quote
    assert info.value.position == position
    assert f"at position {position}: invalid {'ILIKE' if 'ILIKE' in text else 'LIKE'} pattern" in str(info.value)
    assert "lone backslash" in str(info.value) and r"write \\" in str(info.value)


@pytest.mark.parametrize("text", [r"tags.x = '%\'", r"tags.x != 'a\\\'", r"tags.x IN ('\')", r"tags.x LIKE '%\\'"])
def test_only_like_patterns_need_their_backslashes_paired(text: str) -> None:
    parse(text)


def _parsed_pattern(pattern: str) -> str | None:
    """The pattern `tags.x LIKE '<pattern>'` hands the engine, or None when the parser refuses it."""
    try:
        node = parse_filter(f"tags.x LIKE '{pattern}'")
    except FilterError:
        return None
    assert isinstance(node, Comparison) and isinstance(node.value, str)
    return node.value


def test_the_parser_refuses_exactly_the_patterns_the_engine_refuses(store: Store) -> None:
    """Every pattern of up to 5 characters from \\ % _ a, written as is: the parser hands it
    to the engine unchanged, and refuses it iff ClickHouse fails on it."""
    engine: dict[str, str | None] = {}
    parser: dict[str, str | None] = {}
    for size in range(6):
        for chars in itertools.product("\\%_a", repeat=size):
            pattern = "".join(chars)
            try:
                store.query_rows("SELECT like('a', {p:String}), ilike('a', {p:String})", {"p": pattern})
                engine[pattern] = pattern
            except QueryFailed as exc:
                assert exc.code == 25, exc
                engine[pattern] = None
            parser[pattern] = _parsed_pattern(pattern)
    assert parser == engine
    assert sum(v is None for v in engine.values()) > 100  # the property is not vacuous


# -- end to end through the gRPC search ---------------------------------------------------------

RUNS = {  # run_id: (run name, tag x, param path)
    "a" * 32: ("plain", "a_b", r"C:\new"),
    "b" * 32: ("wild", "axb", "C:new"),
    "c" * 32: ("back\\", "a\\b", "C:\\\\new"),
}


def _seed(store: Store) -> None:
    for i, (run_id, (name, tag, path)) in enumerate(RUNS.items()):
        store.put_run(RunRecord(run_id, "0", name, "u", "FINISHED", 1000 + i, 2000, "active", ""))
        store.put_tags(run_id, [("x", tag)])
        store.put_params(run_id, [("path", path)])


@pytest.fixture(scope="module")
def stub(chdb_dsn: str) -> Iterator[Any]:
    """One seeded store and server (127.0.0.1, port 0) for the module: the tests here only read."""
    store = open_store(chdb_dsn, f"t_{uuid.uuid4().hex[:12]}")
    try:
        _seed(store)
        thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0), store=store)
        try:
            with grpc.insecure_channel(thread.start()) as channel:
                yield query_pb2_grpc.QueryServiceStub(channel)
        finally:
            thread.stop(grace=1.0)
    finally:
        store.close()


def _names(stub: Any, text: str) -> list[str]:
    response = stub.SearchRuns(query_pb2.SearchRunsRequest(experiment_ids=["0"], filter=text))
    return sorted(RUNS[run.info.run_id][0] for run in response.runs)


def _error(stub: Any, text: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.SearchRuns(query_pb2.SearchRunsRequest(experiment_ids=["0"], filter=text))
    err: Any = info.value
    return err.code(), str(err.details())


def test_grpc_search_compares_backslashes_as_mlflow_does(stub: Any) -> None:
    assert _names(stub, r"tags.x LIKE 'a\_b'") == ["plain"]  # an escaped underscore is no wildcard
    assert _names(stub, r"tags.x LIKE 'a_b'") == ["back\\", "plain", "wild"]  # _ is any one character
    assert _names(stub, r"params.path = 'C:\new'") == ["plain"]
    assert _names(stub, r"params.path = 'C:\\new'") == ["back\\"]
    assert _names(stub, r"tags.x = 'a\b'") == ["back\\"]
    assert _names(stub, r"tags.x LIKE 'a\\b'") == ["back\\"]  # \\ in a pattern is one backslash


def test_grpc_search_refuses_a_lone_backslash_pattern_as_an_invalid_argument(stub: Any) -> None:
    code, message = _error(stub, r"tags.x LIKE '%\'")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at position 14: invalid LIKE pattern" in message and "lone backslash" in message
    code, message = _error(stub, r"attributes.run_name ILIKE 'b%\'")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid ILIKE pattern" in message
    # The filter of the report: a pattern ending in an escaped backslash, valid as in MLflow.
    assert _names(stub, r"attributes.run_name LIKE '%\\'") == ["back\\"]
    assert _names(stub, r"tags.x LIKE '%\\'") == []


def test_grpc_search_maps_an_engine_refusal_to_invalid_argument(stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a refused value get past the parser, the engine's error is still the client's (not 503)."""
    monkeypatch.setattr("trackhouse.query.filters._FilterParser.check_pattern", lambda *args: None)
    code, message = _error(stub, r"tags.x LIKE '%\'")
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert message.startswith("the store refused a value of the request: Invalid escape sequence")
    assert "while executing" not in message
