"""Typed domain errors.

Domain code (plain Python, no gRPC types) raises these; one place,
:mod:`tensafe.common.grpc_errors`, maps them to gRPC status codes with
``google.rpc`` error details. The SDK maps the codes back to the same classes, so a
caller catches ``BudgetExhausted`` rather than inspecting a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorCode(enum.Enum):
    """The status code an error maps to; values are the gRPC code names."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class TenSafeError(Exception):
    """Base of every error that is meant to reach a client as a status.

    Args:
        message: Human-readable, safe to show to the caller (never a secret, never a
            stack trace).
        reason: A short UPPER_SNAKE_CASE machine-readable reason, sent as
            ``google.rpc.ErrorInfo.reason`` (AIP-193).
        metadata: Extra string key/values for ``ErrorInfo.metadata``.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(TenSafeError):
    """The request is malformed; ``field`` names the offending field path."""

    code = ErrorCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        field: str,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}", reason=reason, metadata=metadata)
        self.field = field
        self.description = message


class NotFound(TenSafeError):
    """The object does not exist, or belongs to another tenant (never distinguished)."""

    code = ErrorCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TenSafeError):
    """An object with this identity exists already."""

    code = ErrorCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(TenSafeError):
    """The caller is authenticated but lacks the scope or role for this call."""

    code = ErrorCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(TenSafeError):
    """No valid credentials: missing, expired, badly signed or revoked token."""

    code = ErrorCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(TenSafeError):
    """The system is not in a state that allows this call."""

    code = ErrorCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class BudgetExhausted(FailedPrecondition):
    """A DP step would take the privacy spent over the client's budget."""

    default_reason = "PRIVACY_BUDGET_EXHAUSTED"


class ResourceExhausted(TenSafeError):
    """A quota, rate limit or size limit was hit; the message names the limit."""

    code = ErrorCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Aborted(TenSafeError):
    """A concurrency conflict (e.g. a lost lease); the call may be retried."""

    code = ErrorCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(TenSafeError):
    """A dependency (database, NATS, another service) is down; retryable."""

    code = ErrorCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unimplemented(TenSafeError):
    """The RPC is part of the contract but not served by this deployment yet."""

    code = ErrorCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class IntegrityError(TenSafeError):
    """Data failed an integrity check (bad signature, MAC, digest or hash chain).

    Mapped to FAILED_PRECONDITION for packages a caller uploaded or asked for; the
    message names what failed.
    """

    code = ErrorCode.FAILED_PRECONDITION
    default_reason = "INTEGRITY_CHECK_FAILED"


class ConfigError(Exception):
    """A setting is missing or invalid at start-up. Not sent to clients.

    Args:
        setting: The environment variable or file key that is wrong.
        message: What is wrong with it.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
