"""The adapter registry from the SDK: publish, download, verify and open TGSP packages.

:class:`RegistryClient` wraps ``tensafe.registry.v1.RegistryService`` with typed errors
and chunked streams. Opening a downloaded package needs its data key (DEK), which only
the registry can unwrap (the tenant's KEK never leaves it): :class:`RegistryKekProvider`
is a :class:`~tensafe.tgsp.KekProvider` whose ``unwrap`` is the registry's audited
``UnwrapDataKey``, so :func:`tensafe.tgsp.open` runs every check of the format (signer,
signature, digests, tenant, each chunk's tag, each tensor's SHA-256) on the client, with
the registry's public keys from ``GetSigningKeys``.

Typical use::

    with RegistryClient.connect() as registry:
        registry.publish("support-bot", "support-bot.tgsp")
        model = registry.load_peft_model(base_model, "support-bot", alias="prod")
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from tensafe import tgsp
from tensafe.client.auth import TokenProvider, authenticated_channel, find_api_key
from tensafe.client.channels import OwnedChannels
from tensafe.client.connection import load_connection
from tensafe.client.retry import RetryPolicy, call_with_retry
from tensafe.common import errors
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

Result = TypeVar("Result")

CHUNK_BYTES = 1024 * 1024
"""Bytes per PublishAdapter chunk (1 MiB, far under gRPC message limits)."""


@dataclasses.dataclass(frozen=True)
class Downloaded:
    """A downloaded package.

    Attributes:
        version: The registry's record of the version.
        package: The package bytes (as published; verified by the registry).
    """

    version: pb.AdapterVersion
    package: bytes


class RegistryClient(OwnedChannels):
    """The registry's RPCs on one channel, raising typed errors.

    Idempotent calls (reads, and a publish, which carries a request id) are retried on
    UNAVAILABLE as :mod:`tensafe.client.retry` describes; ``set_alias`` and ``delete``
    are sent once (a lost answer to a delete would turn its retry into NOT_FOUND).

    Args:
        channel: An authenticated channel to the registry.
        call_timeout_seconds: Deadline of each call (streams included).
        retry: Retries of UNAVAILABLE.
        sleep: Pauses between retries (``time.sleep``; tests may pass a recorder).
        also_close: Other channels to close with this one (e.g. to auth).
        trust_list: A pinned :class:`tensafe.tgsp.TrustList` (signing keys bound to the
            tenants they may sign for): ``verify`` and ``open`` then check against it
            and not against the keys the registry publishes, so a compromised registry
            cannot vouch for its own packages. ``None``: the registry's keys, for every
            tenant.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        call_timeout_seconds: float = 300.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        also_close: Sequence[grpc.Channel] = (),
        trust_list: tgsp.TrustList | None = None,
    ) -> None:
        self._trust_list = trust_list
        self._timeout = call_timeout_seconds
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        super().__init__(channel, also_close)
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)

    @classmethod
    def connect(
        cls,
        *,
        connection_file: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        call_timeout_seconds: float = 300.0,
        ca_file: str | os.PathLike[str] | None = None,
        client_cert_file: str | os.PathLike[str] | None = None,
        client_key_file: str | os.PathLike[str] | None = None,
        trust_list: tgsp.TrustList | None = None,
    ) -> RegistryClient:
        """Connect to the registry listed in the connection file, with an API key.

        Args:
            connection_file: Default: as :func:`tensafe.client.connection.connection_path`.
            api_key: Default: as :func:`tensafe.client.auth.find_api_key`.
            call_timeout_seconds: Deadline of each call.
            ca_file: PEM CA bundle that verifies the services (TLS); default
                ``$TENSAFE_CA_FILE``, else the connection file's ``tls`` block.
            client_cert_file: PEM client certificate for mutual TLS.
            client_key_file: Its private key.
            trust_list: A pinned trust list (see the class).

        Raises:
            FileNotFoundError: No connection file.
            Unauthenticated: No API key.
        """
        connection = load_connection(connection_file)
        key = find_api_key(api_key, connection_file=connection.path)
        tls = {
            "ca_file": ca_file,
            "client_cert_file": client_cert_file,
            "client_key_file": client_key_file,
        }
        auth_channel = connection.channel("auth", **tls)
        provider = TokenProvider(auth_channel, key)
        registry_channel = connection.channel("registry", **tls)
        return cls(
            authenticated_channel(registry_channel, provider),
            call_timeout_seconds=call_timeout_seconds,
            also_close=(registry_channel, auth_channel),
            trust_list=trust_list,
        )

    def _call(self, method: Any, request: Any, *, idempotent: bool = True) -> Any:
        return self._attempt(lambda: method(request, timeout=self._timeout), idempotent)

    def _attempt(self, call: Callable[[], Result], idempotent: bool = True) -> Result:
        return call_with_retry(call, policy=self._retry, idempotent=idempotent, sleep=self._sleep)

    # ------------------------------------------------------------------ writes

    def publish(
        self,
        adapter_name: str,
        package: bytes | os.PathLike[str] | str,
        *,
        request_id: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> pb.AdapterVersion:
        """Upload a package as the adapter's next version (the registry verifies it).

        Args:
            adapter_name: Must equal the adapter id sealed in the package.
            package: The package bytes or the path of a package file (streamed).
            request_id: Idempotency key; a fresh one by default. Retrying with the same
                key returns the version the first call created.
            chunk_bytes: Bytes per message.

        Returns:
            The new version.

        Raises:
            IntegrityError: The registry refused the package; the message names the check.
            PermissionDenied: The caller may not publish (e.g. a reader).
            TenSafeError: Any other refusal, typed.
        """
        key = request_id or uuid.uuid4().hex
        size = len(package) if isinstance(package, bytes) else os.stat(package).st_size

        def requests() -> Iterator[pb.PublishAdapterRequest]:
            yield pb.PublishAdapterRequest(
                header=pb.PublishAdapterHeader(
                    adapter_name=adapter_name, size_bytes=size, request_id=key
                )
            )
            if isinstance(package, bytes):
                for start in range(0, size, chunk_bytes):
                    yield pb.PublishAdapterRequest(chunk=package[start : start + chunk_bytes])
                return
            with open(package, "rb") as file:
                while block := file.read(chunk_bytes):
                    yield pb.PublishAdapterRequest(chunk=block)

        # Every attempt streams the package again under the same request id; the
        # registry answers a repeated id with the version the first attempt made.
        response = self._attempt(
            lambda: self._stub.PublishAdapter(requests(), timeout=self._timeout)
        )
        version: pb.AdapterVersion = response.version
        return version

    def set_alias(self, adapter_name: str, alias: str, version: int) -> pb.Adapter:
        """Point ``alias`` at ``version``."""
        request = pb.SetAliasRequest(adapter_name=adapter_name, alias=alias, version=version)
        adapter: pb.Adapter = self._call(self._stub.SetAlias, request, idempotent=False).adapter
        return adapter

    def delete(self, adapter_name: str, version: int = 0) -> None:
        """Delete one version, or (``version=0``) the adapter."""
        self._call(
            self._stub.DeleteAdapter,
            pb.DeleteAdapterRequest(adapter_name=adapter_name, version=version),
            idempotent=False,
        )

    # ------------------------------------------------------------------ reads

    def get_adapter(self, adapter_name: str) -> pb.Adapter:
        """The adapter, its latest version and aliases."""
        request = pb.GetAdapterRequest(adapter_name=adapter_name)
        adapter: pb.Adapter = self._call(self._stub.GetAdapter, request).adapter
        return adapter

    def list_adapters(self, *, page_size: int = 0) -> Iterator[pb.Adapter]:
        """Every adapter of the caller's tenant, by name (pages fetched as needed)."""
        token = ""
        while True:
            page = self._call(
                self._stub.ListAdapters,
                pb.ListAdaptersRequest(page_size=page_size, page_token=token),
            )
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def list_versions(
        self, adapter_name: str, *, page_size: int = 0
    ) -> Iterator[pb.AdapterVersion]:
        """Every version of an adapter, newest first."""
        token = ""
        while True:
            page = self._call(
                self._stub.ListVersions,
                pb.ListVersionsRequest(
                    adapter_name=adapter_name, page_size=page_size, page_token=token
                ),
            )
            yield from page.versions
            token = page.next_page_token
            if not token:
                return

    def signing_keys(self) -> list[tgsp.VerifyingKey]:
        """The public keys whose signatures the registry accepts."""
        response = self._call(self._stub.GetSigningKeys, pb.GetSigningKeysRequest())
        keys = []
        for key in response.keys:
            verifying = tgsp.VerifyingKey.from_raw(key.public_key)
            if verifying.key_id != key.key_id:
                raise errors.IntegrityError(
                    f"signing key {key.key_id}: the key id does not match the public key"
                )
            keys.append(verifying)
        return keys

    def download(
        self,
        adapter_name: str,
        *,
        version: int = 0,
        alias: str = "",
        destination: os.PathLike[str] | str | None = None,
    ) -> Downloaded:
        """Download a package (by version, alias, or the latest).

        Args:
            adapter_name: The adapter.
            version: A version number; 0 with no alias means the latest.
            alias: An alias such as ``prod``.
            destination: Also write the package here (atomically: a temporary file
                renamed into place once complete).

        Returns:
            The version record and the package bytes.
        """
        request = (
            pb.DownloadAdapterRequest(adapter_name=adapter_name, alias=alias)
            if alias
            else pb.DownloadAdapterRequest(adapter_name=adapter_name, version=version)
        )

        def fetch() -> tuple[pb.AdapterVersion | None, bytearray]:
            record: pb.AdapterVersion | None = None
            data = bytearray()
            for part in self._stub.DownloadAdapter(request, timeout=self._timeout):
                if part.WhichOneof("part") == "version":
                    record = part.version
                else:
                    data += part.chunk
            return record, data

        # A stream cut by an outage is fetched again from its start.
        record, data = self._attempt(fetch)
        if record is None or len(data) != record.size_bytes:
            raise errors.Unavailable("the download stream ended early")
        package = bytes(data)
        if destination is not None:
            _write_atomically(Path(destination), package)
        return Downloaded(version=record, package=package)

    def unwrap_data_key(self, adapter_name: str, version: int) -> bytes:
        """The data key of a version's package (an audited call)."""
        request = pb.UnwrapDataKeyRequest(adapter_name=adapter_name, version=version)
        key: bytes = self._call(self._stub.UnwrapDataKey, request).data_key
        return key

    # ------------------------------------------------------------------ offline checks

    def verify(
        self, package: tgsp.PackageSource, *, expected_tenant: str | None = None
    ) -> tgsp.Manifest:
        """Verify a package (no decryption) against the pinned trust list, or else the
        registry's published keys."""
        return tgsp.verify(package, trusted_keys=self._trusted(), expected_tenant=expected_tenant)

    def _trusted(self) -> Iterable[tgsp.VerifyingKey]:
        return self._trust_list if self._trust_list is not None else self.signing_keys()

    def open(self, adapter_name: str, *, version: int = 0, alias: str = "") -> tgsp.OpenedAdapter:
        """Download, verify and decrypt an adapter; its DEK comes from ``UnwrapDataKey``.

        Raises:
            IntegrityError: Any failed check of the package, named.
        """
        downloaded = self.download(adapter_name, version=version, alias=alias)
        trusted = self._trusted()
        manifest = tgsp.verify(downloaded.package, trusted_keys=trusted)
        provider = RegistryKekProvider(self, adapter_name, downloaded.version.version)
        return tgsp.open(
            downloaded.package,
            trusted_keys=trusted,
            kek_provider=provider,
            tenant_id=manifest.tenant_id,
        )

    def export_peft_dir(
        self,
        adapter_name: str,
        directory: os.PathLike[str] | str,
        *,
        version: int = 0,
        alias: str = "",
    ) -> tgsp.Manifest:
        """Write an adapter as a PEFT directory (``adapter_config.json`` + weights)."""
        opened = self.open(adapter_name, version=version, alias=alias)
        tgsp.write_peft_dir(opened, Path(directory))
        return opened.manifest

    def load_peft_model(
        self, base_model: nn.Module, adapter_name: str, *, version: int = 0, alias: str = ""
    ) -> PeftModel:
        """Open an adapter and load it onto ``base_model`` with PEFT.

        The decrypted adapter goes through a private temporary directory (mode 0700),
        deleted afterwards, because ``PeftModel.from_pretrained`` reads a directory.
        """
        from peft import PeftModel

        opened = self.open(adapter_name, version=version, alias=alias)
        with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as scratch:
            target = Path(scratch) / "adapter"
            tgsp.write_peft_dir(opened, target)
            model: PeftModel = PeftModel.from_pretrained(base_model, str(target))
        return model


class RegistryKekProvider(tgsp.KekProvider):
    """A KEK provider whose ``unwrap`` asks the registry for one package's data key.

    It cannot wrap (the KEK never leaves the registry). The DEK it returns is checked by
    :func:`tensafe.tgsp.open` like any other: every chunk's GCM tag must verify under it.

    Args:
        client: The registry client.
        adapter_name: The adapter whose package is opened.
        version: Its version.
    """

    def __init__(self, client: RegistryClient, adapter_name: str, version: int) -> None:
        self._client = client
        self._adapter_name = adapter_name
        self._version = version

    @property
    def provider_id(self) -> str:
        """``registry``: the registry's ``UnwrapDataKey``."""
        return "registry"

    def wrap(self, tenant_id: str, dek: bytes, aad: bytes) -> tgsp.WrappedKey:
        """Refused: packages are wrapped by a provider that holds the tenant's KEK."""
        raise errors.FailedPrecondition(
            "the registry's UnwrapDataKey cannot wrap keys; seal packages with a provider "
            "that holds the tenant's KEK"
        )

    def unwrap(self, tenant_id: str, wrapped: tgsp.WrappedKey, aad: bytes) -> bytes:
        """The package's DEK from the registry (which verifies the package first)."""
        if wrapped.tenant_id != tenant_id:
            raise errors.IntegrityError(
                f"tenant mismatch: the key was wrapped for tenant {wrapped.tenant_id!r}",
                metadata={"check": "tenant mismatch"},
            )
        return self._client.unwrap_data_key(self._adapter_name, self._version)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
