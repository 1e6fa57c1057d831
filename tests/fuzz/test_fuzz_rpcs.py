"""Property-based fuzzing of every public RPC of every service, over real gRPC.

Every service declared in the generated ``tensafe.proto`` modules is enumerated from its
file descriptor, so a new RPC is fuzzed without touching this file; server reflection
confirms the stack serves exactly those services. For each RPC, Hypothesis draws
requests field by field (:mod:`tests.fuzz.strategies`) — from nothing, or a valid
request with a few fields overwritten — and sends them through a generic channel method
with the right token, the other role's token, no token or a garbage one. The property:
the answer is OK or a clean, typed status (never UNKNOWN, INTERNAL, UNAVAILABLE,
DATA_LOSS, DEADLINE_EXCEEDED, never a stack trace), and every process stays up and
SERVING. Raw malformed bytes get INVALID_ARGUMENT or INTERNAL (gRPC's own answer to an
undecodable request). After the run the services' databases satisfy
:mod:`tests.fuzz.invariants`, and a corrupted copy is shown to fail it.

``TENSAFE_FUZZ_EXAMPLES`` sets the examples per RPC (default 12: the module runs in
about a minute and a half on 2 cores; raise it for a longer run).
``TENSAFE_FUZZ_DATABASE=postgresql`` runs the same suite against a stack on PostgreSQL
(where NUL in a text column used to end in INTERNAL); the SQLite invariant checker is
then skipped, every status property still holds.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import random
import re
import shutil
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensafe.proto
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc

from .conftest import FUZZ_DATABASE, FuzzTarget
from .invariants import check_stack
from .strategies import corrupted, message_strategy, mutated

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("TENSAFE_FUZZ_EXAMPLES", "12"))
COVERAGE_EXAMPLES = 10
"""Examples per RPC from which the share of RPCs answered OK is checked."""
CALL_TIMEOUT = 30.0
"""Seconds per call. Every RPC answers well within it (WaitFuture is bounded by the
deadline), so DEADLINE_EXCEEDED means a request made a server hang: a finding."""

CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
}
"""What a fuzzed request may get. UNIMPLEMENTED is not here: every declared RPC is
served by this deployment."""

UNFINISHED = (common_pb2.FUTURE_STATUS_PENDING, common_pb2.FUTURE_STATUS_RUNNING)
UNDECODABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL}
"""What bytes that are not a request message may get."""

PROTOS = Path(__file__).resolve().parents[2] / "protos" / "tensafe"
DESTRUCTIVE = ("Delete", "Disable", "Revoke", "Close", "Cancel")
"""Name prefixes of RPCs that can remove the seeded objects the others need."""
OUTCOMES: defaultdict[str, Counter[str]] = defaultdict(Counter)
"""Status names each RPC answered the fuzzer with (printed after the run)."""
SKIPPED_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@dataclasses.dataclass(frozen=True)
class Rpc:
    """One RPC of a declared service."""

    service: ServiceDescriptor
    method: MethodDescriptor

    @property
    def path(self) -> str:
        """The method path, ``/package.Service/Method``."""
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        """The generated request class."""
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        """The generated response class."""
        return message_factory.GetMessageClass(self.method.output_type)

    def __str__(self) -> str:
        return f"{self.service.name}.{self.method.name}"


def declared_rpcs() -> list[Rpc]:
    """Every RPC of every service in the generated ``tensafe.proto`` modules."""
    rpcs: list[Rpc] = []
    for module in pkgutil.walk_packages(tensafe.proto.__path__, "tensafe.proto."):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(module.name).DESCRIPTOR
        for service in descriptor.services_by_name.values():
            rpcs.extend(Rpc(service, method) for method in service.methods)
    # Destructive RPCs last: a fuzzed delete of the seeded training client would
    # otherwise send every later trainer RPC to NOT_FOUND.
    return sorted(rpcs, key=lambda rpc: (rpc.method.name.startswith(DESTRUCTIVE), rpc.path))


RPCS = declared_rpcs()


def served_services(channel: grpc.Channel) -> set[str]:
    """The services a server registers, from its reflection service."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT))
    return {s.name for s in response.list_services_response.service} - SKIPPED_SERVICES


@pytest.fixture(scope="module")
def servers(target: FuzzTarget) -> dict[str, list[str]]:
    """Full service name → the stack services (processes) that serve it."""
    found: dict[str, list[str]] = {}
    for name, channel in target.channels.items():
        for service in served_services(channel):
            found.setdefault(service, []).append(name)
    return found


def invoke(
    channel: grpc.Channel,
    rpc: Rpc,
    requests: Sequence[Any],
    metadata: tuple[tuple[str, str], ...],
    *,
    raw: bool = False,
) -> tuple[grpc.StatusCode, str]:
    """Call ``rpc`` generically (one request, or a stream of them); returns code, details.

    ``raw`` sends ``requests`` as bytes as they are, without serialising a message.
    """

    def serialize(message: Any) -> bytes:
        return message if raw else message.SerializeToString()

    method = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(rpc.method.client_streaming, rpc.method.server_streaming)]
    call = method(
        rpc.path,
        request_serializer=serialize,
        response_deserializer=rpc.response_class.FromString,
    )
    argument = iter(requests) if rpc.method.client_streaming else requests[0]
    try:
        response = call(argument, metadata=metadata, timeout=CALL_TIMEOUT)
        if rpc.method.server_streaming:
            for _ in response:
                pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _log_excerpt(target: FuzzTarget, details: str) -> str:
    """The service log lines of an INTERNAL error's error id (its stack trace)."""
    match = re.search(r"error_id=([0-9a-f]+)", details)
    if not match:
        return ""
    for log in (target.data_dir / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        at = text.find(match.group(1))
        if at >= 0:
            return f"\n--- {log.name} ---\n{text[at : at + 4000]}"
    return ""


def assert_stack_alive(target: FuzzTarget) -> None:
    """Every stack process runs and every service reports SERVING."""
    # The gRPC services, the trainer worker, the Tinker API and the console (both HTTP,
    # no gRPC channel).
    assert len(target.pids) == len(target.channels) + 3, target.pids
    for pid, command in target.pids.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        assert state not in ("Z", "gone"), f"process {pid} ({command}) died"
    for name, channel in target.channels.items():
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name


def test_every_declared_service_is_enumerated_and_served(
    servers: dict[str, list[str]],
) -> None:
    declared = {rpc.service.full_name for rpc in RPCS}
    in_protos = sum(
        len(re.findall(r"^\s*rpc\s", proto.read_text(), flags=re.MULTILINE))
        for proto in PROTOS.glob("*/v1/*.proto")
    )
    assert (
        len(RPCS) == in_protos > 50
        and {
            "tensafe.auth.v1.AuthService",
            "tensafe.trainer.v1.TrainerService",
            "tensafe.common.v1.FutureService",
            "tensafe.he.v1.HeRuntimeService",
            "tensafe.registry.v1.RegistryService",
        }
        <= declared
    )
    assert set(servers) == declared, "a declared service is not served, or vice versa"


def _requests(rpc: Rpc, target: FuzzTarget) -> st.SearchStrategy[list[Message]]:
    """Fuzzed requests for one call: one message, or a stream of up to five."""
    fresh = message_strategy(rpc.method.input_type, target.pool)
    bases = target.bases.get(rpc.path, [])
    single = st.one_of(fresh, *(mutated(base, target.pool) for base in bases))
    if not rpc.method.client_streaming:
        return st.lists(single, min_size=1, max_size=1)
    # A stream usually opens with a valid header, then fuzzed parts; or it is a whole
    # valid stream with one part damaged.
    opening = st.one_of(*(st.just(base) for base in bases), single) if bases else single
    fuzzed = st.tuples(opening, st.lists(single, max_size=4)).map(lambda t: [t[0], *t[1]])
    stream = target.streams.get(rpc.path)
    return st.one_of(fuzzed, corrupted(stream)) if stream else fuzzed


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_fuzzed_requests_get_a_clean_status(
    rpc: Rpc, target: FuzzTarget, servers: dict[str, list[str]]
) -> None:
    own = "admin" if rpc.service.name == "AuthService" else "tenant"
    other = "tenant" if own == "admin" else "admin"

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(
        requests=_requests(rpc, target),
        server=st.sampled_from(servers[rpc.service.full_name]),
        credentials=st.sampled_from([own, own, own, other, "none", "garbage"]),
    )
    def fuzz(requests: list[Message], server: str, credentials: str) -> None:
        if credentials in target.tokens:
            metadata: tuple[tuple[str, str], ...] = (
                ("authorization", f"Bearer {target.tokens[credentials].token()}"),
            )
        elif credentials == "garbage":
            metadata = (("authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.x"),)
        else:
            metadata = ()
        code, details = invoke(target.channels[server], rpc, requests, metadata)
        OUTCOMES[str(rpc)][code.name] += 1
        shown = "\n".join(text_format.MessageToString(r, as_utf8=True)[:600] for r in requests)
        assert code in CLEAN and "Traceback" not in details, (
            f"{rpc} on {server} answered {code.name}: {details}\nrequests:\n{shown}"
            + _log_excerpt(target, details)
        )

    fuzz()
    assert_stack_alive(target)


def _garbage(rpc: Rpc, target: FuzzTarget, rng: random.Random) -> list[bytes]:
    """Bytes that are not (or may not be) a serialised request of ``rpc``."""
    bases = target.bases.get(rpc.path)
    if bases:
        valid = bases[0].SerializeToString()
    else:
        example = rpc.request_class()
        for field in rpc.method.input_type.fields:
            if field.type == field.TYPE_STRING and not field.is_repeated:
                setattr(example, field.name, target.pool.strings[0])
        valid = example.SerializeToString()
    return [
        b"\xff" * 16,
        b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length-delimited, length 2^32-1
        b"\x08",  # field 1 varint, value missing
        b"\x12\x05ab",  # field 2, length 5, 2 bytes given
        bytes(rng.getrandbits(8) for _ in range(64)),
        valid[: len(valid) // 2],
        valid[:-1],
        valid + b"\x0a",
    ]


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_malformed_bytes_get_invalid_argument_or_internal(
    rpc: Rpc, target: FuzzTarget, servers: dict[str, list[str]]
) -> None:
    own = "admin" if rpc.service.name == "AuthService" else "tenant"
    metadata = (("authorization", f"Bearer {target.tokens[own].token()}"),)
    rng = random.Random(rpc.path)
    for server in servers[rpc.service.full_name]:
        for payload in _garbage(rpc, target, rng):
            try:
                rpc.request_class.FromString(payload)
                allowed = CLEAN  # these bytes happen to decode: any clean answer
            except DecodeError:
                allowed = UNDECODABLE
            code, details = invoke(target.channels[server], rpc, [payload], metadata, raw=True)
            assert code in allowed and "Traceback" not in details, (
                f"{rpc} on {server}: {payload[:40]!r} got {code.name}: {details}"
                + _log_excerpt(target, details)
            )
    assert_stack_alive(target)


def _drain(target: FuzzTarget, budget: float = 90.0) -> None:
    """Wait (up to ``budget`` seconds) for the jobs the fuzzer got admitted to finish,
    so a job that crashes the worker shows up as a crashed future in the invariants."""
    stub = common_pb2_grpc.FutureServiceStub(target.channels["trainer"])
    deadline = time.monotonic() + budget
    for provider in target.tokens.values():
        metadata = (("authorization", f"Bearer {provider.token()}"),)
        listed = stub.ListFutures(
            common_pb2.ListFuturesRequest(page_size=1000), metadata=metadata, timeout=CALL_TIMEOUT
        )
        for future in listed.futures:
            remaining = deadline - time.monotonic()
            if future.status in UNFINISHED and remaining > 1:
                stub.WaitFuture(
                    common_pb2.WaitFutureRequest(
                        future_id=future.id, timeout=duration_pb2.Duration(seconds=30)
                    ),
                    metadata=metadata,
                    timeout=min(remaining, 31),
                )


def test_stack_survived_and_its_state_holds_every_invariant(target: FuzzTarget) -> None:
    assert_stack_alive(target)
    _drain(target)
    for rpc, codes in sorted(OUTCOMES.items()):
        print(f"{rpc:45} {dict(codes.most_common())}")
    if len(OUTCOMES) == len(RPCS) and EXAMPLES >= COVERAGE_EXAMPLES:
        # The seeded ids and valid bases get the fuzzer past the first validation. A
        # short pass (the PostgreSQL one in scripts/test.sh, 3 examples per RPC, which
        # is there to catch INTERNAL on that database) draws too few examples per RPC
        # for this share to be a property of the fuzzer rather than of the draw.
        answered_ok = [rpc for rpc, codes in OUTCOMES.items() if codes["OK"]]
        assert len(answered_ok) >= len(RPCS) // 3, sorted(answered_ok)
    if FUZZ_DATABASE != "sqlite":
        return  # the invariant checker reads the SQLite files of the default stack
    violations = check_stack(target.data_dir)
    assert not violations, "\n".join(map(str, violations))


def _snapshot(source: Path, destination: Path) -> None:
    """A consistent single-file copy of a live SQLite database."""
    with (
        sqlite3.connect(f"file:{source}?mode=ro", uri=True) as live,
        sqlite3.connect(destination) as copy,
    ):
        live.backup(copy)


@pytest.mark.skipif(FUZZ_DATABASE != "sqlite", reason="the checker reads SQLite files")
def test_the_invariant_checker_reports_corrupted_state(target: FuzzTarget, tmp_path: Path) -> None:
    copy = tmp_path / "stack"
    (copy / "db").mkdir(parents=True)
    for name in ("auth", "trainer", "registry", "he_runtime"):
        _snapshot(target.data_dir / "db" / f"{name}.db", copy / "db" / f"{name}.db")
    shutil.copytree(target.data_dir / "objects", copy / "objects")
    assert check_stack(copy) == []

    with sqlite3.connect(copy / "db" / "auth.db") as sql:
        sql.execute("UPDATE auth_audit_events SET kind = 'edited' WHERE seq = 2")
    with sqlite3.connect(copy / "db" / "trainer.db") as sql:
        sql.execute("DELETE FROM trainer_privacy_ledger WHERE dp_step = 1")
    with sqlite3.connect(copy / "db" / "registry.db") as sql:
        sql.execute(
            "INSERT INTO registry_versions (adapter_id, version, tenant_id, package_sha256, "
            "size_bytes, manifest_json, signer_key_id, create_time_us) "
            "VALUES (?, 1, 't', ?, 1, '{}', 'k', 0)",
            ("no-such-adapter", "ab" * 32),
        )
    (copy / "objects" / "registry" / "objects" / "staging" / "upload-partial").write_bytes(b"x")
    keys = copy / "objects" / "he_runtime" / "he_runtime" / "keys"
    (keys / f"{'d' * 32}.galois").write_bytes(b"keys without a session row")

    rules = {(v.service, v.rule) for v in check_stack(copy)}
    assert rules == {
        ("auth", "audit chain"),
        ("trainer", "ledger steps"),
        ("registry", "version adapter"),
        ("registry", "package missing"),
        ("registry", "staging"),
        ("he_runtime", "orphan key files"),
    }
