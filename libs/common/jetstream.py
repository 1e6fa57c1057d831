"""Typed JetStream helpers: stream set-up, de-duplicated publishing, a durable consumer.

Delivery contract
=================

JetStream delivers **at least once**. A message can reach a handler more than once:
after a handler error (the message is NAKed and redelivered), after a worker dies
between its database commit and its ack (the server redelivers once ``ack_wait``
passes), or when a publisher retries. TenSafe makes *effects* exactly-once instead:

1. The publisher sets a ``Nats-Msg-Id`` (e.g. the future id). Within the stream's
   ``duplicate_window`` the server stores a second publish with the same id only once
   (the :class:`PublishAck` says ``duplicate=True``).
2. The handler makes its effect idempotent by key (future id, training-client step
   number, event id): it checks the key and writes the effect and the key in **one**
   database transaction. A redelivered message finds its key done and returns.
3. :class:`Consumer` acks **only after the handler returned**, i.e. after that commit.
   A crash before the ack therefore costs a redelivery, never a lost or doubled effect.

Outcomes of a delivery, decided by how the handler ends:

* returns: ``ack`` (synchronously confirmed by the server);
* raises :class:`RetryLater`: ``nak`` with the requested delay (e.g. waiting for the
  previous step of the same training client);
* raises :class:`PermanentJobError` (malformed payload, impossible request): the
  ``on_dead_letter`` hook runs (so the service can fail the future) and the message is
  terminated (``term``): it is never redelivered;
* raises anything else: ``nak`` with exponential backoff (``nak_initial_delay`` doubled
  per delivery, capped at ``nak_max_delay``, with jitter so that many workers do not
  retry in lock-step); on the last allowed delivery (``max_deliver``) the message goes to
  ``on_dead_letter`` and is terminated instead, because the server would not redeliver it.

While a handler runs, the consumer sends "in progress" acks every ``ack_wait / 3`` so a
long training step is not redelivered to another worker mid-way; ``handler_timeout``
bounds a handler that hangs.

Concurrency
===========

A :class:`Consumer` runs up to ``max_in_flight`` handlers at once (1: one after
another), so that one delivery's I/O (database round trips, acks) overlaps another's
work. Each delivery is acked, NAKed or terminated on its own, after its own handler, so
the contract above holds per message. The caller may give :meth:`Consumer.run` a
``key`` (e.g. the training client a job belongs to): deliveries with the same key are
never handled at the same time in one consumer; a later one waits, inside this process
and in fetch order, until the earlier one's handler has returned (its ack is then on
its way) or it is NAKed, instead of being handed to
the handler early only to be refused and redelivered. Waiting deliveries do not count
against ``max_in_flight`` (one busy lane must not keep other lanes from running), but at
most ``4 x max_in_flight`` of them are held, so a consumer holds at most
``5 x max_in_flight`` unacked messages. Ordering across
processes is not the consumer's business: the handler still checks it (e.g. a job's
sequence number against the database).

Retention
=========

Streams use file storage (they must survive a server restart). The default retention is
``WORK_QUEUE``: a message is removed once acked, which fits jobs consumed by one durable
consumer shared by many workers (JetStream hands each message to one of them). Work-queue
streams allow only consumers with non-overlapping subject filters. ``LIMITS`` keeps
messages until ``max_age``/``max_bytes`` and suits event streams read by several
consumers. The duplicate window defaults to 10 minutes, longer than NATS' 2 minutes,
to cover publisher retries with backoff; de-duplication beyond it is the handler's job.

Tracing
=======

:meth:`JetStream.publish` runs in a PRODUCER span and injects the current OpenTelemetry
context into the message headers with the globally configured propagator (W3C trace
context by default); :class:`Consumer` extracts it and runs the handler inside a CONSUMER
span whose parent is the publisher's span, so one trace covers the RPC, the message and
the work it caused.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats.aio.client
import nats.errors
import nats.js.api
import nats.js.errors
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tensafe.common.errors import (
    ConfigError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

_logger = logging.getLogger(__name__)

# Deliveries a consumer holds waiting for their lane, per max_in_flight: enough for a
# client that queues several calls (forward-backward, forward-backward, step) without
# keeping other clients' jobs from being fetched, and still a bound on unacked messages.
_WAITING_PER_SLOT = 4

MSG_ID_HEADER = "Nats-Msg-Id"
"""The JetStream header that carries the de-duplication id."""

# Stream and consumer names become subject tokens in the JetStream API, so they must
# not contain separators or wildcards (see the NATS naming rules, ADR-6).
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_SUBJECT_PATTERN = re.compile(r"^[^\s]+$")


class Retention(enum.Enum):
    """Stream retention policy (see the module docstring)."""

    WORK_QUEUE = "workqueue"
    LIMITS = "limits"


@dataclass(frozen=True, kw_only=True)
class JetStreamConfig:
    """Connection, stream and durable-consumer settings for one job or event stream.

    Raises:
        ConfigError: From ``__post_init__`` when a value is invalid; the error names the
            field.
    """

    url: str
    """NATS server URL(s), comma-separated for a cluster."""

    stream: str
    """Stream name, e.g. ``TRAINER_JOBS``."""

    subjects: tuple[str, ...]
    """Subjects the stream captures, e.g. ``("trainer.jobs.>",)``."""

    durable: str | None = None
    """Durable consumer name shared by all workers; ``None`` for publish-only use."""

    filter_subject: str | None = None
    """Subject filter of the consumer; ``None`` consumes every subject of the stream."""

    retention: Retention = Retention.WORK_QUEUE
    """Stream retention policy."""

    duplicate_window: float = 600.0
    """Seconds during which a repeated ``Nats-Msg-Id`` is dropped by the server."""

    max_age: float = 0.0
    """Seconds a message may stay in the stream; 0 keeps it until acked/limits."""

    max_bytes: int = -1
    """Stream size limit in bytes; -1 is unlimited."""

    replicas: int = 1
    """Stream replicas (3 in a production cluster)."""

    ack_wait: float = 30.0
    """Seconds without an ack or progress signal before the server redelivers."""

    max_deliver: int = 10
    """Deliveries per message before it is dead-lettered; -1 is unlimited."""

    max_ack_pending: int = 256
    """Messages a consumer may hold unacked across all workers."""

    nak_initial_delay: float = 1.0
    """Redelivery delay after the first failed delivery, in seconds."""

    nak_max_delay: float = 60.0
    """Upper bound of the exponential redelivery delay, in seconds."""

    handler_timeout: float | None = None
    """Seconds a handler may run before it counts as failed; ``None`` is unbounded."""

    fetch_batch: int = 1
    """Messages pulled per request; 1 spreads long jobs evenly over workers."""

    max_in_flight: int = 1
    """Deliveries one :class:`Consumer` handles at once (see :meth:`Consumer.run`); 1
    handles them one after another."""

    fetch_wait: float = 1.0
    """Seconds one pull waits for messages; also the longest stop latency when idle."""

    connect_timeout: float = 10.0
    """Seconds to wait for the first connection before :class:`Unavailable`."""

    request_timeout: float = 5.0
    """Seconds to wait for the server's reply to a publish or API request."""

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("url", "a NATS URL is required")
        if not _NAME_PATTERN.match(self.stream):
            raise ConfigError("stream", f"{self.stream!r} is not a valid stream name")
        if not self.subjects:
            raise ConfigError("subjects", "at least one subject is required")
        for subject in self.subjects:
            if not _SUBJECT_PATTERN.match(subject):
                raise ConfigError("subjects", f"{subject!r} is not a valid subject")
        if self.durable is not None and not _NAME_PATTERN.match(self.durable):
            raise ConfigError("durable", f"{self.durable!r} is not a valid consumer name")
        if self.duplicate_window <= 0:
            raise ConfigError("duplicate_window", "must be positive")
        if self.max_age < 0:
            raise ConfigError("max_age", "must be 0 (unlimited) or positive")
        if self.max_age and self.duplicate_window > self.max_age:
            raise ConfigError("duplicate_window", "must not exceed max_age")
        if self.ack_wait <= 0:
            raise ConfigError("ack_wait", "must be positive")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ConfigError("max_deliver", "must be -1 (unlimited) or at least 1")
        if self.max_ack_pending < 1:
            raise ConfigError("max_ack_pending", "must be at least 1")
        if self.nak_initial_delay < 0 or self.nak_max_delay < self.nak_initial_delay:
            raise ConfigError("nak_max_delay", "need 0 <= nak_initial_delay <= nak_max_delay")
        if self.handler_timeout is not None and self.handler_timeout <= 0:
            raise ConfigError("handler_timeout", "must be positive or None")
        if self.fetch_batch < 1:
            raise ConfigError("fetch_batch", "must be at least 1")
        if self.max_in_flight < 1:
            raise ConfigError("max_in_flight", "must be at least 1")
        if self.fetch_wait <= 0:
            raise ConfigError("fetch_wait", "must be positive")
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ConfigError("connect_timeout", "timeouts must be positive")
        if self.replicas < 1:
            raise ConfigError("replicas", "must be at least 1")


@dataclass(frozen=True)
class PublishAck:
    """The server's confirmation that a message is stored."""

    stream: str
    """Stream that stored the message."""

    sequence: int
    """Stream sequence of the message (of the first copy, for a duplicate)."""

    duplicate: bool
    """True when the ``Nats-Msg-Id`` was seen within the duplicate window."""


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message to a handler."""

    subject: str
    """Subject the message was published on."""

    data: bytes
    """Payload."""

    headers: Mapping[str, str]
    """Message headers (including trace context and ``Nats-Msg-Id``)."""

    msg_id: str | None
    """The publisher's de-duplication id."""

    num_delivered: int
    """1 on first delivery; higher values are redeliveries of the same message."""

    max_deliver: int
    """The consumer's delivery limit (-1 for unlimited)."""

    stream_sequence: int
    """Position of the message in the stream."""

    @property
    def is_redelivery(self) -> bool:
        """Whether an earlier delivery of this message may already have had effects."""
        return self.num_delivered > 1

    @property
    def is_final_attempt(self) -> bool:
        """Whether a failure now dead-letters the message instead of retrying it."""
        return self.max_deliver > 0 and self.num_delivered >= self.max_deliver


@dataclass(frozen=True)
class ConsumerState:
    """Queue depth of a durable consumer (for metrics and tests)."""

    num_pending: int
    """Messages not yet delivered."""

    num_ack_pending: int
    """Messages delivered and not yet acked or terminated."""

    num_redelivered: int
    """Messages delivered more than once and still pending."""

    ack_floor_stream_sequence: int
    """Highest stream sequence below which every message is acked or terminated."""


class PermanentJobError(Exception):
    """A message that can never be processed (bad payload, impossible request).

    Raising it from a handler terminates the message instead of retrying it.

    Args:
        message: What is wrong with the job, safe to store on the failed future.
        reason: Machine-readable UPPER_SNAKE_CASE reason.
    """

    def __init__(self, message: str, *, reason: str = "PERMANENT_JOB_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class RetryLater(Exception):
    """The job cannot run yet (e.g. it waits for an earlier step); redeliver later.

    Args:
        delay: Seconds until redelivery.
        reason: Why, for logs.
    """

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(f"retry in {delay:.3f} s: {reason}")
        self.delay = delay
        self.reason = reason


Handler = Callable[[Delivery], Awaitable[None]]
"""An async function that processes one delivery; see the module docstring."""

LaneKey = Callable[[Delivery], str | None]
"""Which lane a delivery belongs to: deliveries with the same key are handled one at a
time, in fetch order; ``None`` puts a delivery in no lane (see the module docstring).
It must not raise: a malformed message gets ``None`` and the handler refuses it."""

DeadLetterHook = Callable[[Delivery, BaseException], Awaitable[None]]
"""Called before a message is terminated, with the error that ended it."""


def _enum_text(value: Any) -> str:
    """nats-py returns server enums either as enum members or as plain strings."""
    return str(getattr(value, "value", value))


class JetStream:
    """A connection to NATS with JetStream helpers for one configured stream.

    Build it with :meth:`connect`; close it with :meth:`close` or ``async with``.

    Args:
        connection: A connected ``nats.aio.client.Client``.
        config: Stream and consumer settings.
        tracer_provider: Source of the tracer for publish/consume spans; ``None`` uses
            the globally configured provider.
    """

    def __init__(
        self,
        connection: Any,
        config: JetStreamConfig,
        *,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self._nc = connection
        self._js = connection.jetstream(timeout=config.request_timeout)
        self._config = config
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    @classmethod
    async def connect(
        cls,
        config: JetStreamConfig,
        *,
        client_name: str,
        tracer_provider: trace.TracerProvider | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> JetStream:
        """Connect to NATS; reconnects after later outages are automatic.

        Args:
            config: Stream and consumer settings (``url`` is used here).
            client_name: Connection name shown in NATS monitoring, e.g. the service.
            tracer_provider: See the class docstring.
            tls: TLS context (CA bundle, client certificate) for a server that requires
                TLS (:func:`tensafe.common.tls.nats_client_context`); ``None`` uses
                plaintext, or the system's roots for ``tls://`` URLs.

        Returns:
            The connected helper.

        Raises:
            Unavailable: If no server accepted the connection within
                ``config.connect_timeout``.
        """
        connection = nats.aio.client.Client()

        async def on_error(error: Exception) -> None:
            _logger.warning("nats connection error: %s", error)

        async def on_disconnected() -> None:
            _logger.warning("nats disconnected; reconnecting")

        async def on_reconnected() -> None:
            _logger.info("nats reconnected")

        servers = [url.strip() for url in config.url.split(",") if url.strip()]
        try:
            async with asyncio.timeout(config.connect_timeout):
                await connection.connect(
                    servers,
                    name=client_name,
                    connect_timeout=max(1, int(config.connect_timeout)),
                    allow_reconnect=True,
                    # Keep reconnecting for as long as the process lives: the service
                    # reports NOT_SERVING meanwhile rather than exiting.
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    tls=tls,
                )
        except (TimeoutError, OSError, nats.errors.Error) as error:
            with contextlib.suppress(Exception):
                await connection.close()
            raise Unavailable(f"cannot connect to NATS at {config.url}: {error}") from error
        return cls(connection, config, tracer_provider=tracer_provider)

    @property
    def config(self) -> JetStreamConfig:
        """The settings this helper was built with."""
        return self._config

    @property
    def is_connected(self) -> bool:
        """Whether the connection is currently up (for readiness checks)."""
        return bool(self._nc.is_connected)

    @property
    def tracer(self) -> trace.Tracer:
        """The tracer used for message spans."""
        return self._tracer

    @property
    def connection(self) -> Any:
        """The underlying ``nats.aio.client.Client`` (core pub/sub, e.g. wake-ups)."""
        return self._nc

    @property
    def jetstream_context(self) -> Any:
        """The underlying ``nats.js.JetStreamContext`` (stream and consumer info)."""
        return self._js

    async def ensure_stream(self) -> None:
        """Create the stream, or update it to the configured subjects and limits.

        Idempotent; safe to call from every replica at start-up.

        Raises:
            ConfigError: If the stream exists with another retention policy or storage
                type, which JetStream cannot change in place.
            Unavailable: If the server does not answer.
        """
        config = self._config
        wanted = nats.js.api.StreamConfig(
            name=config.stream,
            subjects=list(config.subjects),
            retention=nats.js.api.RetentionPolicy(config.retention.value),
            storage=nats.js.api.StorageType.FILE,
            duplicate_window=config.duplicate_window,
            max_age=config.max_age,
            max_bytes=config.max_bytes,
            num_replicas=config.replicas,
            discard=nats.js.api.DiscardPolicy.OLD,
        )
        try:
            try:
                info = await self._js.stream_info(config.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await self._js.add_stream(wanted)
                    return
                except nats.js.errors.BadRequestError as create_error:
                    # Either another replica created it between our two calls (update
                    # it below) or the server rejects the config (e.g. subjects that
                    # overlap another stream).
                    try:
                        info = await self._js.stream_info(config.stream)
                    except nats.js.errors.NotFoundError:
                        raise ConfigError(
                            "subjects", f"JetStream rejected stream {config.stream}: {create_error}"
                        ) from create_error
            existing = info.config
            existing_retention = _enum_text(existing.retention)
            if existing_retention != config.retention.value:
                raise ConfigError(
                    "retention",
                    f"stream {config.stream} exists with retention {existing_retention}",
                )
            if _enum_text(existing.storage) != nats.js.api.StorageType.FILE.value:
                raise ConfigError("stream", f"stream {config.stream} does not use file storage")
            await self._js.update_stream(wanted)
        except (TimeoutError, nats.errors.Error) as error:
            if isinstance(error, nats.js.errors.APIError) and error.code == 400:
                raise ConfigError("stream", f"JetStream rejected stream: {error}") from error
            raise Unavailable(f"cannot ensure stream {config.stream}: {error}") from error

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> PublishAck:
        """Store a message in the stream, de-duplicated by ``msg_id``.

        Args:
            subject: A subject captured by the configured stream.
            payload: Message body.
            msg_id: De-duplication id (e.g. the future id); a repeat within the duplicate
                window is acknowledged but not stored again.
            headers: Extra headers; keys starting with ``Nats-`` are reserved.

        Returns:
            The server's acknowledgement.

        Raises:
            InvalidArgument: If ``msg_id`` is empty or a header is reserved.
            ResourceExhausted: If the payload exceeds the server's message size limit.
            Unavailable: If the server or stream does not answer in time.
        """
        if not msg_id:
            raise InvalidArgument("msg_id", "must not be empty")
        message_headers: dict[str, str] = {}
        for key, value in (headers or {}).items():
            if key.lower().startswith("nats-"):
                raise InvalidArgument(f"headers.{key}", "headers starting with Nats- are reserved")
            message_headers[key] = value
        message_headers[MSG_ID_HEADER] = msg_id
        with self._tracer.start_as_current_span(
            f"{subject} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.destination.name": subject,
                "messaging.message.id": msg_id,
            },
        ):
            # Inject while the producer span is current, so the consumer's span becomes
            # its child.
            propagate.inject(message_headers)
            try:
                ack = await self._js.publish(
                    subject,
                    payload,
                    stream=self._config.stream,
                    headers=message_headers,
                    timeout=self._config.request_timeout,
                )
            except nats.errors.MaxPayloadError as error:
                raise ResourceExhausted(
                    f"message of {len(payload)} bytes exceeds the NATS max payload"
                ) from error
            except (TimeoutError, nats.errors.Error) as error:
                raise Unavailable(f"cannot publish to {subject}: {error}") from error
        return PublishAck(stream=ack.stream, sequence=ack.seq, duplicate=bool(ack.duplicate))

    async def close(self) -> None:
        """Flush pending publishes and close the connection. Idempotent."""
        if self._nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=self._config.request_timeout)
        try:
            await self._nc.close()
        except asyncio.CancelledError:
            # nats-py awaits the transport's close waiter, a future that its own
            # reconnect loop may already have cancelled (a wait_for on
            # wait_closed() cancels the shared future). That CancelledError is
            # not ours: the connection is closed all the same. Re-raise only a
            # cancellation aimed at this task.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise

    async def __aenter__(self) -> JetStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class _InFlight:
    """The deliveries one :meth:`Consumer.run` holds: handlers running, deliveries
    waiting for their lane, and the tail of each lane."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._waiting_limit = limit * _WAITING_PER_SLOT
        self._running = 0
        self._waiting = 0
        self._lanes: dict[str, asyncio.Event] = {}
        """Per lane, the event its latest delivery sets when it ends: the next delivery
        of the lane waits for it (a chain, so the lane keeps fetch order)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    def _has_room(self) -> bool:
        return self._running < self._limit and self._waiting < self._waiting_limit

    async def wait_for_room(self) -> None:
        """Return once another delivery may be fetched and dispatched."""
        while not self._has_room():
            self._changed.clear()
            await self._changed.wait()

    def enter(self, lane: str | None) -> tuple[asyncio.Event | None, asyncio.Event]:
        """Count a new delivery.

        Returns:
            The event to wait for when its lane is busy (else None), and the event this
            delivery sets when it ends.
        """
        ahead = self._lanes.get(lane) if lane is not None else None
        mine = asyncio.Event()
        if lane is not None:
            self._lanes[lane] = mine
        if ahead is None:
            self._running += 1
        else:
            self._waiting += 1
        return ahead, mine

    def start_waiting_one(self) -> None:
        """A waiting delivery's lane is free: it now counts as running."""
        self._waiting -= 1
        self._running += 1

    def open_lane(self, lane: str | None, mine: asyncio.Event) -> None:
        """Let the next delivery of the lane start. Idempotent."""
        mine.set()
        if lane is not None and self._lanes.get(lane) is mine:
            del self._lanes[lane]

    def leave(self, lane: str | None, mine: asyncio.Event) -> None:
        """A running delivery ended (acked, NAKed, terminated or released)."""
        self._running -= 1
        self.open_lane(lane, mine)
        self._changed.set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a delivery's handling as a task of its own."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _process handles every handler outcome; this is a bug in the consumer.
            _logger.error("handling a delivery failed", exc_info=task.exception())

    async def drained(self) -> None:
        """Wait until every held delivery has ended."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Abandon every held delivery (the server redelivers them after ack_wait)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class _Outcome:
    """What the consumer did with one delivery (recorded on the span)."""

    action: str
    error: BaseException | None = None


class Consumer:
    """A durable pull consumer that runs a handler per message (see module docstring).

    Several workers (processes) may run a :class:`Consumer` with the same ``durable``
    name; JetStream hands each message to one of them. One :class:`Consumer` handles up
    to ``max_in_flight`` messages at once, one at a time per lane (see the module
    docstring, "Concurrency").

    Args:
        jetstream: Connected helper whose config names the stream and the durable.
        on_dead_letter: Called before a message is terminated (permanent error or
            delivery limit reached), e.g. to mark the job's future FAILED. If the hook
            raises, the message is NAKed instead so the hook is retried.

    Raises:
        ConfigError: If the config has no ``durable`` name.
    """

    def __init__(
        self,
        jetstream: JetStream,
        *,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        config = jetstream.config
        if config.durable is None:
            raise ConfigError("durable", "a durable consumer name is required to consume")
        self._jetstream = jetstream
        self._durable = config.durable
        self._config = config
        self._on_dead_letter = on_dead_letter
        self._random = random.Random()
        # Queue depth and throughput of the job stream; recorded into the process's
        # meter provider (tensafe.common.telemetry.setup_metrics), a no-op without one.
        meter = metrics.get_meter(__name__)
        self._pending = meter.create_gauge(
            "tensafe.jobs.pending",
            unit="{message}",
            description="Messages of the stream not yet delivered to this durable "
            "consumer (the queue depth), as of the latest delivery.",
        )
        self._processed = meter.create_counter(
            "tensafe.jobs.processed",
            unit="{message}",
            description="Deliveries handled, by outcome (ack, retry_later, nak, ...).",
        )

    async def ensure_consumer(self) -> None:
        """Create the durable consumer or update its settings. Idempotent.

        Raises:
            Unavailable: If the server does not answer.
        """
        config = self._config
        consumer_config = nats.js.api.ConsumerConfig(
            name=self._durable,
            durable_name=self._durable,
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            deliver_policy=nats.js.api.DeliverPolicy.ALL,
            ack_wait=config.ack_wait,
            max_deliver=config.max_deliver,
            max_ack_pending=config.max_ack_pending,
            filter_subject=config.filter_subject,
        )
        try:
            await self._jetstream.jetstream_context.add_consumer(
                config.stream, config=consumer_config
            )
        except (TimeoutError, nats.errors.Error) as error:
            raise Unavailable(f"cannot create consumer {self._durable}: {error}") from error

    async def state(self) -> ConsumerState:
        """Read the consumer's queue depth from the server.

        Returns:
            Pending, unacked and redelivered message counts.

        Raises:
            Unavailable: If the server does not answer.
        """
        try:
            info = await self._jetstream.jetstream_context.consumer_info(
                self._config.stream, self._durable
            )
        except (TimeoutError, nats.errors.Error) as error:
            raise Unavailable(f"cannot read consumer {self._durable}: {error}") from error
        return ConsumerState(
            num_pending=int(info.num_pending or 0),
            num_ack_pending=int(info.num_ack_pending or 0),
            num_redelivered=int(info.num_redelivered or 0),
            ack_floor_stream_sequence=int(info.ack_floor.stream_seq if info.ack_floor else 0),
        )

    async def run(
        self,
        handler: Handler,
        *,
        stop: asyncio.Event,
        key: LaneKey | None = None,
        on_queued: Callable[[Delivery], None] | None = None,
    ) -> None:
        """Fetch and handle messages until ``stop`` is set.

        Up to ``max_in_flight`` handlers run at once; deliveries with the same ``key``
        run one after another, in fetch order (module docstring, "Concurrency").

        On stop, the messages being handled are finished and acked (drain); messages
        fetched but not started (including those waiting for their lane) are NAKed
        without delay for other workers. Cancelling the task instead abandons the
        current messages, which the server redelivers after ``ack_wait``.

        Args:
            handler: Processes one delivery; see the module docstring for how its
                outcome maps to ack, nak and term.
            stop: Set to stop consuming.
            key: The lane of a delivery; ``None`` (the default) puts every delivery in
                no lane.
            on_queued: Told (synchronously, in the event loop) of each delivery that
                starts waiting for its lane, so that the handler of the delivery ahead of
                it may prepare for it; an error it raises is logged and ignored. The
                delivery is still handled as every other.

        Raises:
            Unavailable: If the consumer cannot be created, or the connection is closed
                while not stopping.
        """
        await self.ensure_consumer()
        js = self._jetstream.jetstream_context
        try:
            subscription = await js.pull_subscribe_bind(
                durable=self._durable, stream=self._config.stream
            )
        except (TimeoutError, nats.errors.Error) as error:
            raise Unavailable(f"cannot bind consumer {self._durable}: {error}") from error
        flight = _InFlight(self._config.max_in_flight)
        try:
            while not stop.is_set():
                await flight.wait_for_room()
                if stop.is_set():
                    break
                messages = await self._fetch(subscription, stop)
                for index, message in enumerate(messages):
                    if index > 0:
                        await flight.wait_for_room()
                    if stop.is_set():
                        await self._release(messages[index:])
                        break
                    self._dispatch(message, handler, key, flight, stop, on_queued)
            # Drain: the running handlers finish; waiting ones see stop and NAK.
            await flight.drained()
        finally:
            # Only non-empty when run() itself is cancelled or failed: abandon the rest.
            await flight.cancel()
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    def _dispatch(
        self,
        message: Any,
        handler: Handler,
        key: LaneKey | None,
        flight: _InFlight,
        stop: asyncio.Event,
        on_queued: Callable[[Delivery], None] | None = None,
    ) -> None:
        """Start handling ``message`` now, or once the earlier delivery of its lane ends."""
        delivery = self._delivery(message)
        lane = key(delivery) if key is not None else None
        ahead, mine = flight.enter(lane)
        if ahead is not None and on_queued is not None:
            try:
                on_queued(delivery)
            except Exception:
                _logger.exception("on_queued failed for message %s", delivery.msg_id)

        async def handle() -> None:
            try:
                if ahead is not None:
                    try:
                        await self._wait_in_lane(message, ahead)
                    finally:
                        flight.start_waiting_one()
                    if stop.is_set():
                        # Never started: give it back at once, as on a stop mid-batch.
                        await self._release([message])
                        return
                # The lane opens once the handler has returned, before the ack's round
                # trip: the effects are committed, and a lost ack only costs a
                # redelivery that the handler recognises.
                await self._process(
                    message, delivery, handler, handled=lambda: flight.open_lane(lane, mine)
                )
            finally:
                flight.leave(lane, mine)

        flight.spawn(handle())

    async def _wait_in_lane(self, message: Any, ahead: asyncio.Event) -> None:
        """Wait for the earlier delivery of the lane, keeping this message alive."""
        keep_alive = asyncio.create_task(self._keep_alive(message))
        try:
            await ahead.wait()
        finally:
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive

    async def _fetch(self, subscription: Any, stop: asyncio.Event) -> list[Any]:
        try:
            messages: list[Any] = await subscription.fetch(
                self._config.fetch_batch, timeout=self._config.fetch_wait
            )
        except TimeoutError:
            # No message within fetch_wait (nats.errors.TimeoutError subclasses it).
            return []
        except nats.errors.ConnectionClosedError as error:
            if stop.is_set():
                return []
            raise Unavailable(f"NATS connection closed under consumer {self._durable}") from error
        except nats.errors.Error as error:
            # Reconnecting or a transient server status: wait a little, or until stop.
            _logger.warning("fetch from %s failed: %s", self._durable, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._config.fetch_wait)
            return []
        return messages

    async def _release(self, messages: list[Any]) -> None:
        """Give fetched-but-unstarted messages back at once (stop requested)."""
        for message in messages:
            with contextlib.suppress(Exception):
                await message.nak()

    def _backoff(self, num_delivered: int) -> float:
        config = self._config
        exponent = min(max(num_delivered - 1, 0), 30)
        delay = min(config.nak_max_delay, config.nak_initial_delay * 2.0**exponent)
        # "Equal jitter": keep at least half of the delay, randomise the rest.
        return float(delay / 2 + self._random.uniform(0, delay / 2))

    async def _keep_alive(self, message: Any) -> None:
        """Tell the server the message is still being worked on, every ack_wait / 3."""
        interval = self._config.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await message.in_progress()
            except Exception as error:  # the next ack attempt reports the real problem
                _logger.warning("in-progress signal failed: %s", error)
                return

    def _delivery(self, message: Any) -> Delivery:
        headers: dict[str, str] = dict(message.headers or {})
        metadata = message.metadata
        return Delivery(
            subject=message.subject,
            data=bytes(message.data),
            headers=headers,
            msg_id=headers.get(MSG_ID_HEADER),
            num_delivered=int(metadata.num_delivered),
            max_deliver=self._config.max_deliver,
            stream_sequence=int(metadata.sequence.stream),
        )

    async def _process(
        self,
        message: Any,
        delivery: Delivery,
        handler: Handler,
        *,
        handled: Callable[[], None] | None = None,
    ) -> None:
        parent = propagate.extract(dict(delivery.headers))
        with self._jetstream.tracer.start_as_current_span(
            f"{delivery.subject} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": delivery.subject,
                "messaging.message.id": delivery.msg_id or "",
                "messaging.consumer.group.name": self._durable,
                "messaging.nats.num_delivered": delivery.num_delivered,
            },
        ) as span:
            outcome = await self._run_handler(message, delivery, handler, handled)
            span.set_attribute("tensafe.job.outcome", outcome.action)
            attributes = {
                "messaging.system": "nats",
                "messaging.consumer.group.name": self._durable,
            }
            self._pending.set(int(message.metadata.num_pending), attributes)
            self._processed.add(1, {**attributes, "tensafe.job.outcome": outcome.action})
            if outcome.error is not None:
                span.record_exception(outcome.error)
                span.set_status(Status(StatusCode.ERROR, type(outcome.error).__name__))

    async def _run_handler(
        self,
        message: Any,
        delivery: Delivery,
        handler: Handler,
        handled: Callable[[], None] | None = None,
    ) -> _Outcome:
        """Run the handler and ack, NAK or terminate; ``handled`` is called when the
        handler has returned, before the ack."""
        keep_alive = asyncio.create_task(self._keep_alive(message))
        try:
            async with asyncio.timeout(self._config.handler_timeout):
                await handler(delivery)
        except PermanentJobError as error:
            return await self._dead_letter(message, delivery, error)
        except RetryLater as error:
            if delivery.is_final_attempt:
                return await self._dead_letter(message, delivery, error)
            await self._nak(message, error.delay)
            return _Outcome("retry_later")
        except Exception as error:
            _logger.warning(
                "handler failed for %s (delivery %d of %s)",
                delivery.subject,
                delivery.num_delivered,
                delivery.max_deliver,
                exc_info=error,
            )
            if delivery.is_final_attempt:
                return await self._dead_letter(message, delivery, error)
            delay = self._backoff(delivery.num_delivered)
            await self._nak(message, delay)
            return _Outcome("nak", error)
        finally:
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive
        if handled is not None:
            handled()
        await self._ack(message, delivery)
        return _Outcome("ack")

    async def _dead_letter(
        self, message: Any, delivery: Delivery, error: BaseException
    ) -> _Outcome:
        if self._on_dead_letter is not None:
            try:
                await self._on_dead_letter(delivery, error)
            except Exception as hook_error:
                _logger.error(
                    "dead-letter hook failed for %s; message will be redelivered",
                    delivery.subject,
                    exc_info=hook_error,
                )
                await self._nak(message, self._backoff(delivery.num_delivered))
                return _Outcome("nak", hook_error)
        _logger.error(
            "terminating message %s on %s after %d deliveries: %s",
            delivery.msg_id,
            delivery.subject,
            delivery.num_delivered,
            error,
        )
        try:
            await message.term()
        except Exception as term_error:
            _logger.warning("term failed: %s", term_error)
        return _Outcome("term", error)

    async def _nak(self, message: Any, delay: float) -> None:
        try:
            await message.nak(delay=delay)
        except Exception as error:
            # Without the nak the server redelivers after ack_wait: slower, still safe.
            _logger.warning("nak failed: %s", error)

    async def _ack(self, message: Any, delivery: Delivery) -> None:
        try:
            await message.ack_sync(timeout=self._config.request_timeout)
        except Exception as error:
            # The effect is committed; a redelivery finds its key done and acks again.
            _logger.warning(
                "ack of %s (sequence %d) not confirmed: %s",
                delivery.msg_id,
                delivery.stream_sequence,
                error,
            )
