"""HE sessions: a client's public key material bound to one adapter, with limits.

A session holds, in this process's memory, the client's CKKS parameters and Galois keys
(inside a :class:`~tensafe.he_runtime.domain.executor.HeLoraExecutor`), the adapter's
weights and their pre-encoded plaintexts. That state is large and cannot be rebuilt
without the client (only the client can make keys), so it lives where it is used: a
restarted runtime has no sessions and clients create new ones. The session *metadata*
(owner, adapter, plan, key bytes, idle expiry) is kept in memory here too; no database
is involved yet.

Limits (DESIGN.md §8, "HE sessions hold key material"): key bytes per session, sessions
and key bytes per tenant (checked and *reserved* before the keys stream in, so two
concurrent uploads cannot both pass: the count and the reservation run on the event loop
with no ``await`` between them, which makes them one atomic step without a lock), and
an idle TTL after which a session is removed and its keys are dropped. Sessions are
tenant-scoped: another tenant's session id is NOT_FOUND. Key material is never logged.

SEAL work (parsing keys, encoding the adapter, evaluating) runs on a thread pool, never
on the event loop, so health checks and other RPCs keep being answered; seal-python
releases nothing during a call but the loop runs between calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

from tensafe.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tensafe.common.quotas import quota_exceeded
from tensafe.he_runtime.domain.adapters import AdapterSource, LoadedAdapter
from tensafe.he_runtime.domain.executor import HeLoraExecutor, LoraWeights
from tensafe.he_runtime.domain.plans import PlanRequest, compile_for, plan_for_units
from tensafe.helora.params import CkksParams
from tensafe.helora.plan import OpCounts, Packing, Plan
from tensafe.helora.wire import WireKind, unpack

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionLimits:
    """Bounds on what sessions may hold (see :class:`~tensafe.he_runtime.config.HeRuntimeConfig`).

    Attributes:
        max_session_key_bytes: Galois-key bytes per session.
        max_sessions_per_tenant: Open sessions per tenant.
        max_key_bytes_per_tenant: Galois-key bytes over a tenant's open sessions.
        idle_ttl_seconds: Idle time after which a session expires.
        max_apply_bytes: Ciphertext bytes per ApplyLora request.
    """

    max_session_key_bytes: int
    max_sessions_per_tenant: int
    max_key_bytes_per_tenant: int
    idle_ttl_seconds: float
    max_apply_bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionHeader:
    """The checked first message of CreateSession.

    Attributes:
        adapter_name: Which adapter the session applies.
        adapter_version: Its version (0: latest).
        spec: Shapes and parameters the client compiled its plan for.
        parameters: Framed :data:`WireKind.PARAMETERS` blob.
        galois_keys_size: Bytes of framed Galois keys that follow (0: none).
        request_id: Idempotency key ("" for none).
    """

    adapter_name: str
    adapter_version: int
    spec: PlanRequest
    parameters: bytes
    galois_keys_size: int
    request_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApplyResult:
    """What ApplyLora returns.

    Attributes:
        ciphertexts: Framed result ciphertexts, in plan order.
        counts: SEAL operations performed.
        server_ms: Wall time of the evaluation on the runtime, milliseconds.
    """

    ciphertexts: tuple[bytes, ...]
    counts: OpCounts
    server_ms: float


class Session:
    """One open HE session (lives only in this process).

    Attributes:
        id: Server-assigned id.
        tenant_id: Owning tenant.
        plan: The plan in force (compiled from the client's spec).
        reason: Why its packing was chosen.
        adapter: The adapter applied.
        key_bytes: Bytes of Galois keys held.
        request_id: The idempotency key it was created with.
        last_used: Clock time of the last use.
    """

    def __init__(
        self,
        *,
        tenant_id: str,
        plan: Plan,
        reason: str,
        adapter: LoadedAdapter,
        executor: HeLoraExecutor,
        key_bytes: int,
        request_id: str,
        now: float,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.tenant_id = tenant_id
        self.plan = plan
        self.reason = reason
        self.adapter = adapter
        self.key_bytes = key_bytes
        self.request_id = request_id
        self.last_used = now
        self.in_flight = 0
        self._executor: HeLoraExecutor | None = executor
        # SEAL objects of one session are used by one thread at a time.
        self._lock = threading.Lock()

    @property
    def layers(self) -> list[str]:
        """Adapted module names, sorted."""
        return sorted(self.adapter.layers)

    def executor(self) -> HeLoraExecutor:
        """The session's executor.

        Raises:
            NotFound: The session was closed or expired meanwhile.
        """
        if self._executor is None:
            raise NotFound(f"session {self.id} not found")
        return self._executor

    def layer_plan(self, layer: str, units: int) -> Plan:
        """The plan that evaluates ``units`` units of ``layer``."""
        shape = self.adapter.shape(layer)
        return plan_for_units(
            self.plan, hidden_size=shape.input_size, output_size=shape.output_size, units=units
        )

    def evaluate(self, layer: str, plan: Plan, ciphertexts: Sequence[bytes]) -> ApplyResult:
        """Apply ``layer``'s delta to ``ciphertexts`` (blocking; run it on a worker thread)."""
        with self._lock:
            executor = self.executor()
            started = time.perf_counter()
            encoded = executor.adapter(
                plan,
                f"{self.adapter.digest}:{layer}",
                lambda: self.adapter.layers[layer],
            )
            result = executor.apply(plan, encoded, ciphertexts)
            elapsed = (time.perf_counter() - started) * 1000.0
        return ApplyResult(ciphertexts=result.ciphertexts, counts=result.counts, server_ms=elapsed)

    def drop_keys(self) -> None:
        """Delete the keys and encoded adapter (the executor holds both).

        Runs on the event loop, so it does not wait for the session's lock: an
        evaluation in progress keeps its own reference until it finishes, and every
        later use finds the session gone.
        """
        self._executor = None


@dataclasses.dataclass
class _Reservation:
    tenant_id: str
    key_bytes: int
    request_id: str


class HeSessions:
    """Opens, finds, applies and closes HE sessions, within :class:`SessionLimits`.

    Args:
        limits: The limits.
        adapter_source: Where adapters come from; None when no source is configured
            (every CreateSession then fails with FAILED_PRECONDITION).
        pool: Runs SEAL work off the event loop.
        clock: Seconds (wall clock; injectable so tests can expire sessions).
    """

    def __init__(
        self,
        *,
        limits: SessionLimits,
        adapter_source: AdapterSource | None,
        pool: Executor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self._adapter_source = adapter_source
        self._pool = pool
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._reservations: list[_Reservation] = []

    # -- limits --------------------------------------------------------------------

    def usage(self, tenant_id: str) -> tuple[int, int]:
        """Return (sessions, key bytes) held or being created by ``tenant_id``."""
        sessions = [s for s in self._sessions.values() if s.tenant_id == tenant_id]
        pending = [r for r in self._reservations if r.tenant_id == tenant_id]
        return (
            len(sessions) + len(pending),
            sum(s.key_bytes for s in sessions) + sum(r.key_bytes for r in pending),
        )

    def _reserve(self, tenant_id: str, key_bytes: int, request_id: str) -> _Reservation:
        limits = self.limits
        if request_id and any(
            (r.tenant_id, r.request_id) == (tenant_id, request_id) for r in self._reservations
        ):
            raise Aborted(
                f"a CreateSession with request_id {request_id!r} is in progress; retry later",
                reason="REQUEST_IN_PROGRESS",
            )
        if key_bytes > limits.max_session_key_bytes:
            raise ResourceExhausted(
                f"galois_keys_size {key_bytes} exceeds the limit max_session_key_bytes="
                f"{limits.max_session_key_bytes}",
                metadata={
                    "limit": "max_session_key_bytes",
                    "max": str(limits.max_session_key_bytes),
                },
            )
        count, held = self.usage(tenant_id)
        if count >= limits.max_sessions_per_tenant:
            raise quota_exceeded(
                "max_sessions_per_tenant",
                limits.max_sessions_per_tenant,
                f"{count} open HE sessions (close one or let it expire)",
            )
        if held + key_bytes > limits.max_key_bytes_per_tenant:
            raise quota_exceeded(
                "max_key_bytes_per_tenant",
                limits.max_key_bytes_per_tenant,
                f"{held} Galois-key bytes in open sessions and this one adds {key_bytes}",
            )
        reservation = _Reservation(tenant_id, key_bytes, request_id)
        self._reservations.append(reservation)
        return reservation

    # -- lifecycle -----------------------------------------------------------------

    async def create(
        self, tenant_id: str, header: SessionHeader, key_chunks: AsyncIterator[bytes]
    ) -> Session:
        """Open a session: check the header, reserve, receive the keys, build it.

        Args:
            tenant_id: The caller's tenant.
            header: The checked header.
            key_chunks: The Galois-key bytes, in order.

        Returns:
            The open session (an existing one for a repeated ``request_id``).

        Raises:
            InvalidArgument: Inconsistent header, parameters or keys.
            FailedPrecondition: No adapter source; adapter shapes differ from the spec;
                keys missing for a plan step or from another parameter set.
            NotFound: No such adapter.
            ResourceExhausted: A limit would be exceeded (the message names it).
            Aborted: A creation with the same ``request_id`` is still in progress.
        """
        self.reap()
        if header.request_id:
            for existing in self._sessions.values():
                if (existing.tenant_id, existing.request_id) == (tenant_id, header.request_id):
                    existing.last_used = self._clock()
                    return existing
        if self._adapter_source is None:
            raise FailedPrecondition(
                "registry adapter source not configured", reason="ADAPTER_SOURCE_MISSING"
            )
        plan, reason = compile_for(header.spec, field_prefix="header.spec.")
        _check_parameters_blob(header.parameters, header.spec.params)
        if header.galois_keys_size < 0:
            raise InvalidArgument("header.galois_keys_size", "must be >= 0")
        reservation = self._reserve(tenant_id, header.galois_keys_size, header.request_id)
        try:
            keys = await _receive_keys(key_chunks, header.galois_keys_size)
            adapter = await self._adapter_source.load(
                tenant_id=tenant_id, name=header.adapter_name, version=header.adapter_version
            )
            executor = await self._run(lambda: _build(adapter, header, plan, keys))
            session = Session(
                tenant_id=tenant_id,
                plan=plan,
                reason=reason,
                adapter=adapter,
                executor=executor,
                key_bytes=header.galois_keys_size,
                request_id=header.request_id,
                now=self._clock(),
            )
        finally:
            self._reservations.remove(reservation)
        self._sessions[session.id] = session
        log.info(
            "HE session opened",
            extra={
                "session_id": session.id,
                "tenant_id": tenant_id,
                "adapter": f"{adapter.name}@{adapter.version}",
                "packing": plan.packing.value,
                "key_bytes": session.key_bytes,
                "layers": len(adapter.layers),
            },
        )
        return session

    def get(self, tenant_id: str, session_id: str) -> Session:
        """Return the tenant's session and mark it used.

        Raises:
            NotFound: No such open session for this tenant (also after expiry).
        """
        self.reap()
        session = self._sessions.get(session_id)
        if session is None or session.tenant_id != tenant_id:
            raise NotFound(f"session {session_id!r} not found")
        session.last_used = self._clock()
        return session

    def expire_time(self, session: Session) -> float:
        """When ``session`` expires if not used again (clock seconds)."""
        return session.last_used + self.limits.idle_ttl_seconds

    def close(self, tenant_id: str, session_id: str) -> None:
        """Close the tenant's session and delete its keys.

        Raises:
            NotFound: No such open session for this tenant.
        """
        session = self.get(tenant_id, session_id)
        self._remove(session, why="closed")

    def reap(self) -> int:
        """Remove every session idle for longer than the TTL; return how many."""
        now = self._clock()
        expired = [
            s for s in self._sessions.values() if s.in_flight == 0 and now >= self.expire_time(s)
        ]
        for session in expired:
            self._remove(session, why="expired")
        return len(expired)

    def close_all(self) -> None:
        """Remove every session (at shutdown)."""
        for session in list(self._sessions.values()):
            self._remove(session, why="shutdown")

    def _remove(self, session: Session, *, why: str) -> None:
        self._sessions.pop(session.id, None)
        session.drop_keys()
        log.info(
            "HE session %s",
            why,
            extra={"session_id": session.id, "tenant_id": session.tenant_id},
        )

    # -- evaluation ----------------------------------------------------------------

    async def apply(
        self, tenant_id: str, session_id: str, layer: str, ciphertexts: Sequence[bytes]
    ) -> ApplyResult:
        """Apply ``layer``'s LoRA delta to the client's ciphertexts.

        Raises:
            NotFound: No such session.
            InvalidArgument: Unknown layer, wrong number of ciphertexts, malformed ones.
            FailedPrecondition: Ciphertexts from another parameter set, a missing key.
        """
        session = self.get(tenant_id, session_id)
        if layer not in session.adapter.layers:
            raise InvalidArgument(
                "header.layer",
                f"{layer!r} is not adapted by this session's adapter (layers: "
                f"{', '.join(session.layers[:8])}{', ...' if len(session.layers) > 8 else ''})",
            )
        units = _units(session, layer, len(ciphertexts))
        plan = session.layer_plan(layer, units)
        session.in_flight += 1
        try:
            return await self._run(lambda: session.evaluate(layer, plan, ciphertexts))
        finally:
            session.in_flight -= 1
            session.last_used = self._clock()

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def run_reaper(self, stop: asyncio.Event, *, interval_seconds: float) -> None:
        """Reap expired sessions every ``interval_seconds`` until ``stop`` is set."""
        while not stop.is_set():
            self.reap()
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
            except TimeoutError:
                continue


def _units(session: Session, layer: str, count: int) -> int:
    if count < 1:
        raise InvalidArgument("header.ciphertexts", "must be at least 1")
    if session.plan.packing is Packing.PER_TOKEN:
        return count
    input_size = session.adapter.shape(layer).input_size
    if count % input_size:
        raise InvalidArgument(
            "header.ciphertexts",
            f"a BATCH_FIRST request for {layer!r} takes a multiple of its input size "
            f"{input_size} ciphertexts (one per feature and token group), got {count}",
        )
    return count // input_size


def _check_parameters_blob(blob: bytes, expected: CkksParams) -> None:
    frame = unpack(blob, field="header.seal_parameters", expected=WireKind.PARAMETERS)
    try:
        decoded = json.loads(frame.payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidArgument("header.seal_parameters", "payload is not JSON") from None
    params = CkksParams.from_dict(decoded, field_prefix="header.seal_parameters.")
    if params != expected:
        raise InvalidArgument("header.seal_parameters", "differ from header.spec.parameters")


async def _receive_keys(chunks: AsyncIterator[bytes], declared: int) -> bytes | None:
    received = bytearray()
    async for chunk in chunks:
        if len(received) + len(chunk) > declared:
            raise InvalidArgument(
                "galois_keys_chunk",
                f"more Galois-key bytes than header.galois_keys_size={declared}",
            )
        received += chunk
    if len(received) != declared:
        raise InvalidArgument(
            "galois_keys_chunk",
            f"received {len(received)} Galois-key bytes, header.galois_keys_size={declared}",
        )
    return bytes(received) if declared else None


def _build(
    adapter: LoadedAdapter,
    header: SessionHeader,
    plan: Plan,
    galois_keys: bytes | None,
) -> HeLoraExecutor:
    """Blocking part of session creation: check the adapter, parse keys, pre-encode."""
    spec = header.spec
    _require_match("header.spec.rank", spec.rank, adapter.rank)
    if spec.alpha != adapter.alpha:
        raise FailedPrecondition(
            f"header.spec.alpha is {spec.alpha:g}, the adapter's effective alpha is "
            f"{adapter.alpha:g}",
            reason="ADAPTER_MISMATCH",
            metadata={"field": "header.spec.alpha"},
        )
    _require_match("header.spec.hidden_size", spec.hidden_size, adapter.max_input_size)
    _require_match("header.spec.output_size", spec.output_size, adapter.max_output_size)
    executor = HeLoraExecutor(
        parameters=header.parameters,
        galois_keys=galois_keys,
        max_cached_adapters=max(1, len(adapter.layers)),
    )
    for layer, weights in adapter.layers.items():
        shape = adapter.shape(layer)
        layer_plan = plan_for_units(
            plan, hidden_size=shape.input_size, output_size=shape.output_size, units=1
        )
        # Missing Galois keys and adapters that could overflow the modulus fail here,
        # before the client sends a single ciphertext.
        executor.adapter(layer_plan, f"{adapter.digest}:{layer}", _returning(weights))
    return executor


def _returning(weights: LoraWeights) -> Callable[[], LoraWeights]:
    return lambda: weights


def _require_match(field: str, requested: int, actual: int) -> None:
    if requested != actual:
        raise FailedPrecondition(
            f"{field} is {requested}, the adapter's is {actual}",
            reason="ADAPTER_MISMATCH",
            metadata={"field": field},
        )
