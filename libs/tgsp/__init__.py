"""TGSP: the signed, encrypted package format for LoRA adapters (format version 2).

A TGSP package seals one adapter: a public manifest (what the adapter is, how it was
trained, its differential-privacy certificate, who made it), the weights as an
encrypted safetensors payload, the key that decrypts them wrapped for the owning
tenant, and an Ed25519 signature over the manifest and the ciphertext (the wrapped key
is bound to the package by its own AEAD associated data, so it can be re-wrapped under
a new KEK version without re-signing; format version 1, still read, signed it too).
The registry, the trainer's publisher, the HE runtime and the SDK all read and write
packages through this library, offline.
The byte format is specified in docs/tgsp.md.

Vocabulary, used throughout this package:

* **DEK** (data-encryption key): a fresh random 256-bit AES key per package that
  encrypts the payload with AES-256-GCM. It is stored only wrapped.
* **KEK** (key-encryption key): a long-lived per-tenant key held by a
  :class:`KekProvider` (a local key file, or a KMS). It encrypts ("wraps") DEKs and
  never leaves its provider. This is envelope encryption: rotating or revoking a
  tenant's KEK touches wrapped DEKs, not payloads.
* **AAD** (additional authenticated data): bytes an AEAD authenticates but does not
  encrypt; wrapping binds the tenant, the adapter id and version and the manifest digest
  this way, so a wrapped DEK unwraps only for its own package and tenant.
* **Key id**: hex SHA-256 of a raw Ed25519 public key; names the signer in a package.

Typical use::

    package = tgsp.write(weights=tensors, adapter=..., base_model=..., lora=...,
                         dp_certificate=..., provenance=..., kek_provider=kek,
                         signing_key=key)
    manifest = tgsp.verify(package, trusted_keys=[key.verifying_key])
    opened = tgsp.open(package, trusted_keys=[...], kek_provider=kek,
                       tenant_id=manifest.tenant_id)
    tensors = opened.torch_tensors()

Every failed check raises :class:`tensafe.common.errors.IntegrityError` whose message
starts with what failed (``signature``, ``manifest digest``, ``ciphertext chunk 3
tag``, ``wrapped key``, ``tensor 'x' sha256``, ``tenant mismatch``, ...; also in
``metadata["check"]``), or :class:`~tensafe.common.errors.InvalidArgument` for a
malformed package. No function returns weights from a package that failed any check.
"""

from tensafe.tgsp.canonical import canonical_json, parse_canonical_json
from tensafe.tgsp.kek import (
    KekProvider,
    KmsKekProvider,
    LocalFileKekProvider,
    WrappedKey,
    dek_aad,
)
from tensafe.tgsp.manifest import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    AdapterRef,
    BaseModelRef,
    ClientBatches,
    DPCertificate,
    DPGuarantee,
    LoraSpec,
    Manifest,
    NoDPGuarantee,
    PayloadInfo,
    PoissonSampling,
    Provenance,
    Sampling,
    StepGroup,
    TensorInfo,
)
from tensafe.tgsp.package import (
    MAGIC,
    Envelope,
    OpenedAdapter,
    PackageSource,
    Weights,
    decrypt_to_file,
    inspect,
    open_package,
    read_envelope,
    rewrap_to,
    signer_key_id,
    verify,
    write,
    write_to,
)
from tensafe.tgsp.payload import serialize_tensors
from tensafe.tgsp.peft_dir import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PeftAdapterDir,
    package_peft_dir,
    peft_adapter_config_text,
    read_peft_dir,
    write_peft_dir,
)
from tensafe.tgsp.signing import SigningKey, VerifyingKey, key_id_for
from tensafe.tgsp.trust import EVERY_TENANT, TrustedSigner, TrustList

open = open_package
"""Alias of :func:`open_package`: ``tensafe.tgsp.open(package, ...)``."""

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_CHUNK_SIZE",
    "EVERY_TENANT",
    "FORMAT_VERSION",
    "MAGIC",
    "AdapterRef",
    "BaseModelRef",
    "ClientBatches",
    "DPCertificate",
    "DPGuarantee",
    "Envelope",
    "KekProvider",
    "KmsKekProvider",
    "LocalFileKekProvider",
    "LoraSpec",
    "Manifest",
    "NoDPGuarantee",
    "OpenedAdapter",
    "PackageSource",
    "PayloadInfo",
    "PeftAdapterDir",
    "PoissonSampling",
    "Provenance",
    "Sampling",
    "SigningKey",
    "StepGroup",
    "TensorInfo",
    "TrustList",
    "TrustedSigner",
    "VerifyingKey",
    "Weights",
    "WrappedKey",
    "canonical_json",
    "decrypt_to_file",
    "dek_aad",
    "inspect",
    "key_id_for",
    "open",
    "open_package",
    "package_peft_dir",
    "parse_canonical_json",
    "peft_adapter_config_text",
    "read_envelope",
    "read_peft_dir",
    "rewrap_to",
    "serialize_tensors",
    "signer_key_id",
    "verify",
    "write",
    "write_peft_dir",
    "write_to",
]
