"""The PKCS#11 KEK provider against a real SoftHSM2 token (a fresh token per test)."""

from __future__ import annotations

import dataclasses
import hashlib

import pkcs11
import pytest
from pkcs11 import Attribute, Mechanism

from tensafe import tgsp
from tensafe.common.errors import ConfigError, FailedPrecondition, IntegrityError, NotFound
from tensafe.tgsp.hsm import Pkcs11KekProvider
from testkit.softhsm import SoftHsmToken

from .helpers import OTHER_TENANT, SMALL_CHUNK, TENANT, fields, small_tensors

AAD = b"package-binding"


@pytest.fixture
def hsm(softhsm: SoftHsmToken) -> Pkcs11KekProvider:
    provider = Pkcs11KekProvider(module=softhsm.module, token_label=softhsm.label, pin=softhsm.pin)
    provider.create_tenant_kek(TENANT)
    yield provider  # type: ignore[misc]
    provider.close()


def test_packages_seal_verify_and_open_through_the_token(hsm: Pkcs11KekProvider) -> None:
    key = tgsp.SigningKey.generate()
    tensors = small_tensors(3)
    package = tgsp.write(
        weights=tensors, kek_provider=hsm, signing_key=key, chunk_size=SMALL_CHUNK, **fields()
    )
    manifest = tgsp.verify(package, trusted_keys=[key.verifying_key], expected_tenant=TENANT)
    assert manifest.tenant_id == TENANT
    opened = tgsp.open(
        package, trusted_keys=[key.verifying_key], kek_provider=hsm, tenant_id=TENANT
    )
    for name, tensor in tensors.items():
        assert opened.numpy_tensors()[name].tobytes() == tensor.tobytes()
    # The wrapped key names the token provider and the KEK object's id.
    wrapped = wrapped_key_of(package)
    assert (wrapped.provider, wrapped.algorithm) == ("pkcs11", "AES-256-GCM")
    assert wrapped.kek_id == hsm.tenant_kek_ids(TENANT)[0]


def wrapped_key_of(package: bytes) -> tgsp.WrappedKey:
    """The wrapped-key section, located by the header's lengths (docs/tgsp.md §2.1)."""
    manifest_length = int.from_bytes(package[12:16], "big")
    wrapped_length = int.from_bytes(package[16:20], "big")
    start = 28 + manifest_length
    return tgsp.WrappedKey.from_canonical_bytes(package[start : start + wrapped_length])


def test_the_kek_cannot_be_read_or_exported(hsm: Pkcs11KekProvider) -> None:
    kek = hsm.kek_object(TENANT, hsm.tenant_kek_ids(TENANT)[0])
    assert kek[Attribute.SENSITIVE] is True
    assert kek[Attribute.EXTRACTABLE] is False
    assert kek[Attribute.NEVER_EXTRACTABLE] is True
    assert kek[Attribute.LOCAL] is True  # generated inside the token, never imported
    with pytest.raises(pkcs11.AttributeSensitive):
        kek[Attribute.VALUE]
    # CKR_ACTION_PROHIBITED (0x1b): the KEK is CKA_MODIFIABLE=false as well.
    with pytest.raises(pkcs11.PKCS11Error):
        kek[Attribute.EXTRACTABLE] = True
    assert kek[Attribute.EXTRACTABLE] is False
    # Nor can it be wrapped out under a key the attacker controls.
    session = kek.session
    export_key = session.generate_key(
        pkcs11.KeyType.AES, 256, template={Attribute.WRAP: True, Attribute.TOKEN: False}
    )
    with pytest.raises((pkcs11.KeyUnextractable, pkcs11.KeyNotWrappable)):
        export_key.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_a_wrapped_key_unwraps_only_with_its_binding(hsm: Pkcs11KekProvider) -> None:
    dek = hashlib.sha256(b"dek").digest()
    wrapped = hsm.wrap(TENANT, dek, AAD)
    assert hsm.unwrap(TENANT, wrapped, AAD) == dek
    with pytest.raises(IntegrityError, match="wrapped key: does not authenticate"):
        hsm.unwrap(TENANT, wrapped, AAD + b"x")
    edited = bytearray(wrapped.ciphertext)
    edited[20] ^= 1
    with pytest.raises(IntegrityError, match="wrapped key"):
        hsm.unwrap(TENANT, dataclasses.replace(wrapped, ciphertext=bytes(edited)), AAD)
    with pytest.raises(IntegrityError, match="tenant mismatch"):
        hsm.unwrap(OTHER_TENANT, wrapped, AAD)
    with pytest.raises(NotFound):
        hsm.wrap(OTHER_TENANT, dek, AAD)  # no KEK is ever created implicitly


def test_versions_rotate_and_only_old_ones_can_be_destroyed(hsm: Pkcs11KekProvider) -> None:
    dek = hashlib.sha256(b"dek").digest()
    old_wrapped = hsm.wrap(TENANT, dek, AAD)
    first = hsm.tenant_kek_ids(TENANT)[0]
    second = hsm.rotate_tenant_kek(TENANT)
    assert hsm.tenant_kek_ids(TENANT) == [first, second]
    assert hsm.wrap(TENANT, dek, AAD).kek_id == second
    assert hsm.unwrap(TENANT, old_wrapped, AAD) == dek  # the old version still unwraps
    with pytest.raises(FailedPrecondition, match="current KEK"):
        hsm.destroy_tenant_kek(TENANT, second)
    hsm.destroy_tenant_kek(TENANT, first)
    assert hsm.tenant_kek_ids(TENANT) == [second]
    with pytest.raises(IntegrityError, match="destroyed version"):
        hsm.unwrap(TENANT, old_wrapped, AAD)


def test_a_wrong_token_label_or_pin_is_a_config_error(softhsm: SoftHsmToken) -> None:
    with pytest.raises(ConfigError) as info:
        Pkcs11KekProvider(
            module=softhsm.module,
            token_label="nope",
            pin=softhsm.pin,
            setting_names=("M", "L", "P"),
        )
    assert info.value.setting == "L"
    with pytest.raises(ConfigError) as info:
        Pkcs11KekProvider(
            module=softhsm.module,
            token_label=softhsm.label,
            pin="0000",
            setting_names=("M", "L", "P"),
        )
    assert info.value.setting == "P"
    with pytest.raises(ConfigError) as info:
        Pkcs11KekProvider(
            module=softhsm.conf,
            token_label=softhsm.label,
            pin=softhsm.pin,
            setting_names=("M", "L", "P"),
        )
    assert info.value.setting == "M"
