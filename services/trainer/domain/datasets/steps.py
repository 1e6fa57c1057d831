"""One DP-SGD step of TrainOnDataset on a drawn Poisson batch, without the database.

The step function the dataset runner (:mod:`tensafe.trainer.runners.datasets`) calls for
every step of a run, and the privacy audit (:mod:`tensafe.trainer.domain.audit.run`) calls
for every step of a Poisson shadow run, so the audit tests the code that trains on server-held data:
micro-batched ``forward_backward`` (per-example clipping) and one ``optim_step``
dividing by the expected batch size, with the noise-only update for an empty batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from tensafe.trainer.domain.datasets.records import TokenizedDataset
from tensafe.trainer.domain.engine.config import AdamConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

MICRO_BATCH = 8
"""Records per forward/backward pass within one step (bounds activation memory; the
clipped sum over the step is the same whatever the split)."""


@dataclass(frozen=True)
class StepOutcome:
    """What one Poisson step produced, before its commit."""

    batch_size: int
    mean_loss: float | None
    """Mean cross-entropy per trained token; None for an empty batch."""
    state: bytes
    step: int


def run_step(
    engine: LoraTrainingEngine,
    dataset: TokenizedDataset,
    batch: npt.NDArray[np.int64],
    *,
    adam: AdamConfig,
    expected_batch_size: float,
    noisy_sum_observer: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> StepOutcome:
    """One DP-SGD step on a drawn batch (runs in a worker thread).

    Args:
        engine: The client's engine, with nothing accumulated.
        dataset: The decrypted records.
        batch: Indices of the records drawn (possibly none).
        adam: AdamW hyper-parameters.
        expected_batch_size: q · N, the divisor of the noised sum.
        noisy_sum_observer: Passed to ``optim_step``: the privacy audit's white-box
            auditor observes the step's noised sum; the runner passes none.

    Returns:
        The batch size, the mean loss and the new engine state.
    """
    loss_sum = 0.0
    trained_tokens = 0.0
    indices = [int(index) for index in batch]
    for start in range(0, len(indices), MICRO_BATCH):
        sequences = []
        inputs = []
        for index in indices[start : start + MICRO_BATCH]:
            tokens, loss_inputs = dataset.datum(index)
            sequences.append(tokens)
            inputs.append(loss_inputs)
            trained_tokens += float(sum(loss_inputs["weights"]))
        # Two records of the dataset are two data even when their contents are equal.
        result = engine.forward_backward(
            sequences, "cross_entropy", inputs, refuse_duplicates=False
        )
        loss_sum += result.metrics["loss:sum"]
    result_step = engine.optim_step(
        adam, expected_batch_size=expected_batch_size, noisy_sum_observer=noisy_sum_observer
    )
    mean_loss = loss_sum / trained_tokens if indices and trained_tokens > 0 else None
    return StepOutcome(
        batch_size=len(indices),
        mean_loss=mean_loss,
        state=engine.state_dict(),
        step=result_step.step,
    )
