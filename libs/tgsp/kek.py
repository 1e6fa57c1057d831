"""Key-encryption-key (KEK) providers: wrap and unwrap data keys (DEKs) for a tenant.

Vocabulary as in :mod:`tensafe.tgsp`. A provider holds each tenant's KEK and never
hands it out: callers give it a DEK and associated data (AAD) and get back a
:class:`WrappedKey`, or give it a wrapped key and the same AAD and get the DEK back.
The tenant id is bound into the wrapping, so a wrapped key made for one tenant does not
unwrap for another even if the tenant field is edited.

Who may call ``unwrap`` is the caller's decision, not the provider's: the registry
unwraps only for the owning tenant's principals and for internal services acting for
that tenant, and records each unwrap as an audit event (docs/design §8).

Implementations of :class:`KekProvider`:

* :class:`tensafe.tgsp.hsm.Pkcs11KekProvider`: KEKs generated inside a PKCS#11 token
  (an HSM; SoftHSM2 in tests), non-extractable, every wrap and unwrap done by the token.
  The production provider.
* :class:`LocalFileKekProvider`: KEK files in a directory (mode 0600), created only by
  :meth:`LocalFileKekProvider.create_tenant_kek`. A KEK file is the key in the clear:
  anyone who can read the folder can unwrap every package of the tenant, so the services
  accept this provider only in explicit dev mode (:mod:`tensafe.tgsp.kek_settings`).
* :class:`KmsKekProvider`: the shape of a provider backed by a cloud key management
  service (AWS KMS, Google Cloud KMS, HashiCorp Vault transit, ...). It is abstract and
  no service can be configured with it: a deployment that needs one subclasses it with
  the three calls of its KMS client and wires it in.

**KEK versions.** A tenant's KEK has versions (rotation, ``tensafe admin rotate-kek``):
the newest wraps, every version still present unwraps what it wrapped (a wrapped key
names its KEK by id), and an old version is destroyed only once no package needs it.
"""

from __future__ import annotations

import abc
import base64
import binascii
import glob
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
)
from tensafe.tgsp.canonical import JsonValue, canonical_json, parse_canonical_json
from tensafe.tgsp.manifest import check_text

KEY_LENGTH = 32
"""Bytes of an AES-256 key: KEKs and TGSP DEKs alike."""

_TENANT_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LOCAL_FORMAT = "tensafe.local-kek.v1"
_LOCAL_AAD_DOMAIN = b"tensafe.local-kek.v1.wrap\x00"
_KMS_AAD_DOMAIN = b"tensafe.kms-kek.v1.wrap\x00"
_GCM_NONCE_LENGTH = 12


def integrity_failure(check: str, detail: str) -> IntegrityError:
    """Build the IntegrityError for a failed check; the message starts with the check name.

    Args:
        check: What failed, e.g. ``signature`` or ``wrapped key``; also sent as the
            ``check`` metadata entry so callers can branch on it.
        detail: What was found.
    """
    return IntegrityError(f"{check}: {detail}", metadata={"check": check})


@dataclass(frozen=True, kw_only=True)
class WrappedKey:
    """A DEK encrypted under a tenant's KEK, with what is needed to unwrap it."""

    provider: str
    """Id of the provider kind that made it (e.g. ``local-file``)."""
    kek_id: str
    """Which KEK wrapped it (a local KEK's id, or a KMS key reference)."""
    tenant_id: str
    """The tenant whose KEK wrapped it."""
    algorithm: str
    """How it was wrapped (e.g. ``AES-256-GCM``)."""
    ciphertext: bytes
    """The wrapped DEK, in the provider's own format."""

    def __post_init__(self) -> None:
        check_text(self.provider, "wrapped_key.provider")
        check_text(self.kek_id, "wrapped_key.kek_id", max_length=2048)
        check_text(self.tenant_id, "wrapped_key.tenant_id")
        check_text(self.algorithm, "wrapped_key.algorithm")
        if not isinstance(self.ciphertext, bytes) or not self.ciphertext:
            raise InvalidArgument("wrapped_key.ciphertext", "must be non-empty bytes")

    def to_json(self) -> dict[str, JsonValue]:
        """Return the JSON object a TGSP package stores (ciphertext in base64)."""
        return {
            "provider": self.provider,
            "kek_id": self.kek_id,
            "tenant_id": self.tenant_id,
            "algorithm": self.algorithm,
            "wrapped_dek": base64.b64encode(self.ciphertext).decode("ascii"),
        }

    def canonical_bytes(self) -> bytes:
        """Return the canonical JSON a TGSP package stores as its wrapped-key section."""
        return canonical_json(self.to_json())

    @classmethod
    def from_canonical_bytes(cls, data: bytes | memoryview) -> WrappedKey:
        """Parse the wrapped-key section of a package.

        Raises:
            InvalidArgument: Not canonical JSON with exactly the five members, or bad
                base64.
        """
        value = parse_canonical_json(data, field="wrapped_key")
        if not isinstance(value, dict):
            raise InvalidArgument("wrapped_key", "must be a JSON object")
        expected = {"provider", "kek_id", "tenant_id", "algorithm", "wrapped_dek"}
        if set(value) != expected:
            raise InvalidArgument(
                "wrapped_key", f"must have exactly the members {sorted(expected)}"
            )
        encoded = value["wrapped_dek"]
        if not isinstance(encoded, str):
            raise InvalidArgument("wrapped_key.wrapped_dek", "must be a base64 string")
        try:
            ciphertext = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise InvalidArgument("wrapped_key.wrapped_dek", "not valid base64") from exc
        if base64.b64encode(ciphertext).decode("ascii") != encoded:
            raise InvalidArgument("wrapped_key.wrapped_dek", "not canonical base64")
        fields = {name: value[name] for name in ("provider", "kek_id", "tenant_id", "algorithm")}
        for name, text in fields.items():
            if not isinstance(text, str):
                raise InvalidArgument(f"wrapped_key.{name}", "must be a string")
        return cls(
            provider=str(fields["provider"]),
            kek_id=str(fields["kek_id"]),
            tenant_id=str(fields["tenant_id"]),
            algorithm=str(fields["algorithm"]),
            ciphertext=ciphertext,
        )


class KekProvider(abc.ABC):
    """Wraps and unwraps DEKs under per-tenant KEKs that never leave the provider."""

    @property
    @abc.abstractmethod
    def provider_id(self) -> str:
        """Short id of this provider kind, stored in every :class:`WrappedKey` it makes."""

    @abc.abstractmethod
    def wrap(self, tenant_id: str, dek: bytes, aad: bytes) -> WrappedKey:
        """Encrypt ``dek`` under ``tenant_id``'s KEK, binding ``aad`` and the tenant.

        Args:
            tenant_id: The tenant whose KEK wraps the key.
            dek: The data key.
            aad: Associated data that ``unwrap`` must be given again, byte for byte.

        Returns:
            The wrapped key.

        Raises:
            NotFound: The tenant has no KEK (none is ever created implicitly).
        """

    @abc.abstractmethod
    def unwrap(self, tenant_id: str, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Decrypt a wrapped key for ``tenant_id``.

        Args:
            tenant_id: The tenant the caller acts for.
            wrapped: The wrapped key.
            aad: The associated data given to ``wrap``.

        Returns:
            The data key.

        Raises:
            IntegrityError: ``tenant mismatch`` if the key was wrapped for another tenant;
                ``wrapped key`` if it does not authenticate (wrong KEK, edited key, wrong
                associated data) or comes from another provider.
            NotFound: The tenant has no KEK.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release what the provider holds open (a token session); nothing by default."""

    def has_tenant_kek(self, tenant_id: str) -> bool:
        """Return whether the tenant has a KEK (any version)."""
        return bool(self.tenant_kek_ids(tenant_id))

    def tenant_kek_ids(self, tenant_id: str) -> list[str]:
        """Return the ids of the tenant's KEK versions, oldest first; the last one wraps.

        Raises:
            FailedPrecondition: The provider does not manage KEK versions.
        """
        raise FailedPrecondition(f"KEK provider {self.provider_id!r} does not manage KEKs")

    def create_tenant_kek(self, tenant_id: str) -> str:
        """Create the tenant's first KEK; the only way a tenant gets one.

        Returns:
            The new KEK's id.

        Raises:
            AlreadyExists: The tenant has a KEK already (use :meth:`rotate_tenant_kek`).
            FailedPrecondition: The provider does not manage KEKs.
        """
        raise FailedPrecondition(f"KEK provider {self.provider_id!r} does not manage KEKs")

    def rotate_tenant_kek(self, tenant_id: str) -> str:
        """Create a new KEK version for the tenant; it wraps from now on.

        Older versions keep unwrapping what they wrapped until destroyed.

        Returns:
            The new version's id.

        Raises:
            NotFound: The tenant has no KEK to rotate.
            FailedPrecondition: The provider does not manage KEKs.
        """
        raise FailedPrecondition(f"KEK provider {self.provider_id!r} does not manage KEKs")

    def destroy_tenant_kek(self, tenant_id: str, kek_id: str) -> None:
        """Destroy one of the tenant's older KEK versions (never the current one).

        Whatever it wrapped can never be unwrapped again: the caller checks first that
        no package needs it.

        Raises:
            NotFound: No such version.
            FailedPrecondition: ``kek_id`` is the current version, or the provider does
                not manage KEKs.
        """
        raise FailedPrecondition(f"KEK provider {self.provider_id!r} does not manage KEKs")

    def check_binding(self, tenant_id: str, wrapped: WrappedKey) -> None:
        """Refuse a wrapped key made for another tenant or by another provider kind.

        Raises:
            IntegrityError: ``tenant mismatch`` or ``wrapped key``.
        """
        if wrapped.tenant_id != tenant_id:
            raise integrity_failure(
                "tenant mismatch",
                f"the key was wrapped for tenant {wrapped.tenant_id!r}, not {tenant_id!r}",
            )
        if wrapped.provider != self.provider_id:
            raise integrity_failure(
                "wrapped key",
                f"made by provider {wrapped.provider!r}; this provider is {self.provider_id!r}",
            )


def _length_prefixed(*parts: bytes) -> bytes:
    # Length prefixes keep the concatenation unambiguous (no two part lists collide).
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


class LocalFileKekProvider(KekProvider):
    """KEKs in files: ``<directory>/<tenant_id>.kek`` (version 1) and
    ``<tenant_id>@<n>.kek`` (version n >= 2, after rotations), mode 0600. Dev mode only.

    A KEK file is canonical JSON ``{"format": "tensafe.local-kek.v1", "kek_id": <32 hex>,
    "key": <base64 of 32 random bytes>, "tenant_id": ...}``. Keys wrap DEKs with
    AES-256-GCM, a fresh random 96-bit nonce per wrap (NIST SP 800-38D §8.2.2: safe for
    far more wraps than one KEK will see) and associated data that binds the tenant, the
    KEK id and the caller's AAD. The wrapped form is nonce || ciphertext || tag. The
    highest version wraps; every version present unwraps what it wrapped.

    The key is in the clear in the file: the folder's permissions are all that protect
    it, which is why the services refuse this provider outside dev mode.

    Tenant ids must be usable as file names: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` (``@``
    cannot occur in one, so version files never collide with another tenant's).

    Args:
        directory: Existing directory holding the KEK files (keep it 0700).

    Raises:
        FailedPrecondition: ``directory`` does not exist or is not a directory.
    """

    PROVIDER_ID = "local-file"
    ALGORITHM = "AES-256-GCM"

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise FailedPrecondition(f"KEK directory {str(directory)!r} does not exist")
        self._directory = directory

    @property
    def provider_id(self) -> str:
        """``local-file``."""
        return self.PROVIDER_ID

    def create_tenant_kek(self, tenant_id: str) -> str:
        """Create a tenant's first KEK file; the only way a local KEK comes into being.

        Args:
            tenant_id: The tenant.

        Returns:
            The new KEK's id.

        Raises:
            AlreadyExists: The tenant has a KEK already (it is never replaced: that would
                make every package of the tenant undecryptable).
            InvalidArgument: The tenant id cannot be a file name.
        """
        if self._versions(tenant_id):
            raise AlreadyExists(f"tenant {tenant_id!r} has a key-encryption key already")
        return self._create(tenant_id, 1)

    def rotate_tenant_kek(self, tenant_id: str) -> str:
        """Create the next KEK version; see :meth:`KekProvider.rotate_tenant_kek`."""
        versions = self._versions(tenant_id)
        if not versions:
            raise NotFound(f"tenant {tenant_id!r} has no key-encryption key")
        return self._create(tenant_id, max(versions) + 1)

    def tenant_kek_ids(self, tenant_id: str) -> list[str]:
        """Ids of the tenant's KEK versions, oldest first."""
        return [self._read(tenant_id, version)[0] for version in sorted(self._versions(tenant_id))]

    def destroy_tenant_kek(self, tenant_id: str, kek_id: str) -> None:
        """Delete an old version's file; see :meth:`KekProvider.destroy_tenant_kek`."""
        versions = sorted(self._versions(tenant_id))
        for version in versions:
            if self._read(tenant_id, version)[0] == kek_id:
                if version == versions[-1]:
                    raise FailedPrecondition(
                        f"KEK {kek_id} is tenant {tenant_id!r}'s current KEK; rotate first"
                    )
                self._path(tenant_id, version).unlink()
                return
        raise NotFound(f"tenant {tenant_id!r} has no KEK {kek_id!r}")

    def _create(self, tenant_id: str, version: int) -> str:
        path = self._path(tenant_id, version)
        kek_id = secrets.token_hex(16)
        document = canonical_json(
            {
                "format": _LOCAL_FORMAT,
                "kek_id": kek_id,
                "key": base64.b64encode(secrets.token_bytes(KEY_LENGTH)).decode("ascii"),
                "tenant_id": tenant_id,
            }
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            descriptor = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise AlreadyExists(
                f"tenant {tenant_id!r} has KEK version {version} already"
            ) from exc
        try:
            os.fchmod(descriptor, 0o600)  # the umask may only have narrowed it; be explicit
            os.write(descriptor, document)
            os.fsync(descriptor)
        except BaseException:
            os.close(descriptor)
            path.unlink(missing_ok=True)
            raise
        os.close(descriptor)
        return kek_id

    def wrap(self, tenant_id: str, dek: bytes, aad: bytes) -> WrappedKey:
        """Wrap ``dek`` under the tenant's current KEK; see :meth:`KekProvider.wrap`."""
        if len(dek) != KEY_LENGTH:
            raise InvalidArgument("dek", f"must be {KEY_LENGTH} bytes")
        versions = self._versions(tenant_id)
        if not versions:
            raise NotFound(f"tenant {tenant_id!r} has no key-encryption key")
        kek_id, key = self._read(tenant_id, max(versions))
        nonce = secrets.token_bytes(_GCM_NONCE_LENGTH)
        sealed = AESGCM(key).encrypt(nonce, dek, self._aad(tenant_id, kek_id, aad))
        return WrappedKey(
            provider=self.PROVIDER_ID,
            kek_id=kek_id,
            tenant_id=tenant_id,
            algorithm=self.ALGORITHM,
            ciphertext=nonce + sealed,
        )

    def unwrap(self, tenant_id: str, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Unwrap a key for the tenant with the KEK version that wrapped it; see
        :meth:`KekProvider.unwrap`."""
        self.check_binding(tenant_id, wrapped)
        if wrapped.algorithm != self.ALGORITHM:
            raise integrity_failure("wrapped key", f"unknown algorithm {wrapped.algorithm!r}")
        versions = self._versions(tenant_id)
        if not versions:
            raise NotFound(f"tenant {tenant_id!r} has no key-encryption key")
        key = None
        for version in versions:
            kek_id, candidate = self._read(tenant_id, version)
            if kek_id == wrapped.kek_id:
                key = candidate
                break
        if key is None:
            raise integrity_failure(
                "wrapped key",
                f"wrapped under KEK {wrapped.kek_id!r}, which tenant {tenant_id!r} does not "
                "have (another deployment's, or a destroyed version)",
            )
        blob = wrapped.ciphertext
        if len(blob) != _GCM_NONCE_LENGTH + KEY_LENGTH + 16:
            raise integrity_failure("wrapped key", f"has {len(blob)} bytes, expected 60")
        try:
            return AESGCM(key).decrypt(
                blob[:_GCM_NONCE_LENGTH],
                blob[_GCM_NONCE_LENGTH:],
                self._aad(tenant_id, wrapped.kek_id, aad),
            )
        except InvalidTag as exc:
            raise integrity_failure(
                "wrapped key",
                "does not authenticate under the tenant's KEK (wrong KEK, edited key or "
                "different associated data)",
            ) from exc

    @staticmethod
    def _aad(tenant_id: str, kek_id: str, aad: bytes) -> bytes:
        return _LOCAL_AAD_DOMAIN + _length_prefixed(
            tenant_id.encode("utf-8"), kek_id.encode("utf-8"), aad
        )

    def _path(self, tenant_id: str, version: int = 1) -> Path:
        if not isinstance(tenant_id, str) or not _TENANT_FILE_NAME.fullmatch(tenant_id):
            raise InvalidArgument(
                "tenant_id", "must match [A-Za-z0-9][A-Za-z0-9._-]{0,127} for a local KEK"
            )
        suffix = "" if version == 1 else f"@{version}"
        return self._directory / f"{tenant_id}{suffix}.kek"

    def _versions(self, tenant_id: str) -> list[int]:
        first = self._path(tenant_id)
        found = [1] if first.exists() or first.is_symlink() else []
        prefix = f"{tenant_id}@"
        for path in self._directory.glob(f"{glob.escape(tenant_id)}@*.kek"):
            number = path.name[len(prefix) : -len(".kek")]
            if number.isdigit() and int(number) >= 2 and path.name == self._path(
                tenant_id, int(number)
            ).name:
                found.append(int(number))
        return found

    def _read(self, tenant_id: str, version: int) -> tuple[str, bytes]:
        path = self._path(tenant_id, version)
        try:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise NotFound(f"tenant {tenant_id!r} has no key-encryption key") from exc
        except OSError as exc:  # e.g. ELOOP: a symlink where a key file should be
            raise FailedPrecondition(f"KEK file for tenant {tenant_id!r}: {exc.strerror}") from exc
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise FailedPrecondition(f"KEK file for tenant {tenant_id!r} is not a file")
            if info.st_mode & 0o077:
                raise FailedPrecondition(
                    f"KEK file for tenant {tenant_id!r} is open to group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); it must be 0600"
                )
            with os.fdopen(descriptor, "rb", closefd=False) as stream:
                raw = stream.read(4096)
        finally:
            os.close(descriptor)
        try:
            document = parse_canonical_json(raw, field="kek_file")
        except InvalidArgument as exc:
            raise FailedPrecondition(f"KEK file for tenant {tenant_id!r} is corrupt") from exc
        if (
            not isinstance(document, dict)
            or document.get("format") != _LOCAL_FORMAT
            or set(document) != {"format", "kek_id", "key", "tenant_id"}
            or not isinstance(document["kek_id"], str)
            or not isinstance(document["key"], str)
        ):
            raise FailedPrecondition(f"KEK file for tenant {tenant_id!r} is corrupt")
        if document["tenant_id"] != tenant_id:
            raise integrity_failure(
                "tenant mismatch",
                f"the KEK file for {tenant_id!r} belongs to {document['tenant_id']!r}",
            )
        try:
            key = base64.b64decode(document["key"], validate=True)
        except binascii.Error as exc:
            raise FailedPrecondition(f"KEK file for tenant {tenant_id!r} is corrupt") from exc
        if len(key) != KEY_LENGTH:
            raise FailedPrecondition(f"KEK file for tenant {tenant_id!r} holds a bad key")
        return document["kek_id"], key


class KmsKekProvider(KekProvider):
    """Shape of a KEK provider backed by a key management service.

    The tenant's KEK lives in the KMS and never leaves it: wrapping and unwrapping are
    the KMS's Encrypt and Decrypt calls on the tenant's key. A deployment subclasses this
    with its KMS client and implements three methods; this base adds the tenant binding,
    the :class:`WrappedKey` bookkeeping and the error mapping, so every KMS provider
    behaves like the local one to callers.

    How the associated data maps onto common services (pass the bytes given to
    :meth:`kms_encrypt` unchanged to :meth:`kms_decrypt`):

    * AWS KMS: ``EncryptionContext={"tensafe-aad": base64(associated_data)}``.
    * Google Cloud KMS: ``additional_authenticated_data=associated_data``.
    * HashiCorp Vault transit: ``associated_data=base64(associated_data)`` (AEAD keys).

    The KMS's access policy should also restrict each key to the services allowed to
    unwrap for its tenant; the KMS's own audit log then records every unwrap too.
    """

    ALGORITHM = "KMS"

    @abc.abstractmethod
    def key_reference(self, tenant_id: str) -> str:
        """Return the KMS key reference (ARN, resource name, key name) of a tenant's KEK.

        Raises:
            NotFound: The tenant has no KEK in the KMS.
        """

    @abc.abstractmethod
    def kms_encrypt(self, *, key_reference: str, plaintext: bytes, associated_data: bytes) -> bytes:
        """Call the KMS's Encrypt on ``plaintext`` with ``associated_data`` bound.

        Returns:
            The KMS's ciphertext blob, stored as the wrapped key's ciphertext.

        Raises:
            Unavailable: The KMS cannot be reached (retryable).
        """

    @abc.abstractmethod
    def kms_decrypt(
        self, *, key_reference: str, ciphertext: bytes, associated_data: bytes
    ) -> bytes:
        """Call the KMS's Decrypt.

        Returns:
            The plaintext.

        Raises:
            IntegrityError: The KMS refused the ciphertext or associated data (map the
                client's "invalid ciphertext" error to this, via :func:`integrity_failure`
                with check ``wrapped key``).
            Unavailable: The KMS cannot be reached (retryable).
        """

    def wrap(self, tenant_id: str, dek: bytes, aad: bytes) -> WrappedKey:
        """Wrap ``dek`` with the tenant's KMS key; see :meth:`KekProvider.wrap`."""
        reference = self.key_reference(tenant_id)
        sealed = self.kms_encrypt(
            key_reference=reference,
            plaintext=dek,
            associated_data=self._aad(tenant_id, reference, aad),
        )
        return WrappedKey(
            provider=self.provider_id,
            kek_id=reference,
            tenant_id=tenant_id,
            algorithm=self.ALGORITHM,
            ciphertext=sealed,
        )

    def unwrap(self, tenant_id: str, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Unwrap with the tenant's KMS key; see :meth:`KekProvider.unwrap`."""
        self.check_binding(tenant_id, wrapped)
        reference = self.key_reference(tenant_id)
        if wrapped.kek_id != reference:
            raise integrity_failure(
                "wrapped key",
                f"wrapped under KMS key {wrapped.kek_id!r}, not the tenant's {reference!r}",
            )
        return self.kms_decrypt(
            key_reference=reference,
            ciphertext=wrapped.ciphertext,
            associated_data=self._aad(tenant_id, reference, aad),
        )

    @staticmethod
    def _aad(tenant_id: str, reference: str, aad: bytes) -> bytes:
        return _KMS_AAD_DOMAIN + _length_prefixed(
            tenant_id.encode("utf-8"), reference.encode("utf-8"), aad
        )


def dek_aad(
    *,
    tenant_id: str,
    adapter_id: str,
    adapter_version: str,
    manifest_sha256: str,
    format_version: int,
) -> bytes:
    """Return the associated data a TGSP package's DEK is wrapped with.

    Canonical JSON of the tenant, the adapter id and version, the format version, the
    manifest's SHA-256 and a purpose string, so the wrapped key unwraps only for the
    package it was made for (docs/tgsp.md, "Wrapped key"). In format version 2 this
    binding is what authenticates the wrapped key (the signature no longer covers it,
    so that re-wrapping under a new KEK version keeps the signature valid).
    """
    return canonical_json(
        {
            "purpose": f"tensafe.tgsp.v{format_version}.dek",
            "format_version": format_version,
            "tenant_id": tenant_id,
            "adapter_id": adapter_id,
            "adapter_version": adapter_version,
            "manifest_sha256": manifest_sha256,
        }
    )


__all__ = [
    "KEY_LENGTH",
    "KekProvider",
    "KmsKekProvider",
    "LocalFileKekProvider",
    "WrappedKey",
    "dek_aad",
    "integrity_failure",
]
