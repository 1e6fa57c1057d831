"""The registry as other services call it: publish and download packages for a tenant.

Services do not import the SDK, so this is the services' own small asynchronous client
of ``tensafe.registry.v1.RegistryService``. Every call carries the service's own access
token (exchanged from its service-account API key by
:class:`~tensafe.common.auth.ServiceCredentials`) and names the tenant it acts for in
the ``x-tensafe-acting-tenant`` call metadata. The registry honours that header only
for the platform service accounts it is configured to trust
(``TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS``, docs/registry.md), and audits every
data-key unwrap (DESIGN.md §8, "Who may decrypt an adapter").

The client moves bytes; it does not interpret packages. Callers verify and open what
they download with :mod:`tensafe.tgsp` against :meth:`RegistryClient.signing_keys`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from tensafe.common import errors, tls
from tensafe.common.auth import ServiceCredentials
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc

ACTING_TENANT_HEADER = "x-tensafe-acting-tenant"
"""Call metadata naming the tenant a platform service account acts for (the registry's
``tensafe.registry.domain.access.ACTING_TENANT_HEADER``; repeated here because no
service imports another)."""

CHUNK_BYTES = 1024 * 1024
"""Bytes per PublishAdapter message (1 MiB, far below gRPC message limits)."""


@dataclasses.dataclass(frozen=True)
class PackageVersion:
    """The registry's record of one adapter version.

    Attributes:
        adapter_name: The adapter.
        version: The version number the registry assigned.
        package_sha256: SHA-256 (hex) of the package bytes.
        size_bytes: Package size.
    """

    adapter_name: str
    version: int
    package_sha256: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class DownloadedPackage:
    """A package as the registry sent it (verified by the registry; verify it again).

    Attributes:
        version: Which version it is.
        package: The package bytes.
    """

    version: PackageVersion
    package: bytes


@dataclasses.dataclass(frozen=True)
class PublishedSigningKey:
    """A public key whose package signatures the registry accepts.

    Attributes:
        key_id: Hex SHA-256 of the raw public key, as the registry states it.
        public_key: The raw 32-byte Ed25519 public key.
    """

    key_id: str
    public_key: bytes


def _version(message: pb.AdapterVersion) -> PackageVersion:
    return PackageVersion(
        adapter_name=message.adapter_name,
        version=int(message.version),
        package_sha256=message.package_sha256,
        size_bytes=int(message.size_bytes),
    )


class RegistryClient:
    """Asynchronous registry calls made by a service on behalf of tenants.

    Args:
        channel: A channel to the registry.
        credentials: The calling service's own credentials.
        call_timeout_seconds: Deadline of each call (whole streams included).
        also_close: Further channels to close with this client (e.g. to auth).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        credentials: ServiceCredentials,
        *,
        call_timeout_seconds: float = 300.0,
        also_close: tuple[grpc.aio.Channel, ...] = (),
    ) -> None:
        self._channel = channel
        self._credentials = credentials
        self._timeout = call_timeout_seconds
        self._also_close = also_close
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)

    @classmethod
    def connect(
        cls,
        *,
        registry_url: str,
        auth_url: str,
        service_api_key: str,
        channel_credentials: grpc.ChannelCredentials | None = None,
        call_timeout_seconds: float = 300.0,
    ) -> RegistryClient:
        """Open channels to the registry and to auth (for the service's token).

        Args:
            registry_url: ``host:port`` of the registry.
            auth_url: ``host:port`` of the auth service.
            service_api_key: The calling service's service-account API key.
            channel_credentials: TLS credentials of both channels
                (:func:`tensafe.common.tls.channel_credentials`); ``None`` is plaintext.
            call_timeout_seconds: Deadline of each call.

        Raises:
            ConfigError: A setting is empty.
        """
        for setting_name, value in (
            ("TENSAFE_REGISTRY_URL", registry_url),
            ("TENSAFE_AUTH_URL", auth_url),
            ("TENSAFE_SERVICE_API_KEY", service_api_key),
        ):
            if not value:
                raise errors.ConfigError(setting_name, "required to call the registry")
        auth_channel = tls.open_channel(auth_url, channel_credentials)
        registry_channel = tls.open_channel(registry_url, channel_credentials)
        return cls(
            registry_channel,
            ServiceCredentials(auth_channel, service_api_key),
            call_timeout_seconds=call_timeout_seconds,
            also_close=(auth_channel,),
        )

    async def close(self) -> None:
        """Close the channels."""
        await self._channel.close(None)
        for channel in self._also_close:
            await channel.close(None)

    async def _metadata(self, acting_tenant: str | None) -> tuple[tuple[str, str], ...]:
        metadata = await self._credentials.metadata()
        if acting_tenant:
            metadata = (*metadata, (ACTING_TENANT_HEADER, acting_tenant))
        return metadata

    async def publish(
        self,
        package: bytes,
        *,
        adapter_name: str,
        request_id: str,
        acting_tenant: str,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> PackageVersion:
        """Upload a package as the adapter's next version, for ``acting_tenant``.

        The registry verifies the package (trusted signer, digests, the tenant) before
        it stores it. Retrying with the same ``request_id`` and the same bytes returns
        the version the first call created.

        Args:
            package: The TGSP package.
            adapter_name: Must equal the adapter id sealed in the package.
            request_id: Idempotency key (required: a service always retries safely).
            acting_tenant: The tenant that owns the adapter.
            chunk_bytes: Bytes per message.

        Returns:
            The version created (or found, for a repeated request id).

        Raises:
            InvalidArgument: Empty request id or tenant.
            TenSafeError: The registry's refusal, typed (``IntegrityError`` names the
                failed check; ``PermissionDenied`` when this service may not act for
                tenants).
        """
        if not request_id:
            raise errors.InvalidArgument("request_id", "required")
        if not acting_tenant:
            raise errors.InvalidArgument("acting_tenant", "required")

        async def requests() -> AsyncIterator[pb.PublishAdapterRequest]:
            yield pb.PublishAdapterRequest(
                header=pb.PublishAdapterHeader(
                    adapter_name=adapter_name, size_bytes=len(package), request_id=request_id
                )
            )
            view = memoryview(package)
            for begin in range(0, len(view), chunk_bytes):
                yield pb.PublishAdapterRequest(chunk=bytes(view[begin : begin + chunk_bytes]))

        metadata = await self._metadata(acting_tenant)
        try:
            response = await self._stub.PublishAdapter(
                requests(), metadata=metadata, timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _version(response.version)

    async def download(
        self, adapter_name: str, *, version: int = 0, alias: str = "", acting_tenant: str
    ) -> DownloadedPackage:
        """Download a package (a version, an alias, or with neither the latest).

        Args:
            adapter_name: The adapter.
            version: A version number, 0 for the latest (ignored with ``alias``).
            alias: An alias such as ``prod``.
            acting_tenant: The tenant that owns the adapter.

        Returns:
            The version record and the bytes.

        Raises:
            NotFound: No such adapter, version or alias for the tenant.
            Unavailable: The stream ended before the declared size.
            TenSafeError: Any other refusal, typed.
        """
        request = (
            pb.DownloadAdapterRequest(adapter_name=adapter_name, alias=alias)
            if alias
            else pb.DownloadAdapterRequest(adapter_name=adapter_name, version=version)
        )
        metadata = await self._metadata(acting_tenant)
        record: pb.AdapterVersion | None = None
        data = bytearray()
        try:
            async for part in self._stub.DownloadAdapter(
                request, metadata=metadata, timeout=self._timeout
            ):
                if part.WhichOneof("part") == "version":
                    record = part.version
                else:
                    data += part.chunk
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        if record is None or len(data) != record.size_bytes:
            raise errors.Unavailable("the registry's download stream ended early")
        return DownloadedPackage(version=_version(record), package=bytes(data))

    async def unwrap_data_key(
        self, adapter_name: str, version: int, *, acting_tenant: str
    ) -> bytes:
        """The data key of one version's package (the registry audits every unwrap).

        Raises:
            NotFound: No such version for the tenant.
            TenSafeError: Any other refusal, typed.
        """
        metadata = await self._metadata(acting_tenant)
        try:
            response = await self._stub.UnwrapDataKey(
                pb.UnwrapDataKeyRequest(adapter_name=adapter_name, version=version),
                metadata=metadata,
                timeout=self._timeout,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        key: bytes = response.data_key
        return key

    async def signing_keys(self) -> list[PublishedSigningKey]:
        """The public keys whose package signatures the registry accepts."""
        metadata = await self._metadata(None)
        try:
            response = await self._stub.GetSigningKeys(
                pb.GetSigningKeysRequest(), metadata=metadata, timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return [PublishedSigningKey(key.key_id, bytes(key.public_key)) for key in response.keys]
