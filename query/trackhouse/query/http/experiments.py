r"""Experiment reads: get by id or name with tags, and MLflow's experiment search.

Experiments are few (thousands, not millions), so search reads the experiments of
the asked view in one query and filters, orders and pages them here. The filter
is MLflow's experiment grammar (SearchExperimentsUtils): comparisons joined by AND on
the attributes `name`, `experiment_id`, `creation_time`, `last_update_time` (bare, or
prefixed `attribute.` / `attributes.`) and `tags.<key>` (or `tag.<key>`; a key with
spaces or dots quoted "...", `...` or '...'). `name`, `experiment_id` and tags compare quoted
strings with = != LIKE ILIKE; `experiment_id` also with IN and NOT IN and a list of
quoted strings; the times compare integers with = != < <= > >=. `tags.<key> IS NULL`
matches the experiments without that tag, `IS NOT NULL` those with it (tags only,
as MLflow). Anything else is refused with INVALID_PARAMETER_VALUE saying what is wrong.
Quoted values and LIKE patterns follow run search's rules (`trackhouse.query.filters`,
whose string reader and pattern check this module uses): backslashes are kept as
written, as MLflow keeps them; in LIKE and ILIKE, \% \_ \\ match % _ \ and a backslash
before anything else is itself, as ClickHouse runs LIKE for run search; a pattern ending
in a lone backslash is refused.
Order keys are `name`, `experiment_id`, `creation_time`, `last_update_time`
(default: creation_time DESC, experiment_id ASC, as MLflow). Page tokens carry an
offset and a fingerprint of the question — filter, order and view, not the page size,
which may change from page to page as MLflow's client changes it (a token from another
question is refused).

Experiment tags are rows of the `experiment_tags` table (written by the ingest service).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from trackhouse.query.filters import Token, check_pattern, read_string
from trackhouse.query.http.errors import invalid
from trackhouse.store import ExperimentRecord, Store
from trackhouse.store.reads import Rows, Steps

_COLUMNS = "experiment_id, name, artifact_location, lifecycle_stage, creation_time, last_update_time"
VIEWS = {"ACTIVE_ONLY": ("active",), "DELETED_ONLY": ("deleted",), "ALL": ("active", "deleted")}
STRING_FIELDS = ("name", "experiment_id")
NUMBER_FIELDS = ("creation_time", "last_update_time")
LIST_FIELDS = ("experiment_id",)  # MLflow's SearchExperimentsUtils.LIST_SUPPORTED_KEYS
STRING_OPS = ("=", "!=", "LIKE", "ILIKE")
NUMBER_OPS = ("=", "!=", "<", "<=", ">", ">=")
LIST_OPS = ("IN", "NOT IN")
NULL_OPS = ("IS NULL", "IS NOT NULL")
ENTITIES = ("tag", "tags", "attribute", "attributes")
ORDER_FIELDS = ("name", "experiment_id", "creation_time", "last_update_time")
DEFAULT_ORDER = (("creation_time", False), ("experiment_id", True))
MAX_RESULTS = 50_000
DEFAULT_MAX_RESULTS = 1000

_TOKEN = re.compile(  # a quote only starts a string (filters.read_string reads it), or a quoted key (qident)
    r"\s*(?:(?P<quote>['\"])|(?P<num>-?\d+)|(?P<op>!=|<=|>=|=|<|>)|(?P<punct>[(),])"
    r"|(?P<qident>\w+\.)(?=['\"])|(?P<ident>(?:\w+\.)?(?:`[^`]+`|\w[\w.]*)))",
    re.IGNORECASE,
)
# One element of a LIKE pattern: an escaped % _ or \ (a literal), a wildcard, or a character.
_LIKE_ELEMENT = re.compile(r"\\([%_\\])|(%)|(_)|(.)", re.DOTALL)


@dataclass(frozen=True)
class Condition:
    field: str  # "name", "experiment_id", "creation_time", "last_update_time" or "tags.<key>"
    op: str
    value: str | int | tuple[str, ...] | None  # a tuple for IN and NOT IN, None for IS [NOT] NULL


def _tokenize(text: str) -> list[Token]:
    """Tokens of kinds string (read as run search reads them), num, op, punct and ident (an
    ident whose key was quoted, `tags."x y"`, has `quote` set and the key unquoted in its text)."""
    tokens: list[Token] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos, end)
        if m is None:
            raise invalid(f"Invalid filter string {text!r}: unexpected text at position {pos}")
        kind = m.lastgroup or ""
        if kind == "quote":  # as run search reads it; unterminated: FilterError (400)
            token = read_string(text, m.start(kind))
        elif kind == "qident":  # entity."key" (or 'key', as MLflow): read as run search reads "key"
            key = read_string(text, m.end(kind))
            token = Token("ident", m.group(kind) + key.text, m.start(kind), key.end, key.quote)
        else:
            token = Token(kind, m.group(kind), m.start(kind), m.end())
        tokens.append(token)
        pos = token.end
    return tokens


def _word(tokens: Sequence[Token], i: int, *words: str) -> bool:
    return i < len(tokens) and tokens[i].kind == "ident" and not tokens[i].quote and tokens[i].text.upper() in words


def _punct(tokens: Sequence[Token], i: int, char: str) -> bool:
    return i < len(tokens) and tokens[i].kind == "punct" and tokens[i].text == char


def parse_filter(text: str) -> list[Condition]:
    """MLflow's experiment filter: `cond AND cond ...`; raises INVALID_PARAMETER_VALUE or FilterError."""
    tokens = _tokenize(text)
    conditions: list[Condition] = []
    i = 0
    while i < len(tokens):
        if conditions:
            if not _word(tokens, i, "AND"):
                raise invalid(f"Invalid filter string {text!r}: expected AND between comparisons at position "
                              f"{tokens[i].pos}")
            i += 1
        condition, i = _condition(tokens, i, text)
        conditions.append(condition)
    return conditions


def _field(token: Token, text: str) -> str:
    """The field a comparison's first token names: an attribute, or "tags.<key>"."""
    if token.kind == "string":  # "name": a double-quoted identifier, as MLflow reads it
        entity, key = "", token.text
    else:
        entity, dot, key = token.text.partition(".")
        if not dot or entity.startswith("`") or entity.lower() not in ENTITIES:
            entity, key = "", token.text
        key = key if token.quote else key.strip("`")
    if entity.lower() in ("tag", "tags"):
        return f"tags.{key}"
    if key not in STRING_FIELDS + NUMBER_FIELDS:
        raise invalid(f"Invalid attribute key {token.text!r} in experiment filter; expected one of "
                      f"{', '.join(STRING_FIELDS + NUMBER_FIELDS)} or tags.<key>")
    return key


def _operator(tokens: Sequence[Token], i: int, text: str) -> tuple[str, int]:
    """(the operator at tokens[i], the index after it)."""
    if i >= len(tokens):
        raise invalid(f"Invalid filter string {text!r}: expected <field> <operator> <value>")
    token = tokens[i]
    if token.kind == "op":
        return token.text, i + 1
    if _word(tokens, i, "LIKE", "ILIKE", "IN"):
        return token.text.upper(), i + 1
    if _word(tokens, i, "NOT") and _word(tokens, i + 1, "IN"):
        return "NOT IN", i + 2
    if _word(tokens, i, "IS"):
        if _word(tokens, i + 1, "NULL"):
            return "IS NULL", i + 2
        if _word(tokens, i + 1, "NOT") and _word(tokens, i + 2, "NULL"):
            return "IS NOT NULL", i + 3
        raise invalid(f"Invalid filter string {text!r}: expected NULL or NOT NULL after IS at position {token.pos}")
    raise invalid(f"Invalid filter string {text!r}: {token.text!r} is not a comparison operator")


def _values(tokens: Sequence[Token], i: int, text: str, field: str) -> tuple[tuple[str, ...], int]:
    """(the list of quoted strings `('a', "b")` at tokens[i], the index after it); a comma may end
    the list, as MLflow (sqlparse) reads it."""
    expected = f"{field} IN and NOT IN take a list of quoted strings like ('1', '2')"
    if not _punct(tokens, i, "("):
        raise invalid(f"Invalid filter string {text!r}: {expected}")
    values: list[str] = []
    while True:
        i += 1
        if i >= len(tokens) or tokens[i].kind != "string":
            raise invalid(f"Invalid filter string {text!r}: {expected}")
        values.append(tokens[i].text)
        i += 1
        if _punct(tokens, i, ")"):
            return tuple(values), i + 1
        if not _punct(tokens, i, ","):
            raise invalid(f"Invalid filter string {text!r}: {expected}")
        if _punct(tokens, i + 1, ")"):
            return tuple(values), i + 2


def _condition(tokens: Sequence[Token], i: int, text: str) -> tuple[Condition, int]:
    """(the comparison at tokens[i], the index after it)."""
    first = tokens[i] if i < len(tokens) else None
    if first is None or not (first.kind == "ident" or (first.kind == "string" and first.quote == '"')):
        raise invalid(f"Invalid filter string {text!r}: expected <field> <operator> <value>")
    field = _field(first, text)
    op, i = _operator(tokens, i + 1, text)
    if op in NULL_OPS:
        if not field.startswith("tags."):
            raise invalid(f"Invalid filter string {text!r}: IS NULL / IS NOT NULL is only supported for tags, "
                          f"not for attribute {field!r}")
        return Condition(field, op, None), i
    if op in LIST_OPS:
        if field not in LIST_FIELDS:
            raise invalid(f"Invalid filter string {text!r}: {op} is not supported for {field}; only "
                          f"{', '.join(LIST_FIELDS)} compares with a list of quoted strings")
        values, i = _values(tokens, i, text, field)
        return Condition(field, op, values), i
    if i >= len(tokens):
        raise invalid(f"Invalid filter string {text!r}: expected <field> <operator> <value>")
    value = tokens[i]
    if field in NUMBER_FIELDS:
        if value.kind != "num" or op not in NUMBER_OPS:
            raise invalid(f"Invalid filter string {text!r}: {field} compares numbers with {' '.join(NUMBER_OPS)}")
        return Condition(field, op, int(value.text)), i + 1
    if value.kind != "string" or op not in STRING_OPS:
        also = " (and with IN, NOT IN a list)" if field in LIST_FIELDS else ""
        raise invalid(f"Invalid filter string {text!r}: {field} compares quoted strings with "
                      f"{' '.join(STRING_OPS)}{also}")
    if op in ("LIKE", "ILIKE"):
        check_pattern(text, op, value.text, value)  # the patterns run search refuses
    return Condition(field, op, value.text), i + 1


@lru_cache(maxsize=256)
def _like_pieces(pattern: str, ignore_case: bool) -> tuple[re.Pattern[str], ...]:
    """One regex per part of `pattern` between its wildcard %s, the last anchored at the end.

    A piece holds literals and `.` (for _), so it matches a fixed number of characters.
    """
    pieces: list[list[str]] = [[]]
    for escaped, many, one, char in _LIKE_ELEMENT.findall(pattern):
        if many:
            pieces.append([])
        else:
            pieces[-1].append("." if one else re.escape(escaped or char))
    if len(pieces) > 1:
        pieces[-1].append(r"\Z")
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return tuple(re.compile("".join(piece), flags) for piece in pieces)


def like(value: str, pattern: str, ignore_case: bool = False) -> bool:
    r"""SQL LIKE (ILIKE when `ignore_case`) as ClickHouse runs it for run search.

    % is any run of characters and _ any one (newlines too); \% \_ \\ are a literal % _ \;
    a backslash before any other character is itself. The pieces between %s are found left
    to right, each at its first place after the one before (the first must start the value,
    the last end it): never the exponential backtracking of a regex with .* for each %.
    """
    first, *rest = _like_pieces(pattern, ignore_case)
    if not rest:
        return first.fullmatch(value) is not None
    found = first.match(value)
    for piece in rest:
        if found is None:
            return False
        found = piece.search(value, found.end())
    return found is not None


def matches(cond: Condition, rec: ExperimentRecord, tags: dict[str, str]) -> bool:
    if cond.op in NULL_OPS:  # tags only (parse_filter)
        return (cond.field[5:] in tags) == (cond.op == "IS NOT NULL")
    if cond.field.startswith("tags."):
        actual: Any = tags.get(cond.field[5:])
        if actual is None:
            return False
    else:
        actual = getattr(rec, cond.field)
    want = cond.value
    if isinstance(want, tuple):
        return (actual in want) == (cond.op == "IN")
    if cond.op in ("LIKE", "ILIKE"):
        return like(actual, str(want), ignore_case=cond.op == "ILIKE")
    if cond.op in ("=", "!="):
        return bool((actual == want) == (cond.op == "="))
    return bool({"<": actual < want, "<=": actual <= want, ">": actual > want, ">=": actual >= want}[cond.op])


def parse_order(items: Sequence[str]) -> list[tuple[str, bool]]:
    keys = []
    for item in items:
        words = item.strip().split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].upper() not in ("ASC", "DESC")):
            raise invalid(f"Invalid order_by clause {item!r}: expected '<field> [ASC|DESC]'")
        field = words[0].split(".", 1)[1] if words[0].startswith(("attributes.", "attribute.")) else words[0]
        if field not in ORDER_FIELDS:
            raise invalid(f"Invalid order_by clause {item!r}: order by one of {', '.join(ORDER_FIELDS)}")
        keys.append((field, len(words) == 1 or words[1].upper() == "ASC"))
    fields = {f for f, _ in keys}
    return keys + [k for k in DEFAULT_ORDER if k[0] not in fields] if keys else list(DEFAULT_ORDER)


class ExperimentReader:
    """Reads of experiments, async (on the store's async client, or its thread pool)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, *, experiment_id: str | None = None, name: str | None = None) -> ExperimentRecord | None:
        return await self._store.arun(self._store.experiment_steps(experiment_id=experiment_id, name=name))

    async def tags(self, experiment_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        return await self._store.arun(self._store.experiment_tags_steps(experiment_ids))

    async def search(self, filter_text: str, order_by: Sequence[str], max_results: int | None, page_token: str,
                     view: str, allowed: Sequence[str] | None = None,
                     ) -> tuple[list[tuple[ExperimentRecord, dict[str, str]]], str]:
        """One page of experiments; `allowed`: only these experiment ids (an experiment-scoped caller)."""
        return await self._store.arun(self._search(filter_text, order_by, max_results, page_token, view, allowed))

    def _search(self, filter_text: str, order_by: Sequence[str], max_results: int | None, page_token: str,
                view: str, allowed: Sequence[str] | None,
                ) -> Steps[tuple[list[tuple[ExperimentRecord, dict[str, str]]], str]]:
        limit = DEFAULT_MAX_RESULTS if max_results is None else max_results
        if not 0 < limit <= MAX_RESULTS:
            raise invalid(f"Invalid value {limit} for parameter 'max_results' supplied. It must be at most "
                          f"{MAX_RESULTS}, and at least 1")
        if view not in VIEWS:
            raise invalid(f"Invalid value {view!r} for parameter 'view_type'")
        conditions = parse_filter(filter_text)
        order = parse_order(order_by)
        # Not the page size: an offset is right whatever the next page's size (MLflow's client asks
        # for the remainder on its last page, `get_results_from_paginated_fn`).
        question = hashlib.sha256(orjson.dumps([filter_text, list(order_by), view])).hexdigest()[:16]
        offset = _decode_token(page_token, question) if page_token else 0
        where, params = "lifecycle_stage IN {stages:Array(String)}", {"stages": list(VIEWS[view])}
        if allowed is not None:
            where += " AND experiment_id IN {allowed:Array(String)}"
            params["allowed"] = list(allowed)
        rows = yield Rows(f"SELECT {_COLUMNS} FROM {self._store.t('experiments')} FINAL WHERE {where}", params)
        records = [ExperimentRecord(*row) for row in rows]
        tags = yield from self._store.experiment_tags_steps([r.experiment_id for r in records])
        found = [r for r in records if all(matches(c, r, tags[r.experiment_id]) for c in conditions)]
        for field, ascending in reversed(order):
            found.sort(key=lambda r, f=field: getattr(r, f), reverse=not ascending)  # type: ignore[misc]
        page = found[offset:offset + limit]
        token = _encode_token(offset + limit, question) if offset + limit < len(found) else ""
        return [(r, tags[r.experiment_id]) for r in page], token


def _encode_token(offset: int, question: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"o": offset, "q": question})).decode()


def _decode_token(token: str, question: str) -> int:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token.encode()))
        offset, asked = int(data["o"]), data["q"]
    except (ValueError, KeyError, TypeError):
        raise invalid("Invalid page token: it was not issued by this server") from None
    if asked != question or offset < 0:
        raise invalid("Invalid page token: it belongs to another search (filter, order_by or view_type changed)")
    return offset
