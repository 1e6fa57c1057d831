"""The hash chain of the audit log.

Each entry's hash is ``sha256(canonical JSON of its fields, including prev_hash)``;
``prev_hash`` is the previous entry's hash (64 zeros for the first). Editing any field
of an entry changes its hash, so its successor's ``prev_hash`` no longer matches;
deleting or reordering entries breaks the ``seq`` sequence or a ``prev_hash`` link.
:class:`ChainVerifier` walks the chain in ``seq`` order and names the first bad entry
(for a deleted entry, the position that is missing).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from tensafe.auth.domain.model import AuditEvent
from tensafe.common.auth import canonical_json

GENESIS_HASH = "0" * 64
"""``prev_hash`` of entry 1."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_epoch_micros(micros: int) -> datetime:
    """Inverse of :func:`epoch_micros`."""
    return _EPOCH + timedelta(microseconds=micros)


def entry_hash(
    *,
    seq: int,
    event_id: str,
    time: datetime,
    service: str,
    kind: str,
    tenant_id: str,
    principal_id: str,
    payload_json: str,
    prev_hash: str,
) -> str:
    """The hex sha256 of one entry's canonical form."""
    body = canonical_json(
        {
            "seq": seq,
            "event_id": event_id,
            "time_us": epoch_micros(time),
            "service": service,
            "kind": kind,
            "tenant_id": tenant_id,
            "principal_id": principal_id,
            "payload_json": payload_json,
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def hash_of(event: AuditEvent) -> str:
    """Recompute an entry's hash from its fields."""
    return entry_hash(
        seq=event.seq,
        event_id=event.event_id,
        time=event.time,
        service=event.service,
        kind=event.kind,
        tenant_id=event.tenant_id,
        principal_id=event.principal_id,
        payload_json=event.payload_json,
        prev_hash=event.prev_hash,
    )


@dataclasses.dataclass(frozen=True)
class ChainVerdict:
    """Result of :func:`verify_chain`."""

    ok: bool
    entries_checked: int
    first_bad_seq: int
    """0 when ok."""
    reason: str


class ChainVerifier:
    """Incremental verification, fed entries in ``seq`` order page by page."""

    def __init__(self) -> None:
        self._expected_seq = 1
        self._prev_hash = GENESIS_HASH
        self.checked = 0
        self.verdict: ChainVerdict | None = None

    def feed(self, events: Iterable[AuditEvent]) -> bool:
        """Check more entries; returns False once a bad entry was found."""
        for event in events:
            if self.verdict is not None:
                return False
            self.checked += 1
            if event.seq != self._expected_seq:
                self._fail(
                    self._expected_seq,
                    f"entry {self._expected_seq} is missing: found seq {event.seq} instead "
                    "(an entry was deleted or reordered)",
                )
            elif event.prev_hash != self._prev_hash:
                self._fail(event.seq, "prev_hash does not match the previous entry's hash")
            elif hash_of(event) != event.hash:
                self._fail(event.seq, "hash does not match the entry's contents (edited)")
            else:
                self._expected_seq += 1
                self._prev_hash = event.hash
        return self.verdict is None

    def finish(self, *, head_seq: int, head_hash: str) -> ChainVerdict:
        """Compare the end of the chain with the recorded head and return the verdict.

        Args:
            head_seq: Sequence number the store recorded as last appended.
            head_hash: Hash the store recorded as last appended.
        """
        if self.verdict is None:
            last = self._expected_seq - 1
            if last != head_seq:
                self._fail(
                    last + 1 if last < head_seq else head_seq + 1,
                    f"chain ends at seq {last} but {head_seq} entries were appended "
                    "(entries deleted or added outside the log)",
                )
            elif self._prev_hash != head_hash:
                self._fail(last, "last entry's hash differs from the recorded chain head")
        if self.verdict is None:
            self.verdict = ChainVerdict(True, self.checked, 0, "")
        return self.verdict

    def _fail(self, seq: int, reason: str) -> None:
        self.verdict = ChainVerdict(False, self.checked, seq, reason)
