"""SDK authentication: an API key in, a fresh bearer token on every call out.

The API key comes from (first found): the ``api_key`` argument, the ``TENSAFE_API_KEY``
environment variable, or the ``api_key`` field of the connection file (written by
``tensafe up`` in dev mode, mode 0600). :class:`TokenProvider` exchanges it for a
short-lived access token with ``ExchangeApiKey`` and exchanges again shortly before
the token expires, so callers never see an expiry. :func:`authenticated_channel` wraps
a channel with :class:`BearerInterceptor`, which adds ``authorization: Bearer ...`` to
every call.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import jwt

from tensafe.client.connection import connection_path
from tensafe.common.errors import InvalidArgument, Unauthenticated
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

API_KEY_ENV = "TENSAFE_API_KEY"


def find_api_key(
    api_key: str | None = None, *, connection_file: str | os.PathLike[str] | None = None
) -> str:
    """The API key to use.

    The first source that is *given* decides: an empty or blank key is an error naming
    that source, never a fall-through to the next one. Otherwise an ``api_key=""`` or a
    ``TENSAFE_API_KEY=`` left empty by a script would silently run as whoever the
    connection file names, which under ``tensafe up`` is the platform admin.

    Args:
        api_key: An explicit key; wins over everything else. ``None`` means "not given".
        connection_file: Connection file to read ``api_key`` from (default: as
            :func:`tensafe.client.connection.connection_path`).

    Returns:
        The key, without surrounding whitespace.

    Raises:
        InvalidArgument: The source that was given holds an empty or blank key (the
            field names it: ``api_key``, ``TENSAFE_API_KEY`` or ``<file>:api_key``).
        Unauthenticated: No key was found; the message says where one is looked for.
    """
    if api_key is not None:
        return _non_blank(
            api_key,
            "api_key",
            f"empty API key; pass a key, or leave api_key out (None) to use {API_KEY_ENV} "
            "or the connection file's",
        )
    if API_KEY_ENV in os.environ:
        return _non_blank(
            os.environ[API_KEY_ENV],
            API_KEY_ENV,
            "set but empty; set it to an API key, or unset it to use the connection file's",
        )
    path = connection_path(connection_file)
    if path.exists():
        document = json.loads(path.read_text())
        if isinstance(document, dict) and "api_key" in document:
            value = document["api_key"]
            return _non_blank(
                value if isinstance(value, str) else "", f"{path}:api_key", "empty API key"
            )
    raise Unauthenticated(
        f"no API key: pass api_key=, set {API_KEY_ENV}, or add api_key to {path}",
        reason="API_KEY_MISSING",
    )


def _non_blank(value: str, source: str, message: str) -> str:
    key = value.strip()
    if not key:
        raise InvalidArgument(source, message, reason="API_KEY_EMPTY")
    return key


class _Token(NamedTuple):
    value: str
    expire_time: float
    issue_time: float


class TokenProvider:
    """Exchanges an API key for access tokens and renews them before they expire.

    Thread-safe: concurrent callers share one exchange.

    Args:
        auth_channel: A channel to the auth service (no interceptor).
        api_key: The API key.
        scopes: Narrow tokens to these scopes (empty: all of the principal's).
        refresh_fraction: Renew once this fraction of a token's life has passed.
        clock: A local clock in seconds (monotonic by default).
    """

    def __init__(
        self,
        auth_channel: grpc.Channel,
        api_key: str,
        *,
        scopes: tuple[str, ...] = (),
        refresh_fraction: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be in (0, 1)")
        self._stub = auth_service_pb2_grpc.AuthServiceStub(auth_channel)
        self._api_key = api_key
        self._scopes = scopes
        self._refresh_fraction = refresh_fraction
        self._clock = clock
        self._token: _Token | None = None
        self._lock = threading.Lock()
        self.exchanges = 0
        """How many times the key was exchanged (for diagnostics)."""

    def _fresh(self, token: _Token | None) -> bool:
        if token is None:
            return False
        renew_at = token.issue_time + self._refresh_fraction * (
            token.expire_time - token.issue_time
        )
        return self._clock() < renew_at

    def token(self) -> str:
        """A valid access token, exchanging the API key when needed.

        Raises:
            TenSafeError: The exchange failed (``Unauthenticated`` for a bad or revoked
                key, ``Unavailable`` when auth is down).
        """
        token = self._token
        if self._fresh(token):
            assert token is not None
            return token.value
        with self._lock:
            if not self._fresh(self._token):
                issue_time = self._clock()
                try:
                    response = self._stub.ExchangeApiKey(
                        pb.ExchangeApiKeyRequest(api_key=self._api_key, scopes=self._scopes)
                    )
                except grpc.RpcError as error:
                    raise from_rpc_error(error) from None
                self.exchanges += 1
                # Lifetime from the server's own clock (exp - iat), applied to the local
                # clock, so a skewed client clock does not shift the renewal.
                claims = jwt.decode(response.access_token, options={"verify_signature": False})
                lifetime = float(response.expire_time.ToSeconds()) - float(claims["iat"])
                self._token = _Token(response.access_token, issue_time + lifetime, issue_time)
            assert self._token is not None
            return self._token.value


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


if TYPE_CHECKING:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
else:  # grpc's runtime classes are not subscriptable
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor


class BearerInterceptor(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Adds ``authorization: Bearer <token>`` to every call.

    Args:
        provider: Supplies tokens.
    """

    def __init__(self, provider: TokenProvider) -> None:
        self._provider = provider

    def _details(self, details: Any) -> _CallDetails:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k.lower() != "authorization"]
        metadata.append(("authorization", f"Bearer {self._provider.token()}"))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming call."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        """Client-streaming call."""
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        """Bidirectional call."""
        return continuation(self._details(details), request_iterator)


def authenticated_channel(channel: grpc.Channel, provider: TokenProvider) -> grpc.Channel:
    """``channel`` with a bearer token on every call."""
    return grpc.intercept_channel(channel, BearerInterceptor(provider))


def read_credentials_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by ``tensafe admin bootstrap --credentials-file``."""
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a JSON object")
    return document
