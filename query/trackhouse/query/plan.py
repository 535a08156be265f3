"""Run-search SQL over the search layout (schema migration 2), from a parsed filter.

Owns the translation of filter ASTs (`trackhouse.query.filters`) and order keys
into SQL over `search_runs`, `search_params`, `search_tags` and
`search_metrics`: the copies kept by materialized views and sorted so that one
key is one primary-key range (docs/search.md). Semantics are those of
`filters.compile_filter` exactly — the same operators, the same bound values,
params compared numerically where they parse as numbers, `!=` and NOT IN
matching only runs that have the key, IS NULL matching only runs that do not —
only the tables differ.

Invariants: user text only ever travels as bound parameters (`Binder`); the
only names pasted are our own columns and the whitelisted database name; every
mutable copy is read with FINAL (latest tag version, latest metric tuple).
"""

from __future__ import annotations

from trackhouse.query.filters import (
    ATTRIBUTES,
    METRICS,
    NULL_OPS,
    PARAMS,
    And,
    Binder,
    Comparison,
    Node,
    Or,
    condition,
)
from trackhouse.store.schema import check_identifier, latest_value

# One run per row, latest version: the base of every search.
RUNS = "search_runs"


def key_values(entity: str, db: str, key: str, restrict: str = "") -> tuple[str, str]:
    """(subquery of run_id, v for one key, ClickHouse type of v); `key` is a bound placeholder.

    `restrict`: a condition on run_id (`run_id IN {ids}`) that every row must also meet;
    run_id is in each copy's sorting key, so it narrows the primary-key range read.
    """
    more = f" AND {restrict}" if restrict else ""
    if entity == METRICS:
        return (f"SELECT run_id, {latest_value('last_key')} AS v FROM {db}.search_metrics FINAL "
                f"WHERE key = {key}{more}", "Float64")
    if entity == PARAMS:
        return f"SELECT run_id, value AS v FROM {db}.search_params FINAL WHERE key = {key}{more}", "String"
    return (f"SELECT run_id, value AS v FROM {db}.search_tags FINAL WHERE key = {key} AND deleted = 0{more}",
            "String")


def compile_search_filter(node: Node, db: str, binder: Binder, restrict: str = "") -> str:
    """A boolean expression over the columns of `search_runs FINAL`; `restrict` as in `key_values`."""
    check_identifier(db)
    if isinstance(node, And | Or):
        joiner = " AND " if isinstance(node, And) else " OR "
        return "(" + joiner.join(compile_search_filter(item, db, binder, restrict) for item in node.items) + ")"
    return _comparison(node, db, binder, restrict)


def has_key_terms(node: Node | None) -> bool:
    """Whether the filter compares any param, tag or metric (a set of run ids each)."""
    if node is None:
        return False
    if isinstance(node, And | Or):
        return any(has_key_terms(item) for item in node.items)
    return node.entity != ATTRIBUTES


def _comparison(c: Comparison, db: str, binder: Binder, restrict: str = "") -> str:
    if c.entity == ATTRIBUTES:
        return condition(c.key, c, binder)
    key = binder.bind(c.key, "String")
    sub, _ = key_values(c.entity, db, key, restrict)
    if c.entity == PARAMS:
        # Params are write-once (ingest refuses another value): every row of a (key, run)
        # holds the same value, so a set of run ids needs no FINAL (5-10x cheaper on
        # unmerged parts, docs/search.md).
        sub = sub.replace(" FINAL ", " ")
    if c.op in NULL_OPS:  # the runs with the key (any value), or all the others
        return f"run_id {'NOT IN' if c.op == 'IS NULL' else 'IN'} (SELECT run_id FROM ({sub}))"
    return f"run_id IN (SELECT run_id FROM ({sub}) WHERE {value_condition(c, binder)})"


def value_condition(c: Comparison, binder: Binder, value: str = "v") -> str:
    """The comparison `c` on `value`: the column `v` of `key_values(c.entity, ...)`, or another
    expression of the key's value (our own SQL) that is NULL where a run lacks the key."""
    if c.op in NULL_OPS:
        return condition(value, c, binder)
    numeric_param = c.entity == PARAMS and not isinstance(c.value, str | tuple)
    column = f"toFloat64OrNull({value})" if numeric_param else value
    number_type = "Float64" if c.entity in (METRICS, PARAMS) else ""
    return condition(column, c, binder, number_type)


def split_pushed(node: Node | None, entity: str, key: str) -> tuple[Node | None, list[Comparison]]:
    """(the rest of the filter, its top-level AND terms that compare `entity`.`key`).

    Those terms can be evaluated on the order key's own join instead of as a set of
    run ids: a comparison on a param, tag or metric matches only runs that have the
    key, so `base JOIN (rows of the key that pass)` is `base WHERE run_id IN (...)`
    with the key's rows read once instead of twice. Not IS NULL, which matches the
    runs without the key: it stays in the rest.
    """
    items = node.items if isinstance(node, And) else (() if node is None else (node,))
    pushed = [i for i in items if isinstance(i, Comparison) and (i.entity, i.key) == (entity, key)
              and i.op != "IS NULL"]
    rest = tuple(i for i in items if not any(i is p for p in pushed))
    if not pushed:
        return node, []
    return (None if not rest else rest[0] if len(rest) == 1 else And(rest)), pushed

