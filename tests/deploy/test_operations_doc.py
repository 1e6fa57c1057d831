"""docs/operations.md's configuration reference is the one the config classes generate
(scripts/gen_config_reference.py), so a new or changed setting cannot go undocumented."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tensafe.common.config import describe
from tensafe.trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> Any:
    path = ROOT / "scripts" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_is_fresh() -> None:
    generator = _generator()
    text = (ROOT / "docs" / "operations.md").read_text()
    assert generator.updated(text) == text, "run python scripts/gen_config_reference.py"


def test_every_setting_is_in_the_reference_and_secrets_are_not_shown() -> None:
    reference = _generator().reference()
    for name, _, _ in describe(TrainerConfig):
        assert f"| `{name}` |" in reference, name
    assert "| `TENSAFE_SIGNING_KEY_ENCRYPTION_KEY` | `(secret)` |" in reference
    # The trainer makes the NATS URL required: the override is listed under it.
    trainer_part = reference.split("### trainer", 1)[1].split("###", 1)[0]
    assert "| `TENSAFE_NATS_URL` | `(required)` |" in trainer_part
