"""Publish, download, open and unwrap through the real registry and auth servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe import tgsp
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.registry.domain.service import UNWRAP_AUDIT_KIND

from .conftest import Registry, acting, expect_code, flip, lora_tensors, package_fields

HEADER = struct.Struct(">8sHHIIQ")  # docs/tgsp.md §2.1


def sections(package: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of the package's sections, from the spec (not the library)."""
    _, _, _, manifest, wrapped, ciphertext = HEADER.unpack(package[:28])
    m0 = 28
    k0 = m0 + manifest
    c0 = k0 + wrapped
    t0 = c0 + ciphertext
    return {
        "manifest": (m0, k0),
        "wrapped_key": (k0, c0),
        "ciphertext": (c0, t0),
        "trailer": (t0, len(package)),
    }


async def test_round_trip_gives_bit_identical_tensors(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "support-bot", seed=3)
    published = await registry.publish(a.admin, "support-bot", package, request_id="r-1")
    assert published.version == 1
    assert published.package_sha256 == hashlib.sha256(package).hexdigest()
    assert published.size_bytes == len(package)
    assert json.loads(published.manifest_json)["provenance"]["tenant_id"] == a.tenant_id

    # A reader of the same tenant may download; the bytes are the published bytes.
    record, data = await registry.download(a.reader, "support-bot", version=1)
    assert data == package
    assert record.package_sha256 == published.package_sha256
    opened = tgsp.open(
        data,
        trusted_keys=[registry.signing_key.verifying_key],
        kek_provider=registry.kek,
        tenant_id=a.tenant_id,
    )
    expected = lora_tensors(3)
    got = opened.numpy_tensors()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype
        assert got[name].tobytes() == tensor.tobytes()


async def test_versions_increment_and_latest_is_the_default(registry: Registry) -> None:
    a = registry.tenant_a
    first = registry.package(a.tenant_id, "bot", seed=1)
    second = registry.package(a.tenant_id, "bot", seed=2, version="2")
    assert (await registry.publish(a.admin, "bot", first)).version == 1
    assert (await registry.publish(a.admin, "bot", second)).version == 2
    record, latest = await registry.download(a.reader, "bot")
    assert (record.version, latest) == (2, second)
    _, older = await registry.download(a.reader, "bot", version=1)
    assert older == first
    adapter = (
        await registry.stub.GetAdapter(pb.GetAdapterRequest(adapter_name="bot"), metadata=a.reader)
    ).adapter
    assert (adapter.name, adapter.latest_version) == ("bot", 2)


async def test_concurrent_publishes_get_distinct_versions(registry: Registry) -> None:
    a = registry.tenant_a
    packages = [registry.package(a.tenant_id, "race", seed=s) for s in range(4)]
    results = await asyncio.gather(*(registry.publish(a.admin, "race", p) for p in packages))
    assert sorted(r.version for r in results) == [1, 2, 3, 4]
    for result, package in zip(results, packages, strict=True):
        _, data = await registry.download(a.reader, "race", version=result.version)
        assert data == package


async def test_identical_uploads_store_one_object(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "same")
    first = await registry.publish(a.admin, "same", package)
    second = await registry.publish(a.admin, "same", package)
    assert (first.version, second.version) == (1, 2)
    assert first.package_sha256 == second.package_sha256
    files = registry.object_files
    assert [f.name for f in files] == [first.package_sha256]
    assert files[0].read_bytes() == package
    assert registry.staging_files == []


async def test_repeated_request_id_returns_the_first_version(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "idem")
    first = await registry.publish(a.admin, "idem", package, request_id="save-7")
    again = await registry.publish(a.admin, "idem", package, request_id="save-7")
    assert again.version == first.version == 1
    versions = await registry.stub.ListVersions(
        pb.ListVersionsRequest(adapter_name="idem"), metadata=a.reader
    )
    assert [v.version for v in versions.versions] == [1]
    other = registry.package(a.tenant_id, "idem", seed=9)
    error = await expect_code(
        registry.publish(a.admin, "idem", other, request_id="save-7"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "request_id" in (error.details() or "")


async def test_tampered_uploads_are_refused_naming_the_check(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "tamper")
    spans = sections(package)
    cases = {
        "manifest digest": spans["manifest"][0] + 10,
        "wrapped key digest": spans["wrapped_key"][0] + 5,
        "ciphertext digest": spans["ciphertext"][0] + 100,
        "unknown signer": spans["trailer"][0] + 3,
        "signature": spans["trailer"][1] - 1,
    }
    for check, offset in cases.items():
        error = await expect_code(
            registry.publish(a.admin, "tamper", flip(package, offset)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert (error.details() or "").startswith(check), (check, error.details())
    # Nothing was stored: no object, no staging leftovers, no adapter, no version.
    assert registry.object_files == []
    assert registry.staging_files == []
    listed = await registry.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=a.reader)
    assert list(listed.adapters) == []
    # The untouched package is accepted afterwards.
    assert (await registry.publish(a.admin, "tamper", package)).version == 1


async def test_replay_under_another_tenant_is_refused(registry: Registry) -> None:
    a, b = registry.tenant_a, registry.tenant_b
    package = registry.package(a.tenant_id, "stolen")
    error = await expect_code(
        registry.publish(b.admin, "stolen", package), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (error.details() or "").startswith("tenant mismatch")
    assert registry.object_files == []


async def test_unknown_signer_is_refused(registry: Registry) -> None:
    a = registry.tenant_a
    stranger = tgsp.SigningKey.generate()
    package = registry.package(a.tenant_id, "rogue", signing_key=stranger)
    error = await expect_code(
        registry.publish(a.admin, "rogue", package), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (error.details() or "").startswith("unknown signer")
    assert registry.object_files == []


async def test_name_must_match_the_sealed_adapter(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "alpha")
    error = await expect_code(
        registry.publish(a.admin, "beta", package), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "adapter name mismatch" in (error.details() or "")
    assert registry.object_files == []


async def test_package_wrapped_under_a_foreign_kek_is_refused(registry: Registry) -> None:
    a = registry.tenant_a
    foreign_dir = registry.config.data_dir / "foreign-keks"
    foreign_dir.mkdir(mode=0o700)
    foreign = tgsp.LocalFileKekProvider(foreign_dir)
    foreign.create_tenant_kek(a.tenant_id)
    package = tgsp.write(
        weights=lora_tensors(0),
        kek_provider=foreign,
        signing_key=registry.signing_key,
        **package_fields(a.tenant_id, "foreign"),
    )
    error = await expect_code(
        registry.publish(a.admin, "foreign", package), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (error.details() or "").startswith("wrapped key")
    assert registry.object_files == []


async def test_download_verifies_the_stored_object_again(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "rot")
    published = await registry.publish(a.admin, "rot", package)
    (stored,) = registry.object_files
    stored.chmod(0o600)
    stored.write_bytes(flip(package, sections(package)["ciphertext"][0] + 1))
    received: list[pb.DownloadAdapterResponse] = []
    call = registry.stub.DownloadAdapter(
        pb.DownloadAdapterRequest(adapter_name="rot", version=published.version),
        metadata=a.reader,
    )
    try:
        async for part in call:
            received.append(part)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (error.details() or "").startswith("ciphertext digest")
    else:
        raise AssertionError("a damaged object was served")
    assert received == []  # not one byte left before verification
    await expect_code(
        registry.stub.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(adapter_name="rot", version=1), metadata=a.reader
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert UNWRAP_AUDIT_KIND not in registry.audit.kinds()


def decrypt_first_chunk(package: bytes, data_key: bytes) -> bytes:
    """Decrypt chunk 0 per docs/tgsp.md §6 (independently of the library)."""
    manifest_range = sections(package)["manifest"]
    manifest = json.loads(package[manifest_range[0] : manifest_range[1]])
    chunk_size = manifest["payload"]["chunk_size"]
    plaintext_size = manifest["payload"]["plaintext_size"]
    final = plaintext_size <= chunk_size
    start = sections(package)["ciphertext"][0]
    sealed = package[start : start + min(chunk_size, plaintext_size) + 16]
    nonce = b"\x00" * 4 + struct.pack(">Q", 0)
    aad = b"tensafe.tgsp.v1.chunk\x00" + struct.pack(">QB", 0, 1 if final else 0)
    return AESGCM(data_key).decrypt(nonce, sealed, aad)


async def test_unwrap_for_the_owning_tenant_is_audited(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "keyed", seed=5)
    await registry.publish(a.admin, "keyed", package)
    response = await registry.stub.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(adapter_name="keyed", version=1), metadata=a.reader
    )
    assert len(response.data_key) == 32
    plaintext = decrypt_first_chunk(package, response.data_key)
    (header_length,) = struct.unpack("<Q", plaintext[:8])  # safetensors header
    header = json.loads(plaintext[8 : 8 + header_length])
    assert set(lora_tensors(5)) <= set(header)
    events = [r for r in registry.audit.records if r.kind == UNWRAP_AUDIT_KIND]
    assert len(events) == 1
    event = events[0]
    assert (event.tenant_id, event.principal_id) == (a.tenant_id, a.reader_id)
    assert event.payload["adapter_name"] == "keyed" and event.payload["version"] == 1
    assert event.payload["acting_for_tenant"] is False


async def test_platform_service_acts_for_a_tenant_only_through_the_header(
    registry: Registry,
) -> None:
    a, b = registry.tenant_a, registry.tenant_b
    package = registry.package(a.tenant_id, "served", seed=6)
    await registry.publish(a.admin, "served", package)
    request = pb.UnwrapDataKeyRequest(adapter_name="served", version=1)
    # The HE runtime's service account, acting for tenant A.
    key = (
        await registry.stub.UnwrapDataKey(
            request, metadata=acting(registry.he_runtime, a.tenant_id)
        )
    ).data_key
    assert decrypt_first_chunk(package, key)
    event = [r for r in registry.audit.records if r.kind == UNWRAP_AUDIT_KIND][-1]
    assert event.tenant_id == a.tenant_id
    assert event.principal_id == registry.he_runtime_principal
    assert event.payload["acting_for_tenant"] is True
    _, data = await registry.download(acting(registry.he_runtime, a.tenant_id), "served", version=1)
    assert data == package
    # Without the header the service sees its own (platform) tenant: nothing there.
    await expect_code(
        registry.stub.UnwrapDataKey(request, metadata=registry.he_runtime),
        grpc.StatusCode.NOT_FOUND,
    )
    # Acting for tenant B finds nothing of A's.
    await expect_code(
        registry.stub.UnwrapDataKey(request, metadata=acting(registry.he_runtime, b.tenant_id)),
        grpc.StatusCode.NOT_FOUND,
    )
    # A tenant's admin and the platform's own admin may not use the header.
    for metadata in (b.admin, registry.root):
        await expect_code(
            registry.stub.UnwrapDataKey(request, metadata=acting(metadata, a.tenant_id)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    # The acting service may not delete.
    await expect_code(
        registry.stub.DeleteAdapter(
            pb.DeleteAdapterRequest(adapter_name="served"),
            metadata=acting(registry.he_runtime, a.tenant_id),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    denied = [r for r in registry.audit.records if r.kind == "permission.denied"]
    assert len(denied) == 3
    unwraps = [r for r in registry.audit.records if r.kind == UNWRAP_AUDIT_KIND]
    assert len(unwraps) == 1


async def test_signing_keys_let_a_third_party_verify(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "public")
    await registry.publish(a.admin, "public", package)
    keys = (await registry.stub.GetSigningKeys(pb.GetSigningKeysRequest(), metadata=a.reader)).keys
    assert [k.key_id for k in keys] == [registry.signing_key.key_id]
    assert keys[0].public_key == registry.signing_key.verifying_key.to_raw()
    assert keys[0].key_id == hashlib.sha256(keys[0].public_key).hexdigest()
    _, data = await registry.download(a.reader, "public", version=1)
    verifier = tgsp.VerifyingKey.from_raw(keys[0].public_key)
    manifest = tgsp.verify(data, trusted_keys=[verifier], expected_tenant=a.tenant_id)
    assert manifest.adapter.adapter_id == "public"
