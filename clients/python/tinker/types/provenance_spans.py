"""Provenance spans of a datum, as Tinker's ``tinker.types.provenance_spans`` defines
them (same names, fields, defaults and checks).

Tinker uses them for its ``stable_reinforce`` loss, whose objective it does not
publish; TenSafe refuses that loss, so spans are validated here and not sent
(docs/tinker.md, "Losses").
"""

from __future__ import annotations

import dataclasses
from typing import TypeAlias

__all__ = ["PromptProvenanceSpan", "ProvenanceSpans", "SampledProvenanceSpan"]


def _check(kind: str, sequence_id: str, offset: int, length: int) -> None:
    if length < 0:
        raise ValueError(f"{kind}.length must be >= 0, got {length}")
    if not sequence_id:
        raise ValueError(f"{kind}.sequence_id must be non-empty")
    if offset < 0:
        raise ValueError(f"{kind}.offset must be >= 0, got {offset}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """A run of datum positions that were positions ``[offset, offset + length)`` of a
    sampling request's prompt.

    Attributes:
        sequence_id: ``SampledSequence.sequence_id`` of a request whose prompt held the run.
        offset: Position of the run in that prompt.
        length: Number of consecutive tokens, >= 0.
    """

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check("PromptProvenanceSpan", self.sequence_id, self.offset, self.length)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """A run of datum positions that were positions ``[offset, offset + length)`` of a
    sampled sequence's tokens.

    Attributes:
        sequence_id: ``SampledSequence.sequence_id`` of the sequence the run reproduces.
        offset: Position of the run in that sequence's sampled tokens.
        length: Number of covered tokens, >= 0.
    """

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check("SampledProvenanceSpan", self.sequence_id, self.offset, self.length)


ProvenanceSpans: TypeAlias = list[PromptProvenanceSpan | SampledProvenanceSpan]
"""Consecutive runs tiling one Datum field; see ``Datum.with_provenance``."""
