"""Build a tiny, real Llama-style causal LM and tokenizer for tests, demos and benches.

No model weights can be downloaded in the environments TenSafe is developed and tested
in, yet every code path must load its base model with ``from_pretrained`` exactly as a
user's model would be loaded. This module therefore *builds* a small model from a
``LlamaConfig`` (randomly initialised from an explicit seed), trains a byte-level BPE
tokenizer on a built-in English and arithmetic corpus with the ``tokenizers`` library,
and writes both with ``save_pretrained``. The result is an ordinary Hugging Face model
directory: ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load it.

The build is deterministic for a given seed and set of sizes: the same arguments give
byte-identical weight files, so :func:`weights_digest` identifies the base model (the
TGSP manifest records it as the base model's weights digest).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tensafe.common import model_folders
from tensafe.common.errors import FailedPrecondition, InvalidArgument
from tensafe.common.model_folders import weight_files

# Special-token strings (not secrets; the S105 rule keys on the word "token").
PAD_TOKEN = "<pad>"  # noqa: S105
BOS_TOKEN = "<s>"  # noqa: S105
EOS_TOKEN = "</s>"  # noqa: S105

# Special tokens come first so their ids are fixed: <pad>=0, <s>=1, </s>=2.
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)


# A small English corpus written for this module (public-domain style prose about the
# project's own subject), so tokenizer training needs no download.
_ENGLISH_CORPUS = """\
Privacy is the right to decide who learns what about you. When a model is trained on
private text, it can remember rare phrases and repeat them later. Differential privacy
bounds how much any single example can change what the model learns. The idea is simple:
clip the influence of each example, then add noise that hides whether the example was
there at all. The noise is calibrated to the clipping norm, and an accountant adds up the
privacy cost of every step.

A low-rank adapter changes a large model by adding a small product of two matrices to a
few of its layers. The base model stays frozen. Only the adapter is trained, so the state
that must be saved after every step is small: the two matrices of each adapted layer,
the optimizer moments, and the step counter. Small state makes it cheap to checkpoint
often, and a worker that stops can be replaced by another that resumes from the last
checkpoint without repeating a step.

The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. The early bird catches the worm, but the second mouse gets the cheese. All
that glitters is not gold. Actions speak louder than words. Knowledge is power, and
power shared is power multiplied. Fortune favours the prepared mind. Where there is a
will, there is a way. Better late than never, but never late is better.

The river ran past the old mill and under the stone bridge. In spring the water rose and
carried branches from the hills; in summer it slowed and the children waded across to
the island where the herons stood. The miller kept a ledger of every sack of grain, the
day it came, the day it left, and the name of the farmer who brought it. Nobody else was
allowed to read the ledger, and the miller locked it in a drawer every night.

Encryption turns a message into a form that only the holder of a key can read. With
homomorphic encryption a server can add and multiply encrypted numbers without ever
seeing them. The client keeps the secret key, sends encrypted activations, and receives
an encrypted answer that only it can decrypt. Each multiplication consumes a level of
the ciphertext, and each rotation needs a key that the client prepared in advance.

Good software tells you clearly when something is wrong. It does not pretend to work
when a file is missing, and it does not return made up answers. It names the setting
that is wrong, explains what was expected, and stops. Tests run the real thing on a
small scale, so that the same code that passes the tests is the code that runs in
production.

Mathematics is the language of patterns. Two plus two is four. Three times seven is
twenty one. Ten minus four is six. The square of nine is eighty one. Half of one hundred
is fifty. A prime number has no divisors other than one and itself: two, three, five,
seven, eleven, thirteen, seventeen, nineteen, twenty three, twenty nine.

The library opened at nine in the morning. Students came in with their notebooks and
sat by the windows. The librarian stamped the books, answered questions, and reminded
everyone to speak quietly. In the evening the lights were dimmed, the doors were locked,
and the reading room was silent until the next day.
"""

_ARITHMETIC_SENTENCES = 600
_ARITHMETIC_CORPUS_SEED = 20240501


def _arithmetic_lines() -> Iterator[str]:
    """Yield short arithmetic sentences; a fixed seed keeps the tokenizer reproducible."""
    rng = random.Random(_ARITHMETIC_CORPUS_SEED)
    templates = (
        "{a} plus {b} is {s}.",
        "{a} + {b} = {s}",
        "The sum of {a} and {b} is {s}.",
        "{s} minus {b} is {a}.",
        "{a} times {c} equals {p}.",
        "Question: what is {a} + {b}? Answer: {s}.",
    )
    for _ in range(_ARITHMETIC_SENTENCES):
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 12)
        template = templates[rng.randrange(len(templates))]
        yield template.format(a=a, b=b, c=c, s=a + b, p=a * c)


def tiny_corpus() -> list[str]:
    """Return the built-in training corpus, one line per entry.

    Returns:
        The English paragraphs split into lines followed by generated arithmetic
        sentences. Tests and demos also use it as a small training set.
    """
    english = [line for line in _ENGLISH_CORPUS.splitlines() if line.strip()]
    return english + list(_arithmetic_lines())


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the built-in corpus.

    Byte-level BPE (as in GPT-2) starts from the 256 byte symbols, so every string can
    be encoded without an unknown token.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Llama-style: a BOS token starts every encoded text.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tokenizer


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise InvalidArgument(field, message)


def build_tiny_model(
    out_dir: Path | str,
    *,
    seed: int,
    vocab_size: int = 768,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
) -> Path:
    """Build, initialise and save a tiny Llama-style causal LM with its tokenizer.

    Args:
        out_dir: Directory to write; created if missing. Existing files of the same
            names are overwritten.
        seed: Seeds the weight initialisation; the same seed and sizes give
            byte-identical weights.
        vocab_size: Target tokenizer vocabulary size (256..4096). BPE stops early when
            the corpus has no more pairs to merge; the model's vocabulary is the size
            actually reached.
        hidden_size: Model width; must be divisible by ``num_heads``.
        num_layers: Number of decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention); defaults to
            ``num_heads``.
        intermediate_size: MLP width; defaults to ``round(8/3 * hidden_size)`` rounded
            up to a multiple of 8, the Llama ratio.
        max_position_embeddings: Longest sequence the model accepts.

    Returns:
        The output directory, loadable with ``AutoModelForCausalLM.from_pretrained``
        and ``AutoTokenizer.from_pretrained``.

    Raises:
        InvalidArgument: A size is out of range or inconsistent.
    """
    _require(256 <= vocab_size <= 4096, "vocab_size", "must be in 256..4096")
    _require(hidden_size >= 8, "hidden_size", "must be at least 8")
    _require(num_layers >= 1, "num_layers", "must be at least 1")
    _require(num_heads >= 1, "num_heads", "must be at least 1")
    _require(hidden_size % num_heads == 0, "num_heads", "must divide hidden_size")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _require(kv_heads >= 1 and num_heads % kv_heads == 0, "num_kv_heads", "must divide num_heads")
    _require((hidden_size // num_heads) % 2 == 0, "num_heads", "head size must be even (RoPE)")
    mlp_size = intermediate_size if intermediate_size is not None else -(-hidden_size * 8 // 3)
    mlp_size = -(-mlp_size // 8) * 8
    _require(mlp_size >= 1, "intermediate_size", "must be positive")
    _require(max_position_embeddings >= 2, "max_position_embeddings", "must be at least 2")

    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer_core = _train_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer_core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_position_embeddings,
    )

    config = LlamaConfig(
        vocab_size=tokenizer_core.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=mlp_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer_core.token_to_id(PAD_TOKEN),
        bos_token_id=tokenizer_core.token_to_id(BOS_TOKEN),
        eos_token_id=tokenizer_core.token_to_id(EOS_TOKEN),
        tie_word_embeddings=False,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
    )
    # fork_rng keeps the caller's global RNG state untouched by the seeded initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # float32 regardless of the process's default dtype: the engine trains in it.
        model = nn.Module.float(LlamaForCausalLM(config))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def weights_digest(model_dir: Path | str) -> str:
    r"""Return the sha256 digest identifying a model directory's weights.

    For a single weights file it is that file's sha256 (as ``sha256sum`` prints it); for
    sharded weights it is the sha256 of the lines ``"<sha256>  <file name>\n"`` of every
    shard (those ``model.safetensors.index.json`` names, else every ``*.safetensors``
    file), sorted by name: :mod:`tensafe.common.model_folders`, which the trainer uses.

    Args:
        model_dir: A directory written by ``save_pretrained``.

    Returns:
        The lowercase hex digest.

    Raises:
        InvalidArgument: The directory holds no weights, or a shard its index names is
            missing.
    """
    try:
        files = weight_files(Path(model_dir), str(model_dir))
    except FailedPrecondition as error:
        raise InvalidArgument("model_dir", error.message) from error
    return model_folders.weights_digest(files)


def pretrain_tiny_model(out_dir: Path | str, *, steps: int = 300, seed: int = 0) -> Path:
    """Build a small tiny model and pretrain it briefly on the built-in public corpus.

    A randomly initialised model cannot put more than a few percent of probability on
    any token, so its generations are noise and LoRA on the transformer blocks cannot fix
    that in a few steps. This is pretraining in miniature: full-parameter, non-private
    training on public text (the built-in corpus), done locally before the model is
    registered as a base model. Used by the demo and the RLVR example; about 10 s.

    Args:
        out_dir: The base model folder to write (e.g. ``<base_models_dir>/tiny-llama``).
        steps: Adam steps of 32 corpus lines.
        seed: Seeds the initialisation and the batch order.

    Returns:
        ``out_dir`` as a path.
    """
    path = build_tiny_model(
        out_dir,
        seed=seed,
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = int(tokenizer.eos_token_id)
    lines = [[*tokenizer(line).input_ids, eos] for line in tiny_corpus()]
    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = generator.sample(lines, 32)
        width = max(len(line) for line in batch)
        ids = torch.tensor([line + [0] * (width - len(line)) for line in batch])
        mask = torch.tensor([[1] * len(line) + [0] * (width - len(line)) for line in batch])
        loss = model(
            input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path
