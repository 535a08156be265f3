"""Guard tests for the layout of STYLE.md: namespace roots, import direction, seams.

- every source root holds a slice of the `trackhouse` namespace (no trackhouse/__init__.py);
- the five lists of roots in pyproject.toml agree;
- imports follow proto ← store ← ingest, query ← cli; client imports only proto;
- only the seam modules import grpc or clickhouse_connect; the client imports pyarrow lazily.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOTS = ["proto", "store", "ingest", "query", "client", "cli"]

ALLOWED = {
    "proto": {"proto"},
    "store": {"proto", "store"},
    "ingest": {"proto", "store", "ingest"},
    "query": {"proto", "store", "query"},
    "client": {"proto", "client"},
    "cli": {"proto", "store", "ingest", "query", "client", "cli"},
}
# The only modules that may import these libraries (the seams).
SEAMS = {
    "grpc": {"ingest/service.py", "query/service.py", "client/transport.py", "cli/server.py", "cli/guard.py"},
    "clickhouse_connect": {"store/dsn.py", "store/errors.py"},
}


def modules(root: str) -> list[Path]:
    return [p for p in (ROOT / root / "trackhouse").rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_no_namespace_init_files() -> None:
    for root in ROOTS:
        assert (ROOT / root / "trackhouse").is_dir(), f"{root}/trackhouse is missing"
        init = ROOT / root / "trackhouse" / "__init__.py"
        assert not init.exists(), f"{root}/trackhouse/__init__.py breaks PEP 420"


def test_pyproject_root_lists_agree() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = cfg["tool"]
    assert tool["hatch"]["build"]["targets"]["wheel"]["packages"] == [f"{r}/trackhouse" for r in ROOTS]
    assert tool["hatch"]["build"]["dev-mode-dirs"] == ROOTS
    assert tool["pytest"]["ini_options"]["pythonpath"] == ROOTS
    assert tool["mypy"]["mypy_path"] == ":".join(ROOTS)
    assert tool["coverage"]["run"]["source"] == ROOTS


@pytest.mark.parametrize("root", ROOTS)
def test_import_direction(root: str) -> None:
    for path in modules(root):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "trackhouse":
                assert len(parts) > 1 and parts[1] in ALLOWED[root], (
                    f"{path.relative_to(ROOT)} imports {name}: {root} may import only {sorted(ALLOWED[root])}"
                )


@pytest.mark.parametrize("library", sorted(SEAMS))
def test_only_seams_import(library: str) -> None:
    for root in ROOTS:
        for path in modules(root):
            rel = f"{root}/{path.name}" if path.parent.name == root else str(path.relative_to(ROOT))
            if any(n.split(".")[0] == library for n in imports(path)):
                allowed = sorted(SEAMS[library])
                assert rel in SEAMS[library], f"{path.relative_to(ROOT)} imports {library}; only {allowed} may"


def test_client_imports_pyarrow_lazily() -> None:
    for path in modules("client"):
        top = [n for n in imports(path, top_level_only=True) if n.split(".")[0] in ("pyarrow", "pandas")]
        assert not top, f"{path.relative_to(ROOT)} imports {top} at module level; the light client must not"
