"""PEFT adapter directories through TGSP: import, package, open, export, load with PEFT."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from tensafe import tgsp
from tensafe.common.errors import AlreadyExists, InvalidArgument

from .helpers import TENANT, Env

FILES = (tgsp.ADAPTER_CONFIG_NAME, tgsp.ADAPTER_WEIGHTS_NAME)


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A PEFT LoRA adapter saved by PEFT itself, with non-zero A and B, and the logits
    the adapted model gives on a fixed input."""
    model = get_peft_model(
        tiny_base(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    directory = tmp_path_factory.mktemp("peft") / "saved"
    model.save_pretrained(directory)
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    return directory, logits


def import_fields() -> dict[str, object]:
    return {
        "adapter": tgsp.AdapterRef(adapter_id="imported", version="1"),
        "base_model": tgsp.BaseModelRef(model_id="tiny-llama", weights_sha256="cd" * 32),
        "provenance": tgsp.Provenance(
            tenant_id=TENANT,
            training_client_id=None,
            code_version="0.1.0+test",
            created_at=dt.datetime.now(dt.UTC),
        ),
    }


def export(env: Env, package: bytes, directory: Path) -> tgsp.OpenedAdapter:
    opened = tgsp.open(package, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT)
    tgsp.write_peft_dir(opened, directory)
    return opened


def logits_of(directory: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(tiny_base(), directory).eval()
    with torch.no_grad():
        return model(torch.arange(10).unsqueeze(0)).logits


def test_peft_dir_round_trip_gives_identical_files_and_model(
    env: Env, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    saved, logits = trained
    package = tgsp.package_peft_dir(
        saved, kek_provider=env.kek, signing_key=env.key, **import_fields()
    )
    manifest = tgsp.verify(package, trusted_keys=env.trusted, expected_tenant=TENANT)
    assert manifest.dp_certificate == tgsp.NoDPGuarantee.imported()
    assert manifest.lora.rank == 4 and manifest.lora.alpha == 8.0
    assert manifest.lora.target_modules == ("q_proj", "v_proj")
    assert manifest.lora.task_type == "CAUSAL_LM"

    exported = tmp_path / "exported"
    export(env, package, exported)
    for name in FILES:
        assert (exported / name).read_bytes() == (saved / name).read_bytes(), name

    # PEFT loads the export, and the adapted model computes what the original did.
    assert torch.equal(logits_of(exported), logits)

    # A second import/export cycle is a fixed point.
    again = tmp_path / "again"
    export(
        env,
        tgsp.package_peft_dir(
            exported, kek_provider=env.kek, signing_key=env.key, **import_fields()
        ),
        again,
    )
    for name in FILES:
        assert (again / name).read_bytes() == (saved / name).read_bytes(), name


def test_trainer_package_exports_a_directory_peft_loads(
    env: Env, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    saved, logits = trained
    model = PeftModel.from_pretrained(tiny_base(), saved)
    tensors = get_peft_model_state_dict(model)  # what a trainer publishes
    package = tgsp.write(
        weights=tensors,
        adapter=tgsp.AdapterRef(adapter_id="trained", version="3"),
        base_model=tgsp.BaseModelRef(model_id="tiny-llama", weights_sha256="cd" * 32),
        lora=tgsp.LoraSpec(
            rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), task_type="CAUSAL_LM"
        ),
        dp_certificate=tgsp.DPGuarantee(
            epsilon=3.0,
            delta=1e-6,
            accountant="pld",
            noise_multiplier=0.9,
            max_grad_norm=0.5,
            sampling=tgsp.ClientBatches(),
            steps=40,
            assumptions=("each client-supplied example appears at most once per step",),
        ),
        provenance=tgsp.Provenance(
            tenant_id=TENANT,
            training_client_id="tc-1",
            code_version="0.1.0+test",
            created_at=dt.datetime.now(dt.UTC),
        ),
        kek_provider=env.kek,
        signing_key=env.key,
    )
    exported = tmp_path / "from-trainer"
    opened = export(env, package, exported)

    config = json.loads((exported / tgsp.ADAPTER_CONFIG_NAME).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert torch.equal(logits_of(exported), logits)
    got = opened.torch_tensors()
    assert all(torch.equal(got[name], tensor) for name, tensor in tensors.items())


def test_export_refuses_a_non_empty_directory(
    env: Env, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    package = tgsp.package_peft_dir(
        trained[0], kek_provider=env.kek, signing_key=env.key, **import_fields()
    )
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(AlreadyExists):
        export(env, package, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export(env, package, empty)
    assert sorted(p.name for p in empty.iterdir()) == sorted(FILES)


def test_import_refuses_what_tgsp_v1_cannot_describe(
    env: Env, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    saved = trained[0]
    config = json.loads((saved / tgsp.ADAPTER_CONFIG_NAME).read_text())
    for option, value in (
        ("use_dora", True),
        ("use_rslora", True),
        ("bias", "all"),
        ("rank_pattern", {"q_proj": 8}),
        ("peft_type", "IA3"),
    ):
        directory = tmp_path / f"bad-{option}"
        directory.mkdir()
        (directory / tgsp.ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, option: value}))
        (directory / tgsp.ADAPTER_WEIGHTS_NAME).write_bytes(
            (saved / tgsp.ADAPTER_WEIGHTS_NAME).read_bytes()
        )
        with pytest.raises(InvalidArgument) as caught:
            tgsp.read_peft_dir(directory)
        assert caught.value.field == f"adapter_config.{option}"

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / tgsp.ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InvalidArgument) as caught:
        tgsp.read_peft_dir(missing)
    assert tgsp.ADAPTER_WEIGHTS_NAME in caught.value.message

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / tgsp.ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    (broken / tgsp.ADAPTER_WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InvalidArgument) as caught:
        tgsp.read_peft_dir(broken)
    assert caught.value.field == "adapter_model"
