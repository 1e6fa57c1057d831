"""HE runtime settings load from the environment and are validated at start-up."""

from __future__ import annotations

import pytest

from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError
from tensafe.he_runtime.config import HeRuntimeConfig

BASE = {"TENSAFE_DATABASE_URL": "sqlite+aiosqlite:///x.db", "TENSAFE_DATA_DIR": "/tmp"}


def test_settings_load_from_the_environment() -> None:
    config = load_config(
        HeRuntimeConfig,
        {
            **BASE,
            "TENSAFE_MAX_SESSIONS_PER_TENANT": "3",
            "TENSAFE_SESSION_IDLE_TTL_SECONDS": "60",
            "TENSAFE_MAX_SESSION_KEY_BYTES": "1000",
            "TENSAFE_MAX_KEY_BYTES_PER_TENANT": "2000",
        },
    )
    assert (config.max_sessions_per_tenant, config.session_idle_ttl_seconds) == (3, 60.0)
    assert (config.max_session_key_bytes, config.max_key_bytes_per_tenant) == (1000, 2000)
    defaults = load_config(HeRuntimeConfig, BASE)
    assert defaults.max_key_bytes_per_tenant >= defaults.max_session_key_bytes


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"TENSAFE_MAX_SESSIONS_PER_TENANT": "0"}, "TENSAFE_MAX_SESSIONS_PER_TENANT"),
        ({"TENSAFE_SESSION_IDLE_TTL_SECONDS": "0"}, "TENSAFE_SESSION_IDLE_TTL_SECONDS"),
        ({"TENSAFE_EVALUATION_THREADS": "0"}, "TENSAFE_EVALUATION_THREADS"),
        (
            {"TENSAFE_MAX_SESSION_KEY_BYTES": "100", "TENSAFE_MAX_KEY_BYTES_PER_TENANT": "99"},
            "TENSAFE_MAX_KEY_BYTES_PER_TENANT",
        ),
    ],
)
def test_invalid_settings_name_themselves(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(HeRuntimeConfig, {**BASE, **env})
    assert info.value.setting == setting
