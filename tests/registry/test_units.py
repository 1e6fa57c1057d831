"""Configuration, signing keys, the object store and the access policy, without servers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tensafe import tgsp
from tensafe.common.auth import SCOPE_READ, SCOPE_TRAIN, Identity
from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError, InvalidArgument, NotFound, PermissionDenied
from tensafe.registry import admin
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.access import AccessPolicy, Action
from tensafe.registry.domain.keys import DEV_SIGNING_KEY_FILE, load_signing_keys
from tensafe.registry.store.objects import LocalObjectStore, check_digest


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "TENSAFE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}",
        "TENSAFE_DATA_DIR": str(tmp_path / "data"),
    }


def test_signing_key_is_required_outside_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(RegistryConfig, base_env(tmp_path))
    assert info.value.setting == "TENSAFE_REGISTRY_SIGNING_KEY_FILE"


def test_dev_mode_creates_one_key_and_keeps_it(tmp_path: Path) -> None:
    config = load_config(RegistryConfig, {**base_env(tmp_path), "TENSAFE_DEV_MODE": "1"})
    first = load_signing_keys(
        signing_key_file=None,
        trusted_key_files=(),
        dev_mode=True,
        data_dir=config.data_dir,
    )
    second = load_signing_keys(
        signing_key_file=None,
        trusted_key_files=(),
        dev_mode=True,
        data_dir=config.data_dir,
    )
    assert first.signing_key.key_id == second.signing_key.key_id
    path = config.data_dir / DEV_SIGNING_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError):
        load_signing_keys(
            signing_key_file=None, trusted_key_files=(), dev_mode=False, data_dir=config.data_dir
        )


def test_configured_keys_and_trusted_keys(tmp_path: Path) -> None:
    own = tgsp.SigningKey.generate()
    trainer = tgsp.SigningKey.generate()
    own_file = tmp_path / "registry.pem"
    own_file.write_bytes(own.to_pem())
    own_file.chmod(0o600)
    trainer_file = tmp_path / "trainer.pub.pem"
    trainer_file.write_bytes(trainer.verifying_key.to_pem())
    env = {
        **base_env(tmp_path),
        "TENSAFE_REGISTRY_SIGNING_KEY_FILE": str(own_file),
        "TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES": f"{trainer_file},{own_file}.missing",
        # Outside dev mode the KEKs must be in a PKCS#11 token (not opened here).
        "TENSAFE_KEK_PROVIDER": "pkcs11",
        "TENSAFE_KEK_PKCS11_MODULE": str(tmp_path / "module.so"),
        "TENSAFE_KEK_PKCS11_TOKEN_LABEL": "tensafe",
        "TENSAFE_KEK_PKCS11_PIN": "1234",
    }
    config = load_config(RegistryConfig, env)
    assert config.registry_trusted_signing_key_files == (
        trainer_file,
        Path(f"{own_file}.missing"),
    )
    with pytest.raises(ConfigError) as info:
        load_signing_keys(
            signing_key_file=config.registry_signing_key_file,
            trusted_key_files=config.registry_trusted_signing_key_files,
            dev_mode=False,
            data_dir=config.data_dir,
        )
    assert info.value.setting == "TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES"
    keys = load_signing_keys(
        signing_key_file=own_file,
        trusted_key_files=(trainer_file,),
        dev_mode=False,
        data_dir=config.data_dir,
    )
    assert [k.verifying_key.key_id for k in keys.trusted] == [own.key_id, trainer.key_id]
    own_file.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        load_signing_keys(
            signing_key_file=own_file, trusted_key_files=(), dev_mode=False, data_dir=tmp_path
        )


def test_acting_principals_need_the_platform_tenant(tmp_path: Path) -> None:
    env = {
        **base_env(tmp_path),
        "TENSAFE_DEV_MODE": "1",
        "TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS": "p1",
    }
    with pytest.raises(ConfigError) as info:
        load_config(RegistryConfig, env)
    assert info.value.setting == "TENSAFE_REGISTRY_PLATFORM_TENANT_ID"


def test_admin_creates_a_tenant_kek_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**base_env(tmp_path), "TENSAFE_DEV_MODE": "1"}.items():
        monkeypatch.setenv(name, value)
    assert admin.main(["create-tenant-kek", "tenant-7"]) == 0
    kek_file = tmp_path / "data" / "keks" / "tenant-7.kek"
    assert kek_file.stat().st_mode & 0o777 == 0o600
    assert admin.main(["create-tenant-kek", "tenant-7"]) == 3
    assert admin.main(["create-tenant-kek", "../evil"]) == 2
    assert admin.main(["public-key"]) == 0
    pem = capsys.readouterr().out.split("created KEK")[-1]
    assert "BEGIN PUBLIC KEY" in pem


def test_object_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    staged = store.stage()
    staged.write(b"hello ")
    staged.write(b"world")
    # Staged bytes are not visible under any digest before commit.
    digest = hashlib.sha256(b"hello world").hexdigest()
    assert not store.exists(digest)
    assert staged.finish() == digest
    assert store.commit(staged, digest) is True
    with store.open(digest) as file:
        assert file.read() == b"hello world"
    again = store.stage()
    again.write(b"hello world")
    assert store.commit(again, again.finish()) is False
    assert not again.path.exists()
    assert [p.name for p in (tmp_path / "objects" / "sha256").rglob("*/*")] == [digest]
    assert list((tmp_path / "objects" / "staging").iterdir()) == []
    store.delete(digest)
    with pytest.raises(NotFound), store.open(digest):
        pass


@pytest.mark.parametrize("key", ["../" + "a" * 61, "A" * 64, "a" * 63, "a" * 63 + "/", ""])
def test_object_keys_are_digests_only(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path)
    with pytest.raises(InvalidArgument):
        check_digest(key)
    with pytest.raises(InvalidArgument):
        store.exists(key)


def identity(tenant: str, principal: str, *scopes: str) -> Identity:
    return Identity(
        tenant_id=tenant,
        principal_id=principal,
        scopes=frozenset(scopes),
        token_id="t",
        expire_time=0.0,
    )


def test_access_policy() -> None:
    policy = AccessPolicy(acting_service_principals=frozenset({"svc"}), platform_tenant_id="plat")
    reader = identity("t1", "alice", SCOPE_READ)
    assert policy.authorize(reader, Action.READ, "").tenant_id == "t1"
    assert policy.authorize(reader, Action.UNWRAP, "").tenant_id == "t1"
    for action in (Action.PUBLISH, Action.MANAGE):
        with pytest.raises(PermissionDenied):
            policy.authorize(reader, action, "")
    service = identity("plat", "svc", SCOPE_READ)
    caller = policy.authorize(service, Action.UNWRAP, "t1")
    assert (caller.tenant_id, caller.acting_for_tenant, caller.caller_tenant_id) == (
        "t1",
        True,
        "plat",
    )
    assert policy.authorize(service, Action.PUBLISH, "t1").tenant_id == "t1"
    with pytest.raises(PermissionDenied):
        policy.authorize(service, Action.MANAGE, "t1")
    with pytest.raises(InvalidArgument):
        policy.authorize(service, Action.READ, "../t1")
    # The right principal id in the wrong tenant, or anyone else, may not act.
    for other in (identity("t2", "svc", SCOPE_READ), identity("plat", "root", SCOPE_TRAIN)):
        with pytest.raises(PermissionDenied):
            policy.authorize(other, Action.READ, "t1")


def test_opening_the_store_sweeps_dead_uploads_but_not_live_ones(tmp_path: Path) -> None:
    """A crashed upload leaves a staging file nobody holds: the next store opened on the
    folder deletes it. An upload still being written (by another replica sharing the
    folder) or finished but not yet committed holds its lock and is left alone."""
    store = LocalObjectStore(tmp_path / "objects")
    live = store.stage()
    live.write(b"still uploading")
    finished = store.stage()
    finished.write(b"verified, not yet committed")
    digest = finished.finish()
    dead = tmp_path / "objects" / "staging" / "upload-crashed"
    dead.write_bytes(b"half an upl")  # what a killed process leaves: no lock held
    other_replica = LocalObjectStore(tmp_path / "objects")
    assert not dead.exists()
    assert live.path.exists() and finished.path.exists()
    assert other_replica.sweep_staging() == 0
    assert store.commit(finished, digest) is True
    live.discard()
    assert list((tmp_path / "objects" / "staging").iterdir()) == []
