"""A new user's first hour, against a real `tensafe up`.

- The slim install (`pip install .`, no extras, in a fresh venv) runs `tensafe --version`,
  `--help`, `status`, `admin create-tenant --trainer`, and a `tensafe.tinker` training
  step as that tenant's trainer (not the platform admin), with no torch installed.
- `tensafe up` installs the built-in pretrained base model into a fresh data dir, and
  `tensafe demo` shows the adapter changing the answers, HE-LoRA equal to plaintext
  LoRA, and writes the plot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="session")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with `pip install .` and no extras (pip's cache makes it quick)."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """`tensafe up` in a fresh data dir (the dev install runs the services)."""
    data_dir = tmp_path_factory.mktemp("first-hour") / "state"
    log = data_dir.parent / "up.log"
    with log.open("wb") as output:
        up = subprocess.Popen(
            [sys.executable, "-m", "tensafe.client.cli", "up", "--data-dir", str(data_dir)],
            cwd=data_dir.parent,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            connection_file = data_dir / "connection.json"
            deadline = time.monotonic() + 300
            while not connection_file.exists():
                assert up.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield connection_file, log.read_text()
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with the caller's environment less any API key, unless ``env``."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "TENSAFE_API_KEY"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)


_SLIM_TRAINING_STEP = textwrap.dedent(
    """
    import json, sys
    from tensafe import tinker
    from tensafe.tinker import types
    from tensafe.common.errors import InvalidArgument
    from tensafe.client.extras import MissingExtra

    connection_file, api_key = sys.argv[1], sys.argv[2]
    try:
        tinker.ServiceClient(api_key="  ", connection_file=connection_file)
    except InvalidArgument as error:
        print("empty key refused:", error.field)
    service = tinker.ServiceClient(api_key=api_key, connection_file=connection_file)
    client = service.create_lora_training_client(
        base_model="tiny-llama", rank=4, target_epsilon=8.0, planned_steps=4
    )
    tokens = [1, 40, 41, 42, 43, 44, 45]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    client.forward_backward([datum], loss_fn="cross_entropy").result()
    try:
        client.get_tokenizer()
    except MissingExtra as error:
        print("tokenizer:", error.message)
    step = client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    heavy = sorted(m for m in ("torch", "transformers", "seal") if m in sys.modules)
    print(json.dumps({"step": step.step, "epsilon": step.privacy_spent.epsilon,
                      "heavy": heavy}))
    """
)


def test_slim_install_runs_the_cli_and_a_training_step(
    slim_venv: Path, stack: tuple[Path, str]
) -> None:
    connection_file, _ = stack
    bin_dir = slim_venv / "bin"
    python = str(bin_dir / "python")
    assert _run([python, "-c", "import torch"]).returncode != 0, "the slim venv has torch"

    version = _run([str(bin_dir / "tensafe"), "--version"])
    assert version.returncode == 0 and version.stdout.startswith("tensafe "), version.stderr
    help_text = _run([str(bin_dir / "tensafe"), "--help"])
    assert help_text.returncode == 0 and "status" in help_text.stdout, help_text.stderr
    assert "`" not in help_text.stdout

    status = _run([str(bin_dir / "tensafe"), "status", "--connection-file", str(connection_file)])
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("SERVING") == 4

    # The quickstart's identity: a tenant's trainer, made by the admin in one command.
    made = _run(
        [
            str(bin_dir / "tensafe"),
            "admin",
            "create-tenant",
            "first-hour",
            "--trainer",
            "ann",
            "--connection-file",
            str(connection_file),
        ]
    )
    assert made.returncode == 0, made.stdout + made.stderr
    export = made.stdout.strip().splitlines()[-1]
    assert export.startswith("export TENSAFE_API_KEY=")
    trainer_key = export.removeprefix("export TENSAFE_API_KEY=")
    admin_key = json.loads(connection_file.read_text())["api_key"]
    assert trainer_key and trainer_key != admin_key

    # A training step through tensafe.tinker, from the venv that has no torch.
    step = _run([python, "-c", _SLIM_TRAINING_STEP, str(connection_file), trainer_key])
    assert step.returncode == 0, step.stdout + step.stderr
    lines = step.stdout.strip().splitlines()
    assert lines[0] == "empty key refused: api_key"
    assert lines[1].startswith(
        "tokenizer: TrainingClient.get_tokenizer() needs the [trainer] extra"
    ), lines
    result = json.loads(lines[-1])
    assert result["step"] == 1 and result["epsilon"] > 0
    assert result["heavy"] == []

    # The empty environment variable does not fall back to the admin key either.
    refused = _run(
        [str(bin_dir / "tensafe"), "registry", "list", "--connection-file", str(connection_file)],
        env={**os.environ, "TENSAFE_API_KEY": ""},
    )
    assert refused.returncode == 2
    assert "TENSAFE_API_KEY: set but empty" in refused.stderr

    # As the trainer, an empty registry says so.
    listing = _run(
        [str(bin_dir / "tensafe"), "registry", "list", "--connection-file", str(connection_file)],
        env={**os.environ, "TENSAFE_API_KEY": trainer_key},
    )
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith("no packages")


def test_up_offers_the_base_model_and_the_demo_shows_learning(
    stack: tuple[Path, str], tmp_path: Path
) -> None:
    connection_file, up_output = stack
    assert "installed the built-in pretrained tiny-llama" in up_output
    summary_file = tmp_path / "summary.json"
    demo = _run(
        [
            sys.executable,
            "-m",
            "tensafe.client.cli",
            "demo",
            "--connection-file",
            str(connection_file),
            "--json",
            str(summary_file),
        ]
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    # The adapter changed what the model writes, visibly: the new answer style.
    assert summary["learned"]
    assert all(not a.strip().startswith("The sum is") for a in summary["base_answers"])
    assert sum(a.strip().startswith("The sum is") for a in summary["adapted_answers"]) >= 2
    # HE-LoRA on encrypted activations generated exactly the plaintext-LoRA answer.
    assert summary["he_matches"] and summary["he_text"] == summary["plaintext_text"]
    assert summary["he_text"] == summary["adapted_answers"][0]
    assert summary["epsilons"][-1] <= summary["target_epsilon"]
    assert Path(summary["plot_path"]).stat().st_size > 10_000
    assert len(Path(summary["metrics_path"]).read_text().splitlines()) == summary["steps"]
    # Side by side, then HE-LoRA, then the certificate, in that order.
    out = demo.stdout
    assert out.index("adapted (DP LoRA)") < out.index("HE-LoRA (CKKS)") < out.index(
        "DP certificate"
    )
    assert "not the platform admin" in out


def test_runnable_doc_examples_run_as_a_tenants_trainer(
    stack: tuple[Path, str], tmp_path: Path
) -> None:
    """Every Python block marked `<!-- runnable -->` in README.md and docs/*.md runs as
    written, with the environment the docs tell the user to set."""
    from tensafe.client.demo import create_tenant
    from testkit.docs import DOC_FILES, python_blocks

    connection_file, _ = stack
    trainer = create_tenant(connection_file, name="docs-reader")
    env = {
        **os.environ,
        "TENSAFE_CONNECTION_FILE": str(connection_file),
        "TENSAFE_API_KEY": trainer.api_key,
    }
    ran = []
    for path in DOC_FILES:
        for marker, line, code in python_blocks(path):
            if marker != "runnable":
                continue
            script = tmp_path / f"{path.stem}-{line}.py"
            script.write_text(code)
            run = subprocess.run(
                [sys.executable, str(script)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert run.returncode == 0, f"{path.name}:{line}\n{run.stdout}\n{run.stderr[-3000:]}"
            ran.append(f"{path.name}:{line}")
    assert len(ran) >= 2, ran
