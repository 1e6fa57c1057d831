"""Domain pieces without gRPC: key formats, hashing, key encryption, the verifier's
caching policy, canonical JSON and configuration."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tensafe.auth.config import AuthConfig, signing_key_encryption_key
from tensafe.auth.domain.audit import ChainVerifier, entry_hash
from tensafe.auth.domain.crypto import (
    ApiKeyHasher,
    HashParameters,
    SigningKeyCipher,
    api_key_prefix,
    generate_api_key,
)
from tensafe.auth.domain.model import AuditEvent
from tensafe.common import errors
from tensafe.common.auth import (
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    JsonWebKey,
    Revocations,
    TokenVerifier,
    VerifierOptions,
    canonical_json,
    jwk_from_public_key,
)

from .conftest import kek_b64, new_kek


def test_api_keys_have_a_public_prefix_and_a_256_bit_secret() -> None:
    keys = [generate_api_key() for _ in range(20)]
    assert len({k.prefix for k in keys}) == 20
    for key in keys:
        assert api_key_prefix(key.secret) == key.prefix
        assert len(key.secret.split("_", 2)[2]) == 43  # base64url of 32 bytes
    assert api_key_prefix("tsk_short_x") is None
    assert api_key_prefix("xyz_aaaaaaaaaa_secret") is None
    assert api_key_prefix("tsk_AAAAAAAAAA_secret") is None


def test_default_hash_is_argon2id_with_rfc9106_parameters() -> None:
    hasher = ApiKeyHasher(HashParameters())
    key = generate_api_key().secret
    digest = hasher.hash(key)
    assert digest.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert hasher.verify(digest, key)
    assert not hasher.verify(digest, key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert not hasher.verify(None, key)


def test_signing_keys_decrypt_only_with_the_right_kek_and_kid() -> None:
    kek = new_kek()
    private = Ed25519PrivateKey.generate()
    blob = SigningKeyCipher(kek).encrypt("kid-1", private)
    restored = SigningKeyCipher(kek).decrypt("kid-1", blob)
    assert restored.public_key().public_bytes_raw() == private.public_key().public_bytes_raw()
    with pytest.raises(errors.IntegrityError):
        SigningKeyCipher(new_kek()).decrypt("kid-1", blob)
    with pytest.raises(errors.IntegrityError):
        SigningKeyCipher(kek).decrypt("kid-2", blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(errors.IntegrityError):
        SigningKeyCipher(kek).decrypt("kid-1", tampered)


def test_canonical_json_is_sorted_compact_and_rejects_floats() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'
    with pytest.raises(errors.InvalidArgument):
        canonical_json({"x": 0.1})


def _chain(n: int) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    prev = "0" * 64
    for seq in range(1, n + 1):
        fields = dict(
            seq=seq,
            event_id=f"e{seq}",
            time=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seq),
            service="auth",
            kind="k",
            tenant_id="t",
            principal_id="p",
            payload_json="{}",
            prev_hash=prev,
        )
        digest = entry_hash(**fields)  # type: ignore[arg-type]
        events.append(AuditEvent(**fields, hash=digest))  # type: ignore[arg-type]
        prev = digest
    return events


def test_chain_verifier_names_the_first_bad_entry() -> None:
    events = _chain(6)
    verifier = ChainVerifier()
    assert verifier.feed(events[:3]) and verifier.feed(events[3:])
    assert verifier.finish(head_seq=6, head_hash=events[-1].hash).ok

    edited = list(events)
    edited[2] = dataclasses.replace(edited[2], principal_id="q")
    verifier = ChainVerifier()
    verifier.feed(edited)
    verdict = verifier.finish(head_seq=6, head_hash=events[-1].hash)
    assert (verdict.ok, verdict.first_bad_seq) == (False, 3)

    # Re-hashing an edited entry does not help: its successor's link breaks.
    rehashed = list(events)
    changed = dataclasses.replace(rehashed[2], principal_id="q")
    fields = {f.name: getattr(changed, f.name) for f in dataclasses.fields(changed)}
    fields.pop("hash")
    rehashed[2] = dataclasses.replace(changed, hash=entry_hash(**fields))
    verifier = ChainVerifier()
    verifier.feed(rehashed)
    assert verifier.finish(head_seq=6, head_hash=events[-1].hash).first_bad_seq == 4

    verifier = ChainVerifier()
    verifier.feed(events[:5])
    verdict = verifier.finish(head_seq=6, head_hash=events[-1].hash)
    assert (verdict.ok, verdict.first_bad_seq) == (False, 6)


@dataclasses.dataclass
class ScriptedSource:
    keys: list[JsonWebKey]
    revoked: set[str] = dataclasses.field(default_factory=set)
    down: bool = False
    revocation_calls: int = 0
    gate: asyncio.Event | None = None
    """Set, a fetch waits for it (to hold one fetch in flight)."""

    async def jwks(self) -> Sequence[JsonWebKey]:
        return list(self.keys)

    async def revocations(self) -> Revocations:
        self.revocation_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise errors.Unavailable("auth is down")
        return Revocations(token_ids=frozenset(self.revoked))


def _token(private: Ed25519PrivateKey, kid: str, jti: str, lifetime: int = 600) -> str:
    now = int(time.time())
    claims = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "sub": "p",
        "tenant": "t",
        "principal": "p",
        "scopes": ["read"],
        "jti": jti,
        "iat": now,
        "exp": now + lifetime,
    }
    return jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": kid})


async def test_verifier_refreshes_a_list_past_the_bound_before_admitting() -> None:
    private = Ed25519PrivateKey.generate()
    source = ScriptedSource([jwk_from_public_key("k1", private.public_key())])
    options = VerifierOptions(
        revocation_ttl_seconds=2.5,
        revocation_bound_seconds=5,
        max_revocation_staleness_seconds=30,
        revocation_retry_seconds=1,
    )
    now = [1000.0]
    verifier = TokenVerifier(source, options=options, monotonic=lambda: now[0])
    token, other = _token(private, "k1", "j1"), _token(private, "k1", "j2")
    identity = await verifier.verify(token)
    assert (identity.tenant_id, identity.scopes) == ("t", frozenset({"read"}))
    for _ in range(5):  # cached: more calls do not fetch
        await verifier.verify(token)
    assert source.revocation_calls == 1

    # Busy: past the soft TTL the call is admitted and a refresh runs in the background.
    now[0] += 3
    await verifier.verify(token)
    await asyncio.sleep(0)
    assert source.revocation_calls == 2

    # Idle past the bound after a revocation: the first call already sees it (the
    # stale list is never used for it).
    source.revoked.add("j1")
    now[0] += 5.1
    with pytest.raises(errors.Unauthenticated) as info:
        await verifier.verify(token)
    assert info.value.reason == "TOKEN_REVOKED"
    assert source.revocation_calls == 3

    # Single flight: ten calls that find the list stale share one fetch.
    now[0] += 6
    source.gate = asyncio.Event()
    calls = [asyncio.create_task(verifier.verify(other)) for _ in range(10)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert all(i.token_id == "j2" for i in await asyncio.gather(*calls))
    assert source.revocation_calls == 4

    # A fetch in flight for longer than the bound is not joined: it cannot vouch for
    # revocations made after it started, so a new one starts.
    source.gate = asyncio.Event()
    now[0] += 3  # past the soft TTL: admitted, a background fetch hangs
    await verifier.verify(other)
    await asyncio.sleep(0)
    assert source.revocation_calls == 5
    now[0] += 6  # the hanging fetch started 6 s ago
    waiting = asyncio.create_task(verifier.verify(other))
    await asyncio.sleep(0.01)
    assert source.revocation_calls == 6
    source.gate.set()
    await waiting
    source.gate = None

    # Auth down: past the bound, calls are admitted on the last list (one fetch tried,
    # then none within the retry interval) until it is 30 s old, then fail closed.
    source.down = True
    now[0] += 6
    await verifier.verify(other)
    await verifier.verify(other)
    assert source.revocation_calls == 7
    now[0] += 25  # the list is 31 s old
    with pytest.raises(errors.Unavailable) as unavailable:
        await verifier.verify(other)
    assert unavailable.value.reason == "REVOCATIONS_UNAVAILABLE"
    # Auth back: the next fetch (after the retry interval) admits again.
    source.down = False
    now[0] += 1.1
    await verifier.verify(other)
    await verifier.close()


async def test_verifier_rejects_a_token_for_another_audience() -> None:
    private = Ed25519PrivateKey.generate()
    source = ScriptedSource([jwk_from_public_key("k1", private.public_key())])
    verifier = TokenVerifier(source)
    claims = jwt.decode(_token(private, "k1", "j"), options={"verify_signature": False})
    other = jwt.encode(
        {**claims, "aud": "someone-else"}, private, algorithm="EdDSA", headers={"kid": "k1"}
    )
    with pytest.raises(errors.Unauthenticated):
        await verifier.verify(other)


def test_dev_mode_kek_is_explicit_and_persistent(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    with pytest.raises(errors.ConfigError) as info:
        AuthConfig(database_url=url, data_dir=tmp_path)
    assert info.value.setting == "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY"
    dev = AuthConfig(database_url=url, data_dir=tmp_path, dev_mode=True)
    first = signing_key_encryption_key(dev)
    assert len(first) == 32 and signing_key_encryption_key(dev) == first
    kek = new_kek()
    prod = AuthConfig(database_url=url, data_dir=tmp_path, signing_key_encryption_key=kek_b64(kek))
    assert signing_key_encryption_key(prod) == kek
    with pytest.raises(errors.ConfigError):
        AuthConfig(database_url=url, data_dir=tmp_path, dev_mode=True, token_ttl_seconds=10)


async def test_verifier_tolerates_small_clock_skew_only() -> None:
    private = Ed25519PrivateKey.generate()
    source = ScriptedSource([jwk_from_public_key("k1", private.public_key())])
    verifier = TokenVerifier(source, options=VerifierOptions(clock_skew_seconds=30))
    base = jwt.decode(_token(private, "k1", "j"), options={"verify_signature": False})

    def signed(**claims: int) -> str:
        return jwt.encode({**base, **claims}, private, algorithm="EdDSA", headers={"kid": "k1"})

    now = int(time.time())
    # Issued by a clock 10 s ahead of ours: accepted.
    await verifier.verify(signed(iat=now + 10, exp=now + 600))
    # Expired 10 s ago: within the leeway; 120 s ago: refused.
    await verifier.verify(signed(iat=now - 600, exp=now - 10))
    with pytest.raises(errors.Unauthenticated) as info:
        await verifier.verify(signed(iat=now - 900, exp=now - 120))
    assert info.value.reason == "TOKEN_EXPIRED"
    with pytest.raises(errors.Unauthenticated):
        await verifier.verify(signed(iat=now + 120, exp=now + 900))
