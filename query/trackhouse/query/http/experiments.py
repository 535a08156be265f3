r"""Experiment reads: get by id or name with tags, and MLflow's experiment search.

Experiments are few (thousands, not millions), so search reads the experiments of
the asked view in one query and filters, orders and pages them here. The filter
is MLflow's experiment grammar: comparisons joined by AND on `name`,
`creation_time`, `last_update_time` (attributes, optionally `attributes.`-prefixed)
and `tags.<key>`; strings compare with = != LIKE ILIKE, times with = != < <= > >=.
Quoted values and LIKE patterns follow run search's rules (`trackhouse.query.filters`,
whose string reader and pattern check this module uses): backslashes are kept as
written, as MLflow keeps them; in LIKE and ILIKE, \% \_ \\ match % _ \ and a backslash
before anything else is itself, as ClickHouse runs LIKE for run search; a pattern ending
in a lone backslash is refused.
Order keys are `name`, `experiment_id`, `creation_time`, `last_update_time`
(default: creation_time DESC, experiment_id ASC, as MLflow). Page tokens carry an
offset and a fingerprint of the question (a token from another question is refused).

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
STRING_FIELDS = ("name",)
NUMBER_FIELDS = ("creation_time", "last_update_time")
ORDER_FIELDS = ("name", "experiment_id", "creation_time", "last_update_time")
DEFAULT_ORDER = (("creation_time", False), ("experiment_id", True))
MAX_RESULTS = 50_000
DEFAULT_MAX_RESULTS = 1000

_TOKEN = re.compile(  # a quote only starts a string: filters.read_string reads it
    r"\s*(?:(?P<quote>['\"])|(?P<num>-?\d+)|(?P<op>!=|<=|>=|=|<|>)"
    r"|(?P<ident>(?:\w+\.)?(?:`[^`]+`|\w[\w.]*)))",
    re.IGNORECASE,
)
# One element of a LIKE pattern: an escaped % _ or \ (a literal), a wildcard, or a character.
_LIKE_ELEMENT = re.compile(r"\\([%_\\])|(%)|(_)|(.)", re.DOTALL)


@dataclass(frozen=True)
class Condition:
    field: str  # "name", "creation_time", "last_update_time" or "tags.<key>"
    op: str
    value: str | int


def _tokenize(text: str) -> list[Token]:
    """Tokens of kinds string (read as run search reads them), num, op and ident."""
    tokens: list[Token] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos, end)
        if m is None:
            raise invalid(f"Invalid filter string {text!r}: unexpected text at position {pos}")
        kind = m.lastgroup or ""
        if kind == "quote":  # as run search reads it; unterminated: FilterError (400)
            token = read_string(text, m.start(kind))
        else:
            token = Token(kind, m.group(kind), m.start(kind), m.end())
        tokens.append(token)
        pos = token.end
    return tokens


def parse_filter(text: str) -> list[Condition]:
    """MLflow's experiment filter: `cond AND cond ...`; raises INVALID_PARAMETER_VALUE or FilterError."""
    tokens = _tokenize(text)
    conditions = []
    i = 0
    while i < len(tokens):
        if i and not (tokens[i].kind == "ident" and tokens[i].text.upper() == "AND"):
            raise invalid(f"Invalid filter string {text!r}: expected AND between comparisons")
        if i:
            i += 1
        part = tokens[i:i + 3]
        if len(part) < 3 or part[0].kind != "ident":
            raise invalid(f"Invalid filter string {text!r}: expected <field> <operator> <value>")
        conditions.append(_condition(part, text))
        i += 3
    return conditions


def _condition(part: Sequence[Token], text: str) -> Condition:
    ident, okind, op, vkind, raw = part[0].text, part[1].kind, part[1].text, part[2].kind, part[2].text
    entity, dot, key = ident.partition(".")
    if not dot or entity.startswith("`") or entity.lower() not in ("tag", "tags", "attribute", "attributes"):
        entity, key = "", ident
    key = key.strip("`")
    entity = entity.lower()
    op = op.upper()
    if okind == "ident" and op in ("LIKE", "ILIKE"):
        okind = "op"
    if okind != "op":
        raise invalid(f"Invalid filter string {text!r}: {op!r} is not a comparison operator")
    if entity in ("tag", "tags"):
        field, numeric = f"tags.{key}", False
    elif entity in ("", "attribute", "attributes") and key in STRING_FIELDS + NUMBER_FIELDS:
        field, numeric = key, key in NUMBER_FIELDS
    else:
        raise invalid(f"Invalid attribute key {ident!r} in experiment filter; expected one of "
                      f"{', '.join(STRING_FIELDS + NUMBER_FIELDS)} or tags.<key>")
    if numeric:
        if vkind != "num" or op in ("LIKE", "ILIKE"):
            raise invalid(f"Invalid filter string {text!r}: {field} compares numbers with = != < <= > >=")
        return Condition(field, op, int(raw))
    if vkind != "string" or op not in ("=", "!=", "LIKE", "ILIKE"):
        raise invalid(f"Invalid filter string {text!r}: {field} compares quoted strings with = != LIKE ILIKE")
    if op in ("LIKE", "ILIKE"):
        check_pattern(text, op, raw, part[2])  # the patterns run search refuses
    return Condition(field, op, raw)


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
    if cond.field.startswith("tags."):
        actual: Any = tags.get(cond.field[5:])
        if actual is None:
            return False
    else:
        actual = getattr(rec, cond.field)
    want = cond.value
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
        question = hashlib.sha256(orjson.dumps([filter_text, list(order_by), limit, view])).hexdigest()[:16]
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
        raise invalid("Invalid page token: it belongs to another search (filter, order_by, max_results)")
    return offset
