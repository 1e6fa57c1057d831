"""Trust lists: which signing keys may sign packages for which tenants.

A bare set of trusted keys lets any trusted key sign a package for any tenant. A
:class:`TrustList` binds each key to the tenants it may sign for, or to every tenant
for the platform's own services (the registry's key, the trainer's publisher key). The
readers pass a trust list wherever they pass ``trusted_keys``
(:func:`tensafe.tgsp.verify`, :func:`~tensafe.tgsp.open_package`, ...); after the
signature verifies, the signer must be bound to the manifest's tenant, or the package
is refused with the check ``signer not bound to tenant``.

The JSON form, a file the operators pin in each reader (the registry, the HE runtime,
an SDK user), never fetched from the registry that serves the packages::

    {"signers": [
      {"public_key": "<base64 of the 32-byte Ed25519 key>", "tenants": ["*"]},
      {"public_key": "...", "tenants": ["tenant-a", "tenant-b"]}
    ]}

``"*"`` means every tenant. Key ids are derived from the public keys.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tensafe.common.errors import InvalidArgument
from tensafe.tgsp.kek import integrity_failure
from tensafe.tgsp.signing import VerifyingKey

EVERY_TENANT = "*"
"""The tenant entry of a platform signer: it may sign for every tenant."""


@dataclass(frozen=True)
class TrustedSigner:
    """A signing key and the tenants it may sign packages for.

    Attributes:
        key: The Ed25519 public key.
        tenants: Tenant ids, or ``{"*"}`` for every tenant.
    """

    key: VerifyingKey
    tenants: frozenset[str]

    def __post_init__(self) -> None:
        if not self.tenants:
            raise InvalidArgument("trust_list.tenants", "a signer must be bound to a tenant or '*'")

    def may_sign_for(self, tenant_id: str) -> bool:
        """Whether the key may sign packages of ``tenant_id``."""
        return EVERY_TENANT in self.tenants or tenant_id in self.tenants


class TrustList:
    """Signing keys bound to tenants; iterates over its keys like ``trusted_keys``.

    Args:
        signers: The entries; a key listed twice has the union of its tenants.
    """

    def __init__(self, signers: Iterable[TrustedSigner]) -> None:
        merged: dict[str, TrustedSigner] = {}
        for signer in signers:
            known = merged.get(signer.key.key_id)
            tenants = signer.tenants | (known.tenants if known else frozenset())
            merged[signer.key.key_id] = TrustedSigner(key=signer.key, tenants=tenants)
        self._signers = merged

    def __iter__(self) -> Iterator[VerifyingKey]:
        return iter([signer.key for signer in self._signers.values()])

    def __len__(self) -> int:
        return len(self._signers)

    @property
    def signers(self) -> list[TrustedSigner]:
        """The entries, one per key."""
        return list(self._signers.values())

    def check(self, signer_key_id: str, tenant_id: str) -> None:
        """Refuse a package of ``tenant_id`` signed by a key not bound to it.

        Raises:
            IntegrityError: ``signer not bound to tenant`` (also for an unknown key).
        """
        signer = self._signers.get(signer_key_id)
        if signer is None or not signer.may_sign_for(tenant_id):
            raise integrity_failure(
                "signer not bound to tenant",
                f"key {signer_key_id} may not sign packages of tenant {tenant_id!r}",
            )

    def to_json(self) -> dict[str, object]:
        """The JSON form (module docstring)."""
        return {
            "signers": [
                {
                    "public_key": base64.b64encode(signer.key.to_raw()).decode("ascii"),
                    "tenants": sorted(signer.tenants),
                }
                for signer in self._signers.values()
            ]
        }

    @classmethod
    def from_json(cls, value: object, *, field: str = "trust_list") -> TrustList:
        """Parse the JSON form.

        Raises:
            InvalidArgument: A malformed document; the field names where.
        """
        if not isinstance(value, dict) or set(value) != {"signers"}:
            raise InvalidArgument(field, 'must be an object with exactly "signers"')
        entries = value["signers"]
        if not isinstance(entries, list) or not entries:
            raise InvalidArgument(f"{field}.signers", "must be a non-empty list")
        signers = []
        for index, entry in enumerate(entries):
            where = f"{field}.signers[{index}]"
            if not isinstance(entry, dict) or set(entry) != {"public_key", "tenants"}:
                raise InvalidArgument(where, 'must have exactly "public_key" and "tenants"')
            tenants = entry["tenants"]
            if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
                raise InvalidArgument(f"{where}.tenants", "must be a list of tenant ids or '*'")
            try:
                raw = base64.b64decode(str(entry["public_key"]), validate=True)
            except binascii.Error as exc:
                raise InvalidArgument(f"{where}.public_key", "not valid base64") from exc
            signers.append(
                TrustedSigner(key=VerifyingKey.from_raw(raw), tenants=frozenset(tenants))
            )
        return cls(signers)

    @classmethod
    def from_file(cls, path: Path) -> TrustList:
        """Read a trust-list file.

        Raises:
            InvalidArgument: Unreadable or malformed (``field`` names the file).
        """
        try:
            document = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(str(path), f"not a readable JSON trust list: {exc}") from exc
        return cls.from_json(document, field=str(path))


__all__ = ["EVERY_TENANT", "TrustList", "TrustedSigner"]
