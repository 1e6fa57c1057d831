"""The one-run bound (Steinke, Nasr, Jagielski 2023) checked against first principles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.audit.bound import (
    count_correct_guesses,
    epsilon_lower_bound,
    p_value,
    validate_audit_shape,
)


def _binomial_tail(trials: int, success: float, at_least: int) -> float:
    return math.fsum(
        math.comb(trials, j) * success**j * (1 - success) ** (trials - j)
        for j in range(at_least, trials + 1)
    )


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    for epsilon in (0.0, 0.5, 2.0):
        success = math.exp(epsilon) / (1 + math.exp(epsilon))
        value = p_value(canaries=100, guesses=40, correct=30, epsilon=epsilon, delta=0.0)
        assert value == pytest.approx(_binomial_tail(40, success, 30), rel=1e-9)


def test_p_value_delta_term_matches_the_papers_formula() -> None:
    guesses, correct, canaries, delta, epsilon = 20, 15, 50, 1e-3, 1.0
    success = 1 / (1 + math.exp(-epsilon))
    pmf = [math.comb(guesses, j) * success**j * (1 - success) ** (guesses - j) for j in range(21)]
    alpha = max(sum(pmf[correct - i : correct]) / i for i in range(1, correct + 1))
    expected = _binomial_tail(guesses, success, correct) + 2 * canaries * delta * alpha
    value = p_value(
        canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta
    )
    assert value == pytest.approx(expected, rel=1e-9)


def test_bound_is_the_boundary_of_refuted_epsilons() -> None:
    bound = epsilon_lower_bound(
        canaries=1000, guesses=200, correct=170, delta=1e-5, confidence=0.95
    )
    assert bound > 0
    below = p_value(canaries=1000, guesses=200, correct=170, epsilon=bound, delta=1e-5)
    above = p_value(canaries=1000, guesses=200, correct=170, epsilon=bound + 1e-6, delta=1e-5)
    assert below < 0.05 <= above


def test_all_correct_bound_is_limited_by_the_guesses() -> None:
    # delta = 0, v = r: refuted while p^r < beta, i.e. eps < -log(beta^(-1/r) - 1).
    bound = epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=0.0, confidence=0.95)
    assert bound == pytest.approx(-math.log(0.05 ** (-1 / 100) - 1), abs=1e-7)
    assert bound < math.log(100)


def test_chance_level_guessing_refutes_nothing() -> None:
    assert (
        epsilon_lower_bound(canaries=200, guesses=40, correct=20, delta=1e-5, confidence=0.95) == 0
    )


def test_guesses_take_the_k_highest_and_k_lowest() -> None:
    scores = np.array([5.0, -1.0, 3.0, 0.0, 9.0, -4.0])
    included = np.array([True, False, False, True, True, True])
    # Highest 2: indices 4 (in), 0 (in) -> 2 correct; lowest 2: 5 (in), 1 (out) -> 1.
    assert count_correct_guesses(scores, included, guesses_per_side=2) == 3


@pytest.mark.parametrize(
    ("canaries", "guesses_per_side", "confidence", "field"),
    [
        (9, 2, 0.95, "canaries"),
        (100, 51, 0.95, "guesses_per_side"),
        (100, 0, 0.95, "guesses_per_side"),
        (100, 10, 0.0, "confidence"),
        (100, 10, 1.0, "confidence"),
        (100, 10, 1.5, "confidence"),
    ],
)
def test_bad_shapes_are_invalid_arguments(
    canaries: int, guesses_per_side: int, confidence: float, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_audit_shape(
            canaries=canaries, guesses_per_side=guesses_per_side, confidence=confidence
        )
    assert raised.value.field == field
