"""The auth service through real gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import grpc
import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import duration_pb2

from tensafe.common.auth import (
    SCOPE_ADMIN,
    SCOPE_PLATFORM_ADMIN,
    SCOPE_READ,
    SCOPE_TRAIN,
    Identity,
)
from tensafe.proto.auth.v1 import auth_service_pb2 as pb

from .conftest import AuthHarness
from .helpers import bearer, exchange, expect_code, make_tenant

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def _events(
    auth: AuthHarness, kind: str, root: tuple[tuple[str, str], ...] = ()
) -> list[pb.AuditEvent]:
    if not root:
        root = bearer((await exchange(auth.stub, auth.bootstrap.admin_api_key)).access_token)
    events: list[pb.AuditEvent] = []
    token = ""
    while True:
        page = await auth.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=100, page_token=token), metadata=root
        )
        events += [e for e in page.events if e.kind == kind]
        token = page.next_page_token
        if not token:
            return events


async def test_exchange_issues_an_eddsa_token_with_the_principal_claims(
    auth: AuthHarness,
) -> None:
    response = await exchange(auth.stub, auth.bootstrap.admin_api_key)
    header = jwt.get_unverified_header(response.access_token)
    claims = jwt.decode(response.access_token, options={"verify_signature": False})
    jwks = await auth.stub.GetJwks(pb.GetJwksRequest())
    assert header["alg"] == "EdDSA"
    assert header["kid"] in {k.kid for k in jwks.keys}
    assert claims["tenant"] == auth.bootstrap.tenant.id == response.tenant_id
    assert claims["principal"] == auth.bootstrap.admin.id == response.principal_id
    assert set(claims["scopes"]) == {SCOPE_READ, SCOPE_TRAIN, SCOPE_ADMIN, SCOPE_PLATFORM_ADMIN}
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert claims["jti"] and response.expire_time.seconds == claims["exp"]
    # The token works for an authenticated call.
    listed = await auth.stub.ListPrincipals(
        pb.ListPrincipalsRequest(), metadata=bearer(response.access_token)
    )
    assert {p.name for p in listed.principals} == {"root", "registry"}
    # The secret was never stored: no column holds it.
    async with auth.database.connection(read_only=True) as connection:
        rows = (await connection.execute(sa.text("SELECT * FROM auth_api_keys"))).all()
    assert rows and all(auth.bootstrap.admin_api_key not in str(tuple(r)) for r in rows)
    assert all(str(r.secret_hash).startswith("$argon2id$") for r in rows)


async def test_tenant_a_cannot_see_or_touch_tenant_b(auth: AuthHarness) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    a = await make_tenant(stub, root, "tenant-a")
    b = await make_tenant(stub, root, "tenant-b")
    b_token = await exchange(stub, b.reader_key)
    calls = [
        stub.GetTenant(pb.GetTenantRequest(tenant_id=b.tenant_id), metadata=a.admin),
        stub.GetPrincipal(pb.GetPrincipalRequest(principal_id=b.admin_id), metadata=a.admin),
        stub.DisablePrincipal(
            pb.DisablePrincipalRequest(principal_id=b.admin_id), metadata=a.admin
        ),
        stub.CreateApiKey(pb.CreateApiKeyRequest(principal_id=b.admin_id), metadata=a.admin),
        stub.ListApiKeys(pb.ListApiKeysRequest(principal_id=b.admin_id), metadata=a.admin),
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=b.admin_key_id), metadata=a.admin),
        stub.RevokeToken(pb.RevokeTokenRequest(token_id=_jti(b_token)), metadata=a.admin),
        stub.CreatePrincipal(
            pb.CreatePrincipalRequest(
                kind=pb.PRINCIPAL_KIND_USER, name="x", roles=[pb.ROLE_ADMIN], tenant_id=b.tenant_id
            ),
            metadata=a.admin,
        ),
    ]
    for call in calls:
        await expect_code(call, NOT_FOUND)
    listed = await stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=a.admin)
    assert {p.id for p in listed.principals} == {a.admin_id, a.reader_id}
    keys = await stub.ListApiKeys(pb.ListApiKeysRequest(), metadata=a.admin)
    assert {k.principal_id for k in keys.api_keys} == {a.admin_id, a.reader_id}
    events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=a.admin)
    assert events.events and {e.tenant_id for e in events.events} == {a.tenant_id}
    # B is untouched: its key still works and its admin is enabled.
    await exchange(stub, b.admin_key)
    got = await stub.GetPrincipal(pb.GetPrincipalRequest(principal_id=b.admin_id), metadata=b.admin)
    assert not got.principal.disabled


async def test_reader_and_tenant_admin_are_refused_what_their_scopes_lack(
    auth: AuthHarness,
) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    a = await make_tenant(stub, root, "tenant-a")
    error = await expect_code(
        stub.CreatePrincipal(
            pb.CreatePrincipalRequest(
                kind=pb.PRINCIPAL_KIND_USER, name="eve", roles=[pb.ROLE_ADMIN]
            ),
            metadata=a.reader,
        ),
        DENIED,
    )
    assert "admin" in (error.details() or "")
    await expect_code(stub.ListTenants(pb.ListTenantsRequest(), metadata=a.admin), DENIED)
    await expect_code(stub.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=a.admin), DENIED)
    await expect_code(stub.ListRevocations(pb.ListRevocationsRequest(), metadata=a.admin), DENIED)
    # A reader may not mint a token with more scopes than its role grants.
    await expect_code(
        stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=a.reader_key, scopes=["train"])),
        DENIED,
    )
    narrowed = await stub.ExchangeApiKey(
        pb.ExchangeApiKeyRequest(api_key=a.admin_key, scopes=["read"])
    )
    assert list(narrowed.scopes) == ["read"]
    denied = await _events(auth, "permission.denied")
    assert {e.principal_id for e in denied} >= {a.reader_id}
    assert any("CreatePrincipal" in e.payload_json for e in denied)


def _jti(response: pb.ExchangeApiKeyResponse) -> str:
    claims = jwt.decode(response.access_token, options={"verify_signature": False})
    return str(claims["jti"])


def _reencode(token: str, header: dict[str, str]) -> str:
    _, payload, signature = token.split(".")
    encoded = jwt.utils.base64url_encode(json.dumps(header).encode()).decode()
    return f"{encoded}.{payload}.{signature}"


async def test_bad_tokens_are_unauthenticated(auth: AuthHarness) -> None:
    stub = auth.stub
    good = await exchange(stub, auth.bootstrap.admin_api_key)
    token = good.access_token
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    request = pb.ListPrincipalsRequest()

    # Expired: issued by a clock two hours behind.
    auth.clock.offset = -timedelta(hours=2)
    expired = await exchange(stub, auth.bootstrap.admin_api_key)
    auth.clock.offset = timedelta(0)

    header, payload, signature = token.split(".")
    flipped = chr(ord(payload[10]) ^ 1)
    tampered = f"{header}.{payload[:10]}{flipped}{payload[11:]}.{signature}"
    stranger = jwt.encode(
        claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}
    )
    unsigned = jwt.encode(claims, None, algorithm="none")
    bad = {
        "missing": (),
        "not bearer": (("authorization", f"Basic {token}"),),
        "garbage": bearer("not-a-jwt"),
        "expired": bearer(expired.access_token),
        "tampered": bearer(tampered),
        "wrong kid": bearer(_reencode(token, {"alg": "EdDSA", "kid": "no-such-kid"})),
        "alg none": bearer(unsigned),
        "alg none with kid": bearer(_reencode(unsigned, {"alg": "none", "kid": kid})),
        "foreign key": bearer(stranger),
    }
    for name, metadata in bad.items():
        error = await expect_code(stub.ListPrincipals(request, metadata=metadata), UNAUTH)
        assert error.details(), name
    # The good token still works; after revocation it does not.
    await stub.ListPrincipals(request, metadata=bearer(token))
    await stub.RevokeToken(pb.RevokeTokenRequest(token_id=claims["jti"]), metadata=bearer(token))
    await expect_code(stub.ListPrincipals(request, metadata=bearer(token)), UNAUTH)
    revocations = await stub.ListRevocations(
        pb.ListRevocationsRequest(), metadata=await auth.bearer(auth.bootstrap.admin_api_key)
    )
    assert claims["jti"] in revocations.token_ids
    failures = await _events(auth, "auth.failed")
    assert len(failures) >= len(bad) + 1


async def test_revoked_api_key_stops_working_at_once(auth: AuthHarness) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    a = await make_tenant(stub, root, "tenant-a")
    revoked = await stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(api_key_id=a.admin_key_id), metadata=a.admin
    )
    assert revoked.api_key.HasField("revoke_time")
    # Tokens already exchanged from the key are revoked with it.
    await expect_code(stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=a.admin), UNAUTH)
    await expect_code(exchange(stub, a.admin_key), UNAUTH)
    await expect_code(exchange(stub, a.admin_key + "x"), UNAUTH)
    await expect_code(exchange(stub, "tsk_aaaaaaaaaa_unknown"), UNAUTH)
    kinds = [e.payload_json for e in await _events(auth, "auth.failed")]
    assert any("API key revoked" in p for p in kinds)
    assert all(a.admin_key not in p for p in kinds)


async def test_disabling_a_principal_or_tenant_voids_its_tokens(auth: AuthHarness) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    a = await make_tenant(stub, root, "tenant-a")
    b = await make_tenant(stub, root, "tenant-b")
    await stub.DisablePrincipal(
        pb.DisablePrincipalRequest(principal_id=a.reader_id), metadata=a.admin
    )
    await expect_code(stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=a.reader), UNAUTH)
    await expect_code(exchange(stub, a.reader_key), UNAUTH)
    await stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=a.admin)

    disabled = await stub.DisableTenant(
        pb.DisableTenantRequest(tenant_id=b.tenant_id), metadata=root
    )
    assert disabled.tenant.state == pb.TENANT_STATE_DISABLED
    await expect_code(stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=b.admin), UNAUTH)
    await expect_code(exchange(stub, b.admin_key), UNAUTH)
    assert [e.tenant_id for e in await _events(auth, "tenant.disabled")] == [b.tenant_id]


async def test_rotation_keeps_old_tokens_valid_until_they_expire(auth: AuthHarness) -> None:
    stub = auth.stub
    old = await exchange(stub, auth.bootstrap.admin_api_key)
    old_kid = jwt.get_unverified_header(old.access_token)["kid"]
    rotated = await stub.RotateSigningKey(
        pb.RotateSigningKeyRequest(), metadata=bearer(old.access_token)
    )
    assert rotated.kid != old_kid
    new = await exchange(stub, auth.bootstrap.admin_api_key)
    assert jwt.get_unverified_header(new.access_token)["kid"] == rotated.kid
    for token in (old, new):
        await stub.ListPrincipals(pb.ListPrincipalsRequest(), metadata=bearer(token.access_token))
    kids = {k.kid for k in (await stub.GetJwks(pb.GetJwksRequest())).keys}
    assert kids == {old_kid, rotated.kid}
    # Once every token of the old key has expired, its public key leaves the JWKS.
    auth.clock.offset = timedelta(minutes=16)
    kids = {k.kid for k in (await stub.GetJwks(pb.GetJwksRequest())).keys}
    assert kids == {rotated.kid}
    # The next rotation also forgets the records of the tokens that have expired.
    async with auth.database.connection(read_only=True) as connection:
        before = (await connection.execute(sa.text("SELECT count(*) FROM auth_tokens"))).one()
    admin = Identity(
        tenant_id=auth.bootstrap.tenant.id,
        principal_id=auth.bootstrap.admin.id,
        scopes=frozenset({SCOPE_PLATFORM_ADMIN}),
        token_id="t",
        expire_time=0.0,
    )
    await auth.domain.rotate_signing_key(admin)
    async with auth.database.connection(read_only=True) as connection:
        after = (await connection.execute(sa.text("SELECT count(*) FROM auth_tokens"))).one()
    assert (before[0], after[0]) == (2, 0)


async def test_verify_audit_log_names_the_edited_row(auth: AuthHarness) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    await make_tenant(stub, root, "tenant-a")
    verdict = await stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=root)
    assert verdict.ok and verdict.entries_checked >= 8 and verdict.first_bad_seq == 0
    async with auth.database.connection() as connection:
        await connection.execute(
            sa.text("UPDATE auth_audit_events SET payload_json = :p WHERE seq = 4"),
            {"p": '{"edited":true}'},
        )
    verdict = await stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=root)
    assert not verdict.ok
    assert verdict.first_bad_seq == 4
    assert "edited" in verdict.reason


async def _swap_seq(auth: AuthHarness, first: int, second: int) -> None:
    async with auth.database.connection() as connection:
        for old, new in ((first, -1), (second, first), (-1, second)):
            await connection.execute(
                sa.text("UPDATE auth_audit_events SET seq = :new WHERE seq = :old"),
                {"new": new, "old": old},
            )


async def test_verify_audit_log_detects_reordered_and_deleted_rows(auth: AuthHarness) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    await make_tenant(stub, root, "tenant-a")
    request = pb.VerifyAuditLogRequest()

    await _swap_seq(auth, 5, 6)
    verdict = await stub.VerifyAuditLog(request, metadata=root)
    assert (verdict.ok, verdict.first_bad_seq) == (False, 5)
    await _swap_seq(auth, 5, 6)
    assert (await stub.VerifyAuditLog(request, metadata=root)).ok

    async with auth.database.connection() as connection:
        last = (await connection.execute(sa.text("SELECT max(seq) FROM auth_audit_events"))).one()
        await connection.execute(
            sa.text("DELETE FROM auth_audit_events WHERE seq = :s"), {"s": last[0]}
        )
    verdict = await stub.VerifyAuditLog(request, metadata=root)
    assert (verdict.ok, verdict.first_bad_seq) == (False, last[0])

    async with auth.database.connection() as connection:
        await connection.execute(sa.text("DELETE FROM auth_audit_events WHERE seq = 3"))
    verdict = await stub.VerifyAuditLog(request, metadata=root)
    assert (verdict.ok, verdict.first_bad_seq) == (False, 3)
    assert "deleted" in verdict.reason


async def test_fifty_concurrent_exchanges_all_succeed_and_the_chain_stays_valid(
    auth: AuthHarness,
) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    before = len(await _events(auth, "token.issued", root))
    results = await asyncio.gather(
        *(exchange(stub, auth.bootstrap.admin_api_key) for _ in range(50)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    responses = [r for r in results if isinstance(r, pb.ExchangeApiKeyResponse)]
    assert len({_jti(r) for r in responses}) == 50
    verdict = await stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=root)
    assert verdict.ok, verdict.reason
    issued = await _events(auth, "token.issued", root)
    assert len(issued) - before == 50
    issued_ids = {json.loads(e.payload_json)["token_id"] for e in issued}
    assert {_jti(r) for r in responses} <= issued_ids
    seqs = [e.seq for e in issued]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_idempotency_paging_ttls_and_validation(auth: AuthHarness) -> None:
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    first = await stub.CreateTenant(
        pb.CreateTenantRequest(display_name="t1", request_id="r-1"), metadata=root
    )
    again = await stub.CreateTenant(
        pb.CreateTenantRequest(display_name="t1", request_id="r-1"), metadata=root
    )
    assert again.tenant.id == first.tenant.id
    await expect_code(
        stub.CreateTenant(pb.CreateTenantRequest(display_name="t1"), metadata=root),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_code(
        stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_USER, name="n", roles=[]),
            metadata=root,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for index in range(5):
        await stub.CreatePrincipal(
            pb.CreatePrincipalRequest(
                kind=pb.PRINCIPAL_KIND_SERVICE_ACCOUNT, name=f"sa-{index}", roles=[pb.ROLE_READER]
            ),
            metadata=root,
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListPrincipals(
            pb.ListPrincipalsRequest(page_size=3, page_token=token), metadata=root
        )
        assert len(page.principals) <= 3
        seen += [p.id for p in page.principals]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 7  # root, registry and five service accounts

    # A shorter token lifetime is honoured; a longer one is capped at 15 minutes.
    short = await stub.ExchangeApiKey(
        pb.ExchangeApiKeyRequest(
            api_key=auth.bootstrap.admin_api_key, ttl=duration_pb2.Duration(seconds=120)
        )
    )
    long = await stub.ExchangeApiKey(
        pb.ExchangeApiKeyRequest(
            api_key=auth.bootstrap.admin_api_key, ttl=duration_pb2.Duration(seconds=7200)
        )
    )
    for response, lifetime in ((short, 120), (long, 900)):
        claims = jwt.decode(response.access_token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == lifetime

    # An API key with a lifetime stops working once it has passed.
    root_id = auth.bootstrap.admin.id
    created = await stub.CreateApiKey(
        pb.CreateApiKeyRequest(principal_id=root_id, ttl=duration_pb2.Duration(seconds=60)),
        metadata=root,
    )
    await exchange(stub, created.secret)
    auth.clock.offset = timedelta(seconds=61)
    await expect_code(exchange(stub, created.secret), UNAUTH)


async def test_durations_out_of_range_are_invalid_argument(auth: AuthHarness) -> None:
    # Found by tests/fuzz: these overflowed timedelta or datetime (INTERNAL).
    stub = auth.stub
    root = bearer((await exchange(stub, auth.bootstrap.admin_api_key)).access_token)
    for seconds, nanos in ((-(2**63), 0), (2**63 - 1, 0), (315_576_000_000, 0), (1, 2**31 - 1)):
        ttl = duration_pb2.Duration(seconds=seconds, nanos=nanos)
        await expect_code(
            stub.ExchangeApiKey(
                pb.ExchangeApiKeyRequest(api_key=auth.bootstrap.admin_api_key, ttl=ttl)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        await expect_code(
            stub.CreateApiKey(
                pb.CreateApiKeyRequest(principal_id=auth.bootstrap.admin.id, ttl=ttl),
                metadata=root,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
