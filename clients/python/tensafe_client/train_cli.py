"""``tensafe train``: DP fine-tuning of a LoRA adapter on a JSONL file of texts.

Reads ``{"text": ...}`` records, tokenises them with the base model's tokenizer
(``--tokenizer DIR``, else ``<base models dir>/<base model>`` as the SDK resolves it),
turns each text into one ``cross_entropy`` datum (next-token targets, weight 1 on every
target), and runs ``--steps`` DP-SGD steps through the Tinker-compatible SDK. Each step
prints its loss (mean negative log-likelihood per target token, from the logprobs the
server returns) and the epsilon spent so far; a live progress bar with both goes to
stderr, and ``--metrics-file`` writes one JSON line per step for ``tensafe plot``. At the
end it prints the privacy spent.

Batches are drawn by the client (a shuffled pass over the data, without replacement
within a batch), so the server accounts each step as a full Gaussian mechanism with no
subsampling amplification (DESIGN §8). Identical token sequences are merged first, so
no example appears twice in one step.

Exit codes: 0 done, 2 bad input or setup, 3 privacy budget exhausted (steps that fit
were applied).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tensafe.client.progress import TrainingProgress, format_epsilon
from tensafe.common.errors import BudgetExhausted, InvalidArgument, TenSafeError

if TYPE_CHECKING:
    from tensafe.tinker import TrainingClient, types


@dataclass(frozen=True)
class Corpus:
    """Training sequences ready for ``cross_entropy``.

    Attributes:
        sequences: Distinct token sequences, each of at least two tokens.
        texts_read: Records in the file.
        too_short: Texts dropped for having fewer than two tokens.
        duplicates: Texts dropped because their tokens equal an earlier text's.
    """

    sequences: list[list[int]]
    texts_read: int
    too_short: int
    duplicates: int


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSON-lines file.

    Raises:
        InvalidArgument: A line that is not JSON; the field is ``<path>:<line>``.
    """
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{number}", f"not JSON ({exc.msg})") from None


def read_texts(path: Path) -> list[str]:
    """The ``text`` field of every record of a JSONL file.

    Raises:
        InvalidArgument: A line that is not a JSON object with a string ``text``.
    """
    texts = []
    for number, record in read_json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidArgument(f"{path}:{number}", 'expected {"text": "..."}')
        texts.append(record["text"])
    if not texts:
        raise InvalidArgument(str(path), "no records")
    return texts


def build_corpus(
    texts: Sequence[str], encode: Callable[[str], list[int]], *, max_length: int
) -> Corpus:
    """Tokenise, truncate to ``max_length`` input tokens, drop short and repeated ones.

    Args:
        texts: The texts.
        encode: Text to token ids (the tokenizer's ``encode``).
        max_length: Input tokens per datum at most (the sequence keeps one more token,
            the last target).

    Returns:
        The corpus.

    Raises:
        InvalidArgument: ``max_length`` below 1, or no usable sequence.
    """
    if max_length < 1:
        raise InvalidArgument("max_length", "must be at least 1")
    seen: set[tuple[int, ...]] = set()
    sequences: list[list[int]] = []
    too_short = duplicates = 0
    for text in texts:
        tokens = list(encode(text))[: max_length + 1]
        if len(tokens) < 2:
            too_short += 1
            continue
        key = tuple(tokens)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        sequences.append(tokens)
    if not sequences:
        raise InvalidArgument("data", "no text has two or more tokens")
    return Corpus(sequences, len(texts), too_short, duplicates)


def to_datum(tokens: Sequence[int]) -> types.Datum:
    """One ``cross_entropy`` datum: inputs ``tokens[:-1]``, targets ``tokens[1:]``."""
    from tensafe.tinker import types

    targets = list(tokens[1:])
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(
                data=[1.0] * len(targets), dtype="float32", shape=[len(targets)]
            ),
        },
    )


def mean_nll(output: types.ForwardBackwardOutput, batch: Sequence[types.Datum]) -> float:
    """Weighted mean negative log-likelihood per target token of one batch.

    Raises:
        InvalidArgument: The server's outputs lack per-token ``logprobs`` or do not match
            the batch.
    """
    if len(output.loss_fn_outputs) != len(batch):
        raise InvalidArgument(
            "loss_fn_outputs", f"{len(output.loss_fn_outputs)} outputs for {len(batch)} datums"
        )
    total = weight_sum = 0.0
    for record, datum in zip(output.loss_fn_outputs, batch, strict=True):
        if "logprobs" not in record:
            raise InvalidArgument("loss_fn_outputs", "no per-token logprobs in the result")
        logprobs = record["logprobs"].data
        weights = datum.loss_fn_inputs["weights"].data
        if len(logprobs) != len(weights):
            raise InvalidArgument("loss_fn_outputs.logprobs", "length differs from the weights")
        total -= sum(float(lp) * float(w) for lp, w in zip(logprobs, weights, strict=True))
        weight_sum += sum(float(w) for w in weights)
    return total / weight_sum if weight_sum else math.nan


class Batches:
    """Batches from shuffled passes over the data; no index twice within a batch.

    Args:
        size: Examples per batch (at most the number of examples).
        count: Number of examples.
        rng: Source of the shuffles.
    """

    def __init__(self, *, size: int, count: int, rng: random.Random) -> None:
        if not 1 <= size <= count:
            raise InvalidArgument("batch_size", f"must be in [1, {count}] (distinct texts)")
        self._size, self._count, self._rng = size, count, rng
        self._order: list[int] = []

    def next(self) -> list[int]:
        """Indices of the next batch."""
        batch, self._order = self._order[: self._size], self._order[self._size :]
        if len(batch) < self._size:
            # The pass ran out: finish the batch from a fresh shuffled pass, skipping the
            # indices already in it; the rest of that pass is served next.
            fresh = list(range(self._count))
            self._rng.shuffle(fresh)
            taken = set(batch)
            head = [i for i in fresh if i not in taken][: self._size - len(batch)]
            chosen = set(head)
            batch += head
            self._order = [i for i in fresh if i not in chosen]
        return batch


@dataclass(frozen=True)
class StepRecord:
    """What one step reported.

    Attributes:
        step: The client's step count after it.
        loss: Mean NLL per target token of its batch (before the update).
        epsilon: epsilon spent after it (inf for a non-private client).
    """

    step: int
    loss: float
    epsilon: float


def train(
    training_client: TrainingClient,
    datums: Sequence[types.Datum],
    *,
    steps: int,
    batches: Batches,
    adam_params: types.AdamParams,
    out: TextIO,
    progress: TrainingProgress,
) -> list[StepRecord]:
    """Run ``steps`` forward_backward + optim_step pairs, printing each.

    Each step's line goes to ``out``; ``progress`` draws the live bar (loss and ε) and
    writes the metrics file if it has one. The caller closes ``progress``.

    Returns:
        One record per step.

    Raises:
        BudgetExhausted: A step was refused (the steps before it were applied).
    """
    records: list[StepRecord] = []
    for index in range(steps):
        batch = [datums[i] for i in batches.next()]
        forward_backward = training_client.forward_backward(batch, "cross_entropy")
        optim = training_client.optim_step(adam_params)
        loss = mean_nll(forward_backward.result(), batch)
        result = optim.result()
        epsilon = result.privacy_spent.epsilon if result.privacy_spent else math.inf
        record = StepRecord(step=result.step, loss=loss, epsilon=epsilon)
        records.append(record)
        progress.write(
            f"step {index + 1:>4}/{steps}  loss {loss:.4f}  ε {format_epsilon(epsilon)}", out
        )
        out.flush()
        progress.update(loss=loss, epsilon=epsilon, optim=result)
    return records


def describe_privacy(spent: types.PrivacySpent) -> str:
    """One line stating the privacy spent."""
    if not spent.private:
        return "privacy spent: none guaranteed (non-private client: no clipping, no noise)"
    budget = f", budget ε ≤ {spent.epsilon_budget:g}" if spent.epsilon_budget else ""
    return (
        f"privacy spent: ε = {spent.epsilon:.4f} at δ = {spent.delta:g} "
        f"({spent.accountant}, {spent.steps} steps, σ = {spent.noise_multiplier:.4f}, "
        f"client-supplied batches: no subsampling amplification{budget})"
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to the ``tensafe`` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="DP fine-tune a LoRA adapter on a JSONL file of texts",
        description=__doc__.split("\n\n")[1].replace("``", "") if __doc__ else None,
    )
    parser.add_argument("data", type=Path, help='JSONL file of {"text": ...} records')
    parser.add_argument("--base-model", required=True, help="a base model the server lists")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="folder of the base model's tokenizer (default: $TENSAFE_BASE_MODELS_DIR/"
        "<base model>, or the connection file's base_models_dir)",
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per step (default 8)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam lr")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--max-length", type=int, default=128, help="input tokens per text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    dp = parser.add_argument_group("differential privacy (on unless --non-private)")
    noise = dp.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, help="sigma (default 1.0)")
    noise.add_argument("--target-epsilon", type=float, help="solve sigma for this ε over --steps")
    dp.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    dp.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    dp.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    dp.add_argument("--epsilon-budget", type=float, help="refuse steps beyond this ε")
    dp.add_argument(
        "--non-private", action="store_true", help="train WITHOUT DP (explicit opt-out)"
    )
    parser.add_argument("--save-state", metavar="NAME", help="save a checkpoint at the end")
    parser.add_argument(
        "--metrics-file",
        type=Path,
        metavar="FILE",
        help="write one JSON line per step (step, loss, epsilon, ...); "
        "draw it with: tensafe plot FILE --out run.png",
    )
    parser.add_argument("--base-url", help="trainer address (default: connection file)")
    parser.add_argument("--connection-file", help="default: .tensafe/connection.json")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``tensafe train``."""
    from tensafe.tinker import ServiceClient, types

    err = sys.stderr
    if args.steps < 1:
        print("tensafe train: --steps must be at least 1", file=err)
        return 2
    dp_options: dict[str, Any] = {}
    if args.non_private:
        if args.noise_multiplier is not None or args.target_epsilon is not None:
            print("tensafe train: --non-private contradicts the DP options", file=err)
            return 2
        dp_options["private"] = False
    else:
        dp_options.update(
            max_grad_norm=args.max_grad_norm,
            delta=args.delta,
            accountant=args.accountant,
            epsilon_budget=args.epsilon_budget,
        )
        if args.target_epsilon is not None:
            dp_options.update(target_epsilon=args.target_epsilon, planned_steps=args.steps)
        elif args.noise_multiplier is not None:
            dp_options["dp_noise_multiplier"] = args.noise_multiplier
    try:
        texts = read_texts(args.data)
        service = ServiceClient(base_url=args.base_url, connection_file=args.connection_file)
    except (OSError, TenSafeError) as exc:
        print(f"tensafe train: {exc}", file=err)
        return 2
    with service:
        try:
            client = service.create_lora_training_client(
                base_model=args.base_model,
                rank=args.rank,
                tokenizer_dir=args.tokenizer,
                **dp_options,
            )
            tokenizer = client.get_tokenizer()
            corpus = build_corpus(texts, tokenizer.encode, max_length=args.max_length)
            datums = [to_datum(tokens) for tokens in corpus.sequences]
            batches = Batches(size=args.batch_size, count=len(datums), rng=random.Random(args.seed))
        except TenSafeError as exc:
            print(f"tensafe train: {exc}", file=err)
            return 2
        mode = "DP-SGD" if client.private else "NON-PRIVATE"
        print(
            f"training client {client.model_id} on {args.base_model} ({mode}); "
            f"{len(datums)} texts ({corpus.too_short} too short, {corpus.duplicates} "
            f"duplicates dropped), {args.steps} steps of {args.batch_size}",
        )
        code = 0
        try:
            with TrainingProgress(
                args.steps, stream=err, metrics_file=args.metrics_file
            ) as progress:
                train(
                    client,
                    datums,
                    steps=args.steps,
                    batches=batches,
                    adam_params=types.AdamParams(learning_rate=args.learning_rate),
                    out=sys.stdout,
                    progress=progress,
                )
        except BudgetExhausted as exc:
            print(f"\ntensafe train: stopped, privacy budget exhausted: {exc.message}", file=err)
            code = 3
        except (TenSafeError, OSError) as exc:
            print(f"\ntensafe train: {exc}", file=err)
            return 2
        if args.save_state:
            saved = client.save_state(args.save_state).result()
            print(f"checkpoint: {saved.path} (step {saved.step})")
        print(describe_privacy(client.get_privacy_spent()))
        return code
