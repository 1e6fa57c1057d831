"""The contracts lint clean and the committed generated code matches them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _buf() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert found, "buf (the buf-bin wheel, in the [dev] extra) is not installed"
    return found


def test_buf_lint_is_clean() -> None:
    result = subprocess.run(
        [_buf(), "lint"], cwd=ROOT / "protos", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_rpc_request_carries_a_request_id_when_it_mutates() -> None:
    from tensafe.proto.auth.v1 import auth_service_pb2
    from tensafe.proto.trainer.v1 import trainer_service_pb2

    for module, names in (
        (
            trainer_service_pb2,
            [
                "CreateTrainingClient",
                "ForwardBackward",
                "OptimStep",
                "SaveState",
                "LoadState",
                "SaveAdapter",
                "TrainOnDataset",
            ],
        ),
        (auth_service_pb2, ["CreateTenant", "CreatePrincipal", "CreateApiKey"]),
    ):
        for name in names:
            fields = module.DESCRIPTOR.message_types_by_name[f"{name}Request"].fields_by_name
            assert "request_id" in fields, name
