"""Experiment reads: get by id or name with tags, and MLflow's experiment search.

Experiments are few (thousands, not millions), so search reads the experiments of
the asked view in one query and filters, orders and pages them here. The filter
is MLflow's experiment grammar: comparisons joined by AND on `name`,
`creation_time`, `last_update_time` (attributes, optionally `attributes.`-prefixed)
and `tags.<key>`; strings compare with = != LIKE ILIKE, times with = != < <= > >=.
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
from typing import Any

import orjson

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

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(?P<num>-?\d+)|(?P<op>!=|<=|>=|=|<|>)"
    r"|(?P<ident>(?:\w+\.)?(?:`[^`]+`|\w[\w.]*)))",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Condition:
    field: str  # "name", "creation_time", "last_update_time" or "tags.<key>"
    op: str
    value: str | int


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def parse_filter(text: str) -> list[Condition]:
    """MLflow's experiment filter: `cond AND cond ...`; raises INVALID_PARAMETER_VALUE."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise invalid(f"Invalid filter string {text!r}: unexpected text at position {pos}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    conditions = []
    i = 0
    while i < len(tokens):
        if i and not (tokens[i][0] == "ident" and tokens[i][1].upper() == "AND"):
            raise invalid(f"Invalid filter string {text!r}: expected AND between comparisons")
        if i:
            i += 1
        part = tokens[i:i + 3]
        if len(part) < 3 or part[0][0] != "ident":
            raise invalid(f"Invalid filter string {text!r}: expected <field> <operator> <value>")
        conditions.append(_condition(part, text))
        i += 3
    return conditions


def _condition(part: Sequence[tuple[str, str]], text: str) -> Condition:
    (_, ident), (okind, op), (vkind, raw) = part
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
    if vkind != "str" or op not in ("=", "!=", "LIKE", "ILIKE"):
        raise invalid(f"Invalid filter string {text!r}: {field} compares quoted strings with = != LIKE ILIKE")
    return Condition(field, op, _unquote(raw))


def _like(pattern: str, flags: int = 0) -> re.Pattern[str]:
    body = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(body, flags | re.DOTALL)


def matches(cond: Condition, rec: ExperimentRecord, tags: dict[str, str]) -> bool:
    if cond.field.startswith("tags."):
        actual: Any = tags.get(cond.field[5:])
        if actual is None:
            return False
    else:
        actual = getattr(rec, cond.field)
    want = cond.value
    if cond.op == "LIKE":
        return _like(str(want)).fullmatch(actual) is not None
    if cond.op == "ILIKE":
        return _like(str(want), re.IGNORECASE).fullmatch(actual) is not None
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
