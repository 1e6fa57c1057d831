"""Fault tests on the real local stack: crash or cut one dependency, check the invariants.

One ``tensafe up`` stack (every service its own process, an embedded ``nats-server``
with JetStream) serves the module, on PostgreSQL. The machine's PostgreSQL is shared,
so it is never restarted: the stack reaches it through :class:`~.pg_proxy.PgProxy`, a
TCP proxy the test cuts (every connection reset, new ones refused) and restores, which
is a database outage exactly as the services see it.

Faults: NATS stopped and started again during a stream of training steps; PostgreSQL
cut during a step; ``kill -9`` of the trainer API mid-stream, of the trainer worker
while it runs a step, of the registry mid-upload and of the HE runtime mid-request;
each killed process is started again on its port. After each fault the test checks
what a wrong program would break:

* every acknowledged OptimStep was applied exactly once: the steps the client saw are
  1..n, the server's step, ``applied_seq`` and dp step count agree, and the privacy
  ledger holds exactly one row per step, its ε equal to an independent RDP accountant's
  (``dp_accounting``) for n steps;
* during the outage every call either succeeded (the SDK retried UNAVAILABLE with
  backoff and rode through) or failed with UNAVAILABLE: never another status or a
  wrong answer; the SDK's calls never raised;
* no partial TGSP object is ever visible, a crashed upload's staging file is swept at
  start, and publishing again with the same request id creates exactly one version;
* an HE request cut by a crash is UNAVAILABLE, never a decrypted wrong result; HE
  sessions live in memory (by design), so the old session is NOT_FOUND afterwards and a
  new one computes the right delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from dp_accounting.rdp import rdp_privacy_accountant
from sqlalchemy.ext.asyncio import create_async_engine

from tensafe import tgsp
from tensafe.client.auth import TokenProvider, authenticated_channel
from tensafe.client.demo import TenantCredentials, create_tenant
from tensafe.client.he import HeLoraSession, HeRuntimeRpc
from tensafe.client.registry import RegistryClient
from tensafe.client.retry import RetryPolicy
from tensafe.client.stack import TRAINER_SIGNING_KEY, LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model, tiny_corpus
from tensafe.client.train_cli import build_corpus, to_datum
from tensafe.client.training import ChannelOptions, make_channel
from tensafe.common import errors
from tensafe.proto.common.v1 import common_pb2
from tensafe.tinker import ServiceClient, types
from tensafe.trainer.store import repository as repo
from testkit.postgres import create_database, drop_database

from .pg_proxy import PgProxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(300)]

BASE_MODEL = "tiny-llama"
SIGMA = 1.0
DELTA = 1e-5
RANK, ALPHA, WIDTH = 4, 8.0, 64
# Enough attempts to ride through a service restart (each pause is at most 1 s).
RIDE_THROUGH = ChannelOptions(
    call_timeout_seconds=30.0,
    wait_slice_seconds=5.0,
    retry=RetryPolicy(max_attempts=80, initial_backoff_seconds=0.05, max_backoff_seconds=1.0),
)
# Short redelivery and lease times so that a killed worker's job comes back quickly.
STACK_ENV = {
    "TENSAFE_JOB_ACK_WAIT_SECONDS": "2",
    "TENSAFE_LEASE_SECONDS": "2",
    "TENSAFE_OUTBOX_INTERVAL_SECONDS": "0.5",
    "TENSAFE_OUTBOX_GRACE_SECONDS": "0.5",
    "TENSAFE_TORCH_THREADS": "1",
}


# ------------------------------------------------------------------ the stack


@dataclass
class Stack:
    local: LocalStack
    proxy: PgProxy
    direct_url: str
    data_dir: Path
    connection: dict[str, Any]
    tenant: TenantCredentials

    def address(self, service: str) -> str:
        return str(self.connection["services"][service])

    def query(self, statement: str, **params: Any) -> list[Any]:
        """Read the services' tables directly (not through the proxy)."""

        async def run() -> list[Any]:
            engine = create_async_engine(self.direct_url)
            try:
                async with engine.connect() as connection:
                    return list((await connection.execute(sa.text(statement), params)).all())
            finally:
                await engine.dispose()

        return asyncio.run(run())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    database = asyncio.run(create_database("tensafe_test"))
    server = sa.make_url(database.admin_url)
    proxy = PgProxy(server.host or "127.0.0.1", server.port or 5432).start()
    proxied = server.set(host="127.0.0.1", port=proxy.port, database=database.name)
    data_dir = tmp_path_factory.mktemp("faults")
    build_tiny_model(
        data_dir / "models" / BASE_MODEL,
        seed=0,
        vocab_size=512,
        hidden_size=WIDTH,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in STACK_ENV.items():
                env.setenv(key, value)
            local = LocalStack(
                StackOptions(
                    data_dir=data_dir,
                    database_url=proxied.render_as_string(hide_password=False),
                )
            )
            with local:
                connection = local.start()
                tenant = create_tenant(local.connection_file, name="faults")
                yield Stack(
                    local=local,
                    proxy=proxy,
                    direct_url=database.url,
                    data_dir=data_dir,
                    connection=connection,
                    tenant=tenant,
                )
    finally:
        proxy.close()
        asyncio.run(drop_database(database))


@pytest.fixture(autouse=True)
def healed(stack: Stack) -> Iterator[None]:
    """Whatever a failed test left broken is repaired before the next one."""
    yield
    stack.proxy.restore()
    with contextlib.suppress(Exception):
        stack.local.start_nats()
    for name in ("registry", "he_runtime", "trainer", "trainer-worker"):
        with contextlib.suppress(Exception):
            stack.local.restart(name)  # refuses (StackError) when still running


# ------------------------------------------------------------------ clients


class StatusRecorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the status of every unary attempt the SDK makes (retries included)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, grpc.StatusCode]] = []
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        with self._lock:
            self.calls.append((details.method.rsplit("/", 1)[-1], call.code()))
        return call

    def codes(self) -> set[grpc.StatusCode]:
        with self._lock:
            return {code for _, code in self.calls}

    def count(self, method: str, code: grpc.StatusCode = grpc.StatusCode.OK) -> int:
        with self._lock:
            return sum(1 for m, c in self.calls if m == method and c == code)


def _channel(stack: Stack, service: str) -> tuple[grpc.Channel, grpc.Channel]:
    auth_channel = make_channel(stack.address("auth"), options=RIDE_THROUGH)
    provider = TokenProvider(auth_channel, stack.tenant.api_key)
    channel = authenticated_channel(
        make_channel(stack.address(service), options=RIDE_THROUGH), provider
    )
    return channel, auth_channel


@dataclass
class Training:
    """A DP training client and what the test saw of its steps."""

    service: ServiceClient
    client: Any
    datums: list[types.Datum]
    recorder: StatusRecorder
    steps_seen: list[int] = field(default_factory=list)
    epsilons_seen: list[float] = field(default_factory=list)
    jobs: int = 0

    def forward_backward(self) -> Any:
        self.jobs += 1
        return self.client.forward_backward(self.datums, "cross_entropy")

    def optim_step(self) -> Any:
        self.jobs += 1
        return self.client.optim_step(types.AdamParams(learning_rate=1e-2))

    def acknowledge(self, fb: Any, optim: Any) -> None:
        fb.result()
        result = optim.result()
        self.steps_seen.append(result.step)
        self.epsilons_seen.append(result.privacy_spent.epsilon)

    def step(self) -> None:
        fb = self.forward_backward()
        self.acknowledge(fb, self.optim_step())


@contextlib.contextmanager
def training(stack: Stack, *, batch: int = 8) -> Iterator[Training]:
    recorder = StatusRecorder()
    channel, auth_channel = _channel(stack, "trainer")
    service = ServiceClient(
        channel=grpc.intercept_channel(channel, recorder),
        base_models_dir=stack.data_dir / "models",
        options=RIDE_THROUGH,
    )
    try:
        client = service.create_lora_training_client(
            base_model=BASE_MODEL, rank=RANK, lora_alpha=ALPHA, dp_noise_multiplier=SIGMA
        )
        corpus = build_corpus(tiny_corpus()[:64], client.get_tokenizer().encode, max_length=32)
        datums = [to_datum(tokens) for tokens in corpus.sequences[:batch]]
        yield Training(service, client, datums, recorder)
    finally:
        service.close()
        auth_channel.close()


def _reference_epsilon(steps: int) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(SIGMA), steps)
    )
    return float(accountant.get_epsilon(DELTA))


def assert_exactly_once(stack: Stack, run: Training, steps: int) -> None:
    """Every acknowledged step applied once, ε charged once, only OK/UNAVAILABLE seen."""
    assert run.steps_seen == list(range(1, steps + 1))
    expected = [_reference_epsilon(n) for n in range(1, steps + 1)]
    assert run.epsilons_seen == pytest.approx(expected, rel=1e-6)
    spent = run.client.get_privacy_spent()
    assert spent.steps == steps and spent.accountant == "rdp"
    assert spent.epsilon == pytest.approx(expected[-1], rel=1e-6)
    client_id = str(run.client.model_id)
    (row,) = stack.query(
        "SELECT step, applied_seq, dp_steps, epsilon_spent FROM trainer_training_clients "
        "WHERE id = :id",
        id=client_id,
    )
    assert (row.step, row.applied_seq, row.dp_steps) == (steps, run.jobs, steps)
    assert row.epsilon_spent == pytest.approx(expected[-1], rel=1e-6)
    ledger = stack.query(
        "SELECT dp_step, seq, future_id, epsilon_after FROM trainer_privacy_ledger "
        "WHERE client_id = :id ORDER BY dp_step",
        id=client_id,
    )
    assert [entry.dp_step for entry in ledger] == list(range(1, steps + 1))
    assert (
        len({entry.future_id for entry in ledger}) == len({entry.seq for entry in ledger}) == steps
    )
    assert [entry.epsilon_after for entry in ledger] == pytest.approx(expected, rel=1e-6)
    open_reservations = stack.query(
        "SELECT count(*) AS n FROM trainer_budget_reservations "
        "WHERE client_id = :id AND status = :reserved",
        id=client_id,
        reserved=repo.RESERVED,
    )
    assert open_reservations[0].n == 0
    unfinished = stack.query(
        "SELECT count(*) AS n FROM trainer_jobs WHERE client_id = :id AND status != :done",
        id=client_id,
        done=repo.JOB_DONE,
    )
    assert unfinished[0].n == 0
    assert run.recorder.codes() <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        run.recorder.calls
    )


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition the test cannot be told about (polls; fails on timeout)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Background:
    """Runs a function in a thread; :meth:`join` re-raises what it raised."""

    def __init__(self, function: Callable[[], None]) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                function()
            except BaseException as error:
                self._error = error

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background work hung"
        if self._error is not None:
            raise self._error


# ------------------------------------------------------------------ trainer faults


def test_nats_stopped_and_restarted_during_a_stream_of_steps(stack: Stack) -> None:
    steps = 6
    with training(stack) as run:
        run.step()
        run.step()
        fb = run.forward_backward()  # the worker picks it up as NATS goes away
        stack.local.stop_nats()
        # Admitted while NATS is down: the job waits in the API's outbox.
        optim = run.optim_step()
        stack.local.start_nats()
        run.acknowledge(fb, optim)
        for _ in range(steps - 3):
            run.step()
        assert_exactly_once(stack, run, steps)


def test_postgres_cut_during_a_step(stack: Stack) -> None:
    with training(stack) as run:
        run.step()
        fb = run.forward_backward()  # the worker runs it as the database goes away
        stack.proxy.cut()
        submitted: list[Any] = []
        try:
            # Admitted during the outage: the SDK retries UNAVAILABLE with the same
            # request id until the database is back.
            admitting = Background(lambda: submitted.append(run.optim_step()))
            _until(
                lambda: (
                    run.recorder.count("OptimStep", grpc.StatusCode.UNAVAILABLE) >= 1
                    and stack.proxy.refused >= 3
                ),
                60,
                "the client and the services to see the outage",
            )
        finally:
            stack.proxy.restore()
        admitting.join()
        run.acknowledge(fb, submitted[0])
        run.step()
        assert_exactly_once(stack, run, 3)
        assert run.recorder.count("OptimStep") == 3  # one admission per step


def test_trainer_api_killed_mid_stream(stack: Stack) -> None:
    with training(stack) as run:
        run.step()
        fb = run.forward_backward()
        stack.local.kill("trainer")
        restarting = Background(lambda: stack.local.restart("trainer"))
        # Submitted while the API is down: the SDK retries with the same request id
        # until the restarted API answers.
        optim = run.optim_step()
        run.acknowledge(fb, optim)
        restarting.join()
        run.step()
        assert_exactly_once(stack, run, 3)
        assert run.recorder.count("OptimStep", grpc.StatusCode.UNAVAILABLE) >= 1
        assert run.recorder.count("OptimStep") == 3  # one admission per step


def test_worker_killed_while_running_a_step(stack: Stack) -> None:
    with training(stack, batch=32) as run:
        run.step()
        # Kill the worker once it has marked a ForwardBackward RUNNING; a job that
        # finished before the poll saw it running is simply the next one's predecessor.
        killed_during = None
        pending = []
        for _ in range(6):
            fb = run.forward_backward()
            pending.append(fb)
            seen: list[int] = []

            def started(future_id: str = fb.future_id, seen: list[int] = seen) -> bool:
                seen.append(run.service.rpc.get_future(future_id).status)
                return seen[-1] != common_pb2.FUTURE_STATUS_PENDING  # RUNNING or finished

            _until(started, 60, "the worker to take the job")
            if seen[-1] == common_pb2.FUTURE_STATUS_RUNNING:
                stack.local.kill("trainer-worker")
                killed_during = fb.future_id
                break
        assert killed_during is not None, "never caught the worker running a job"
        stack.local.restart("trainer-worker")
        optim = run.optim_step()
        for earlier in pending[:-1]:
            earlier.result()
        run.acknowledge(pending[-1], optim)
        run.step()
        assert_exactly_once(stack, run, 3)


# ------------------------------------------------------------------ registry and HE

MODULES = tuple(
    f"base_model.model.model.layers.{layer}.self_attn.{proj}"
    for layer in (0, 1)
    for proj in ("q_proj", "v_proj")
)


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for module in MODULES:
        weights[f"{module}.lora_A.weight"] = (0.2 * rng.standard_normal((RANK, WIDTH))).astype(
            np.float32
        )
        weights[f"{module}.lora_B.weight"] = (0.2 * rng.standard_normal((WIDTH, RANK))).astype(
            np.float32
        )
    return weights


def _package(stack: Stack, adapter_name: str, weights: dict[str, np.ndarray]) -> bytes:
    """A package as the trainer seals one: its signing key, the tenant's shared KEK."""
    import datetime as dt

    kek = tgsp.LocalFileKekProvider(stack.data_dir / "keks")
    if not kek.has_tenant_kek(stack.tenant.tenant_id):
        kek.create_tenant_kek(stack.tenant.tenant_id)
    return tgsp.write(
        weights=weights,
        adapter=tgsp.AdapterRef(adapter_id=adapter_name, version="1"),
        base_model=tgsp.BaseModelRef(model_id=BASE_MODEL, weights_sha256="ab" * 32),
        lora=tgsp.LoraSpec(
            rank=RANK,
            alpha=ALPHA,
            dropout=0.0,
            target_modules=("q_proj", "v_proj"),
            task_type="CAUSAL_LM",
        ),
        dp_certificate=tgsp.DPGuarantee(
            epsilon=2.5,
            delta=DELTA,
            accountant="rdp",
            noise_multiplier=SIGMA,
            max_grad_norm=1.0,
            sampling=tgsp.PoissonSampling(rate=0.01),
            steps=10,
        ),
        provenance=tgsp.Provenance(
            tenant_id=stack.tenant.tenant_id,
            training_client_id="faults",
            code_version="0.1.0+test",
            created_at=dt.datetime.now(dt.UTC),
        ),
        kek_provider=kek,
        signing_key=tgsp.SigningKey.from_pem((stack.data_dir / TRAINER_SIGNING_KEY).read_bytes()),
    )


@contextlib.contextmanager
def registry_client(stack: Stack) -> Iterator[tuple[RegistryClient, grpc.Channel]]:
    channel, auth_channel = _channel(stack, "registry")
    with RegistryClient(
        channel, call_timeout_seconds=60, retry=RIDE_THROUGH.retry, also_close=(auth_channel,)
    ) as client:
        yield client, channel


class CrashingPackage(bytes):
    """Package bytes whose streaming by the SDK runs ``at_offset`` once, before the chunk
    that starts at ``offset`` leaves: a crash at a known point of the upload."""

    offset: int
    at_offset: Callable[[], None] | None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice) and (key.start or 0) >= self.offset and self.at_offset:
            hook, self.at_offset = self.at_offset, None
            hook()
        return bytes(self).__getitem__(key)


def _object_files(stack: Stack) -> tuple[list[Path], list[Path]]:
    root = stack.data_dir / "objects" / "registry" / "objects"
    return sorted((root / "staging").iterdir()), sorted((root / "sha256").rglob("*/*"))


def test_registry_killed_mid_upload(stack: Stack) -> None:
    import hashlib

    name, request_id, chunk = "crash-upload", uuid.uuid4().hex, 1024
    package = _package(stack, name, _weights(seed=3))
    digest = hashlib.sha256(package).hexdigest()
    assert len(package) > 8 * chunk

    crashed: list[tuple[list[int], set[str]]] = []
    restarted: list[tuple[list[Path], list[Path]]] = []

    def crash() -> None:
        # The registry has opened its staging file: the upload is under way. Runs on
        # the SDK's request-streaming thread while the caller waits for the answer.
        _until(lambda: bool(_object_files(stack)[0]), 30, "the upload to be staged")
        stack.local.kill("registry")
        staging, objects = _object_files(stack)
        crashed.append(([p.stat().st_size for p in staging], {p.name for p in objects}))
        stack.local.restart("registry")
        restarted.append(_object_files(stack))

    crashing = CrashingPackage(package)
    crashing.offset, crashing.at_offset = 4 * chunk, crash
    with registry_client(stack) as (registry, _):
        # The SDK sees UNAVAILABLE, backs off and streams the package again under the
        # same request id until the restarted registry takes it: one version.
        first = registry.publish(name, crashing, request_id=request_id, chunk_bytes=chunk)
        ((staged_sizes, object_names),) = crashed
        assert len(staged_sizes) == 1 and staged_sizes[0] < len(package)
        assert digest not in object_names
        ((staging, objects),) = restarted
        assert staging == [], "the crashed upload's staging file survived the restart"
        for path in objects:  # every visible object is complete: its name is its hash
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        assert digest not in {p.name for p in objects}

        again = registry.publish(name, package, request_id=request_id, chunk_bytes=chunk)
        assert (first.version, first.package_sha256) == (1, digest)
        assert (again.version, again.package_sha256) == (1, digest)
        assert [v.version for v in registry.list_versions(name)] == [1]
        assert registry.download(name, version=1).package == package
    staging, objects = _object_files(stack)
    assert staging == [] and digest in {p.name for p in objects}


class CrashingHeRpc(HeRuntimeRpc):
    """The SDK's HE calls; ``crash_next`` runs while the next ApplyLora is being sent
    (after its header, before its ciphertexts): a crash mid-request."""

    crash_next: Callable[[], None] | None = None

    def apply_lora(self, session_id: str, layer: str, ciphertexts: Any, **kwargs: Any) -> Any:
        hook, self.crash_next = self.crash_next, None
        if hook is None:
            return super().apply_lora(session_id, layer, ciphertexts, **kwargs)

        pending = [hook]  # once: the SDK's retry iterates the ciphertexts again

        class Crashing(list):  # type: ignore[type-arg]
            def __iter__(self) -> Any:
                if pending:
                    pending.pop()()
                return super().__iter__()

        # Streamed (not ApplyLoraInline), so the crash falls between the header and the
        # ciphertexts.
        return self.apply_lora_streamed(session_id, layer, Crashing(ciphertexts), **kwargs)


def test_he_runtime_killed_mid_request(stack: Stack) -> None:
    name = "he-crash"
    weights = _weights(seed=5)
    with registry_client(stack) as (registry, _):
        registry.publish(name, _package(stack, name, weights))
    channel, auth_channel = _channel(stack, "he_runtime")
    rpc = CrashingHeRpc(channel, options=RIDE_THROUGH, also_close=(auth_channel,))
    x = np.random.default_rng(0).normal(0.0, 1.0, (1, WIDTH))

    def expected(layer: str) -> np.ndarray:
        lora_a = weights[f"base_model.model.{layer}.lora_A.weight"].astype(np.float64)
        lora_b = weights[f"base_model.model.{layer}.lora_B.weight"].astype(np.float64)
        return (ALPHA / RANK) * (x @ lora_a.T) @ lora_b.T

    def close_to(delta: np.ndarray, reference: np.ndarray) -> bool:
        return bool(np.allclose(delta, reference, rtol=0, atol=1e-3 * np.abs(reference).max()))

    def open_session() -> HeLoraSession:
        return HeLoraSession.create(
            rpc, adapter_name=name, rank=RANK, alpha=ALPHA, hidden_size=WIDTH, output_size=WIDTH
        )

    try:
        session = open_session()
        layer = session.layers[0]
        assert close_to(session.apply(layer, x, output_size=WIDTH), expected(layer))

        def crash() -> None:
            stack.local.kill("he_runtime")
            stack.local.restart("he_runtime")

        # The SDK retries the cut ApplyLora (UNAVAILABLE) until the restarted runtime
        # answers; the session is durable (its row and key file outlive the process), so
        # the new process rebuilds it and the retry succeeds with the correct delta.
        rpc.crash_next = crash
        assert close_to(session.apply(layer, x, output_size=WIDTH), expected(layer))
        assert session.refresh().id == session.session.id
        for other in session.layers:
            assert close_to(session.apply(other, x, output_size=WIDTH), expected(other)), other
        session.close()
        with pytest.raises(errors.NotFound):
            session.refresh()
        fresh = open_session()
        for other in fresh.layers:
            assert close_to(fresh.apply(other, x, output_size=WIDTH), expected(other)), other
        fresh.close()
    finally:
        rpc.close()
