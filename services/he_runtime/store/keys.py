"""Galois-key files: ``<data_dir>/he_runtime/keys/<session_id>.galois``.

A session's public evaluation keys (not secret, but tenant data) are written before its
row commits: to a temporary file, fsynced, then renamed, so a reader never sees a
partial file. The writer holds an exclusive ``flock`` on the temporary file until the
rename; :meth:`KeyFiles.sweep` removes every temporary file nobody holds (a crash's
leftovers) without touching one another replica sharing the folder is still writing.
A file whose row never committed (a crash between rename and commit) is removed by the
start-up sweep once it is older than a grace period.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from pathlib import Path

_ID = re.compile(r"[0-9a-f]{32}")
_SUFFIX = ".galois"
_TEMP_MARK = ".tmp-"


class KeyFiles:
    """The key folder of one runtime (shared by every replica serving the same DB).

    Args:
        root: The folder (created if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> Path:
        """The key file of ``session_id`` (ids are server-made hex; checked anyway)."""
        if not _ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.root / f"{session_id}{_SUFFIX}"

    def write(self, session_id: str, data: bytes) -> None:
        """Write the keys durably (temp file, fsync, rename, fsync the folder)."""
        final = self.path(session_id)
        temp = self.root / f"{final.name}{_TEMP_MARK}{secrets.token_hex(8)}"
        with open(temp, "xb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            os.chmod(temp, 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temp, final)
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def read(self, session_id: str) -> bytes | None:
        """The keys of ``session_id``, or None when its file is missing."""
        try:
            return self.path(session_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, session_id: str) -> None:
        """Delete the key file if it exists."""
        self.path(session_id).unlink(missing_ok=True)

    def ids(self) -> set[str]:
        """Ids of every complete key file."""
        return {
            path.name.removesuffix(_SUFFIX)
            for path in self.root.glob(f"*{_SUFFIX}")
            if _ID.fullmatch(path.name.removesuffix(_SUFFIX))
        }

    def sweep(self, *, known: set[str], grace_seconds: float) -> int:
        """Remove abandoned temporary files and key files without a row.

        Args:
            known: Ids that have a row.
            grace_seconds: A row-less key file younger than this may belong to a
                creation still committing on another replica; it is kept.

        Returns:
            How many files were removed.
        """
        removed = 0
        for temp in self.root.glob(f"*{_TEMP_MARK}*"):
            with contextlib.suppress(FileNotFoundError), open(temp, "rb") as handle:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being written right now
                temp.unlink(missing_ok=True)
                removed += 1
        cutoff = time.time() - grace_seconds
        for session_id in self.ids() - known:
            path = self.path(session_id)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
