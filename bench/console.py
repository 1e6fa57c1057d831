"""Latency of every console page on the local stack with many training clients and audit
events (issue 21: each page within 300 ms with 64 training clients and 1,000 audit
events).

Starts ``tensafe up``'s LocalStack in a temporary folder (the built-in tiny-llama),
creates a tenant with ``--clients`` DP training clients (``--stepped`` of them take one
DP step), publishes one adapter, and makes ``--events`` audit events (API keys of the
tenant's principal created and exchanged). Then one signed-in HTTP client per principal
(the tenant's trainer; the platform admin for the audit log, which needs the admin scope)
fetches every page once per round, pages in a rotating order, for ``--rounds`` rounds.

The table shows each page's median and 90th percentile over the rounds, the ratio of
the median to the 300 ms target, and to the baseline measured in the same rounds: a
static file served by the same console (the HTTP floor, no gRPC call).

Usage: python bench/console.py [--clients 64] [--events 1000] [--rounds 15] [--stepped 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tensafe.client.auth import TokenProvider, authenticated_channel
from tensafe.client.connection import load_connection
from tensafe.client.demo import TenantCredentials, create_tenant
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.tinker import ServiceClient, types

TARGET_MS = 300.0
EXCHANGES_PER_KEY = 50
BASELINE = "/static/console.css"
NONCE = re.compile(r'name="login_nonce" value="([^"]+)"')
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _datums() -> list[types.Datum]:
    tokens = [(5 * position) % 200 + 1 for position in range(12)]
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 11},
        )
    ]


def populate(
    connection_file: Path, tenant: TenantCredentials, args: argparse.Namespace
) -> dict[str, Any]:
    """Training clients, one adapter and the audit events; returns ids the pages need."""
    started = time.perf_counter()
    with ServiceClient(api_key=tenant.api_key, connection_file=connection_file) as service:
        clients = [
            service.create_lora_training_client(
                base_model="tiny-llama",
                rank=4,
                seed=index + 1,
                target_epsilon=8.0,
                planned_steps=100,
            )
            for index in range(args.clients)
        ]
        for client in clients[: args.stepped]:
            client.forward_backward(_datums(), loss_fn="cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        saved = clients[0].save_adapter("bench-adapter").result()
    # ExchangeApiKey is rate-limited per key (a burst of 60 by default): the events come
    # from EXCHANGES_PER_KEY exchanges of each of several fresh API keys of the tenant's
    # principal (each key's creation is an api_key.created event too).
    connection = load_connection(connection_file)
    admin_key = str(_connection(connection_file)["api_key"])
    made = 0
    with connection.channel("auth") as channel:
        admin = auth_service_pb2_grpc.AuthServiceStub(
            authenticated_channel(channel, TokenProvider(channel, admin_key))
        )
        plain = auth_service_pb2_grpc.AuthServiceStub(channel)
        while made < args.events:
            key = admin.CreateApiKey(
                auth_pb.CreateApiKeyRequest(principal_id=tenant.principal_id, description="bench")
            ).secret
            made += 1
            for _ in range(min(EXCHANGES_PER_KEY, args.events - made)):
                plain.ExchangeApiKey(auth_pb.ExchangeApiKeyRequest(api_key=key), timeout=30)
                made += 1
    print(
        f"populated: {args.clients} training clients ({args.stepped} stepped), 1 adapter, "
        f"{made} audit events (api_key.created, token.issued) "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return {
        "client_id": clients[0].model_id,
        "adapter": saved.adapter_name,
        "version": saved.version,
    }


def _connection(connection_file: Path) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(connection_file.read_text())
    return data


async def sign_in(http: aiohttp.ClientSession, base: str, api_key: str) -> str:
    """Sign in; returns the session's CSRF token."""
    async with http.get(base + "/login") as response:
        nonce = NONCE.search(await response.text())
    assert nonce is not None
    async with http.post(
        base + "/login", data={"login_nonce": nonce.group(1), "api_key": api_key}
    ) as response:
        page = await response.text()
        assert response.status == 200, page
    csrf = CSRF.search(page)
    assert csrf is not None
    return csrf.group(1)


async def measure(
    base: str, tenant_key: str, admin_key: str, ids: dict[str, Any], rounds: int
) -> dict[str, list[float]]:
    """Milliseconds per page per round."""
    jar = aiohttp.CookieJar(unsafe=True)
    admin_jar = aiohttp.CookieJar(unsafe=True)
    async with (
        aiohttp.ClientSession(cookie_jar=jar) as tenant,
        aiohttp.ClientSession(cookie_jar=admin_jar) as admin,
    ):
        await sign_in(tenant, base, tenant_key)
        admin_csrf = await sign_in(admin, base, admin_key)
        run = f"/runs/{ids['client_id']}"
        package = f"/registry/{ids['adapter']}/{ids['version']}"
        pages: list[tuple[str, aiohttp.ClientSession, str, dict[str, str] | None]] = [
            ("static file (baseline)", tenant, BASELINE, None),
            ("training clients", tenant, "/runs", None),
            ("run", tenant, run, None),
            ("run progress.json", tenant, run + "/progress.json", None),
            ("datasets", tenant, "/datasets", None),
            ("registry", tenant, "/registry", None),
            ("adapter", tenant, f"/registry/{ids['adapter']}", None),
            ("package (download + verify)", tenant, package, None),
            ("privacy audits", tenant, "/privacy-audits", None),
            ("audit log (admin)", admin, "/audit", None),
            ("verify chain (admin)", admin, "/audit/verify", {"csrf_token": admin_csrf}),
        ]
        times: dict[str, list[float]] = {name: [] for name, *_ in pages}
        for round_index in range(rounds + 1):
            shift = round_index % len(pages)
            for name, http, path, form in pages[shift:] + pages[:shift]:
                started = time.perf_counter()
                if form is None:
                    async with http.get(base + path) as response:
                        await response.read()
                else:
                    async with http.post(
                        base + path, data=form, headers={"HX-Request": "true"}
                    ) as response:
                        await response.read()
                elapsed = (time.perf_counter() - started) * 1000
                assert response.status == 200, (path, response.status)
                if round_index:  # round 0 warms caches and connections
                    times[name].append(elapsed)
        return times


def report(times: dict[str, list[float]]) -> bool:
    baseline = statistics.median(times["static file (baseline)"])
    print(f"{'page':<30} {'median ms':>10} {'p90 ms':>8} {'÷ 300 ms':>9} {'÷ static':>9}")
    within = True
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else median
        within &= median <= TARGET_MS
        print(
            f"{name:<30} {median:>10.1f} {p90:>8.1f} {median / TARGET_MS:>9.2f} "
            f"{median / baseline:>9.1f}"
        )
    print(f"every page's median within {TARGET_MS:.0f} ms: {'yes' if within else 'NO'}")
    return within


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--stepped", type=int, default=8)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("TENSAFE_TORCH_THREADS", "1")
    # The trainer's per-tenant quota of live training clients is 32 by default.
    os.environ["TENSAFE_MAX_TRAINING_CLIENTS_PER_TENANT"] = str(max(32, args.clients))
    with tempfile.TemporaryDirectory(prefix="tensafe-console-bench-") as folder:
        stack = LocalStack(StackOptions(data_dir=Path(folder), builtin_base_model=True))
        with stack:
            connection = stack.start()
            tenant = create_tenant(stack.connection_file, name="bench")
            ids = populate(stack.connection_file, tenant, args)
            times = asyncio.run(
                measure(
                    str(connection["console_url"]),
                    tenant.api_key,
                    str(connection["api_key"]),
                    ids,
                    args.rounds,
                )
            )
    return 0 if report(times) else 1


if __name__ == "__main__":
    raise SystemExit(main())
