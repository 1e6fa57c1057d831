r"""One rule for text fields, applied to every request at the edge of every service.

A string field of a request may not contain control characters: the C0 set
(U+0000–U+001F), DEL (U+007F) and the C1 set (U+0080–U+009F), i.e. Unicode general
category ``Cc``. A request that has one is refused with INVALID_ARGUMENT naming the field
by its path in the request (``data[2].model_input.chunks[0]...``, ``items[1]``,
``labels["k"]``), before any servicer, database or queue sees it. Why:

* NUL cannot be stored in a PostgreSQL ``text`` column (asyncpg refuses 0x00) while
  SQLite stores it, so without the rule the same request got INTERNAL on one database
  and NOT_FOUND on the other;
* names, ids and request ids with ``\n``/``\r`` forge lines in logs and audit
  payloads read by people, and look identical to other names when printed.

The rule is the same for lookups by id: an id with a control character cannot exist, so
the answer is INVALID_ARGUMENT (a well-formed unknown id stays NOT_FOUND). Free-text
fields, where line breaks and tabs are part of the value, are named in
:data:`FREE_TEXT_FIELDS`; there ``\t``, ``\n`` and ``\r`` are allowed and every other
control character is still refused. ``bytes`` fields (ciphertexts, keys, packages,
dataset chunks) are data, not text, and are not checked.

:func:`check_request_text` is called by the shared error interceptor
(:mod:`tensafe.common.grpc_errors`) on every decoded request message, so no servicer
repeats it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tensafe.common import errors

FREE_TEXT_FIELDS = frozenset(
    {
        # A person's note about an API key: may span lines.
        "tensafe.auth.v1.CreateApiKeyRequest.description",
        # Sampling stop sequences: "\n" and "\n\n" are the most common ones.
        "tensafe.trainer.v1.SamplingParams.stop",
    }
)
"""Full names of the string fields where ``\\t``, ``\\n`` and ``\\r`` are allowed."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_LINE_BREAKS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_text(field: str, value: str, *, free_text: bool = False) -> None:
    """Refuse ``value`` if it holds a control character the rule forbids.

    Args:
        field: The field's path, for the error.
        value: The text.
        free_text: Allow tab, line feed and carriage return.

    Raises:
        InvalidArgument: ``value`` holds a forbidden control character; the message
            names its code point and position, never echoes the value.
    """
    pattern = _CONTROL_EXCEPT_LINE_BREAKS if free_text else _CONTROL
    found = pattern.search(value)
    if found is not None:
        raise errors.InvalidArgument(
            field,
            f"must not contain control characters (U+{ord(found.group()):04X} at "
            f"position {found.start()})",
            reason="CONTROL_CHARACTER",
        )


def check_request_text(message: Message) -> None:
    """Apply the rule to every string field set in ``message``, recursively.

    Args:
        message: A decoded request message.

    Raises:
        InvalidArgument: A string field (or map key) holds a forbidden character; the
            field is named by its path in the request.
    """
    if _has_text(message.DESCRIPTOR):
        _check_message(message, "")


@functools.cache
def _has_text(descriptor: Descriptor) -> bool:
    """Whether a message type can hold a string anywhere (cached per type)."""
    return _reaches_text(descriptor, frozenset())


def _reaches_text(descriptor: Descriptor, seen: frozenset[str]) -> bool:
    if descriptor.full_name in seen:
        return False  # a recursive type: its strings are found on the first visit
    seen = seen | {descriptor.full_name}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return True
        if field.type == FieldDescriptor.TYPE_MESSAGE and _reaches_text(_type_of(field), seen):
            return True
    return False


def _check_message(message: Message, prefix: str) -> None:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            free = field.full_name in FREE_TEXT_FIELDS
            if _is_repeated(field):
                for index, item in enumerate(value):
                    check_text(f"{path}[{index}]", item, free_text=free)
            else:
                check_text(path, value, free_text=free)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if _type_of(field).GetOptions().map_entry:
                _check_map(field, value, path)
            elif not _has_text(_type_of(field)):
                continue
            elif _is_repeated(field):
                for index, item in enumerate(value):
                    _check_message(item, f"{path}[{index}].")
            else:
                _check_message(value, f"{path}.")


def _check_map(field: FieldDescriptor, value: object, path: str) -> None:
    entry = _type_of(field)
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    assert isinstance(value, Mapping)
    for key, item in value.items():
        if key_field.type == FieldDescriptor.TYPE_STRING:
            check_text(f"{path} key", key)
        item_path = f"{path}[{key!r}]"
        if value_field.type == FieldDescriptor.TYPE_STRING:
            check_text(item_path, item, free_text=value_field.full_name in FREE_TEXT_FIELDS)
        elif value_field.type == FieldDescriptor.TYPE_MESSAGE and _has_text(
            _type_of(value_field)
        ):
            _check_message(item, f"{item_path}.")


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _type_of(field: FieldDescriptor) -> Descriptor:
    """The message type of a message-typed field."""
    assert field.message_type is not None
    return field.message_type
