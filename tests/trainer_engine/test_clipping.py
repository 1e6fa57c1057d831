"""Book-keeping per-example clipping against materialised per-example gradients."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from tensafe.trainer.domain.engine.clipping import (
    CLIP_NORM_EPSILON,
    LoraActivationTap,
    clip_per_example,
    lora_linear_layers,
)
from tensafe.trainer.domain.engine.config import DpConfig, LossConfig, NormMethod
from tensafe.trainer.domain.engine.losses import (
    LossFn,
    PaddedBatch,
    per_token_loss,
    token_logprobs,
    validate_batch,
)
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

from .conftest import EngineFactory, cross_entropy_batch, global_norm, randomise_adapter


def _padded(engine: LoraTrainingEngine, sequences: list[list[int]]) -> PaddedBatch:
    batch, inputs = cross_entropy_batch(sequences)
    return validate_batch(
        batch,
        LossFn.CROSS_ENTROPY,
        inputs,
        vocab_size=engine.vocab_size,
        max_length=engine.max_sequence_length,
    )


def _example_losses(model: torch.nn.Module, padded: PaddedBatch) -> torch.Tensor:
    logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
    logprobs = token_logprobs(logits, padded.target_tokens)
    return per_token_loss(LossFn.CROSS_ENTROPY, logprobs, padded, LossConfig()).sum(dim=1)


def _materialised_clipping(
    example_losses: torch.Tensor, parameters: dict[str, torch.nn.Parameter], max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reference: one backward per example on the same graph, then clip and sum."""
    per_example = [
        torch.autograd.grad(loss, list(parameters.values()), retain_graph=True)
        for loss in example_losses
    ]
    norms = torch.stack([global_norm(grads) for grads in per_example])
    factors = (max_grad_norm / (norms + CLIP_NORM_EPSILON)).clamp(max=1.0)
    sums = {
        name: torch.stack([factors[i] * grads[k] for i, grads in enumerate(per_example)]).sum(0)
        for k, name in enumerate(parameters)
    }
    return sums, norms


@pytest.mark.parametrize("norm_method", [NormMethod.DIRECT, NormMethod.GRAM, NormMethod.AUTO])
def test_book_keeping_equals_materialised_clipping_with_lora_dropout(
    make_engine: EngineFactory, corpus_sequences: list[list[int]], norm_method: NormMethod
) -> None:
    # Dropout 0.3 on the LoRA input: the hooks must see the dropped-out input that
    # lora_A really multiplied; both computations share one forward (same masks).
    engine = make_engine(dp=DpConfig(noise_multiplier=0.0, max_grad_norm=1.0), dropout=0.3)
    randomise_adapter(engine, seed=5)
    model = engine.model
    model.train()
    tap = LoraActivationTap(lora_linear_layers(model, "default"))
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    padded = _padded(engine, corpus_sequences[:12])
    torch.manual_seed(123)
    with tap.capture(norm_method) as record:
        example_losses = _example_losses(model, padded)
    tap.close()
    max_grad_norm = 20.0  # the per-example norms here range from about 5 to 65

    reference, reference_norms = _materialised_clipping(example_losses, parameters, max_grad_norm)
    # The reference ran its backward passes on the same graph first: the record's hooks
    # act only inside clip_per_example.
    result = clip_per_example(example_losses.sum(), record, max_grad_norm=max_grad_norm)
    with pytest.raises(RuntimeError):
        clip_per_example(example_losses.sum(), record, max_grad_norm=max_grad_norm)

    # Some examples clipped, some not: both branches of min(1, C/‖g‖) are exercised.
    assert (reference_norms > max_grad_norm).any()
    assert (reference_norms < max_grad_norm).any()
    torch.testing.assert_close(result.per_example_norms, reference_norms, rtol=1e-5, atol=1e-6)
    assert set(result.clipped_sum) == set(parameters)
    for name, expected in reference.items():
        torch.testing.assert_close(result.clipped_sum[name], expected, rtol=1e-5, atol=1e-6)
    largest = max(float(t.abs().max()) for t in reference.values())
    worst = max(float((result.clipped_sum[n] - reference[n]).abs().max()) for n in reference)
    assert largest > 1e-2  # the comparison is not between two near-zero tensors
    assert worst <= 1e-6 * max(1.0, largest)


def test_every_clipped_example_gradient_is_within_the_bound(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=0.0, max_grad_norm=1e-3))
    randomise_adapter(engine, seed=6)
    model = engine.model
    model.train()
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    max_grad_norm = 1e-3
    for sequence in corpus_sequences[:6]:
        # One example at a time: the book-keeping sum is that example's clipped gradient.
        padded = _padded(engine, [sequence])
        tap = LoraActivationTap(lora_linear_layers(model, "default"))
        with tap.capture() as record:
            losses = _example_losses(model, padded)
        tap.close()
        unclipped = torch.autograd.grad(losses.sum(), list(parameters.values()), retain_graph=True)
        unclipped_norm = global_norm(unclipped)
        clipped = clip_per_example(losses.sum(), record, max_grad_norm=max_grad_norm)
        clipped_norm = global_norm(clipped.clipped_sum.values())
        assert unclipped_norm > 100 * max_grad_norm
        assert clipped_norm <= max_grad_norm * (1 + 1e-5)
        assert clipped_norm >= max_grad_norm * (1 - 1e-3)
        # Clipping rescales, it does not change the direction.
        for name, grad in zip(parameters, unclipped, strict=True):
            torch.testing.assert_close(
                clipped.clipped_sum[name],
                grad * (max_grad_norm / unclipped_norm),
                rtol=1e-4,
                atol=1e-9,
            )


def test_book_keeping_equals_opacus_clipped_sum(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    max_grad_norm = 0.3
    engine = make_engine(dp=DpConfig(noise_multiplier=0.0, max_grad_norm=max_grad_norm))
    randomise_adapter(engine, seed=7)
    sequences = corpus_sequences[20:30]
    batch, inputs = cross_entropy_batch(sequences)
    engine.forward_backward(batch, "cross_entropy", inputs)
    ours = engine.pending_gradient_sum()

    # Opacus: per-sample gradients from its hooks, clipped and summed by DPOptimizer.
    model = engine.model
    model.train()
    grad_sample_module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(parameters, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(sequences),
        loss_reduction="sum",
    )
    padded = _padded(engine, sequences)
    losses = _example_losses(grad_sample_module, padded)
    torch.autograd.backward(losses.sum())  # Opacus's hooks fill p.grad_sample
    optimizer.clip_and_accumulate()
    names = {id(p): n for n, p in model.named_parameters()}
    compared = 0
    for parameter in parameters:
        summed_grad = getattr(parameter, "summed_grad", None)  # set by Opacus
        assert isinstance(summed_grad, torch.Tensor)
        torch.testing.assert_close(ours[names[id(parameter)]], summed_grad, rtol=1e-4, atol=1e-6)
        compared += 1
    grad_sample_module._close()
    assert compared == len(engine.parameter_names)
