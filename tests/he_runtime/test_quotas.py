"""The HE runtime's per-tenant session quota in its QUOTA_EXCEEDED shape, and a
concurrent burst of CreateSession calls that must not pass it (the module's runtime
allows 2 sessions per tenant)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tensafe.client.he import plan_spec
from tensafe.common.errors import ConfigError, ResourceExhausted, TenSafeError
from tensafe.helora import choose_plan, default_params
from tensafe.helora.client import HeLoraClient
from tensafe.proto.he.v1 import he_service_pb2 as pb

from .conftest import ADAPTER, ALPHA, RANK, Runtime, new_tenant, runtime_config
from .helpers import raises

MAX_SESSIONS = 2  # runtime_config's max_sessions_per_tenant


def _header_and_keys() -> tuple[pb.CreateSessionHeader, bytes]:
    params = default_params()
    shapes = {
        "hidden_size": 64,
        "output_size": 64,
        "rank": RANK,
        "alpha": float(ALPHA),
        "tokens": 1,
        "params": params,
    }
    plan, _ = choose_plan(**shapes)  # type: ignore[arg-type]
    material = HeLoraClient(params).public_material(plan)
    keys = material.galois_keys or b""
    header = pb.CreateSessionHeader(
        adapter_name=ADAPTER,
        spec=plan_spec(packing=None, **shapes),  # type: ignore[arg-type]
        seal_parameters=material.parameters,
        galois_keys_size=len(keys),
    )
    return header, keys


def test_zero_or_negative_limit_is_refused_at_start_up(tmp_path: Path) -> None:
    for value in (0, -3):
        with pytest.raises(ConfigError) as info:
            runtime_config(tmp_path, max_sessions_per_tenant=value)
        assert info.value.setting == "TENSAFE_MAX_SESSIONS_PER_TENANT"


def test_sessions_per_tenant_quota_and_concurrent_burst(runtime: Runtime) -> None:
    header, keys = _header_and_keys()
    tenant = new_tenant()
    rpc = runtime.rpc(tenant)

    def create(_: int) -> str:
        request = pb.CreateSessionHeader()
        request.CopyFrom(header)
        request.request_id = uuid.uuid4().hex
        try:
            return rpc.create_session(request, keys).id
        except TenSafeError as error:
            assert isinstance(error, ResourceExhausted), error
            assert error.reason == "QUOTA_EXCEEDED"
            assert error.metadata == {
                "limit": "max_sessions_per_tenant",
                "max": str(MAX_SESSIONS),
            }
            assert f"max_sessions_per_tenant={MAX_SESSIONS}" in error.message
            return ""

    with ThreadPoolExecutor(max_workers=5) as pool:
        outcomes = list(pool.map(create, range(5)))
    opened = [session_id for session_id in outcomes if session_id]
    assert len(opened) == MAX_SESSIONS
    assert runtime.usage(tenant)[0] == MAX_SESSIONS
    # Another tenant is unaffected; closing one makes room for exactly one more.
    other = runtime.rpc(new_tenant())
    other.close_session(other.create_session(header, keys).id)
    rpc.close_session(opened[0])
    header.request_id = uuid.uuid4().hex
    replacement = rpc.create_session(header, keys).id
    header.request_id = uuid.uuid4().hex
    raises(ResourceExhausted, rpc.create_session, header, keys)
    for session_id in (opened[1], replacement):
        rpc.close_session(session_id)
    assert runtime.usage(tenant) == (0, 0)
