"""Settings that wire the trainer and the HE runtime to the registry fail loudly."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tensafe import tgsp
from tensafe.common.errors import ConfigError
from tensafe.he_runtime.config import HeRuntimeConfig
from tensafe.he_runtime.domain.adapters import LocalPeftAdapterSource, RegistryAdapterSource
from tensafe.he_runtime.server import adapter_source
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.publisher import DEV_SIGNING_KEY_FILE, load_signing_key


def trainer_config(tmp_path: Path, **changes: object) -> TrainerConfig:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "database_url": "sqlite+aiosqlite:///:memory:",
        "nats_url": "nats://127.0.0.1:4222",
        "base_models_dir": tmp_path,
        "dataset_kek_file": tmp_path / "dataset.kek",
    }
    values.update(changes)
    return TrainerConfig(**values)  # type: ignore[arg-type]


def test_the_dataset_kek_is_a_start_up_requirement_outside_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TENSAFE_DATASET_KEK_FILE"):
        trainer_config(tmp_path, dataset_kek_file=None)
    assert trainer_config(tmp_path, dataset_kek_file=None, dev_mode=True).dataset_kek_file is None


def test_a_trainer_with_a_registry_needs_the_shared_kek_dir_and_its_signing_key(
    tmp_path: Path,
) -> None:
    assert trainer_config(tmp_path).registry_url == ""
    with pytest.raises(ConfigError, match="TENSAFE_KEK_DIR"):
        trainer_config(tmp_path, registry_url="127.0.0.1:1", dev_mode=True)
    with pytest.raises(ConfigError, match="TENSAFE_TRAINER_SIGNING_KEY_FILE"):
        trainer_config(tmp_path, registry_url="127.0.0.1:1", kek_dir=tmp_path / "keks")
    publishing = {
        "registry_url": "127.0.0.1:1",
        "kek_dir": tmp_path / "keks",
        "trainer_signing_key_file": tmp_path / "key.pem",
    }
    # Outside dev mode the local-file KEK provider is refused, naming the setting.
    with pytest.raises(ConfigError, match="TENSAFE_KEK_PROVIDER: local-file"):
        trainer_config(tmp_path, **publishing)
    assert trainer_config(tmp_path, **publishing, dev_mode=True).kek_dir == tmp_path / "keks"
    with pytest.raises(ConfigError, match="TENSAFE_KEK_PKCS11_PIN"):
        trainer_config(
            tmp_path,
            **publishing,
            kek_provider="pkcs11",
            kek_pkcs11_module=tmp_path / "module.so",
            kek_pkcs11_token_label="tensafe",
        )
    configured = trainer_config(
        tmp_path,
        **{**publishing, "kek_dir": None},
        kek_provider="pkcs11",
        kek_pkcs11_module=tmp_path / "module.so",
        kek_pkcs11_token_label="tensafe",
        kek_pkcs11_pin="1234",
    )
    assert configured.kek_provider == "pkcs11"  # no KEK folder needed


def test_the_trainer_signing_key_is_created_only_in_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="required outside dev mode"):
        load_signing_key(None, dev_mode=False, data_dir=tmp_path)
    assert not (tmp_path / DEV_SIGNING_KEY_FILE).exists()
    created = load_signing_key(None, dev_mode=True, data_dir=tmp_path)
    path = tmp_path / DEV_SIGNING_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(None, dev_mode=True, data_dir=tmp_path).key_id == created.key_id
    assert load_signing_key(path, dev_mode=False, data_dir=tmp_path).key_id == created.key_id
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        load_signing_key(path, dev_mode=False, data_dir=tmp_path)
    other = tmp_path / "other.pem"
    other.write_bytes(tgsp.SigningKey.generate().verifying_key.to_pem())
    other.chmod(0o600)
    with pytest.raises(ConfigError):
        load_signing_key(other, dev_mode=False, data_dir=tmp_path)  # a public key


async def test_a_configured_registry_is_always_the_he_adapter_source(tmp_path: Path) -> None:
    common = {
        "data_dir": tmp_path,
        "database_url": "sqlite+aiosqlite:///:memory:",
        "auth_url": "127.0.0.1:1",
        "service_api_key": "k",
    }
    dev_registry = adapter_source(
        HeRuntimeConfig(**common, registry_url="127.0.0.1:2", dev_mode=True)  # type: ignore[arg-type]
    )
    assert isinstance(dev_registry, RegistryAdapterSource)
    await dev_registry.close()
    assert isinstance(
        adapter_source(HeRuntimeConfig(**common, dev_mode=True)),  # type: ignore[arg-type]
        LocalPeftAdapterSource,
    )
    assert adapter_source(HeRuntimeConfig(**common)) is None  # type: ignore[arg-type]
    # Outside dev mode the runtime verifies against a pinned trust list, never the
    # registry's own list alone.
    with pytest.raises(ConfigError, match="TENSAFE_TRUST_LIST_FILE"):
        HeRuntimeConfig(**common, registry_url="127.0.0.1:2")  # type: ignore[arg-type]
    trust_file = tmp_path / "trust.json"
    trust_file.write_text(
        json.dumps(
            tgsp.TrustList(
                [
                    tgsp.TrustedSigner(
                        key=tgsp.SigningKey.generate().verifying_key,
                        tenants=frozenset({tgsp.EVERY_TENANT}),
                    )
                ]
            ).to_json()
        )
    )
    pinned = adapter_source(
        HeRuntimeConfig(**common, registry_url="127.0.0.1:2", trust_list_file=trust_file)  # type: ignore[arg-type]
    )
    assert isinstance(pinned, RegistryAdapterSource)
    await pinned.close()
    trust_file.write_text("{}")
    with pytest.raises(ConfigError, match="TENSAFE_TRUST_LIST_FILE"):
        adapter_source(
            HeRuntimeConfig(**common, registry_url="127.0.0.1:2", trust_list_file=trust_file)  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigError, match="TENSAFE_SERVICE_API_KEY"):
        adapter_source(
            HeRuntimeConfig(
                data_dir=tmp_path,
                database_url="sqlite+aiosqlite:///:memory:",
                auth_url="127.0.0.1:1",
                registry_url="x:1",
                dev_mode=True,
            )
        )
