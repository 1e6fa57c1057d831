"""`tensafe up --tls` end to end: the local stack creates its development CA, every
service listens with mutual TLS and calls the others over it (the HE runtime and the
trainer fetch auth's keys, the worker publishes to the registry, NATS is mutual TLS
too), and the SDK trains one step and publishes the adapter with nothing but the
connection file. Plaintext and certificate-less clients are refused; a second start
reuses the CA."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensafe.client.channels import ClientTls, open_channel
from tensafe.client.connection import load_connection
from tensafe.client.dev_tls import ensure_dev_certificates
from tensafe.client.registry import RegistryClient
from tensafe.client.stack import SERVICES, LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model
from tensafe.tinker import ServiceClient, types

BASE_MODEL = "tiny-tls"
NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _health(address: str, tls: ClientTls | None) -> int:
    with open_channel(address, tls=tls) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(response.status)


_NODE_CALLS = """
import { TenSafeClient, readConnection } from "@tensafe/client";
const file = process.argv[1];
const connection = readConnection(file);
const secure = TenSafeClient.fromConnectionFile(file);
const plain = new TenSafeClient(connection.services, {
  apiKey: connection.api_key, tls: null, timeoutMs: 10000,
});
const out = {};
try {
  out.models = (await secure.listBaseModels()).map((m) => m.name);
  out.plaintext = await plain.login().then(() => "served", (error) => error.codeName);
} finally {
  secure.close();
  plain.close();
}
console.log(JSON.stringify(out));
"""


def _node_client_over_mtls(node: str, connection_file: Path) -> None:
    """The Node client: mTLS from the connection file works, plaintext is refused."""
    health = subprocess.run(
        [node, "bin/health.mjs", "--connection-file", str(connection_file)],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.count("SERVING") == len(SERVICES)
    calls = subprocess.run(
        [node, "--input-type=module", "-e", _NODE_CALLS, str(connection_file)],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert calls.returncode == 0, calls.stdout + calls.stderr
    report = json.loads(calls.stdout)
    assert BASE_MODEL in report["models"]
    # Refused at the connection: Connect-ES reports the HTTP/2 session the TLS port drops
    # as CANCELLED (grpc-js said UNAVAILABLE); either way no call is served.
    assert report["plaintext"] in ("CANCELLED", "UNAVAILABLE")


async def _nats_refuses_a_client_without_certificate(url: str, user: ClientTls) -> bool:
    """A client with the user's certificate connects; one without is refused."""
    assert user.ca_file and user.client_cert_file and user.client_key_file
    mutual = ssl.create_default_context(cafile=str(user.ca_file))
    mutual.load_cert_chain(str(user.client_cert_file), str(user.client_key_file))
    connection = await nats.connect(url, tls=mutual, allow_reconnect=False)
    await connection.close()
    try:
        await nats.connect(
            url,
            tls=ssl.create_default_context(cafile=str(user.ca_file)),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
    except (OSError, nats.errors.Error):
        return True
    return False


def test_tensafe_up_tls_trains_over_mutual_tls(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    build_tiny_model(
        data_dir / "models" / BASE_MODEL,
        seed=0,
        vocab_size=256,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=64,
    )
    with LocalStack(StackOptions(data_dir=data_dir, tls=True)) as stack:
        stack.start()
        connection = load_connection(stack.connection_file)
        assert connection.tls is not None
        user = connection.tls
        assert user.ca_file == (data_dir / "tls" / "ca.pem").resolve()
        for key in (data_dir / "tls").glob("*.key"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

        # The embedded NATS is mutual TLS too: the services reached it with their
        # client certificates (they are up), a client without one is refused.
        nats_url = json.loads(stack.connection_file.read_text())["nats_url"]
        assert nats_url.startswith("tls://")
        assert asyncio.run(_nats_refuses_a_client_without_certificate(nats_url, user))

        serving = health_pb2.HealthCheckResponse.SERVING
        for name in SERVICES:
            address = connection.address(name)
            assert _health(address, user) == serving
            for refused in (None, ClientTls(ca_file=user.ca_file)):
                with pytest.raises(grpc.RpcError) as info:
                    _health(address, refused)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, refused)

        # The CLI reads the TLS block of the connection file like the SDK.
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensafe.client.cli",
                "status",
                "--connection-file",
                str(stack.connection_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == len(SERVICES)

        node = shutil.which("node")
        if node and (NODE_CLIENT / "node_modules").exists():
            _node_client_over_mtls(node, stack.connection_file)

        with ServiceClient(connection_file=stack.connection_file) as service:
            models = [m.model_name for m in service.get_server_capabilities().supported_models]
            assert BASE_MODEL in models
            training = service.create_lora_training_client(base_model=BASE_MODEL, rank=2)
            datum = types.Datum(
                model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
                loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5},
            )
            result = training.forward_backward([datum], "cross_entropy").result()
            step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            # The worker publishes through auth and the registry, both over mTLS.
            saved = training.save_adapter("tls-adapter").result()
        with RegistryClient.connect(connection_file=stack.connection_file) as registry:
            listed = list(registry.list_versions("tls-adapter"))
        loss = result.metrics["loss:sum"]
        assert math.isfinite(loss) and 0 < loss < 5 * math.log(256) * 2
        assert step is not None
        assert saved.version == 1
        assert [v.package_sha256 for v in listed] == [saved.package_sha256]

    # A second start of the same data dir reuses the CA and every certificate.
    ca_before = (data_dir / "tls" / "ca.pem").read_bytes()
    cert_before = (data_dir / "tls" / "trainer.pem").read_bytes()
    again = ensure_dev_certificates(
        data_dir / "tls", servers=SERVICES, clients=SERVICES, hosts=("127.0.0.1", "localhost")
    )
    assert not again.created
    assert again.ca_file.read_bytes() == ca_before
    assert again.servers["trainer"].cert_file.read_bytes() == cert_before
