"""Base model folders (tensafe.common.model_folders and the trainer's registry on it):
nested names, hub cache entries, sharded weights, and the names no folder may answer to.
Real tiny models saved by transformers; no model is faked."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tensafe.client.base_models import has_base_model
from tensafe.client.tiny_model import build_tiny_model, weights_digest
from tensafe.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tensafe.common.model_folders import (
    check_model_name,
    model_folder,
    model_names,
    weight_files,
)
from tensafe.tgsp.manifest import BaseModelRef
from tensafe.trainer.base_models import BaseModelRegistry
from testkit.models import build_tiny_llama, save_as_hub_cache, save_sharded

REVISION = "3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a"
OLD_REVISION = "0" * 40


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("source") / "model")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    """Every layout side by side, as an operator would mount them."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(source, root / "plain")
    shutil.copytree(source, root / "acme" / "nested")
    save_sharded(source, root / "acme" / "sharded", max_shard_size="100KB")
    # An older snapshot of another model under the same cache entry: refs/main decides.
    other = build_tiny_model(
        root.parent / "other", seed=5, vocab_size=512, hidden_size=32, num_layers=1, num_heads=2
    )
    save_as_hub_cache(other, root, "hf-org/cached", OLD_REVISION)
    save_as_hub_cache(source, root, "hf-org/cached", REVISION)
    save_as_hub_cache(source, root, "single", REVISION)
    # Not models: a staging folder, an org folder without models, loose files.
    (root / ".staging-x").mkdir()
    shutil.copyfile(source / "config.json", root / ".staging-x" / "config.json")
    (root / "empty-org" / "notes").mkdir(parents=True)
    (root / "README").write_text("models")
    return root


def test_every_layout_is_listed_by_its_hub_name(root: Path) -> None:
    assert model_names(root) == [
        "acme/nested",
        "acme/sharded",
        "hf-org/cached",
        "plain",
        "single",
    ]
    assert has_base_model(root)
    assert not has_base_model(root / "empty-org")


def test_a_hub_cache_entry_resolves_to_the_snapshot_refs_main_names(
    root: Path, source: Path
) -> None:
    folder = model_folder(root, "hf-org/cached")
    assert folder == root / "models--hf-org--cached" / "snapshots" / REVISION
    assert (folder / "model.safetensors").is_symlink()
    info = BaseModelRegistry(root).get("hf-org/cached")
    assert info.path == folder
    # Digest of the blob behind the symlink: the same weights as the plain copy, and not
    # the older snapshot's.
    assert info.weights_sha256 == weights_digest(source)
    old = root / "models--hf-org--cached" / "snapshots" / OLD_REVISION
    assert info.weights_sha256 != weights_digest(old)


def test_sharded_weights_follow_the_index(root: Path, source: Path) -> None:
    folder = root / "acme" / "sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert [f.name for f in weight_files(folder, "acme/sharded")] == shards
    listing = "".join(
        f"{hashlib.sha256((folder / s).read_bytes()).hexdigest()}  {s}\n" for s in shards
    )
    expected = hashlib.sha256(listing.encode()).hexdigest()
    info = BaseModelRegistry(root).get("acme/sharded")
    assert info.weights_sha256 == expected == weights_digest(folder)
    assert info.vocab_size == BaseModelRegistry(root).get("plain").vocab_size


def test_a_file_the_index_does_not_name_is_not_weights(tmp_path: Path, root: Path) -> None:
    folder = shutil.copytree(root / "acme" / "sharded", tmp_path / "m")
    before = weights_digest(folder)
    (folder / "consolidated.safetensors").write_bytes(b"not a shard")
    assert weights_digest(folder) == before


def test_a_missing_shard_is_a_failed_precondition_naming_it(tmp_path: Path, root: Path) -> None:
    models = tmp_path / "models"
    folder = shutil.copytree(root / "acme" / "sharded", models / "acme" / "broken")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FailedPrecondition, match=f"shard {shard.name} named by"):
        BaseModelRegistry(models).get("acme/broken")
    with pytest.raises(InvalidArgument, match=shard.name):
        weights_digest(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../x"}}')
    with pytest.raises(FailedPrecondition, match="not a file of the folder"):
        BaseModelRegistry(models).get("acme/broken")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../plain",
        "acme/../plain",
        "/plain",
        "acme/nested/extra",
        "a..b",
        ".hidden",
        "acme/",
        "/",
        "acme\\nested",
        "sp ace",
        "é",
        "x" * 129,
        "acme//nested",
    ],
)
def test_unsafe_names_are_invalid_arguments(root: Path, name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        BaseModelRegistry(root).get(name)
    assert info.value.field == "base_model"


@pytest.mark.parametrize(
    "name", ["missing", "acme/missing", "empty-org/notes", "plain/x", "models--hf-org--cached"]
)
def test_well_formed_unknown_names_are_not_found_and_list_what_is_there(
    root: Path, name: str
) -> None:
    with pytest.raises(NotFound, match=r"available: acme/nested, acme/sharded, hf-org/cached"):
        BaseModelRegistry(root).get(name)


def test_a_cache_entry_without_a_usable_snapshot_says_why(tmp_path: Path, source: Path) -> None:
    save_as_hub_cache(source, tmp_path, "org/model", REVISION)
    entry = tmp_path / "models--org--model"
    (entry / "refs" / "main").write_text("f" * 40)
    with pytest.raises(FailedPrecondition, match=r"not in .*incomplete download"):
        model_folder(tmp_path, "org/model")
    (entry / "refs" / "main").write_text("../../escape")
    with pytest.raises(FailedPrecondition, match="does not hold a revision"):
        model_folder(tmp_path, "org/model")
    # Without refs/main, the only snapshot is the one; with two, none is guessed.
    (entry / "refs" / "main").unlink()
    assert model_folder(tmp_path, "org/model") == entry / "snapshots" / REVISION
    (entry / "snapshots" / OLD_REVISION).mkdir()
    with pytest.raises(FailedPrecondition, match="no refs/main and 2 snapshots"):
        model_folder(tmp_path, "org/model")


def test_names_are_checked_component_by_component() -> None:
    assert check_model_name("meta-llama/Llama-3.2-1B") == ("meta-llama", "Llama-3.2-1B")
    assert check_model_name("tiny-llama") == ("tiny-llama",)
    # A TGSP manifest records the nested name as the base model id.
    ref = BaseModelRef(model_id="meta-llama/Llama-3.2-1B", weights_sha256="a" * 64)
    assert ref.model_id == "meta-llama/Llama-3.2-1B"


def test_peek_answers_from_memory_only_within_the_recheck_window(root: Path) -> None:
    registry = BaseModelRegistry(root, recheck_seconds=60.0)
    assert registry.peek("plain") is None, "nothing read yet"
    info = registry.get("plain")
    assert registry.peek("plain") is info
    assert registry.peek("acme/nested") is None
    stale = BaseModelRegistry(root, recheck_seconds=0.0)
    stale.get("plain")
    assert stale.peek("plain") is None, "past the window the caller must call get"
