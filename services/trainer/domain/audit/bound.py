"""The one-run audit's statistics: guesses from scores, and the epsilon lower bound.

Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run",
arXiv:2305.08846). Each of m canaries is included in the training run independently with
probability 1/2 (``S_i`` uniform in {-1, +1}). After the run the auditor scores every
canary, guesses "included" for the k highest scores and "excluded" for the k lowest, and
abstains on the rest (r = 2k guesses). If the run is (epsilon, delta)-DP with respect to
each canary, the number of correct guesses W satisfies (their Theorem 5.2)

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta alpha,   p = e^eps / (1 + e^eps),
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, p) < v] / i,

which is exactly what their published code (Appendix D, ``p_value_DP_audit``) computes.
The audit reports the largest epsilon that this observation refutes at confidence
1 - beta: every epsilon whose p-value for the observed v is below beta. The p-value is
non-decreasing in epsilon, so a bisection finds the boundary; the value returned is the
lower end of the final bracket, whose p-value was evaluated below beta.

A lower bound, not a proof: a bound below the claimed epsilon says only that this run
did not contradict the claim. With all r guesses correct the bound is at most about
``log(r / log(1 / beta))`` (for delta = 0), so m canaries can never certify a large
epsilon; the bound is useful to catch gross bugs (wrong noise scale, missing clipping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tensafe.common.errors import InvalidArgument

MIN_CANARIES = 10
"""Fewest canaries an audit accepts; below this no bound is informative."""

DEFAULT_CONFIDENCE = 0.95
"""Confidence of the reported bound when the request leaves it unset."""

# Bisection precision on epsilon (absolute); far below what any audit can resolve.
_EPSILON_TOLERANCE = 1e-9
# The search never looks beyond this epsilon: exp(-700) is the smallest normal double.
_EPSILON_CEILING = 700.0


def validate_audit_shape(*, canaries: int, guesses_per_side: int, confidence: float) -> None:
    """Check the audit's m, k and confidence.

    Args:
        canaries: m, at least :data:`MIN_CANARIES`.
        guesses_per_side: k, with 1 <= k and 2k <= m.
        confidence: 1 - beta, strictly between 0 and 1.

    Raises:
        InvalidArgument: Naming ``canaries``, ``guesses_per_side`` or ``confidence``.
    """
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < MIN_CANARIES:
        raise InvalidArgument("canaries", f"must be an integer >= {MIN_CANARIES}, got {canaries}")
    if (
        isinstance(guesses_per_side, bool)
        or not isinstance(guesses_per_side, int)
        or not 1 <= guesses_per_side <= canaries // 2
    ):
        raise InvalidArgument(
            "guesses_per_side",
            f"must be an integer in 1..m/2 = {canaries // 2}, got {guesses_per_side}",
        )
    if not isinstance(confidence, int | float) or not 0.0 < confidence < 1.0:
        raise InvalidArgument("confidence", f"must be in (0, 1), got {confidence}")


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` right guesses out of ``guesses`` under
    (epsilon, delta)-DP (Steinke, Nasr, Jagielski 2023, Theorem 5.2 / Appendix D).

    Args:
        canaries: m, each included with probability 1/2.
        guesses: r, the guesses made (abstentions excluded).
        correct: v, the correct guesses.
        epsilon: The null hypothesis' epsilon, >= 0.
        delta: The null hypothesis' delta, in [0, 1].

    Returns:
        The p-value, at most 1.

    Raises:
        ValueError: Inconsistent counts or parameters (a programming error).
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= v={correct} <= r={guesses} <= m={canaries}")
    if not epsilon >= 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"bad epsilon {epsilon} or delta {delta}")
    # Accuracy of epsilon-DP randomised response: e^eps / (1 + e^eps).
    success = 1.0 / (1.0 + math.exp(-epsilon))
    pmf = _binomial_pmf(guesses, success)
    tail = math.fsum(pmf[correct:])  # P[B >= v]
    alpha = 0.0
    if correct > 0 and delta > 0:
        # P[v - i <= B < v] for i = 1..v, divided by i.
        below = np.cumsum(pmf[correct - 1 :: -1])
        alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * canaries * delta * alpha)


def _binomial_pmf(trials: int, success: float) -> npt.NDArray[np.float64]:
    """``P[Binomial(trials, success) = j]`` for j = 0..trials, from log-gamma."""
    if success >= 1.0:
        pmf = np.zeros(trials + 1)
        pmf[trials] = 1.0
        return pmf
    log_success, log_failure = math.log(success), math.log1p(-success)
    log_pmf = [
        math.lgamma(trials + 1)
        - math.lgamma(j + 1)
        - math.lgamma(trials - j + 1)
        + j * log_success
        + (trials - j) * log_failure
        for j in range(trials + 1)
    ]
    return np.exp(np.asarray(log_pmf, dtype=np.float64))


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float
) -> float:
    """The largest epsilon refuted at ``confidence`` by ``correct`` of ``guesses`` guesses.

    Args:
        canaries: m.
        guesses: r.
        correct: v.
        delta: The claimed delta.
        confidence: 1 - beta in (0, 1).

    Returns:
        An epsilon whose p-value is below beta (0.0 when even epsilon = 0 is not refuted);
        within 1e-9 of the exact boundary.
    """
    beta = 1.0 - confidence

    def refuted(epsilon: float) -> bool:
        value = p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta
        )
        return value < beta

    if not refuted(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while refuted(high):
        low, high = high, high * 2.0
        if high >= _EPSILON_CEILING:
            return low
    while high - low > _EPSILON_TOLERANCE:
        middle = (low + high) / 2.0
        if refuted(middle):
            low = middle
        else:
            high = middle
    return low


def count_correct_guesses(
    scores: Sequence[float] | npt.NDArray[np.float64],
    included: Sequence[bool] | npt.NDArray[np.bool_],
    *,
    guesses_per_side: int,
) -> int:
    """Guess "included" for the k highest scores and "excluded" for the k lowest.

    Ties are broken by canary index (a stable sort), which depends only on the scores'
    order, never on membership.

    Args:
        scores: One score per canary; higher means "more likely included".
        included: The true membership of every canary.
        guesses_per_side: k.

    Returns:
        The number of correct guesses among the 2k.
    """
    score_array = np.asarray(scores, dtype=np.float64)
    membership = np.asarray(included, dtype=bool)
    if score_array.shape != membership.shape or score_array.ndim != 1:
        raise ValueError("scores and included must be vectors of the same length")
    if not 2 * guesses_per_side <= score_array.size:
        raise ValueError("2k guesses need at least 2k canaries")
    if not np.isfinite(score_array).all():
        raise ValueError("scores must be finite")
    order = np.argsort(score_array, kind="stable")
    lowest = order[:guesses_per_side]
    highest = order[score_array.size - guesses_per_side :]
    return int(membership[highest].sum()) + int((~membership[lowest]).sum())
