"""A KEK provider behind PKCS#11: tenants' KEKs live in a hardware security module.

Vocabulary as in :mod:`tensafe.tgsp`. :class:`Pkcs11KekProvider` talks to any PKCS#11
v2.40 token through its vendor module (``libsofthsm2.so`` for SoftHSM2 in tests and
development, the HSM vendor's library in production: Thales Luna, Entrust nShield,
AWS CloudHSM, YubiHSM 2, ...), with the ``python-pkcs11`` binding.

What the token holds and does:

* **KEKs are generated inside the token** (``C_GenerateKey``, ``CKM_AES_KEY_GEN``,
  256 bits) as token objects with ``CKA_SENSITIVE=true``, ``CKA_EXTRACTABLE=false``
  (so also ``CKA_NEVER_EXTRACTABLE`` and ``CKA_LOCAL``), ``CKA_ENCRYPT``/``CKA_DECRYPT``
  only, and ``CKA_WRAP``/``CKA_UNWRAP``/``CKA_DERIVE`` false. The key value can be
  neither read (``CKA_VALUE`` is sensitive) nor exported wrapped under another key; the
  attributes cannot be relaxed afterwards (PKCS#11 v2.40 §4.9: sensitive and
  non-extractable are one-way).
* **Wrapping and unwrapping are done by the token**: ``C_Encrypt``/``C_Decrypt`` with
  ``CKM_AES_GCM`` (NIST SP 800-38D), a fresh random 96-bit IV per wrap and a 128-bit
  tag. GCM, not ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649), because a TGSP wrapped key must be
  bound to its package by associated data (tenant, KEK id, adapter, manifest digest;
  :func:`tensafe.tgsp.dek_aad`) and RFC 5649 has none: a KWP-wrapped DEK could be moved
  into another package of the same tenant. SoftHSM2 2.6 implements both mechanisms;
  ``C_WrapKey`` would in addition require the DEK to be a token object, while the DEK
  is generated and used in the host anyway (it encrypts the payload there).

The DEK itself is in host memory during a wrap or unwrap, as with any envelope scheme;
what the HSM protects is the KEK: a stolen disk, database dump or backup of a service
holds only wrapped keys, and unwrapping needs the token and its user PIN, on the
token's own access control and audit log.

Objects: every version of a tenant's KEK is a secret key with ``CKA_LABEL =
"tensafe.kek/" + tenant_id`` and ``CKA_ID = u32 version || 16 random bytes``; the KEK
id stored in a wrapped key is the hex of ``CKA_ID``. The highest version wraps; every
version present unwraps what it wrapped.

PKCS#11 sessions are not safe for concurrent use (v2.40 §5.1: one thread per session
at a time), so the provider keeps one logged-in read-write session and serialises calls
on it with a lock; a token call takes well under a millisecond next to the registry's
verification of a package.
"""

from __future__ import annotations

import contextlib
import secrets
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass

from tensafe.common.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tensafe.tgsp.kek import (
    KEY_LENGTH,
    KekProvider,
    WrappedKey,
    _length_prefixed,
    integrity_failure,
)
from tensafe.tgsp.manifest import check_text

LABEL_PREFIX = "tensafe.kek/"
"""``CKA_LABEL`` of a tenant's KEK objects is this prefix plus the tenant id."""

_AAD_DOMAIN = b"tensafe.pkcs11-kek.v1.wrap\x00"
_IV_LENGTH = 12
_TAG_LENGTH = 16
_VERSION = struct.Struct(">I")
_ID_RANDOM_LENGTH = 16

# Errors a C_Decrypt returns for a tag that does not verify: SoftHSM2 reports
# CKR_GENERAL_ERROR, other tokens CKR_ENCRYPTED_DATA_INVALID or a length error.
_AUTHENTICATION_ERRORS = (
    pkcs11.GeneralError,
    pkcs11.EncryptedDataInvalid,
    pkcs11.EncryptedDataLenRange,
    pkcs11.DataInvalid,
    pkcs11.DataLenRange,
    pkcs11.FunctionFailed,
)

KEK_TEMPLATE: dict[Attribute, object] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}
"""Attributes of every generated KEK (see the module docstring)."""


class Pkcs11KekProvider(KekProvider):
    """Tenants' KEKs in a PKCS#11 token; see the module docstring.

    Args:
        module: Path of the token vendor's PKCS#11 library.
        token_label: ``CKA_LABEL`` of the token (``softhsm2-util --init-token --label``).
        pin: The token's user PIN.
        setting_names: Names of the settings the three values came from, for errors
            (module, token label, PIN).

    Raises:
        ConfigError: The module cannot be loaded, the token is not found, or the PIN is
            refused; the error names the setting.
    """

    PROVIDER_ID = "pkcs11"
    ALGORITHM = "AES-256-GCM"

    def __init__(
        self,
        *,
        module: Path,
        token_label: str,
        pin: str,
        setting_names: tuple[str, str, str] = ("module", "token_label", "pin"),
    ) -> None:
        module_setting, label_setting, pin_setting = setting_names
        if not module.is_file():
            raise ConfigError(module_setting, f"no PKCS#11 module at {module}")
        try:
            library = pkcs11.lib(str(module))
        except (RuntimeError, OSError) as error:  # dlopen failures surface as these
            raise ConfigError(module_setting, f"cannot load {module}: {error}") from error
        try:
            token = library.get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            raise ConfigError(label_setting, f"no token labelled {token_label!r}") from None
        except pkcs11.MultipleTokensReturned:
            raise ConfigError(
                label_setting, f"several tokens are labelled {token_label!r}"
            ) from None
        try:
            try:
                self._session = token.open(rw=True, user_pin=pin)
            except pkcs11.UserAlreadyLoggedIn:
                # PKCS#11 logins are per application, not per session (v2.40 §5.6): a
                # second provider in a process that is logged in already (an operator
                # command beside a service in tests) opens a session without C_Login.
                self._session = token.open(rw=True)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise ConfigError(pin_setting, f"the token {token_label!r} refused the PIN") from None
        except pkcs11.PinLocked:
            raise ConfigError(pin_setting, f"the PIN of token {token_label!r} is locked") from None
        except pkcs11.PKCS11Error as error:
            raise ConfigError(
                label_setting, f"cannot open token {token_label!r}: {type(error).__name__}"
            ) from error
        self._token_label = token_label
        self._lock = threading.Lock()

    @property
    def provider_id(self) -> str:
        """``pkcs11``."""
        return self.PROVIDER_ID

    def close(self) -> None:
        """Close the token session (logs out)."""
        # A session of a finalised library is gone already: nothing left to release.
        with self._lock, contextlib.suppress(pkcs11.PKCS11Error):
            self._session.close()

    # ---------------------------------------------------------------- versions

    def tenant_kek_ids(self, tenant_id: str) -> list[str]:
        """Ids of the tenant's KEK versions, oldest first."""
        with self._call():
            return [kek_id for _, kek_id, _ in self._keys(tenant_id)]

    def create_tenant_kek(self, tenant_id: str) -> str:
        """Generate the tenant's first KEK in the token; see
        :meth:`KekProvider.create_tenant_kek`."""
        with self._call():
            if self._keys(tenant_id):
                raise AlreadyExists(f"tenant {tenant_id!r} has a key-encryption key already")
            return self._generate(tenant_id, 1)

    def rotate_tenant_kek(self, tenant_id: str) -> str:
        """Generate the tenant's next KEK version; see :meth:`KekProvider.rotate_tenant_kek`."""
        with self._call():
            keys = self._keys(tenant_id)
            if not keys:
                raise NotFound(f"tenant {tenant_id!r} has no key-encryption key")
            return self._generate(tenant_id, keys[-1][0] + 1)

    def destroy_tenant_kek(self, tenant_id: str, kek_id: str) -> None:
        """``C_DestroyObject`` on an old version; see :meth:`KekProvider.destroy_tenant_kek`."""
        with self._call():
            keys = self._keys(tenant_id)
            for position, (_, candidate, key) in enumerate(keys):
                if candidate == kek_id:
                    if position == len(keys) - 1:
                        raise FailedPrecondition(
                            f"KEK {kek_id} is tenant {tenant_id!r}'s current KEK; rotate first"
                        )
                    key.destroy()
                    return
        raise NotFound(f"tenant {tenant_id!r} has no KEK {kek_id!r}")

    def kek_object(self, tenant_id: str, kek_id: str) -> pkcs11.SecretKey:
        """The token object of one KEK version (a handle: its value cannot be read).

        Raises:
            NotFound: No such version.
        """
        with self._call():
            for _, candidate, key in self._keys(tenant_id):
                if candidate == kek_id:
                    return key
        raise NotFound(f"tenant {tenant_id!r} has no KEK {kek_id!r}")

    # ---------------------------------------------------------------- wrap / unwrap

    def wrap(self, tenant_id: str, dek: bytes, aad: bytes) -> WrappedKey:
        """Encrypt ``dek`` in the token under the tenant's current KEK; see
        :meth:`KekProvider.wrap`."""
        if len(dek) != KEY_LENGTH:
            raise InvalidArgument("dek", f"must be {KEY_LENGTH} bytes")
        iv = secrets.token_bytes(_IV_LENGTH)
        with self._call():
            keys = self._keys(tenant_id)
            if not keys:
                raise NotFound(f"tenant {tenant_id!r} has no key-encryption key")
            _, kek_id, key = keys[-1]
            # python-pkcs11 mixes EncryptMixin/DecryptMixin into AES key objects.
            sealed = cast(pkcs11.EncryptMixin, key).encrypt(
                dek,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, self._aad(tenant_id, kek_id, aad), 128),
            )
        return WrappedKey(
            provider=self.PROVIDER_ID,
            kek_id=kek_id,
            tenant_id=tenant_id,
            algorithm=self.ALGORITHM,
            ciphertext=iv + _one_shot(sealed),
        )

    def unwrap(self, tenant_id: str, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Decrypt a wrapped key in the token with the KEK version that wrapped it; see
        :meth:`KekProvider.unwrap`."""
        self.check_binding(tenant_id, wrapped)
        if wrapped.algorithm != self.ALGORITHM:
            raise integrity_failure("wrapped key", f"unknown algorithm {wrapped.algorithm!r}")
        blob = wrapped.ciphertext
        if len(blob) != _IV_LENGTH + KEY_LENGTH + _TAG_LENGTH:
            raise integrity_failure("wrapped key", f"has {len(blob)} bytes, expected 60")
        with self._call():
            keys = self._keys(tenant_id)
            if not keys:
                raise NotFound(f"tenant {tenant_id!r} has no key-encryption key")
            key = next((k for _, kid, k in keys if kid == wrapped.kek_id), None)
            if key is None:
                raise integrity_failure(
                    "wrapped key",
                    f"wrapped under KEK {wrapped.kek_id!r}, which tenant {tenant_id!r} does "
                    "not have in this token (another deployment's, or a destroyed version)",
                )
            try:
                dek = cast(pkcs11.DecryptMixin, key).decrypt(
                    blob[_IV_LENGTH:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(
                        blob[:_IV_LENGTH], self._aad(tenant_id, wrapped.kek_id, aad), 128
                    ),
                )
            except _AUTHENTICATION_ERRORS as error:
                raise integrity_failure(
                    "wrapped key",
                    "does not authenticate under the tenant's KEK (edited key or different "
                    "associated data)",
                ) from error
        return _one_shot(dek)

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _call(self) -> Iterator[None]:
        """Serialise token calls; a token or session failure is UNAVAILABLE (retryable)."""
        with self._lock:
            try:
                yield
            except (
                pkcs11.DeviceError,
                pkcs11.DeviceRemoved,
                pkcs11.DeviceMemory,
                pkcs11.TokenNotPresent,
                pkcs11.SessionClosed,
                pkcs11.SessionHandleInvalid,
                pkcs11.UserNotLoggedIn,
            ) as error:
                raise Unavailable(
                    f"PKCS#11 token {self._token_label!r}: {type(error).__name__}"
                ) from error

    @staticmethod
    def _aad(tenant_id: str, kek_id: str, aad: bytes) -> bytes:
        return _AAD_DOMAIN + _length_prefixed(
            tenant_id.encode("utf-8"), kek_id.encode("utf-8"), aad
        )

    def _keys(self, tenant_id: str) -> list[tuple[int, str, pkcs11.SecretKey]]:
        check_text(tenant_id, "tenant_id")
        found: list[tuple[int, str, pkcs11.SecretKey]] = []
        for key in self._session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: LABEL_PREFIX + tenant_id}
        ):
            object_id = bytes(key[Attribute.ID])
            if len(object_id) != _VERSION.size + _ID_RANDOM_LENGTH:
                continue  # not one of ours, whatever its label says
            (version,) = _VERSION.unpack_from(object_id)
            assert isinstance(key, pkcs11.SecretKey)
            found.append((version, object_id.hex(), key))
        found.sort(key=lambda entry: entry[0])
        return found

    def _generate(self, tenant_id: str, version: int) -> str:
        object_id = _VERSION.pack(version) + secrets.token_bytes(_ID_RANDOM_LENGTH)
        self._session.generate_key(
            KeyType.AES,
            KEY_LENGTH * 8,
            label=LABEL_PREFIX + tenant_id,
            id=object_id,
            store=True,
            template=KEK_TEMPLATE,
        )
        return object_id.hex()


def _one_shot(result: bytes | Iterator[bytes]) -> bytes:
    """The result of a one-part C_Encrypt/C_Decrypt (bytes given, bytes returned)."""
    if not isinstance(result, bytes):
        raise TypeError("a one-part token call returned a stream")
    return result


__all__ = ["KEK_TEMPLATE", "LABEL_PREFIX", "Pkcs11KekProvider"]
