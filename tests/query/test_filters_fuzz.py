"""Property tests for trackhouse.query.filters and .order: any text, generated valid filters.

- Any text (arbitrary, and built from the grammar's own fragments so it gets deep)
  either parses or raises FilterError with a position inside the text; nothing else.
- A generated AST rendered to text parses back to the same AST (the render here is
  independent of the parser), and its compiled SQL carries no user text: the SQL is
  the same whatever the keys and strings are — only placeholders differ in value.

Examples: the hypothesis profile in tests/conftest.py (TRACKHOUSE_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from trackhouse.query.filters import (
    ATTRIBUTES,
    DEFAULT_MAX_LENGTH,
    METRICS,
    NUMERIC_ATTRIBUTES,
    NUMERIC_OPS,
    PARAM_OPS,
    PARAMS,
    STRING_ATTRIBUTES,
    STRING_OPS,
    TAGS,
    And,
    Binder,
    Comparison,
    FilterError,
    Node,
    Or,
    compile_filter,
    parse_filter,
)
from trackhouse.query.order import parse_order_by

_PLACEHOLDER = re.compile(r"\{p\d+:(?:String|Float64|Int64|Array\(String\))\}")

# -- any text ---------------------------------------------------------------------------------

FRAGMENTS = [
    "metrics.", "params.", "tags.", "attributes.", "run.", "loss", "lr", "`a b`", '"q"', "'v'", "'", '"', "`",
    "\\", "=", "!=", "<", "<=", ">", ">=", "==", "<>", "LIKE", "ilike", "IN", "NOT", "not in", "AND", "or",
    "(", ")", ",", ".", "1", "-2.5", "1e9", "1e", "+.5", "9" * 30, "start_time", "status", "run_name", " ",
    "\u00e9", "\u0660", "\x00", "\n", "{p0:String}", ";", "--",
]
filterish = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=300), filterish)


def _check_refusal(exc: FilterError, text: str) -> None:
    assert 0 <= exc.position <= max(len(text), DEFAULT_MAX_LENGTH)
    assert "position" in str(exc)


@given(any_text)
@example("metrics.a < " + "1" * 5000)   # int() of > 4300 digits raised a bare ValueError
@example("params.a = " + "9" * 400)     # an int beyond float range overflowed in compile
@example("start_time > -" + "9" * 400)
@example("tags.x LIKE '%\\'")           # a LIKE pattern ending in a lone backslash
def test_any_text_parses_or_raises_filter_error(text: str) -> None:
    try:
        node = parse_filter(text)
    except FilterError as exc:
        _check_refusal(exc, text)
        return
    if node is not None:
        binder = Binder()
        sql = compile_filter(node, "db", binder)
        assert _PLACEHOLDER.sub("?", sql).count("?") == len(binder.params)


@given(st.lists(any_text, max_size=4))
def test_any_order_by_parses_or_raises_filter_error(clauses: list[str]) -> None:
    try:
        parse_order_by(clauses)
    except FilterError as exc:
        assert "order_by" in str(exc)


@pytest.mark.parametrize("unit", ["(", "'", "`", "\\", "metrics.a = 1 AND ", "9", "é"])
def test_longest_inputs_are_answered(unit: str) -> None:
    """The worst inputs at the length limit end in an answer (pytest-timeout catches a hang)."""
    text = (unit * DEFAULT_MAX_LENGTH)[:DEFAULT_MAX_LENGTH]
    try:
        parse_filter(text)
    except FilterError as exc:
        _check_refusal(exc, text)
    with pytest.raises(FilterError, match="at most"):
        parse_filter(text + unit)


# -- valid filters: AST -> text -> AST ---------------------------------------------------------


def _writable(value: str) -> bool:
    """Whether '...' can hold `value` (MLflow's strings keep backslashes as written, so a
    backslash right before the quote does not close it, and none can end the string)."""
    return "\\'" not in value and not value.endswith("\\")


keys = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
strings = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20).filter(_writable)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(ints, floats)


def _value_for(op: str) -> st.SearchStrategy[str | float | tuple[str, ...]]:
    if op in ("IN", "NOT IN"):
        return st.lists(strings, min_size=1, max_size=4).map(tuple)
    return strings


@st.composite
def comparisons(draw: st.DrawFn) -> Comparison:
    entity = draw(st.sampled_from([METRICS, PARAMS, TAGS, ATTRIBUTES]))
    attribute_keys = st.sampled_from(STRING_ATTRIBUTES + NUMERIC_ATTRIBUTES)
    key = draw(attribute_keys if entity == ATTRIBUTES else keys)
    if entity == METRICS or (entity == ATTRIBUTES and key in NUMERIC_ATTRIBUTES):
        op = draw(st.sampled_from(NUMERIC_OPS))
        value: str | float | tuple[str, ...] = draw(numbers)
    elif entity == PARAMS:
        op = draw(st.sampled_from(PARAM_OPS))
        if op in ("<", "<=", ">", ">="):
            value = draw(numbers)
        elif op in ("=", "!="):
            value = draw(st.one_of(strings, numbers))
        else:
            value = draw(_value_for(op))
    else:
        op = draw(st.sampled_from(STRING_OPS))
        value = draw(_value_for(op))
    return Comparison(entity, key, op, value)


def _joined(kind: type[And] | type[Or], depth: int) -> st.SearchStrategy[Node]:
    # Canonical shapes (as the parser flattens): an And holds comparisons and Ors, an Or
    # holds comparisons and Ands.
    other = Or if kind is And else And
    inner = comparisons() if depth == 0 else st.one_of(comparisons(), _joined(other, depth - 1))
    return st.lists(inner, min_size=2, max_size=3).map(lambda items: kind(tuple(items)))


filters = st.one_of(comparisons(), _joined(And, 2), _joined(Or, 2))


def _quote(text: str, quote: str) -> str:
    """Backslashes as written (as MLflow reads them), the quote doubled (extension)."""
    return quote + text.replace(quote, quote + quote) + quote


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def render(node: Node, case: str = "upper") -> str:
    """Filter text for an AST, written independently of the parser."""
    if isinstance(node, And | Or):
        word = " AND " if isinstance(node, And) else " OR "
        word = word.lower() if case == "lower" else word
        return word.join(f"({render(item, case)})" if isinstance(item, And | Or) else render(item, case)
                         for item in node.items)
    key = node.key if node.entity == ATTRIBUTES else _quote(node.key, "`")
    if isinstance(node.value, tuple):
        value = "(" + ", ".join(_quote(v, "'") for v in node.value) + ")"
    elif isinstance(node.value, str):
        value = _quote(node.value, "'")
    else:
        value = _number(node.value)
    return f"{node.entity}.{key} {node.op} {value}"


@given(filters, st.sampled_from(["upper", "lower"]))
def test_rendered_filters_round_trip(node: Node, case: str) -> None:
    assert parse_filter(render(node, case)) == node


def _anonymous(node: Node) -> Node:
    """The same filter with every user string replaced: the SQL must not change."""
    if isinstance(node, And | Or):
        return type(node)(tuple(_anonymous(item) for item in node.items))
    key = node.key if node.entity == ATTRIBUTES else "k"
    value = node.value
    if isinstance(value, tuple):
        value = ("v",) * len(value)
    elif isinstance(value, str):
        value = "v"
    return Comparison(node.entity, key, node.op, value)


@given(filters)
def test_compiled_sql_holds_no_user_text(node: Node) -> None:
    binder, anonymous = Binder(), Binder()
    sql = compile_filter(node, "db", binder)
    assert sql == compile_filter(_anonymous(node), "db", anonymous)
    assert binder.params.keys() == anonymous.params.keys()
    skeleton = _PLACEHOLDER.sub("?", sql)
    assert skeleton.count("?") == len(binder.params)
    for char in "'\"`;\\{}":
        assert char not in skeleton
