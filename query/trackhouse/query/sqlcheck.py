"""What user SQL may contain: a whitelist walk over ClickHouse's own parse of the query.

Input is the JSON AST of `parseQueryToJSON` (ClickHouse's parser; the query text
is a bound parameter, so parsing never executes anything). `check()` raises
`SqlRefused` naming the first thing that is not allowed, or returns the names of
the tables the query reads. Pure: no I/O, no SQL text is looked at.

Admitted: one SELECT (WITH … SELECT, UNION / INTERSECT / EXCEPT, subqueries,
joins, ARRAY JOIN, window functions) whose every table is one of `TABLES`
(unqualified) or a CTE the query itself defines. Refused: every table function,
qualified names (other databases, system.*, information_schema.*), FORMAT,
INTO OUTFILE, SETTINGS anywhere, query parameters, other statements, and the
functions in `_DENIED` / `_DENIED_PREFIXES` (those that reach files, the network,
dictionaries, Join tables, server configuration, or sleep).

Bytes that are not UTF-8 (ClickHouse's `'\\xff'` escapes in literals and quoted
names) arrive as lone surrogates U+DC80..U+DCFF (Python's surrogateescape): one
character per byte, so names are still compared byte for byte — two names that
differ in such a byte stay different — and `escape_bytes` writes them back as
`\\xNN` in messages. Text that is not JSON is refused, never guessed at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from trackhouse.query.errors import InvalidArgument

# The stable names users query (docs/sql.md); each is a CTE over trackhouse's tables.
TABLES = ("experiments", "runs", "params", "tags", "metrics", "latest_metrics", "experiment_tags")

_SYSTEM_DATABASES = frozenset({"system", "information_schema"})
# ClickHouse function names are matched case-insensitively here (some are registered so).
_DENIED = frozenset({
    "file", "url", "s3", "hdfs", "remote", "remotesecure", "cluster", "clusterallreplicas", "mysql",
    "postgresql", "jdbc", "odbc", "mongodb", "redis", "sqlite", "executable", "input", "generaterandom",
    "joinget", "joingetornull", "hascolumnintable", "catboostevaluate", "getserversetting",
    "getmergetreesetting", "getsetting", "getsettingordefault", "getmacro", "getclienthttpheader",
    "generateserialid", "trap", "logtrace", "sleep", "sleepeachrow", "addresstoline",
    "addresstolinewithinlines", "addresstosymbol", "demangle", "currentprofiles", "enabledprofiles",
    "defaultprofiles", "currentroles", "enabledroles", "defaultroles", "getoskernelversion",
    "zookeepersessionuptime", "filesystemavailable", "filesystemcapacity", "filesystemunreserved",
    "urlcluster", "gcs", "merge", "loop", "view", "viewifpermitted", "numbers", "zeros", "primes",
})
_DENIED_PREFIXES = ("dict", "__", "s3", "hdfs", "azure", "iceberg", "deltalake", "hudi", "remote", "mysql",
                    "postgres", "mongo", "sleep")
# Functions whose right-hand argument may name a table (`x IN runs`).
_IN_FUNCTIONS = frozenset({
    "in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin", "globalnotnullin",
})
# Lone surrogates: surrogateescape'd bytes (U+DC80..U+DCFF) and any other, never valid text.
SURROGATES = re.compile("[\ud800-\udfff]")
# Friendly names for statement types that are not SELECT.
_STATEMENTS = {
    "InsertQuery": "INSERT", "AlterQuery": "ALTER", "DropQuery": "DROP / TRUNCATE", "CreateQuery": "CREATE / ATTACH",
    "SystemQuery": "SYSTEM", "KillQueryQuery": "KILL", "SetQuery": "SET", "OptimizeQuery": "OPTIMIZE",
    "UseQuery": "USE", "ExplainQuery": "EXPLAIN", "RenameQuery": "RENAME", "UndropQuery": "UNDROP",
}


class SqlRefused(InvalidArgument):
    """The query is not one the SQL endpoint runs; the message says what is not allowed."""


def check(ast_json: str) -> frozenset[str]:
    """Refuse what is not allowed in the parsed query; return the trackhouse tables it reads."""
    try:
        return _check(ast_json)
    except SqlRefused as exc:
        message = escape_bytes(str(exc))
        if message == str(exc):
            raise
        raise SqlRefused(message) from None  # printable: HTTP and gRPC carry UTF-8 only


def escape_bytes(text: str) -> str:
    """`text` with each surrogateescape'd byte written as ClickHouse's escape `\\xNN`
    (any other lone surrogate as `\\uNNNN`): valid UTF-8, and inside a quoted literal
    or name the same bytes to ClickHouse's parser."""
    return SURROGATES.sub(lambda m: _escape(ord(m[0])), text)


def _escape(code: int) -> str:
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _check(ast_json: str) -> frozenset[str]:
    try:
        root = json.loads(ast_json)
    except RecursionError:
        raise SqlRefused("query is nested too deeply") from None
    except ValueError:  # not what parseQueryToJSON writes: nothing to check, so nothing runs
        raise SqlRefused("cannot analyse the query: ClickHouse's parse of it is not JSON") from None
    if not isinstance(root, dict):
        raise SqlRefused("query did not parse to a statement")
    kind = str(root.get("type", ""))
    if kind != "SelectWithUnionQuery":
        name = _STATEMENTS.get(kind) or kind.removesuffix("Query").upper() or "this statement"
        raise SqlRefused(f"only SELECT queries are allowed (read-only SQL), not {name}")
    nodes = list(_walk(root))
    ctes = {str(n["name"]) for n in nodes if n.get("type") == "WithElement" and "name" in n}
    read: set[str] = set()
    for node in nodes:
        _check_clauses(node)
        kind = str(node.get("type", ""))
        if kind == "TableExpression" and "table_function" in node:
            name = str(node["table_function"].get("name", "?"))
            raise SqlRefused(f"table function `{name}` is not allowed: query trackhouse's tables ({_names()})")
        if kind == "TableIdentifier":
            read |= _table(node, ctes)
        elif kind == "Identifier":
            _identifier(node)
        elif kind == "Function":
            read |= _function(node, ctes)
        elif kind == "QueryParameter":
            raise SqlRefused("query parameters ({name:Type}) are not supported")
    return frozenset(read)


def _walk(root: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every object node of the AST, iteratively (the parser bounds depth, Python's stack need not)."""
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_clauses(node: dict[str, Any]) -> None:
    if node.get("type") == "SetQuery" or "settings" in node or "settings_ast" in node:
        raise SqlRefused("SETTINGS clauses are not allowed: limits are set by the server")
    if "out_file" in node or node.get("is_into_outfile_with_stdout") or "compression" in node:
        raise SqlRefused("INTO OUTFILE is not allowed")
    if "format_ast" in node or "format" in node:
        raise SqlRefused("FORMAT clauses are not allowed: choose the format of the answer in the request")


def _parts(node: dict[str, Any]) -> list[str]:
    parts = node.get("name_parts")
    return [str(p) for p in parts] if isinstance(parts, list) and parts else [str(node.get("name", ""))]


def _table(node: dict[str, Any], ctes: set[str]) -> set[str]:
    parts = _parts(node)
    name = ".".join(parts)
    if len(parts) > 1:
        if parts[0].lower() in _SYSTEM_DATABASES:
            raise SqlRefused(f"system tables are not allowed (`{name}`); tables: {_names()}")
        raise SqlRefused(f"table `{name}` is not allowed: other databases are not visible; "
                         f"use the unqualified names {_names()}")
    if parts[0] in TABLES:
        return {parts[0]}
    if parts[0] in ctes:
        return set()
    raise SqlRefused(f"table `{name}` is not allowed; tables: {_names()}")


def _identifier(node: dict[str, Any]) -> None:
    parts = _parts(node)
    if len(parts) >= 3:
        raise SqlRefused(f"identifier `{'.'.join(parts)}`: database-qualified names are not allowed")
    if len(parts) == 2 and parts[0].lower() in _SYSTEM_DATABASES:
        raise SqlRefused(f"system tables are not allowed (`{'.'.join(parts)}`)")


def _function(node: dict[str, Any], ctes: set[str]) -> set[str]:
    name = str(node.get("name", ""))
    low = name.lower()
    if low in _DENIED or low.startswith(_DENIED_PREFIXES):
        what = "dictionaries are" if low.startswith("dict") else f"function `{name}` is"
        raise SqlRefused(f"{what} not allowed: the SQL endpoint reads trackhouse's tables only")
    if low in _IN_FUNCTIONS:
        args = node.get("arguments", {}).get("children", [])
        if len(args) == 2 and isinstance(args[1], dict) and args[1].get("type") == "Identifier":
            return _table(args[1], ctes)  # `x IN t`: the identifier names a table
    return set()


def _names() -> str:
    return ", ".join(TABLES)
