"""Local object folder for engine states, checkpoints and sampler weights.

Objects are written to a temporary file, fsynced and renamed into place *before* the
database row that references them commits, so a committed row never points at a
missing or partial file. The row stores the object's sha256; reads verify it, so a
corrupted or swapped file is an :class:`~tensafe.common.errors.IntegrityError`, never
silently loaded. A crash between the write and the commit leaves an unreferenced file,
which costs disk space only.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from tensafe.common.errors import IntegrityError, NotFound

_RELATIVE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class ObjectFolder:
    """Objects under ``<data_dir>/trainer``, addressed by relative paths.

    Args:
        root: The folder; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def _resolve(self, relative: str) -> Path:
        if not _RELATIVE.match(relative) or ".." in relative.split("/"):
            raise ValueError(f"invalid object path {relative!r}")
        return self._root / relative

    def write(self, relative: str, data: bytes) -> str:
        """Store ``data`` durably at ``relative``; returns its sha256 (hex)."""
        path = self._resolve(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return hashlib.sha256(data).hexdigest()

    def read(self, relative: str, *, sha256: str) -> bytes:
        """Read an object and check its digest.

        Raises:
            NotFound: The file is missing.
            IntegrityError: Its content does not match ``sha256``.
        """
        path = self._resolve(relative)
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise NotFound(f"object {relative} is missing") from error
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"object {relative} does not match its recorded sha256")
        return data

    def delete(self, relative: str) -> None:
        """Remove an object if it exists."""
        path = self._resolve(relative)
        path.unlink(missing_ok=True)
