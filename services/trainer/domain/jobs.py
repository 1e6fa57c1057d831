"""Job kinds, the JetStream job message and ``tensafe://`` paths.

A job's request is stored in the database with its future (the ``trainer_jobs`` row,
which doubles as the outbox); the JetStream message only names it. Messages stay tiny
whatever the batch size, a re-published message carries nothing that could disagree
with the database, and the request bytes are the contract's own request message
(encoded and decoded by :mod:`tensafe.trainer.serde`, never here).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from tensafe.common.errors import InvalidArgument, NotFound
from tensafe.common.jetstream import PermanentJobError


class JobKind(enum.Enum):
    """What a job does; the value is the future's ``kind``."""

    FORWARD_BACKWARD = "trainer.forward_backward"
    FORWARD = "trainer.forward"
    OPTIM_STEP = "trainer.optim_step"
    SAMPLE = "trainer.sample"
    COMPUTE_LOGPROBS = "trainer.compute_logprobs"
    SAVE_STATE = "trainer.save_state"
    LOAD_STATE = "trainer.load_state"
    SAVE_WEIGHTS_FOR_SAMPLER = "trainer.save_weights_for_sampler"
    AUDIT_PRIVACY = "trainer.audit_privacy"
    SAVE_ADAPTER = "trainer.save_adapter"
    TRAIN_ON_DATASET = "trainer.train_on_dataset"


@dataclass(frozen=True)
class JobMessage:
    """The body of a job message on JetStream."""

    future_id: str
    client_id: str
    seq: int

    def encode(self) -> bytes:
        """JSON bytes of the message."""
        return json.dumps(
            {"future_id": self.future_id, "client_id": self.client_id, "seq": self.seq},
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> JobMessage:
        """Parse a message; a malformed one can never be processed.

        Raises:
            PermanentJobError: The body is not a job message.
        """
        try:
            body = json.loads(data)
            message = cls(str(body["future_id"]), str(body["client_id"]), int(body["seq"]))
        except (ValueError, KeyError, TypeError) as error:
            raise PermanentJobError(f"malformed job message: {error}") from error
        return message


def job_subject(prefix: str, client_id: str) -> str:
    """Subject of a client's jobs: ``<prefix>.<client_id>``."""
    return f"{prefix}.{client_id}"


def future_wakeup_prefix(prefix: str) -> str:
    """Subject root of "future finished" wake-ups (:mod:`tensafe.common.wakeups`):
    ``<prefix>-done``, outside the job stream's ``<prefix>.>``."""
    return f"{prefix}-done"


_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PATH = re.compile(
    r"^tensafe://training_clients/(?P<client>[0-9a-f]{32})/"
    r"(?P<kind>checkpoints|sampler_weights)/(?P<name>[A-Za-z0-9._-]{1,64})$"
)

CHECKPOINT_KIND = "state"
"""``trainer_checkpoints.kind`` of SaveState checkpoints."""

SAMPLER_KIND = "sampler"
"""``trainer_checkpoints.kind`` of SaveWeightsForSampler weights."""

_PATH_SEGMENT = {CHECKPOINT_KIND: "checkpoints", SAMPLER_KIND: "sampler_weights"}


def check_name(field: str, name: str) -> str:
    """Validate a checkpoint or sampler-weights name, ``[A-Za-z0-9._-]{1,64}``."""
    if not _NAME.match(name):
        raise InvalidArgument(field, "must match [A-Za-z0-9._-]{1,64}")
    return name


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_adapter_name(field: str, name: str) -> str:
    """Validate a registry adapter name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, no ``..``
    (the registry's rule, docs/registry.md; checked here so a bad name fails at once)."""
    if not _ADAPTER_NAME.match(name) or ".." in name:
        raise InvalidArgument(field, "must match [A-Za-z0-9][A-Za-z0-9._-]{0,127} without '..'")
    return name


def checkpoint_path(client_id: str, kind: str, name: str) -> str:
    """The ``tensafe://`` path of a checkpoint or sampler weights."""
    return f"tensafe://training_clients/{client_id}/{_PATH_SEGMENT[kind]}/{name}"


@dataclass(frozen=True)
class ParsedPath:
    """The parts of a ``tensafe://`` path."""

    client_id: str
    kind: str
    name: str


def parse_path(field: str, path: str, *, kind: str) -> ParsedPath:
    """Parse a ``tensafe://`` path of the given kind.

    Raises:
        InvalidArgument: Empty or not a path of this kind.
    """
    if not path:
        raise InvalidArgument(field, "must not be empty")
    match = _PATH.match(path)
    if match is None:
        raise InvalidArgument(field, "is not a tensafe://training_clients/... path")
    if match["kind"] != _PATH_SEGMENT[kind]:
        raise InvalidArgument(field, f"must name {_PATH_SEGMENT[kind]}")
    return ParsedPath(match["client"], kind, match["name"])


def not_found_path(path: str) -> NotFound:
    """The error for a path that does not exist for the caller."""
    return NotFound(f"{path} not found")
