"""TLS from cert/key files: gRPC and HTTP round trips with a self-signed certificate; plaintext is refused."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

import trackhouse.client as th
from trackhouse.cli.server import ServerThread
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.store import Store
from trackhouse.store.auth import Scope, mint


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_round_trips_and_plaintext_is_refused(
        tmp_path: Path, store: Store, start_server: Callable[..., AbstractContextManager[ServerThread]]) -> None:
    cert, key = self_signed(tmp_path)
    token, record = mint("tls", Scope.WRITE)
    store.put_token(record)
    with start_server(http=True, auth="on", tls_cert=cert, tls_key=key) as thread:
        # gRPC over TLS with the client's CA option, token and all.
        client = th.connect(f"grpcs://{thread.address}", token=token, tls_ca=cert,
                            settings=th.Settings(rpc_timeout=10))
        try:
            run = client.start_run(experiment="secure", name="over-tls")
            run.log(step=0, loss=1.0)
            assert run.finish()
            assert [r.name for r in client.search_runs()] == ["over-tls"]
        finally:
            client.close()
        # Plaintext gRPC to the TLS port fails.
        with grpc.insecure_channel(thread.address) as channel:
            stub = query_pb2_grpc.QueryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.SearchRuns(query_pb2.SearchRunsRequest(), timeout=5,
                                metadata=(("authorization", f"Bearer {token}"),))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # HTTPS: MLflow REST, a write too (it reaches ingest over the internal socket, as the caller).
        context = ssl.create_default_context(cafile=cert)
        base = f"https://127.0.0.1:{thread.server.http_port}"
        with urllib.request.urlopen(f"{base}/health", context=context, timeout=10) as resp:
            assert resp.status == 200
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/create", method="POST",
                                         data=json.dumps({"experiment_id": "0"}).encode(),
                                         headers={"authorization": f"Bearer {token}",
                                                  "content-type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["run"]["info"]["run_id"]
        # Plaintext HTTP to the TLS port gets no HTTP answer.
        conn = http.client.HTTPConnection("127.0.0.1", thread.server.http_port, timeout=10)
        try:
            with pytest.raises((http.client.HTTPException, OSError)):
                conn.request("GET", "/health")
                conn.getresponse()
        finally:
            conn.close()


def test_client_refuses_a_ca_file_with_a_plaintext_url(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    with pytest.raises(th.UsageError, match="grpcs"):
        th.Settings(url="127.0.0.1:1", tls_ca=cert)


def test_server_rejects_half_a_tls_configuration(tmp_path: Path) -> None:
    from trackhouse.cli.settings import ServerSettings

    cert, _ = self_signed(tmp_path)
    with pytest.raises(ValueError, match="both"):
        ServerSettings(tls_cert=cert)
    with pytest.raises(ValueError, match="readable"):
        ServerSettings(tls_cert=cert, tls_key=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="TRACKHOUSE_SERVER_AUTH"):
        ServerSettings(auth="sometimes")
    env = ServerSettings.from_env({"TRACKHOUSE_SERVER_AUTH": "ON", "TRACKHOUSE_SERVER_AUTH_CACHE_TTL": "1.5"})
    assert (env.auth, env.auth_cache_ttl) == ("on", 1.5)
