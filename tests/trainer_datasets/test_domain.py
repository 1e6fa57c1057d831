"""Domain pieces of server-held datasets: Poisson sampling, tokenisation, encryption."""

from __future__ import annotations

import json
import logging
import math
import stat
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tensafe.common.errors import FailedPrecondition, IntegrityError, InvalidArgument
from tensafe.trainer.domain.datasets.crypto import (
    DEV_KEK_RELATIVE,
    DatasetKeyring,
    decrypt_dataset,
    encrypt_dataset,
    keyring_from_settings,
)
from tensafe.trainer.domain.datasets.records import (
    RecordFormat,
    TokenizedDataset,
    Tokenizer,
    tokenize_jsonl,
)
from tensafe.trainer.domain.datasets.sampling import PoissonSampler, resolve_sample_rate

from .conftest import BASE_MODEL, CONTEXT


def test_poisson_inclusion_rate_and_batch_size_law() -> None:
    records, rate, steps = 200, 0.05, 2000
    sampler = PoissonSampler(records=records, sample_rate=rate)
    counts = np.zeros(records)
    sizes = []
    for _ in range(steps):
        batch = sampler.draw()
        assert np.all(np.diff(batch) > 0)  # each record at most once per step
        counts[batch] += 1
        sizes.append(len(batch))
    # Overall inclusion rate: within 5 standard errors of q.
    overall = counts.sum() / (records * steps)
    assert abs(overall - rate) < 5 * math.sqrt(rate * (1 - rate) / (records * steps))
    # Every record independently: each one's rate within 5 standard errors.
    per_record = counts / steps
    assert np.max(np.abs(per_record - rate)) < 5 * math.sqrt(rate * (1 - rate) / steps)
    # Batch sizes are Binomial(N, q): they vary (a fixed-size sampler has variance 0).
    expected_variance = records * rate * (1 - rate)
    assert 0.8 * expected_variance < np.var(sizes) < 1.2 * expected_variance
    assert sampler.expected_batch_size == pytest.approx(records * rate)


def test_unseeded_samplers_draw_independently() -> None:
    first = PoissonSampler(records=1000, sample_rate=0.5)
    second = PoissonSampler(records=1000, sample_rate=0.5)
    assert not np.array_equal(first.draw(), second.draw())


def test_rate_one_includes_every_record_and_tiny_rate_gives_empty_batches() -> None:
    assert list(PoissonSampler(records=7, sample_rate=1.0).draw()) == list(range(7))
    empty = PoissonSampler(records=5, sample_rate=1e-9)
    assert all(len(empty.draw()) == 0 for _ in range(100))


@pytest.mark.parametrize(
    ("sample_rate", "expected", "field"),
    [
        (0.0, None, "sample_rate"),
        (-0.1, None, "sample_rate"),
        (1.5, None, "sample_rate"),
        (math.nan, None, "sample_rate"),
        (None, 0.0, "expected_batch_size"),
        (None, 11.0, "expected_batch_size"),
        (None, None, "rate"),
        (0.5, 2.0, "rate"),
    ],
)
def test_bad_rates_are_refused(
    sample_rate: float | None, expected: float | None, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_sample_rate(sample_rate=sample_rate, expected_batch_size=expected, records=10)
    assert info.value.field == field


def test_rate_from_expected_batch_size() -> None:
    assert resolve_sample_rate(sample_rate=None, expected_batch_size=2.5, records=10) == 0.25
    assert resolve_sample_rate(sample_rate=1.0, expected_batch_size=None, records=10) == 1.0


@pytest.fixture(scope="module")
def tokenizer(base_models_dir: Path) -> Tokenizer:
    return Tokenizer(AutoTokenizer.from_pretrained(base_models_dir / BASE_MODEL))


def _jsonl(*records: object) -> bytes:
    return ("\n".join(json.dumps(record) for record in records) + "\n").encode()


def test_prompt_completion_trains_on_the_completion_only(tokenizer: Tokenizer) -> None:
    data = _jsonl(
        {"prompt": "12 + 7 =", "completion": " 19"}, {"prompt": "3 + 4 =", "completion": " 7"}
    )
    dataset = tokenize_jsonl(
        data,
        record_format=RecordFormat.PROMPT_COMPLETION,
        tokenizer=tokenizer,
        max_context_length=CONTEXT,
    )
    assert dataset.records == 2
    prompt = tokenizer.encode("12 + 7 =", special_tokens=True)
    completion = tokenizer.encode(" 19", special_tokens=False)
    assert dataset.record(0) == prompt + completion + tokenizer.eos
    model_input, inputs = dataset.datum(0)
    assert model_input == (prompt + completion + tokenizer.eos)[:-1]
    weights = inputs["weights"]
    targets = inputs["target_tokens"]
    trained = [target for target, weight in zip(targets, weights, strict=True) if weight == 1.0]
    assert trained == completion + tokenizer.eos
    assert sum(weights) == len(completion) + 1
    # The payload survives its byte form.
    again = TokenizedDataset.from_bytes(dataset.to_bytes())
    assert again.record(1) == dataset.record(1)
    assert again.datum(1) == dataset.datum(1)


def test_text_records_train_on_every_token(tokenizer: Tokenizer) -> None:
    dataset = tokenize_jsonl(
        _jsonl({"text": "the quick brown fox"}),
        record_format=RecordFormat.TEXT,
        tokenizer=tokenizer,
        max_context_length=CONTEXT,
    )
    _, inputs = dataset.datum(0)
    assert all(weight == 1.0 for weight in inputs["weights"])
    assert dataset.record(0)[-1] == tokenizer.eos[0]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "chunk"),
        (b"\n\n", "chunk"),
        (b"\xff\xfe", "chunk"),
        (_jsonl({"text": "fine"}, {"text": "word " * 200}), "records[2]"),
        (b'{"text": "fine"}\nnot json\n', "records[2]"),
        (_jsonl({"text": "fine"}, {"text": "x", "extra": 1}), "records[2]"),
        (_jsonl({"text": ""}), "records[1].text"),
        (_jsonl(["text"]), "records[1]"),
    ],
)
def test_bad_uploads_are_refused(tokenizer: Tokenizer, data: bytes, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        tokenize_jsonl(
            data, record_format=RecordFormat.TEXT, tokenizer=tokenizer, max_context_length=CONTEXT
        )
    assert info.value.field == field


def test_envelope_encryption_binds_tenant_and_dataset() -> None:
    keyring = DatasetKeyring(bytes(range(32)))
    wrapped, dek = keyring.new_tenant_key("tenant-a")
    assert keyring.unwrap("tenant-a", wrapped) == dek
    with pytest.raises(IntegrityError):
        keyring.unwrap("tenant-b", wrapped)
    with pytest.raises(FailedPrecondition):
        DatasetKeyring(bytes(32)).unwrap("tenant-a", wrapped)

    secret = b"the launch code is 0451"
    sealed = encrypt_dataset(dek, secret, tenant="tenant-a", dataset_id="d1", key_id=wrapped.key_id)
    assert secret not in sealed
    assert (
        decrypt_dataset(dek, sealed, tenant="tenant-a", dataset_id="d1", key_id=wrapped.key_id)
        == secret
    )
    with pytest.raises(IntegrityError):
        decrypt_dataset(dek, sealed, tenant="tenant-a", dataset_id="d2", key_id=wrapped.key_id)
    with pytest.raises(IntegrityError):
        decrypt_dataset(dek, sealed, tenant="tenant-b", dataset_id="d1", key_id=wrapped.key_id)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        decrypt_dataset(
            dek, bytes(tampered), tenant="tenant-a", dataset_id="d1", key_id=wrapped.key_id
        )
    # Two encryptions of the same records differ (fresh nonces).
    assert sealed != encrypt_dataset(
        dek, secret, tenant="tenant-a", dataset_id="d1", key_id=wrapped.key_id
    )


def test_kek_required_outside_dev_mode_and_created_explicitly_in_dev_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tensafe.common.errors import ConfigError

    with pytest.raises(ConfigError, match="TENSAFE_DATASET_KEK_FILE"):
        keyring_from_settings(kek_file=None, dev_mode=False, data_dir=tmp_path)
    assert not (tmp_path / DEV_KEK_RELATIVE).exists()
    with caplog.at_level(logging.WARNING):
        created = keyring_from_settings(kek_file=None, dev_mode=True, data_dir=tmp_path)
    assert created is not None
    path = tmp_path / DEV_KEK_RELATIVE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any(
        "dev mode" in record.getMessage() and str(path) in record.getMessage()
        for record in caplog.records
    )
    # A second process reads the same key instead of making another.
    again = keyring_from_settings(kek_file=None, dev_mode=True, data_dir=tmp_path)
    assert again is not None and again.kek_id == created.kek_id
    # An explicit file wins, and a malformed one is a configuration error.
    bad = tmp_path / "bad.kek"
    bad.write_text("not hex")
    with pytest.raises(ConfigError):
        keyring_from_settings(kek_file=bad, dev_mode=True, data_dir=tmp_path)
