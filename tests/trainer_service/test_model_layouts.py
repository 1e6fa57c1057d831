"""Base models in every folder layout, through the service: a nested ``org/name``
folder, a Hugging Face hub cache entry (symlinked blobs, refs/main) and sharded
safetensors each train one DP step end to end (API -> JetStream -> the worker's
engine load -> commit), and names that could leave the models folder are refused."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from tensafe.client.tiny_model import weights_digest
from tensafe.common.model_folders import model_folder
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from testkit.models import BASE_MODEL, build_tiny_llama, save_as_hub_cache, save_sharded

from .helpers import corpus_sequences, dp_config, expect_code, forward_backward, optim_step

LAYOUTS = ("acme/tiny-nested", "hf-org/tiny-cached", "acme/tiny-sharded")
REVISION = "9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d"


@pytest.fixture(scope="module")
def base_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Overrides the package's fixture: the test model in every layout."""
    root = tmp_path_factory.mktemp("layouts")
    source = build_tiny_llama(root / BASE_MODEL)
    shutil.copytree(source, root / "acme" / "tiny-nested")
    save_as_hub_cache(source, root, "hf-org/tiny-cached", REVISION)
    save_sharded(source, root / "acme" / "tiny-sharded", max_shard_size="100KB")
    return root


async def _create(stack: Any, base_model: str) -> pb.TrainingClient:
    response = await stack.trainer.CreateTrainingClient(
        pb.CreateTrainingClientRequest(
            base_model=base_model,
            lora=pb.LoraConfig(rank=4, alpha=8, seed=3),
            dp=dp_config(noise_multiplier=1.0),
        ),
        metadata=stack.auth,
    )
    return response.training_client


async def test_each_layout_trains_a_dp_step_end_to_end(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    listed = (
        await stack.trainer.ListBaseModels(pb.ListBaseModelsRequest(), metadata=stack.auth)
    ).base_models
    by_name = {model.name: model for model in listed}
    assert set(by_name) == {BASE_MODEL, *LAYOUTS}
    # The nested and cached copies hold the very same weights file; the sharded one the
    # same tensors in several files, so a different digest (the shard listing's).
    single = weights_digest(base_models_dir / BASE_MODEL)
    assert by_name["acme/tiny-nested"].weights_sha256 == single
    assert by_name["hf-org/tiny-cached"].weights_sha256 == single
    assert by_name["acme/tiny-sharded"].weights_sha256 == weights_digest(
        base_models_dir / "acme" / "tiny-sharded"
    )
    assert by_name["acme/tiny-sharded"].weights_sha256 != single

    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    losses = {}
    for name in LAYOUTS:
        client = await _create(stack, name)
        assert client.base_model == name
        result = await forward_backward(stack, client.id, batch)
        losses[name] = result.metrics["loss:sum"]
        step = await optim_step(stack, client.id, learning_rate=1e-2)
        assert step.step == 1
        assert step.privacy_spent.epsilon > 0
    # Same weights, same adapter seed, same data: the same loss in every layout (a
    # layout that loaded other weights, e.g. the wrong snapshot, would differ).
    assert len({round(loss, 4) for loss in losses.values()}) == 1, losses


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../tiny-llama", grpc.StatusCode.INVALID_ARGUMENT),
        ("acme/../tiny-llama", grpc.StatusCode.INVALID_ARGUMENT),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT),
        ("acme/tiny-nested/more", grpc.StatusCode.INVALID_ARGUMENT),
        ("acme/missing", grpc.StatusCode.NOT_FOUND),
        ("models--hf-org--tiny-cached", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_names_outside_the_layouts_are_refused(
    make_stack: Any, name: str, code: grpc.StatusCode
) -> None:
    stack = await make_stack(worker=False)
    error = await expect_code(_create(stack, name), code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "base_model" in (error.details() or "")


async def test_a_missing_shard_fails_create_with_failed_precondition(
    make_stack: Any, base_models_dir: Path
) -> None:
    broken = shutil.copytree(
        base_models_dir / "acme" / "tiny-sharded", base_models_dir / "acme" / "broken"
    )
    try:
        shard = sorted(broken.glob("model-*.safetensors"))[0]
        shard.unlink()
        stack = await make_stack(worker=False)
        error = await expect_code(
            _create(stack, "acme/broken"), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert shard.name in (error.details() or "")
        assert model_folder(base_models_dir, "acme/broken") == broken
    finally:
        shutil.rmtree(broken)
