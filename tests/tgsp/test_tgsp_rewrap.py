"""Format version 2 and re-wrapping: a package re-wrapped under a new KEK version keeps
its signature and opens; version-1 packages are still read but cannot be re-wrapped."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from tensafe import tgsp
from tensafe.common.errors import FailedPrecondition, IntegrityError

from .helpers import TENANT, Env, small_package, small_tensors, split


def open_small(env: Env, package: bytes) -> tgsp.OpenedAdapter:
    return tgsp.open(package, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT)


def rewrap(env: Env, package: bytes) -> bytes:
    out = io.BytesIO()
    tgsp.rewrap_to(
        io.BytesIO(package), out, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT
    )
    return out.getvalue()


def test_a_rewrapped_package_keeps_its_signature_and_opens_after_the_old_kek_is_gone(
    env: Env,
) -> None:
    package = small_package(env)
    old_kek = env.kek.tenant_kek_ids(TENANT)[0]
    assert tgsp.read_envelope(package).wrapped_key.kek_id == old_kek
    new_kek = env.kek.rotate_tenant_kek(TENANT)
    rewrapped = rewrap(env, package)
    before, after = split(package), split(rewrapped)
    # Manifest, ciphertext and the signature itself are byte for byte the same.
    assert (after.manifest, after.ciphertext) == (before.manifest, before.ciphertext)
    assert after.trailer[128:] == before.trailer[128:]
    assert after.trailer[:64] == before.trailer[:64]
    assert after.trailer[96:] == before.trailer[96:]
    assert after.wrapped_key != before.wrapped_key
    envelope = tgsp.read_envelope(rewrapped)
    assert (envelope.format_version, envelope.wrapped_key.kek_id) == (2, new_kek)
    env.kek.destroy_tenant_kek(TENANT, old_kek)
    opened = open_small(env, rewrapped)
    assert all(
        opened.numpy_tensors()[name].tobytes() == tensor.tobytes()
        for name, tensor in small_tensors().items()
    )
    with pytest.raises(IntegrityError, match="wrapped key"):
        open_small(env, package)  # the old wrapping needs the destroyed KEK


def test_a_wrapped_key_swapped_in_with_a_fixed_checksum_is_refused(env: Env) -> None:
    """The unsigned checksum is not what protects the wrapped key: its AEAD binding is."""
    first, second = small_package(env), small_package(env, adapter_id="adapter-2")
    a, b = split(first), split(second)
    header = bytearray(a.header)
    header[16:20] = len(b.wrapped_key).to_bytes(4, "big")
    trailer = a.trailer[:64] + hashlib.sha256(b.wrapped_key).digest() + a.trailer[96:]
    spliced = bytes(header) + a.manifest + b.wrapped_key + a.ciphertext + trailer
    tgsp.verify(spliced, trusted_keys=env.trusted)  # the signature still holds ...
    with pytest.raises(IntegrityError, match="wrapped key: does not authenticate"):
        open_small(env, spliced)  # ... but the key was wrapped for another manifest


def test_version_1_packages_are_still_read_but_not_rewrapped(env: Env) -> None:
    package = small_package(env, format_version=1)
    assert package[8:10] == b"\x00\x01"
    assert json.loads(split(package).manifest)["format_version"] == 1
    manifest = tgsp.verify(package, trusted_keys=env.trusted, expected_tenant=TENANT)
    assert manifest.format_version == 1
    assert open_small(env, package).manifest == manifest
    # Its signature covers the wrapped key: editing the checksum breaks the signature.
    parts = split(package)
    broken = package[: -len(parts.trailer)] + parts.trailer[:64] + b"\x00" * 32 + parts.trailer[96:]
    with pytest.raises(IntegrityError, match="signature"):
        tgsp.verify(broken, trusted_keys=env.trusted)
    env.kek.rotate_tenant_kek(TENANT)
    with pytest.raises(FailedPrecondition, match="format version 1"):
        rewrap(env, package)
    assert open_small(env, package).manifest == manifest  # the old KEK version still opens it
