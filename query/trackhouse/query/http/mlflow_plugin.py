"""The MLflow tracking-store plugin: `trackhouse://HOST:PORT` as an MLflow backend store.

Registered under the entry point group `mlflow.tracking_store` with every scheme
in SCHEMES — `trackhouse`, `trackhouse+http`, `trackhouse+https` (pyproject.toml;
installed by the `mlflow` extra), so

    mlflow server --backend-store-uri trackhouse://HOST:PORT

serves MLflow's own UI over a trackhouse server, and `MLFLOW_TRACKING_URI=
trackhouse://HOST:PORT` works in any MLflow process. `trackhouse+https://` selects
TLS. The port is trackhouse's HTTP port (default 5000). The plugin is a tracking
store only: MLflow's model registry is not served.

The store is MLflow's RestStore (an AbstractStore) pointed at trackhouse's MLflow
REST API: every tracking call becomes the REST request trackhouse serves, so the
plugin needs nothing of trackhouse's server code — only mlflow itself. MLflow
imports this module; trackhouse's server never does.
"""

from __future__ import annotations

from functools import partial
from urllib.parse import urlsplit

from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.rest_utils import MlflowHostCreds

SCHEMES = {"trackhouse": "http", "trackhouse+http": "http", "trackhouse+https": "https"}
DEFAULT_PORT = 5000


def http_uri(store_uri: str) -> str:
    """`trackhouse://host:port/prefix` → `http://host:port/prefix`."""
    parts = urlsplit(store_uri)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"not a trackhouse store URI: {store_uri!r}; expected trackhouse://HOST[:PORT]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{SCHEMES[parts.scheme]}://{host}:{parts.port or DEFAULT_PORT}{parts.path.rstrip('/')}"


def _host_creds(uri: str) -> MlflowHostCreds:
    # MLflow's own variables, read per request as MLflow does: the token goes out as
    # `Authorization: Bearer …`, the cert path verifies a private CA (docs/security.md).
    from mlflow.environment_variables import MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_TOKEN

    token = MLFLOW_TRACKING_TOKEN.get()  # type: ignore[no-untyped-call]
    cert_path = MLFLOW_TRACKING_SERVER_CERT_PATH.get()  # type: ignore[no-untyped-call]
    return MlflowHostCreds(uri, token=token, server_cert_path=cert_path)  # type: ignore[no-untyped-call]


class TrackhouseStore(RestStore):
    """MLflow's tracking store over trackhouse's MLflow REST API."""

    def __init__(self, store_uri: str, artifact_uri: str | None = None) -> None:
        self.store_uri = store_uri
        self.artifact_uri = artifact_uri
        super().__init__(partial(_host_creds, http_uri(store_uri)))  # type: ignore[no-untyped-call]
