"""The parts of TGSP: canonical JSON, the manifest schema and the KEK providers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe import tgsp
from tensafe.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
)
from tensafe.tgsp.kek import integrity_failure

from .helpers import OTHER_TENANT, TENANT, Env, fields, small_package, split

# ------------------------------------------------------------------------ canonical JSON


@pytest.mark.parametrize(
    ("number", "text"),
    [
        # ECMAScript Number.prototype.toString, as RFC 8785 §3.2.2.3 and its Appendix B.
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (16.0, "16"),
        (0.1, "0.1"),
        (1e-5, "0.00001"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (123456789012345680000.0, "123456789012345680000"),
        (1e21, "1e+21"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (-1.5e-9, "-1.5e-9"),
        (333333333.3333333, "333333333.3333333"),
        (2**53 - 1, "9007199254740991"),
    ],
)
def test_numbers_print_as_ecmascript_does(number: float, text: str) -> None:
    assert tgsp.canonical_json(number) == text.encode()


def test_members_sort_by_utf16_code_units_and_strings_escape_minimally() -> None:
    value = {"\u20ac": 1, "\U0001f600": 2, "\ufb01": 3, "a": ['\n\x1f"\\', "é\u2028"]}
    assert tgsp.canonical_json(value) == (
        '{"a":["\\n\\u001f\\"\\\\","é\u2028"],"\u20ac":1,"\U0001f600":2,"\ufb01":3}'
    ).encode("utf-8")


def test_non_canonical_spellings_and_unencodable_values_are_refused() -> None:
    for text in (
        b'{"b":1,"a":2}',
        b'{"a": 1}',
        b'{"a":1.0}',
        b'{"a":1,"a":1}',
        b'{"a":NaN}',
        b'"\\u0041"',
        b"\xff",
        b"[1,]",
    ):
        with pytest.raises(InvalidArgument):
            tgsp.parse_canonical_json(text, field="x")
    assert tgsp.parse_canonical_json(b'{"a":[1,0.5,"x"],"b":null}', field="x") == {
        "a": [1, 0.5, "x"],
        "b": None,
    }
    for value in (float("nan"), float("inf"), 2**53, {1: "x"}, "\ud800", b"bytes"):
        with pytest.raises(InvalidArgument):
            tgsp.canonical_json(value)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- manifest


def sample_manifest(certificate: tgsp.DPCertificate) -> tgsp.Manifest:
    values = fields(certificate=certificate)
    return tgsp.Manifest(
        tensors={"w": tgsp.TensorInfo(dtype="F32", shape=(2, 3), sha256="ef" * 32)},
        payload=tgsp.PayloadInfo(chunk_size=1 << 20, plaintext_size=100),
        **values,
    )


@pytest.mark.parametrize(
    "certificate",
    [
        tgsp.DPGuarantee(
            epsilon=5.632,
            delta=1e-5,
            accountant="rdp",
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            sampling=tgsp.PoissonSampling(rate=0.01),
            steps=10_000,
        ),
        tgsp.DPGuarantee(
            epsilon=8.0,
            delta=1e-6,
            accountant="pld",
            noise_multiplier=0.8,
            max_grad_norm=0.1,
            sampling=tgsp.ClientBatches(),
            steps=3,
            assumptions=("each example at most once per step",),
        ),
        tgsp.NoDPGuarantee.imported(),
    ],
)
def test_manifest_round_trips_through_its_canonical_bytes(
    certificate: tgsp.DPCertificate,
) -> None:
    manifest = sample_manifest(certificate)
    data = manifest.canonical_bytes()
    assert tgsp.Manifest.from_canonical_bytes(data) == manifest
    assert json.loads(data)["provenance"]["created_at"] == "2026-03-01T12:30:05.123456Z"


def test_manifest_json_states_the_certificate_plainly() -> None:
    imported = json.loads(sample_manifest(tgsp.NoDPGuarantee.imported()).canonical_bytes())
    assert imported["dp_certificate"] == {
        "guarantee": "none",
        "reason": tgsp.NoDPGuarantee.IMPORTED_REASON,
    }
    client = json.loads(
        sample_manifest(
            tgsp.DPGuarantee(
                epsilon=1,
                delta=0,
                accountant="rdp",
                noise_multiplier=2,
                max_grad_norm=1,
                sampling=tgsp.ClientBatches(),
                steps=1,
            )
        ).canonical_bytes()
    )
    assert client["dp_certificate"]["sampling"] == {"method": "client_batches"}
    assert client["lora"]["target_modules"] == ["q_proj", "v_proj"]  # sorted


def test_manifest_refuses_unknown_missing_and_denormalised_members() -> None:
    value = sample_manifest(tgsp.NoDPGuarantee.imported()).to_json()
    cases = {
        "manifest.extra": {**value, "extra": 1},
        "provenance.tenant_id": {
            **value,
            "provenance": {k: v for k, v in value["provenance"].items() if k != "tenant_id"},
        },
        "manifest.format_version": {**value, "format_version": 3},
        "lora.target_modules": {**value, "lora": {**value["lora"], "target_modules": []}},
        "dp_certificate.guarantee": {**value, "dp_certificate": {"guarantee": "maybe"}},
        "payload.aead": {**value, "payload": {**value["payload"], "aead": "AES-128-GCM"}},
    }
    for field, broken in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            tgsp.Manifest.from_canonical_bytes(tgsp.canonical_json(broken))
        assert caught.value.field == field
    unsorted = {**value, "lora": {**value["lora"], "target_modules": ["v_proj", "q_proj"]}}
    with pytest.raises(InvalidArgument) as caught:
        tgsp.Manifest.from_canonical_bytes(tgsp.canonical_json(unsorted))
    assert "normal form" in caught.value.message


def test_manifest_fields_are_validated() -> None:
    dp = {
        "epsilon": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sampling": tgsp.ClientBatches(),
        "steps": 1,
    }
    bad = [
        ("dp_certificate.epsilon", lambda: tgsp.DPGuarantee(**{**dp, "epsilon": -1.0})),
        ("dp_certificate.delta", lambda: tgsp.DPGuarantee(**{**dp, "delta": 1.0})),
        (
            "dp_certificate.noise_multiplier",
            lambda: tgsp.DPGuarantee(**{**dp, "noise_multiplier": 0.0}),
        ),
        ("dp_certificate.accountant", lambda: tgsp.DPGuarantee(**{**dp, "accountant": "R D P"})),
        ("dp_certificate.sampling.rate", lambda: tgsp.PoissonSampling(rate=1.5)),
        ("lora.rank", lambda: tgsp.LoraSpec(rank=0, alpha=1, dropout=0, target_modules=("q",))),
        (
            "lora.target_modules",
            lambda: tgsp.LoraSpec(rank=1, alpha=1, dropout=0, target_modules=("q", "q")),
        ),
        (
            "provenance.created_at",
            lambda: tgsp.Provenance(
                tenant_id="t",
                training_client_id=None,
                code_version="1",
                created_at=dt.datetime(2026, 1, 1),
            ),
        ),
        (
            "base_model.weights_sha256",
            lambda: tgsp.BaseModelRef(model_id="m", weights_sha256="AB" * 32),
        ),
        ("adapter.id", lambda: tgsp.AdapterRef(adapter_id="a\nb", version="1")),
        ("payload.chunk_size", lambda: tgsp.PayloadInfo(chunk_size=16, plaintext_size=1)),
    ]
    for field, build in bad:
        with pytest.raises(InvalidArgument) as caught:
            build()
        assert caught.value.field == field


def test_bad_weights_are_refused_before_anything_is_written(env: Env) -> None:
    import numpy as np
    import torch

    cases = {
        "weights": {},
        "weights.x": {"x": [1.0, 2.0]},
    }
    for field, weights in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            small_package(env, weights=weights)
        assert caught.value.field == field
    with pytest.raises(InvalidArgument):
        small_package(env, weights={"a": np.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(InvalidArgument):
        small_package(env, weights=b"\x08\x00\x00\x00\x00\x00\x00\x00not json")


# ----------------------------------------------------------------------- KEK providers


def test_local_kek_files_are_created_only_explicitly_with_mode_0600(env: Env) -> None:
    path = env.kek_dir / f"{TENANT}.kek"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(AlreadyExists):
        env.kek.create_tenant_kek(TENANT)
    with pytest.raises(NotFound):
        env.kek.unwrap(
            "tenant-c",
            tgsp.WrappedKey(
                provider="local-file",
                kek_id="x",
                tenant_id="tenant-c",
                algorithm="AES-256-GCM",
                ciphertext=b"x" * 60,
            ),
            b"",
        )
    assert not (env.kek_dir / "tenant-c.kek").exists()
    for bad in ("../escape", "", ".hidden", "a/b", "x" * 200):
        with pytest.raises(InvalidArgument):
            env.kek.create_tenant_kek(bad)
    with pytest.raises(FailedPrecondition):
        tgsp.LocalFileKekProvider(env.kek_dir / "absent")


def test_local_kek_file_open_to_others_is_refused(env: Env) -> None:
    path = env.kek_dir / f"{TENANT}.kek"
    os.chmod(path, 0o644)
    with pytest.raises(FailedPrecondition) as caught:
        env.kek.wrap(TENANT, b"k" * 32, b"aad")
    assert "0644" in caught.value.message


def test_local_kek_binds_tenant_and_aad(env: Env) -> None:
    dek = os.urandom(32)
    wrapped = env.kek.wrap(TENANT, dek, b"aad-1")
    assert env.kek.unwrap(TENANT, wrapped, b"aad-1") == dek
    assert dek not in wrapped.ciphertext

    with pytest.raises(IntegrityError) as caught:
        env.kek.unwrap(TENANT, wrapped, b"aad-2")
    assert caught.value.metadata["check"] == "wrapped key"
    with pytest.raises(IntegrityError) as caught:
        env.kek.unwrap(OTHER_TENANT, wrapped, b"aad-1")
    assert caught.value.metadata["check"] == "tenant mismatch"
    relabelled = dataclasses.replace(wrapped, tenant_id=OTHER_TENANT)
    with pytest.raises(IntegrityError) as caught:
        env.kek.unwrap(OTHER_TENANT, relabelled, b"aad-1")
    assert caught.value.metadata["check"] == "wrapped key"
    # Flip a bit of the last byte: setting it to a constant is no edit when it already was that.
    last = wrapped.ciphertext[-1] ^ 0x01
    edited = dataclasses.replace(wrapped, ciphertext=wrapped.ciphertext[:-1] + bytes([last]))
    with pytest.raises(IntegrityError):
        env.kek.unwrap(TENANT, edited, b"aad-1")


def test_wrapped_key_section_is_canonical_json(env: Env) -> None:
    section = split(small_package(env)).wrapped_key
    wrapped = tgsp.WrappedKey.from_canonical_bytes(section)
    assert wrapped.canonical_bytes() == section
    assert set(json.loads(section)) == {
        "algorithm",
        "kek_id",
        "provider",
        "tenant_id",
        "wrapped_dek",
    }
    with pytest.raises(InvalidArgument):
        tgsp.WrappedKey.from_canonical_bytes(section.replace(b'"provider"', b'"Provider"'))


class AesKeyService(tgsp.KmsKekProvider):
    """A KmsKekProvider whose 'service' is an AES-GCM key table in this process: enough
    to exercise the base class's tenant binding and bookkeeping with real cryptography."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self._keys = keys

    @property
    def provider_id(self) -> str:
        return "test-aes-service"

    def key_reference(self, tenant_id: str) -> str:
        if tenant_id not in self._keys:
            raise NotFound(f"no KMS key for {tenant_id}")
        return f"keys/{tenant_id}"

    def kms_encrypt(self, *, key_reference: str, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        key = self._keys[key_reference.removeprefix("keys/")]
        return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)

    def kms_decrypt(
        self, *, key_reference: str, ciphertext: bytes, associated_data: bytes
    ) -> bytes:
        key = self._keys[key_reference.removeprefix("keys/")]
        try:
            return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated_data)
        except InvalidTag as exc:
            raise integrity_failure("wrapped key", "the KMS refused it") from exc


def test_kms_provider_shape_binds_tenant_and_aad(env: Env, tmp_path: Path) -> None:
    service = AesKeyService({TENANT: os.urandom(32), OTHER_TENANT: os.urandom(32)})
    dek = os.urandom(32)
    wrapped = service.wrap(TENANT, dek, b"aad")
    assert wrapped.kek_id == f"keys/{TENANT}" and wrapped.provider == "test-aes-service"
    assert service.unwrap(TENANT, wrapped, b"aad") == dek
    with pytest.raises(IntegrityError):
        service.unwrap(TENANT, wrapped, b"other aad")
    with pytest.raises(IntegrityError) as caught:
        service.unwrap(OTHER_TENANT, wrapped, b"aad")
    assert caught.value.metadata["check"] == "tenant mismatch"
    with pytest.raises(IntegrityError) as caught:
        env.kek.unwrap(TENANT, wrapped, b"aad")  # another provider's key
    assert caught.value.metadata["check"] == "wrapped key"

    # A whole package under the KMS-shaped provider.
    package = tgsp.write(
        weights=small_package_weights(), kek_provider=service, signing_key=env.key, **fields()
    )
    opened = tgsp.open(package, trusted_keys=env.trusted, kek_provider=service, tenant_id=TENANT)
    assert set(opened.manifest.tensors) == set(small_package_weights())


def small_package_weights() -> dict[str, object]:
    from .helpers import small_tensors

    return dict(small_tensors())


def test_local_kek_symlink_or_corrupt_file_is_refused(env: Env, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.kek"
    os.replace(env.kek_dir / f"{TENANT}.kek", elsewhere)
    (env.kek_dir / f"{TENANT}.kek").symlink_to(elsewhere)
    with pytest.raises(FailedPrecondition):
        env.kek.wrap(TENANT, b"k" * 32, b"aad")

    corrupt = env.kek_dir / f"{OTHER_TENANT}.kek"
    corrupt.write_bytes(b'{"format":"tensafe.local-kek.v1"}')
    with pytest.raises(FailedPrecondition) as caught:
        env.kek.wrap(OTHER_TENANT, b"k" * 32, b"aad")
    assert "corrupt" in caught.value.message
