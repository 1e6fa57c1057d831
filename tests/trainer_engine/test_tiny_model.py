"""The tiny model builder writes a real, deterministic Hugging Face model directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensafe.client.tiny_model import build_tiny_model, weights_digest
from tensafe.common.errors import InvalidArgument

SIZES = {"vocab_size": 384, "hidden_size": 32, "num_layers": 1, "num_heads": 2}


def test_model_and_tokenizer_load_through_auto_classes(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == 512
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>",
        "<s>",
        "</s>",
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.bos_token_id == 1 and model.config.eos_token_id == 2
    text = "The sum of 12 and 30 is 42."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) < len(text)  # BPE merged something
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level: any text round-trips, no unknown token.
    assert tokenizer.decode(tokenizer("naïve ünïcode ✓").input_ids[1:]) == "naïve ünïcode ✓"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", seed=7, **SIZES)
    again = build_tiny_model(tmp_path / "b", seed=7, **SIZES)
    other = build_tiny_model(tmp_path / "c", seed=8, **SIZES)
    assert weights_digest(first) == weights_digest(again)
    assert weights_digest(first) != weights_digest(other)
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    # The digest of a single weights file is its plain sha256 (as sha256sum prints it).
    files = list(first.glob("*.safetensors"))
    assert len(files) == 1
    assert weights_digest(first) == hashlib.sha256(files[0].read_bytes()).hexdigest()


def test_weights_digest_of_shards_and_of_no_weights(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"one")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"two")
    listing = "".join(
        f"{hashlib.sha256(data).hexdigest()}  model-0000{i}-of-00002.safetensors\n"
        for i, data in ((1, b"one"), (2, b"two"))
    )
    assert weights_digest(tmp_path) == hashlib.sha256(listing.encode()).hexdigest()
    with pytest.raises(InvalidArgument):
        weights_digest(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vocab_size": 100}, "vocab_size"),
        ({"hidden_size": 30, "num_heads": 4}, "num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": 3, "num_heads": 2}, "num_kv_heads"),
    ],
)
def test_bad_sizes_are_refused(tmp_path: Path, overrides: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build_tiny_model(tmp_path, seed=0, **{**SIZES, **overrides})
    assert raised.value.field == field
    assert not list(tmp_path.iterdir())
