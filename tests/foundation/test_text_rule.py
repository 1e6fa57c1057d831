"""The one rule for text fields (:mod:`tensafe.common.text`) on real request messages."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import tensafe.proto
from tensafe.common import errors
from tensafe.common.text import FREE_TEXT_FIELDS, check_request_text, check_text
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.he.v1 import he_service_pb2 as he_pb
from tensafe.proto.trainer.v1 import trainer_service_pb2 as trainer_pb


def _refused(message: object) -> errors.InvalidArgument:
    with pytest.raises(errors.InvalidArgument) as info:
        check_request_text(message)  # type: ignore[arg-type]
    return info.value


def test_the_field_is_named_by_its_path_in_the_request() -> None:
    request = trainer_pb.SampleRequest(
        training_client_id="c1",
        sampling_params=trainer_pb.SamplingParams(stop=["ok", "\n\n", "bad\x00"]),
    )
    assert _refused(request).field == "sampling_params.stop[2]"
    request = trainer_pb.CreateTrainingClientRequest(
        base_model="m", lora=trainer_pb.LoraConfig(target_modules=["q_proj", "v\rproj"])
    )
    assert _refused(request).field == "lora.target_modules[1]"
    datum = trainer_pb.Datum()
    datum.loss_fn_inputs["targets\x01"].CopyFrom(trainer_pb.TensorData(int_data=[1]))
    request = trainer_pb.ForwardBackwardRequest(training_client_id="c1", data=[datum, datum])
    assert _refused(request).field == "data[0].loss_fn_inputs key"


def test_free_text_fields_allow_line_breaks_and_nothing_else() -> None:
    check_request_text(auth_pb.CreateApiKeyRequest(principal_id="p", description="a\nb\r\n\tc"))
    check_request_text(
        trainer_pb.SampleRequest(sampling_params=trainer_pb.SamplingParams(stop=["\n"]))
    )
    for bad in ("\x00", "\x1b[31m", "\x7f", "\x9b"):
        refused = _refused(auth_pb.CreateApiKeyRequest(principal_id="p", description=bad))
        assert refused.field == "description"
    # The same characters in a name are refused.
    assert _refused(auth_pb.CreatePrincipalRequest(name="a\nb")).field == "name"


def test_bytes_are_not_text() -> None:
    check_request_text(he_pb.ApplyLoraRequest(chunk=he_pb.CiphertextChunk(data=b"\x00\n\xff" * 9)))


def test_check_text_does_not_echo_the_value() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        check_text("name", "secret-ish\x00value")
    assert "secret-ish" not in info.value.message
    assert "U+0000 at position 10" in info.value.message


def _request_types() -> list[Descriptor]:
    found = []
    for module in pkgutil.walk_packages(tensafe.proto.__path__, "tensafe.proto."):
        if module.name.endswith("_pb2"):
            for service in importlib.import_module(
                module.name
            ).DESCRIPTOR.services_by_name.values():
                found.extend(method.input_type for method in service.methods)
    return found


def _string_fields(descriptor: Descriptor, seen: set[str]) -> set[str]:
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    names = set()
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            names.add(field.full_name)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            names |= _string_fields(field.message_type, seen)
    return names


def test_every_free_text_field_exists_in_a_request() -> None:
    # The allow-list names real request fields (a renamed field would silently lose
    # its exemption otherwise); everything else reachable from a request is strict.
    reachable: set[str] = set()
    for request in _request_types():
        reachable |= _string_fields(request, set())
    assert reachable >= FREE_TEXT_FIELDS
    assert len(reachable) > 40
