"""Conversion between the registry's domain objects and its protobuf messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.registry.domain.keys import TrustedKey
from tensafe.registry.domain.model import AdapterRecord, VersionRecord


def timestamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def adapter_to_proto(record: AdapterRecord) -> pb.Adapter:
    """``Adapter`` message of a domain adapter."""
    return pb.Adapter(
        name=record.name,
        latest_version=record.latest_version,
        aliases=dict(record.aliases),
        create_time=timestamp(record.create_time),
    )


def version_to_proto(record: VersionRecord) -> pb.AdapterVersion:
    """``AdapterVersion`` message of a domain version."""
    return pb.AdapterVersion(
        adapter_name=record.adapter_name,
        version=record.version,
        package_sha256=record.package_sha256,
        size_bytes=record.size_bytes,
        manifest_json=record.manifest_json,
        create_time=timestamp(record.create_time),
    )


def signing_key_to_proto(key: TrustedKey) -> pb.SigningKey:
    """``SigningKey`` message of a trusted key."""
    return pb.SigningKey(
        key_id=key.verifying_key.key_id,
        public_key=key.verifying_key.to_raw(),
        create_time=timestamp(key.create_time),
    )
