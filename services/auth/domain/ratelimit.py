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
"""

from __future__ import annotations

import dataclasses

_MICROS_PER_MINUTE = 60_000_000


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
        if self.per_minute < 1 or self.burst < 1:
            raise ValueError("per_minute and burst must be at least 1")

    @property
    def interval_us(self) -> int:
        """The emission interval T, microseconds."""
        return max(_MICROS_PER_MINUTE // self.per_minute, 1)


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
