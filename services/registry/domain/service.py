"""The registry's use cases: publish, resolve, list, download, alias, delete, unwrap.

Every package is verified with :func:`tensafe.tgsp.verify` against the trusted signing
keys and the caller's tenant **before** it is stored, and again before the first byte of
a download leaves or a data key is unwrapped. Packages are stored content-addressed
(:mod:`tensafe.registry.store.objects`); the database holds names, versions, aliases
and the verified manifests. Vocabulary (DEK, KEK) as in :mod:`tensafe.tgsp`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import logging
import re
import struct
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import BinaryIO

from tensafe.common.auth import AuditRecord, AuditSink
from tensafe.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tensafe.common.quotas import quota_exceeded
from tensafe.registry.domain.access import Caller
from tensafe.registry.domain.keys import SigningKeys
from tensafe.registry.domain.model import AdapterRecord, Page, VersionRecord
from tensafe.registry.store.objects import ObjectStore, StagedObject
from tensafe.registry.store.sql import RegistryStore, RegistryTransaction
from tensafe.tgsp import KekProvider, Manifest, WrappedKey, dek_aad, signer_key_id, verify

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Adapter names: the contract's ``[A-Za-z0-9._-]{1,128}``, starting with a letter or
digit and without ``..``, so no name looks like a path piece."""

ALIAS = re.compile(r"[a-z0-9-]{1,32}")
"""Alias names, as the contract states."""

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# docs/tgsp.md §2.1: magic (8), format version u16, flags u16, manifest length u32,
# wrapped-key length u32, ciphertext length u64.
_HEADER = struct.Struct(">8sHHIIQ")

UNWRAP_AUDIT_KIND = "registry.data_key.unwrapped"
"""Audit event kind of every data-key unwrap."""


def check_adapter_name(name: str, field: str = "adapter_name") -> str:
    """Return ``name`` if it is a valid adapter name.

    Raises:
        InvalidArgument: Empty, too long, a character outside ``[A-Za-z0-9._-]`` (``/``,
            NUL, ...), a leading ``.``/``-``/``_`` or a ``..``.
    """
    if not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            field,
            "must match [A-Za-z0-9][A-Za-z0-9._-]{0,127} and contain no '..'",
        )
    return name


def check_alias(alias: str) -> str:
    """Return ``alias`` if it matches ``[a-z0-9-]{1,32}``.

    Raises:
        InvalidArgument: Otherwise.
    """
    if not ALIAS.fullmatch(alias):
        raise InvalidArgument("alias", "must match [a-z0-9-]{1,32}")
    return alias


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size", "must be >= 0")
    return DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)


def _encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this service issued") from None


@dataclasses.dataclass(frozen=True)
class PublishRequest:
    """The header of a publication.

    Attributes:
        adapter_name: The adapter to add a version to.
        size_bytes: Declared package size.
        request_id: Idempotency key ("" for none).
    """

    adapter_name: str
    size_bytes: int
    request_id: str


@dataclasses.dataclass(frozen=True)
class _Resolved:
    adapter_id: str
    version: VersionRecord


@dataclasses.dataclass(frozen=True)
class _Prefix:
    manifest_bytes: bytes
    wrapped_key_bytes: bytes


def _read_prefix(file: BinaryIO) -> _Prefix:
    """Read the manifest and wrapped-key sections of a package that verified."""
    file.seek(0)
    header = file.read(_HEADER.size)
    _magic, _version, _flags, manifest_length, wrapped_length, _ = _HEADER.unpack(header)
    manifest_bytes = file.read(manifest_length)
    wrapped_key_bytes = file.read(wrapped_length)
    return _Prefix(manifest_bytes=manifest_bytes, wrapped_key_bytes=wrapped_key_bytes)


class RegistryDomain:
    """The registry's use cases.

    Args:
        store: Metadata.
        objects: Package bytes.
        keys: The signing key and trusted keys.
        kek_provider: Holds the tenants' KEKs.
        audit: Where key unwraps are recorded.
        max_package_bytes: Largest package accepted.
        chunk_bytes: Bytes per download chunk.
        clock: Current UTC time.
    """

    def __init__(
        self,
        *,
        store: RegistryStore,
        objects: ObjectStore,
        keys: SigningKeys,
        kek_provider: KekProvider,
        audit: AuditSink,
        max_package_bytes: int,
        max_storage_bytes_per_tenant: int,
        chunk_bytes: int = 1 << 20,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._objects = objects
        self._keys = keys
        self._kek = kek_provider
        self._audit = audit
        self._max_package_bytes = max_package_bytes
        self._max_storage_bytes = max_storage_bytes_per_tenant
        self._chunk_bytes = chunk_bytes
        self._clock = clock

    @property
    def signing_keys(self) -> SigningKeys:
        """The registry's signing key and the trusted public keys."""
        return self._keys

    # ------------------------------------------------------------------ publish

    def check_publish_request(self, request: PublishRequest) -> None:
        """Validate a publication header before any byte is read.

        Raises:
            InvalidArgument: Bad name, size or request id.
            ResourceExhausted: The declared size is over the limit.
        """
        check_adapter_name(request.adapter_name, "header.adapter_name")
        if request.size_bytes <= 0:
            raise InvalidArgument("header.size_bytes", "must be > 0")
        if request.size_bytes > self._max_package_bytes:
            raise ResourceExhausted(
                f"package of {request.size_bytes} bytes exceeds the registry's limit of "
                f"{self._max_package_bytes} bytes",
                reason="PACKAGE_TOO_LARGE",
            )
        if len(request.request_id) > 128:
            raise InvalidArgument("header.request_id", "must be at most 128 characters")

    async def publish(
        self, caller: Caller, request: PublishRequest, chunks: AsyncIterator[bytes]
    ) -> VersionRecord:
        """Receive, verify and store a package as the adapter's next version.

        The bytes are staged (never visible under their digest until verified), then
        verified against the trusted keys and the caller's tenant, the adapter name is
        compared with the manifest's adapter id, and the data key is unwrapped once with
        the tenant's KEK (not returned) so that a stored package is one its tenant can
        open. Only then is the object committed and the version recorded. Identical
        bytes are stored once.

        Args:
            caller: The authorised caller (its tenant owns the new version).
            request: The header.
            chunks: The package bytes, in order.

        Returns:
            The new version (or, for a repeated request id, the version it created).

        Raises:
            InvalidArgument: Bad header, more or fewer bytes than declared, malformed
                package.
            ResourceExhausted: The package is over the size limit, or it would take the
                tenant's stored bytes over ``registry_max_storage_bytes_per_tenant``
                (reason ``QUOTA_EXCEEDED``; checked on the declared size before any byte
                is read, and again when the version is recorded).
            IntegrityError: (FAILED_PRECONDITION) a failed check, named: ``unknown
                signer``, ``signature``, ``… digest``, ``tenant mismatch``, ``wrapped key``.
            FailedPrecondition: Name and manifest disagree, the tenant has no KEK here, or
                the request id was used for another package.
        """
        self.check_publish_request(request)
        # The stream can never exceed the declared size (checked chunk by chunk below),
        # so a publish that cannot fit is refused before its first byte.
        # A retry of an accepted publish (same request id) is answered, never refused.
        async with self._store.transaction(read_only=True) as tx:
            retry = bool(request.request_id) and (
                await tx.version_by_request(caller.tenant_id, request.request_id) is not None
            )
            if not retry:
                stored = await tx.stored_bytes(caller.tenant_id)
                self._check_storage(caller, stored, request.size_bytes)
        staged = self._objects.stage()
        try:
            async for chunk in chunks:
                if staged.size + len(chunk) > request.size_bytes:
                    raise InvalidArgument(
                        "chunk",
                        f"the stream holds more than header.size_bytes={request.size_bytes}",
                    )
                staged.write(chunk)
            if staged.size != request.size_bytes:
                raise InvalidArgument(
                    "chunk",
                    f"the stream ended after {staged.size} of {request.size_bytes} bytes",
                )
            digest = await asyncio.to_thread(staged.finish)
            manifest, signer = await asyncio.to_thread(self._verify_upload, staged, caller)
            if manifest.adapter.adapter_id != request.adapter_name:
                raise FailedPrecondition(
                    f"adapter name mismatch: the package seals adapter "
                    f"{manifest.adapter.adapter_id!r}, not {request.adapter_name!r}",
                    reason="ADAPTER_NAME_MISMATCH",
                )
            return await self._record(caller, request, staged, digest, manifest, signer)
        finally:
            staged.discard()

    def _check_storage(self, caller: Caller, stored: int, adding: int) -> None:
        if stored + adding > self._max_storage_bytes:
            raise quota_exceeded(
                "registry_max_storage_bytes_per_tenant",
                self._max_storage_bytes,
                f"{stored} package bytes and this package adds {adding}",
            )

    def _verify_upload(self, staged: StagedObject, caller: Caller) -> tuple[Manifest, str]:
        manifest = verify(
            staged.path,
            trusted_keys=self._keys.trust_list,
            expected_tenant=caller.tenant_id,
        )
        with open(staged.path, "rb") as file:
            self._unwrap(file, manifest)
        return manifest, signer_key_id(staged.path)

    async def _record(
        self,
        caller: Caller,
        request: PublishRequest,
        staged: StagedObject,
        digest: str,
        manifest: Manifest,
        signer: str,
    ) -> VersionRecord:
        now = self._clock()
        async with self._store.transaction() as tx:
            if request.request_id:
                earlier = await tx.version_by_request(caller.tenant_id, request.request_id)
                if earlier is not None:
                    _, version = earlier
                    if (
                        version.adapter_name != request.adapter_name
                        or version.package_sha256 != digest
                    ):
                        raise FailedPrecondition(
                            "request_id was already used to publish a different package",
                            reason="REQUEST_ID_REUSED",
                        )
                    return version
            await tx.lock_tenant_storage(caller.tenant_id)
            self._check_storage(caller, await tx.stored_bytes(caller.tenant_id), staged.size)
            await tx.create_adapter(caller.tenant_id, request.adapter_name, now)
            adapter = await tx.find_adapter(caller.tenant_id, request.adapter_name, lock=True)
            assert adapter is not None  # created above, or by a concurrent publisher
            adapter_id, next_version = adapter.id, adapter.next_version
            record = VersionRecord(
                adapter_name=request.adapter_name,
                version=int(next_version),
                package_sha256=digest,
                size_bytes=staged.size,
                manifest_json=manifest.canonical_bytes().decode("utf-8"),
                signer_key_id=signer,
                create_time=now,
            )
            await tx.lock_object(digest)
            await asyncio.to_thread(self._objects.commit, staged, digest)
            await tx.insert_version(
                adapter_id=adapter_id,
                tenant_id=caller.tenant_id,
                record=record,
                request_id=request.request_id or None,
            )
            await tx.set_next_version(adapter_id, int(next_version) + 1)
        log.info(
            "published %s v%d (%s, %d bytes) for tenant %s",
            record.adapter_name,
            record.version,
            digest,
            record.size_bytes,
            caller.tenant_id,
        )
        return record

    # ------------------------------------------------------------------ reads

    async def _adapter(
        self, tx: RegistryTransaction, caller: Caller, name: str, *, lock: bool = False
    ) -> tuple[str, int]:
        check_adapter_name(name)
        row = await tx.find_adapter(caller.tenant_id, name, lock=lock)
        if row is None:
            raise NotFound(f"adapter {name!r} not found")
        return row.id, row.create_time_us

    async def get_adapter(self, caller: Caller, name: str) -> AdapterRecord:
        """An adapter with its latest version and aliases.

        Raises:
            NotFound: No such adapter in the caller's tenant.
        """
        async with self._store.transaction(read_only=True) as tx:
            adapter_id, created = await self._adapter(tx, caller, name)
            return await tx.adapter_record(adapter_id, name, created)

    async def list_adapters(
        self, caller: Caller, *, page_size: int, page_token: str
    ) -> Page[AdapterRecord]:
        """The caller's adapters by name, one page.

        Raises:
            InvalidArgument: Bad page size or token.
        """
        limit = _page_size(page_size)
        after = _decode_token(page_token) if page_token else ""
        async with self._store.transaction(read_only=True) as tx:
            rows = await tx.list_adapters(caller.tenant_id, after_name=after, limit=limit + 1)
            items = [
                await tx.adapter_record(row.id, row.name, row.create_time_us)
                for row in rows[:limit]
            ]
        token = _encode_token(items[-1].name) if len(rows) > limit else ""
        return Page(items=items, next_page_token=token)

    async def list_versions(
        self, caller: Caller, name: str, *, page_size: int, page_token: str
    ) -> Page[VersionRecord]:
        """An adapter's versions, newest first, one page.

        Raises:
            NotFound: No such adapter.
            InvalidArgument: Bad page size or token.
        """
        limit = _page_size(page_size)
        before: int | None = None
        if page_token:
            text = _decode_token(page_token)
            if not text.isdigit():
                raise InvalidArgument("page_token", "is not a token this service issued")
            before = int(text)
        async with self._store.transaction(read_only=True) as tx:
            adapter_id, _ = await self._adapter(tx, caller, name)
            rows = await tx.list_versions(adapter_id, name, before_version=before, limit=limit + 1)
        items = rows[:limit]
        token = _encode_token(str(items[-1].version)) if len(rows) > limit else ""
        return Page(items=items, next_page_token=token)

    async def _resolve(
        self, tx: RegistryTransaction, caller: Caller, name: str, *, version: int, alias: str
    ) -> _Resolved:
        adapter_id, _ = await self._adapter(tx, caller, name)
        if alias:
            check_alias(alias)
            target = await tx.alias_version(adapter_id, alias)
            if target is None:
                raise NotFound(f"adapter {name!r} has no alias {alias!r}")
            version = target
        elif version < 0:
            raise InvalidArgument("version", "must be >= 1 (0: the latest)")
        elif version == 0:
            record = await tx.adapter_record(adapter_id, name, 0)
            if record.latest_version == 0:
                raise NotFound(f"adapter {name!r} has no versions")
            version = record.latest_version
        found = await tx.get_version(adapter_id, name, version)
        if found is None:
            raise NotFound(f"adapter {name!r} has no version {version}")
        return _Resolved(adapter_id=adapter_id, version=found)

    async def resolve(
        self, caller: Caller, name: str, *, version: int = 0, alias: str = ""
    ) -> VersionRecord:
        """One version by number, alias, or (neither) the latest.

        Raises:
            NotFound: No such adapter, alias or version.
            InvalidArgument: Bad name, alias or version.
        """
        async with self._store.transaction(read_only=True) as tx:
            return (await self._resolve(tx, caller, name, version=version, alias=alias)).version

    async def download(
        self, caller: Caller, name: str, *, version: int = 0, alias: str = ""
    ) -> AsyncIterator[VersionRecord | bytes]:
        """Stream a package: its version record, then its bytes in chunks.

        The stored object is verified (trusted signer, signature, digests, tenant) and
        its manifest compared with the recorded one before the record is yielded;
        the bytes then come from the same open file.

        Raises:
            NotFound: No such adapter, alias or version (or the object is missing).
            IntegrityError: The stored package fails verification.
        """
        record = await self.resolve(caller, name, version=version, alias=alias)
        with self._objects.open(record.package_sha256) as file:
            await asyncio.to_thread(self._verify_stored, file, record, caller)
            file.seek(0)
            yield record
            while True:
                block = await asyncio.to_thread(file.read, self._chunk_bytes)
                if not block:
                    break
                yield block

    def _verify_stored(self, file: BinaryIO, record: VersionRecord, caller: Caller) -> Manifest:
        file.seek(0)
        manifest = verify(
            file, trusted_keys=self._keys.trust_list, expected_tenant=caller.tenant_id
        )
        if manifest.canonical_bytes().decode("utf-8") != record.manifest_json:
            raise FailedPrecondition(
                "stored package's manifest differs from the one recorded at publication",
                reason="INTEGRITY_CHECK_FAILED",
            )
        return manifest

    def _unwrap(self, file: BinaryIO, manifest: Manifest) -> bytes:
        prefix = _read_prefix(file)
        wrapped = WrappedKey.from_canonical_bytes(prefix.wrapped_key_bytes)
        aad = dek_aad(
            tenant_id=manifest.tenant_id,
            adapter_id=manifest.adapter.adapter_id,
            adapter_version=manifest.adapter.version,
            manifest_sha256=hashlib.sha256(prefix.manifest_bytes).hexdigest(),
            format_version=manifest.format_version,
        )
        try:
            dek: bytes = self._kek.unwrap(manifest.tenant_id, wrapped, aad)
        except NotFound:
            raise FailedPrecondition(
                f"tenant {manifest.tenant_id!r} has no key-encryption key in this registry; "
                "an operator creates it with `python -m tensafe.registry.admin "
                "create-tenant-kek TENANT`",
                reason="TENANT_KEK_MISSING",
            ) from None
        return dek

    async def unwrap_data_key(self, caller: Caller, name: str, version: int) -> bytes:
        """Unwrap a package's DEK for its owning tenant, recording an audit event.

        The package is verified first; the event is recorded durably before the key is
        returned, so an unwrap that cannot be audited does not happen.

        Raises:
            NotFound: No such adapter or version in the caller's tenant.
            IntegrityError: The stored package fails verification or does not unwrap.
            Unavailable: The audit event could not be recorded.
        """
        if version < 1:
            raise InvalidArgument("version", "must be >= 1")
        record = await self.resolve(caller, name, version=version)

        def unwrap() -> bytes:
            with self._objects.open(record.package_sha256) as file:
                manifest = self._verify_stored(file, record, caller)
                return self._unwrap(file, manifest)

        dek = await asyncio.to_thread(unwrap)
        await self._audit.record(
            AuditRecord(
                kind=UNWRAP_AUDIT_KIND,
                service="registry",
                tenant_id=caller.tenant_id,
                principal_id=caller.principal_id,
                payload={
                    "adapter_name": name,
                    "version": record.version,
                    "package_sha256": record.package_sha256,
                    "acting_for_tenant": caller.acting_for_tenant,
                    "caller_tenant_id": caller.caller_tenant_id,
                },
            )
        )
        return dek

    # ------------------------------------------------------------------ changes

    async def set_alias(self, caller: Caller, name: str, alias: str, version: int) -> AdapterRecord:
        """Point ``alias`` at an existing version.

        Raises:
            NotFound: No such adapter or version.
            InvalidArgument: Bad alias or version.
        """
        check_alias(alias)
        if version < 1:
            raise InvalidArgument("version", "must be >= 1")
        async with self._store.transaction() as tx:
            adapter_id, created = await self._adapter(tx, caller, name, lock=True)
            if await tx.get_version(adapter_id, name, version) is None:
                raise NotFound(f"adapter {name!r} has no version {version}")
            await tx.set_alias(adapter_id, alias, version)
            return await tx.adapter_record(adapter_id, name, created)

    async def delete(self, caller: Caller, name: str, version: int) -> None:
        """Delete one version (and its aliases), or with ``version == 0`` the adapter.

        Objects no version references any more are removed from the object store.

        Raises:
            NotFound: No such adapter or version.
            InvalidArgument: Negative version.
        """
        if version < 0:
            raise InvalidArgument("version", "must be >= 0 (0: every version)")
        async with self._store.transaction() as tx:
            adapter_id, _ = await self._adapter(tx, caller, name, lock=True)
            if version and await tx.get_version(adapter_id, name, version) is None:
                raise NotFound(f"adapter {name!r} has no version {version}")
            digests = await tx.delete_versions(adapter_id, version or None)
            if not version:
                await tx.delete_adapter(adapter_id)
        for digest in digests:
            await self._collect(digest)

    async def _collect(self, digest: str) -> None:
        async with self._store.transaction() as tx:
            await tx.lock_object(digest)
            if not await tx.object_referenced(digest):
                await asyncio.to_thread(self._objects.delete, digest)
