"""Configuration loads from env/file, validates at start-up and names a bad setting."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensafe.auth.config import AuthConfig
from tensafe.common.config import ServiceConfig, describe, load_config
from tensafe.common.errors import ConfigError
from tensafe.trainer.config import TrainerConfig

BASE = {"TENSAFE_DATABASE_URL": "sqlite+aiosqlite:///x.db", "TENSAFE_DATA_DIR": "/tmp/x"}


def test_loads_and_coerces_types() -> None:
    config = load_config(
        ServiceConfig,
        {**BASE, "TENSAFE_PORT": "8080", "TENSAFE_DEV_MODE": "true", "TENSAFE_LOG_FORMAT": "text"},
    )
    assert config.port == 8080
    assert config.dev_mode is True
    assert config.data_dir == Path("/tmp/x")
    assert config.log_format == "text"


def test_file_values_are_overridden_by_env(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('port = 7000\nlog_level = "DEBUG"\n')
    env = {**BASE, "TENSAFE_CONFIG_FILE": str(toml), "TENSAFE_PORT": "7001"}
    config = load_config(ServiceConfig, env)
    assert (config.port, config.log_level) == (7001, "DEBUG")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"TENSAFE_DATA_DIR": "/tmp"}, "TENSAFE_DATABASE_URL"),
        ({**BASE, "TENSAFE_PORT": "http"}, "TENSAFE_PORT"),
        ({**BASE, "TENSAFE_PORT": "70000"}, "TENSAFE_PORT"),
        ({**BASE, "TENSAFE_DEV_MODE": "maybe"}, "TENSAFE_DEV_MODE"),
        ({**BASE, "TENSAFE_DATABASE_URL": "sqlite:///sync.db"}, "TENSAFE_DATABASE_URL"),
        ({**BASE, "TENSAFE_OTEL_EXPORTER": "otlp"}, "TENSAFE_OTEL_ENDPOINT"),
    ],
)
def test_bad_setting_is_named(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ServiceConfig, env)
    assert info.value.setting == setting


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(ServiceConfig, {**BASE, "TENSAFE_CONFIG_FILE": str(toml)})


def test_auth_secret_required_outside_dev_mode() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(AuthConfig, BASE)
    assert info.value.setting == "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY"
    assert load_config(AuthConfig, {**BASE, "TENSAFE_DEV_MODE": "1"}).dev_mode
    key = base64.b64encode(bytes(range(32))).decode()
    config = load_config(AuthConfig, {**BASE, "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY": key})
    assert not config.dev_mode
    short = base64.b64encode(b"short").decode()
    with pytest.raises(ConfigError, match="32 bytes"):
        load_config(AuthConfig, {**BASE, "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY": short})


def test_trainer_needs_a_nats_url() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TrainerConfig, BASE)
    assert info.value.setting == "TENSAFE_NATS_URL"


def _trainer_env(tmp_path: Path) -> dict[str, str]:
    return {
        **BASE,
        "TENSAFE_NATS_URL": "nats://127.0.0.1:4222",
        "TENSAFE_DEV_MODE": "1",
        "TENSAFE_BASE_MODELS_DIR": str(tmp_path),
    }


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("TENSAFE_DEVICE", "gpu"),
        ("TENSAFE_DEVICE", "cuda:x"),
        ("TENSAFE_BASE_DTYPE", "int8"),
        ("TENSAFE_RESIDENT_BYTES", "-1"),
    ],
)
def test_trainer_placement_and_budget_are_checked(tmp_path: Path, setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TrainerConfig, {**_trainer_env(tmp_path), setting: value})
    assert info.value.setting == setting


def test_trainer_resident_budget_defaults_to_a_share_of_memory(tmp_path: Path) -> None:
    env = _trainer_env(tmp_path)
    config = load_config(TrainerConfig, {**env, "TENSAFE_DEVICE": "cuda:1"})
    assert (config.device, config.base_dtype) == ("cuda:1", "fp32")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < config.resident_bytes_limit <= physical // 4
    chosen = load_config(TrainerConfig, {**env, "TENSAFE_RESIDENT_BYTES": "12345"})
    assert chosen.resident_bytes_limit == 12345


def test_describe_documents_every_setting() -> None:
    rows = describe(AuthConfig)
    names = [r[0] for r in rows]
    assert "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY" in names
    assert all(help_text for _, _, help_text in rows)
    assert dict((r[0], r[1]) for r in rows)["TENSAFE_DATABASE_URL"] == "(required)"


@pytest.mark.parametrize(
    ("module", "env", "setting"),
    [
        ("tensafe.auth", {"TENSAFE_DATA_DIR": "/tmp"}, "TENSAFE_DATABASE_URL"),
        ("tensafe.auth", BASE, "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY"),
        (
            "tensafe.trainer",
            {**BASE, "TENSAFE_BASE_MODELS_DIR": "/tmp", "TENSAFE_NATS_URL": "http://x"},
            "TENSAFE_NATS_URL",
        ),
        ("tensafe.registry", {**BASE, "TENSAFE_PORT": "-1"}, "TENSAFE_PORT"),
    ],
)
def test_service_start_up_fails_with_one_clear_line(
    module: str, env: dict[str, str], setting: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setting in lines[0]
    assert "Traceback" not in result.stderr
