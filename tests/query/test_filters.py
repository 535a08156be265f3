"""Tests for trackhouse.query.filters: filters, order_by clauses, compiled SQL.

Parsing and compiling are pure and tested directly; the last test runs compiled
filters against a real (chDB) store to pin the SQL semantics.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from trackhouse.query.filters import (
    ATTRIBUTES,
    MAX_DEPTH,
    METRICS,
    PARAMS,
    TAGS,
    And,
    Binder,
    Comparison,
    FilterError,
    Node,
    Or,
    compile_filter,
    parse_filter,
    tokenize,
)
from trackhouse.query.order import OrderKey, parse_order_by
from trackhouse.store import RunRecord, Store
from trackhouse.store.schema import latest_value

C = Comparison

LATEST = latest_value("max(last_key)")


def parse(text: str) -> Node:
    node = parse_filter(text)
    assert node is not None
    return node


def compile_text(text: str, db: str = "db") -> tuple[str, dict[str, object]]:
    binder = Binder()
    return compile_filter(parse(text), db, binder), binder.params


# -- parsing: entities, aliases, quoting ----------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "entity"),
    [
        ("metric", METRICS), ("metrics", METRICS),
        ("param", PARAMS), ("params", PARAMS), ("parameter", PARAMS), ("parameters", PARAMS),
        ("tag", TAGS), ("tags", TAGS), ("`tags`", TAGS),
    ],
)
def test_entity_aliases(alias: str, entity: str) -> None:
    value: str | float = 1 if entity == METRICS else "v"
    literal = "1" if entity == METRICS else "'v'"
    assert parse(f"{alias}.k = {literal}") == C(entity, "k", "=", value)


@pytest.mark.parametrize("alias", ["attribute", "attributes", "attr", "run", ""])
def test_attribute_aliases_and_bare_attributes(alias: str) -> None:
    prefix = f"{alias}." if alias else ""
    assert parse(f"{prefix}status = 'FINISHED'") == C(ATTRIBUTES, "status", "=", "FINISHED")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('metrics."val loss" < 1', C(METRICS, "val loss", "<", 1)),
        ("metrics.`val loss` < 1", C(METRICS, "val loss", "<", 1)),
        ("tags.`mlflow.runName` = 'x'", C(TAGS, "mlflow.runName", "=", "x")),
        ("tags.mlflow.source.type = 'LOCAL'", C(TAGS, "mlflow.source.type", "=", "LOCAL")),
        ('params."model-type" = "cnn"', C(PARAMS, "model-type", "=", "cnn")),
        ('params."1st" = "a"', C(PARAMS, "1st", "=", "a")),
        ("params.`a``b` = 'c'", C(PARAMS, "a`b", "=", "c")),
        ("attributes.created > 5", C(ATTRIBUTES, "start_time", ">", 5)),
        ("Created > 5", C(ATTRIBUTES, "start_time", ">", 5)),
        ("attributes.`Run name` = 'r'", C(ATTRIBUTES, "run_name", "=", "r")),
        ('"run name" = \'r\'', C(ATTRIBUTES, "run_name", "=", "r")),
        ("run_id IN ('a')", C(ATTRIBUTES, "run_id", "IN", ("a",))),
        ("metrics.précision_2 > 0", C(METRICS, "précision_2", ">", 0)),
        ("params._x = 'a'", C(PARAMS, "_x", "=", "a")),
    ],
)
def test_keys_and_quoting(text: str, expected: Comparison) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("'single'", "single"),
        ('"double"', "double"),
        ("''", ""),
        ("'it''s'", "it's"),
        (r"'it\'s'", r"it\'s"),  # backslashes are kept, as MLflow keeps them (test_filter_escapes.py)
        (r'"say \"hi\""', r'say \"hi\"'),
        (r"'back\\slash'", r"back\\slash"),
        ("'with spaces AND or'", "with spaces AND or"),
        ("'ünïcødé ✓'", "ünïcødé ✓"),
    ],
)
def test_string_literals(literal: str, value: str) -> None:
    assert parse(f"tags.t = {literal}") == C(TAGS, "t", "=", value)


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("0", 0), ("42", 42), ("-7", -7), ("+3", 3), ("0.5", 0.5), (".5", 0.5), ("5.", 5.0),
        ("-1.25", -1.25), ("1e3", 1000.0), ("1E-3", 0.001), ("-2.5e+2", -250.0),
    ],
)
def test_number_literals(literal: str, value: float) -> None:
    node = parse(f"metrics.m >= {literal}")
    assert node == C(METRICS, "m", ">=", value)
    assert isinstance(node, Comparison) and type(node.value) is type(value)


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
@pytest.mark.parametrize("field", ["metrics.m", "attributes.start_time", "end_time"])
def test_numeric_ops(field: str, op: str) -> None:
    node = parse(f"{field} {op} 10")
    assert isinstance(node, Comparison) and node.op == op and node.value == 10


@pytest.mark.parametrize(
    ("text", "op", "value"),
    [
        ("tags.t = 'x'", "=", "x"),
        ("tags.t != 'x'", "!=", "x"),
        ("tags.t LIKE 'x%'", "LIKE", "x%"),
        ("tags.t like 'x%'", "LIKE", "x%"),
        ("tags.t ILIKE 'x%'", "ILIKE", "x%"),
        ("tags.t iLike 'x%'", "ILIKE", "x%"),
        ("tags.t IN ('a', \"b\")", "IN", ("a", "b")),
        ("tags.t in ('a')", "IN", ("a",)),
        ("tags.t NOT IN ('a','b')", "NOT IN", ("a", "b")),
        ("tags.t not  in('a')", "NOT IN", ("a",)),
    ],
)
def test_string_ops(text: str, op: str, value: object) -> None:
    assert parse(text) == C(TAGS, "t", op, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field", ["run_id", "run_name", "status", "user_id", "artifact_uri", "lifecycle_stage"]
)
@pytest.mark.parametrize("op", ["=", "!=", "LIKE", "ILIKE", "NOT IN", "IN"])
def test_string_attributes_take_string_ops(field: str, op: str) -> None:
    value = "('v')" if "IN" in op else "'v'"
    node = parse(f"attributes.{field} {op} {value}")
    assert node == C(ATTRIBUTES, field, op, ("v",) if "IN" in op else "v")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("params.lr < 0.1", C(PARAMS, "lr", "<", 0.1)),
        ("params.lr >= '1e-3'", C(PARAMS, "lr", ">=", 0.001)),
        ("params.bs = 32", C(PARAMS, "bs", "=", 32)),
        ("params.bs != 32", C(PARAMS, "bs", "!=", 32)),
        ("params.bs = '32'", C(PARAMS, "bs", "=", "32")),
    ],
)
def test_numeric_params_extension(text: str, expected: Comparison) -> None:
    assert parse(text) == expected


# -- parsing: structure ---------------------------------------------------------------

A = C(METRICS, "a", "=", 1)
B = C(METRICS, "b", "=", 2)
D = C(METRICS, "d", "=", 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("metrics.a = 1", A),
        ("metrics.a = 1 AND metrics.b = 2 and metrics.d = 3", And((A, B, D))),
        ("metrics.a = 1 OR metrics.b = 2 or metrics.d = 3", Or((A, B, D))),
        ("metrics.a = 1 OR metrics.b = 2 AND metrics.d = 3", Or((A, And((B, D))))),
        ("metrics.a = 1 AND metrics.b = 2 OR metrics.d = 3", Or((And((A, B)), D))),
        ("(metrics.a = 1 OR metrics.b = 2) AND metrics.d = 3", And((Or((A, B)), D))),
        ("metrics.a = 1 AND (metrics.b = 2 OR metrics.d = 3)", And((A, Or((B, D))))),
        ("((metrics.a = 1))", A),
        ("(metrics.a = 1 AND metrics.b = 2) AND metrics.d = 3", And((A, B, D))),
        ("metrics.a=1 AND(metrics.b=2)", And((A, B))),
        ("  \n\tmetrics.a = 1\n", A),
    ],
)
def test_precedence_and_parentheses(text: str, expected: Node) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t "])
def test_empty_filter_is_no_condition(text: str | None) -> None:
    assert parse_filter(text) is None


def test_ast_is_frozen_and_hashable() -> None:
    node = parse("metrics.a = 1 AND tags.t IN ('x')")
    assert hash(node) == hash(parse("metrics.a = 1 and tags.t in ('x')"))
    with pytest.raises(AttributeError):
        A.key = "b"  # type: ignore[misc]


def test_tokenizer_positions() -> None:
    kinds = [(t.kind, t.text, t.pos) for t in tokenize("metrics.`a b` >= -1.5e3")]
    assert kinds == [
        ("word", "metrics", 0), ("punct", ".", 7), ("string", "a b", 8), ("op", ">=", 14),
        ("number", "-1.5e3", 17), ("end", "", 23),
    ]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("metrics.val_loss lss 0.1", 17, "expected a comparison operator (=, !=, <, <=, >, >=, LIKE"),
        ("metrics.val_loss lss 0.1", 17, "found 'lss'"),
        ("metrix.a = 1", 0, "unknown entity type 'metrix'"),
        ("Metrics.a = 1", 0, "expected one of metrics, params, tags, attributes"),
        ("attributes.colour = 'x'", 11, "unknown attribute 'colour': expected one of run_id, run_name"),
        ("colour = 'x'", 0, "unknown attribute 'colour'"),
        ("attributes.experiment_id = '1'", 11, "unknown attribute"),
        ("metrics.a =", 11, "expected a value"),
        ("metrics.a = AND metrics.b = 1", 12, "expected a value"),
        ("params.a = 'abc", 11, "unterminated string"),
        ('tags.t = "abc', 9, 'expected a closing "'),
        ("tags.`abc = 'x'", 5, "unterminated string"),
        ("metrics.a = 1.2.3", 12, "bad number '1.2.3'"),
        ("metrics.a = 12abc", 12, "bad number"),
        ("metrics.a = 1e", 12, "bad number"),
        ("metrics.a LIKE 1", 10, "LIKE is not allowed for metrics"),
        ("metrics.a IN ('1')", 10, "IN is not allowed for metrics"),
        ("start_time ILIKE '1%'", 11, "ILIKE is not allowed for attribute 'start_time'"),
        ("tags.t < 'a'", 7, "< is not allowed for tags: expected one of =, !=, LIKE, ILIKE, IN, NOT IN"),
        ("status >= 'a'", 7, ">= is not allowed for attribute 'status'"),
        ("metrics.a = 1 metrics.b = 2", 14, "expected AND, OR or the end of the filter"),
        ("metrics.a = 1 ;", 14, "found ';'"),
        ("metrics.a = 1 AND", 17, "expected <type>.<key>"),
        ("metrics.a = 1)", 13, "unbalanced parentheses"),
        ("(metrics.a = 1", 14, "unbalanced parentheses: expected AND, OR or ')'"),
        ("((metrics.a = 1)", 16, "closing the '(' at position 0"),
        ("()", 1, "expected <type>.<key>"),
        ("params.p IN ()", 13, "empty IN list"),
        ("params.p IN ('a',)", 17, "expected a quoted string in the IN list"),
        ("params.p IN ('a' 'b')", 17, "expected ',' or ')'"),
        ("params.p IN ('a'", 16, "expected ',' or ')'"),
        ("params.p IN 'a'", 12, "expected '('"),
        ("params.p IN (1, 2)", 13, "expected a quoted string"),
        ("params.p NOT LIKE 'a'", 9, "expected a comparison operator"),
        ("metrics.a == 1", 10, "found '=='"),
        ("metrics.a <> 1", 10, "expected a comparison operator"),
        ("metrics.a = '1'", 12, "expected a number for metrics"),
        ("end_time = 'x'", 11, "expected a number for attribute 'end_time'"),
        ("tags.t = 1", 9, "expected a quoted string for = on tags"),
        ("params.p LIKE 1", 14, "expected a quoted string"),
        ("status = 1", 9, "expected a quoted string"),
        ("params.lr < 'abc'", 12, "expected a number (params compare numerically"),
        ("tags.t = `x`", 9, "expected a value"),
        ("metrics. = 1", 9, "expected a key"),
        ('metrics."" = 1', 8, "non-empty key"),
        ("metrics.1abc = 1", 8, "expected a key"),
        ("'metrics'.a = 1", 0, "expected <type>.<key>"),
        ("params.model-type = 'x'", 12, "expected a comparison operator"),
    ],
)
def test_errors_say_where_and_what(text: str, position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    assert info.value.position == position
    assert str(info.value).startswith(f"at position {position}: ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_filter_longer_than_limit() -> None:
    text = "metrics.a = 1 AND " * 600 + "metrics.a = 1"
    assert len(text) > 10_000
    with pytest.raises(FilterError, match="at most 10000") as info:
        parse_filter(text)
    assert info.value.position == 10_000
    assert parse_filter("metrics.a = 1", max_length=13) == A
    with pytest.raises(FilterError, match="at most 12"):
        parse_filter("metrics.a = 1", max_length=12)


def test_nesting_is_bounded() -> None:
    ok = "(" * MAX_DEPTH + "metrics.a = 1" + ")" * MAX_DEPTH
    assert parse(ok) == A
    with pytest.raises(FilterError, match="nested deeper") as info:
        parse_filter("(" * 2000 + "metrics.a = 1" + ")" * 2000)
    assert info.value.position == MAX_DEPTH


# -- compilation ---------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{p\d+:(?:String|Float64|Int64|Array\(String\))\}")


@pytest.mark.parametrize(
    ("text", "sql", "params"),
    [
        ("status = 'FAILED'", "status = {p0:String}", {"p0": "FAILED"}),
        ("run_name != 'x'", "run_name != {p0:String}", {"p0": "x"}),
        ("user_id LIKE 'a%'", "like(user_id, {p0:String})", {"p0": "a%"}),
        ("artifact_uri ILIKE 's3%'", "ilike(artifact_uri, {p0:String})", {"p0": "s3%"}),
        ("run_id IN ('a', 'b')", "run_id IN {p0:Array(String)}", {"p0": ["a", "b"]}),
        (
            "lifecycle_stage NOT IN ('deleted')",
            "lifecycle_stage NOT IN {p0:Array(String)}",
            {"p0": ["deleted"]},
        ),
        ("start_time >= 1700000000000", "start_time >= {p0:Int64}", {"p0": 1700000000000}),
        ("end_time < 1.5e3", "end_time < {p0:Float64}", {"p0": 1500.0}),
        ("start_time > 99999999999999999999", "start_time > {p0:Float64}", {"p0": 1e20}),
        (
            "metrics.acc > 1",
            "run_id IN (SELECT run_id FROM db.latest_metrics WHERE key = {p0:String} "
            f"GROUP BY run_id HAVING {LATEST} > {{p1:Float64}})",
            {"p0": "acc", "p1": 1.0},
        ),
        (
            "params.lr = '0.1'",
            "run_id IN (SELECT run_id FROM db.params WHERE key = {p0:String} AND value = {p1:String})",
            {"p0": "lr", "p1": "0.1"},
        ),
        (
            "params.lr <= 0.1",
            "run_id IN (SELECT run_id FROM db.params WHERE key = {p0:String} "
            "AND toFloat64OrNull(value) <= {p1:Float64})",
            {"p0": "lr", "p1": 0.1},
        ),
        (
            "params.bs = 32",
            "run_id IN (SELECT run_id FROM db.params WHERE key = {p0:String} "
            "AND toFloat64OrNull(value) = {p1:Float64})",
            {"p0": "bs", "p1": 32.0},
        ),
        (
            "params.m ILIKE '%NN'",
            "run_id IN (SELECT run_id FROM db.params WHERE key = {p0:String} AND ilike(value, {p1:String}))",
            {"p0": "m", "p1": "%NN"},
        ),
        (
            "tags.t NOT IN ('a')",
            "run_id IN (SELECT run_id FROM db.tags FINAL WHERE deleted = 0 AND key = {p0:String} "
            "AND value NOT IN {p1:Array(String)})",
            {"p0": "t", "p1": ["a"]},
        ),
        (
            "status = 'A' OR (metrics.m < 1 AND start_time > 2)",
            "(status = {p0:String} OR (run_id IN (SELECT run_id FROM db.latest_metrics WHERE key = "
            f"{{p1:String}} GROUP BY run_id HAVING {LATEST} < {{p2:Float64}}) "
            "AND start_time > {p3:Int64}))",
            {"p0": "A", "p1": "m", "p2": 1.0, "p3": 2},
        ),
    ],
)
def test_compile_shapes(text: str, sql: str, params: dict[str, object]) -> None:
    assert compile_text(text) == (sql, params)


def test_binder_names_are_unique_across_calls() -> None:
    binder = Binder()
    first = compile_filter(parse("tags.a = 'x'"), "db", binder)
    second = compile_filter(parse("tags.a = 'x'"), "db", binder)
    assert "{p0:String}" in first and "{p2:String}" in second
    assert list(binder.params) == ["p0", "p1", "p2", "p3"]
    assert binder.bind(1, "Int64") == "{p4:Int64}"


@pytest.mark.parametrize("db", ["", "db; DROP TABLE x", "a.b", "1db"])
def test_compile_rejects_bad_database_names(db: str) -> None:
    with pytest.raises(ValueError, match="invalid database name"):
        compile_filter(A, db, Binder())


HOSTILE = [
    r"params.x = 'a\' OR 1=1 --'",
    "params.x = 'a'' OR ''1''=''1'",
    "tags.t = '); DROP TABLE runs; --'",
    "tags.t = '{p0:String} OR 1=1'",
    "params.x IN ('a\\'); DROP DATABASE db; --', 'b')",
    "params.`x'; DROP TABLE params; --` = 'v'",
    'tags."x` OR 1=1 --" = \'v\'',
    "tags.`a``b;c` ILIKE '%\\'%'",
    "metrics.`loss' OR '1'='1` < 1",
    "run_name LIKE '%\\' UNION SELECT * FROM system.users --'",
    r"""attributes.run_id NOT IN ('\\x', '")', '\''')--')""",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_user_text_never_reaches_sql(text: str) -> None:
    sql, params = compile_text(text)
    for value in params.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and len(item) > 2:
                assert item not in sql
    skeleton = _PLACEHOLDER.sub("?", sql)
    assert "{" not in skeleton and "}" not in skeleton
    for char in "'\"`;\\":
        assert char not in skeleton
    assert "--" not in skeleton and "DROP" not in skeleton and "UNION" not in skeleton


# -- order_by -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clause", "expected"),
    [
        ("metrics.acc DESC", OrderKey(METRICS, "acc", False)),
        ("metrics.acc desc", OrderKey(METRICS, "acc", False)),
        ("metric.acc", OrderKey(METRICS, "acc", True)),
        ("params.lr ASC", OrderKey(PARAMS, "lr", True)),
        ('params."learning rate" asc', OrderKey(PARAMS, "learning rate", True)),
        ("tags.`mlflow.runName` DESC", OrderKey(TAGS, "mlflow.runName", False)),
        ("tags.mlflow.runName", OrderKey(TAGS, "mlflow.runName", True)),
        ("attributes.start_time DESC", OrderKey(ATTRIBUTES, "start_time", False)),
        ("start_time", OrderKey(ATTRIBUTES, "start_time", True)),
        ("end_time DESC", OrderKey(ATTRIBUTES, "end_time", False)),
        ("created DESC", OrderKey(ATTRIBUTES, "start_time", False)),
        ("attr.run_name", OrderKey(ATTRIBUTES, "run_name", True)),
        ("  run.status   asc  ", OrderKey(ATTRIBUTES, "status", True)),
    ],
)
def test_order_by(clause: str, expected: OrderKey) -> None:
    assert parse_order_by([clause]) == [expected]


def test_order_by_keeps_clause_order() -> None:
    assert parse_order_by(["metrics.a DESC", "start_time"]) == [
        OrderKey(METRICS, "a", False), OrderKey(ATTRIBUTES, "start_time", True),
    ]
    assert parse_order_by([]) == []


@pytest.mark.parametrize(
    ("clauses", "position", "fragment"),
    [
        (["metrics.a up"], 10, "order_by[0] at position 10: expected ASC, DESC or the end of the clause"),
        (["start_time", "metrix.a"], 0, "order_by[1] at position 0: unknown entity type 'metrix'"),
        (["colour DESC"], 0, "order_by[0] at position 0: unknown attribute 'colour'"),
        (["a.b", "attributes.colour"], 0, "order_by[0]"),
        (["start_time", "attributes.colour"], 11, "order_by[1] at position 11: unknown attribute"),
        (["metrics.a DESC DESC"], 15, "found 'DESC'"),
        ([""], 0, "order_by[0] at position 0: expected <type>.<key>"),
        (["metrics.`a"], 8, "order_by[0] at position 8: unterminated string"),
        (["metrics.a; DROP"], 9, "found ';'"),
        (["x" * 10_001], 10_000, "order_by[0] at position 10000"),
    ],
)
def test_order_by_errors(clauses: list[str], position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_order_by(clauses)
    assert info.value.position == position
    assert fragment in str(info.value)


def test_order_by_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError, match="sequence of clauses"):
        parse_order_by("metrics.a DESC")


# -- against a real store ----------------------------------------------------------------------


def _seed(store: Store) -> None:
    runs = [
        ("r1", "alpha", "ann", "FINISHED", 1000, 2000),
        ("r2", "beta", "bob", "FINISHED", 2000, 3000),
        ("r3", "gamma", "ann", "RUNNING", 3000, None),
        ("r4", "delta", "bob", "FAILED", 4000, 4500),
        ("r5", "epsilon", "carl", "FINISHED", 5000, 6000),
        ("r6", "zeta", "carl", "KILLED", 6000, 6100),
    ]
    for run_id, name, user, status, start, end in runs:
        store.put_run(RunRecord(run_id, "e1", name, user, status, start, end, "active", f"s3://b/{run_id}"))
    store.put_params("r1", [("lr", "0.01"), ("model", "cnn")])
    store.put_params("r2", [("lr", "0.1"), ("model", "rnn")])
    store.put_params("r3", [("lr", "auto"), ("model", "cnn")])
    store.put_params("r4", [("lr", "1e-3"), ("model", "transformer")])
    store.put_params("r6", [("model", "a' OR 1=1 --")])
    store.put_tags("r1", [("team", "vision"), ("note", "it's")])
    store.put_tags("r2", [("team", "nlp")])
    store.put_tags("r3", [("team", "vision")])
    store.put_tags("r3", [("team", "audio")])  # a later write wins
    store.put_tags("r4", [("team", "nlp")])
    store.put_tags("r4", [("team", "nlp")], deleted=True)
    store.put_tags("r5", [("team", "Vision")])
    store.put_tags("r6", [("we;ird`key", "x")])
    points = [  # (run, key, step, value): the latest step, not the greatest value, counts
        ("r1", "acc", 0, 0.5), ("r1", "acc", 1, 0.9), ("r1", "loss", 0, 0.3),
        ("r2", "acc", 0, 0.95), ("r2", "acc", 1, 0.7),
        ("r4", "acc", 0, 0.99), ("r5", "acc", 3, 0.8),
    ]
    store.insert_arrow("metrics", pa.table({
        "run_id": [p[0] for p in points],
        "key": [p[1] for p in points],
        "step": pa.array([p[2] for p in points], pa.int64()),
        "timestamp": pa.array([10 * p[2] for p in points], pa.int64()),
        "value": pa.array([p[3] for p in points], pa.float64()),
        "writer_id": ["w"] * len(points),
        "seq": pa.array(range(len(points)), pa.uint64()),
    }))


EXPECTED = {
    "metrics.acc > 0.75": ["r1", "r4", "r5"],
    "metrics.acc != 0.9": ["r2", "r4", "r5"],
    "metrics.loss = 0.3": ["r1"],
    "params.lr < 0.05": ["r1", "r4"],
    "params.lr >= '0.05'": ["r2"],
    "params.lr = 0.1": ["r2"],
    "params.lr != 0.1": ["r1", "r4"],
    "params.model IN ('cnn', 'rnn')": ["r1", "r2", "r3"],
    "params.model NOT IN ('cnn')": ["r2", "r4", "r6"],
    "params.model != 'cnn'": ["r2", "r4", "r6"],
    "params.model LIKE '%n'": ["r1", "r2", "r3"],
    "params.model = 'a'' OR 1=1 --'": ["r6"],
    "tags.team = 'vision'": ["r1"],
    "tags.team = 'nlp'": ["r2"],
    "tags.team != 'nlp'": ["r1", "r3", "r5"],
    "tags.team LIKE 'vis%'": ["r1"],
    "tags.team ILIKE 'vis%'": ["r1", "r5"],
    "tags.note = 'it''s'": ["r1"],
    "tags.`we;ird``key` = 'x'": ["r6"],
    "attributes.status = 'FINISHED' AND metrics.acc < 0.85": ["r2", "r5"],
    "status = 'RUNNING' OR params.lr = '0.1'": ["r2", "r3"],
    "(user_id = 'ann' OR user_id = 'carl') AND start_time >= 3000": ["r3", "r5", "r6"],
    "user_id = 'ann' OR user_id = 'carl' AND start_time >= 3000": ["r1", "r3", "r5", "r6"],
    "status IN ('FAILED', 'KILLED')": ["r4", "r6"],
    "attributes.run_id NOT IN ('r1', 'r2')": ["r3", "r4", "r5", "r6"],
    "end_time < 3500": ["r1", "r2"],
    "end_time != 2000": ["r2", "r4", "r5", "r6"],
    "run_name LIKE '%ta'": ["r2", "r4", "r6"],
    "artifact_uri = 's3://b/r5'": ["r5"],
}


def test_compiled_filters_select_the_right_runs(store: Store) -> None:
    _seed(store)
    got = {}
    for text in EXPECTED:
        binder = Binder()
        condition = compile_filter(parse(text), store.database, binder)
        rows = store.query_rows(
            f"SELECT run_id FROM {store.database}.runs FINAL WHERE {condition} ORDER BY run_id",
            binder.params,
        )
        got[text] = [row[0] for row in rows]
    assert got == EXPECTED
