"""The parts of ``tensafe train`` that need no server: input, tokenising, batching, output."""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tensafe.client import train_cli
from tensafe.client.progress import TrainingProgress
from tensafe.client.tiny_model import build_tiny_model
from tensafe.common.errors import InvalidArgument
from tensafe.tinker import types


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny"),
        seed=0,
        vocab_size=384,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=64,
    )


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_read_texts_and_the_line_of_a_bad_record(tmp_path: Path) -> None:
    good = _jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two", "id": 3}])
    assert train_cli.read_texts(good) == ["one", "two"]
    bad = _jsonl(tmp_path / "b.jsonl", [{"text": "one"}, {"prompt": "x"}])
    with pytest.raises(InvalidArgument) as info:
        train_cli.read_texts(bad)
    assert info.value.field.endswith("b.jsonl:2")
    broken = tmp_path / "c.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(InvalidArgument, match="not JSON"):
        train_cli.read_texts(broken)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidArgument, match="no records"):
        train_cli.read_texts(tmp_path / "empty.jsonl")


def test_corpus_from_the_real_tokenizer(tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["the cat sat on the mat", "", "the cat sat on the mat", "2 + 2 = 4 " * 40]
    corpus = train_cli.build_corpus(texts, tokenizer.encode, max_length=16)
    assert corpus.texts_read == 4 and corpus.duplicates == 1
    first = tokenizer.encode(texts[0])
    assert corpus.sequences[0] == first[:17]
    assert len(corpus.sequences[-1]) == 17  # truncated to max_length + 1
    assert corpus.too_short == (1 if len(tokenizer.encode("")) < 2 else 0)
    with pytest.raises(InvalidArgument):
        train_cli.build_corpus([""], lambda text: [], max_length=4)


def test_datum_is_next_token_cross_entropy() -> None:
    datum = train_cli.to_datum([10, 11, 12, 13])
    assert datum.model_input.to_ints() == [10, 11, 12]
    assert datum.loss_fn_inputs["target_tokens"].data == [11, 12, 13]
    assert datum.loss_fn_inputs["weights"].data == [1.0, 1.0, 1.0]


def test_mean_nll_is_weighted_per_token() -> None:
    batch = [train_cli.to_datum([1, 2, 3]), train_cli.to_datum([4, 5])]
    output = types.ForwardBackwardOutput(
        loss_fn_output_type="TensorData",
        loss_fn_outputs=[
            {"logprobs": types.TensorData(data=[-1.0, -2.0], dtype="float32")},
            {"logprobs": types.TensorData(data=[-3.0], dtype="float32")},
        ],
        metrics={},
    )
    assert train_cli.mean_nll(output, batch) == pytest.approx(2.0)
    with pytest.raises(InvalidArgument):
        train_cli.mean_nll(output, batch[:1])


def test_batches_cover_every_example_each_pass_without_repeats() -> None:
    batches = train_cli.Batches(size=3, count=7, rng=random.Random(1))
    drawn = [batches.next() for _ in range(7)]  # 21 draws = 3 passes
    assert all(len(set(b)) == 3 for b in drawn)
    flat = [i for b in drawn for i in b]
    assert sorted(flat) == sorted(list(range(7)) * 3)
    with pytest.raises(InvalidArgument):
        train_cli.Batches(size=8, count=7, rng=random.Random(1))


def test_progress_shows_loss_and_epsilon_and_writes_metrics_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    spent = types.PrivacySpent(1.5, 1e-5, "rdp", 1, 1.0, 8.0, private=True)
    with TrainingProgress(2, stream=stream, metrics_file=metrics_file) as progress:
        progress.update(loss=3.0, optim=types.OptimStepResponse(step=1, privacy_spent=spent))
        progress.update(loss=1.0, epsilon=math.inf, step=2)
    drawn = stream.getvalue()
    assert "2/2" in drawn and "loss 1.0000" in drawn and "ε ∞ (non-private)" in drawn
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert records[0] | {"elapsed_s": 0} == {
        "step": 1,
        "loss": 3.0,
        "epsilon": 1.5,
        "delta": 1e-5,
        "epsilon_budget": 8.0,
        "elapsed_s": 0,
    }
    # JSON has no infinity: a non-private step's ε is null.
    assert records[1]["step"] == 2 and records[1]["epsilon"] is None


def test_privacy_line() -> None:
    spent = types.PrivacySpent(
        epsilon=3.21,
        delta=1e-5,
        accountant="rdp",
        steps=40,
        noise_multiplier=1.0,
        epsilon_budget=None,
        private=True,
    )
    line = train_cli.describe_privacy(spent)
    assert "ε = 3.2100 at δ = 1e-05" in line and "40 steps" in line
    plain = types.PrivacySpent(math.inf, 0.0, None, 5, 0.0, None, private=False)
    assert "non-private" in train_cli.describe_privacy(plain)


def test_parser_and_early_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tensafe")
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "d.jsonl", "--base-model", "m", "--non-private", "--noise-multiplier", "1"]
    )
    assert train_cli.run(args) == 2
    assert "--non-private contradicts" in capsys.readouterr().err
    args = parser.parse_args(["train", str(tmp_path / "missing.jsonl"), "--base-model", "m"])
    assert args.steps == 40 and args.accountant == "rdp" and not args.non_private
    assert train_cli.run(args) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["train", "d", "--base-model", "m", "--noise-multiplier", "1", "--target-epsilon", "2"]
        )
