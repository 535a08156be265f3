"""The store suite runs over both deployments: embedded chDB and ClickHouse's HTTP interface.

Every test that uses the `store` fixture (through `store_url`) runs twice, unless
it picks its deployment itself with `@pytest.mark.parametrize("store_url", [...], indirect=True)`.
"""

from __future__ import annotations

import pytest

DEPLOYMENTS = ("chdb", "http")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_url" not in metafunc.fixturenames:
        return
    if any(m.args and m.args[0] == "store_url" for m in metafunc.definition.iter_markers("parametrize")):
        return
    metafunc.parametrize("store_url", DEPLOYMENTS, indirect=True)
