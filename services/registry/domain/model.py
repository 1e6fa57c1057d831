"""Objects of the registry domain."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """An adapter: a named series of versions within one tenant.

    Attributes:
        name: The adapter's name.
        latest_version: Highest existing version (0 when every version was deleted).
        aliases: Alias → version.
        create_time: When the adapter was first published.
    """

    name: str
    latest_version: int
    aliases: Mapping[str, int]
    create_time: datetime


@dataclasses.dataclass(frozen=True)
class VersionRecord:
    """One published, verified package.

    Attributes:
        adapter_name: The adapter's name.
        version: Version number, from 1, never reused within the adapter's life.
        package_sha256: SHA-256 of the package: its object-store key.
        size_bytes: Package size.
        manifest_json: The verified manifest, canonical JSON.
        signer_key_id: Key id of the key that signed the package.
        create_time: Publication time.
    """

    adapter_name: str
    version: int
    package_sha256: str
    size_bytes: int
    manifest_json: str
    signer_key_id: str
    create_time: datetime


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing.

    Attributes:
        items: The page's items.
        next_page_token: Token of the next page; empty on the last.
    """

    items: list[T]
    next_page_token: str
