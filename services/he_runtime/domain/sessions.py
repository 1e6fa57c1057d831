"""HE sessions: a client's public key material bound to one adapter, with limits.

A session is durable (the project's rule: state lives in the DB, a restarted process
loses nothing that was acknowledged). Its durable state is a row of ``he_sessions``
(owner, idempotency key, adapter name/version/digest, the checked spec, the framed CKKS
parameters, key bytes, times) plus its Galois keys in a key file
(:mod:`tensafe.he_runtime.store`), written and fsynced *before* the row commits and
deleted after the row is. The live part, a
:class:`~tensafe.he_runtime.domain.executor.HeLoraExecutor` holding parsed keys and
pre-encoded adapter plaintexts, is a per-process cache: a use that misses it (after a
restart, or on another replica sharing the DB and the data folder) reloads the row and
the key file, reloads the adapter from its source and rebuilds the executor with the
same :func:`_build`, one rebuild per session at a time.

Limits (DESIGN.md §8, "HE sessions hold key material"): key bytes per session, sessions
and key bytes per tenant (counted over the DB rows plus this process's in-flight
*reservations*, in a transaction holding the tenant's quota lock, both before the keys
stream in and again when the row is inserted, so they hold across replicas), and an
idle TTL after which a session is removed and its keys are deleted. Use times are kept
in memory on every call and written to the row at most every ``idle_ttl / 4`` (an
ApplyLora is not a DB write); a cache miss checks expiry against the row. Sessions are
tenant-scoped: another tenant's session id is NOT_FOUND. Key material is never logged.

SEAL work (parsing keys, encoding the adapter, evaluating) runs on a thread pool, never
on the event loop, so health checks and other RPCs keep being answered; seal-python
releases nothing during a call but the loop runs between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
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
    Unavailable,
)
from tensafe.common.quotas import quota_exceeded
from tensafe.he_runtime.domain.adapters import AdapterSource, LoadedAdapter
from tensafe.he_runtime.domain.executor import HeLoraExecutor, LoraWeights
from tensafe.he_runtime.domain.parallel import EvaluationPeers, PeerFailed
from tensafe.he_runtime.domain.plans import PlanRequest, compile_for, plan_for_units
from tensafe.he_runtime.store.keys import KeyFiles
from tensafe.he_runtime.store.sql import SessionRecord, SessionStore, SessionTransaction, micros
from tensafe.helora.params import CkksParams
from tensafe.helora.plan import OpCounts, Packing, Plan, Variant, shared_input_offsets
from tensafe.helora.wire import WireKind, unpack

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Per-call layer plans a session keeps (oldest dropped first).
_MAX_CACHED_PLANS = 256


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
    """One open HE session as cached in this process.

    Attributes:
        id: Server-assigned id.
        tenant_id: Owning tenant.
        plan: The plan in force (compiled from the client's spec).
        reason: Why its packing was chosen.
        adapter: The adapter applied.
        key_bytes: Bytes of Galois keys held.
        request_id: The idempotency key it was created with.
        last_used: Clock time of the last use in this process.
        written_use: The last use written to the session's row.
    """

    def __init__(
        self,
        *,
        session_id: str,
        tenant_id: str,
        plan: Plan,
        reason: str,
        adapter: LoadedAdapter,
        executor: HeLoraExecutor,
        key_bytes: int,
        request_id: str,
        now: float,
    ) -> None:
        self.id = session_id
        self.tenant_id = tenant_id
        self.plan = plan
        self.reason = reason
        self.adapter = adapter
        self.key_bytes = key_bytes
        self.request_id = request_id
        self.last_used = now
        self.written_use = now
        self.in_flight = 0
        self._executor: HeLoraExecutor | None = executor
        # SEAL objects of one session are used by one thread at a time.
        self._lock = threading.Lock()
        self._plans: dict[tuple[str, int], Plan] = {}

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

    def check_layer(self, layer: str, field: str = "header.layer") -> None:
        """Raise InvalidArgument ``field`` unless the adapter adapts ``layer``."""
        if layer not in self.adapter.layers:
            raise InvalidArgument(
                field,
                f"{layer!r} is not adapted by this session's adapter (layers: "
                f"{', '.join(self.layers[:8])}{', ...' if len(self.layers) > 8 else ''})",
            )

    def layer_plan(self, layer: str, units: int) -> Plan:
        """The plan that evaluates ``units`` units of ``layer`` (cached per session:
        generation asks for the same few plans on every call)."""
        key = (layer, units)
        plan = self._plans.get(key)
        if plan is None:
            shape = self.adapter.shape(layer)
            plan = plan_for_units(
                self.plan, hidden_size=shape.input_size, output_size=shape.output_size, units=units
            )
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

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

    def shared_plan(self, layers: Sequence[str], plans: Sequence[Plan]) -> Plan | None:
        """The plan evaluating ``layers`` (their ``plans``) in one ciphertext, or None.

        When their output regions fit the slots (:func:`shared_input_offsets`), the
        layers run as one plan whose output size is the end of the last region's
        outputs; cached per session like :meth:`layer_plan`.
        """
        sizes = [plan.output_size for plan in plans]
        offsets = shared_input_offsets(plans[0], sizes)
        if offsets is None:
            return None
        key = ("\n".join(layers), plans[0].units)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_for_units(
                self.plan,
                hidden_size=plans[0].hidden_size,
                output_size=offsets[-1] + sizes[-1],
                units=plans[0].units,
            )
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def evaluate_layers(
        self, layers: Sequence[str], plans: Sequence[Plan], ciphertexts: Sequence[bytes]
    ) -> ApplyResult:
        """Apply several layers' deltas to the same ciphertexts (blocking).

        Layers that fit one ciphertext (:meth:`shared_plan`) run as that one plan: one
        set of results holding every layer's delta in its region, the operations of one
        layer. Otherwise :meth:`HeLoraExecutor.apply_layers`: results layer after layer,
        counts summed.
        """
        shared = self.shared_plan(layers, plans)
        with self._lock:
            executor = self.executor()
            started = time.perf_counter()
            if shared is not None:
                encoded_group = executor.adapter(
                    shared,
                    f"{self.adapter.digest}:{'+'.join(layers)}",
                    lambda: [self.adapter.layers[layer] for layer in layers],
                )
                result = executor.apply(shared, encoded_group, ciphertexts)
                return ApplyResult(
                    ciphertexts=result.ciphertexts,
                    counts=result.counts,
                    server_ms=(time.perf_counter() - started) * 1000.0,
                )
            encoded = [
                (
                    plan,
                    executor.adapter(
                        plan,
                        f"{self.adapter.digest}:{layer}",
                        functools.partial(self.adapter.layers.__getitem__, layer),
                    ),
                )
                for layer, plan in zip(layers, plans, strict=True)
            ]
            results = executor.apply_layers(encoded, ciphertexts)
            elapsed = (time.perf_counter() - started) * 1000.0
        return ApplyResult(
            ciphertexts=tuple(blob for result in results for blob in result.ciphertexts),
            counts=sum((result.counts for result in results), OpCounts()),
            server_ms=elapsed,
        )

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


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class HeSessions:
    """Opens, finds, applies and closes HE sessions, within :class:`SessionLimits`.

    Args:
        limits: The limits.
        adapter_source: Where adapters come from; None when no source is configured
            (every CreateSession, and every rebuild of a session, then fails with
            FAILED_PRECONDITION).
        pool: Runs SEAL work off the event loop.
        store: The session rows.
        keys: The Galois-key files.
        peers: Worker processes that share each request's SEAL work (None: one core).
        clock: Seconds (wall clock; injectable so tests can expire sessions).
    """

    def __init__(
        self,
        *,
        limits: SessionLimits,
        adapter_source: AdapterSource | None,
        pool: Executor,
        store: SessionStore,
        keys: KeyFiles,
        clock: Callable[[], float] = time.time,
        peers: EvaluationPeers | None = None,
    ) -> None:
        self.limits = limits
        self._peers = peers
        self._adapter_source = adapter_source
        self._pool = pool
        self._store = store
        self._keys = keys
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._reservations: list[_Reservation] = []
        # The count and the reservation of one process are one step (the DB count
        # awaits); the tenant's DB lock makes them one step across replicas.
        self._reserving = asyncio.Lock()
        self._loading = _KeyedLocks()

    @property
    def peers(self) -> EvaluationPeers | None:
        """The peer processes executors share their work with (None: one core)."""
        return self._peers

    # -- limits --------------------------------------------------------------------

    async def usage(self, tenant_id: str) -> tuple[int, int]:
        """Return (sessions, key bytes) held (in the DB) or being created (here) by
        ``tenant_id``."""
        async with self._store.transaction(read_only=True) as tx:
            count, held = await tx.usage(tenant_id, now_us=micros(self._clock()))
        pending = self._pending(tenant_id, exclude=None)
        return count + len(pending), held + sum(r.key_bytes for r in pending)

    def _pending(self, tenant_id: str, *, exclude: _Reservation | None) -> list[_Reservation]:
        return [r for r in self._reservations if r.tenant_id == tenant_id and r is not exclude]

    def _check_quota(self, count: int, held: int, key_bytes: int) -> None:
        limits = self.limits
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

    async def _counted(
        self, tx: SessionTransaction, tenant_id: str, exclude: _Reservation | None
    ) -> tuple[int, int]:
        count, held = await tx.usage(tenant_id, now_us=micros(self._clock()))
        pending = self._pending(tenant_id, exclude=exclude)
        return count + len(pending), held + sum(r.key_bytes for r in pending)

    async def _reserve(self, tenant_id: str, key_bytes: int, request_id: str) -> _Reservation:
        limits = self.limits
        if key_bytes > limits.max_session_key_bytes:
            raise ResourceExhausted(
                f"galois_keys_size {key_bytes} exceeds the limit max_session_key_bytes="
                f"{limits.max_session_key_bytes}",
                metadata={
                    "limit": "max_session_key_bytes",
                    "max": str(limits.max_session_key_bytes),
                },
            )
        async with self._reserving:
            if request_id and any(
                (r.tenant_id, r.request_id) == (tenant_id, request_id) for r in self._reservations
            ):
                raise Aborted(
                    f"a CreateSession with request_id {request_id!r} is in progress; retry later",
                    reason="REQUEST_IN_PROGRESS",
                )
            async with self._store.transaction() as tx:
                await tx.lock_tenant(tenant_id)
                count, held = await self._counted(tx, tenant_id, None)
            self._check_quota(count, held, key_bytes)
            reservation = _Reservation(tenant_id, key_bytes, request_id)
            self._reservations.append(reservation)
            return reservation

    # -- lifecycle -----------------------------------------------------------------

    async def create(
        self, tenant_id: str, header: SessionHeader, key_chunks: AsyncIterator[bytes]
    ) -> Session:
        """Open a session: check the header, reserve, receive the keys, build, persist.

        Args:
            tenant_id: The caller's tenant.
            header: The checked header.
            key_chunks: The Galois-key bytes, in order.

        Returns:
            The open session (an existing one for a repeated ``request_id``, also one
            created before a restart).

        Raises:
            InvalidArgument: Inconsistent header, parameters or keys.
            FailedPrecondition: No adapter source; adapter shapes differ from the spec;
                keys missing for a plan step or from another parameter set.
            NotFound: No such adapter.
            ResourceExhausted: A limit would be exceeded (the message names it).
            Aborted: A creation with the same ``request_id`` is still in progress.
        """
        if header.request_id:
            existing = await self._by_request(tenant_id, header.request_id)
            if existing is not None:
                return existing
        if self._adapter_source is None:
            raise FailedPrecondition(
                "registry adapter source not configured", reason="ADAPTER_SOURCE_MISSING"
            )
        plan, reason = compile_for(header.spec, field_prefix="header.spec.")
        _check_parameters_blob(header.parameters, header.spec.params)
        if header.galois_keys_size < 0:
            raise InvalidArgument("header.galois_keys_size", "must be >= 0")
        reservation = await self._reserve(tenant_id, header.galois_keys_size, header.request_id)
        try:
            keys = await _receive_keys(key_chunks, header.galois_keys_size)
            adapter = await self._adapter_source.load(
                tenant_id=tenant_id, name=header.adapter_name, version=header.adapter_version
            )
            executor = await self._run(lambda: _build(adapter, header, plan, keys, self._peers))
            now = self._clock()
            session = Session(
                session_id=uuid.uuid4().hex,
                tenant_id=tenant_id,
                plan=plan,
                reason=reason,
                adapter=adapter,
                executor=executor,
                key_bytes=header.galois_keys_size,
                request_id=header.request_id,
                now=now,
            )
            record = SessionRecord(
                id=session.id,
                tenant_id=tenant_id,
                request_id=header.request_id,
                adapter_name=adapter.name,
                adapter_version=adapter.version,
                adapter_digest=adapter.digest,
                spec_json=spec_to_json(header.spec),
                seal_parameters=header.parameters,
                key_bytes=header.galois_keys_size,
                create_time_us=micros(now),
                last_used_time_us=micros(now),
                expire_time_us=micros(now + self.limits.idle_ttl_seconds),
            )
            await self._run(lambda: self._keys.write(session.id, keys or b""))
            try:
                winner = await self._insert(record, reservation)
            except BaseException:
                self._keys.delete(session.id)
                raise
        finally:
            self._reservations.remove(reservation)
        if winner is not None:  # another replica created it with this request_id first
            self._keys.delete(session.id)
            session.drop_keys()
            return await self.get(tenant_id, winner)
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

    async def _by_request(self, tenant_id: str, request_id: str) -> Session | None:
        for cached in self._sessions.values():
            if (cached.tenant_id, cached.request_id) == (tenant_id, request_id):
                return await self.get(tenant_id, cached.id)
        async with self._store.transaction(read_only=True) as tx:
            record = await tx.by_request(tenant_id, request_id)
        if record is None or micros(self._clock()) >= record.expire_time_us:
            return None
        return await self.get(tenant_id, record.id)

    async def _insert(self, record: SessionRecord, reservation: _Reservation) -> str | None:
        """Insert the row unless the request id is taken; return the taker's id then."""
        stale: str | None = None
        async with self._store.transaction() as tx:
            await tx.lock_tenant(record.tenant_id)
            if record.request_id:
                existing = await tx.by_request(record.tenant_id, record.request_id)
                if existing is not None:
                    if micros(self._clock()) < existing.expire_time_us:
                        return existing.id
                    # Expired but not reaped yet: it frees the request id.
                    await tx.delete(existing.id)
                    stale = existing.id
            count, held = await self._counted(tx, record.tenant_id, reservation)
            self._check_quota(count, held, record.key_bytes)
            await tx.insert(record)
        if stale is not None:
            self._forget(stale, why="expired")
        return None

    async def get(self, tenant_id: str, session_id: str) -> Session:
        """Return the tenant's session and mark it used; rebuild it on a cache miss.

        Raises:
            NotFound: No such open session for this tenant (also after expiry).
            FailedPrecondition: Its key file or adapter is gone or changed.
        """
        cached = self._sessions.get(session_id)
        if cached is not None and cached.tenant_id != tenant_id:
            raise NotFound(f"session {session_id!r} not found")
        if cached is not None and (cached.in_flight or self._clock() < self.expire_time(cached)):
            return await self._used(cached)
        if cached is not None:
            # Idle here; the row decides (another replica may have used it since).
            self._drop_cached(cached)
        async with self._loading.hold(session_id):
            cached = self._sessions.get(session_id)
            if cached is not None:  # rebuilt meanwhile by a concurrent call
                if cached.tenant_id != tenant_id:
                    raise NotFound(f"session {session_id!r} not found")
                return await self._used(cached)
            record = await self._live_record(tenant_id, session_id)
            session = await self._rebuild(record)
            session.written_use = record.last_used_time_us / 1_000_000
            self._sessions[session.id] = session
            log.info(
                "HE session rebuilt",
                extra={"session_id": session.id, "tenant_id": tenant_id},
            )
            return await self._used(session)

    async def _live_record(self, tenant_id: str, session_id: str) -> SessionRecord:
        async with self._store.transaction(read_only=True) as tx:
            record = await tx.get(tenant_id, session_id)
        if record is None:
            raise NotFound(f"session {session_id!r} not found")
        if micros(self._clock()) >= record.expire_time_us:
            await self._delete(session_id, why="expired")
            raise NotFound(f"session {session_id!r} not found")
        return record

    async def _rebuild(self, record: SessionRecord) -> Session:
        if self._adapter_source is None:
            raise FailedPrecondition(
                "registry adapter source not configured", reason="ADAPTER_SOURCE_MISSING"
            )
        spec = spec_from_json(record.spec_json)
        header = SessionHeader(
            adapter_name=record.adapter_name,
            adapter_version=record.adapter_version,
            spec=spec,
            parameters=record.seal_parameters,
            galois_keys_size=record.key_bytes,
            request_id=record.request_id,
        )
        plan, reason = compile_for(spec, field_prefix="header.spec.")
        keys = await self._run(lambda: self._keys.read(record.id))
        if keys is None or len(keys) != record.key_bytes:
            raise FailedPrecondition(
                f"the Galois-key file of session {record.id} is missing or incomplete in "
                f"{self._keys.root} (replicas must share the data folder); create a new session",
                reason="SESSION_KEYS_MISSING",
            )
        adapter = await self._adapter_source.load(
            tenant_id=record.tenant_id, name=record.adapter_name, version=record.adapter_version
        )
        if adapter.digest != record.adapter_digest:
            raise FailedPrecondition(
                f"adapter {record.adapter_name}@{record.adapter_version} changed since session "
                f"{record.id} was created; create a new session",
                reason="ADAPTER_CHANGED",
            )
        executor = await self._run(lambda: _build(adapter, header, plan, keys or None, self._peers))
        return Session(
            session_id=record.id,
            tenant_id=record.tenant_id,
            plan=plan,
            reason=reason,
            adapter=adapter,
            executor=executor,
            key_bytes=record.key_bytes,
            request_id=record.request_id,
            now=self._clock(),
        )

    async def _used(self, session: Session) -> Session:
        """Mark a use; write it to the row when the last write is idle_ttl/4 old."""
        session.last_used = self._clock()
        if session.last_used - session.written_use >= self.limits.idle_ttl_seconds / 4:
            await self._write_use(session)
        return session

    async def _write_use(self, session: Session) -> None:
        used = session.last_used
        async with self._store.transaction() as tx:
            await tx.touch(
                session.id,
                last_used_us=micros(used),
                expire_us=micros(used + self.limits.idle_ttl_seconds),
            )
        session.written_use = used

    def expire_time(self, session: Session) -> float:
        """When ``session`` expires if not used again (clock seconds)."""
        return session.last_used + self.limits.idle_ttl_seconds

    async def close(self, tenant_id: str, session_id: str) -> None:
        """Close the tenant's session: delete its row, its key file and its cache entry.

        Raises:
            NotFound: No such open session for this tenant.
        """
        cached = self._sessions.get(session_id)
        if cached is not None and cached.tenant_id != tenant_id:
            raise NotFound(f"session {session_id!r} not found")
        if cached is None or self._clock() >= self.expire_time(cached):
            await self._live_record(tenant_id, session_id)
        await self._delete(session_id, why="closed")

    async def reap(self) -> int:
        """Remove every session idle for longer than the TTL; return how many rows.

        Cached sessions first write their latest use (an evaluation in progress counts
        as a use now), so a row is not reaped while this process still uses it.
        """
        now = self._clock()
        for session in list(self._sessions.values()):
            if session.in_flight:
                session.last_used = now
            if now >= self.expire_time(session):
                self._drop_cached(session)
            elif session.last_used > session.written_use:
                await self._write_use(session)
        async with self._store.transaction() as tx:
            expired = await tx.expired(now_us=micros(now))
            for session_id in expired:
                await tx.delete(session_id)
        for session_id in expired:
            self._forget(session_id, why="expired")
        return len(expired)

    async def close_all(self) -> None:
        """At shutdown: write the latest uses, drop every cached executor (rows and key
        files stay, so another process serves the sessions)."""
        for session in list(self._sessions.values()):
            if session.last_used > session.written_use:
                try:
                    await self._write_use(session)
                except (Unavailable, Aborted) as error:
                    log.warning("HE session use not recorded at shutdown: %s", error)
            self._drop_cached(session)

    async def sweep_files(self, *, grace_seconds: float) -> int:
        """Remove abandoned temporary key files and key files without a row (start-up).

        Args:
            grace_seconds: Row-less key files younger than this are kept (a creation
                may be committing on another replica).

        Returns:
            How many files were removed.
        """
        async with self._store.transaction(read_only=True) as tx:
            known = await tx.ids()
        return await self._run(lambda: self._keys.sweep(known=known, grace_seconds=grace_seconds))

    async def _delete(self, session_id: str, *, why: str) -> None:
        async with self._store.transaction() as tx:
            await tx.delete(session_id)
        self._forget(session_id, why=why)

    def _forget(self, session_id: str, *, why: str) -> None:
        """After the row is gone: delete the key file and the cache entry."""
        self._keys.delete(session_id)
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.drop_keys()
        log.info("HE session %s", why, extra={"session_id": session_id})

    def _drop_cached(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        session.drop_keys()

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
        return await self.evaluate(await self.get(tenant_id, session_id), layer, ciphertexts)

    async def evaluate(
        self, session: Session, layer: str, ciphertexts: Sequence[bytes]
    ) -> ApplyResult:
        """Apply ``layer``'s delta on a session already found with :meth:`get`.

        The gRPC layer looks the session up once, before it reads the ciphertexts (to
        fail fast), and evaluates on that object rather than looking it up again: a
        closed or expired session is still refused (its executor is gone: NotFound).

        Raises:
            As :meth:`apply`.
        """
        session.check_layer(layer)
        units = _units(session, layer, len(ciphertexts))
        plan = session.layer_plan(layer, units)
        return await self._evaluating(session, lambda: session.evaluate(layer, plan, ciphertexts))

    async def _evaluating(self, session: Session, work: Callable[[], ApplyResult]) -> ApplyResult:
        """Run ``work`` (a session's evaluation) on a worker thread, counted in flight."""
        session.in_flight += 1
        try:
            return await self._run(work)
        except PeerFailed:
            # The executor's peer process is gone: drop the executor, so the client's
            # retry (UNAVAILABLE) rebuilds the session on a new peer process.
            log.error("HE peer process failed; session %s will be rebuilt", session.id)
            self._drop_cached(session)
            raise
        finally:
            session.in_flight -= 1
            session.last_used = self._clock()

    async def evaluate_layers(
        self, session: Session, layers: Sequence[str], ciphertexts: Sequence[bytes]
    ) -> ApplyResult:
        """Apply several layers' deltas to the same ciphertexts, in one worker hop.

        The layers must read the same input (checked by the caller: same input size);
        the results are concatenated layer after layer and the counts summed. With a
        peer process, two layers run at once (:meth:`HeLoraExecutor.apply_layers`).
        One layer is :meth:`evaluate`.

        Raises:
            As :meth:`apply`.
        """
        if len(layers) == 1:
            return await self.evaluate(session, layers[0], ciphertexts)
        plans = []
        for layer in layers:
            session.check_layer(layer)
            plans.append(session.layer_plan(layer, _units(session, layer, len(ciphertexts))))

        return await self._evaluating(
            session, lambda: session.evaluate_layers(layers, plans, ciphertexts)
        )

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def run_reaper(self, stop: asyncio.Event, *, interval_seconds: float) -> None:
        """Reap expired sessions every ``interval_seconds`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.reap()
            except (Unavailable, Aborted) as error:
                log.warning("HE session reaper: %s; retrying next interval", error)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
            except TimeoutError:
                continue


def spec_to_json(spec: PlanRequest) -> str:
    """The checked spec as canonical JSON (stored in the session's row)."""
    return json.dumps(
        {
            "hidden_size": spec.hidden_size,
            "output_size": spec.output_size,
            "rank": spec.rank,
            "alpha": spec.alpha,
            "tokens": spec.tokens,
            "params": spec.params.to_dict(),
            "packing": None if spec.packing is None else spec.packing.value,
            "variant": None if spec.variant is None else spec.variant.value,
        },
        sort_keys=True,
    )


def spec_from_json(text: str) -> PlanRequest:
    """Inverse of :func:`spec_to_json`."""
    data = json.loads(text)
    packing = data["packing"]
    # Rows written before plan variants existed have no "variant": the compiler chooses.
    variant = data.get("variant")
    return PlanRequest(
        hidden_size=int(data["hidden_size"]),
        output_size=int(data["output_size"]),
        rank=int(data["rank"]),
        alpha=float(data["alpha"]),
        tokens=int(data["tokens"]),
        params=CkksParams.from_dict(data["params"]),
        packing=None if packing is None else Packing(packing),
        variant=None if variant is None else Variant(variant),
    )


def _units(session: Session, layer: str, count: int) -> int:
    if count < 1:
        raise InvalidArgument("header.ciphertexts", "must be at least 1")
    if session.plan.packing is Packing.PER_TOKEN:
        # One unit is input_copies ciphertexts (the client-side baby steps); the split
        # depends only on the rank, so every layer of the session shares it.
        copies = session.plan.input_copies
        if count % copies:
            raise InvalidArgument(
                "header.ciphertexts",
                f"a {session.plan.variant.value} request takes a multiple of {copies} "
                f"ciphertexts (the rotated copies of each unit), got {count}",
            )
        return count // copies
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
    peers: EvaluationPeers | None,
) -> HeLoraExecutor:
    """Blocking part of session creation: check the adapter, parse keys, pre-encode
    (here and in a peer process, if any)."""
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
        peers=peers,
    )
    for layer, weights in adapter.layers.items():
        shape = adapter.shape(layer)
        layer_plan = plan_for_units(
            plan, hidden_size=shape.input_size, output_size=shape.output_size, units=1
        )
        # Missing Galois keys and adapters that could overflow the modulus fail here,
        # before the client sends a single ciphertext.
        executor.adapter(layer_plan, f"{adapter.digest}:{layer}", _returning(weights))
    # Key hygiene: exactly the plan's keys. The session plan is the one for the largest
    # layer; its steps cover every layer's (checked just above, per layer).
    executor.refuse_unneeded_keys(plan)
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
