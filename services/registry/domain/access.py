"""Who may do what in the registry.

Every caller is authenticated by the shared interceptor; this module turns its
:class:`~tensafe.common.auth.Identity` into a :class:`Caller`: the tenant whose
adapters the call sees, and what it may do there.

* A tenant's principals act for their own tenant: ``read`` lists, gets, downloads and
  unwraps data keys; ``train`` also publishes, sets aliases and deletes.
* Platform service accounts act for another tenant (the HE runtime loading an adapter
  for a session, the trainer publishing an adapter it trained) by sending the tenant id
  in the ``x-tensafe-acting-tenant`` call metadata. The header is honoured only for the
  principal ids configured in ``TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS``, which must
  belong to the platform tenant (``TENSAFE_REGISTRY_PLATFORM_TENANT_ID``); anyone else
  sending it is refused (PERMISSION_DENIED, audited). An acting service may publish,
  read, download and unwrap, never delete or move aliases.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from tensafe.common.auth import SCOPE_READ, SCOPE_TRAIN, Identity
from tensafe.common.errors import InvalidArgument, PermissionDenied

ACTING_TENANT_HEADER = "x-tensafe-acting-tenant"
"""Call metadata naming the tenant a platform service account acts for."""

TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a tenant id looks like."""


class Action(enum.Enum):
    """What a call does, for authorisation."""

    READ = "read"
    PUBLISH = "publish"
    MANAGE = "manage"
    UNWRAP = "unwrap"


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authorised caller of one registry call.

    Attributes:
        tenant_id: The tenant whose adapters the call sees.
        principal_id: The calling principal.
        acting_for_tenant: Whether a platform service account acts for ``tenant_id``.
        caller_tenant_id: The principal's own tenant.
    """

    tenant_id: str
    principal_id: str
    acting_for_tenant: bool
    caller_tenant_id: str


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    """Which principals may act for other tenants.

    Attributes:
        acting_service_principals: Principal ids of platform service accounts.
        platform_tenant_id: Their tenant.
    """

    acting_service_principals: frozenset[str] = frozenset()
    platform_tenant_id: str = ""

    def authorize(self, identity: Identity, action: Action, acting_tenant: str) -> Caller:
        """Decide whether ``identity`` may perform ``action``.

        Args:
            identity: The authenticated caller.
            action: What the call does.
            acting_tenant: Value of the acting-tenant header ("" when absent).

        Returns:
            The caller, with the tenant the call is for.

        Raises:
            PermissionDenied: A missing scope, or an acting-tenant header from a
                principal that may not act for tenants, or for an action they may not do.
            InvalidArgument: A malformed acting-tenant value.
        """
        if acting_tenant:
            if not (
                identity.principal_id in self.acting_service_principals
                and identity.tenant_id == self.platform_tenant_id
            ):
                raise PermissionDenied(
                    f"{ACTING_TENANT_HEADER} is honoured only for platform service accounts",
                    reason="ACTING_TENANT_NOT_ALLOWED",
                )
            if action is Action.MANAGE:
                raise PermissionDenied(
                    "a service acting for a tenant may not delete adapters or move aliases",
                    reason="ACTING_TENANT_NOT_ALLOWED",
                )
            if not TENANT_ID.fullmatch(acting_tenant):
                raise InvalidArgument(ACTING_TENANT_HEADER, "is not a tenant id")
            return Caller(
                tenant_id=acting_tenant,
                principal_id=identity.principal_id,
                acting_for_tenant=True,
                caller_tenant_id=identity.tenant_id,
            )
        needed = SCOPE_READ if action in (Action.READ, Action.UNWRAP) else SCOPE_TRAIN
        if not identity.has_scope(needed):
            raise PermissionDenied(
                f"missing scope {needed}", reason="MISSING_SCOPE", metadata={"scopes": needed}
            )
        return Caller(
            tenant_id=identity.tenant_id,
            principal_id=identity.principal_id,
            acting_for_tenant=False,
            caller_tenant_id=identity.tenant_id,
        )
