"""The tracking-store plugin: MLflow's own registry loads it for trackhouse:// URIs."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

import mlflow  # noqa: F401  # before the plugin: mlflow's import loads the plugin by entry point
import pytest

from trackhouse.query.http.mlflow_plugin import SCHEMES, TrackhouseStore, http_uri


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_entry_point_is_declared(scheme: str) -> None:
    names = {ep.name: ep.value for ep in entry_points(group="mlflow.tracking_store")}
    assert names[scheme] == "trackhouse.query.http.mlflow_plugin:TrackhouseStore"


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_mlflow_registry_resolves_every_scheme(scheme: str) -> None:
    # MLflow builds its registry from the installed entry points; a scheme the
    # plugin parses but pyproject.toml does not register fails here, not in http_uri.
    from mlflow.tracking._tracking_service.utils import _get_store

    store = _get_store(f"{scheme}://127.0.0.1:5001")
    assert isinstance(store, TrackhouseStore)
    assert store.get_host_creds().host == f"{SCHEMES[scheme]}://127.0.0.1:5001"


@pytest.mark.parametrize(("uri", "expected"), [
    ("trackhouse://localhost:5001", "http://localhost:5001"),
    ("trackhouse://example.org", "http://example.org:5000"),
    ("trackhouse+https://example.org:443/base/", "https://example.org:443/base"),
    ("trackhouse://[::1]:7000", "http://[::1]:7000"),
])
def test_uri_translation(uri: str, expected: str) -> None:
    assert http_uri(uri) == expected


def test_mlflow_registry_builds_a_trackhouse_store_that_works(mlflow_server: Any) -> None:
    from mlflow.store.tracking.abstract_store import AbstractStore
    from mlflow.tracking._tracking_service.utils import _get_store

    uri = f"trackhouse://127.0.0.1:{mlflow_server.server.http_port}"
    store = _get_store(uri)
    assert isinstance(store, TrackhouseStore) and isinstance(store, AbstractStore)
    run = store.create_run("0", "plugin-user", 1_000, [], "via-plugin")
    got = store.get_run(run.info.run_id)
    assert (got.info.run_name, got.info.user_id, got.info.start_time) == ("via-plugin", "plugin-user", 1_000)
    assert urlsplit(store.get_host_creds().host).port == mlflow_server.server.http_port


def test_mlflow_client_accepts_a_trackhouse_uri(mlflow_server: Any) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"trackhouse://127.0.0.1:{mlflow_server.server.http_port}")
    assert client.get_experiment("0").name == "Default"


def test_plugin_sends_mlflow_tracking_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "th_0123456789abcdef_x")
    assert TrackhouseStore("trackhouse://127.0.0.1:1").get_host_creds().token == "th_0123456789abcdef_x"
