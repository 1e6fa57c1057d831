"""`tensafe up` runs the whole stack, a non-Python client sees every service SERVING,
and SIGTERM ends every process it started within 10 s."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensafe.common.nats_server import NatsServer, NatsServerConfig

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        assert time.monotonic() < deadline, f"{path} not written in {timeout}s"
        time.sleep(0.1)


def _status(connection_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tensafe.client.cli",
            "status",
            "--connection-file",
            str(connection_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_up_with_postgres_and_an_external_nats(tmp_path: Path, fresh_postgres_url: str) -> None:
    with NatsServer(NatsServerConfig(data_dir=tmp_path / "nats")) as nats:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensafe.client.cli",
                "up",
                "--data-dir",
                str(tmp_path / "state"),
                "--database-url",
                fresh_postgres_url,
                "--nats-url",
                nats.url,
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            connection_file = tmp_path / "state" / "connection.json"
            _wait_for(connection_file, up, timeout=120)
            assert json.loads(connection_file.read_text())["nats_url"] == nats.url
            status = _status(connection_file)
            assert status.returncode == 0, status.stdout + status.stderr
            assert status.stdout.count("SERVING") == 4
            up.send_signal(signal.SIGTERM)
            assert up.wait(timeout=10) == 0
            assert nats.running, "an external NATS is not the stack's to stop"
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    assert not list((tmp_path / "state" / "db").glob("*.db")), "SQLite used despite the URL"


@pytest.mark.slow
def test_up_serves_everything_and_stops_cleanly(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is required for the non-Python client check"
    assert (NODE_CLIENT / "node_modules").exists(), "run `npm ci` in clients/node first"
    data_dir = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "tensafe.client.cli", "up", "--data-dir", str(data_dir)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        connection_file = data_dir / "connection.json"
        _wait_for(connection_file, up, timeout=120)
        services = json.loads(connection_file.read_text())["services"]
        assert set(services) == {"auth", "registry", "he_runtime", "trainer"}

        check = subprocess.run(
            [
                node,
                str(NODE_CLIENT / "bin" / "health.mjs"),
                "--connection-file",
                str(connection_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        lines = check.stdout.strip().splitlines()
        assert len(lines) == 4
        assert all(line.endswith(" SERVING") for line in lines), lines

        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensafe.client.cli",
                "status",
                "--connection-file",
                str(connection_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr

        started = _descendants(up.pid)
        assert len(started) >= 5  # four services and nats-server
        t0 = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 2
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in started if _alive(p)], "orphaned processes"
        assert not connection_file.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_restarts_a_killed_worker_and_keeps_serving(tmp_path: Path) -> None:
    """`tensafe up` supervises its processes: a worker killed with SIGKILL is restarted
    (logged), the stack stays up and the next DP step succeeds."""
    from tensafe.client.demo import create_tenant
    from tensafe.client.train_cli import to_datum
    from tensafe.tinker import ServiceClient, types

    data_dir = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "tensafe.client.cli", "up", "--data-dir", str(data_dir)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        connection_file = data_dir / "connection.json"
        _wait_for(connection_file, up, timeout=120)
        tinker_url = json.loads(connection_file.read_text())["tinker_base_url"]
        ready = data_dir / "run" / "trainer-worker.ready"
        killed = int(json.loads(ready.read_text())["pid"])
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:
            assert up.poll() is None, "tensafe up stopped when its worker was killed"
            assert time.monotonic() < deadline, "the worker was not restarted"
            try:
                pid = int(json.loads(ready.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                pid = killed
            if pid != killed:
                break
            time.sleep(0.1)  # polling a file another process writes

        tenant = create_tenant(connection_file, name="supervised")
        with ServiceClient(api_key=tenant.api_key, connection_file=connection_file) as service:
            client = service.create_lora_training_client(
                base_model="tiny-llama", rank=2, dp_noise_multiplier=1.0
            )
            client.forward_backward([to_datum([1, 2, 3, 4, 5])], "cross_entropy").result()
            result = client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        assert result.step == 1

        up.send_signal(signal.SIGTERM)
        output = up.communicate(timeout=30)[0].decode(errors="replace")
        assert up.returncode == 0, output
        assert "trainer-worker exited with code -9; restarting in 1 s" in output, output
        assert f"trainer-worker restarted (pid {pid})" in output, output
        # The Tinker SDK's get_tokenizer() needs HF_ENDPOINT set to the Tinker API URL.
        assert f"get_tokenizer(): HF_ENDPOINT={tinker_url}  HF_TOKEN=" in output, output
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
