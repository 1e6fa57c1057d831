"""TGSP packages: round trips, and rejection of every kind of damage with a named check."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tensafe import tgsp
from tensafe.common.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound

from .helpers import (
    OTHER_TENANT,
    SMALL_CHUNK,
    TENANT,
    Env,
    decrypt_payload,
    encrypt_payload,
    fields,
    local_unwrap,
    resign,
    seal,
    signed_message,
    small_package,
    small_tensors,
    split,
)


def check_of(error: IntegrityError) -> str:
    return error.metadata["check"]


def open_small(env: Env, package: bytes, tenant_id: str = TENANT) -> tgsp.OpenedAdapter:
    return tgsp.open(package, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=tenant_id)


class OneWayStream(io.RawIOBase):
    """A readable stream that cannot seek, like a socket or pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # Short reads on purpose (at most 1000 bytes), as sockets give.
        size = min(len(buffer), len(self._data) - self._position, 1000)
        buffer[:size] = self._data[self._position : self._position + size]
        self._position += size
        return size


# ------------------------------------------------------------------------- round trips


def test_round_trip_numpy_is_bit_identical(env: Env) -> None:
    tensors = small_tensors()
    tensors["scale"] = np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32)
    tensors["steps"] = np.arange(-3, 3, dtype=np.int64).reshape(2, 3)
    tensors["empty"] = np.zeros((0, 5), dtype=np.float16)
    package = small_package(env, weights=tensors)

    opened = open_small(env, package)

    got = opened.numpy_tensors()
    assert set(got) == set(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert got[name].tobytes() == array.tobytes(), name
    assert opened.signer_key_id == env.key.key_id
    assert (
        opened.manifest.tensors["scale"].sha256
        == hashlib.sha256(tensors["scale"].tobytes()).hexdigest()
    )


def test_round_trip_torch_bfloat16_is_bit_identical(env: Env) -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "a.lora_A.weight": torch.randn(16, 64, generator=generator).to(torch.bfloat16),
        "a.lora_B.weight": torch.randn(64, 16, generator=generator).to(torch.bfloat16).T,
    }  # the transposed one is not contiguous: write must cope
    package = tgsp.write(weights=tensors, kek_provider=env.kek, signing_key=env.key, **fields())

    got = open_small(env, package).torch_tensors()

    for name, tensor in tensors.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), tensor.contiguous().view(torch.int16))


def test_safetensors_bytes_are_kept_byte_for_byte_and_manifest_describes_them(env: Env) -> None:
    from safetensors.numpy import save

    payload = save(small_tensors(3), metadata={"note": "kept"})
    package = small_package(env, weights=payload)

    opened = open_small(env, package)
    manifest = tgsp.verify(package, trusted_keys=env.trusted, expected_tenant=TENANT)

    assert bytes(opened.payload) == payload
    assert opened.layout.metadata == {"note": "kept"}
    assert manifest == opened.manifest == tgsp.inspect(package)
    assert manifest.payload.plaintext_size == len(payload)
    assert manifest.payload.chunk_count == -(-len(payload) // SMALL_CHUNK) > 1
    assert manifest.tensors["layers.0.q_proj.lora_A.weight"].shape == (4, 16)


def test_write_to_path_and_streams_all_verify_and_open(env: Env, tmp_path: Path) -> None:
    out_dir = tmp_path / "packages"
    out_dir.mkdir()
    path = out_dir / "adapter.tgsp"
    size = tgsp.write_to(
        path,
        weights=small_tensors(),
        kek_provider=env.kek,
        signing_key=env.key,
        chunk_size=SMALL_CHUNK,
        **fields(),
    )
    data = path.read_bytes()
    assert size == len(data)
    assert [p.name for p in out_dir.iterdir()] == ["adapter.tgsp"]  # no temporary left

    for source in (path, io.BytesIO(data), io.BufferedReader(OneWayStream(data)), data):
        assert tgsp.verify(source, trusted_keys=env.trusted).adapter.adapter_id == "adapter-1"
    for source in (path, io.BufferedReader(OneWayStream(data))):
        assert tgsp.inspect(source).provenance.training_client_id == "tc-7"
    assert tgsp.signer_key_id(path) == env.key.key_id

    out = tmp_path / "weights.safetensors"
    manifest = tgsp.decrypt_to_file(
        path, out, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT
    )
    assert out.read_bytes() == bytes(open_small(env, data).payload)
    assert manifest == tgsp.inspect(data)


def test_weights_from_a_path_give_the_same_package_contents(env: Env, tmp_path: Path) -> None:
    from safetensors.numpy import save

    from tensafe.tgsp.package import _FilePlaintext

    payload = save(small_tensors(5), metadata={"format": "pt"})
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(payload)
    from_path = tgsp.write(
        weights=path,
        kek_provider=env.kek,
        signing_key=env.key,
        chunk_size=SMALL_CHUNK,
        **fields(),
    )
    from_bytes = small_package(env, weights=payload)
    assert split(from_path).manifest == split(from_bytes).manifest
    assert bytes(open_small(env, from_path).payload) == payload

    # A file rewritten between the hashing pass and the encrypting pass is refused.
    source = _FilePlaintext(path)
    try:
        source.scan()
        path.write_bytes(save(small_tensors(6), metadata={"format": "pt"}))
        os.utime(path, ns=(1, 1))
        for _ in source.chunks(SMALL_CHUNK):
            pass
        with pytest.raises(FailedPrecondition):
            source.check_unchanged()
    finally:
        source.close()
    with pytest.raises(InvalidArgument):
        tgsp.write(
            weights=tmp_path / "absent.safetensors",
            kek_provider=env.kek,
            signing_key=env.key,
            **fields(),
        )


def test_multi_mebibyte_package_through_the_threaded_paths(env: Env, tmp_path: Path) -> None:
    # Above 4 MiB hashing runs on helper threads with rotating buffers: check those
    # paths end to end, including a damaged chunk deep inside the file.
    rng = np.random.default_rng(11)
    tensors = {
        f"layer{i}.lora_A.weight": rng.standard_normal((64, 4096), dtype=np.float32)
        for i in range(6)
    }
    weights_path = tmp_path / "big.safetensors"
    from safetensors.numpy import save_file

    save_file(tensors, str(weights_path))
    package_path = tmp_path / "big.tgsp"
    tgsp.write_to(
        package_path,
        weights=weights_path,
        kek_provider=env.kek,
        signing_key=env.key,
        chunk_size=64 * 1024,
        **fields(),
    )
    data = package_path.read_bytes()
    assert len(data) > 6 * 1024 * 1024

    assert tgsp.verify(package_path, trusted_keys=env.trusted).payload.chunk_count > 90
    opened = tgsp.open(
        package_path, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT
    )
    assert bytes(opened.payload) == weights_path.read_bytes()
    out = tmp_path / "out.safetensors"
    tgsp.decrypt_to_file(
        io.BufferedReader(io.BytesIO(data)),
        out,
        trusted_keys=env.trusted,
        kek_provider=env.kek,
        tenant_id=TENANT,
    )
    assert out.read_bytes() == weights_path.read_bytes()
    assert (
        tgsp.write(
            weights=weights_path,
            kek_provider=env.kek,
            signing_key=env.key,
            chunk_size=64 * 1024,
            **fields(),
        )[:28]
        == data[:28]
    )

    parts = split(data)
    position = parts.offsets["ciphertext"][0] + 50 * (64 * 1024 + 16) + 7
    damaged = bytearray(data)
    damaged[position] ^= 0x10
    package_path.write_bytes(damaged)
    with pytest.raises(IntegrityError) as caught:
        tgsp.verify(package_path, trusted_keys=env.trusted)
    assert check_of(caught.value) == "ciphertext digest"
    with pytest.raises(IntegrityError) as caught:
        tgsp.open(package_path, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT)
    assert check_of(caught.value) == "ciphertext chunk 50 tag"
    out.unlink()
    with pytest.raises(IntegrityError) as caught:
        tgsp.decrypt_to_file(
            package_path, out, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT
        )
    assert check_of(caught.value) == "ciphertext chunk 50 tag"
    assert not out.exists()


def test_two_packages_of_the_same_weights_use_fresh_keys(env: Env) -> None:
    first = split(small_package(env))
    second = split(small_package(env))
    assert first.manifest == second.manifest  # same fields, canonical encoding
    assert first.ciphertext != second.ciphertext  # a fresh DEK per package
    assert first.wrapped_key != second.wrapped_key


def test_independent_reader_from_the_spec_opens_a_library_package(env: Env) -> None:
    package = small_package(env)
    parts = split(package)

    key_id, body, signature = parts.trailer[:32], parts.trailer[:128], parts.trailer[128:]
    public = Ed25519PublicKey.from_public_bytes(env.key.verifying_key.to_raw())
    public.verify(signature, signed_message(body))  # raises if wrong
    assert key_id == hashlib.sha256(env.key.verifying_key.to_raw()).digest()
    assert parts.trailer[32:64] == hashlib.sha256(parts.manifest).digest()
    assert parts.trailer[96:128] == hashlib.sha256(parts.ciphertext).digest()
    manifest = json.loads(parts.manifest)
    assert manifest["format_version"] == 2
    assert manifest["dp_certificate"]["sampling"] == {"method": "poisson", "rate": 0.01}

    dek = local_unwrap(env.kek_dir, parts.wrapped_key, parts.manifest)
    payload = decrypt_payload(
        dek,
        parts.ciphertext,
        manifest["payload"]["chunk_size"],
        manifest["payload"]["plaintext_size"],
    )
    assert payload == bytes(open_small(env, package).payload)


def test_library_opens_a_package_written_by_the_independent_writer(env: Env) -> None:
    reference = small_package(env)
    manifest_json = json.loads(split(reference).manifest)
    payload = bytes(open_small(env, reference).payload)

    package = seal(manifest_json, payload, kek=env.kek, signing_key=env.key)

    assert bytes(open_small(env, package).payload) == payload


# ------------------------------------------------------------- every byte, every region


def expected_failure(
    parts_offsets: dict[str, tuple[int, int]], position: int, attempt: str
) -> tuple[str, str]:
    """(error kind, check or field) a flip at ``position`` must produce.

    verify hashes the whole ciphertext before anything else; open authenticates the
    manifest and wrapped key, unwraps, and then decrypts while hashing, so a damaged
    chunk is named by its tag first.
    """
    region, offset = next(
        (name, position - begin)
        for name, (begin, end) in parts_offsets.items()
        if begin <= position < end
    )
    if region == "header":
        fields_at = [
            (8, "header.magic"),
            (10, "header.format_version"),
            (12, "header.flags"),
            (16, "header.manifest_length"),
            (20, "header.wrapped_key_length"),
            (28, "header.ciphertext_length"),
        ]
        return "invalid", next(name for limit, name in fields_at if offset < limit)
    if region == "trailer":
        if 64 <= offset < 96:  # format 2: the wrapped key's checksum, outside the signature
            return "integrity", "wrapped key digest"
        return "integrity", "unknown signer" if offset < 32 else "signature"
    if region == "ciphertext" and attempt == "open":
        return "integrity", f"ciphertext chunk {offset // (SMALL_CHUNK + 16)} tag"
    names = {
        "manifest": "manifest digest",
        "wrapped_key": "wrapped key digest",
        "ciphertext": "ciphertext digest",
    }
    return "integrity", names[region]


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flipping_any_byte_is_rejected_with_the_right_named_check(env: Env, mask: int) -> None:
    package = small_package(env)
    offsets = split(package).offsets
    seen: set[str] = set()
    for position in range(len(package)):
        damaged = bytearray(package)
        damaged[position] ^= mask
        for attempt in ("verify", "open"):
            kind, name = expected_failure(offsets, position, attempt)
            with pytest.raises((IntegrityError, InvalidArgument)) as caught:
                if attempt == "verify":
                    tgsp.verify(bytes(damaged), trusted_keys=env.trusted)
                else:
                    open_small(env, bytes(damaged))
            error = caught.value
            if kind == "integrity":
                assert isinstance(error, IntegrityError), (position, error)
                assert check_of(error) == name, (position, error.message)
                assert error.message.startswith(name)
            else:
                assert isinstance(error, InvalidArgument), (position, error)
                # A length field flipped by one bit is either out of range (named) or
                # no longer adds up to the file size.
                assert error.field in (name, "package.length"), (position, error.message)
            seen.add(name)
    chunks = tgsp.inspect(package).payload.chunk_count
    assert seen == {f"ciphertext chunk {i} tag" for i in range(chunks)} | {
        "header.magic",
        "header.format_version",
        "header.flags",
        "header.manifest_length",
        "header.wrapped_key_length",
        "header.ciphertext_length",
        "manifest digest",
        "wrapped key digest",
        "ciphertext digest",
        "unknown signer",
        "signature",
    }


def test_flipped_chunk_bytes_resigned_by_a_trusted_key_fail_that_chunks_tag(env: Env) -> None:
    package = small_package(env)
    parts = split(package)
    stride = SMALL_CHUNK + 16
    chunk_count = tgsp.inspect(package).payload.chunk_count
    assert chunk_count >= 3
    for position in range(len(parts.ciphertext)):
        ciphertext = bytearray(parts.ciphertext)
        ciphertext[position] ^= 0x04
        forged = resign(package, env.key, ciphertext=bytes(ciphertext))
        tgsp.verify(forged, trusted_keys=env.trusted)  # the signature itself is fine
        with pytest.raises(IntegrityError) as caught:
            open_small(env, forged)
        assert check_of(caught.value) == f"ciphertext chunk {position // stride} tag"


def test_reordered_or_dropped_chunks_fail_even_when_resigned(env: Env) -> None:
    package = small_package(env)
    parts = split(package)
    stride = SMALL_CHUNK + 16
    chunks = [parts.ciphertext[i : i + stride] for i in range(0, len(parts.ciphertext), stride)]

    swapped = resign(package, env.key, ciphertext=b"".join([chunks[1], chunks[0], *chunks[2:]]))
    with pytest.raises(IntegrityError) as caught:
        open_small(env, swapped)
    assert check_of(caught.value) == "ciphertext chunk 0 tag"

    # Drop the last chunk and shrink the manifest's size to match: chunk n-2 now has to
    # be the final one, and its associated data says it is not.
    manifest = json.loads(parts.manifest)
    manifest["payload"]["plaintext_size"] = SMALL_CHUNK * (len(chunks) - 1)
    truncated = resign(
        package,
        env.key,
        manifest=tgsp.canonical_json(manifest),
        ciphertext=b"".join(chunks[:-1]),
    )
    with pytest.raises(IntegrityError) as caught:
        open_small(env, truncated)
    # The manifest changed, so its digest no longer matches the one bound when the DEK was
    # wrapped: unwrapping is refused before any chunk is tried.
    assert check_of(caught.value) == "wrapped key"


def test_any_manifest_or_key_change_resigned_by_a_trusted_key_is_still_refused(env: Env) -> None:
    package = small_package(env)
    parts = split(package)
    outcomes: dict[str, int] = {}
    for section in ("manifest", "wrapped_key"):
        original = getattr(parts, section)
        for position in range(len(original)):
            edited = bytearray(original)
            edited[position] ^= 0x01
            forged = resign(package, env.key, **{section: bytes(edited)})
            with pytest.raises((IntegrityError, InvalidArgument)) as caught:
                open_small(env, forged)
            error = caught.value
            key = check_of(error) if isinstance(error, IntegrityError) else "invalid"
            outcomes[key] = outcomes.get(key, 0) + 1
    # Edits that still parse change the manifest digest or the key block, which the
    # wrapped key's associated data (or the KEK's tag) binds.
    assert outcomes["wrapped key"] > 0 and outcomes["invalid"] > 0
    assert set(outcomes) <= {"wrapped key", "invalid", "tenant mismatch"}


@pytest.mark.parametrize("reader", ["open", "decrypt_to_file"])
def test_manifest_that_lies_about_tensors_is_refused_after_decryption(
    env: Env, tmp_path: Path, reader: str
) -> None:
    reference = small_package(env)
    manifest = json.loads(split(reference).manifest)
    payload = bytes(open_small(env, reference).payload)
    name = "layers.0.q_proj.lora_B.weight"

    cases: list[tuple[str, Any]] = [
        (f"tensor {name!r} sha256", lambda m: m["tensors"][name].update(sha256="0" * 64)),
        (f"tensor {name!r} shape", lambda m: m["tensors"][name].update(shape=[4, 16])),
        (f"tensor {name!r} dtype", lambda m: m["tensors"][name].update(dtype="I32")),
        ("tensor set", lambda m: m["tensors"].pop(name)),
    ]
    out = tmp_path / "out" / "weights.safetensors"
    out.parent.mkdir()
    for check, edit in cases:
        lying = json.loads(json.dumps(manifest))
        edit(lying)
        package = seal(lying, payload, kek=env.kek, signing_key=env.key)
        tgsp.verify(package, trusted_keys=env.trusted)  # the package itself is well signed
        with pytest.raises(IntegrityError) as caught:
            if reader == "open":
                open_small(env, package)
            else:
                tgsp.decrypt_to_file(
                    io.BytesIO(package),
                    out,
                    trusted_keys=env.trusted,
                    kek_provider=env.kek,
                    tenant_id=TENANT,
                )
        assert check_of(caught.value) == check
        assert caught.value.message.startswith(check)
        assert list(out.parent.iterdir()) == []


def test_streaming_tensor_hashes_match_in_memory_ones_for_any_piece_sizes() -> None:
    from safetensors.numpy import save

    from tensafe.tgsp.payload import StreamingTensorHasher, parse_layout, tensor_digests

    tensors = small_tensors(4)
    tensors["empty.first"] = np.zeros((0,), dtype=np.float32)
    tensors["tiny"] = np.array([7], dtype=np.int8)
    tensors["zz.empty.last"] = np.zeros((3, 0), dtype=np.float64)
    data = save(tensors)
    layout = parse_layout(data, total_size=len(data), field="t")
    expected = tensor_digests(memoryview(data), layout)
    rng = np.random.default_rng(0)
    for _ in range(30):
        hasher = StreamingTensorHasher(total_size=len(data), field="t")
        position = 0
        while position < len(data):
            size = int(rng.integers(1, 300))
            hasher.update(data[position : position + size])
            position += size
        assert hasher.finish()[1] == expected
    short = StreamingTensorHasher(total_size=len(data), field="t")
    short.update(data[:-1])
    with pytest.raises(InvalidArgument):
        short.finish()


def test_dek_holder_cannot_substitute_ciphertext_under_the_signed_digest(
    env: Env, tmp_path: Path
) -> None:
    # Whoever can unwrap the DEK can make chunks that authenticate; the signed
    # ciphertext digest still binds the exact bytes the signer sealed.
    package = small_package(env)
    parts = split(package)
    manifest = json.loads(parts.manifest)
    dek = local_unwrap(env.kek_dir, parts.wrapped_key, parts.manifest)
    payload = bytes(open_small(env, package).payload)
    assert b'"format":"pt"' in payload
    altered = payload.replace(b'"format":"pt"', b'"format":"px"')
    ciphertext = encrypt_payload(dek, altered, manifest["payload"]["chunk_size"])
    substituted = parts.header + parts.manifest + parts.wrapped_key + ciphertext + parts.trailer

    with pytest.raises(IntegrityError) as caught:
        open_small(env, substituted)
    assert check_of(caught.value) == "ciphertext digest"
    out = tmp_path / "out.safetensors"
    with pytest.raises(IntegrityError) as caught:
        tgsp.decrypt_to_file(
            io.BytesIO(substituted),
            out,
            trusted_keys=env.trusted,
            kek_provider=env.kek,
            tenant_id=TENANT,
        )
    assert check_of(caught.value) == "ciphertext digest"
    assert not out.exists()


# -------------------------------------------------------------- swaps, tenants, signers


def test_swapping_manifests_between_packages_is_refused(env: Env) -> None:
    first = small_package(env, adapter_id="adapter-1")
    second = small_package(env, adapter_id="adapter-two", weights=small_tensors(9))
    a, b = split(first), split(second)
    assert len(a.manifest) != len(b.manifest)  # the header's length field is edited too
    for target, donor in ((a, b), (b, a)):
        header = bytearray(target.header)
        header[12:16] = len(donor.manifest).to_bytes(4, "big")
        spliced = (
            bytes(header) + donor.manifest + target.wrapped_key + target.ciphertext + target.trailer
        )
        for action in (
            lambda p: tgsp.verify(p, trusted_keys=env.trusted),
            lambda p: open_small(env, p),
            tgsp.inspect,
        ):
            with pytest.raises(IntegrityError) as caught:
                action(spliced)
            assert check_of(caught.value) == "manifest digest"


def test_swapping_wrapped_keys_between_packages_is_refused(env: Env) -> None:
    first = small_package(env)
    second = small_package(env)  # same manifest, other DEK
    a, b = split(first), split(second)
    spliced = a.header + a.manifest + b.wrapped_key + a.ciphertext + a.trailer
    with pytest.raises(IntegrityError) as caught:
        open_small(env, spliced)
    assert check_of(caught.value) == "wrapped key digest"
    # Even re-signed, the other package's DEK does not decrypt this ciphertext.
    forged = resign(first, env.key, wrapped_key=b.wrapped_key)
    with pytest.raises(IntegrityError) as caught:
        open_small(env, forged)
    assert check_of(caught.value) == "ciphertext chunk 0 tag"


def test_replaying_a_package_under_another_tenant_is_refused(env: Env) -> None:
    package = small_package(env)
    with pytest.raises(IntegrityError) as caught:
        open_small(env, package, tenant_id=OTHER_TENANT)
    assert check_of(caught.value) == "tenant mismatch"
    with pytest.raises(IntegrityError) as caught:
        tgsp.verify(package, trusted_keys=env.trusted, expected_tenant=OTHER_TENANT)
    assert check_of(caught.value) == "tenant mismatch"

    # Rewriting the tenant everywhere and re-signing does not help: the wrapped DEK is
    # bound to the tenant it was wrapped for.
    parts = split(package)
    manifest = json.loads(parts.manifest)
    manifest["provenance"]["tenant_id"] = OTHER_TENANT
    key_block = json.loads(parts.wrapped_key)
    key_block["tenant_id"] = OTHER_TENANT
    forged = resign(
        package,
        env.key,
        manifest=tgsp.canonical_json(manifest),
        wrapped_key=tgsp.canonical_json(key_block),
    )
    assert tgsp.verify(forged, trusted_keys=env.trusted).tenant_id == OTHER_TENANT
    with pytest.raises(IntegrityError) as caught:
        open_small(env, forged, tenant_id=OTHER_TENANT)
    assert check_of(caught.value) == "wrapped key"


def test_wrapped_key_for_another_tenant_than_the_manifest_is_refused(env: Env) -> None:
    package = small_package(env)
    parts = split(package)
    key_block = json.loads(parts.wrapped_key)
    key_block["tenant_id"] = OTHER_TENANT
    forged = resign(package, env.key, wrapped_key=tgsp.canonical_json(key_block))
    with pytest.raises(IntegrityError) as caught:
        tgsp.verify(forged, trusted_keys=env.trusted)
    assert check_of(caught.value) == "tenant mismatch"


def test_unknown_signer_is_refused_and_trusted_set_must_not_be_empty(env: Env) -> None:
    package = small_package(env)
    stranger = tgsp.SigningKey.generate()
    with pytest.raises(IntegrityError) as caught:
        tgsp.verify(package, trusted_keys=[stranger.verifying_key])
    assert check_of(caught.value) == "unknown signer"
    assert env.key.key_id in caught.value.message
    with pytest.raises(IntegrityError):
        open_small(env, resign(package, stranger))  # well formed, but not trusted
    with pytest.raises(InvalidArgument) as empty:
        tgsp.verify(package, trusted_keys=[])
    assert empty.value.field == "trusted_keys"


def test_signer_claiming_a_trusted_key_id_fails_the_signature(env: Env) -> None:
    package = small_package(env)
    stranger = tgsp.SigningKey.generate()
    parts = split(package)
    from .helpers import assemble

    forged = assemble(
        stranger,
        manifest=parts.manifest,
        wrapped_key=parts.wrapped_key,
        ciphertext=parts.ciphertext,
        key_id=bytes.fromhex(env.key.key_id),
    )
    with pytest.raises(IntegrityError) as caught:
        tgsp.verify(forged, trusted_keys=env.trusted)
    assert check_of(caught.value) == "signature"


def test_wrong_kek_cannot_open(env: Env, tmp_path: Path) -> None:
    package = small_package(env)
    elsewhere = tmp_path / "other-keks"
    elsewhere.mkdir()
    other = tgsp.LocalFileKekProvider(elsewhere)
    other.create_tenant_kek(TENANT)  # same tenant name, different KEK
    with pytest.raises(IntegrityError) as caught:
        tgsp.open(package, trusted_keys=env.trusted, kek_provider=other, tenant_id=TENANT)
    assert check_of(caught.value) == "wrapped key"

    # Same KEK id but different key material (a restored wrong backup): the tag fails.
    own = json.loads((env.kek_dir / f"{TENANT}.kek").read_bytes())
    theirs = json.loads((elsewhere / f"{TENANT}.kek").read_bytes())
    theirs["kek_id"] = own["kek_id"]
    (elsewhere / f"{TENANT}.kek").write_bytes(tgsp.canonical_json(theirs))
    with pytest.raises(IntegrityError) as caught:
        tgsp.open(package, trusted_keys=env.trusted, kek_provider=other, tenant_id=TENANT)
    assert check_of(caught.value) == "wrapped key"
    assert "does not authenticate" in caught.value.message


def test_tenant_without_kek_cannot_write_and_none_is_created(env: Env) -> None:
    with pytest.raises(NotFound):
        small_package(env, tenant_id="tenant-c")
    assert not env.kek.has_tenant_kek("tenant-c")


# ------------------------------------------------------------------ truncation, streams


def test_every_truncation_and_any_extension_is_refused(env: Env) -> None:
    package = small_package(env)
    for length in range(len(package)):
        with pytest.raises(InvalidArgument) as caught:
            tgsp.verify(package[:length], trusted_keys=env.trusted)
        assert caught.value.field == "package.length", length
        assert "truncated" in caught.value.message or "add up" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        tgsp.verify(package + b"\x00", trusted_keys=env.trusted)
    assert caught.value.field == "package.length"


def test_truncated_or_extended_stream_is_refused(env: Env) -> None:
    package = small_package(env)
    parts = split(package)
    for length, section in (
        (10, "header"),
        (40, "manifest"),
        (len(package) - len(parts.trailer) - 5, "ciphertext"),
        (len(package) - 1, "trailer"),
    ):
        stream = io.BufferedReader(OneWayStream(package[:length]))
        with pytest.raises(InvalidArgument) as caught:
            tgsp.verify(stream, trusted_keys=env.trusted)
        assert caught.value.message.endswith(f"inside the {section}")
    with pytest.raises(InvalidArgument) as caught:
        tgsp.verify(io.BufferedReader(OneWayStream(package + b"x")), trusted_keys=env.trusted)
    assert "follow the trailer" in caught.value.message


def test_decrypt_to_file_leaves_nothing_behind_on_failure(env: Env, tmp_path: Path) -> None:
    package = small_package(env)
    parts = split(package)
    ciphertext = bytearray(parts.ciphertext)
    ciphertext[-1] ^= 0x01
    forged = resign(package, env.key, ciphertext=bytes(ciphertext))
    source = tmp_path / "forged.tgsp"
    source.write_bytes(forged)
    out = tmp_path / "out" / "weights.safetensors"
    out.parent.mkdir()

    with pytest.raises(IntegrityError) as caught:
        tgsp.decrypt_to_file(
            source, out, trusted_keys=env.trusted, kek_provider=env.kek, tenant_id=TENANT
        )
    last = tgsp.inspect(forged).payload.chunk_count - 1
    assert check_of(caught.value) == f"ciphertext chunk {last} tag"
    assert list(out.parent.iterdir()) == []

    with pytest.raises(InvalidArgument) as not_seekable:
        tgsp.decrypt_to_file(
            io.BufferedReader(OneWayStream(package)),
            out,
            trusted_keys=env.trusted,
            kek_provider=env.kek,
            tenant_id=TENANT,
        )
    assert not_seekable.value.field == "source"


def test_inspect_needs_no_key_but_checks_structure(env: Env) -> None:
    package = small_package(env)
    manifest = tgsp.inspect(package)
    assert manifest.lora.target_modules == ("q_proj", "v_proj")
    assert isinstance(manifest.dp_certificate, tgsp.DPGuarantee)
    with pytest.raises(InvalidArgument) as caught:
        tgsp.inspect(b"PK\x03\x04" + package[4:])
    assert caught.value.field == "header.magic"
    damaged = bytearray(package)
    damaged[40] ^= 0x20
    with pytest.raises(IntegrityError) as digest:
        tgsp.inspect(bytes(damaged))
    assert check_of(digest.value) == "manifest digest"


# ------------------------------------------------------------------------- signing keys


def test_public_keys_export_for_third_party_verification(env: Env) -> None:
    public = env.key.verifying_key
    raw = public.to_raw()
    assert len(raw) == 32 and public.key_id == hashlib.sha256(raw).hexdigest()
    assert tgsp.VerifyingKey.from_raw(raw) == public
    assert tgsp.VerifyingKey.from_pem(public.to_pem()) == public
    assert isinstance(load_pem_public_key(public.to_pem()), Ed25519PublicKey)

    # A verifier holding only the PEM text checks a package.
    package = small_package(env)
    third_party = [tgsp.VerifyingKey.from_pem(public.to_pem())]
    assert tgsp.verify(package, trusted_keys=third_party).tenant_id == TENANT

    pem = env.key.to_pem(password=b"correct horse")
    assert b"ENCRYPTED" in pem
    assert tgsp.SigningKey.from_pem(pem, password=b"correct horse").key_id == env.key.key_id
    with pytest.raises(InvalidArgument):
        tgsp.SigningKey.from_pem(pem, password=b"wrong")
    with pytest.raises(InvalidArgument):
        tgsp.VerifyingKey.from_raw(b"\x01" * 31)
