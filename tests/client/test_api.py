"""Guards: the public API is pinned; the client imports only what it may."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import trackhouse.client as th

CLIENT = Path(__file__).resolve().parents[2] / "client" / "trackhouse"


def test_public_api_is_pinned() -> None:
    assert th.__all__ == [
        "AckStream", "AlreadyExists", "Client", "DeadlineExceeded", "FailedPrecondition",
        "GrpcTransport", "InvalidArgument", "MemoryTransport", "NotFound", "ReplayReport", "Run", "RunView",
        "ServerError", "ServerUnavailable", "Settings", "SpoolError", "TrackhouseError", "Transport",
        "UsageError", "connect", "sync",
    ]  # fmt: skip
    for name in th.__all__:
        assert getattr(th, name).__module__.startswith("trackhouse.client.")
    assert th.__all__ == sorted(th.__all__, key=str.lower) or th.__all__ == sorted(th.__all__)


def test_error_tree() -> None:
    for cls in (th.NotFound, th.InvalidArgument, th.AlreadyExists, th.FailedPrecondition):
        assert issubclass(cls, th.ServerError)
    assert issubclass(th.DeadlineExceeded, th.ServerUnavailable)
    for base in (th.ServerError, th.ServerUnavailable, th.UsageError, th.SpoolError):
        assert issubclass(base, th.TrackhouseError)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top))
    return found


def test_namespace_layout_and_import_layering() -> None:
    assert not (CLIENT / "__init__.py").exists()  # PEP 420 namespace
    assert (CLIENT / "client" / "py.typed").exists()
    allowed = {"grpc", "google", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((CLIENT / "client").glob("*.py")):
        for module, top_level in _imports(path):
            root = module.split(".")[0]
            if module.startswith("trackhouse."):
                assert module.startswith(("trackhouse.client", "trackhouse.proto")), (path.name, module)
            elif root in ("pyarrow", "pynvml"):  # optional: reads / GPU metrics
                assert not top_level, f"{path.name}: {root} must be imported lazily"
            else:
                assert root in allowed, (path.name, module)
            if root == "grpc":
                assert path.name == "transport.py", f"{path.name} imports grpc"
        assert len(path.read_text().splitlines()) < 400, path.name
