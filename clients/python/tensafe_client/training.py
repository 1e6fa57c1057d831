"""The gRPC layer under the Tinker-compatible SDK: one object per trainer endpoint.

:class:`TrainerRpc` owns the stubs of ``tensafe.trainer.v1.TrainerService`` and
``tensafe.common.v1.FutureService`` on one channel and gives every call the same
treatment:

* **typed errors** — a failed call raises the :class:`~tensafe.common.errors.TenSafeError`
  subclass the server raised (``BudgetExhausted``, ``NotFound``, ``InvalidArgument`` with
  its field, ...), decoded by :func:`tensafe.common.grpc_errors.from_rpc_error`; the
  error of a FAILED future is decoded the same way (:func:`future_error`);
* **retries** — UNAVAILABLE (a dependency or the server is down, DESIGN §3) is retried
  with capped exponential backoff and full jitter (:mod:`tensafe.client.retry`). Only
  calls that are idempotent are sent twice: reads, and mutations carrying a
  ``request_id`` the server de-duplicates (the caller makes one request id per logical
  call and reuses it on every attempt);
* **explicit message size limits** on both directions, so a large batch fails with a
  clear RESOURCE_EXHAUSTED rather than a transport default.

:func:`open_trainer` builds the channel from an address (``host:port``,
``grpc://host:port`` or ``grpcs://host:port`` for TLS; a CA bundle, ``ca_file=`` or
``$TENSAFE_CA_FILE``, also means TLS) or the connection file written by ``tensafe up``,
and authenticates it with :mod:`tensafe.client.auth` (API key exchanged
for short-lived tokens, renewed before they expire).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from tensafe.client.auth import TokenProvider, authenticated_channel, find_api_key
from tensafe.client.channels import ClientTls, OwnedChannels, open_channel, resolve_tls
from tensafe.client.connection import load_connection
from tensafe.client.retry import RetryPolicy, call_with_retry
from tensafe.client.tracing import traced_channel
from tensafe.common import errors
from tensafe.common.grpc_errors import STATUS_DETAILS_KEY, from_rpc_error
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc

Response = TypeVar("Response")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest message sent or received: the servers' default limit
(``TENSAFE_MAX_MESSAGE_BYTES``), so an oversized batch fails on the client with
RESOURCE_EXHAUSTED before it is sent. About 1M tokens with their targets and weights;
split larger batches into several ``forward_backward`` calls (they accumulate into one
DP step)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelOptions:
    """Settings of the trainer channel and of every call made on it."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Send and receive limit, in bytes."""

    call_timeout_seconds: float = 60.0
    """Deadline of one unary call (submitting a job returns at once; 60 s covers a
    cold server and a slow database)."""

    wait_slice_seconds: float = 20.0
    """How long one WaitFuture call waits on the server before the client asks again;
    kept below common proxy idle timeouts."""

    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    """Retries of UNAVAILABLE."""

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise errors.InvalidArgument("max_message_bytes", "must be at least 1024")
        if self.call_timeout_seconds <= 0:
            raise errors.InvalidArgument("call_timeout_seconds", "must be positive")
        if self.wait_slice_seconds <= 0:
            raise errors.InvalidArgument("wait_slice_seconds", "must be positive")


def new_request_id() -> str:
    """A fresh idempotency key for one logical call (reused on its retries)."""
    return uuid.uuid4().hex


class _FutureErrorCall:
    """Presents a future's ``ErrorStatus`` as a failed call, for ``from_rpc_error``.

    ``ErrorStatus`` is wire-compatible with ``google.rpc.Status`` (see common.proto), so
    its bytes are exactly the ``grpc-status-details-bin`` trailer a failed call carries;
    decoding it through the one shared decoder keeps a single mapping from statuses to
    typed errors.
    """

    def __init__(self, status: common_pb2.ErrorStatus) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        for code in grpc.StatusCode:
            if code.value[0] == self._status.code:
                return code
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return self._status.message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((STATUS_DETAILS_KEY, self._status.SerializeToString()),)


def future_error(status: common_pb2.ErrorStatus) -> errors.TenSafeError:
    """The typed error of a FAILED future.

    Args:
        status: The future's ``error``.

    Returns:
        The same error class a failed call with this status would raise.
    """
    return from_rpc_error(_FutureErrorCall(status))  # type: ignore[arg-type]


class TrainerRpc(OwnedChannels):
    """The trainer's RPCs on one channel, with typed errors and retries.

    Args:
        channel: A ready channel (credentials and interceptors are the caller's; see
            :func:`open_trainer`). Closed by :meth:`close`.
        options: Call settings.
        sleep: Pauses between retries (``time.sleep``; tests may pass a recorder).
        also_close: Channels the first one depends on (the auth service's), closed
            with it.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        options: ChannelOptions | None = None,
        sleep: Callable[[float], None] = time.sleep,
        also_close: Sequence[grpc.Channel] = (),
    ) -> None:
        super().__init__(channel, also_close)
        self.options = options or ChannelOptions()
        self._sleep = sleep
        self._trainer = trainer_service_pb2_grpc.TrainerServiceStub(channel)
        self._futures = common_pb2_grpc.FutureServiceStub(channel)

    @property
    def channel(self) -> grpc.Channel:
        """The channel (for streaming calls, e.g. :mod:`tensafe.client.datasets`)."""
        return self._channel

    @property
    def trainer_stub(self) -> trainer_service_pb2_grpc.TrainerServiceStub:
        """The TrainerService stub on the channel."""
        return self._trainer

    def call(
        self,
        method: Callable[..., Response],
        request: Any,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Response:
        """Make one unary call: retry UNAVAILABLE if idempotent, raise typed errors.

        Args:
            method: A stub method, e.g. ``stub.ForwardBackward``.
            request: Its request message.
            idempotent: Whether sending the request twice is harmless.
            timeout: Deadline of each attempt; default ``options.call_timeout_seconds``.

        Returns:
            The response.

        Raises:
            TenSafeError: The server's typed error, or ``Unavailable`` once the retries
                are used up.
        """
        deadline = timeout if timeout is not None else self.options.call_timeout_seconds
        return call_with_retry(
            lambda: method(request, timeout=deadline),
            policy=self.options.retry,
            idempotent=idempotent,
            sleep=self._sleep,
        )

    # -- TrainerService ------------------------------------------------------------

    def list_base_models(self) -> Sequence[pb.BaseModel]:
        """The base models the deployment can fine-tune."""
        response = self.call(self._trainer.ListBaseModels, pb.ListBaseModelsRequest())
        return list(response.base_models)

    def base_model_tokenizer(self, base_model: str) -> pb.GetBaseModelTokenizerResponse:
        """A base model's tokenizer files, as the trainer serves them."""
        request = pb.GetBaseModelTokenizerRequest(base_model=base_model)
        response: pb.GetBaseModelTokenizerResponse = self.call(
            self._trainer.GetBaseModelTokenizer, request
        )
        return response

    def create_training_client(self, request: pb.CreateTrainingClientRequest) -> pb.TrainingClient:
        """Create a training client (``request.request_id`` must be set)."""
        _require_request_id(request.request_id)
        return self.call(self._trainer.CreateTrainingClient, request).training_client

    def get_training_client(self, training_client_id: str) -> pb.TrainingClient:
        """Read a training client."""
        request = pb.GetTrainingClientRequest(training_client_id=training_client_id)
        return self.call(self._trainer.GetTrainingClient, request).training_client

    def delete_training_client(self, training_client_id: str) -> None:
        """Delete a training client (its ledger is kept by the server)."""
        request = pb.DeleteTrainingClientRequest(training_client_id=training_client_id)
        self.call(self._trainer.DeleteTrainingClient, request)

    def get_privacy_spent(self, training_client_id: str) -> pb.PrivacySpent:
        """The privacy a training client has spent so far."""
        request = pb.GetPrivacySpentRequest(training_client_id=training_client_id)
        return self.call(self._trainer.GetPrivacySpent, request).privacy_spent

    def submit(self, rpc: str, request: Any) -> common_pb2.Future:
        """Submit a long call and return its future at once.

        Args:
            rpc: The TrainerService method, e.g. ``"ForwardBackward"``.
            request: Its request; ``request_id`` must be set (retries reuse it).

        Returns:
            The future the server created (or the one it had for this request id).
        """
        if rpc not in _SUBMIT_RPCS:
            raise errors.InvalidArgument("rpc", f"{rpc!r} is not a long-running trainer call")
        _require_request_id(request.request_id)
        response = self.call(getattr(self._trainer, rpc), request)
        future: common_pb2.Future = response.future
        return future

    # -- FutureService -------------------------------------------------------------

    def get_future(self, future_id: str) -> common_pb2.Future:
        """The current state of a future."""
        request = common_pb2.GetFutureRequest(future_id=future_id)
        return self.call(self._futures.GetFuture, request).future

    def wait_future(self, future_id: str, timeout: float) -> common_pb2.Future:
        """Wait on the server up to ``timeout`` seconds (bounded by the wait slice)."""
        wait = max(0.0, min(timeout, self.options.wait_slice_seconds))
        timeout_proto = duration_pb2.Duration()
        timeout_proto.FromNanoseconds(int(wait * 1e9))
        request = common_pb2.WaitFutureRequest(future_id=future_id, timeout=timeout_proto)
        # The call's own deadline leaves room for the server's reply after the wait.
        response = self.call(
            self._futures.WaitFuture, request, timeout=wait + self.options.call_timeout_seconds
        )
        return response.future

    def cancel_future(self, future_id: str) -> common_pb2.Future:
        """Cancel a future that has not started; a no-op on a finished one."""
        request = common_pb2.CancelFutureRequest(future_id=future_id)
        return self.call(self._futures.CancelFuture, request).future


_SUBMIT_RPCS = frozenset(
    {
        "ForwardBackward",
        "Forward",
        "OptimStep",
        "Sample",
        "ComputeLogprobs",
        "SaveState",
        "LoadState",
        "SaveWeightsForSampler",
        "SaveAdapter",
        "TrainOnDataset",
    }
)


def _require_request_id(request_id: str) -> None:
    if not request_id:
        raise errors.InvalidArgument(
            "request_id", "a mutating call needs an idempotency key to be retried safely"
        )


def parse_address(base_url: str) -> tuple[str, bool]:
    """Split a trainer URL into ``host:port`` and whether to use TLS.

    Args:
        base_url: ``host:port`` or ``grpc://host:port`` (plaintext, loopback and tests)
            or ``grpcs://host:port`` (TLS with the system's root certificates).

    Returns:
        The address and the TLS flag.

    Raises:
        InvalidArgument: Another scheme, or no port.
    """
    address, tls = base_url, False
    if "://" in base_url:
        scheme, address = base_url.split("://", 1)
        if scheme not in ("grpc", "grpcs"):
            raise errors.InvalidArgument(
                "base_url", f"scheme {scheme!r}: use grpc://host:port or grpcs://host:port"
            )
        tls = scheme == "grpcs"
    address = address.rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise errors.InvalidArgument("base_url", f"{base_url!r} has no host:port")
    return address, tls


def make_channel(
    base_url: str, *, options: ChannelOptions, tls: ClientTls | None = None
) -> grpc.Channel:
    """An unauthenticated channel with the message size limits of ``options``; every
    call carries the caller's trace context (:mod:`tensafe.client.tracing`).

    Args:
        base_url: See :func:`parse_address`.
        options: Message size limits.
        tls: CA bundle and client certificate (:func:`tensafe.client.channels.resolve_tls`);
            given, the channel is TLS whatever the URL's scheme.

    Raises:
        InvalidArgument: A ``grpc://`` (plaintext) URL together with TLS settings.
    """
    address, system_roots = parse_address(base_url)
    if tls is not None and base_url.startswith("grpc://"):
        raise errors.InvalidArgument(
            "base_url", f"{base_url!r} is plaintext but a CA bundle or client certificate is set"
        )
    channel_options = [
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.max_receive_message_length", options.max_message_bytes),
    ]
    channel = open_channel(address, tls=tls, system_roots=system_roots, options=channel_options)
    return traced_channel(channel)


def open_trainer(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    auth_url: str | None = None,
    connection_file: str | os.PathLike[str] | None = None,
    options: ChannelOptions | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    client_cert_file: str | os.PathLike[str] | None = None,
    client_key_file: str | os.PathLike[str] | None = None,
) -> TrainerRpc:
    """Connect to the trainer with an authenticated channel.

    Endpoints: ``base_url`` (else the connection file's ``trainer``) and ``auth_url``
    (else the connection file's ``auth``). The API key: ``api_key``, else
    ``$TENSAFE_API_KEY``, else the connection file's ``api_key``. TLS: as
    :func:`tensafe.client.channels.resolve_tls` (the connection file's ``tls`` block
    counts when the file supplies an endpoint).

    Args:
        base_url: Trainer address, see :func:`parse_address`.
        api_key: API key to exchange for access tokens.
        auth_url: Auth service address.
        connection_file: Connection file (default as
            :func:`tensafe.client.connection.connection_path`).
        options: Channel settings.
        ca_file: PEM CA bundle that verifies the services (else ``$TENSAFE_CA_FILE``).
        client_cert_file: PEM client certificate for mutual TLS.
        client_key_file: Its private key.

    Returns:
        The connected RPC layer.

    Raises:
        FailedPrecondition: An endpoint is neither given nor in a connection file.
        Unauthenticated: No API key was found.
    """
    options = options or ChannelOptions()
    channel, auth_channel = authenticated_channels(
        "trainer",
        base_url=base_url,
        auth_url=auth_url,
        api_key=api_key,
        connection_file=connection_file,
        options=options,
        ca_file=ca_file,
        client_cert_file=client_cert_file,
        client_key_file=client_key_file,
    )
    return TrainerRpc(channel, options=options, also_close=(auth_channel,))


def authenticated_channels(
    service: str,
    *,
    base_url: str | None,
    auth_url: str | None,
    api_key: str | None,
    connection_file: str | os.PathLike[str] | None,
    options: ChannelOptions,
    ca_file: str | os.PathLike[str] | None,
    client_cert_file: str | os.PathLike[str] | None,
    client_key_file: str | os.PathLike[str] | None,
) -> tuple[grpc.Channel, grpc.Channel]:
    """A service's channel, authenticated with tokens for the API key, and the channel
    to auth those tokens come from (the caller closes both).

    Endpoints: ``base_url`` (else the connection file's ``service``) and ``auth_url``
    (else its ``auth``); the API key as in :func:`tensafe.client.auth.find_api_key`; TLS
    as in :func:`tensafe.client.channels.resolve_tls`.

    Raises:
        FailedPrecondition: An endpoint is neither given nor in a connection file.
        Unauthenticated: No API key was found.
    """
    connection_tls = None
    if base_url is None or auth_url is None:
        try:
            connection = load_connection(connection_file)
            base_url = base_url or connection.address(service)
            auth_url = auth_url or connection.address("auth")
        except (FileNotFoundError, KeyError) as exc:
            raise errors.FailedPrecondition(
                f"pass base_url= and auth_url= or run `tensafe up`: {exc}", reason="NO_ENDPOINT"
            ) from None
        connection_tls = connection.tls
    tls = resolve_tls(
        ca_file=ca_file,
        client_cert_file=client_cert_file,
        client_key_file=client_key_file,
        connection_tls=connection_tls,
    )
    key = find_api_key(api_key, connection_file=connection_file)
    auth_channel = make_channel(auth_url, options=options, tls=tls)
    provider = TokenProvider(auth_channel, key)
    channel = authenticated_channel(make_channel(base_url, options=options, tls=tls), provider)
    return channel, auth_channel
