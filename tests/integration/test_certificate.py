"""The DP certificate SaveAdapter seals is the privacy ledger's, never something weaker."""

from __future__ import annotations

import pytest

from tensafe import tgsp
from tensafe.common.errors import FailedPrecondition
from tensafe.trainer import serde
from tensafe.trainer.publisher import CLIENT_BATCHES_ASSUMPTION, dp_certificate
from tensafe.trainer.store.models import LedgerRow, TrainingClientRow

DP = serde.DpSettings(
    noise_multiplier=1.3,
    max_grad_norm=0.5,
    delta=1e-6,
    accountant="pld",
    target_epsilon=None,
    planned_steps=0,
    epsilon_budget=None,
)


def client(*, dp: serde.DpSettings | None, dp_steps: int) -> TrainingClientRow:
    return TrainingClientRow(
        id="c" * 32, dp_json=dp.to_json() if dp is not None else None, dp_steps=dp_steps
    )


def ledger(*samplings: tuple[str, float], epsilons: list[float] | None = None) -> list[LedgerRow]:
    epsilons = epsilons or [0.5 * (i + 1) for i in range(len(samplings))]
    return [
        LedgerRow(
            dp_step=index + 1,
            sampling=sampling,
            sampling_probability=rate,
            noise_multiplier=DP.noise_multiplier,
            delta=DP.delta,
            accountant=DP.accountant,
            epsilon_after=epsilons[index],
        )
        for index, (sampling, rate) in enumerate(samplings)
    ]


def test_client_batches_give_the_last_epsilon_and_state_the_assumption() -> None:
    rows = ledger(("client_batches", 1.0), ("client_batches", 1.0), epsilons=[0.7, 1.25])
    certificate = dp_certificate(client(dp=DP, dp_steps=2), rows)
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert (certificate.epsilon, certificate.steps) == (1.25, 2)
    assert (certificate.delta, certificate.accountant) == (1e-6, "pld")
    assert (certificate.noise_multiplier, certificate.max_grad_norm) == (1.3, 0.5)
    assert isinstance(certificate.sampling, tgsp.ClientBatches)
    assert certificate.assumptions == (CLIENT_BATCHES_ASSUMPTION,)


def test_server_poisson_batches_carry_their_rate() -> None:
    rows = ledger(("poisson", 0.02), ("poisson", 0.02), ("poisson", 0.02))
    certificate = dp_certificate(client(dp=DP, dp_steps=3), rows)
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert certificate.sampling == tgsp.PoissonSampling(rate=0.02)
    assert certificate.assumptions == () and certificate.epsilon == 1.5


def test_mixed_sampling_never_claims_amplification() -> None:
    rows = ledger(("client_batches", 1.0), ("poisson", 0.05))
    certificate = dp_certificate(client(dp=DP, dp_steps=2), rows)
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert isinstance(certificate.sampling, tgsp.ClientBatches)
    assert "1 of 2 steps used server-drawn Poisson batches" in certificate.assumptions[1]


def test_a_non_private_client_gets_no_guarantee() -> None:
    certificate = dp_certificate(client(dp=None, dp_steps=0), [])
    assert isinstance(certificate, tgsp.NoDPGuarantee)
    assert "non-private" in certificate.reason


def test_a_private_client_without_steps_has_spent_nothing() -> None:
    certificate = dp_certificate(client(dp=DP, dp_steps=0), [])
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert (certificate.epsilon, certificate.steps) == (0.0, 0)


def test_an_inconsistent_ledger_is_refused() -> None:
    rows = ledger(("client_batches", 1.0), ("client_batches", 1.0))
    with pytest.raises(FailedPrecondition, match="inconsistent"):
        dp_certificate(client(dp=DP, dp_steps=3), rows)  # a committed step has no row
    rows[1].dp_step = 3
    with pytest.raises(FailedPrecondition, match="inconsistent"):
        dp_certificate(client(dp=DP, dp_steps=2), rows)
    changed = ledger(("client_batches", 1.0))
    changed[0].noise_multiplier = 0.5
    with pytest.raises(FailedPrecondition, match="other DP parameters"):
        dp_certificate(client(dp=DP, dp_steps=1), changed)
    with pytest.raises(FailedPrecondition, match="non-private"):
        dp_certificate(client(dp=None, dp_steps=0), ledger(("client_batches", 1.0)))
