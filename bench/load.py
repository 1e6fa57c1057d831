"""Load test: N tenants x M concurrent clients against the local stack (``tensafe up``).

The bench starts a :class:`~tensafe.client.stack.LocalStack` in a temporary data dir
(every service its own process on loopback, NATS JetStream, SQLite), unless
``--connection-file`` names a running one, and builds the tiny base model. For each of
N tenants the platform admin creates the tenant, a trainer principal and an API key;
the tenant DP-trains one step on a publisher training client and publishes the adapter
with ``save_adapter`` (the package its clients read and the adapter its HE sessions
apply). Then M workers per tenant (threads; the SDK is synchronous gRPC), each with its
own SDK connections and its own DP training client, loop for ``--duration`` seconds
over a weighted mix of

  train_step         ForwardBackward + OptimStep submitted back to back, timed until
                     the OptimStep future is SUCCEEDED (tensafe.tinker SDK);
  registry_list      ListAdapters (the tenant's adapter must be listed);
  registry_get       GetAdapter (its latest version must be the published one);
  registry_download  DownloadAdapter (the bytes' SHA-256 must be the package's);
  he_apply           one encrypted LoRA delta on the worker's HE session: encrypt,
                     ApplyLora, decrypt, compared with the plaintext delta of the
                     opened adapter (tensafe.client.he).

The load runs ``--warmup`` seconds (default 10) before the measured ``--duration``:
at its start every client submits its first step at once, and the worker builds each
client's engine (its adapter on the shared base) at that client's first job, so the
first round is a burst of N engine builds and N queued steps, not the sustained load.
Operations started in the warm-up are summarised on one line and left out of the
table (``--warmup 0`` measures from the first call).

Set-up (not timed as load) connects each worker's SDK clients, creates its training
client and HE session and makes one registry call, so that every client's API-key
exchanges are done before the load starts. Every call's latency and status code (typed
SDK errors carry it) is recorded. The SDK retries UNAVAILABLE on trainer calls itself;
the bench retries UNAVAILABLE and RESOURCE_EXHAUSTED (capped backoff, full jitter) on
every operation and counts each refused attempt under its code. Any other code, a wrong
answer (WRONG_RESULT) or giving up after the retries (GAVE_UP) is a non-retryable error.

Afterwards the consistency check, per training client: the server's step count and
its privacy-spent step count equal the OptimSteps the bench saw acknowledged; the
privacy ledger (read from the trainer's database) has exactly one charge per step,
numbered 1..n, whose future ids are exactly the acknowledged OptimStep futures; its last
epsilon equals GetPrivacySpent's, which equals an RDP accountant built here directly on
dp-accounting for n Gaussian steps of the requested sigma at the requested delta. Then
``tensafe audit verify`` must report the audit hash chain intact, and there must be zero
non-retryable errors. The exit code is 1 when any of this fails.

After each load the bench prints the trainer worker's resident memory (RSS, from
``/proc``, with its peak so far, ``VmHWM``) against the bound "one base + N x (adapter +
optimizer + accountant) x 1.5 + 300 MB" (N the load's training clients; the base and
per-client sizes from the worker's ``/metrics``: ``tensafe_trainer_base_model_bytes``,
``tensafe_trainer_resident_client_bytes`` over ``tensafe_trainer_resident_clients``)
and the worker's base loads and client engine loads so far
(``tensafe_trainer_base_loads_total``, ``tensafe_trainer_engine_loads_total``): one
base load per base model, whatever the number of clients. A stack given by
``--connection-file`` must serve ``/metrics``.

``--sweep 1x1,2x2,4x2,4x4`` runs several loads on one stack (fresh tenants each) and
reports the highest that passes with zero non-retryable errors and every operation's
p99 within ``--max-p99-ms``; it exits 1 if the ledger/step/audit check fails at any load
or no load passes.

All clients run in this one process, on the same cores as the services: the bench's
own encryption and bookkeeping is part of the load. Figures on a shared machine are
noisy; the load average before and after each run is printed.

Run: ``python bench/load.py [--tenants 2] [--clients-per-tenant 2] [--duration 30]
[--warmup 10] [--mix train=4,registry=4,he=1] [--sweep 1x1,2x2,4x2,4x4]
[--connection-file F]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import dp_accounting
import numpy as np
import sqlalchemy as sa
from dp_accounting.rdp import rdp_privacy_accountant
from sqlalchemy.ext.asyncio import create_async_engine

from tensafe import tgsp
from tensafe.client.demo import TenantCredentials, create_tenant
from tensafe.client.he import HeLoraSession, HeRuntimeRpc, open_he_runtime
from tensafe.client.registry import RegistryClient
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model
from tensafe.client.train_cli import to_datum
from tensafe.common.errors import ErrorCode, TenSafeError
from tensafe.helora.plan import Packing
from tensafe.tinker import ServiceClient, TrainingClient, types

T = TypeVar("T")

BASE_MODEL = "load-llama"
OPS = ("train_step", "registry_list", "registry_get", "registry_download", "he_apply")
MIX_KINDS = ("train", "registry", "he")
RETRYABLE = frozenset({ErrorCode.UNAVAILABLE.value, ErrorCode.RESOURCE_EXHAUSTED.value})
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
LORA_RANK = 8
LORA_ALPHA = 16.0
# An HE delta is compared with the plaintext one; CKKS at the default 2^40 scale is
# accurate to ~1e-6 of the values' magnitude, so 1e-3 relative flags only real errors.
HE_RELATIVE_TOLERANCE = 1e-3
# Epsilon from the server vs the independent accountant: same curves, same conversion.
EPSILON_RELATIVE_TOLERANCE = 1e-9
RETRY_ATTEMPTS = 6
RESULT_TIMEOUT_SECONDS = 600.0


class OpFailed(Exception):
    """An operation ended with a non-retryable error (already recorded)."""


class Recorder:
    """Latencies of successful operations and refused attempts by code (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.warmup: dict[str, list[float]] = collections.defaultdict(list)
        """Latencies of operations that started before :attr:`measure_from`."""
        self.measure_from = 0.0
        """``time.perf_counter()`` from which a started operation is measured."""
        self.retried: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.failed: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.messages: list[str] = []

    def ok(self, op: str, seconds: float) -> None:
        warming = time.perf_counter() - seconds < self.measure_from
        with self._lock:
            (self.warmup if warming else self.latencies)[op].append(seconds)

    def retry(self, op: str, code: str) -> None:
        with self._lock:
            self.retried[op][code] += 1

    def fail(self, op: str, code: str, message: str) -> None:
        with self._lock:
            self.failed[op][code] += 1
            if len(self.messages) < 20:
                self.messages.append(f"{op}: {code}: {message}")

    def non_retryable(self) -> int:
        return sum(sum(c.values()) for c in self.failed.values())


@dataclasses.dataclass
class ClientRecord:
    """What the bench knows about one DP training client's steps."""

    tenant: str
    training_client_id: str
    acknowledged: list[str] = dataclasses.field(default_factory=list)
    """OptimStep future ids seen SUCCEEDED."""
    unresolved: list[Any] = dataclasses.field(default_factory=list)
    """OptimStep futures whose outcome the bench did not see (resolved at the check)."""


@dataclasses.dataclass
class Tenant:
    """A tenant made for the run, with its published adapter."""

    credentials: TenantCredentials
    adapter_name: str
    version: int
    package_sha256: str
    deltas: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per adapted layer: A (r x d) and B (d_out x r), float64."""


@dataclasses.dataclass(frozen=True)
class Settings:
    connection_file: Path
    trainer_database_url: str
    duration: float
    warmup: float
    mix: dict[str, float]
    batch: int
    tokens: int
    vocab: int
    hidden: int
    he_packing: Packing
    he_tokens: int
    seed: int


def _call(recorder: Recorder, op: str, function: Callable[[], T]) -> T:
    """Run ``function``; retry UNAVAILABLE / RESOURCE_EXHAUSTED, record the rest."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return function()
        except TenSafeError as error:
            code = error.code.value
            if code not in RETRYABLE:
                recorder.fail(op, code, error.message)
                raise OpFailed from None
            recorder.retry(op, code)
            if attempt == RETRY_ATTEMPTS:
                recorder.fail(op, "GAVE_UP", f"{code} after {attempt} attempts: {error.message}")
                raise OpFailed from None
            # The server's hint when it gives one (rate limits), else full jitter
            # (Brooker, AWS Architecture Blog, 2015) capped at 5 s.
            hint = error.metadata.get("retry_after_seconds")
            pause = min(5.0, 0.2 * 2 ** (attempt - 1)) * random.random()
            time.sleep(float(hint) if hint else pause)
    raise AssertionError("unreachable")


def _random_batch(rng: random.Random, settings: Settings) -> list[types.Datum]:
    # Token ids from 3 up: 0..2 are the tokenizer's <pad>, <s>, </s>.
    return [
        to_datum([rng.randrange(3, settings.vocab) for _ in range(settings.tokens + 1)])
        for _ in range(settings.batch)
    ]


def _train_step(
    client: TrainingClient,
    record: ClientRecord,
    rng: random.Random,
    settings: Settings,
    recorder: Recorder,
) -> None:
    """ForwardBackward + OptimStep, both submitted before waiting (as Tinker clients do)."""
    op = "train_step"
    started = time.perf_counter()
    batch = _random_batch(rng, settings)
    backward = _call(recorder, op, lambda: client.forward_backward(batch, "cross_entropy"))
    step = _call(recorder, op, lambda: client.optim_step(types.AdamParams(learning_rate=1e-3)))
    try:
        backward.result(timeout=RESULT_TIMEOUT_SECONDS)
        step.result(timeout=RESULT_TIMEOUT_SECONDS)
    except (TenSafeError, TimeoutError) as error:
        if not step.done():
            record.unresolved.append(step)
        code = error.code.value if isinstance(error, TenSafeError) else "DEADLINE_EXCEEDED"
        recorder.fail(op, code, str(error))
        raise OpFailed from None
    record.acknowledged.append(step.future_id)
    recorder.ok(op, time.perf_counter() - started)


def _check(condition: bool, recorder: Recorder, op: str, message: str) -> None:
    if not condition:
        recorder.fail(op, "WRONG_RESULT", message)
        raise OpFailed


class Worker:
    """One concurrent client of a tenant: its own connections and training client."""

    def __init__(self, tenant: Tenant, index: int, settings: Settings, recorder: Recorder) -> None:
        self.tenant = tenant
        self.settings = settings
        self.recorder = recorder
        self.rng = random.Random(f"{settings.seed}-{tenant.credentials.tenant_id}-{index}")
        self.numbers = np.random.default_rng(self.rng.randrange(2**32))
        self.service: ServiceClient | None = None
        self.registry: RegistryClient | None = None
        self.he_rpc: HeRuntimeRpc | None = None
        self.session: HeLoraSession | None = None
        self.client: TrainingClient | None = None
        self.record: ClientRecord | None = None
        self.setup_seconds: dict[str, float] = {}

    def setup(self) -> None:
        """Connect, create the training client and (if HE is in the mix) the HE session."""
        key, path = self.tenant.credentials.api_key, self.settings.connection_file
        started = time.perf_counter()
        self.service = ServiceClient(api_key=key, connection_file=path)
        self.client = self.service.create_lora_training_client(
            base_model=BASE_MODEL,
            rank=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            dp_noise_multiplier=NOISE_MULTIPLIER,
            delta=DELTA,
        )
        self.record = ClientRecord(self.tenant.credentials.tenant_id, str(self.client.model_id))
        self.registry = RegistryClient.connect(connection_file=path, api_key=key)
        # Its first call exchanges the API key for a token (argon2 at auth): set-up, like
        # the training client's, not a registry read (64 first calls at once: 5-6 s).
        list(self.registry.list_adapters())
        self.setup_seconds["connect (trainer, registry) + training client"] = (
            time.perf_counter() - started
        )
        if self.settings.mix.get("he", 0) > 0:
            started = time.perf_counter()
            self.he_rpc = open_he_runtime(api_key=key, connection_file=path)
            self.session = HeLoraSession.create(
                self.he_rpc,
                adapter_name=self.tenant.adapter_name,
                adapter_version=self.tenant.version,
                rank=LORA_RANK,
                alpha=LORA_ALPHA,
                hidden_size=self.settings.hidden,
                output_size=self.settings.hidden,
                tokens=self.settings.he_tokens,
                packing=self.settings.he_packing,
            )
            self.setup_seconds["HE session (keys + upload)"] = time.perf_counter() - started

    def run(self, deadline: float) -> None:
        """Loop over the mix until ``deadline`` (a started operation is finished)."""
        kinds = [k for k in MIX_KINDS if self.settings.mix.get(k, 0) > 0]
        weights = [self.settings.mix[k] for k in kinds]
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                if kind == "train":
                    assert self.client is not None and self.record is not None
                    _train_step(self.client, self.record, self.rng, self.settings, self.recorder)
                elif kind == "registry":
                    self._registry_read()
                else:
                    self._he_apply()
            except OpFailed:
                continue

    def _registry_read(self) -> None:
        registry, tenant, recorder = self.registry, self.tenant, self.recorder
        assert registry is not None
        op = self.rng.choice(("registry_list", "registry_get", "registry_download"))
        started = time.perf_counter()
        if op == "registry_list":
            names = _call(recorder, op, lambda: [a.name for a in registry.list_adapters()])
            _check(tenant.adapter_name in names, recorder, op, f"{names} lacks the adapter")
        elif op == "registry_get":
            adapter = _call(recorder, op, lambda: registry.get_adapter(tenant.adapter_name))
            _check(
                adapter.latest_version == tenant.version,
                recorder,
                op,
                f"latest version {adapter.latest_version}, published {tenant.version}",
            )
        else:
            downloaded = _call(
                recorder,
                op,
                lambda: registry.download(tenant.adapter_name, version=tenant.version),
            )
            digest = hashlib.sha256(downloaded.package).hexdigest()
            _check(digest == tenant.package_sha256, recorder, op, "package digest differs")
        recorder.ok(op, time.perf_counter() - started)

    def _he_apply(self) -> None:
        session, recorder, op = self.session, self.recorder, "he_apply"
        assert session is not None
        layer = self.rng.choice(session.layers)
        lora_a, lora_b = self.tenant.deltas[layer]
        x = self.numbers.standard_normal((self.settings.he_tokens, lora_a.shape[1]))
        started = time.perf_counter()
        delta = _call(recorder, op, lambda: session.apply(layer, x, output_size=lora_b.shape[0]))
        elapsed = time.perf_counter() - started
        expected = (LORA_ALPHA / LORA_RANK) * (x @ lora_a.T @ lora_b.T)
        error = float(np.max(np.abs(delta - expected)))
        scale = max(float(np.max(np.abs(expected))), 1e-12)
        _check(
            error <= HE_RELATIVE_TOLERANCE * scale,
            recorder,
            op,
            f"{layer}: |HE - plaintext| = {error:.3g} (values up to {scale:.3g})",
        )
        recorder.ok(op, elapsed)

    def close(self) -> None:
        """Close the HE session and every connection (errors here are reported, not fatal)."""
        try:
            if self.session is not None:
                self.session.close()
        except TenSafeError as error:
            print(f"closing an HE session: {error.message}", file=sys.stderr)
        for closable in (self.he_rpc, self.registry, self.service):
            if closable is not None:
                closable.close()


def _lora_factors(opened: tgsp.OpenedAdapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in opened.numpy_tensors().items():
        module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        parts.setdefault(module, {})[rest[0]] = np.asarray(tensor, dtype=np.float64)
    return {module: (p["A"], p["B"]) for module, p in parts.items()}


def _make_tenant(settings: Settings, records: list[ClientRecord], label: str) -> Tenant:
    """Create a tenant (as the admin), train one DP step and publish the adapter.

    Not part of the measured load: its step has a recorder of its own (and is checked
    like the others); any error stops the run.
    """
    recorder = Recorder()
    credentials = create_tenant(settings.connection_file, name=label)
    adapter_name = f"{label}-adapter"
    with ServiceClient(
        api_key=credentials.api_key, connection_file=settings.connection_file
    ) as service:
        client = service.create_lora_training_client(
            base_model=BASE_MODEL,
            rank=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            dp_noise_multiplier=NOISE_MULTIPLIER,
            delta=DELTA,
        )
        record = ClientRecord(credentials.tenant_id, str(client.model_id))
        records.append(record)
        rng = random.Random(settings.seed)
        try:
            _train_step(client, record, rng, settings, recorder)
        except OpFailed:
            raise RuntimeError(f"setup step failed: {recorder.messages}") from None
        saved = client.save_adapter(adapter_name).result(timeout=RESULT_TIMEOUT_SECONDS)
    with RegistryClient.connect(
        connection_file=settings.connection_file, api_key=credentials.api_key
    ) as registry:
        opened = registry.open(adapter_name, version=saved.version)
    return Tenant(
        credentials=credentials,
        adapter_name=adapter_name,
        version=saved.version,
        package_sha256=saved.package_sha256,
        deltas=_lora_factors(opened),
    )


def _percentile(values: list[float], fraction: float) -> float:
    return float(np.percentile(np.asarray(values), fraction * 100.0, method="higher"))


def _independent_epsilon(steps: int) -> float:
    """epsilon of ``steps`` full Gaussian mechanisms (client batches) by dp-accounting."""
    if steps == 0:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(NOISE_MULTIPLIER), steps)
    )
    return float(accountant.get_epsilon(DELTA))


async def _ledger(url: str, client_ids: list[str]) -> dict[str, list[Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                sa.text(
                    "SELECT client_id, dp_step, future_id, noise_multiplier, delta, "
                    "epsilon_after FROM trainer_privacy_ledger ORDER BY client_id, dp_step"
                )
            )
            rows: dict[str, list[Any]] = {c: [] for c in client_ids}
            for row in result:
                if row.client_id in rows:
                    rows[row.client_id].append(row)
            return rows
    finally:
        await engine.dispose()


def _audit_verify(connection_file: Path) -> tuple[bool, str]:
    """``tensafe audit verify`` as an operator runs it (the admin key of the stack)."""
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensafe.client.cli",
            "audit",
            "verify",
            "--connection-file",
            str(connection_file),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "TENSAFE_API_KEY"},
    )
    return finished.returncode == 0, (finished.stdout + finished.stderr).strip()


def check_consistency(
    settings: Settings, tenants: list[Tenant], records: list[ClientRecord]
) -> list[str]:
    """The consistency check (see the module docstring); returns the violations."""
    problems: list[str] = []
    by_tenant: dict[str, list[ClientRecord]] = collections.defaultdict(list)
    for record in records:
        by_tenant[record.tenant].append(record)
    api_keys = {t.credentials.tenant_id: t.credentials.api_key for t in tenants}
    server: dict[str, tuple[int, int, float]] = {}
    for tenant_id, tenant_records in by_tenant.items():
        with ServiceClient(
            api_key=api_keys[tenant_id], connection_file=settings.connection_file
        ) as service:
            for record in tenant_records:
                for step in record.unresolved:
                    try:
                        step.result(timeout=RESULT_TIMEOUT_SECONDS)
                        record.acknowledged.append(step.future_id)
                    except TenSafeError:
                        pass  # FAILED or CANCELLED: not applied, must not be charged
                found = service.rpc.get_training_client(record.training_client_id)
                spent = service.rpc.get_privacy_spent(record.training_client_id)
                server[record.training_client_id] = (found.step, spent.steps, spent.epsilon)
    ledger = asyncio.run(
        _ledger(settings.trainer_database_url, [r.training_client_id for r in records])
    )
    for record in records:
        name = record.training_client_id
        acknowledged = len(record.acknowledged)
        step, dp_steps, epsilon = server[name]
        rows = ledger[name]
        if step != acknowledged:
            problems.append(f"{name}: server step {step}, acknowledged OptimSteps {acknowledged}")
        if dp_steps != acknowledged:
            problems.append(f"{name}: privacy-spent steps {dp_steps}, acknowledged {acknowledged}")
        numbers = [row.dp_step for row in rows]
        if numbers != list(range(1, acknowledged + 1)):
            missing = sorted(set(range(1, acknowledged + 1)) - set(numbers))[:5]
            extra = sorted(set(numbers) - set(range(1, acknowledged + 1)))[:5]
            problems.append(
                f"{name}: {len(numbers)} ledger charges for {acknowledged} acknowledged steps "
                f"(missing step numbers {missing}, unexpected {extra})"
            )
        if sorted(row.future_id for row in rows) != sorted(record.acknowledged):
            problems.append(f"{name}: ledger charges are not the acknowledged OptimSteps")
        if any((row.noise_multiplier, row.delta) != (NOISE_MULTIPLIER, DELTA) for row in rows):
            problems.append(f"{name}: a ledger charge has another sigma or delta")
        expected = _independent_epsilon(acknowledged)
        if rows and rows[-1].epsilon_after != epsilon:
            problems.append(f"{name}: ledger epsilon {rows[-1].epsilon_after}, spent {epsilon}")
        if abs(epsilon - expected) > EPSILON_RELATIVE_TOLERANCE * max(expected, 1.0):
            problems.append(
                f"{name}: epsilon {epsilon!r} after {acknowledged} steps, "
                f"dp-accounting gives {expected!r}"
            )
    intact, output = _audit_verify(settings.connection_file)
    print(f"  $ tensafe audit verify -> {output}")
    if not intact:
        problems.append(f"audit chain: {output}")
    return problems


@dataclasses.dataclass
class LoadResult:
    tenants: int
    clients: int
    elapsed: float
    recorder: Recorder
    steps: int
    problems: list[str]

    @property
    def errors(self) -> int:
        return self.recorder.non_retryable()

    def p99_ms(self) -> float:
        return max(
            (_percentile(v, 0.99) * 1e3 for v in self.recorder.latencies.values() if v),
            default=0.0,
        )

    def passed(self, limit_ms: float) -> bool:
        return not self.problems and self.errors == 0 and self.p99_ms() <= limit_ms


@contextmanager
def _workers(workers: list[Worker]) -> Iterator[None]:
    try:
        yield
    finally:
        for worker in workers:
            worker.close()


def run_load(settings: Settings, tenants: int, clients: int) -> LoadResult:
    """Set up ``tenants`` x ``clients``, run the mix for the duration, print, check."""
    recorder = Recorder()
    records: list[ClientRecord] = []
    run_id = uuid.uuid4().hex[:6]
    print(
        f"\n== load {tenants} tenants x {clients} clients = {tenants * clients} concurrent "
        f"clients; {settings.duration:g} s; mix "
        + ", ".join(f"{k}={v:g}" for k, v in settings.mix.items())
        + f"; load average {os.getloadavg()[0]:.2f} =="
    )
    started = time.perf_counter()
    made = [_make_tenant(settings, records, f"load-{run_id}-{t}") for t in range(tenants)]
    workers = [Worker(t, i, settings, recorder) for t in made for i in range(clients)]
    with _workers(workers):
        setup_errors: list[BaseException] = []

        def set_up(worker: Worker) -> None:
            try:
                worker.setup()
            except BaseException as error:  # reported below, the run stops
                setup_errors.append(error)

        threads = [threading.Thread(target=set_up, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if setup_errors:
            raise RuntimeError(f"worker setup failed: {setup_errors[0]!r}")
        for worker in workers:
            assert worker.record is not None
            records.append(worker.record)
        setup = time.perf_counter() - started
        phases: dict[str, list[float]] = collections.defaultdict(list)
        for worker in workers:
            for phase, seconds in worker.setup_seconds.items():
                phases[phase].append(seconds)
        print(
            f"setup {setup:.1f} s ("
            + ", ".join(f"{p} median {np.median(s):.2f} s" for p, s in phases.items())
            + ")"
        )
        recorder.measure_from = time.perf_counter() + settings.warmup
        deadline = time.monotonic() + settings.warmup + settings.duration
        threads = [threading.Thread(target=w.run, args=(deadline,)) for w in workers]
        for thread in threads:
            thread.start()
        time.sleep(settings.warmup)
        begin, cpu = time.monotonic(), time.process_time()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - begin
        client_cpu = (time.process_time() - cpu) / elapsed
    _print_warmup(recorder, settings.warmup)
    _print_table(recorder, elapsed)
    print(
        f"client side (this process: encryption, checks, gRPC) used {client_cpu:.2f} cores; "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )
    print("consistency check:")
    problems = check_consistency(settings, made, records)
    steps = sum(len(r.acknowledged) for r in records)
    result = LoadResult(tenants, clients, elapsed, recorder, steps, problems)
    print(
        f"  {len(records)} training clients, {steps} acknowledged DP steps; server step "
        f"counts, ledger charges (one per step, same futures) and epsilon (vs dp-accounting): "
        f"{'consistent' if not problems else 'INCONSISTENT'}"
    )
    for problem in problems:
        print(f"  - {problem}")
    print(f"  non-retryable errors: {result.errors}")
    for message in recorder.messages:
        print(f"  - {message}")
    verdict = "PASS" if not problems and result.errors == 0 else "FAIL"
    print(f"consistency check: {verdict}")
    return result


def _print_warmup(recorder: Recorder, seconds: float) -> None:
    if seconds <= 0:
        return
    steps = recorder.warmup.get("train_step", [])
    shown = (
        f"train_step p50 {_percentile(steps, 0.5) * 1e3:.0f} ms, max {max(steps) * 1e3:.0f} ms"
        if steps
        else "no train_step"
    )
    print(
        f"warm-up: operations started in the first {seconds:g} s (every client's first "
        f"step, its engine built in the worker): {sum(map(len, recorder.warmup.values()))} "
        f"ok, {shown}; not in the table"
    )


def _print_table(recorder: Recorder, elapsed: float) -> None:
    print(
        f"{'operation':<18}{'ok':>7}{'ops/s':>8}{'p50 ms':>9}{'p99 ms':>9}  "
        "errors by code (r = retried, then succeeded or gave up)"
    )
    total_ok = 0
    for op in OPS:
        values = recorder.latencies.get(op, [])
        retried = recorder.retried.get(op, collections.Counter())
        failed = recorder.failed.get(op, collections.Counter())
        if not values and not retried and not failed:
            continue
        total_ok += len(values)
        p50 = f"{_percentile(values, 0.5) * 1e3:.0f}" if values else "-"
        p99 = f"{_percentile(values, 0.99) * 1e3:.0f}" if values else "-"
        codes = [f"{c}={n}r" for c, n in sorted(retried.items())]
        codes += [f"{c}={n}" for c, n in sorted(failed.items())]
        print(
            f"{op:<18}{len(values):>7}{len(values) / elapsed:>8.2f}{p50:>9}{p99:>9}  "
            + (" ".join(codes) or "0")
        )
    retried_total = sum(sum(c.values()) for c in recorder.retried.values())
    print(
        f"{'total':<18}{total_ok:>7}{total_ok / elapsed:>8.2f}{'':>18}  "
        f"retried {retried_total}, non-retryable {recorder.non_retryable()} "
        f"({elapsed:.1f} s measured)"
    )


def _parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in MIX_KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix: {part!r}; use e.g. train=4,registry=4,he=1")
        mix[kind.strip()] = float(weight)
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix: the weights sum to 0")
    return mix


def _parse_sweep(text: str) -> list[tuple[int, int]]:
    loads = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", part)
        if match is None:
            raise argparse.ArgumentTypeError(f"--sweep: {part!r}; use e.g. 1x1,2x2,4x2")
        loads.append((int(match.group(1)), int(match.group(2))))
    return loads


# Per-client state not counted by the worker's resident_client_bytes: the accountant's
# state (a few kB of RDP orders) and the engine's Python objects.
ACCOUNTANT_BYTES = 64 * 1024
MIB = 1024 * 1024


def _prometheus(text: str, name: str) -> float | None:
    """Sum of a metric's samples (all label sets) in Prometheus text, or None."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.MULTILINE)
    values = [float(value) for value in pattern.findall(text)]
    return sum(values) if values else None


def _rss_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """Resident set size of a process (Linux /proc), or None elsewhere; ``VmHWM``: its
    peak since the process started."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def import_rss_bytes() -> int | None:
    """RSS of a fresh interpreter that has only imported the worker module (torch,
    transformers, peft, gRPC, SQLAlchemy...): the part of the worker's memory no client
    or base model accounts for, measured here because it is not a constant."""
    code = (
        "import re, tensafe.trainer.worker; "
        "print(re.search(r'VmRSS:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
    )
    try:
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(output.strip()) * 1024


def print_worker_memory(connection_file: Path, training_clients: int) -> None:
    """Print the worker's RSS against the shared-base bound, and its load counters."""
    described = json.loads(connection_file.read_text())
    address = described.get("metrics", {}).get("trainer-worker")
    ready = Path(str(described["data_dir"])) / "run" / "trainer-worker.ready"
    if address is None or not ready.is_file():
        print("worker memory: the stack serves no worker /metrics (start it with metrics)")
        return
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    base = _prometheus(text, "tensafe_trainer_base_model_bytes") or 0.0
    state = _prometheus(text, "tensafe_trainer_resident_client_bytes") or 0.0
    resident = _prometheus(text, "tensafe_trainer_resident_clients") or 0.0
    base_loads = _prometheus(text, "tensafe_trainer_base_loads_total") or 0.0
    engine_loads = _prometheus(text, "tensafe_trainer_engine_loads_total") or 0.0
    per_client = (state / resident if resident else 0.0) + ACCOUNTANT_BYTES
    # Clients of earlier loads of a sweep may still be resident: count what is held.
    clients = max(training_clients, int(resident))
    bound = base + clients * per_client * 1.5 + 300 * MIB
    pid = int(json.loads(ready.read_text())["pid"])
    rss, peak = _rss_bytes(pid), _rss_bytes(pid, "VmHWM")
    verdict = "n/a" if rss is None else ("within" if rss <= bound else "OVER")
    shown = "n/a" if rss is None else f"{rss / MIB:.0f} MB"
    if peak is not None:
        shown += f" (peak since the stack started {peak / MIB:.0f} MB)"
    print(
        f"worker memory: RSS {shown} vs bound {bound / MIB:.0f} MB = base "
        f"{base / MIB:.1f} MB + {clients} x {per_client / MIB:.2f} MB x 1.5 + "
        f"300 MB ({verdict}); {resident:.0f} clients resident; base loads "
        f"{base_loads:.0f}, client engine loads {engine_loads:.0f} (since the stack started)"
    )
    imports = import_rss_bytes()
    if rss is not None and imports is not None:
        above = rss - imports
        print(
            f"  of which the worker's imports alone (a fresh interpreter) {imports / MIB:.0f} "
            f"MB; above them {above / MIB:.0f} MB vs {(bound - 300 * MIB) / MIB:.0f} MB "
            f"(bound without its 300 MB): "
            f"{'within' if above <= bound - 300 * MIB else 'OVER'}"
        )


def _run(args: argparse.Namespace, connection_file: Path) -> int:
    described = json.loads(connection_file.read_text())
    data_dir = Path(str(described["data_dir"]))
    models = Path(str(described["base_models_dir"]))
    if not (models / BASE_MODEL / "config.json").is_file():
        build_tiny_model(
            models / BASE_MODEL, seed=0, hidden_size=args.hidden, num_layers=args.layers
        )
    config = json.loads((models / BASE_MODEL / "config.json").read_text())
    settings = Settings(
        connection_file=connection_file,
        trainer_database_url=args.trainer_database_url
        or args.database_url
        or f"sqlite+aiosqlite:///{data_dir / 'db' / 'trainer.db'}",
        duration=args.duration,
        warmup=args.warmup,
        mix=args.mix,
        batch=args.batch,
        tokens=args.tokens,
        vocab=int(config["vocab_size"]),
        hidden=int(config["hidden_size"]),
        he_packing=Packing.PER_TOKEN if args.he_packing == "per-token" else Packing.BATCH_FIRST,
        he_tokens=args.he_tokens,
        seed=args.seed,
    )
    print(
        f"model {BASE_MODEL}: hidden {settings.hidden}, {config['num_hidden_layers']} layers; "
        f"LoRA r={LORA_RANK} q/k/v/o; DP-SGD sigma {NOISE_MULTIPLIER:g}; train batch "
        f"{args.batch} x {args.tokens} tokens; HE {args.he_packing}, {args.he_tokens} "
        f"token(s) per call; {os.cpu_count()} CPUs"
    )
    loads = args.sweep or [(args.tenants, args.clients_per_tenant)]
    results = []
    for tenants, clients in loads:
        results.append(run_load(settings, tenants, clients))
        # The publisher client of each tenant trains too.
        print_worker_memory(connection_file, tenants * clients + tenants)
    if len(results) == 1:
        return 0 if results[0].passed(float("inf")) else 1
    print(
        f"\n== sweep (pass: consistent, 0 non-retryable errors, p99 <= {args.max_p99_ms:g} ms) =="
    )
    print(
        f"{'load':<8}{'clients':>8}{'ops/s':>8}{'steps/s':>9}{'step p50 ms':>13}"
        f"{'errors':>8}  {'verdict':<8}worst p99 ms (operation)"
    )
    sustained: LoadResult | None = None
    for result in results:
        latencies = result.recorder.latencies
        total = sum(len(v) for v in latencies.values())
        steps = latencies.get("train_step", [])
        step_p50 = f"{_percentile(steps, 0.5) * 1e3:.0f}" if steps else "-"
        worst = max(latencies, key=lambda op: _percentile(latencies[op], 0.99), default="")
        verdict = (
            "pass"
            if result.passed(args.max_p99_ms)
            else ("INCONSISTENT" if result.problems else "fail")
        )
        print(
            f"{f'{result.tenants}x{result.clients}':<8}{result.tenants * result.clients:>8}"
            f"{total / result.elapsed:>8.2f}{len(steps) / result.elapsed:>9.2f}{step_p50:>13}"
            f"{result.errors:>8}  {verdict:<8}{result.p99_ms():.0f} ({worst})"
        )
        if result.passed(args.max_p99_ms) and (
            sustained is None
            or result.tenants * result.clients > sustained.tenants * sustained.clients
        ):
            sustained = result
    if sustained is None:
        print("no load passed")
        return 1
    print(
        f"highest load sustained: {sustained.tenants} tenants x {sustained.clients} clients "
        f"({sustained.tenants * sustained.clients} concurrent)"
    )
    return 1 if any(r.problems for r in results) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--clients-per-tenant", type=int, default=2)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of load before the measured --duration (reported apart)",
    )
    parser.add_argument(
        "--mix",
        type=_parse_mix,
        default=_parse_mix("train=4,registry=4,he=1"),
        help="relative weights of train / registry / he operations",
    )
    parser.add_argument("--sweep", type=_parse_sweep, help="loads to run, e.g. 1x1,2x2,4x2,4x4")
    parser.add_argument("--max-p99-ms", type=float, default=10000.0, help="sweep pass bound")
    parser.add_argument("--batch", type=int, default=4, help="sequences per train step")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model width")
    parser.add_argument("--layers", type=int, default=4, help="tiny model depth")
    parser.add_argument("--he-packing", choices=("per-token", "batch"), default="per-token")
    parser.add_argument("--he-tokens", type=int, default=1, help="tokens per HE call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--database-url",
        help="one empty database for every service of the started stack (PostgreSQL, as "
        "deployed; default: a SQLite file per service, as `tensafe up`)",
    )
    parser.add_argument("--connection-file", help="a running stack (default: start one)")
    parser.add_argument(
        "--trainer-database-url",
        help="the trainer's database, for the ledger (default: the stack's SQLite file)",
    )
    args = parser.parse_args()
    if args.connection_file:
        return _run(args, Path(args.connection_file))
    with tempfile.TemporaryDirectory(prefix="tensafe-load-") as root:
        data_dir = Path(root) / "stack"
        build_tiny_model(
            data_dir / "models" / BASE_MODEL,
            seed=0,
            hidden_size=args.hidden,
            num_layers=args.layers,
        )
        options = StackOptions(data_dir=data_dir, metrics=True, database_url=args.database_url)
        with LocalStack(options) as stack:
            stack.start()
            return _run(args, stack.connection_file)


if __name__ == "__main__":
    sys.exit(main())
