"""Conversions between auth protos and domain objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from tensafe.auth.domain import model
from tensafe.auth.domain.audit import epoch_micros
from tensafe.common.auth import JsonWebKey
from tensafe.common.errors import InvalidArgument
from tensafe.proto.auth.v1 import auth_service_pb2 as pb

_ROLE_TO_PB = {
    model.Role.ADMIN: pb.ROLE_ADMIN,
    model.Role.TRAINER: pb.ROLE_TRAINER,
    model.Role.READER: pb.ROLE_READER,
}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}
_KIND_TO_PB = {
    model.PrincipalKind.USER: pb.PRINCIPAL_KIND_USER,
    model.PrincipalKind.SERVICE_ACCOUNT: pb.PRINCIPAL_KIND_SERVICE_ACCOUNT,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_STATE_TO_PB = {
    model.TenantState.ACTIVE: pb.TENANT_STATE_ACTIVE,
    model.TenantState.DISABLED: pb.TENANT_STATE_DISABLED,
}


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp, exact to the microsecond."""
    micros = epoch_micros(moment)
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


MAX_DURATION = timedelta(days=36_525)
"""Longest accepted duration (100 years): an expiry further out leaves ``datetime``'s
range (and a Duration's seconds can overflow ``timedelta`` outright)."""


def duration(field: str, value: duration_pb2.Duration, present: bool) -> timedelta | None:
    """A timedelta, or None when the field is unset.

    Raises:
        InvalidArgument: Negative, zero, longer than :data:`MAX_DURATION`, or nanos out
            of a Duration's range.
    """
    if not present:
        return None
    if not -999_999_999 <= value.nanos <= 999_999_999:
        raise InvalidArgument(f"{field}.nanos", "must be within ±999,999,999")
    if value.seconds > MAX_DURATION.total_seconds():
        raise InvalidArgument(field, f"must be at most {MAX_DURATION.days} days")
    if value.seconds < 0 or (value.seconds == 0 and value.nanos <= 0):
        raise InvalidArgument(field, "must be positive")
    delta = value.ToTimedelta()
    if delta <= timedelta(0):
        raise InvalidArgument(field, "must be positive")
    return delta


def tenant(value: model.Tenant) -> pb.Tenant:
    """Tenant to proto."""
    return pb.Tenant(
        id=value.id,
        display_name=value.display_name,
        state=_STATE_TO_PB[value.state],
        create_time=timestamp(value.create_time),
    )


def principal(value: model.Principal) -> pb.Principal:
    """Principal to proto."""
    return pb.Principal(
        id=value.id,
        tenant_id=value.tenant_id,
        kind=_KIND_TO_PB[value.kind],
        name=value.name,
        roles=[_ROLE_TO_PB[r] for r in value.roles],
        disabled=value.disabled,
        create_time=timestamp(value.create_time),
    )


def role(value: int, field: str = "roles") -> model.Role:
    """Proto role to domain.

    Raises:
        InvalidArgument: Unspecified or unknown.
    """
    try:
        return _ROLE_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(field, f"unknown role {value}") from None


def kind(value: int) -> model.PrincipalKind:
    """Proto principal kind to domain.

    Raises:
        InvalidArgument: Unspecified or unknown.
    """
    try:
        return _KIND_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument("kind", "must be USER or SERVICE_ACCOUNT") from None


def api_key(value: model.ApiKey) -> pb.ApiKey:
    """API key metadata to proto (never a secret)."""
    message = pb.ApiKey(
        id=value.id,
        prefix=value.prefix,
        principal_id=value.principal_id,
        description=value.description,
        create_time=timestamp(value.create_time),
    )
    if value.expire_time is not None:
        message.expire_time.CopyFrom(timestamp(value.expire_time))
    if value.revoke_time is not None:
        message.revoke_time.CopyFrom(timestamp(value.revoke_time))
    return message


def jwk(value: JsonWebKey) -> pb.Jwk:
    """JWK to proto."""
    return pb.Jwk(
        kty=value.kty, crv=value.crv, x=value.x, kid=value.kid, alg=value.alg, use=value.use
    )


def audit_event(value: model.AuditEvent) -> pb.AuditEvent:
    """Audit entry to proto."""
    return pb.AuditEvent(
        seq=value.seq,
        event_id=value.event_id,
        time=timestamp(value.time),
        service=value.service,
        kind=value.kind,
        tenant_id=value.tenant_id,
        principal_id=value.principal_id,
        payload_json=value.payload_json,
        prev_hash=value.prev_hash,
        hash=value.hash,
    )


def utc(seconds: float) -> datetime:
    """Seconds since the epoch to an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)
