"""Run-search ordering: MLflow's `order_by` clauses parsed to `OrderKey`s.

Owns the order_by language only; turning keys into SQL is the search module's
job. Shares the tokenizer and identifier rules of `trackhouse.query.filters`,
so quoting and entity aliases mean the same in filters and in ordering.

Invariants: pure (no I/O); `entity` is canonical (METRICS, PARAMS, TAGS or
ATTRIBUTES from filters); attribute keys are whitelisted (ORDER_ATTRIBUTES);
every error is a `FilterError` whose `position` is an offset within the
offending clause and whose message names the clause, e.g. "order_by[1] at
position 13: expected ASC, DESC or the end of the clause, found 'up'".

Grammar (EBNF; ASC/DESC case-insensitive; the default is ascending):

    clause = identifier [ "ASC" | "DESC" ] ;      (* identifier as in filters *)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trackhouse.query.filters import (
    DEFAULT_MAX_LENGTH,
    NUMERIC_ATTRIBUTES,
    STRING_ATTRIBUTES,
    FilterError,
    Parser,
    check_length,
)

ORDER_ATTRIBUTES = STRING_ATTRIBUTES + NUMERIC_ATTRIBUTES
MAX_CLAUSES = 100


@dataclass(frozen=True)
class OrderKey:
    """One order_by clause: `entity` is one of METRICS, PARAMS, TAGS, ATTRIBUTES."""

    entity: str
    key: str
    ascending: bool


def parse_order_by(clauses: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> list[OrderKey]:
    """Parse each `<type>.<key> [ASC|DESC]` clause (a bare key names an attribute)."""
    if isinstance(clauses, str):
        raise TypeError("order_by takes a sequence of clauses, e.g. ['metrics.loss DESC'], not one string")
    if len(clauses) > MAX_CLAUSES:
        raise FilterError(f"order_by has {len(clauses)} clauses; expected at most {MAX_CLAUSES}", 0)
    return [_parse_clause(clause, index, max_length) for index, clause in enumerate(clauses)]


def _parse_clause(clause: str, index: int, max_length: int) -> OrderKey:
    prefix = f"order_by[{index}] "
    check_length(clause, max_length, "the clause", prefix)
    parser = Parser(clause, prefix)
    entity, key = parser.identifier(ORDER_ATTRIBUTES)
    ascending = True
    if parser.peek().is_keyword("ASC", "DESC"):
        ascending = parser.advance().text.upper() == "ASC"
    if parser.peek().kind != "end":
        parser.fail(parser.peek(), "ASC, DESC or the end of the clause")
    return OrderKey(entity, key, ascending)
