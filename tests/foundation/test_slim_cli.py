"""The slim install's CLI: no heavy import at start-up, clear messages naming the extra,
``--version``, help without markup, the plot a user looks at, the built-in base model,
and the wrong-model error naming the models there are."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensafe.client import base_models
from tensafe.client.cli import build_parser, main
from tensafe.client.plot_cli import EPSILON_COLOR, LOSS_COLOR
from testkit.docs import DOC_FILES, python_blocks

HEAVY = ("torch", "transformers", "peft", "opacus", "seal", "matplotlib", "dp_accounting")

# Makes the named top-level modules unimportable in a child interpreter, as they are in
# an install without the extra that brings them.
_BLOCK = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _python(code: str, *, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    prelude = _BLOCK.format(blocked=set(blocked)) if blocked else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_sdk_and_clients_load_no_heavy_module() -> None:
    probe = _python(
        "import sys\n"
        "import tensafe.client.cli as cli, tensafe.tinker, tensafe.client.registry\n"
        "import tensafe.client.progress, tensafe.client.auth, tensafe.client.demo\n"
        "cli.build_parser()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["demo", "--connection-file", "/nonexistent.json"], "trainer"),
        (["tiny-model", "/tmp/never-written"], "trainer"),
        (["up", "--data-dir", "/tmp/never-started"], "trainer"),
    ],
)
def test_a_command_without_its_extra_names_it(argv: list[str], extra: str) -> None:
    run = _python(
        f"from tensafe.client.cli import main\nraise SystemExit(main({argv!r}))",
        blocked=("torch", "transformers", "peft", "seal"),
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        f"tensafe {argv[0]} needs the [{extra}] extra (no module named 'torch'): "
        f"pip install 'tensafe[{extra}]'"
    )
    assert "Traceback" not in run.stderr


def test_plot_without_matplotlib_names_the_plot_extra(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "epsilon": 1.0}) + "\n")
    run = _python(
        "from tensafe.client.cli import main\n"
        f"raise SystemExit(main(['plot', {str(metrics)!r}, '--out', 'x.png']))",
        blocked=("matplotlib",),
    )
    assert run.returncode == 2
    assert "tensafe plot needs the [plot] extra" in run.stderr
    assert "pip install 'tensafe[plot]'" in run.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tensafe {version('tensafe')}"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_no_help_text_shows_raw_markup() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) > 20  # every command and sub-command is walked
    for parser in parsers:
        text = parser.format_help()
        for markup in ("``", "`", ":func:", ":class:", ":mod:"):
            assert markup not in text, f"{parser.prog}: {markup!r} in its help"


def _read_png(path: Path) -> np.ndarray:
    from matplotlib import image

    return np.asarray(image.imread(path))


def _has_colour(pixels: np.ndarray, hex_colour: str) -> int:
    target = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    close = np.all(np.abs(pixels[..., :3] - target) < 0.02, axis=-1)
    return int(close.sum())


def test_plot_draws_loss_epsilon_and_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, "loss": 3.0 / s, "epsilon": 0.5 * s, "delta": 1e-5, "epsilon_budget": 8.0}
        for s in range(1, 13)
    ]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "plots" / "run.png"
    assert main(["plot", str(metrics), "--out", str(out)]) == 0
    assert "12 steps" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    pixels = _read_png(out)
    assert pixels.shape[:2] == (500, 700)
    assert float(pixels[..., :3].std()) > 0.05, "blank picture"
    # Both curves are drawn, each a few hundred pixels of its own colour.
    assert _has_colour(pixels, LOSS_COLOR) > 200
    assert _has_colour(pixels, EPSILON_COLOR) > 200


def test_plot_refuses_a_bad_metrics_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2}\nnot json\n')
    assert main(["plot", str(metrics), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{metrics}:2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_builtin_base_model_is_shipped_installed_atomically_and_kept(tmp_path: Path) -> None:
    shipped = base_models.builtin_model_dir()
    assert base_models.file_sha256(shipped / "model.safetensors") == (
        base_models.BUILTIN_WEIGHTS_SHA256
    )
    models = tmp_path / "models"
    assert not base_models.has_base_model(models)
    path, installed = base_models.ensure_builtin_base_model(models)
    assert installed and path == models / base_models.BUILTIN_MODEL
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in shipped.iterdir())
    assert [p.name for p in models.iterdir()] == [base_models.BUILTIN_MODEL]  # no staging left
    assert base_models.has_base_model(models)
    (path / "marker").write_text("the user's own")
    assert base_models.ensure_builtin_base_model(models) == (path, False)
    assert (path / "marker").exists()


def test_builtin_base_model_answers_in_the_pretraining_format() -> None:
    """The base side of the demo: a sum question gets a number and a full stop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensafe.client.demo import QUESTIONS, question

    path = base_models.builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    a, b = QUESTIONS[0]
    ids = tokenizer(question(a, b), return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.strip().rstrip(".").isdigit(), answer
    assert "sum" not in answer


def test_unknown_base_model_error_lists_the_models(tmp_path: Path) -> None:
    from tensafe.common.errors import NotFound
    from tensafe.trainer.base_models import BaseModelRegistry

    registry = BaseModelRegistry(tmp_path)
    with pytest.raises(NotFound, match="no base model is installed"):
        registry.get("llama-7b")
    base_models.ensure_builtin_base_model(tmp_path)
    with pytest.raises(NotFound) as info:
        registry.get("llama-7b")
    assert info.value.message == "base model 'llama-7b' not found (available: tiny-llama)"



def test_every_python_example_in_the_docs_is_marked_runnable_or_signature() -> None:
    found = {
        f"{path.name}:{line}": marker
        for path in DOC_FILES
        for marker, line, _ in python_blocks(path)
    }
    assert len(found) >= 5
    unmarked = [where for where, marker in found.items() if marker not in ("runnable", "signature")]
    assert not unmarked, f"mark these <!-- runnable --> or <!-- signature -->: {unmarked}"
    assert sum(marker == "runnable" for marker in found.values()) >= 2
