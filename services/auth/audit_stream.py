"""The auth service's consumer of the audit stream (DESIGN §8).

Every other service publishes its security events (authentication failures, denied
permissions, key unwraps) to the JetStream audit stream; this consumer appends each one
to the hash chain and acks it only after the database commit. A redelivered event is
skipped by its event id (the chain's unique key), so an event is stored exactly once
even when auth crashed between commit and ack. While auth is down the events wait in
the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from tensafe.auth.domain.service import SERVICE_NAME, AuthDomain
from tensafe.common.auth import (
    AUDIT_DURABLE,
    AuditRecord,
    audit_record_from_json,
    audit_stream_config,
)
from tensafe.common.errors import InvalidArgument
from tensafe.common.jetstream import Consumer, Delivery, JetStream, PermanentJobError

log = logging.getLogger(__name__)


class AuditStreamConsumer:
    """Appends audit events from the stream to the chain.

    Args:
        domain: The auth domain (owns the chain).
        jetstream: Connected with :func:`~tensafe.common.auth.audit_stream_config` and
            the :data:`~tensafe.common.auth.AUDIT_DURABLE` consumer name.
    """

    def __init__(self, domain: AuthDomain, jetstream: JetStream) -> None:
        self._domain = domain
        self._jetstream = jetstream
        self._consumer = Consumer(jetstream)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, domain: AuthDomain, nats_url: str, *, tls: ssl.SSLContext | None = None
    ) -> AuditStreamConsumer:
        """Connect to NATS and make sure the stream exists.

        Args:
            domain: Appends the events to the audit chain.
            nats_url: The NATS server.
            tls: TLS context of the connection (``tls://`` servers).

        Raises:
            Unavailable: NATS cannot be reached.
        """
        jetstream = await JetStream.connect(
            audit_stream_config(nats_url, durable=AUDIT_DURABLE),
            client_name="tensafe-auth-audit",
            tls=tls,
        )
        try:
            await jetstream.ensure_stream()
        except BaseException:
            await jetstream.close()
            raise
        return cls(domain, jetstream)

    async def handle(self, delivery: Delivery) -> None:
        """Append one delivered event (idempotent by event id).

        Raises:
            PermanentJobError: The event is malformed; it is recorded as such in the
                chain and removed from the stream.
        """
        try:
            record = audit_record_from_json(delivery.data)
        except InvalidArgument as error:
            await self._domain.record(
                AuditRecord(
                    kind="audit.malformed_event",
                    service=SERVICE_NAME,
                    payload={"subject": delivery.subject, "error": error.message},
                    event_id=f"malformed-{delivery.stream_sequence}-{delivery.msg_id or ''}"[:64],
                )
            )
            raise PermanentJobError(f"malformed audit event: {error.message}") from error
        await self._domain.record_many([record])

    def start(self) -> None:
        """Consume in a background task until :meth:`close`."""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._consumer.run(self.handle, stop=self._stop)
            except Exception:  # keep consuming after a NATS outage; events wait meanwhile
                log.exception("audit stream consumer failed; restarting in 1 s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)

    async def close(self) -> None:
        """Finish the current event, stop consuming and disconnect."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self._jetstream.close()
