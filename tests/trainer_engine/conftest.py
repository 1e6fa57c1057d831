"""Shared fixtures: one real tiny Llama model and tokenized corpus per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tensafe.client.tiny_model import tiny_corpus
from tensafe.trainer.domain.engine.config import DpConfig, EngineOptions, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from testkit.models import build_tiny_llama, one_torch_thread

MAX_TOKENS = 40


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared 2-core machine, OpenMP threads that wait at
    barriers for a core another process holds make steps 10-30x slower."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def corpus_sequences(tiny_model_dir: Path) -> list[list[int]]:
    """Token sequences of the built-in corpus with varied lengths in 5..MAX_TOKENS."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = tiny_corpus()
    sequences = []
    for index in range(len(lines) - 1):
        tokens = tokenizer(lines[index] + " " + lines[index + 1]).input_ids
        sequences.append(tokens[: 5 + (index * 11) % (MAX_TOKENS - 4)])
    return sequences


EngineFactory = Callable[..., LoraTrainingEngine]


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Iterator[EngineFactory]:
    engines: list[LoraTrainingEngine] = []

    def factory(
        *,
        dp: DpConfig | None,
        rank: int = 8,
        dropout: float = 0.0,
        seed: int = 1,
        options: EngineOptions | None = None,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    ) -> LoraTrainingEngine:
        engine = LoraTrainingEngine(
            tiny_model_dir,
            lora=LoraConfig(
                rank=rank, alpha=2.0 * rank, dropout=dropout, target_modules=tuple(target_modules)
            ),
            dp=dp,
            seed=seed,
            options=options,
        )
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.close()


def randomise_adapter(engine: LoraTrainingEngine, *, seed: int, scale: float = 0.2) -> None:
    """Give both LoRA factors non-zero values (peft starts B at zero, which would make
    every per-example gradient of A vanish and the tests of A vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(engine.model.named_parameters())
    with torch.no_grad():
        for name in engine.parameter_names:
            parameter = parameters[name]
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def cross_entropy_batch(
    sequences: Sequence[Sequence[int]],
) -> tuple[list[list[int]], list[dict[str, list[float] | list[int]]]]:
    """Tinker-style data: input = s[:-1], targets = s[1:], weight 1 on every token."""
    batch = [list(s[:-1]) for s in sequences]
    inputs: list[dict[str, list[float] | list[int]]] = [
        {"target_tokens": list(s[1:]), "weights": [1.0] * (len(s) - 1)} for s in sequences
    ]
    return batch, inputs


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of several tensors taken together (as one flattened vector)."""
    return torch.sqrt(torch.stack([t.pow(2).sum() for t in tensors]).sum())
