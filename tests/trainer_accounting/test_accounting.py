"""Privacy accounting against dp-accounting 0.6.0 computed independently in each test."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as LibraryPldAccountant
from dp_accounting.rdp import RdpAccountant as LibraryRdpAccountant

from tensafe.common.errors import BudgetExhausted, InvalidArgument
from tensafe.trainer.domain.engine.accounting import (
    BatchSampling,
    PldAccountant,
    PrivacyAccountant,
    RdpAccountant,
    StepMechanism,
    accountant_names,
    calibrate_noise_multiplier,
    create_accountant,
)

DELTA = 1e-5
LIBRARY = {"rdp": LibraryRdpAccountant, "pld": LibraryPldAccountant}


def library_epsilon(name: str, events: list[tuple[dp_accounting.DpEvent, int]]) -> float:
    accountant = LIBRARY[name]()
    for event, count in events:
        accountant.compose(event, count)
    return float(accountant.get_epsilon(DELTA))


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


# ---------------------------------------------------------------- values vs library


@pytest.mark.parametrize("name", ["rdp", "pld"])
@pytest.mark.parametrize(
    ("mechanism", "steps", "event"),
    [
        (
            StepMechanism.poisson(1.1, 0.01),
            300,
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)),
        ),
        (
            StepMechanism.poisson(0.8, 0.05),
            120,
            dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(0.8)),
        ),
        (StepMechanism.client_batches(6.0), 80, dp_accounting.GaussianDpEvent(6.0)),
    ],
)
def test_epsilon_equals_dp_accounting(
    name: str, mechanism: StepMechanism, steps: int, event: dp_accounting.DpEvent
) -> None:
    accountant = create_accountant(name)
    accountant.record(mechanism, steps=steps)
    reference = library_epsilon(name, [(event, steps)])
    assert reference > 0.1
    assert relative_error(accountant.epsilon(DELTA), reference) < 1e-6


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_mixed_history_equals_dp_accounting(name: str) -> None:
    history = [
        (StepMechanism.client_batches(5.0), 10),
        (StepMechanism.poisson(1.0, 0.02), 60),
        (StepMechanism.client_batches(7.0), 15),
        (StepMechanism.poisson(1.3, 0.04), 40),
    ]
    accountant = create_accountant(name)
    for mechanism, count in history:
        accountant.record(mechanism, steps=count)
    reference = library_epsilon(
        name, [(mechanism.dp_event(), count) for mechanism, count in history]
    )
    assert relative_error(accountant.epsilon(DELTA), reference) < 1e-6


def test_certificate_event_reproduces_epsilon_in_the_library() -> None:
    accountant = RdpAccountant()
    accountant.record(StepMechanism.client_batches(5.0), steps=10)
    accountant.record(StepMechanism.poisson(1.0, 0.02), steps=60)
    composed = library_epsilon("rdp", [(accountant.dp_event(), 1)])
    assert relative_error(accountant.epsilon(DELTA), composed) < 1e-12
    assert accountant.dp_event() == dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 10),
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)), 60
            ),
        ]
    )


def test_reference_point_rdp() -> None:
    accountant = RdpAccountant()
    accountant.record(StepMechanism.poisson(1.1, 0.01), steps=10_000)
    epsilon = accountant.epsilon(DELTA)
    assert epsilon == pytest.approx(5.6320, abs=5e-5)
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    assert relative_error(epsilon, library_epsilon("rdp", [(event, 10_000)])) < 1e-9


@pytest.mark.slow
def test_reference_point_pld() -> None:
    accountant = PldAccountant()
    accountant.record(StepMechanism.poisson(1.1, 0.01), steps=10_000)
    epsilon = accountant.epsilon(DELTA)
    assert epsilon == pytest.approx(5.1926, abs=5e-5)
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    assert relative_error(epsilon, library_epsilon("pld", [(event, 10_000)])) < 1e-6
    # One more step composes onto the held PLD and matches a from-scratch library run.
    incremental = accountant.epsilon_if(
        StepMechanism.poisson(1.1, 0.01), additional_steps=1, delta=DELTA
    )
    assert relative_error(incremental, library_epsilon("pld", [(event, 10_001)])) < 1e-6
    assert incremental > epsilon


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_client_batches_cost_more_than_poisson_batches(name: str) -> None:
    client = create_accountant(name)
    client.record(StepMechanism.client_batches(4.0), steps=50)
    poisson = create_accountant(name)
    poisson.record(StepMechanism.poisson(4.0, 0.05), steps=50)
    assert client.epsilon(DELTA) > 3 * poisson.epsilon(DELTA) > 0


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_no_steps_is_zero_and_more_steps_cost_more(name: str) -> None:
    accountant = create_accountant(name)
    assert accountant.epsilon(DELTA) == 0.0
    mechanism = StepMechanism.poisson(1.0, 0.02)
    values = [
        accountant.epsilon_if(mechanism, additional_steps=n, delta=DELTA) for n in (1, 10, 50)
    ]
    assert 0.0 < values[0] < values[1] < values[2]
    assert accountant.steps == 0
    assert accountant.epsilon_if(mechanism, additional_steps=0, delta=DELTA) == 0.0


# ------------------------------------------------------- incremental and state


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_incremental_equals_from_scratch(name: str) -> None:
    client = StepMechanism.client_batches(8.0)
    poisson = StepMechanism.poisson(1.2, 0.03)
    stepwise = create_accountant(name)
    for index in range(12):
        mechanism = client if index % 3 == 0 else poisson
        checked = stepwise.epsilon_if(mechanism, additional_steps=1, delta=DELTA)
        stepwise.record(mechanism)
        assert stepwise.epsilon(DELTA) == checked  # the check's value is what is recorded
    at_once = create_accountant(name)
    at_once.record(client, steps=4)
    at_once.record(poisson, steps=8)
    assert stepwise.steps == at_once.steps == 12
    assert dict(stepwise.history) == dict(at_once.history)
    assert relative_error(stepwise.epsilon(DELTA), at_once.epsilon(DELTA)) < 1e-9
    reference = library_epsilon(name, [(client.dp_event(), 4), (poisson.dp_event(), 8)])
    assert relative_error(stepwise.epsilon(DELTA), reference) < 1e-6


def test_pld_composes_onto_held_distribution() -> None:
    mechanism = StepMechanism.poisson(1.0, 0.02)
    accountant = PldAccountant()
    accountant.record(mechanism, steps=100)
    accountant.epsilon(DELTA)
    calls: list[int] = []
    held = accountant._single_step_pld(mechanism)

    class CountingPld:
        """Wraps the single-step PLD to count how often it is self-composed."""

        def self_compose(self, count: int) -> object:
            calls.append(count)
            return held.self_compose(count)

        def compose(self, other: object) -> object:
            return held.compose(other)

    accountant._single_step[mechanism] = CountingPld()
    accountant.epsilon_if(mechanism, additional_steps=5, delta=DELTA)
    accountant.record(mechanism, steps=5)
    accountant.epsilon(DELTA)
    accountant.epsilon(DELTA * 2)
    # Only the 5 new steps were composed, once; the 100 held ones were not redone.
    assert calls == [5]


@pytest.mark.parametrize(
    "accountant",
    [
        RdpAccountant(),
        RdpAccountant(orders=[1.5, 2.0, 4.0, 8.0, 16.0, 32.0]),
        PldAccountant(),
        PldAccountant(value_discretization_interval=1e-3),
    ],
    ids=["rdp", "rdp-orders", "pld", "pld-coarse"],
)
def test_state_round_trip(accountant: PrivacyAccountant) -> None:
    accountant.record(StepMechanism.poisson(1.1, 0.01), steps=70)
    accountant.record(StepMechanism.client_batches(9.0), steps=3)
    state = json.loads(json.dumps(accountant.to_state()))
    restored = PrivacyAccountant.from_state(state)
    assert type(restored) is type(accountant)
    assert restored.history == accountant.history
    assert restored.to_state() == accountant.to_state()
    assert relative_error(restored.epsilon(DELTA), accountant.epsilon(DELTA)) < 1e-9


def test_options_change_the_result() -> None:
    fine = PldAccountant()
    coarse = PldAccountant(value_discretization_interval=1e-2)
    few_orders = RdpAccountant(orders=[2.0, 64.0])
    default_orders = RdpAccountant()
    for accountant in (fine, coarse, few_orders, default_orders):
        accountant.record(StepMechanism.poisson(1.0, 0.02), steps=100)
    # Coarser grids and fewer orders are still upper bounds, only looser.
    assert coarse.epsilon(DELTA) > fine.epsilon(DELTA)
    assert few_orders.epsilon(DELTA) > default_orders.epsilon(DELTA)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.update(format="other"), "state.format"),
        (lambda s: s.update(accountant="moments"), "state.accountant"),
        (lambda s: s.update(neighboring_relation="replace_one"), "state.neighboring_relation"),
        (lambda s: s["history"][0].update(steps=-1), "state.history[0].steps"),
        (lambda s: s["history"][0].update(sampling="uniform"), "state.history[0].sampling"),
        (
            lambda s: s["history"][0].update(noise_multiplier=0.0),
            "state.history[0].noise_multiplier",
        ),
        (
            lambda s: s["history"][0].update(sampling_probability=2.0),
            "state.history[0].sampling_probability",
        ),
        (
            lambda s: s["options"].update(value_discretization_interval=-1.0),
            "state.options.value_discretization_interval",
        ),
    ],
)
def test_malformed_state_is_rejected(edit: object, field: str) -> None:
    accountant = PldAccountant()
    accountant.record(StepMechanism.poisson(1.1, 0.01), steps=3)
    state = accountant.to_state()
    edit(state)  # type: ignore[operator]
    with pytest.raises(InvalidArgument) as raised:
        PrivacyAccountant.from_state(state)
    assert raised.value.field == field


# --------------------------------------------------------------- budget checks


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_charge_admits_within_budget_and_refuses_beyond(name: str) -> None:
    mechanism = StepMechanism.poisson(1.0, 0.02)
    accountant = create_accountant(name)
    accountant.record(mechanism, steps=40)
    after_one = accountant.epsilon_if(mechanism, additional_steps=1, delta=DELTA)
    after_two = accountant.epsilon_if(mechanism, additional_steps=2, delta=DELTA)
    budget = (after_one + after_two) / 2

    assert not accountant.would_exceed(
        budget_epsilon=budget, delta=DELTA, mechanism=mechanism, additional_steps=1
    )
    assert accountant.would_exceed(
        budget_epsilon=budget, delta=DELTA, mechanism=mechanism, additional_steps=2
    )
    assert accountant.charge(mechanism, delta=DELTA, budget_epsilon=budget) == after_one
    assert accountant.steps == 41
    with pytest.raises(BudgetExhausted) as raised:
        accountant.charge(mechanism, delta=DELTA, budget_epsilon=budget)
    assert accountant.steps == 41  # nothing recorded on refusal
    assert raised.value.reason == "PRIVACY_BUDGET_EXHAUSTED"
    assert float(raised.value.metadata["epsilon_spent"]) == after_one


def test_exact_gaussian_bound_refuses_consistently() -> None:
    # mu = sqrt(16) / 1 = 4: the client-batch part alone has epsilon ~ 24 at 1e-5.
    mechanism = StepMechanism.client_batches(1.0)
    accountant = PldAccountant()
    accountant.record(mechanism, steps=15)
    exact = dp_accounting.get_epsilon_gaussian(1.0 / 4.0, DELTA)
    assert accountant.would_exceed(budget_epsilon=exact * 0.99, delta=DELTA, mechanism=mechanism)
    # The PLD's (pessimistic) value agrees with the exact Gaussian and is over budget too.
    full = accountant.epsilon_if(mechanism, additional_steps=1, delta=DELTA)
    assert full >= exact * (1 - 1e-9)
    assert relative_error(full, exact) < 1e-6
    assert not accountant.would_exceed(
        budget_epsilon=full * 1.001, delta=DELTA, mechanism=mechanism
    )


# ----------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    ("name", "sampling", "probability", "steps", "target"),
    [
        ("rdp", BatchSampling.POISSON, 0.01, 1000, 2.0),
        ("pld", BatchSampling.POISSON, 0.05, 100, 3.0),
        ("rdp", BatchSampling.CLIENT_BATCHES, 1.0, 100, 8.0),
        ("pld", BatchSampling.CLIENT_BATCHES, 1.0, 100, 8.0),
    ],
)
def test_calibration_round_trip(
    name: str, sampling: BatchSampling, probability: float, steps: int, target: float
) -> None:
    tolerance = 1e-3
    sigma = calibrate_noise_multiplier(
        target_epsilon=target,
        delta=DELTA,
        steps=steps,
        sampling=sampling,
        sampling_probability=probability,
        accountant=name,
        relative_tolerance=tolerance,
    )

    def epsilon_at(noise_multiplier: float) -> float:
        accountant = create_accountant(name)
        mechanism = StepMechanism(
            sampling=sampling,
            noise_multiplier=noise_multiplier,
            sampling_probability=probability,
        )
        accountant.record(mechanism, steps=steps)
        return accountant.epsilon(DELTA)

    assert epsilon_at(sigma) <= target
    # Within tolerance of the smallest sigma that meets the target.
    assert epsilon_at(sigma / (1 + 2 * tolerance)) > target


def test_calibrated_sigma_matches_reference_point() -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=5.6320106,
        delta=DELTA,
        steps=10_000,
        sampling=BatchSampling.POISSON,
        sampling_probability=0.01,
        accountant="rdp",
        relative_tolerance=1e-4,
    )
    assert sigma == pytest.approx(1.1, rel=2e-4)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan, "1e-5"])
def test_bad_delta_is_rejected(delta: object) -> None:
    accountant = RdpAccountant()
    with pytest.raises(InvalidArgument) as raised:
        accountant.epsilon(delta)  # type: ignore[arg-type]
    assert raised.value.field == "delta"


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: StepMechanism.client_batches(0.0), "noise_multiplier"),
        (lambda: StepMechanism.client_batches(-1.0), "noise_multiplier"),
        (lambda: StepMechanism.client_batches(math.inf), "noise_multiplier"),
        (lambda: StepMechanism.poisson(1.0, 0.0), "sampling_probability"),
        (lambda: StepMechanism.poisson(1.0, 1.5), "sampling_probability"),
        (
            lambda: StepMechanism(
                sampling=BatchSampling.CLIENT_BATCHES,
                noise_multiplier=1.0,
                sampling_probability=0.5,
            ),
            "sampling_probability",
        ),
        (lambda: RdpAccountant().record(StepMechanism.poisson(1, 0.1), steps=-1), "steps"),
        (lambda: RdpAccountant().record(StepMechanism.poisson(1, 0.1), steps=1.5), "steps"),
        (lambda: RdpAccountant().record(StepMechanism.poisson(1, 0.1), steps=True), "steps"),
        (
            lambda: RdpAccountant().epsilon_if(
                StepMechanism.poisson(1, 0.1), additional_steps=-2, delta=DELTA
            ),
            "additional_steps",
        ),
        (
            lambda: RdpAccountant().would_exceed(
                budget_epsilon=0.0, delta=DELTA, mechanism=StepMechanism.poisson(1, 0.1)
            ),
            "budget_epsilon",
        ),
        (lambda: create_accountant("moments"), "accountant"),
        (lambda: create_accountant("rdp", discretization=1e-4), "accountant"),
        (lambda: RdpAccountant(orders=[0.5, 2.0]), "orders"),
        (lambda: PldAccountant(value_discretization_interval=0.0), "value_discretization_interval"),
        (
            lambda: calibrate_noise_multiplier(
                target_epsilon=1.0, delta=DELTA, steps=0, sampling=BatchSampling.CLIENT_BATCHES
            ),
            "steps",
        ),
        (
            lambda: calibrate_noise_multiplier(
                target_epsilon=0.0, delta=DELTA, steps=10, sampling=BatchSampling.CLIENT_BATCHES
            ),
            "target_epsilon",
        ),
        (
            lambda: calibrate_noise_multiplier(
                target_epsilon=1.0,
                delta=DELTA,
                steps=10,
                sampling=BatchSampling.POISSON,
                sampling_probability=0.0,
            ),
            "sampling_probability",
        ),
    ],
)
def test_bad_arguments_are_rejected(build: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build()  # type: ignore[operator]
    assert raised.value.field == field


def test_registry() -> None:
    assert accountant_names() == ("rdp", "pld")
    assert isinstance(create_accountant("rdp"), RdpAccountant)
    assert isinstance(create_accountant("pld", value_discretization_interval=1e-3), PldAccountant)
