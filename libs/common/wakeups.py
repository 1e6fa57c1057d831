"""Wake-ups for future waiters: a process that finishes a future says so over NATS.

A ``WaitFuture`` is served by an API process while a worker process finishes the
future. Instead of reading the futures table every few milliseconds, the waiter
registers with :class:`FutureWakeups`, which holds one NATS core subscription per
process on ``<subject_prefix>.*``; the worker publishes ``<subject_prefix>.<future_id>``
right after the transaction that finished the future commits. The database stays the
only truth: a wake-up only makes the waiter read it again. A wake-up lost in a NATS
outage costs a waiter at most its re-read interval (``FutureStore``'s ``poll_max``),
never a wrong answer, so publishing is best-effort (core NATS, no JetStream: a wake-up
for nobody is worth nothing later).

Subjects must not fall under a JetStream stream's subjects (the job stream captures
``<jobs prefix>.>``); the trainer uses ``<jobs prefix>-done``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from tensafe.common.errors import InvalidArgument

_log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


class FutureWakeups:
    """Publishes and receives "future finished" wake-ups (see the module docstring).

    Build it with :meth:`start`; :meth:`close` it with the connection.

    Args:
        connection: A connected ``nats.aio.client.Client``.
        subject_prefix: Subject root of the wake-ups, e.g. ``tensafe.trainer.jobs-done``.
    """

    def __init__(self, connection: Any, subject_prefix: str) -> None:
        self._nc = connection
        self._prefix = subject_prefix
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscription: Any = None

    @classmethod
    async def start(cls, connection: Any, subject_prefix: str) -> FutureWakeups:
        """Subscribe to the wake-ups of every future.

        Args:
            connection: A connected ``nats.aio.client.Client``
                (:attr:`tensafe.common.jetstream.JetStream.connection`).
            subject_prefix: Subject root of the wake-ups.

        Returns:
            The subscribed helper.
        """
        wakeups = cls(connection, subject_prefix)
        wakeups._subscription = await connection.subscribe(
            f"{subject_prefix}.*", cb=wakeups._on_message
        )
        return wakeups

    async def _on_message(self, message: Any) -> None:
        future_id = str(message.subject).rsplit(".", 1)[-1]
        for event in self._waiters.get(future_id, ()):
            event.set()

    @contextlib.contextmanager
    def watch(self, future_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever a wake-up for ``future_id`` arrives while inside.

        Enter it before reading the future, so that a finish between the read and the
        wait is not missed.
        """
        event = asyncio.Event()
        self._waiters.setdefault(future_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiters.get(future_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[future_id]

    def watched(self) -> list[str]:
        """The futures this process's waiters watch now."""
        return list(self._waiters)

    def wake_local(self, future_id: str) -> None:
        """Wake this process's waiters of a future (no message sent)."""
        for event in self._waiters.get(future_id, ()):
            event.set()

    async def notify(self, future_id: str) -> None:
        """Tell every waiter of ``future_id`` in any process that it may be done.

        Call it after the transaction that finished the future committed. Best effort:
        a failure is logged, and waiters still see the future at their next re-read.

        Raises:
            InvalidArgument: ``future_id`` is not a subject token.
        """
        if not _TOKEN.fullmatch(future_id):
            raise InvalidArgument("future_id", "is not a valid future id")
        self.wake_local(future_id)
        try:
            await self._nc.publish(f"{self._prefix}.{future_id}", b"")
        except Exception as error:
            _log.warning("future wake-up for %s not sent: %s", future_id, error)

    async def close(self) -> None:
        """Unsubscribe (the connection stays open)."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None
