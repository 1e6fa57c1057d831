"""Bad requests raise InvalidArgument naming the field, and leave the engine unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tensafe.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tensafe.trainer.domain.engine.config import (
    AdamConfig,
    DpConfig,
    EngineOptions,
    LoraConfig,
    LossConfig,
)
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

from .conftest import EngineFactory, cross_entropy_batch

Request = dict[str, Any]


def _set(path: list[Any], value: Any) -> Callable[[Request], None]:
    def mutate(request: Request) -> None:
        target = request
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Callable[[Request], None]:
    def mutate(request: Request) -> None:
        target = request
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


BAD_REQUESTS: list[tuple[str, Callable[[Request], None], str]] = [
    ("empty batch", _set(["batch"], []), "batch"),
    ("empty sequence", _set(["batch", 1], []), "batch[1]"),
    ("token above vocab", _set(["batch", 2, 0], 512), "batch[2]"),
    ("negative token", _set(["batch", 0, 1], -1), "batch[0]"),
    ("float tokens", _set(["batch", 0], [1.5, 2.0, 3.0]), "batch[0]"),
    ("nested tokens", _set(["batch", 0], [[1, 2], [3, 4]]), "batch[0]"),
    ("too long", _set(["batch", 1], [5] * 129), "batch[1]"),
    ("unknown loss", _set(["loss_fn"], "mse"), "loss_fn"),
    ("inputs count", _delete(["loss_fn_inputs", 3]), "loss_fn_inputs"),
    ("missing weights", _delete(["loss_fn_inputs", 2, "weights"]), "loss_fn_inputs[2].weights"),
    (
        "extra input",
        _set(["loss_fn_inputs", 0, "advantages"], [0.0]),
        "loss_fn_inputs[0].advantages",
    ),
    (
        "short targets",
        lambda r: r["loss_fn_inputs"][1]["target_tokens"].pop(),
        "loss_fn_inputs[1].target_tokens",
    ),
    (
        "target above vocab",
        lambda r: r["loss_fn_inputs"][0]["target_tokens"].__setitem__(0, 9999),
        "loss_fn_inputs[0].target_tokens",
    ),
    (
        "nan weight",
        lambda r: r["loss_fn_inputs"][3]["weights"].__setitem__(0, float("nan")),
        "loss_fn_inputs[3].weights",
    ),
    (
        "weights not numbers",
        _set(["loss_fn_inputs", 0, "weights"], "abc"),
        "loss_fn_inputs[0].weights",
    ),
]


@pytest.mark.parametrize(
    ("label", "mutate", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_forward_backward_request_names_the_field_and_changes_nothing(
    make_engine: EngineFactory,
    corpus_sequences: list[list[int]],
    label: str,
    mutate: Callable[[Request], None],
    field: str,
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    batch, inputs = cross_entropy_batch(corpus_sequences[:4])
    engine.forward_backward(batch, "cross_entropy", inputs)  # something accumulated
    before = engine.state_dict()
    request: Request = {"batch": batch, "loss_fn": "cross_entropy", "loss_fn_inputs": inputs}
    request = copy.deepcopy(request)
    mutate(request)
    with pytest.raises(InvalidArgument) as raised:
        engine.forward_backward(request["batch"], request["loss_fn"], request["loss_fn_inputs"])
    assert raised.value.field == field, label
    assert engine.state_dict() == before
    assert engine.accumulated_examples == 4


def test_rl_inputs_that_overflow_the_ratio_are_refused(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    before = engine.state_dict()
    sequence = corpus_sequences[0]
    n = len(sequence) - 1
    inputs: list[dict[str, Sequence[float]]] = [
        {"target_tokens": sequence[1:], "logprobs": [-1000.0] * n, "advantages": [1.0] * n}
    ]
    with pytest.raises(InvalidArgument) as raised:
        engine.forward_backward([sequence[:-1]], "importance_sampling", inputs)
    assert raised.value.field == "loss_fn_inputs[0]"
    assert engine.state_dict() == before


def test_optim_step_arguments(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    adam = AdamConfig(learning_rate=1e-3)
    for bad in (0, -4.0, float("inf"), float("nan")):
        with pytest.raises(InvalidArgument) as raised:
            engine.optim_step(adam, expected_batch_size=bad)
        assert raised.value.field == "expected_batch_size"
    # A DP step with no data and no expected batch size has no defined normalisation.
    with pytest.raises(FailedPrecondition):
        engine.optim_step(adam)
    assert engine.step == 0
    plain = make_engine(dp=None)
    with pytest.raises(FailedPrecondition):
        plain.optim_step(adam)
    assert plain.step == 0


def test_compute_logprobs_validation(make_engine: EngineFactory) -> None:
    engine = make_engine(dp=None)
    for sequences, field in (
        ([], "sequences"),
        ([[1, 2], []], "sequences[1]"),
        ([[1, 600]], "sequences[0]"),
    ):
        with pytest.raises(InvalidArgument) as raised:
            engine.compute_logprobs(sequences)
        assert raised.value.field == field
    assert engine.compute_logprobs([[7]]) == [[]]


def test_engine_construction_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    lora = LoraConfig(rank=4, alpha=8)
    with pytest.raises(NotFound):
        LoraTrainingEngine(tmp_path / "missing", lora=lora, dp=None, seed=0)
    with pytest.raises(InvalidArgument) as raised:
        LoraTrainingEngine(
            tiny_model_dir,
            lora=LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "attention_out")),
            dp=None,
            seed=0,
        )
    assert raised.value.field == "lora.target_modules"
    assert "attention_out" in raised.value.message


CONFIG_ERRORS: list[tuple[Callable[[], object], str]] = [
    (lambda: LoraConfig(rank=0, alpha=1), "lora.rank"),
    (lambda: LoraConfig(rank=4096, alpha=1), "lora.rank"),
    (lambda: LoraConfig(rank=2.5, alpha=1), "lora.rank"),  # type: ignore[arg-type]
    (lambda: LoraConfig(rank=True, alpha=1), "lora.rank"),
    (lambda: LoraConfig(rank=4, alpha=0), "lora.alpha"),
    (lambda: LoraConfig(rank=4, alpha=1, dropout=1.0), "lora.dropout"),
    (lambda: LoraConfig(rank=4, alpha=1, dropout=-0.1), "lora.dropout"),
    (lambda: LoraConfig(rank=4, alpha=1, target_modules=()), "lora.target_modules"),
    (lambda: LoraConfig(rank=4, alpha=1, target_modules="q_proj"), "lora.target_modules"),  # type: ignore[arg-type]
    (lambda: LoraConfig(rank=4, alpha=1, target_modules=("q", "q")), "lora.target_modules"),
    (lambda: LoraConfig(rank=4, alpha=1, target_modules=("q.proj",)), "lora.target_modules"),
    (lambda: AdamConfig(learning_rate=-1e-3), "adam.learning_rate"),
    (lambda: AdamConfig(learning_rate=0.0), "adam.learning_rate"),
    (lambda: AdamConfig(learning_rate=float("nan")), "adam.learning_rate"),
    (lambda: AdamConfig(learning_rate=1e-3, betas=(1.0, 0.9)), "adam.betas[0]"),
    (lambda: AdamConfig(learning_rate=1e-3, betas=(0.9, -0.1)), "adam.betas[1]"),
    (lambda: AdamConfig(learning_rate=1e-3, eps=0.0), "adam.eps"),
    (lambda: AdamConfig(learning_rate=1e-3, weight_decay=-1.0), "adam.weight_decay"),
    (lambda: DpConfig(noise_multiplier=-0.1, max_grad_norm=1.0), "dp.noise_multiplier"),
    (lambda: DpConfig(noise_multiplier=1.0, max_grad_norm=0.0), "dp.max_grad_norm"),
    (lambda: DpConfig(noise_multiplier=1.0, max_grad_norm=float("inf")), "dp.max_grad_norm"),
    (lambda: LossConfig(ppo_clip_low=1.0), "loss.ppo_clip_low"),
    (lambda: LossConfig(ppo_clip_high=-0.2), "loss.ppo_clip_high"),
    (lambda: EngineOptions(logprob_batch_size=0), "options.logprob_batch_size"),
]


@pytest.mark.parametrize(
    ("build", "field"), CONFIG_ERRORS, ids=[c[1] + str(i) for i, c in enumerate(CONFIG_ERRORS)]
)
def test_config_validation_names_the_field(build: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build()
    assert raised.value.field == field


def test_valid_configs_are_accepted() -> None:
    lora = LoraConfig(rank=8, alpha=16, dropout=0.05)
    assert lora.scaling == 2.0
    assert DpConfig(noise_multiplier=1.1, max_grad_norm=2.0).noise_std == pytest.approx(2.2)
    assert AdamConfig(learning_rate=1e-4).betas == (0.9, 0.999)
