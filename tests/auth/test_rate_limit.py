"""The ExchangeApiKey rate limit (GCRA per API-key prefix, stored in the auth DB): the
burst+1-th call is RESOURCE_EXHAUSTED naming the limit, issues no token, leaves other
keys alone, recovers after the interval, counts failed guesses, behaves the same for
real and made-up keys, and holds across concurrent calls to two replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa

from tensafe.auth.config import AuthConfig
from tensafe.auth.domain.ratelimit import RateLimit, admit
from tensafe.auth.store.sql import rate_limits, tokens
from tensafe.client.auth import TokenProvider
from tensafe.common.db import Database
from tensafe.common.errors import ConfigError, ResourceExhausted, TenSafeError
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

from .conftest import Clock, new_kek, start_auth
from .helpers import exchange

PER_MINUTE = 6  # one call per 10 s once the burst is spent
BURST = 3


async def _count(database: Database, table: sa.Table) -> int:
    async with database.transaction(read_only=True) as session:
        return int(
            (await session.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
        )


class Limited:
    """Two auth replicas on one database, sharing a small ExchangeApiKey limit."""

    def __init__(
        self, addresses: list[str], stubs: list[auth_service_pb2_grpc.AuthServiceStub]
    ) -> None:
        self.addresses = addresses
        self.stubs = stubs
        self.stub = stubs[0]
        self.admin_key = ""
        self.registry_key = ""
        self.database: Database
        self.clock = RateClock()

    async def code(self, api_key: str, *, replica: int = 0) -> str:
        """The outcome of one exchange: OK, or the error's code (RATE_LIMITED by reason)."""
        try:
            await exchange(self.stubs[replica], api_key)
        except grpc.aio.AioRpcError as error:
            typed = from_rpc_error(error)
            return "RATE_LIMITED" if typed.reason == "RATE_LIMITED" else error.code().name
        return "OK"


class RateClock:
    """The rate limit's wall clock, movable so a refill needs no sleep."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def limited(database_url: str, tmp_path: Path) -> AsyncIterator[Limited]:
    rate_clock = RateClock()
    kek = new_kek()
    rate = RateLimit(per_minute=PER_MINUTE, burst=BURST)
    first, second = [
        await start_auth(
            database_url,
            tmp_path / name,
            kek=kek,
            clock=Clock(),
            exchange_rate=rate,
            rate_clock=rate_clock,
        )
        for name in ("a", "b")
    ]
    boot = await first[1].bootstrap(
        tenant_name="platform", admin_name="root", service_accounts=["registry"]
    )
    addresses = [f"127.0.0.1:{s[0].port}" for s in (first, second)]
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    harness = Limited(addresses, [auth_service_pb2_grpc.AuthServiceStub(c) for c in channels])
    harness.admin_key = boot.admin_api_key
    harness.registry_key = boot.service_api_keys["registry"]
    harness.database = first[2]
    harness.clock = rate_clock
    try:
        yield harness
    finally:
        for channel in channels:
            await channel.close()
        for server, _domain, database, verifier in (first, second):
            await server.stop()
            await verifier.close()
            await database.dispose()


def test_gcra_admits_the_burst_then_one_per_interval() -> None:
    rate = RateLimit(per_minute=60, burst=3)
    now, tat, outcomes = 0, 0, []
    for _ in range(4):
        decision = admit(rate, tat_us=tat, now_us=now)
        outcomes.append(decision.admitted)
        tat = decision.tat_us
    assert outcomes == [True, True, True, False]
    refused = admit(rate, tat_us=tat, now_us=now)
    assert refused.retry_after_us == 1_000_000 and refused.tat_us == tat
    assert not admit(rate, tat_us=tat, now_us=999_999).admitted
    assert admit(rate, tat_us=tat, now_us=1_000_000).admitted
    # A TAT left by a clock far ahead (or before this clock stepped back) costs at most
    # one interval, and never grants an extra call.
    skewed = admit(rate, tat_us=tat + 7_200_000_000, now_us=now)
    assert not skewed.admitted and skewed.retry_after_us == 1_000_000


def test_a_million_per_minute_with_a_million_burst_works() -> None:
    """The reported settings (1e6 / 1e6): the whole burst passes at one instant, the
    next call waits one 60 us interval, and a call after it passes."""
    rate = RateLimit(per_minute=10**6, burst=10**6)
    now, tat = 1_765_000_000_000_000, 0
    for _ in range(10**6):
        decision = admit(rate, tat_us=max(tat, now), now_us=now)
        assert decision.admitted
        tat = decision.tat_us
    refused = admit(rate, tat_us=tat, now_us=now)
    assert not refused.admitted and refused.retry_after_us == 60
    assert admit(rate, tat_us=tat, now_us=now + 60).admitted


def test_a_rate_that_is_not_a_whole_microsecond_interval_is_never_exceeded() -> None:
    # 40e6/min is one call per 1.5 us; rounding the interval down to 1 us admitted
    # 1000 calls in 1000 us (50 % over). Rounded up it admits at most the rate.
    rate = RateLimit(per_minute=40_000_000, burst=1)
    tat, admitted = 0, 0
    for now in range(1000):
        decision = admit(rate, tat_us=tat, now_us=now)
        if decision.admitted:
            admitted += 1
            tat = decision.tat_us
    assert 0 < admitted <= 1000 * 40_000_000 // 60_000_000 + 1


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("exchange_api_key_rate_per_minute", 0, "1..60000000"),
        ("exchange_api_key_rate_per_minute", -1, "1..60000000"),
        ("exchange_api_key_rate_per_minute", 60_000_001, "1..60000000"),
        ("exchange_api_key_burst", 0, "at least 1"),
        ("exchange_api_key_burst", -1, "at least 1"),
        ("exchange_api_key_burst", 2**62, "at most 4611686018427 at this rate"),
    ],
)
def test_settings_the_limiter_cannot_express_are_refused_at_start_up(
    tmp_path: Path, name: str, value: int, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        AuthConfig(
            database_url="sqlite+aiosqlite:///x.db",
            data_dir=tmp_path,
            dev_mode=True,
            **{name: value},  # type: ignore[arg-type]
        )
    assert info.value.setting == f"TENSAFE_{name.upper()}"
    assert reason in str(info.value)


def test_the_largest_expressible_limit_is_accepted() -> None:
    assert RateLimit(per_minute=60_000_000, burst=2**62).interval_us == 1
    with pytest.raises(ValueError):
        RateLimit(per_minute=60_000_001, burst=1)


async def test_burst_plus_one_is_rate_limited_and_issues_no_token(limited: Limited) -> None:
    tokens_before = await _count(limited.database, tokens)
    assert [await limited.code(limited.admin_key) for _ in range(BURST)] == ["OK"] * BURST
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await exchange(limited.stub, limited.admin_key)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(info.value)
    assert isinstance(error, ResourceExhausted)
    assert error.reason == "RATE_LIMITED"
    assert error.metadata["limit"] == "exchange_api_key_rate_per_minute"
    assert error.metadata["max"] == str(PER_MINUTE)
    assert float(error.metadata["retry_after_seconds"]) == pytest.approx(10.0, abs=1.0)
    assert "exchange_api_key_rate_per_minute=6" in error.message
    assert await _count(limited.database, tokens) == tokens_before + BURST
    # Another key is unaffected; the limited one recovers after one interval.
    assert await limited.code(limited.registry_key) == "OK"
    limited.clock.offset += 10.0
    assert await limited.code(limited.admin_key) == "OK"
    assert await limited.code(limited.admin_key) == "RATE_LIMITED"


async def test_failed_guesses_count_and_existence_is_not_revealed(limited: Limited) -> None:
    scheme, prefix, _secret = limited.admin_key.split("_", 2)
    wrong = f"{scheme}_{prefix}_{'x' * 40}"
    made_up = f"{scheme}_{'a' * len(prefix)}_{'x' * 40}"
    # A wrong secret for a real prefix and a key that does not exist: identical answers.
    real = [await limited.code(wrong) for _ in range(BURST + 1)]
    fake = [await limited.code(made_up) for _ in range(BURST + 1)]
    assert real == fake == ["UNAUTHENTICATED"] * BURST + ["RATE_LIMITED"]
    # The guesses spent the real key's budget: brute force is capped per key.
    assert await limited.code(limited.admin_key) == "RATE_LIMITED"


async def test_concurrent_burst_over_two_replicas_never_exceeds_the_limit(
    limited: Limited,
) -> None:
    outcomes = await asyncio.gather(
        *(limited.code(limited.admin_key, replica=i % 2) for i in range(12))
    )
    assert sorted(outcomes) == ["OK"] * BURST + ["RATE_LIMITED"] * (12 - BURST)
    assert await _count(limited.database, rate_limits) >= 1


async def test_sdk_surfaces_the_typed_error(limited: Limited) -> None:
    """The SDK's token provider raises ``ResourceExhausted`` (it retries nothing; the
    training client retries UNAVAILABLE only, never RESOURCE_EXHAUSTED)."""
    for _ in range(BURST):
        assert await limited.code(limited.admin_key) == "OK"
    with grpc.insecure_channel(limited.addresses[0]) as channel:
        provider = TokenProvider(channel, limited.admin_key)
        with pytest.raises(TenSafeError) as info:
            await asyncio.to_thread(provider.token)
    assert isinstance(info.value, ResourceExhausted)
    assert info.value.reason == "RATE_LIMITED"
    assert provider.exchanges == 0
