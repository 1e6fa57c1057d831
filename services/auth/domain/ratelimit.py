"""The ExchangeApiKey rate limit: a generic cell rate algorithm (GCRA) per key.

GCRA (ITU-T I.371; the "virtual scheduling" form) is a token bucket kept as ONE number
per key, its *theoretical arrival time* (TAT): with an emission interval
``T = 60 s / per_minute`` and a tolerance ``tau = T * (burst - 1)``, a call at ``now`` is
admitted when ``max(TAT, now) - now <= tau`` and then moves the TAT to
``max(TAT, now) + T``. So ``burst`` calls pass at once and ``per_minute`` per minute
after that. One integer per key fits one row that several auth replicas update under a
row lock (:meth:`tensafe.auth.store.sql.AuthTransaction.lock_rate_limit`), and a key
whose TAT has passed needs no row at all.

Clocks: each replica uses its own wall clock. A TAT further ahead than any consistent
clock could have left it (``now + tau + T``: a replica's clock runs ahead of this one,
or this clock stepped back) is clamped to that bound, so skew never grants extra calls
and costs at most one interval of refusal.

Bounds: times are whole microseconds, so ``T`` is rounded UP (the limit may admit
slightly fewer calls than ``per_minute``, never more) and ``per_minute`` is at most
60,000,000 (one call per microsecond); a faster rate would be silently capped. The TAT is
stored as a signed 64-bit integer, so ``T * burst`` is at most 2**62 microseconds, which
keeps ``now + tau + T`` in range for the next hundred thousand years.
"""

from __future__ import annotations

import dataclasses

_MICROS_PER_MINUTE = 60_000_000

MAX_PER_MINUTE = _MICROS_PER_MINUTE
"""The fastest rate the microsecond TAT can express: one call per microsecond."""

MAX_WINDOW_US = 2**62
"""Upper bound of ``burst * interval_us``: keeps every stored TAT within a signed 64-bit
column (today's epoch microseconds are about 2**51)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A rate limit: ``burst`` calls at once, then ``per_minute`` calls per minute.

    Args:
        per_minute: Sustained calls per minute (>= 1).
        burst: Calls admitted back to back from a rested key (>= 1).
    """

    per_minute: int
    burst: int

    def __post_init__(self) -> None:
        problem = rate_limit_problem(self.per_minute, self.burst)
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]}")

    @property
    def interval_us(self) -> int:
        """The emission interval T, microseconds, rounded up so the rate is never
        exceeded."""
        return -(-_MICROS_PER_MINUTE // self.per_minute)


def rate_limit_problem(per_minute: int, burst: int) -> tuple[str, str] | None:
    """Why ``per_minute``/``burst`` cannot work, or ``None`` when they can.

    Returns:
        ``(field, reason)`` with ``field`` one of ``"per_minute"``, ``"burst"``.
    """
    if not 1 <= per_minute <= MAX_PER_MINUTE:
        return "per_minute", f"must be in 1..{MAX_PER_MINUTE} (one call per microsecond)"
    if burst < 1:
        return "burst", "must be at least 1"
    interval = -(-_MICROS_PER_MINUTE // per_minute)
    if burst * interval > MAX_WINDOW_US:
        return "burst", (
            f"must be at most {MAX_WINDOW_US // interval} at this rate "
            "(burst x 60 s / rate must fit the 64-bit microsecond TAT)"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of one call: admitted (with the key's new TAT) or refused."""

    admitted: bool
    tat_us: int
    """The TAT to store (unchanged when refused)."""
    retry_after_us: int
    """When refused, how long until a call would be admitted; 0 when admitted."""


def admit(limit: RateLimit, *, tat_us: int, now_us: int) -> Decision:
    """Decide one call under ``limit`` for a key whose TAT is ``tat_us``.

    Args:
        limit: The rate limit.
        tat_us: The key's stored theoretical arrival time (``now_us`` if it has none).
        now_us: The current time, microseconds.

    Returns:
        The decision.
    """
    interval = limit.interval_us
    tolerance = interval * (limit.burst - 1)
    tat = min(max(tat_us, now_us), now_us + tolerance + interval)
    ahead = tat - now_us
    if ahead > tolerance:
        return Decision(False, tat_us, ahead - tolerance)
    return Decision(True, tat + interval, 0)
