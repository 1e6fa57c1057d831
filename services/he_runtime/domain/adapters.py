"""Where the HE runtime gets adapter weights from.

The source is the registry: :class:`RegistryAdapterSource` downloads the adapter's TGSP
package acting for the session's tenant, verifies it against the registry's published
signing keys, has the registry unwrap its data key for that tenant (an audited call) and
decrypts it here, inside the runtime (DESIGN.md §4 and §8). :mod:`tensafe.he_runtime.server`
installs it whenever a registry is configured (``TENSAFE_REGISTRY_URL``). The one
alternative is :class:`LocalPeftAdapterSource`, an unverified PEFT adapter directory
under the runtime's data folder, installed **only in explicit dev mode** without a
registry. With neither, session creation fails with FAILED_PRECONDITION; there is no
weaker way to obtain weights.

A loaded adapter maps each adapted module (its name in the base model, e.g.
``model.layers.0.self_attn.q_proj``) to that layer's A and B in the orientation of the
LoRA delta ``(alpha / r) · x · A · B``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors

from tensafe import tgsp
from tensafe.common.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from tensafe.common.registry_client import RegistryClient
from tensafe.he_runtime.domain.executor import LoraWeights

ADAPTER_CONFIG_NAME = "adapter_config.json"
"""PEFT's adapter configuration file."""

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
"""PEFT's adapter weights file."""

#: Adapter names are path components: letters, digits, dot, dash and underscore, and
#: never "." or "..".
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: PEFT prefixes every key with the wrapper path and suffixes it with the LoRA part.
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerShape:
    """Shapes of one adapted linear layer.

    Attributes:
        input_size: in_features d of the base layer (rows of A).
        output_size: out_features d_out of the base layer (columns of B).
    """

    input_size: int
    output_size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedAdapter:
    """An adapter's weights, checked, ready for the executor.

    Attributes:
        name: The adapter's name.
        version: The adapter's version (0 when the source has no versions).
        digest: SHA-256 hex of the weights file; part of the executor's cache key.
        rank: LoRA rank r, the same for every layer.
        alpha: Effective LoRA alpha: the delta is scaled by ``alpha / rank``.
        layers: Adapted module name to its weights, sorted by name.
    """

    name: str
    version: int
    digest: str
    rank: int
    alpha: float
    layers: Mapping[str, LoraWeights]

    def shape(self, layer: str) -> LayerShape:
        """Return the shapes of ``layer``."""
        weights = self.layers[layer]
        return LayerShape(
            input_size=int(weights.lora_a.shape[0]), output_size=int(weights.lora_b.shape[1])
        )

    @property
    def max_input_size(self) -> int:
        """Largest input size over the adapted layers."""
        return max(self.shape(layer).input_size for layer in self.layers)

    @property
    def max_output_size(self) -> int:
        """Largest output size over the adapted layers."""
        return max(self.shape(layer).output_size for layer in self.layers)


class AdapterSource(abc.ABC):
    """Loads the adapter a session applies."""

    @abc.abstractmethod
    async def load(self, *, tenant_id: str, name: str, version: int) -> LoadedAdapter:
        """Return the adapter ``name`` at ``version`` (0: the latest) for ``tenant_id``.

        Raises:
            InvalidArgument: The name is not a valid adapter name.
            NotFound: No such adapter (or not the tenant's).
            FailedPrecondition: The adapter exists but cannot be applied (unsupported
                LoRA variant, malformed weights).
        """


class LocalPeftAdapterSource(AdapterSource):
    """Dev-mode source: ``<root>/<adapter_name>/`` holding a PEFT LoRA adapter directory.

    Not tenant-scoped and not verified (no signature, no encryption), which is why it
    is installed only in explicit dev mode.

    Args:
        root: The folder holding one sub-folder per adapter.
    """

    def __init__(self, root: Path) -> None:
        self._root = root

    async def load(self, *, tenant_id: str, name: str, version: int) -> LoadedAdapter:
        """Read and check ``<root>/<name>``; see :meth:`AdapterSource.load`."""
        return await asyncio.to_thread(self._load, name, version)

    def _load(self, name: str, version: int) -> LoadedAdapter:
        if not _ADAPTER_NAME.match(name) or name in {".", ".."}:
            raise InvalidArgument(
                "header.adapter_name", "must be 1-128 of letters, digits, '.', '-', '_'"
            )
        if version != 0:
            raise InvalidArgument(
                "header.adapter_version",
                "the dev-mode local adapter source holds one version per name; use 0",
            )
        folder = self._root / name
        config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise NotFound(f"adapter {name!r} not found")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FailedPrecondition(
                f"adapter {name!r}: {ADAPTER_CONFIG_NAME} is not readable JSON ({error})",
                reason="ADAPTER_MALFORMED",
            ) from None
        weights = weights_path.read_bytes()
        return parse_peft_adapter(name=name, version=0, config=config, weights=weights)


class RegistryAdapterSource(AdapterSource):
    """Adapters from the registry, as verified, decrypted TGSP packages.

    For each load, acting for the session's tenant: ``DownloadAdapter`` (the registry
    verifies the stored package first), :func:`tensafe.tgsp.verify` against the keys the
    registry publishes (``GetSigningKeys``) and the tenant, ``UnwrapDataKey`` (audited by
    the registry), then :func:`tensafe.tgsp.open`, which checks every chunk's tag and
    every tensor's SHA-256 under that key before anything is returned. Any failure is an
    error; no weights come from a package that failed a check.

    Args:
        registry: The registry client (the HE runtime's service credentials).
        trust: The pinned trust list (signing keys bound to tenants); ``None`` trusts
            the registry's published keys for every tenant (dev mode only, checked by
            the configuration).
    """

    def __init__(self, registry: RegistryClient, *, trust: tgsp.TrustList | None = None) -> None:
        self._registry = registry
        self._trust = trust

    async def close(self) -> None:
        """Close the registry client."""
        await self._registry.close()

    async def load(self, *, tenant_id: str, name: str, version: int) -> LoadedAdapter:
        """Download, verify, unwrap and open ``name`` at ``version`` (0: the latest).

        Raises:
            InvalidArgument: A malformed name.
            NotFound: No such adapter or version for the tenant.
            FailedPrecondition: A package that fails verification (the message names
                the check), or an adapter HE-LoRA cannot apply.
        """
        if not _ADAPTER_NAME.match(name) or ".." in name:
            raise InvalidArgument(
                "header.adapter_name", "must be 1-128 of letters, digits, '.', '-', '_'"
            )
        if version < 0:
            raise InvalidArgument("header.adapter_version", "must be >= 0 (0: the latest)")
        downloaded = await self._registry.download(name, version=version, acting_tenant=tenant_id)
        trusted: Iterable[tgsp.VerifyingKey] = self._trust or [
            _verifying_key(key.key_id, key.public_key)
            for key in await self._registry.signing_keys()
        ]
        # The signature, digests and tenant are checked before the data key is asked for.
        await asyncio.to_thread(
            tgsp.verify, downloaded.package, trusted_keys=trusted, expected_tenant=tenant_id
        )
        data_key = await self._registry.unwrap_data_key(
            name, downloaded.version.version, acting_tenant=tenant_id
        )
        opened = await asyncio.to_thread(
            tgsp.open,
            downloaded.package,
            trusted_keys=trusted,
            kek_provider=UnwrappedDataKey(tenant_id, data_key),
            tenant_id=tenant_id,
        )
        config = json.loads(tgsp.peft_adapter_config_text(opened.manifest))
        return await asyncio.to_thread(
            parse_peft_adapter,
            name=name,
            version=downloaded.version.version,
            config=config,
            weights=bytes(opened.payload),
        )


def _verifying_key(key_id: str, public_key: bytes) -> tgsp.VerifyingKey:
    key = tgsp.VerifyingKey.from_raw(public_key)
    if key.key_id != key_id:
        raise IntegrityError(
            f"signing key {key_id}: the key id does not match the public key",
            metadata={"check": "signing key"},
        )
    return key


class UnwrappedDataKey(tgsp.KekProvider):
    """A KEK provider that holds one data key the registry already unwrapped.

    The registry's KEKs never leave it; it returns one package's DEK to a service acting
    for the owning tenant. :func:`tensafe.tgsp.open` still checks that DEK like any
    other: every chunk's GCM tag must verify under it.

    Args:
        tenant_id: The tenant the key was unwrapped for.
        data_key: The package's DEK.
    """

    def __init__(self, tenant_id: str, data_key: bytes) -> None:
        self._tenant_id = tenant_id
        self._data_key = data_key

    @property
    def provider_id(self) -> str:
        """``registry-unwrapped``: a DEK the registry's UnwrapDataKey returned."""
        return "registry-unwrapped"

    def wrap(self, tenant_id: str, dek: bytes, aad: bytes) -> tgsp.WrappedKey:
        """Refused: this provider only hands back one unwrapped key."""
        raise FailedPrecondition("an unwrapped data key cannot wrap keys")

    def unwrap(self, tenant_id: str, wrapped: tgsp.WrappedKey, aad: bytes) -> bytes:
        """The held DEK, for the tenant it was unwrapped for."""
        if tenant_id != self._tenant_id or wrapped.tenant_id != self._tenant_id:
            raise IntegrityError(
                f"tenant mismatch: the key was unwrapped for tenant {self._tenant_id!r}",
                metadata={"check": "tenant mismatch"},
            )
        return self._data_key


def parse_peft_adapter(*, name: str, version: int, config: Any, weights: bytes) -> LoadedAdapter:
    """Check a PEFT LoRA adapter (config dict and safetensors bytes) and load its layers.

    Supported: plain LoRA on linear layers (``lora_A``/``lora_B``), one rank and one
    alpha for all layers, optionally rank-stabilised (rsLoRA, scaling ``alpha/sqrt(r)``,
    Kalajdzievski 2023), which is applied as the effective alpha ``alpha·sqrt(r)``.

    Raises:
        FailedPrecondition: An unsupported variant (DoRA, per-layer rank or alpha
            patterns, Conv1D ``fan_in_fan_out``, trained biases) or malformed weights.
    """

    def refuse(message: str) -> FailedPrecondition:
        return FailedPrecondition(f"adapter {name!r}: {message}", reason="ADAPTER_UNSUPPORTED")

    if not isinstance(config, dict):
        raise refuse(f"{ADAPTER_CONFIG_NAME} is not an object")
    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise refuse(f"{key} adapters are not supported by HE-LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise refuse(f"{key} (per-layer rank or alpha) is not supported by HE-LoRA")
    if config.get("bias", "none") != "none":
        raise refuse("adapters that train biases are not supported by HE-LoRA")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise refuse(f"r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise refuse(f"lora_alpha must be positive, got {alpha!r}")
    effective_alpha = float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    try:
        tensors = load_safetensors(weights)
    except Exception as error:  # safetensors raises its own error types for bad files
        raise refuse(
            f"{ADAPTER_WEIGHTS_NAME} is not a readable safetensors file ({error})"
        ) from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise refuse(f"unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        module = match["module"].removeprefix(_PEFT_PREFIX)
        parts.setdefault(module, {})[match["part"]] = tensor
    if not parts:
        raise refuse("holds no LoRA layers")
    layers: dict[str, LoraWeights] = {}
    for module in sorted(parts):
        pair = parts[module]
        if set(pair) != {"A", "B"}:
            raise refuse(f"layer {module!r} lacks lora_{'B' if 'A' in pair else 'A'}")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise refuse(f"layer {module!r}: LoRA weights must be matrices")
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise refuse(
                f"layer {module!r}: shapes {lora_a.shape} and {lora_b.shape} do not have "
                f"rank {rank}"
            )
        if not (np.all(np.isfinite(lora_a)) and np.all(np.isfinite(lora_b))):
            raise refuse(f"layer {module!r} holds NaN or infinity")
        layers[module] = LoraWeights.from_peft(lora_a_weight=lora_a, lora_b_weight=lora_b)
    return LoadedAdapter(
        name=name,
        version=version,
        digest=hashlib.sha256(weights).hexdigest(),
        rank=rank,
        alpha=effective_alpha,
        layers=layers,
    )
