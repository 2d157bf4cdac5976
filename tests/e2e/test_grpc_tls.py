"""TLS: with a certificate the port speaks TLS only; a client trusting it gets through."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from server.client import LedgerClient


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_server_answers_a_trusting_client_and_refuses_plaintext(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    server = start_server(tls_cert=cert, tls_key=key)
    port = server.address.rsplit(":", 1)[1]
    with LedgerClient(f"localhost:{port}", root_certificates=cert.read_bytes(), retries=0) as client:
        client.register_model("tls", {"kind": "logistic", "n_features": 2})
        assert client.get_model("tls").version == 1
    with LedgerClient(f"localhost:{port}", retries=0, timeout_s=3.0) as plain, pytest.raises(grpc.RpcError) as caught:
        plain.get_model("tls")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
