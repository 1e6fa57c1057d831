"""Durable HE sessions: a session is a DB row plus a key file, so it outlives the
runtime that created it. Each test runs two runtime object graphs, one after the other,
on the same database and data folder (the second stands for a restarted process)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensafe.client.he import HeLoraSession
from tensafe.common.errors import NotFound, ResourceExhausted
from tensafe.he_runtime.server import ORPHAN_KEY_FILE_GRACE_SECONDS, key_files_dir

from .conftest import ADAPTER, ALPHA, RANK, TTL_SECONDS, Runtime, new_tenant, runtime_config
from .helpers import activations, raises, reference

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def own_dir(tmp_path: Path, data_dir: Path) -> Path:
    """A data folder (and database) of the test's own, holding the shared adapters."""
    (tmp_path / "adapters").symlink_to(data_dir / "adapters", target_is_directory=True)
    return tmp_path


@pytest.fixture
def runtimes(own_dir: Path) -> Iterator[list[Runtime]]:
    """Runtimes the test starts (stopped at the end if it did not stop them)."""
    started: list[Runtime] = []
    yield started
    for runtime in started:
        if runtime.port:
            runtime.stop()


def start(runtimes: list[Runtime], own_dir: Path) -> Runtime:
    runtime = Runtime(runtime_config(own_dir))
    runtimes.append(runtime)
    return runtime


def stop(runtime: Runtime) -> None:
    runtime.stop()
    runtime.port = 0


def open_session(runtime: Runtime, tenant: str, **options: object) -> HeLoraSession:
    return HeLoraSession.create(
        runtime.rpc(tenant),
        adapter_name=ADAPTER,
        rank=RANK,
        alpha=ALPHA,
        hidden_size=64,
        output_size=64,
        **options,  # type: ignore[arg-type]
    )


def reattach(session: HeLoraSession, runtime: Runtime, tenant: str) -> HeLoraSession:
    """The same SDK session (same secret key) talking to another runtime."""
    return HeLoraSession(runtime.rpc(tenant), session._crypto, session.session, session.plan)


def key_file(own_dir: Path, session_id: str) -> Path:
    return key_files_dir(runtime_config(own_dir)) / f"{session_id}.galois"


def assert_correct(session: HeLoraSession, data_dir: Path, seed: int) -> None:
    x = activations(3, seed=seed)
    delta = session.apply(LAYER, x, output_size=64)
    expected = reference(data_dir, LAYER, x)
    assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected))


def test_a_session_survives_a_restart(
    runtimes: list[Runtime], own_dir: Path, data_dir: Path
) -> None:
    tenant = new_tenant()
    first = start(runtimes, own_dir)
    session = open_session(first, tenant, request_id="create-once")
    assert_correct(session, data_dir, seed=1)
    assert key_file(own_dir, session.session.id).stat().st_size == session.session.key_bytes
    stop(first)

    second = start(runtimes, own_dir)
    assert second.usage(tenant) == (1, session.session.key_bytes)  # from the row alone
    resumed = reattach(session, second, tenant)
    assert_correct(resumed, data_dir, seed=2)  # the rebuilt executor has the same keys
    assert resumed.refresh().id == session.session.id
    # The same request id after the restart returns the stored session, not a new one.
    again = open_session(second, tenant, request_id="create-once")
    assert again.session.id == session.session.id
    assert second.usage(tenant) == (1, session.session.key_bytes)
    resumed.close()
    assert second.usage(tenant) == (0, 0)
    assert not key_file(own_dir, session.session.id).exists()
    raises(NotFound, resumed.refresh)


def test_a_closed_session_stays_closed_after_a_restart(
    runtimes: list[Runtime], own_dir: Path
) -> None:
    tenant = new_tenant()
    first = start(runtimes, own_dir)
    session = open_session(first, tenant)
    assert key_file(own_dir, session.session.id).exists()
    session.close()
    assert not key_file(own_dir, session.session.id).exists()
    stop(first)
    second = start(runtimes, own_dir)
    raises(NotFound, reattach(session, second, tenant).refresh)
    assert second.usage(tenant) == (0, 0)


def test_expired_sessions_are_not_found_after_a_restart_and_reaped(
    runtimes: list[Runtime], own_dir: Path
) -> None:
    tenant = new_tenant()
    first = start(runtimes, own_dir)
    used, reaped = open_session(first, tenant), open_session(first, tenant)
    stop(first)
    second = start(runtimes, own_dir)
    second.clock.advance(TTL_SECONDS + 1)
    raises(NotFound, reattach(used, second, tenant).refresh)  # found expired on a cache miss
    assert not key_file(own_dir, used.session.id).exists()
    assert key_file(own_dir, reaped.session.id).exists()
    assert second.reap() == 1
    assert not key_file(own_dir, reaped.session.id).exists()
    raises(NotFound, reattach(reaped, second, tenant).refresh)
    assert second.usage(tenant) == (0, 0)


def test_quotas_count_persisted_sessions(runtimes: list[Runtime], own_dir: Path) -> None:
    tenant = new_tenant()
    first = start(runtimes, own_dir)
    held = [open_session(first, tenant) for _ in range(2)]  # the limit is 2
    stop(first)
    second = start(runtimes, own_dir)
    error = raises(ResourceExhausted, open_session, second, tenant)
    assert error.reason == "QUOTA_EXCEEDED"
    assert error.metadata == {"limit": "max_sessions_per_tenant", "max": "2"}
    reattach(held[0], second, tenant).close()
    open_session(second, tenant).close()  # room for exactly one again


def test_start_up_removes_abandoned_key_files(runtimes: list[Runtime], own_dir: Path) -> None:
    first = start(runtimes, own_dir)
    live = open_session(first, new_tenant())
    stop(first)
    keys = key_files_dir(runtime_config(own_dir))
    temp = keys / f"{'a' * 32}.galois.tmp-0123"  # a write cut short by a crash
    temp.write_bytes(b"partial")
    old_orphan = keys / f"{'b' * 32}.galois"  # a file whose row never committed
    old_orphan.write_bytes(b"keys")
    stale = time.time() - ORPHAN_KEY_FILE_GRACE_SECONDS - 60
    os.utime(old_orphan, (stale, stale))
    young_orphan = keys / f"{'c' * 32}.galois"  # maybe still committing elsewhere
    young_orphan.write_bytes(b"keys")
    start(runtimes, own_dir)
    assert not temp.exists() and not old_orphan.exists()
    assert young_orphan.exists() and key_file(own_dir, live.session.id).exists()
