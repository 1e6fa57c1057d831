r"""Base model folders: their names, their layouts and their weight files.

A base models directory holds Hugging Face model folders (each with a ``config.json``)
in any of three layouts, so that a folder written by ``save_pretrained``, a copy named
like its Hub repository and a Hub cache can all be mounted as they are:

* ``<root>/<name>/`` — a plain folder, named ``name`` (``tiny-llama``);
* ``<root>/<org>/<name>/`` — nested as on the Hub, named ``org/name``
  (``meta-llama/Llama-3.2-1B``); ``<root>/<org>`` itself holds no ``config.json``;
* ``<root>/models--<org>--<name>/`` — an entry of a Hugging Face hub cache (what
  ``huggingface-cli download`` or ``snapshot_download`` write with ``HF_HUB_CACHE`` set
  to ``<root>``), named ``org/name`` and resolved to ``snapshots/<revision>/`` where
  ``<revision>`` is the commit ``refs/main`` holds (the only snapshot when there is no
  ``refs/main``). Its files are symlinks into ``blobs/``, read through the links.

A name has one or two components (``name`` or ``org/name``), each starting with a
letter or digit, made of letters, digits, ``.``, ``_`` and ``-``, without ``..``; the
whole name is at most 128 characters (the trainer stores it in a 128-character column).
So no name can leave the directory: there is no absolute name, no ``..`` and no third
component. A plain or nested folder wins over a cache entry of the same name.

The weights are the shards ``model.safetensors.index.json`` names when that file is
present (a missing shard is an error, an extra ``*.safetensors`` file is not weights),
else every ``*.safetensors`` file of the folder. Their digest is the sha256 of the
single file, or for several files the sha256 of the ``sha256sum`` listing
(``"<sha256>  <file name>\n"`` per file, sorted by name); the trainer and the SDK both
compute it here, so a TGSP manifest names the base model's weights either way.

Only the standard library is used: the slim client install (no torch) reads the same
layouts.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tensafe.common.errors import FailedPrecondition, InvalidArgument

MAX_NAME_LENGTH = 128
"""Longest base model name (``org/name`` included)."""

CACHE_PREFIX = "models--"
"""Folder name prefix of a Hugging Face hub cache entry (``models--org--name``)."""

SHARD_INDEX = "model.safetensors.index.json"
"""The index of sharded safetensors weights (``save_pretrained(max_shard_size=...)``)."""

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WEIGHT_SUFFIX = ".safetensors"


def check_model_name(name: str, field: str = "base_model") -> tuple[str, ...]:
    """Check a base model name and return its components.

    Args:
        name: ``name`` or ``org/name``.
        field: The request field the name came from, for the error.

    Returns:
        The one or two path components.

    Raises:
        InvalidArgument: The name is empty, too long or not one or two safe components.
    """
    if not name:
        raise InvalidArgument(field, "must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_LENGTH} characters")
    parts = tuple(name.split("/"))
    if len(parts) > 2:
        raise InvalidArgument(field, "must be a model name or org/name (two components at most)")
    for part in parts:
        if not _COMPONENT.match(part) or ".." in part:
            raise InvalidArgument(
                field,
                f"component {part!r} must start with a letter or digit and hold only "
                "letters, digits, '.', '_' and '-' (no '..', no absolute path)",
            )
    return parts


def model_folder(root: Path, name: str) -> Path | None:
    """The folder of the base model ``name`` under ``root``, or ``None`` if there is none.

    Args:
        root: The base models directory.
        name: A name :func:`check_model_name` accepts.

    Raises:
        InvalidArgument: ``name`` is not a valid name.
        FailedPrecondition: A hub cache entry of that name has no usable snapshot.
    """
    parts = check_model_name(name)
    plain = root.joinpath(*parts)
    nested_in_a_model = len(parts) == 2 and (root / parts[0] / "config.json").is_file()
    if (plain / "config.json").is_file() and not nested_in_a_model:
        return plain
    cache = root / (CACHE_PREFIX + "--".join(parts))
    if (cache / "snapshots").is_dir():
        snapshot = cache_snapshot(cache, name)
        if not (snapshot / "config.json").is_file():
            raise FailedPrecondition(f"base model {name!r}: snapshot {snapshot} has no config.json")
        return snapshot
    return None


def model_names(root: Path) -> list[str]:
    """The names of the base models under ``root``, sorted (nothing is loaded).

    Folders whose names are not valid model names (hidden ones, staging folders) are
    skipped, as is a cache entry whose name has more than two components.
    """
    if not root.is_dir():
        return []
    names: set[str] = set()
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        if entry.name.startswith(CACHE_PREFIX) and (entry / "snapshots").is_dir():
            candidate = entry.name.removeprefix(CACHE_PREFIX).replace("--", "/")
            if _valid(candidate):
                names.add(candidate)
        elif not _valid(entry.name):
            continue
        elif (entry / "config.json").is_file():
            names.add(entry.name)
        else:
            names.update(
                f"{entry.name}/{child.name}"
                for child in entry.iterdir()
                if child.is_dir()
                and (child / "config.json").is_file()
                and _valid(f"{entry.name}/{child.name}")
            )
    return sorted(names)


def cache_snapshot(cache: Path, name: str) -> Path:
    """The snapshot folder of a hub cache entry: ``refs/main``'s, else the only one.

    Raises:
        FailedPrecondition: ``refs/main`` is malformed or names a missing snapshot, or
            there is no ``refs/main`` and not exactly one snapshot.
    """
    snapshots = cache / "snapshots"
    ref = cache / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        if not _REVISION.match(revision):
            raise FailedPrecondition(f"base model {name!r}: {ref} does not hold a revision")
        snapshot = snapshots / revision
        if not snapshot.is_dir():
            raise FailedPrecondition(
                f"base model {name!r}: {ref} names revision {revision}, which is not in "
                f"{snapshots} (an incomplete download?)"
            )
        return snapshot
    found = sorted(entry for entry in snapshots.iterdir() if entry.is_dir())
    if len(found) != 1:
        raise FailedPrecondition(
            f"base model {name!r}: {cache} has no refs/main and {len(found)} snapshots; "
            "write the revision to use into refs/main"
        )
    return found[0]


def weight_files(folder: Path, name: str) -> list[Path]:
    """The weight files of a model folder, sorted by name (see the module docstring).

    Args:
        folder: The model folder (a snapshot folder for a cache entry).
        name: The model's name, for errors.

    Raises:
        FailedPrecondition: The shard index is malformed or names a missing shard, or
            the folder holds no safetensors weights.
    """
    index = folder / SHARD_INDEX
    if not index.is_file():
        files = sorted(folder.glob(f"*{_WEIGHT_SUFFIX}"))
        if not files:
            raise FailedPrecondition(f"base model {name!r} has no {_WEIGHT_SUFFIX} weights")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise FailedPrecondition(
            f"base model {name!r}: {SHARD_INDEX} has no valid weight_map ({error!r})"
        ) from error
    for shard in shards:
        if not isinstance(shard, str) or not _COMPONENT.match(shard) or ".." in shard:
            raise FailedPrecondition(
                f"base model {name!r}: {SHARD_INDEX} names {shard!r}, not a file of the folder"
            )
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise FailedPrecondition(
            f"base model {name!r}: shard {', '.join(missing)} named by {SHARD_INDEX} is missing"
        )
    if not shards:
        raise FailedPrecondition(f"base model {name!r}: {SHARD_INDEX} names no shard")
    return [folder / shard for shard in shards]


def weights_digest(files: list[Path]) -> str:
    """The digest of a model's weight files (see the module docstring)."""
    digests = [(file_sha256(file), file.name) for file in sorted(files, key=lambda f: f.name)]
    if len(digests) == 1:
        return digests[0][0]
    listing = "".join(f"{digest}  {file_name}\n" for digest, file_name in digests)
    return hashlib.sha256(listing.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file (through a symlink), as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _valid(name: str) -> bool:
    try:
        check_model_name(name)
    except InvalidArgument:
        return False
    return True
