"""The generated Node client against `tensafe up`: it exchanges the stack's API key,
creates a DP training client on a tiny model, runs ForwardBackward + OptimStep through
futures and reads the privacy spent; the numbers it prints are checked against the
accountant (an RDP epsilon for one full-batch Gaussian step) computed here."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from tensafe.client.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"
BASE_MODEL = "tiny-node"
NOISE_MULTIPLIER = 1.5
DELTA = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _rdp_epsilon_of_one_step(noise_multiplier: float, delta: float) -> float:
    # The client hands in its own batches, so a step is a full Gaussian mechanism (no
    # subsampling amplification): what the trainer's RDP accountant must report.
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))


def _wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"tensafe up exited with {process.returncode}:\n{output}")
        assert time.monotonic() < deadline, f"{path} not written in {timeout}s"
        time.sleep(0.1)


def test_node_client_runs_a_dp_step_against_tensafe_up(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is required for the Node client test"
    assert (NODE_CLIENT / "node_modules").exists(), "run `npm ci` in clients/node first"
    data_dir = tmp_path / "state"
    build_tiny_model(
        data_dir / "models" / BASE_MODEL,
        seed=0,
        vocab_size=256,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=64,
    )
    up = subprocess.Popen(
        [sys.executable, "-m", "tensafe.client.cli", "up", "--data-dir", str(data_dir)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        connection_file = data_dir / "connection.json"
        _wait_for(connection_file, up, timeout=120)
        run = subprocess.run(
            [
                node,
                str(NODE_CLIENT / "bin" / "train-step.mjs"),
                "--connection-file",
                str(connection_file),
                "--noise-multiplier",
                str(NOISE_MULTIPLIER),
                "--delta",
                str(DELTA),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=15)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()

    assert report["base_model"] == BASE_MODEL
    assert report["training_client_id"]
    assert report["private"] is True
    assert report["optim_step"] == 1
    loss = report["metrics"]["loss:sum"]
    # Two sequences of five next-token predictions from an untrained model over a
    # vocabulary of <= 256 ids: a finite, positive loss near 10 * ln(vocab).
    assert math.isfinite(loss) and 0 < loss < 10 * math.log(256) * 2
    spent = report["privacy_spent"]
    assert spent["private"] is True
    assert spent["steps"] == 1
    assert spent["accountant"] == "RDP"
    assert spent["noise_multiplier"] == pytest.approx(NOISE_MULTIPLIER)
    assert spent["delta"] == pytest.approx(DELTA)
    assert spent["epsilon"] == pytest.approx(
        _rdp_epsilon_of_one_step(NOISE_MULTIPLIER, DELTA), rel=1e-6
    )
