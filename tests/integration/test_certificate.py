"""The DP certificate SaveAdapter seals is the privacy ledger's, never something weaker."""

from __future__ import annotations

import pytest

from tensafe import tgsp
from tensafe.common.errors import FailedPrecondition
from tensafe.trainer.domain.engine.accounting import StepMechanism
from tensafe.trainer.domain.ledger import HistoryGroup, LineageSource, PrivacyReport
from tensafe.trainer.domain.settings import DpSettings
from tensafe.trainer.publisher import CLIENT_BATCHES_ASSUMPTION, dp_certificate
from tensafe.trainer.store.models import TrainingClientRow

DP = DpSettings(
    noise_multiplier=1.3,
    max_grad_norm=0.5,
    delta=1e-6,
    accountant="pld",
    target_epsilon=None,
    planned_steps=0,
    epsilon_budget=None,
)
OWN = "c" * 32
OTHER = "a" * 32


def client(*, dp: DpSettings | None) -> TrainingClientRow:
    return TrainingClientRow(id=OWN, dp_json=dp.to_json() if dp is not None else None)


def report(
    epsilon: float, steps: int, *, inherited: int = 0, non_private: tuple[LineageSource, ...] = ()
) -> PrivacyReport:
    return PrivacyReport(
        epsilon=epsilon,
        delta=DP.delta,
        epsilon_budget=None,
        steps=steps,
        inherited_steps=inherited,
        non_private_sources=non_private,
    )


def client_batches(steps: int, *, who: str = OWN, sigma: float = 1.3) -> HistoryGroup:
    return HistoryGroup(client_id=who, mechanism=StepMechanism.client_batches(sigma), steps=steps)


def poisson(steps: int, rate: float) -> HistoryGroup:
    return HistoryGroup(client_id=OWN, mechanism=StepMechanism.poisson(1.3, rate), steps=steps)


def test_client_batches_give_the_epsilon_and_state_the_assumption() -> None:
    certificate = dp_certificate(client(dp=DP), [client_batches(2)], report(1.25, 2))
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert (certificate.epsilon, certificate.steps) == (1.25, 2)
    assert (certificate.delta, certificate.accountant) == (1e-6, "pld")
    assert (certificate.noise_multiplier, certificate.max_grad_norm) == (1.3, 0.5)
    assert isinstance(certificate.sampling, tgsp.ClientBatches)
    assert certificate.assumptions == (CLIENT_BATCHES_ASSUMPTION,)
    assert certificate.history == (
        tgsp.StepGroup(
            training_client_id=OWN, sampling=tgsp.ClientBatches(), noise_multiplier=1.3, steps=2
        ),
    )


def test_server_poisson_batches_carry_their_rate() -> None:
    certificate = dp_certificate(client(dp=DP), [poisson(3, 0.02)], report(1.5, 3))
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert certificate.sampling == tgsp.PoissonSampling(rate=0.02)
    assert certificate.assumptions == () and certificate.epsilon == 1.5


def test_mixed_sampling_never_claims_amplification() -> None:
    certificate = dp_certificate(
        client(dp=DP), [client_batches(1), poisson(1, 0.05)], report(1.0, 2)
    )
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert isinstance(certificate.sampling, tgsp.ClientBatches)
    assert "1 of 2 steps used server-drawn Poisson batches" in certificate.assumptions[1]


def test_inherited_and_non_private_steps_are_stated() -> None:
    public = LineageSource(
        client_id="p" * 32,
        private=False,
        dp_steps=0,
        steps=7,
        epsilon_budget=None,
        delta=None,
    )
    certificate = dp_certificate(
        client(dp=DP),
        [client_batches(2), client_batches(4, who=OTHER, sigma=0.9)],
        report(9.0, 6, inherited=4, non_private=(public,)),
    )
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert certificate.steps == 6
    assert [group.steps for group in certificate.history] == [2, 4]
    assert certificate.history[1].noise_multiplier == 0.9
    assert any(OTHER in text and "4 DP step" in text for text in certificate.assumptions)
    assert any("WITHOUT differential privacy" in text for text in certificate.assumptions)
    # The certificate survives the manifest's JSON round trip, history included.
    assert (
        tgsp.manifest._certificate_from_json(  # type: ignore[attr-defined]
            tgsp.manifest._certificate_to_json(certificate)  # type: ignore[attr-defined]
        )
        == certificate
    )


def test_a_non_private_client_gets_no_guarantee() -> None:
    certificate = dp_certificate(client(dp=None), [], None)
    assert isinstance(certificate, tgsp.NoDPGuarantee)
    assert "non-private" in certificate.reason


def test_a_private_client_without_steps_has_spent_nothing() -> None:
    certificate = dp_certificate(client(dp=DP), [], report(0.0, 0))
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert (certificate.epsilon, certificate.steps) == (0.0, 0)


def test_a_history_that_does_not_add_up_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="inconsistent"):
        dp_certificate(client(dp=DP), [client_batches(2)], report(1.0, 3))
