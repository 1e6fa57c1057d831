"""KEK rotation: a new KEK version for a tenant, every package re-wrapped under it.

Vocabulary as in :mod:`tensafe.tgsp`. :meth:`KekRotations.rotate` is a resumable job
whose state lives in the database (``registry_kek_rotations``):

1. If the tenant has a rotation still ``running`` (an earlier run was interrupted), it
   is resumed with its KEK version; otherwise the provider makes a new KEK version
   (which wraps every package sealed from then on) and a ``running`` row records it.
2. Every distinct package object of the tenant is read: one whose wrapped key already
   names the new KEK version is done (a resumed run skips it); a format-2 package is
   re-wrapped with :func:`tensafe.tgsp.rewrap_to` (verified first; manifest, ciphertext
   and signature unchanged) into a new content-addressed object, and in one
   transaction its versions are pointed at the new object and the row's count moves;
   the old object is then removed when nothing references it. A format-1 package
   cannot be re-wrapped (its signature covers the wrapped key) and is reported as
   pinning its KEK version.
3. The row is marked ``done``.

A run interrupted between writing a new object and the transaction leaves that object
unreferenced (the version still names the old one, which is re-wrapped again on
resume); it is never served. :meth:`KekRotations.destroy` destroys an old KEK version
only when no stored package needs it, so every package keeps opening. Package digests
change with re-wrapping (the wrapped-key section is part of the file); version
numbers, manifests and signatures do not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import BinaryIO, cast

from tensafe.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tensafe.registry.domain.keys import SigningKeys
from tensafe.registry.store.objects import ObjectStore, StagedObject
from tensafe.registry.store.sql import RegistryStore
from tensafe.tgsp import Envelope, KekProvider, read_envelope, rewrap_to

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RotationReport:
    """What a rotation did.

    Attributes:
        tenant_id: The tenant.
        kek_id: The KEK version every re-wrappable package is now under.
        resumed: Whether an interrupted rotation was continued.
        rewrapped: Package objects re-wrapped by this run.
        pinned: Versions (``name@version``) of format-1 packages that keep their older
            KEK version (re-publish them to free it).
        kek_ids: The tenant's KEK versions after the run, oldest first.
    """

    tenant_id: str
    kek_id: str
    resumed: bool
    rewrapped: int
    pinned: tuple[str, ...]
    kek_ids: tuple[str, ...]


class KekRotations:
    """Rotates tenants' KEKs and destroys versions no package needs.

    Args:
        store: Metadata.
        objects: Package bytes.
        keys: The trusted signing keys (packages are verified before re-wrapping).
        kek_provider: Holds the tenants' KEK versions.
        clock: Current UTC time.
    """

    def __init__(
        self,
        *,
        store: RegistryStore,
        objects: ObjectStore,
        keys: SigningKeys,
        kek_provider: KekProvider,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._objects = objects
        self._keys = keys
        self._kek = kek_provider
        self._clock = clock

    async def rotate(self, tenant_id: str) -> RotationReport:
        """Rotate (or resume rotating) ``tenant_id``'s KEK; see the module docstring.

        Raises:
            NotFound: The tenant has no KEK.
            IntegrityError: A stored package fails verification (the run stops; the
                rotation stays ``running`` and resumes once the package is dealt with).
        """
        async with self._store.transaction(read_only=True) as tx:
            running = await tx.running_rotation(tenant_id)
        if running is None:
            kek_id = await asyncio.to_thread(self._kek.rotate_tenant_kek, tenant_id)
            async with self._store.transaction() as tx:
                await tx.insert_rotation(tenant_id, kek_id, self._clock())
            log.info("tenant %s: new KEK version %s; re-wrapping packages", tenant_id, kek_id)
        else:
            kek_id = running.kek_id
            log.info("tenant %s: resuming the re-wrap under KEK version %s", tenant_id, kek_id)
        async with self._store.transaction(read_only=True) as tx:
            objects = await tx.tenant_objects(tenant_id)
        rewrapped = 0
        pinned: list[str] = []
        for digest, version_names in objects:
            envelope = await asyncio.to_thread(self._envelope, digest)
            if envelope is None or envelope.wrapped_key.kek_id == kek_id:
                continue
            if envelope.format_version == 1:
                pinned += version_names
                continue
            await self._rewrap_object(tenant_id, kek_id, digest)
            rewrapped += 1
        async with self._store.transaction() as tx:
            await tx.finish_rotation(tenant_id, kek_id, pinned=len(pinned), now=self._clock())
        kek_ids = await asyncio.to_thread(self._kek.tenant_kek_ids, tenant_id)
        return RotationReport(
            tenant_id=tenant_id,
            kek_id=kek_id,
            resumed=running is not None,
            rewrapped=rewrapped,
            pinned=tuple(pinned),
            kek_ids=tuple(kek_ids),
        )

    async def usage(self, tenant_id: str) -> dict[str, list[str]]:
        """Which versions (``name@version``) need each KEK version of the tenant."""
        async with self._store.transaction(read_only=True) as tx:
            objects = await tx.tenant_objects(tenant_id)
        needed: dict[str, list[str]] = {
            kek_id: [] for kek_id in await asyncio.to_thread(self._kek.tenant_kek_ids, tenant_id)
        }
        for digest, version_names in objects:
            envelope = await asyncio.to_thread(self._envelope, digest)
            if envelope is not None:
                needed.setdefault(envelope.wrapped_key.kek_id, []).extend(version_names)
        return needed

    async def destroy(self, tenant_id: str, kek_id: str) -> None:
        """Destroy an old KEK version that no stored package needs.

        Raises:
            NotFound: The tenant has no such KEK version.
            FailedPrecondition: It is the current version, a rotation is still running,
                or packages still need it (the message names them).
        """
        if not kek_id:
            raise InvalidArgument("kek_id", "required")
        async with self._store.transaction(read_only=True) as tx:
            running = await tx.running_rotation(tenant_id)
        if running is not None:
            raise FailedPrecondition(
                f"tenant {tenant_id!r} has a KEK rotation still running; resume it first",
                reason="KEK_ROTATION_RUNNING",
            )
        kek_ids = await asyncio.to_thread(self._kek.tenant_kek_ids, tenant_id)
        if kek_id not in kek_ids:
            raise NotFound(f"tenant {tenant_id!r} has no KEK {kek_id!r}")
        if kek_id == kek_ids[-1]:
            raise FailedPrecondition(
                f"KEK {kek_id} is tenant {tenant_id!r}'s current KEK; rotate first",
                reason="KEK_CURRENT",
            )
        needed = await self.usage(tenant_id)
        users = needed.get(kek_id, [])
        if users:
            raise FailedPrecondition(
                f"KEK {kek_id} still wraps the data keys of {len(users)} version(s): "
                f"{', '.join(users[:10])}",
                reason="KEK_IN_USE",
            )
        await asyncio.to_thread(self._kek.destroy_tenant_kek, tenant_id, kek_id)
        log.warning("tenant %s: destroyed KEK version %s", tenant_id, kek_id)

    def _envelope(self, digest: str) -> Envelope | None:
        try:
            with self._objects.open(digest) as file:
                return read_envelope(file)
        except NotFound:
            return None  # deleted meanwhile: nothing to re-wrap

    async def _rewrap_object(self, tenant_id: str, kek_id: str, digest: str) -> None:
        staged = self._objects.stage()
        try:

            def produce() -> str:
                with self._objects.open(digest) as source:
                    wrapped = rewrap_to(
                        source,
                        cast(BinaryIO, _StagedWriter(staged)),
                        trusted_keys=self._keys.trust_list,
                        kek_provider=self._kek,
                        tenant_id=tenant_id,
                    )
                if wrapped.kek_id != kek_id:
                    raise FailedPrecondition(
                        f"tenant {tenant_id!r}'s current KEK is {wrapped.kek_id}, not the "
                        f"rotation's {kek_id}: another rotation overtook this one",
                        reason="KEK_ROTATION_OVERTAKEN",
                    )
                return staged.finish()

            new_digest = await asyncio.to_thread(produce)
            async with self._store.transaction() as tx:
                await tx.lock_object(new_digest)
                await asyncio.to_thread(self._objects.commit, staged, new_digest)
                await tx.replace_object(tenant_id, digest, new_digest, staged.size)
                await tx.count_rewrapped(tenant_id, kek_id)
        finally:
            staged.discard()
        async with self._store.transaction() as tx:
            await tx.lock_object(digest)
            if not await tx.object_referenced(digest):
                await asyncio.to_thread(self._objects.delete, digest)


class _StagedWriter:
    """The write side of a staged object as a binary stream for :func:`rewrap_to`."""

    def __init__(self, staged: StagedObject) -> None:
        self._staged = staged

    def write(self, data: bytes | memoryview) -> int:
        self._staged.write(bytes(data))
        return len(data)
