"""Content-addressed object storage for TGSP packages.

Keys are the lower-case hex SHA-256 of the object's bytes and nothing else: no part of
an adapter name, tenant id or any other caller-supplied string ever becomes part of a
path (the seeds' STORE-01 was a storage key built from a user-supplied name).

An upload is written to a *staging* file first (:meth:`ObjectStore.stage`), hashed as
it arrives, and becomes visible under its digest only through
:meth:`ObjectStore.commit`, an atomic rename after fsync; a reader therefore never sees
a partial object, and a crash leaves at most an unreferenced staging file.

The local store's writer holds an exclusive ``flock`` on its staging file from creation
until commit or discard; a process that dies (even by SIGKILL) drops it. Opening the
store removes every staging file nobody holds, so a crash's leftovers are cleaned at the
next start without touching an upload another replica sharing the folder is still
writing (Linux NFS clients map ``flock`` to NFS locks, so this holds on ReadWriteMany).
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tensafe.common.errors import InvalidArgument, NotFound

_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is 64 lower-case hex digits.

    Raises:
        InvalidArgument: Anything else (so no string reaches a path unchecked).
    """
    if not _DIGEST.fullmatch(digest):
        raise InvalidArgument("sha256", "must be 64 lower-case hex digits")
    return digest


class StagedObject(abc.ABC):
    """An upload in progress: append bytes, then commit or discard."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Bytes written so far."""

    @property
    @abc.abstractmethod
    def path(self) -> Path:
        """A local file holding the bytes written so far (for verification)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append ``data``."""

    @abc.abstractmethod
    def finish(self) -> str:
        """Flush and fsync; return the SHA-256 (hex) of everything written."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Delete the staged bytes (idempotent)."""


class ObjectStore(abc.ABC):
    """Immutable objects addressed by their SHA-256."""

    @abc.abstractmethod
    def stage(self) -> StagedObject:
        """Start an upload."""

    @abc.abstractmethod
    def commit(self, staged: StagedObject, digest: str) -> bool:
        """Make a finished upload visible under ``digest``.

        Returns:
            ``True`` if the object was new, ``False`` if an identical one existed (the
            staged bytes are then discarded).
        """

    @abc.abstractmethod
    def exists(self, digest: str) -> bool:
        """Whether an object is stored under ``digest``."""

    @abc.abstractmethod
    @contextlib.contextmanager
    def open(self, digest: str) -> Iterator[BinaryIO]:
        """Open an object for reading (seekable).

        Raises:
            NotFound: No such object.
        """

    @abc.abstractmethod
    def delete(self, digest: str) -> None:
        """Delete an object if it exists."""


class _LocalStaged(StagedObject):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 - closed in finish()
        os.chmod(path, 0o600)
        # Held until commit or discard: a sweeping store leaves a locked file alone.
        self._lock: BinaryIO | None = self._file
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(self._file.fileno()).st_ino:
            # A sweep unlinked the file between its creation and the lock.
            self._file.close()
            raise RuntimeError(f"staging file {path.name} was removed while being created")
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> Path:
        return self._path

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise RuntimeError("staged object already finished")
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def finish(self) -> str:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file = None  # no more writes; the handle stays open for its lock
        return self._hash.hexdigest()

    def release(self) -> None:
        """Close the handle, which drops the lock (after commit or before unlink)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._file = None

    def discard(self) -> None:
        # Unlink first: the file is gone before its lock is, so no sweep races us.
        self._path.unlink(missing_ok=True)
        self.release()


class LocalObjectStore(ObjectStore):
    """Objects as files ``<root>/sha256/<2 hex>/<64 hex>``; staging in ``<root>/staging``.

    Args:
        root: The store's folder (created if missing, mode 0700).
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._staging = root / "staging"
        self._objects = root / "sha256"
        for folder in (root, self._staging, self._objects):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sweep_staging()

    def sweep_staging(self) -> int:
        """Delete staging files no live writer holds (a crashed upload's leftovers).

        Returns:
            How many files were deleted.
        """
        removed = 0
        for path in self._staging.glob("upload-*"):
            try:
                file = open(path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue
            with file:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live upload
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self._objects / digest[:2] / digest

    def stage(self) -> StagedObject:
        """Start an upload in the staging folder."""
        return _LocalStaged(self._staging / f"upload-{secrets.token_hex(16)}")

    def commit(self, staged: StagedObject, digest: str) -> bool:
        """Rename the staged file to its digest's path (atomic, then fsync the folder)."""
        target = self._path(digest)
        if target.exists():
            staged.discard()
            return False
        target.parent.mkdir(mode=0o700, exist_ok=True)
        # Same file system, so rename is atomic: the object appears complete or not at
        # all. fsync of the folder makes the new name survive a power loss.
        os.replace(staged.path, target)
        _fsync_dir(target.parent)
        if isinstance(staged, _LocalStaged):
            staged.release()
        return True

    def exists(self, digest: str) -> bool:
        """Whether the object's file exists."""
        return self._path(digest).is_file()

    @contextlib.contextmanager
    def open(self, digest: str) -> Iterator[BinaryIO]:
        """Open the object's file for reading."""
        try:
            file = open(self._path(digest), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(f"object {digest} is missing from the object store") from None
        try:
            yield file
        finally:
            file.close()

    def delete(self, digest: str) -> None:
        """Unlink the object's file if present."""
        path = self._path(digest)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
