"""PEFT adapter directories: import into TGSP packages and export back out.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (what ``PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained`` reads). Import keeps both files byte for byte: the
safetensors file becomes the package payload and the config text is stored verbatim in
the manifest's ``lora.peft_adapter_config``, so export writes back identical files. An
imported adapter's training is unknown, so its package says no DP guarantee is known.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tensafe.common.errors import AlreadyExists, InvalidArgument
from tensafe.tgsp.canonical import JsonValue
from tensafe.tgsp.kek import KekProvider
from tensafe.tgsp.manifest import (
    DEFAULT_CHUNK_SIZE,
    AdapterRef,
    BaseModelRef,
    LoraSpec,
    Manifest,
    NoDPGuarantee,
    Provenance,
)
from tensafe.tgsp.package import OpenedAdapter, write
from tensafe.tgsp.payload import parse_layout
from tensafe.tgsp.signing import SigningKey

ADAPTER_CONFIG_NAME = "adapter_config.json"
"""PEFT's adapter configuration file name."""

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
"""PEFT's adapter weights file name."""


@dataclass(frozen=True, kw_only=True)
class PeftAdapterDir:
    """The contents of a PEFT LoRA adapter directory, checked."""

    lora: LoraSpec
    """The LoRA configuration, with the config file kept verbatim."""
    weights: bytes
    """The ``adapter_model.safetensors`` file, byte for byte."""
    base_model_name_or_path: str | None
    """The config's ``base_model_name_or_path``, if it names one."""


def read_peft_dir(directory: os.PathLike[str]) -> PeftAdapterDir:
    """Read and check a PEFT LoRA adapter directory.

    Args:
        directory: The directory.

    Returns:
        Its configuration and weights.

    Raises:
        InvalidArgument: A file is missing, the config is not a LoRA config TGSP v1 can
            describe, or the weights are not valid safetensors.
    """
    root = Path(directory)
    config_path = root / ADAPTER_CONFIG_NAME
    weights_path = root / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InvalidArgument("directory", f"{path.name} is missing in {str(root)!r}")
    try:
        text = config_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("adapter_config", "not UTF-8") from exc
    lora = LoraSpec.from_peft_adapter_config(text)
    weights = weights_path.read_bytes()
    parse_layout(weights, total_size=len(weights), field="adapter_model")
    base = json.loads(text).get("base_model_name_or_path")
    return PeftAdapterDir(
        lora=lora,
        weights=weights,
        base_model_name_or_path=base if isinstance(base, str) and base else None,
    )


def package_peft_dir(
    directory: os.PathLike[str],
    *,
    adapter: AdapterRef,
    base_model: BaseModelRef,
    provenance: Provenance,
    kek_provider: KekProvider,
    signing_key: SigningKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Import a PEFT adapter directory as a TGSP package.

    The package's certificate is :meth:`NoDPGuarantee.imported`: nothing is known about
    how the weights were trained.

    Args:
        directory: The PEFT adapter directory.
        adapter: Adapter id and version to give it.
        base_model: The base model (id and weights digest) it applies to.
        provenance: Tenant, code version and time of the import
            (``training_client_id`` is normally None).
        kek_provider: Provider holding the tenant's KEK.
        signing_key: Key that signs the package.
        chunk_size: Plaintext bytes per AEAD chunk.

    Returns:
        The package bytes.

    Raises:
        InvalidArgument: The directory is not an adapter TGSP v1 can describe.
        NotFound: The tenant has no KEK.
    """
    contents = read_peft_dir(directory)
    return write(
        weights=contents.weights,
        adapter=adapter,
        base_model=base_model,
        lora=contents.lora,
        dp_certificate=NoDPGuarantee.imported(),
        provenance=provenance,
        kek_provider=kek_provider,
        signing_key=signing_key,
        chunk_size=chunk_size,
    )


def peft_adapter_config_text(manifest: Manifest) -> str:
    """Return the ``adapter_config.json`` text for a manifest.

    The verbatim imported file when the manifest holds one; otherwise a config built
    from the LoRA fields, formatted as PEFT formats its own (sorted keys, indent 2).
    """
    if manifest.lora.peft_adapter_config is not None:
        return manifest.lora.peft_adapter_config
    lora = manifest.lora
    config: dict[str, JsonValue] = {
        "base_model_name_or_path": manifest.base_model.model_id,
        "bias": "none",
        "inference_mode": True,
        "lora_alpha": int(lora.alpha) if lora.alpha.is_integer() else lora.alpha,
        "lora_dropout": lora.dropout,
        "peft_type": "LORA",
        "r": lora.rank,
        "target_modules": list(lora.target_modules),
        "task_type": lora.task_type,
    }
    return json.dumps(config, indent=2, sort_keys=True)


def write_peft_dir(opened: OpenedAdapter, directory: os.PathLike[str]) -> None:
    """Write an opened package as a PEFT adapter directory.

    The files are written into a temporary directory beside ``directory`` and moved into
    place complete, so a reader never sees half an adapter. The directory keeps the
    temporary directory's mode 0700: it holds the tenant's decrypted weights.

    Args:
        opened: A package that passed :func:`tensafe.tgsp.open_package`.
        directory: Where to create the adapter directory; it must not exist, or be empty.

    Raises:
        AlreadyExists: ``directory`` exists and is not empty.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExists(f"{str(target)!r} exists and is not an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        (staging / ADAPTER_CONFIG_NAME).write_bytes(
            peft_adapter_config_text(opened.manifest).encode("utf-8")
        )
        (staging / ADAPTER_WEIGHTS_NAME).write_bytes(opened.payload)
        # os.replace moves a directory onto an empty one atomically on POSIX.
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
