r"""Run-search filters: MLflow's filter grammar parsed to an AST and compiled to bound SQL.

Owns the filter language of run search: a hand-written tokenizer, a
recursive-descent parser producing frozen AST nodes, and the compiler from
those nodes to a ClickHouse boolean expression over `{db}.runs FINAL`.
Ordering clauses (`order_by`) live in `trackhouse.query.order`, which reuses
the tokenizer and identifier rules here.

Invariants:
- User text never reaches SQL. Keys and values are bound as server-side
  parameters (`{p0:String}`) recorded in a `Binder`; the only names pasted
  into SQL are our own columns and the whitelisted database name.
- Every error is a `FilterError` (a ValueError) carrying the 0-based
  `position` of the offending character and saying what was expected there.
- Entities are canonical in the AST: METRICS, PARAMS, TAGS or ATTRIBUTES.
- Pure: no I/O, no store access; parsing the same text always gives equal ASTs.

Grammar (EBNF; keywords are case-insensitive, entity types are not):

    filter     = [ or_expr ] ;                       (* empty -> no condition *)
    or_expr    = and_expr { "OR" and_expr } ;        (* OR: extension *)
    and_expr   = primary { "AND" primary } ;
    primary    = "(" or_expr ")" | comparison ;      (* parentheses: extension *)
    comparison = identifier operator value | identifier "IS" [ "NOT" ] "NULL" ;
    identifier = entity "." key | key ;              (* a bare key is an attribute *)
    entity     = name | quoted ;                     (* metrics, params, tags, attributes, aliases *)
    key        = name { "." name } | quoted ;
    operator   = "=" | "!=" | "<" | "<=" | ">" | ">=" | "LIKE" | "ILIKE" | "IN" | "NOT" "IN" ;
    value      = string | number | "(" string { "," string } ")" ;
    quoted     = '"' chars '"' | "`" chars "`" ;
    string     = "'" chars "'" | '"' chars '"' ;     (* kept as written, as MLflow does; see below *)
    number     = [ "+" | "-" ] ( digits [ "." [ digits ] ] | "." digits ) [ exponent ] ;
    exponent   = ( "e" | "E" ) [ "+" | "-" ] digits ;
    name       = ( letter | "_" ) { letter | digit | "_" } ;   (* Unicode letters and digits *)

Semantics (MLflow's, plus the marked extensions): metrics and start_time/end_time
compare numbers; params, tags and the other attributes compare strings with
= != LIKE ILIKE IN NOT IN (IN on every string field: extension). Params also
compare numerically with < <= > >= (and = != given a number literal) where
their value parses as a number (extension). On params, tags and metrics, `!=`
and NOT IN match only runs that have the key. `IS NULL` matches the runs
without the key and `IS NOT NULL` those with it (any value, "" too); as in MLflow
they apply to params and tags only (a deleted tag is missing). AND binds
tighter than OR.

Quoted text is MLflow's (which tokenizes with sqlparse): a backslash is an ordinary
character, kept in the value, so `params.path = 'C:\new'` compares with C:\new and
`tags.x LIKE 'a\_b'` reaches LIKE as a\_b. Inside '...' and "...", a backslash before
the quote does not close the string (sqlparse's rule; the pair is kept). A doubled
quote is one quote (extension: MLflow keeps both). LIKE and ILIKE patterns take
SQL's escapes as ClickHouse reads them, as MLflow's MySQL and PostgreSQL stores do:
\% \_ \\ match % _ \; a backslash before any other character matches itself
(ClickHouse's rule); a pattern ending in a lone backslash is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

from trackhouse.proto.rules import INT64_MAX, INT64_MIN
from trackhouse.store.schema import check_identifier, latest_value

METRICS = "metrics"
PARAMS = "params"
TAGS = "tags"
ATTRIBUTES = "attributes"

ENTITY_ALIASES: dict[str, str] = {
    "metric": METRICS, "metrics": METRICS,
    "param": PARAMS, "params": PARAMS, "parameter": PARAMS, "parameters": PARAMS,
    "tag": TAGS, "tags": TAGS,
    "attribute": ATTRIBUTES, "attributes": ATTRIBUTES, "attr": ATTRIBUTES, "run": ATTRIBUTES,
}
NUMERIC_ATTRIBUTES = ("start_time", "end_time")
STRING_ATTRIBUTES = ("run_id", "run_name", "status", "user_id", "artifact_uri", "lifecycle_stage")
ATTRIBUTE_ALIASES: dict[str, str] = {
    "created": "start_time", "Created": "start_time",
    "run name": "run_name", "Run name": "run_name", "Run Name": "run_name",
}
NUMERIC_OPS = ("=", "!=", "<", "<=", ">", ">=")
STRING_OPS = ("=", "!=", "LIKE", "ILIKE", "IN", "NOT IN")
PARAM_OPS = (*STRING_OPS, "<", "<=", ">", ">=")
# Whether a param or tag is there at all (MLflow: params and tags only); a Comparison's value is None.
NULL_OPS = ("IS NULL", "IS NOT NULL")
ALL_OPS = ("=", "!=", "<", "<=", ">", ">=", "LIKE", "ILIKE", "IN", "NOT IN", *NULL_OPS)
DEFAULT_MAX_LENGTH = 10_000
MAX_DEPTH = 50  # nesting of parentheses; keeps recursion far from Python's limit



class FilterError(ValueError):
    """A filter or order_by clause that cannot be parsed; `position` is a 0-based offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


# -- AST --------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """`entity` is one of METRICS, PARAMS, TAGS, ATTRIBUTES; `op` one of ALL_OPS (upper case).

    `value` is a str, an int or float (numeric comparisons), a tuple of str (IN, NOT IN), or
    None (IS NULL, IS NOT NULL).
    """

    entity: str
    key: str
    op: str
    value: str | float | tuple[str, ...] | None


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


Node: TypeAlias = Comparison | And | Or


# -- tokens ---------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d]\w*")  # a letter or "_", then letters, digits, "_" (Unicode)
_NUMBERISH = re.compile(r"[-+]?\.?[0-9](?:[0-9A-Za-z_.]|(?<=[eE])[-+])*")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_OP = re.compile(r"[=!<>]+")
_QUOTES = "'\"`"
# sqlparse's patterns for quoted text, which MLflow's filters go through: a doubled
# quote, or (in '...' and "...") a backslash before the quote, does not close it.
_QUOTED = {
    "'": re.compile(r"'(?:''|\\'|[^'])*'"),
    '"': re.compile(r'"(?:""|\\"|[^"])*"'),
    "`": re.compile(r"`(?:``|[^`])*`"),
}


@dataclass(frozen=True)
class Token:
    """kind: word, number, string, op, punct, bad or end; `quote` is set for strings."""

    kind: str
    text: str  # strings: the content, a doubled quote made one; others: the source text
    pos: int
    end: int
    quote: str = ""

    def is_keyword(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words

    def is_punct(self, char: str) -> bool:
        return self.kind == "punct" and self.text == char


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens ending with an `end` token; only unterminated strings raise."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        after_name = bool(tokens) and tokens[-1].kind in ("word", "string")
        if ch in _QUOTES:
            tokens.append(read_string(text, i))
        elif ch == "." and after_name:  # `metrics.1a` is a key error, not the number `.1a`
            tokens.append(Token("punct", ch, i, i + 1))
        elif match := _NUMBERISH.match(text, i):
            tokens.append(Token("number", match.group(), i, match.end()))
        elif match := _WORD.match(text, i) or _OP.match(text, i):
            kind = "word" if ch.isalpha() or ch == "_" else "op"
            tokens.append(Token(kind, match.group(), i, match.end()))
        elif ch in "().,":
            tokens.append(Token("punct", ch, i, i + 1))
        else:
            tokens.append(Token("bad", ch, i, i + 1))
        i = tokens[-1].end
    tokens.append(Token("end", "", len(text), len(text)))
    return tokens


def read_string(text: str, start: int) -> Token:
    """The quoted text at `start`, as MLflow reads it: backslashes are kept as written.

    Experiment search (`trackhouse.query.http.experiments`) reads its values with this too.
    """
    quote = text[start]
    match = _QUOTED[quote].match(text, start)
    if match is None:
        raise FilterError(f"at position {start}: unterminated string: expected a closing {quote}", start)
    return Token("string", match.group()[1:-1].replace(quote * 2, quote), start, match.end(), quote)


# -- parser ---------------------------------------------------------------------------


class Parser:
    """Recursive descent over the tokens of one filter or order_by clause."""

    def __init__(self, text: str, prefix: str = "") -> None:
        self.text = text
        self.prefix = prefix  # prepended to messages, e.g. "order_by[2] "
        try:
            self.tokens = tokenize(text)
        except FilterError as exc:
            raise FilterError(f"{prefix}{exc}", exc.position) from None
        self.index = 0

    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: Token, expected: str) -> NoReturn:
        self.error(token.pos, f"expected {expected}, found {self.describe(token)}")

    def error(self, pos: int, message: str) -> NoReturn:
        raise FilterError(f"{self.prefix}at position {pos}: {message}", pos)

    def describe(self, token: Token) -> str:
        if token.kind == "end":
            return "end of input"
        source = self.text[token.pos : token.end]
        return repr(source if len(source) <= 30 else source[:27] + "...")

    # identifiers ---------------------------------------------------------------

    def identifier(self, allowed_attributes: tuple[str, ...]) -> tuple[str, str]:
        """Parse `entity.key` or a bare attribute key; return (canonical entity, key)."""
        first = self.advance()
        if not self.is_name(first):
            self.fail(first, "<type>.<key> (e.g. metrics.loss, params.lr, tags.`mlflow.runName`)")
        if not self.peek().is_punct("."):
            return ATTRIBUTES, self.attribute(first, allowed_attributes, "<type>.<key> or ")
        entity = ENTITY_ALIASES.get(first.text)
        if entity is None:
            aliases = ", ".join(a for a, e in ENTITY_ALIASES.items() if a != e)
            self.error(first.pos, f"unknown entity type {self.describe(first)}: expected one of "
                       f"metrics, params, tags, attributes (or {aliases})")
        self.advance()
        key_token = self.peek()
        key = self.key()
        if entity == ATTRIBUTES:
            return entity, self.attribute(key_token, allowed_attributes, key=key)
        return entity, key

    def key(self) -> str:
        token = self.advance()
        if token.kind == "string" and token.quote != "'":
            if not token.text:
                self.error(token.pos, "expected a non-empty key")
            return token.text
        if token.kind != "word":
            self.fail(token, 'a key: a name, or any text quoted with "..." or `...`')
        parts = [token.text]
        while self.peek().is_punct(".") and self.tokens[self.index + 1].kind == "word":
            self.advance()
            parts.append(self.advance().text)
        return ".".join(parts)

    def attribute(self, token: Token, allowed: tuple[str, ...], alternative: str = "", key: str = "") -> str:
        name = key or token.text
        name = ATTRIBUTE_ALIASES.get(name, name)
        if name not in allowed:
            self.error(token.pos, f"unknown attribute {name!r}: expected {alternative}"
                       f"one of {', '.join(allowed)}")
        return name

    @staticmethod
    def is_name(token: Token) -> bool:
        return token.kind == "word" or (token.kind == "string" and token.quote != "'")


class _FilterParser(Parser):
    def filter(self) -> Node:
        node = self.or_expr(0)
        token = self.peek()
        if token.is_punct(")"):
            self.error(token.pos, "unbalanced parentheses: expected AND, OR or the end of the filter, "
                       "found ')' without a matching '('")
        if token.kind != "end":
            self.fail(token, "AND, OR or the end of the filter")
        return node

    def or_expr(self, depth: int) -> Node:
        items = [self.and_expr(depth)]
        while self.peek().is_keyword("OR"):
            self.advance()
            items.append(self.and_expr(depth))
        return _join(Or, items)

    def and_expr(self, depth: int) -> Node:
        items = [self.primary(depth)]
        while self.peek().is_keyword("AND"):
            self.advance()
            items.append(self.primary(depth))
        return _join(And, items)

    def primary(self, depth: int) -> Node:
        if not self.peek().is_punct("("):
            return self.comparison()
        opening = self.advance()
        if depth >= MAX_DEPTH:
            self.error(opening.pos, f"parentheses nested deeper than {MAX_DEPTH} levels")
        node = self.or_expr(depth + 1)
        token = self.peek()
        if not token.is_punct(")"):
            closing = f"AND, OR or ')' closing the '(' at position {opening.pos}"
            if token.kind == "end":
                self.error(token.pos, f"unbalanced parentheses: expected {closing}, found end of input")
            self.fail(token, closing)
        self.advance()
        return node

    def comparison(self) -> Comparison:
        entity, key = self.identifier(STRING_ATTRIBUTES + NUMERIC_ATTRIBUTES)
        op_token = self.peek()
        op = self.operator()
        allowed = _allowed_ops(entity, key)
        if op not in allowed:
            only = "IS NULL and IS NOT NULL apply to tags and params only; " if op in NULL_OPS else ""
            self.error(op_token.pos, f"{op} is not allowed for {_describe_field(entity, key)}: "
                       f"{only}expected one of {', '.join(allowed)}")
        if op in NULL_OPS:
            return Comparison(entity, key, op, None)
        value_token = self.peek()
        value = self.value_list() if op in ("IN", "NOT IN") else self.scalar()
        return Comparison(entity, key, op, self.check_value(entity, key, op, value, value_token))

    def operator(self) -> str:
        token = self.advance()
        if token.kind == "op" and token.text in NUMERIC_OPS:
            return token.text
        if token.is_keyword("LIKE", "ILIKE", "IN"):
            return token.text.upper()
        if token.is_keyword("NOT") and self.peek().is_keyword("IN"):
            self.advance()
            return "NOT IN"
        if token.is_keyword("IS"):
            word = self.advance()
            if word.is_keyword("NULL"):
                return "IS NULL"
            if not word.is_keyword("NOT"):
                self.fail(word, "NULL or NOT NULL after IS")
            word = self.advance()
            if not word.is_keyword("NULL"):
                self.fail(word, "NULL after IS NOT")
            return "IS NOT NULL"
        self.fail(token, f"a comparison operator ({', '.join(ALL_OPS)})")

    def scalar(self) -> str | float:
        token = self.advance()
        if token.kind == "string" and token.quote != "`":
            return token.text
        if token.kind == "number":
            if not _NUMBER.fullmatch(token.text):
                self.error(token.pos, f"bad number {token.text!r}: expected a number like 42, -1.5 or 1e-3")
            if any(c in token.text for c in ".eE"):
                return float(token.text)
            # Integers beyond Int64 compare as Float64 anyway; int() of thousands of digits
            # raises (Python's int max_str_digits) and float(int) overflows: go through float.
            digits = token.text.lstrip("+-").lstrip("0")
            number = int(token.text) if len(digits) <= 19 else float(token.text)
            return number if isinstance(number, float) or INT64_MIN <= number <= INT64_MAX else float(number)
        self.fail(token, "a value: a quoted string or a number")

    def value_list(self) -> tuple[str, ...]:
        opening = self.advance()
        if not opening.is_punct("("):
            self.fail(opening, "'(' starting a list of quoted strings")
        if self.peek().is_punct(")"):
            self.error(self.peek().pos, "empty IN list: expected at least one quoted string")
        values: list[str] = []
        while True:
            token = self.advance()
            if token.kind != "string" or token.quote == "`":
                self.fail(token, "a quoted string in the IN list")
            values.append(token.text)
            separator = self.advance()
            if separator.is_punct(")"):
                return tuple(values)
            if not separator.is_punct(","):
                self.fail(separator, f"',' or ')' closing the list opened at position {opening.pos}")

    def check_value(self, entity: str, key: str, op: str, value: Any, token: Token) -> Any:
        numeric = _allowed_ops(entity, key) == NUMERIC_OPS
        if numeric and not isinstance(value, int | float):
            self.fail(token, f"a number for {_describe_field(entity, key)}")
        if entity == PARAMS and op in ("<", "<=", ">", ">="):
            return self.param_number(value, token)
        if not numeric and isinstance(value, int | float) and not (entity == PARAMS and op in ("=", "!=")):
            self.fail(token, f"a quoted string for {op} on {_describe_field(entity, key)}")
        if op in ("LIKE", "ILIKE") and isinstance(value, str):
            self.check_pattern(op, value, token)
        return value

    def check_pattern(self, op: str, pattern: str, token: Token) -> None:
        """The module's `check_pattern` on this parser's text."""
        check_pattern(self.text, op, pattern, token, self.prefix)

    def param_number(self, value: str | float, token: Token) -> float:
        """Order comparisons on params are numeric; a quoted number is accepted too."""
        if isinstance(value, int | float):
            return value
        if _NUMBER.fullmatch(value.strip()):
            return float(value)
        self.fail(token, "a number (params compare numerically with <, <=, >, >=)")


def check_pattern(text: str, op: str, pattern: str, token: Token, prefix: str = "") -> None:
    """Refuse what the engine cannot run: a LIKE pattern ending in a backslash that escapes nothing.

    `pattern` is the value of the string `token` of `text`. Experiment search, which runs
    LIKE in Python, refuses the same patterns with this.
    """
    if (len(pattern) - len(pattern.rstrip("\\"))) % 2:
        # The value ends with the text's last character before the closing quote. The
        # source is shown as written: repr() would double every backslash in it.
        source = text[token.pos : token.end]
        source = source if len(source) <= 30 else "..." + source[-27:]
        pos = token.end - 2
        raise FilterError(f"{prefix}at position {pos}: invalid {op} pattern {source}: it ends in a lone "
                          f"backslash, which escapes nothing; write \\\\ to match a backslash "
                          f"(\\% and \\_ match % and _)", pos)


def _join(kind: type[And] | type[Or], items: list[Node]) -> Node:
    """One item stays itself; nested nodes of the same kind are flattened."""
    if len(items) == 1:
        return items[0]
    flat: list[Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, kind) else (item,))
    return kind(tuple(flat))


def _allowed_ops(entity: str, key: str) -> tuple[str, ...]:
    if entity == METRICS or (entity == ATTRIBUTES and key in NUMERIC_ATTRIBUTES):
        return NUMERIC_OPS
    if entity == PARAMS:
        return (*PARAM_OPS, *NULL_OPS)
    return (*STRING_OPS, *NULL_OPS) if entity == TAGS else STRING_OPS


def _describe_field(entity: str, key: str) -> str:
    return f"attribute {key!r}" if entity == ATTRIBUTES else entity


def check_length(text: str, max_length: int, what: str, prefix: str = "") -> None:
    if len(text) > max_length:
        raise FilterError(
            f"{prefix}at position {max_length}: {what} is {len(text)} characters long; "
            f"expected at most {max_length}",
            max_length,
        )


def parse_filter(text: str | None, max_length: int = DEFAULT_MAX_LENGTH) -> Node | None:
    """Parse a run-search filter; None (no condition) for an empty or blank filter."""
    if text is None:
        return None
    check_length(text, max_length, "the filter")
    if not text.strip():
        return None
    return _FilterParser(text).filter()


# -- compilation ---------------------------------------------------------------------------


@dataclass
class Binder:
    """Collects bound values; `bind` returns a clickhouse-connect placeholder `{pN:Type}`."""

    params: dict[str, Any] = field(default_factory=dict)

    def bind(self, value: Any, ch_type: str) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"{{{name}:{ch_type}}}"


def compile_filter(node: Node, db: str, binder: Binder) -> str:
    """A ClickHouse boolean expression over `{db}.runs FINAL` (unqualified run columns)."""
    check_identifier(db)
    if isinstance(node, And | Or):
        joiner = " AND " if isinstance(node, And) else " OR "
        return "(" + joiner.join(compile_filter(item, db, binder) for item in node.items) + ")"
    return _compile_comparison(node, db, binder)


def _compile_comparison(c: Comparison, db: str, binder: Binder) -> str:
    if c.entity == ATTRIBUTES:
        return condition(c.key, c, binder)
    key = binder.bind(c.key, "String")
    if c.op in NULL_OPS:  # the runs with the key, or (IS NULL) all the others
        having = (f"SELECT run_id FROM {db}.params WHERE key = {key}" if c.entity == PARAMS
                  else f"SELECT run_id FROM {db}.tags FINAL WHERE deleted = 0 AND key = {key}")
        return f"run_id {'NOT IN' if c.op == 'IS NULL' else 'IN'} ({having})"
    if c.entity == METRICS:
        cond = condition(latest_value("max(last_key)"), c, binder, "Float64")
        return (f"run_id IN (SELECT run_id FROM {db}.latest_metrics WHERE key = {key} "
                f"GROUP BY run_id HAVING {cond})")
    if c.entity == PARAMS:
        column = "value" if isinstance(c.value, str | tuple) else "toFloat64OrNull(value)"
        cond = condition(column, c, binder, "Float64")
        return f"run_id IN (SELECT run_id FROM {db}.params WHERE key = {key} AND {cond})"
    cond = condition("value", c, binder)
    return f"run_id IN (SELECT run_id FROM {db}.tags FINAL WHERE deleted = 0 AND key = {key} AND {cond})"


def condition(column: str, c: Comparison, binder: Binder, number_type: str = "") -> str:
    """`column <op> <bound value>`; `column` is always our own SQL, never user text. IS NULL and
    IS NOT NULL test `column` itself: NULL where a run lacks the key."""
    if c.op in NULL_OPS or c.value is None:
        return f"{column} {'IS NOT NULL' if c.op == 'IS NOT NULL' else 'IS NULL'}"
    if isinstance(c.value, tuple):
        return f"{column} {c.op} {binder.bind(list(c.value), 'Array(String)')}"
    if isinstance(c.value, str):
        placeholder = binder.bind(c.value, "String")
        if c.op in ("LIKE", "ILIKE"):
            return f"{c.op.lower()}({column}, {placeholder})"
        return f"{column} {c.op} {placeholder}"
    if not number_type:
        in_int64 = isinstance(c.value, int) and INT64_MIN <= c.value <= INT64_MAX
        number_type = "Int64" if in_int64 else "Float64"
    value = float(c.value) if number_type == "Float64" else c.value
    return f"{column} {c.op} {binder.bind(value, number_type)}"
