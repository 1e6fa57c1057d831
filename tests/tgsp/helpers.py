"""Shared pieces of the TGSP tests: a small adapter whose package is a few kilobytes (so
byte-by-byte sweeps stay fast), its manifest fields, and a second, independent codec of
the container written from docs/tgsp.md alone."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe import tgsp

TENANT = "tenant-a"
OTHER_TENANT = "tenant-b"
SMALL_CHUNK = 256


@dataclass
class Env:
    kek: tgsp.LocalFileKekProvider
    key: tgsp.SigningKey
    kek_dir: Path

    @property
    def trusted(self) -> list[tgsp.VerifyingKey]:
        return [self.key.verifying_key]


def make_env(root: Path) -> Env:
    kek_dir = root / "keks"
    kek_dir.mkdir(mode=0o700)
    kek = tgsp.LocalFileKekProvider(kek_dir)
    kek.create_tenant_kek(TENANT)
    kek.create_tenant_kek(OTHER_TENANT)
    return Env(kek=kek, key=tgsp.SigningKey.generate(), kek_dir=kek_dir)


def small_tensors(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
        "layers.0.q_proj.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32),
    }


def fields(
    *,
    tenant_id: str = TENANT,
    adapter_id: str = "adapter-1",
    version: str = "1",
    certificate: tgsp.DPCertificate | None = None,
) -> dict[str, Any]:
    """Manifest fields of a trainer-published adapter."""
    return {
        "adapter": tgsp.AdapterRef(adapter_id=adapter_id, version=version),
        "base_model": tgsp.BaseModelRef(model_id="tiny-llama", weights_sha256="ab" * 32),
        "lora": tgsp.LoraSpec(
            rank=4,
            alpha=8,
            dropout=0.05,
            target_modules=("v_proj", "q_proj"),
            task_type="CAUSAL_LM",
        ),
        "dp_certificate": certificate
        or tgsp.DPGuarantee(
            epsilon=2.5,
            delta=1e-5,
            accountant="rdp",
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            sampling=tgsp.PoissonSampling(rate=0.01),
            steps=120,
        ),
        "provenance": tgsp.Provenance(
            tenant_id=tenant_id,
            training_client_id="tc-7",
            code_version="0.1.0+test",
            created_at=dt.datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=dt.UTC),
        ),
    }


def small_package(env: Env, **overrides: Any) -> bytes:
    weights = overrides.pop("weights", None)
    format_version = overrides.pop("format_version", tgsp.FORMAT_VERSION)
    return tgsp.write(
        weights=small_tensors() if weights is None else weights,
        kek_provider=env.kek,
        signing_key=env.key,
        chunk_size=SMALL_CHUNK,
        format_version=format_version,
        **fields(**overrides),
    )


# --- An independent codec of the container, from docs/tgsp.md -------------------------
# It shares no code with tensafe.tgsp.package: if the library and the document drift
# apart, the tests that use it fail.

HEADER = struct.Struct(">8sHHIIQ")
TRAILER_LENGTH = 192
TAG = 16


@dataclass
class Parts:
    header: bytes
    manifest: bytes
    wrapped_key: bytes
    ciphertext: bytes
    trailer: bytes

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        start = 0
        spans = {}
        for name in ("header", "manifest", "wrapped_key", "ciphertext", "trailer"):
            size = len(getattr(self, name))
            spans[name] = (start, start + size)
            start += size
        return spans


def split(package: bytes) -> Parts:
    magic, version, flags, m_len, k_len, c_len = HEADER.unpack(package[:28])
    assert magic == b"\x89TGSP\r\n\x1a" and version in (1, 2) and flags == 0
    assert len(package) == 28 + m_len + k_len + c_len + TRAILER_LENGTH
    m0 = 28
    k0 = m0 + m_len
    c0 = k0 + k_len
    t0 = c0 + c_len
    return Parts(package[:28], package[m0:k0], package[k0:c0], package[c0:t0], package[t0:])


def signed_message(trailer_body: bytes, version: int = 2) -> bytes:
    """Version 1 signs the whole trailer body; version 2 all but the wrapped-key digest."""
    if version == 1:
        return b"tensafe.tgsp.v1.signature\x00" + trailer_body
    return b"tensafe.tgsp.v2.signature\x00" + trailer_body[:64] + trailer_body[96:128]


def assemble(
    signing_key: tgsp.SigningKey,
    *,
    manifest: bytes,
    wrapped_key: bytes,
    ciphertext: bytes,
    key_id: bytes | None = None,
    version: int | None = None,
) -> bytes:
    """Build and sign a package from its three sections, as docs/tgsp.md describes (the
    format version is the manifest's unless given)."""
    if version is None:
        version = int(json.loads(manifest)["format_version"])
    header = HEADER.pack(
        b"\x89TGSP\r\n\x1a", version, 0, len(manifest), len(wrapped_key), len(ciphertext)
    )
    public_raw = signing_key.verifying_key.to_raw()
    body = (
        (key_id or hashlib.sha256(public_raw).digest())
        + hashlib.sha256(manifest).digest()
        + hashlib.sha256(wrapped_key).digest()
        + hashlib.sha256(ciphertext).digest()
    )
    signature = signing_key.sign(signed_message(body, version))
    return header + manifest + wrapped_key + ciphertext + body + signature


def resign(package: bytes, signing_key: tgsp.SigningKey, **replace: bytes) -> bytes:
    """Re-sign a package after replacing some sections: what a malicious or buggy holder
    of a trusted key could produce."""
    parts = split(package)
    sections = {
        "manifest": parts.manifest,
        "wrapped_key": parts.wrapped_key,
        "ciphertext": parts.ciphertext,
    }
    sections.update(replace)
    return assemble(signing_key, **sections, version=HEADER.unpack(parts.header)[1])


def chunk_nonce(index: int) -> bytes:
    return b"\x00" * 4 + index.to_bytes(8, "big")


def chunk_aad(index: int, final: bool) -> bytes:
    return b"tensafe.tgsp.v1.chunk\x00" + index.to_bytes(8, "big") + bytes([final])


def encrypt_payload(dek: bytes, payload: bytes, chunk_size: int) -> bytes:
    aead = AESGCM(dek)
    pieces = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)] or [b""]
    return b"".join(
        aead.encrypt(chunk_nonce(i), piece, chunk_aad(i, i == len(pieces) - 1))
        for i, piece in enumerate(pieces)
    )


def decrypt_payload(dek: bytes, ciphertext: bytes, chunk_size: int, plaintext_size: int) -> bytes:
    aead = AESGCM(dek)
    count = max(1, -(-plaintext_size // chunk_size))
    out = []
    position = 0
    for i in range(count):
        length = min(chunk_size, plaintext_size - i * chunk_size) + TAG
        out.append(
            aead.decrypt(
                chunk_nonce(i),
                ciphertext[position : position + length],
                chunk_aad(i, i == count - 1),
            )
        )
        position += length
    assert position == len(ciphertext)
    return b"".join(out)


def dek_aad(manifest_json: dict[str, Any], manifest_bytes: bytes) -> bytes:
    # All members are ASCII here, where sorted compact JSON is RFC 8785 canonical JSON.
    version = manifest_json["format_version"]
    return json.dumps(
        {
            "adapter_id": manifest_json["adapter"]["id"],
            "adapter_version": manifest_json["adapter"]["version"],
            "format_version": version,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "purpose": f"tensafe.tgsp.v{version}.dek",
            "tenant_id": manifest_json["provenance"]["tenant_id"],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def seal(
    manifest_json: dict[str, Any],
    payload: bytes,
    *,
    kek: tgsp.KekProvider,
    signing_key: tgsp.SigningKey,
) -> bytes:
    """Write a package from a manifest JSON object that need not match the payload."""
    manifest = tgsp.canonical_json(manifest_json)
    dek = os.urandom(32)
    wrapped = kek.wrap(
        manifest_json["provenance"]["tenant_id"], dek, dek_aad(manifest_json, manifest)
    )
    ciphertext = encrypt_payload(dek, payload, manifest_json["payload"]["chunk_size"])
    return assemble(
        signing_key, manifest=manifest, wrapped_key=wrapped.canonical_bytes(), ciphertext=ciphertext
    )


def local_unwrap(kek_dir: Path, wrapped_key: bytes, manifest: bytes) -> bytes:
    """Unwrap a local-file provider's DEK from the KEK file, per docs/tgsp.md."""
    key_block = json.loads(wrapped_key)
    kek_file = json.loads((kek_dir / f"{key_block['tenant_id']}.kek").read_bytes())
    kek = base64.b64decode(kek_file["key"])
    blob = base64.b64decode(key_block["wrapped_dek"])

    def prefixed(part: bytes) -> bytes:
        return len(part).to_bytes(4, "big") + part

    aad = (
        b"tensafe.local-kek.v1.wrap\x00"
        + prefixed(key_block["tenant_id"].encode())
        + prefixed(kek_file["kek_id"].encode())
        + prefixed(dek_aad(json.loads(manifest), manifest))
    )
    return AESGCM(kek).decrypt(blob[:12], blob[12:], aad)
