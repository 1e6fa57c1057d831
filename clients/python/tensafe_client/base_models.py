"""The built-in base model: a tiny pretrained Llama-style model shipped in the package.

No weights can be downloaded at run time, and pretraining even a tiny model takes
minutes on a busy 2-core machine, so a first user would wait for it. The package ships
one small model instead (``tiny-llama``: 2 layers, width 64, a 512-token byte-level BPE
vocabulary, about 160 k parameters, 0.7 MB), built once by
``python scripts/build_base_model.py`` with
:func:`tensafe.client.tiny_model.pretrain_tiny_model` (public built-in corpus,
non-private full-parameter training, fixed seed, one thread). ``tensafe up`` copies it
into a fresh data dir's base models folder, and ``tensafe demo`` fine-tunes it.

Copying needs nothing but the standard library, so the slim install can do it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tensafe.common.model_folders import file_sha256, model_names

__all__ = [
    "BUILTIN_MODEL",
    "BUILTIN_MODELS_DIR",
    "BUILTIN_WEIGHTS_SHA256",
    "builtin_model_dir",
    "ensure_builtin_base_model",
    "file_sha256",
    "has_base_model",
]

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent / "builtin_models"
"""Where the package keeps its built-in models."""

BUILTIN_MODEL = "tiny-llama"
"""The built-in model's name (its folder under a base models dir)."""

BUILTIN_WEIGHTS_SHA256 = "ba616d73a0c54954f3765dd1344ea2cb27e3152777b0c36c89a9c03268976abe"
"""sha256 of the built-in model's ``model.safetensors`` (what TGSP manifests record)."""


def builtin_model_dir(name: str = BUILTIN_MODEL) -> Path:
    """The packaged folder of a built-in model.

    Raises:
        FileNotFoundError: No built-in model of that name.
    """
    path = BUILTIN_MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no built-in base model {name!r} in {BUILTIN_MODELS_DIR}")
    return path


def has_base_model(models_dir: Path) -> bool:
    """Whether a base models dir holds any model, in any layout the trainer reads (a
    plain or ``org/name`` folder, or a hub cache entry: :mod:`tensafe.common.model_folders`)."""
    return bool(model_names(models_dir))


def ensure_builtin_base_model(models_dir: Path, name: str = BUILTIN_MODEL) -> tuple[Path, bool]:
    """Install the built-in model as ``models_dir/name`` unless a model of that name is there.

    The copy is written to a temporary sibling folder and renamed into place, so a
    trainer listing the folder never sees a half-written model.

    Returns:
        The model folder, and whether it was installed by this call.

    Raises:
        FileNotFoundError: No built-in model of that name.
    """
    target = models_dir / name
    if (target / "config.json").is_file():
        return target, False
    source = builtin_model_dir(name)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        for file in sorted(source.iterdir()):
            if file.is_file():
                shutil.copyfile(file, staging / file.name)
        staging.chmod(0o755)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, True
