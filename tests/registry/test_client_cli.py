"""The SDK module and the ``tensafe registry`` commands against real servers, with a real
PEFT adapter on a real tiny Llama."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from tensafe import tgsp
from tensafe.client import cli
from tensafe.client.registry import RegistryClient
from tensafe.common.errors import IntegrityError, NotFound, PermissionDenied

from .conftest import Registry

BASE_SHA256 = "ef" * 32


def tiny_llama(directory: Path) -> Path:
    """A tiny Llama saved with save_pretrained and loaded back as users load one."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def peft_adapter(base_dir: Path, directory: Path) -> Path:
    """A PEFT LoRA adapter whose B is non-zero, saved by PEFT."""
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


def connection_file(registry: Registry, tmp_path: Path, api_key: str) -> Path:
    path = tmp_path / "connection.json"
    path.write_text(
        json.dumps(
            {
                "services": {"auth": registry.auth_address, "registry": registry.address},
                "api_key": api_key,
                "data_dir": str(tmp_path / "no-stack"),
                "dev_mode": False,
            }
        )
    )
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        return model(input_ids=tokens).logits  # type: ignore[no-any-return]


async def test_cli_import_publish_export_and_sdk_load(
    registry_sqlite: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_sqlite
    a = registry.tenant_a
    base_dir = tiny_llama(tmp_path / "base")
    adapter_dir = peft_adapter(base_dir, tmp_path / "adapter")
    conn = connection_file(registry, tmp_path, a.admin_key)
    package_file = tmp_path / "tiny.tgsp"
    signing_key_file = registry.config.data_dir / "dev-registry-signing-key.pem"

    def run(*argv: str) -> int:
        return cli.main(["registry", argv[0], "--connection-file", str(conn), *argv[1:]])

    # Seal offline with the registry's KEK folder and signing key; the tenant comes from
    # the API key's token.
    code = await asyncio.to_thread(
        run,
        "import",
        str(adapter_dir),
        "--name",
        "tiny",
        "-o",
        str(package_file),
        "--base-model-id",
        "tiny-llama",
        "--base-model-sha256",
        BASE_SHA256,
        "--kek-dir",
        str(registry.config.kek_dir),
        "--signing-key",
        str(signing_key_file),
    )
    output = capsys.readouterr()
    assert code == 0, output.err
    assert f"for tenant {a.tenant_id}" in output.out
    assert await asyncio.to_thread(run, "inspect", str(package_file)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["provenance"]["tenant_id"] == a.tenant_id
    assert shown["manifest"]["dp_certificate"]["guarantee"] == "none"
    assert shown["signer_key_id"] == registry.signing_key.key_id
    # Verified with the registry's published keys.
    assert await asyncio.to_thread(run, "verify", str(package_file)) == 0
    assert "OK: tiny" in capsys.readouterr().out
    assert await asyncio.to_thread(run, "publish", str(package_file)) == 0
    assert "published tiny version 1" in capsys.readouterr().out

    downloaded = tmp_path / "downloaded.tgsp"
    assert await asyncio.to_thread(run, "download", "tiny", "-o", str(downloaded)) == 0
    assert downloaded.read_bytes() == package_file.read_bytes()
    exported = tmp_path / "exported"
    assert await asyncio.to_thread(run, "export", "tiny", "-o", str(exported)) == 0
    for name in (tgsp.ADAPTER_CONFIG_NAME, tgsp.ADAPTER_WEIGHTS_NAME):
        assert (exported / name).read_bytes() == (adapter_dir / name).read_bytes(), name
    assert await asyncio.to_thread(run, "alias", "tiny", "prod", "1") == 0

    # A damaged file fails offline verification with exit code 3.
    damaged = tmp_path / "damaged.tgsp"
    data = bytearray(package_file.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    key_pem = tmp_path / "registry.pub.pem"
    key_pem.write_bytes(registry.signing_key.verifying_key.to_pem())
    assert await asyncio.to_thread(run, "verify", str(damaged), "--key", str(key_pem)) == 3

    # The SDK loads the adapter onto the base model: same logits as the original.
    def load_and_compare() -> tuple[torch.Tensor, torch.Tensor]:
        original = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)
        )
        with RegistryClient.connect(connection_file=conn) as client:
            loaded = client.load_peft_model(
                AutoModelForCausalLM.from_pretrained(base_dir), "tiny", alias="prod"
            )
        return logits(original.eval()), logits(loaded.eval())

    expected, got = await asyncio.to_thread(load_and_compare)
    assert torch.equal(expected, got)
    base_only = await asyncio.to_thread(
        lambda: logits(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    )
    assert not torch.equal(base_only, got)  # the adapter really changes the output


async def test_sdk_publish_download_and_typed_errors(
    registry_sqlite: Registry, tmp_path: Path
) -> None:
    registry = registry_sqlite
    a, b = registry.tenant_a, registry.tenant_b
    package = registry.package(a.tenant_id, "sdk", seed=4)
    conn_a = connection_file(registry, tmp_path, a.admin_key)
    reader_dir = tmp_path / "reader"
    reader_dir.mkdir()
    conn_reader = connection_file(registry, reader_dir, a.reader_key)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    conn_b = connection_file(registry, other_dir, b.admin_key)

    def scenario() -> None:
        with RegistryClient.connect(connection_file=conn_a) as client:
            first = client.publish("sdk", package, request_id="k-1")
            assert client.publish("sdk", package, request_id="k-1").version == first.version
            assert client.publish("sdk", package).version == 2
            assert [v.version for v in client.list_versions("sdk", page_size=1)] == [2, 1]
            assert [x.name for x in client.list_adapters()] == ["sdk"]
            result = client.download("sdk", version=1, destination=tmp_path / "p.tgsp")
            assert result.package == package
            assert (tmp_path / "p.tgsp").read_bytes() == package
            assert hashlib.sha256(package).hexdigest() == result.version.package_sha256
            manifest = client.verify(package, expected_tenant=a.tenant_id)
            assert manifest.adapter.adapter_id == "sdk"
            opened = client.open("sdk", version=2)
            assert opened.manifest.tenant_id == a.tenant_id
            with pytest.raises(IntegrityError) as info:
                client.publish("sdk", package[:-1] + bytes([package[-1] ^ 1]))
            assert info.value.message.startswith("signature")
        with RegistryClient.connect(connection_file=conn_reader) as reader:
            assert reader.download("sdk").package == package
            with pytest.raises(PermissionDenied):
                reader.publish("sdk", package)
        with RegistryClient.connect(connection_file=conn_b) as other:
            with pytest.raises(NotFound):
                other.download("sdk")
            with pytest.raises(NotFound):
                other.open("sdk", version=1)

    await asyncio.to_thread(scenario)
