"""HE sessions through the real gRPC service and the SDK: lifecycle, tenancy, expiry,
limits, idempotency, what crosses the wire, and the no-adapter-source refusal."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensafe.client.he import HeLoraSession, open_he_runtime, plan_spec
from tensafe.common.auth import SCOPE_READ
from tensafe.common.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TenSafeError,
)
from tensafe.helora import Packing, Plan, choose_plan, default_params
from tensafe.helora.client import HeLoraClient
from tensafe.helora.plan import Variant
from tensafe.helora.wire import WireKind, wire_kind
from tensafe.proto.he.v1 import he_service_pb2 as pb
from tensafe.proto.he.v1 import he_service_pb2_grpc

from .conftest import (
    ADAPTER,
    ALPHA,
    MIB,
    RANK,
    TTL_SECONDS,
    Recorder,
    Runtime,
    new_tenant,
    runtime_config,
)
from .helpers import activations, adapter_layers, raises, reference

LAYERS = [
    f"model.layers.{index}.self_attn.{name}"
    for index in range(2)
    for name in ("k_proj", "o_proj", "q_proj", "v_proj")
]


def open_session(
    runtime: Runtime, tenant: str, recorder: Recorder | None = None, **options: object
) -> HeLoraSession:
    return HeLoraSession.create(
        runtime.rpc(tenant, recorder=recorder),
        adapter_name=ADAPTER,
        rank=RANK,
        alpha=ALPHA,
        hidden_size=64,
        output_size=64,
        **options,  # type: ignore[arg-type]
    )


def test_lifecycle_applies_the_adapters_delta_and_closes(runtime: Runtime, data_dir: Path) -> None:
    tenant = new_tenant()
    session = open_session(runtime, tenant)
    assert session.layers == LAYERS == sorted(adapter_layers(data_dir))
    assert session.plan.packing is Packing.PER_TOKEN
    assert session.session.key_bytes > 5 * MIB  # 7 Galois keys at N = 8192
    assert session.session.expire_time.seconds == int(runtime.clock.now + TTL_SECONDS)
    for layer, width in (("model.layers.1.self_attn.k_proj", 32), (LAYERS[1], 64)):
        x = activations(5, seed=3)
        delta = session.apply(layer, x, output_size=width)
        expected = reference(data_dir, layer, x)
        assert delta.shape == (5, width)
        assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected))
    stats = session.stats["model.layers.1.self_attn.k_proj"]
    # Three units (two tokens each, complex packing) x 10 rotations: CLIENT_BABY_STEPS
    # with n1 = 2 copies sent by the client, so the runtime rotates x·A's 3 giant
    # steps, the 3 fold steps (64 / 8 = 2^3) and u·B's 3 baby and 1 giant step.
    assert session.plan.input_copies == 2
    assert (stats.calls, stats.tokens, stats.counts.rotations) == (1, 5, 30)
    # The second call had the same activations: its ciphertexts were re-sent, not
    # re-encrypted, and its delta (checked above) is still right.
    assert stats.reused_inputs == 0 and session.stats[LAYERS[1]].reused_inputs == 1
    assert runtime.usage(tenant) == (1, session.session.key_bytes)
    session.close()
    assert runtime.usage(tenant) == (0, 0)
    raises(NotFound, session.refresh)
    raises(NotFound, session.close)
    raises(NotFound, session.apply, LAYERS[0], activations(1, seed=0), output_size=32)


def test_layers_reading_one_input_share_one_request(runtime: Runtime, data_dir: Path) -> None:
    recorder = Recorder()
    tenant = new_tenant()
    session = open_session(runtime, tenant, recorder)
    block = "model.layers.1.self_attn"
    layers = [(f"{block}.q_proj", 64), (f"{block}.k_proj", 32), (f"{block}.v_proj", 32)]
    x = activations(3, seed=8)
    deltas = session.apply_layers(layers, x)
    for (layer, width), delta in zip(layers, deltas, strict=True):
        expected = reference(data_dir, layer, x)
        assert delta.shape == (3, width)
        assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected)), layer
        stats = session.stats[layer]
        assert (stats.calls, stats.grouped_calls) == (1, 1)
    # d = 64: the three layers fit one ciphertext (regions of 127, 95 and 95 slots), so
    # the runtime performed one layer's operations for all three (2 units x 10
    # rotations), recorded on the request's first layer; the SDK checked them against
    # the shared plan.
    assert [session.stats[layer].counts.rotations for layer, _ in layers] == [20, 0, 0]
    applied = [m for name, m in recorder.sent if name.endswith("/ApplyLoraInline")]
    assert len(applied) == 1
    assert applied[0].header.layer == layers[0][0]
    more = [layer for layer, _ in layers[1:]]
    assert list(applied[0].header.more_layers) == more
    uploads = list(applied[0].ciphertexts)
    assert len(uploads) == 2 * session.plan.input_copies  # encrypted once
    # The streamed ApplyLora carries the same header field and gives the same results.
    rpc = runtime.rpc(tenant)
    inline, inline_summary = rpc.apply_lora(
        session.session.id, layers[0][0], uploads, more_layers=more
    )
    streamed, streamed_summary = rpc.apply_lora_streamed(
        session.session.id, layers[0][0], uploads, more_layers=more
    )
    assert streamed == inline and len(streamed) == 2
    assert streamed_summary.counts == inline_summary.counts
    session.close()


def test_another_tenants_session_is_not_found(runtime: Runtime) -> None:
    session = open_session(runtime, new_tenant())
    intruder = runtime.rpc(new_tenant())
    raises(NotFound, intruder.get_session, session.session.id)
    raises(NotFound, intruder.apply_lora, session.session.id, LAYERS[0], [b"x"])
    raises(NotFound, intruder.close_session, session.session.id)
    assert session.refresh().id == session.session.id
    session.close()


def test_idle_sessions_expire_and_their_keys_are_deleted(runtime: Runtime) -> None:
    tenant = new_tenant()
    session = open_session(runtime, tenant)
    held = runtime.held(tenant, session.session.id)
    runtime.clock.advance(0.75 * TTL_SECONDS)
    session.apply(LAYERS[0], activations(1, seed=1), output_size=32)  # use keeps it alive
    runtime.clock.advance(0.75 * TTL_SECONDS)
    assert session.refresh().key_bytes == held.key_bytes
    runtime.clock.advance(TTL_SECONDS + 1)
    raises(NotFound, session.refresh)
    assert runtime.usage(tenant) == (0, 0)
    raises(NotFound, held.executor)  # the keys are gone, not just unlisted


def test_session_and_key_limits_per_tenant(runtime: Runtime) -> None:
    tenant = new_tenant()
    first, second = open_session(runtime, tenant), open_session(runtime, tenant)
    error = raises(ResourceExhausted, open_session, runtime, tenant)
    assert "max_sessions_per_tenant=2" in error.message
    other = open_session(runtime, new_tenant())  # another tenant is not affected
    other.close()
    second.close()
    # One session of ~10 MiB held: declaring 64 MiB more passes the per-session limit
    # but not the tenant's 65 MiB; refused before a single key byte is sent.
    rpc = runtime.rpc(tenant)
    client = HeLoraClient(default_params())
    header = pb.CreateSessionHeader(
        adapter_name=ADAPTER,
        spec=plan_spec(
            hidden_size=64,
            output_size=64,
            rank=RANK,
            alpha=ALPHA,
            tokens=1,
            params=default_params(),
            packing=None,
        ),
        seal_parameters=client.parameters_blob(),
        galois_keys_size=64 * MIB,
    )
    error = raises(ResourceExhausted, rpc.create_session, header, None)
    assert "max_key_bytes_per_tenant" in error.message
    header.galois_keys_size = 64 * MIB + 1
    error = raises(ResourceExhausted, rpc.create_session, header, None)
    assert "max_session_key_bytes" in error.message
    first.close()
    open_session(runtime, tenant).close()  # room again


def test_a_repeated_request_id_returns_the_same_session(runtime: Runtime) -> None:
    rpc = runtime.rpc(new_tenant())
    client = HeLoraClient(default_params())
    plan, _ = choose_plan(
        hidden_size=64, output_size=64, rank=RANK, alpha=ALPHA, tokens=1, params=default_params()
    )
    material = client.public_material(plan)
    header = pb.CreateSessionHeader(
        adapter_name=ADAPTER,
        spec=plan_spec(
            hidden_size=64,
            output_size=64,
            rank=RANK,
            alpha=ALPHA,
            tokens=1,
            params=default_params(),
            packing=None,
        ),
        seal_parameters=material.parameters,
        galois_keys_size=len(material.galois_keys or b""),
        request_id="create-1",
    )
    one = rpc.create_session(header, material.galois_keys)
    two = rpc.create_session(header, material.galois_keys)
    assert one.id == two.id
    rpc.close_session(one.id)


def test_a_request_id_in_progress_is_aborted_not_duplicated(runtime: Runtime) -> None:
    tenant = new_tenant()
    client = HeLoraClient(default_params())
    plan, _ = choose_plan(
        hidden_size=64, output_size=64, rank=RANK, alpha=ALPHA, tokens=1, params=default_params()
    )
    keys = client.public_material(plan).galois_keys
    assert keys is not None
    header = pb.CreateSessionHeader(
        adapter_name=ADAPTER,
        spec=plan_spec(
            hidden_size=64,
            output_size=64,
            rank=RANK,
            alpha=ALPHA,
            tokens=1,
            params=default_params(),
            packing=None,
        ),
        seal_parameters=client.parameters_blob(),
        galois_keys_size=len(keys),
        request_id="create-slowly",
    )
    release = threading.Event()

    def slow_requests() -> Iterator[pb.CreateSessionRequest]:
        yield pb.CreateSessionRequest(header=header)
        release.wait(30)
        for start in range(0, len(keys), MIB):
            yield pb.CreateSessionRequest(galois_keys_chunk=keys[start : start + MIB])

    stub = he_service_pb2_grpc.HeRuntimeServiceStub(runtime.channel(tenant))
    first = stub.CreateSession.future(slow_requests())
    deadline = time.monotonic() + 30
    while runtime.usage(tenant) != (1, len(keys)):  # the first one reserved
        assert time.monotonic() < deadline
        release.wait(0.001)
    error = raises(Aborted, runtime.rpc(tenant).create_session, header, keys)
    assert error.reason == "REQUEST_IN_PROGRESS"
    release.set()
    session = first.result(timeout=60).session
    assert runtime.rpc(tenant).create_session(header, keys).id == session.id
    runtime.rpc(tenant).close_session(session.id)


def test_only_public_material_and_ciphertexts_cross_the_wire(runtime: Runtime) -> None:
    recorder = Recorder()
    session = open_session(runtime, new_tenant(), recorder)
    session.apply(LAYERS[2], activations(3, seed=5), output_size=64)
    session.close()
    blobs: list[bytes] = []
    keys = bytearray()
    pending = bytearray()
    methods = set()
    for method, message in recorder.sent:
        methods.add(method.rsplit("/", 1)[-1])
        if isinstance(message, pb.CreateSessionRequest):
            if message.HasField("header"):
                blobs.append(message.header.seal_parameters)
            else:
                keys += message.galois_keys_chunk
        elif isinstance(message, pb.ApplyLoraRequest) and message.HasField("chunk"):
            pending += message.chunk.data
            if message.chunk.last:
                blobs.append(bytes(pending))
                pending = bytearray()
        elif isinstance(message, pb.ApplyLoraInlineRequest):
            blobs.extend(message.ciphertexts)
    blobs.append(bytes(keys))
    # A small call goes in one message (ApplyLoraInline), not streamed.
    assert methods == {"CreateSession", "ApplyLoraInline", "CloseSession"}
    kinds = [wire_kind(blob) for blob in blobs]
    assert sorted(set(kinds)) == [WireKind.PARAMETERS, WireKind.GALOIS_KEYS, WireKind.CIPHERTEXT]
    # Three tokens, two per unit, each unit as its n1 = 2 client-rotated copies.
    assert session.plan.input_copies == 2
    assert kinds.count(WireKind.CIPHERTEXT) == 2 * 2
    # The secret key's bytes appear nowhere in what was sent.
    secret = session._crypto._keygen.secret_key().to_string()
    wire = b"".join(blobs)
    for offset in range(64, len(secret) - 64, len(secret) // 8):
        assert secret[offset : offset + 32] not in wire
    plan = Plan.from_dict(json.loads(session.session.plan.plan_json))
    assert list(session.session.plan.rotation_steps) == list(plan.rotation_steps)


def test_batch_first_sessions_upload_no_keys(runtime: Runtime, data_dir: Path) -> None:
    session = open_session(runtime, new_tenant(), packing=Packing.BATCH_FIRST, tokens=3)
    assert session.session.key_bytes == 0
    x = activations(3, seed=9)
    delta = session.apply(LAYERS[3], x, output_size=32)
    expected = reference(data_dir, LAYERS[3], x)
    assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected))
    assert session.stats[LAYERS[3]].counts.rotations == 0
    session.close()


def test_a_forced_one_prime_session_stays_within_its_derived_bound(
    runtime: Runtime, data_dir: Path
) -> None:
    session = open_session(
        runtime, new_tenant(), packing=Packing.BATCH_FIRST, variant=Variant.ONE_PRIME, tokens=3
    )
    assert session.session.key_bytes == 0
    x = activations(3, seed=10)
    delta = session.apply(LAYERS[3], x, output_size=32)
    plan = session.plan
    assert plan.variant is Variant.ONE_PRIME and plan.error_bound <= 1e-3
    lora_a, lora_b = adapter_layers(data_dir)[LAYERS[3]]
    # W = X·sqrt(2)·d·r·max|A|·max|(alpha/r)·B|, what ONE_PRIME's bound is relative to.
    output_range = (
        plan.activation_bound
        * np.sqrt(2.0)
        * 64
        * RANK
        * np.max(np.abs(lora_a))
        * np.max(np.abs(lora_b))
        * ALPHA
        / RANK
    )
    error = np.max(np.abs(delta - reference(data_dir, LAYERS[3], x)))
    assert error <= plan.error_bound * output_range
    counts = session.stats[LAYERS[3]].counts
    assert counts.rotations == 0 and counts.rescales == 0 and counts.multiply_plain > 0
    session.close()


def test_sessions_need_the_train_scope(runtime: Runtime) -> None:
    reader = runtime.rpc(new_tenant(), scopes=(SCOPE_READ,))
    error = raises(
        PermissionDenied,
        HeLoraSession.create,
        reader,
        adapter_name=ADAPTER,
        rank=RANK,
        alpha=ALPHA,
        hidden_size=64,
        output_size=64,
    )
    assert "train" in error.message
    assert any(r.kind == "permission.denied" for r in runtime.audit.records)


def test_health_answers_while_seal_work_runs(runtime: Runtime, data_dir: Path) -> None:
    tenant = new_tenant()
    session = open_session(runtime, tenant)
    held = runtime.held(tenant, session.session.id)
    x = activations(2, seed=12)
    outcome: dict[str, np.ndarray] = {}

    def apply() -> None:
        outcome["delta"] = session.apply(LAYERS[2], x, output_size=64)

    worker = threading.Thread(target=apply)
    # Hold the session's SEAL lock: the evaluation blocks inside the worker pool. Were it
    # run on the event loop, the loop would block too and nothing else would answer.
    with held._lock:
        worker.start()
        deadline = time.monotonic() + 30
        while held.in_flight == 0:
            assert time.monotonic() < deadline, "ApplyLora never reached evaluation"
            worker.join(0.001)
        health = health_pb2_grpc.HealthStub(runtime.channel(None)).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert session.refresh().id == session.session.id
        assert "delta" not in outcome
    worker.join(60)
    expected = reference(data_dir, LAYERS[2], x)
    assert np.max(np.abs(outcome["delta"] - expected)) <= 1e-3 * np.max(np.abs(expected))
    session.close()


def test_without_dev_mode_no_adapter_is_loaded(data_dir: Path) -> None:
    served = Runtime(runtime_config(data_dir, dev_mode=False))
    try:
        error = raises(FailedPrecondition, open_session, served, new_tenant())
        assert error.message == "registry adapter source not configured"
    finally:
        served.stop()


@pytest.mark.parametrize("name", ["missing-adapter", "../adapters"])
def test_unknown_or_escaping_adapter_names_are_refused(runtime: Runtime, name: str) -> None:
    with pytest.raises(TenSafeError) as info:
        HeLoraSession.create(
            runtime.rpc(new_tenant()),
            adapter_name=name,
            rank=RANK,
            alpha=ALPHA,
            hidden_size=64,
            output_size=64,
        )
    expected = "NOT_FOUND" if name == "missing-adapter" else "INVALID_ARGUMENT"
    assert info.value.code.value == expected


def test_open_he_runtime_needs_endpoints_and_a_key(tmp_path: Path) -> None:
    error = raises(FailedPrecondition, open_he_runtime, connection_file=tmp_path / "none.json")
    assert error.reason == "NO_ENDPOINT"
    connection = tmp_path / "connection.json"
    connection.write_text(json.dumps({"services": {"auth": "127.0.0.1:1"}}))
    error = raises(FailedPrecondition, open_he_runtime, connection_file=connection)
    assert "he_runtime" in error.message


def test_a_killed_peer_process_is_replaced_and_the_retry_succeeds(data_dir: Path) -> None:
    served = Runtime(runtime_config(data_dir, evaluation_cores=2))
    try:
        peers = served.sessions.peers
        assert peers is not None and len(peers) == 1
        session = open_session(served, new_tenant())
        x = activations(1, seed=21)
        expected = reference(data_dir, LAYERS[1], x)
        worker = peers.worker()  # a pool of one: the session's worker
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        # The call meets the dead peer (UNAVAILABLE), the SDK retries, and the runtime
        # rebuilds the session on a new peer process: same delta, no silent fallback.
        delta = session.apply(LAYERS[1], x, output_size=64)
        assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected))
        replacement = peers.worker()
        assert replacement.alive and replacement.pid != worker.pid
        session.close()
    finally:
        served.stop()
