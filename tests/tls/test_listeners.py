"""TLS and mutual TLS on a real GrpcServer with real certificates: who is served, who is
refused in the handshake, and start-up errors that name the setting."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tensafe.client.channels import ClientTls, open_channel, resolve_tls
from tensafe.common import tls
from tensafe.common.config import ServiceConfig, load_config
from tensafe.common.errors import ConfigError, InvalidArgument

from .conftest import Pki, tls_config

SERVING = health_pb2.HealthCheckResponse.SERVING


async def _refused(check: Any, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(credentials)
    return info.value.code()


async def test_tls_listener_serves_clients_trusting_its_ca_only(
    tmp_path: Path, pki: Pki, serve: Callable[[ServiceConfig], Any]
) -> None:
    check = await serve(tls_config(tmp_path, pki, mutual=False))
    assert await check(pki.credentials()) == SERVING
    # No client certificate is needed without mTLS; one is accepted all the same.
    assert await check(pki.credentials(client=pki.client())) == SERVING
    assert await _refused(check, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert await _refused(check, pki.credentials(ca=pki.other)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    tmp_path: Path, pki: Pki, serve: Callable[[ServiceConfig], Any]
) -> None:
    check = await serve(tls_config(tmp_path, pki, mutual=True))
    assert await check(pki.credentials(client=pki.client())) == SERVING
    assert await _refused(check, pki.credentials()) == grpc.StatusCode.UNAVAILABLE
    stranger = pki.other.clients["user"]
    assert await _refused(check, pki.credentials(client=stranger)) == grpc.StatusCode.UNAVAILABLE
    assert await _refused(check, None) == grpc.StatusCode.UNAVAILABLE
    # The refused handshakes did not take the listener down.
    assert await check(pki.credentials(client=pki.client())) == SERVING


async def test_service_channel_presents_the_services_client_certificate(
    tmp_path: Path, pki: Pki, serve: Callable[[ServiceConfig], Any]
) -> None:
    check = await serve(tls_config(tmp_path, pki, mutual=True))
    probe = pki.client("probe")
    caller = tls_config(
        tmp_path,
        pki,
        mutual=True,
        server="probe",
        tls_ca_file=pki.trusted.ca_file,
        tls_client_cert_file=probe.cert_file,
        tls_client_key_file=probe.key_file,
    )
    credentials = tls.channel_credentials(caller)
    assert credentials is not None
    assert await check(credentials) == SERVING
    assert tls.client_identity(caller) == (probe.cert_file, probe.key_file)
    # Without a client pair the service presents its server certificate.
    plain = dataclasses.replace(caller, tls_client_cert_file=None, tls_client_key_file=None)
    assert tls.client_identity(plain) == (pki.server("probe").cert_file, plain.tls_key_file)
    # No tls_ca_file: outgoing channels stay plaintext.
    assert tls.channel_credentials(dataclasses.replace(plain, tls_ca_file=None)) is None


def test_sdk_channel_uses_the_connection_files_tls_and_the_environment(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = ClientTls(
        ca_file=pki.trusted.ca_file,
        client_cert_file=pki.client().cert_file,
        client_key_file=pki.client().key_file,
    )
    assert ClientTls.from_json(stored.to_json()) == stored
    assert resolve_tls(connection_tls=None) is None
    monkeypatch.setenv("TENSAFE_CA_FILE", str(pki.other.ca_file))
    resolved = resolve_tls(connection_tls=stored)
    assert resolved is not None
    assert resolved.ca_file == pki.other.ca_file  # the environment wins over the file
    assert resolved.client_cert_file == stored.client_cert_file
    explicit = resolve_tls(ca_file=tmp_path / "ca.pem", connection_tls=stored)
    assert explicit is not None and explicit.ca_file == tmp_path / "ca.pem"
    with pytest.raises(InvalidArgument) as info:
        open_channel("127.0.0.1:1", tls=explicit)
    assert info.value.field == "ca_file"
    with pytest.raises(InvalidArgument) as half:
        ClientTls(client_cert_file=pki.client().cert_file)
    assert half.value.field == "client_key_file"


def _env(tmp_path: Path, **files: Path | str) -> dict[str, str]:
    return {
        "TENSAFE_DATABASE_URL": "sqlite+aiosqlite:///x.db",
        "TENSAFE_DATA_DIR": str(tmp_path),
        **{f"TENSAFE_{name.upper()}": str(value) for name, value in files.items()},
    }


def _config_error(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(ServiceConfig, environ)
    return info.value


def test_config_errors_name_the_setting(tmp_path: Path, pki: Pki) -> None:
    server = pki.server()
    error = _config_error(_env(tmp_path, tls_cert_file=server.cert_file))
    assert error.setting == "TENSAFE_TLS_KEY_FILE"
    error = _config_error(_env(tmp_path, tls_key_file=server.key_file))
    assert error.setting == "TENSAFE_TLS_CERT_FILE"
    error = _config_error(_env(tmp_path, tls_client_ca_file=pki.trusted.ca_file))
    assert error.setting == "TENSAFE_TLS_CLIENT_CA_FILE"
    error = _config_error(_env(tmp_path, tls_client_key_file=server.key_file))
    assert error.setting == "TENSAFE_TLS_CLIENT_CERT_FILE"
    client = pki.client()
    error = _config_error(
        _env(tmp_path, tls_client_cert_file=client.cert_file, tls_client_key_file=client.key_file)
    )
    assert error.setting == "TENSAFE_TLS_CA_FILE"
    missing = tmp_path / "missing.pem"
    error = _config_error(_env(tmp_path, tls_ca_file=missing))
    assert error.setting == "TENSAFE_TLS_CA_FILE" and str(missing) in str(error)
    # A key where a certificate belongs, and a certificate where the key belongs.
    error = _config_error(
        _env(tmp_path, tls_cert_file=server.key_file, tls_key_file=server.key_file)
    )
    assert error.setting == "TENSAFE_TLS_CERT_FILE" and "not a PEM certificate" in str(error)
    error = _config_error(
        _env(tmp_path, tls_cert_file=server.cert_file, tls_key_file=server.cert_file)
    )
    assert error.setting == "TENSAFE_TLS_KEY_FILE" and "not a PEM private key" in str(error)
    # A private key others may read is refused; group read (a pod's fsGroup) is not.
    server.key_file.chmod(0o604)
    error = _config_error(
        _env(tmp_path, tls_cert_file=server.cert_file, tls_key_file=server.key_file)
    )
    assert error.setting == "TENSAFE_TLS_KEY_FILE" and "accessible to others" in str(error)
    server.key_file.chmod(0o640)
    config = load_config(
        ServiceConfig,
        _env(tmp_path, tls_cert_file=server.cert_file, tls_key_file=server.key_file),
    )
    assert config.tls_cert_file == server.cert_file
