"""How every SDK client retries: UNAVAILABLE only, idempotent calls only, with capped
exponential backoff and full jitter.

UNAVAILABLE is the status a TenSafe service returns while it or one of its dependencies
(database, NATS) is down, and what gRPC reports while a restarted server is not back
yet (DESIGN §3); every other status is an answer and is raised at once as its typed
error. A call is sent again only when sending it twice is harmless: reads, pure
computations, and mutations carrying a ``request_id`` the server de-duplicates (the
caller makes one id per logical call and reuses it on every attempt).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from tensafe.common import errors
from tensafe.common.grpc_errors import from_rpc_error

Result = TypeVar("Result")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How UNAVAILABLE is retried (capped exponential backoff with full jitter).

    Full jitter (a uniform draw in ``[0, backoff]``) keeps many clients that lost the
    same server from retrying in lock step (Brooker, "Exponential Backoff And Jitter",
    AWS Architecture Blog, 2015).
    """

    max_attempts: int = 6
    """Attempts in total, the first included; 1 disables retries."""

    initial_backoff_seconds: float = 0.2
    """Upper bound of the first pause."""

    max_backoff_seconds: float = 5.0
    """Cap of the pause's upper bound."""

    multiplier: float = 2.0
    """Growth of the upper bound per attempt."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise errors.InvalidArgument("max_attempts", "must be at least 1")
        if not 0 < self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise errors.InvalidArgument(
                "initial_backoff_seconds", "need 0 < initial_backoff_seconds <= max_backoff"
            )
        if self.multiplier < 1:
            raise errors.InvalidArgument("multiplier", "must be >= 1")

    def pause(self, attempt: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        bound = min(
            self.max_backoff_seconds,
            self.initial_backoff_seconds * self.multiplier ** (attempt - 1),
        )
        return bound * draw()


def call_with_retry(
    attempt: Callable[[], Result],
    *,
    policy: RetryPolicy,
    idempotent: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Run one call (``attempt`` makes it afresh each time, streams included).

    Args:
        attempt: Makes the call and returns its result; raises ``grpc.RpcError``.
        policy: Backoff and number of attempts.
        idempotent: Whether sending the call twice is harmless; if not, it is sent once.
        sleep: Pauses between attempts (tests may pass a recorder).

    Returns:
        The result of the first attempt that succeeds.

    Raises:
        TenSafeError: The server's typed error, or ``Unavailable`` once the attempts
            are used up.
    """
    attempts = policy.max_attempts if idempotent else 1
    number = 0
    while True:
        number += 1
        try:
            return attempt()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or number >= attempts:
                raise from_rpc_error(exc) from None
        sleep(policy.pause(number))
