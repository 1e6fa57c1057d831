"""Hypothesis strategies for any protobuf message, built field by field from its descriptor.

Nothing here knows a TenSafe message: :func:`message_strategy` walks a ``Descriptor``
and draws every field from a strategy chosen by the field's wire type — the edge values
servers get wrong (0, -1, the type's min and max, NaN, ±inf, -0.0, empty, NUL, unicode,
path traversal, long strings, unknown enum numbers), repeated fields of 0..n elements,
maps, oneofs (at most one member set) and nested messages down to a depth limit. A new
RPC or field is fuzzed without touching this module.

To get past the first validation a :class:`Pool` of real values (ids, names, versions
of objects the fixture created) is mixed into the string and integer strategies, and
:func:`mutated` starts from a valid request and overwrites a few fields with fuzzed
values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 3
"""Nested messages deeper than this are left empty (recursive types stay finite)."""

MAX_REPEATED = 5
"""Elements of a repeated message field at most."""

MAX_REPEATED_SCALAR = 24
"""Elements of a repeated scalar field at most (token lists, shapes, float data)."""

LONG_STRING = 5_000
"""A long string: far past every name limit, far below the 4 MiB message limit, so the
server's own validation is what the fuzzer tests, not gRPC's size check."""

EDGE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "./",
    "%2e%2e%2f",
    "C:\\Windows\\system32",
    "naïve-ünïcödé-名前-🚀",
    "\u202e\u200b\ufeff",
    "'; DROP TABLE auth_tenants; --",
    "${jndi:ldap://x}",
    "{}",
    "null",
    "-1",
    "NaN",
    "x" * 64,
    "x" * 65,
    "x" * 129,
    "x" * 257,
    "y" * LONG_STRING,
)

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

_FLOAT_EDGES: tuple[float, ...] = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    math.nan,
    math.inf,
    -math.inf,
    1e-300,
    5e-324,
    1e300,
    -1e300,
    1e-5,
    1e9,
)


@dataclasses.dataclass
class Pool:
    """Real values the fuzzer mixes into its strings and integers.

    Attributes:
        strings: Ids and names of objects that exist (training clients, datasets,
            futures, adapters, tenants, principals, API keys, checkpoint paths…).
        by_field: The same values keyed by the field name that takes them
            (``training_client_id``…): a field of that name draws them often.
        integers: Small integers that are valid somewhere (versions, steps, sizes).
        bounded: Integer fields, by name, that draw only from the given values: a
            valid ``steps`` of a few hundred would queue minutes of real training per
            example, so only tiny and out-of-range step counts are sent.
    """

    strings: list[str] = dataclasses.field(default_factory=list)
    by_field: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    integers: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])
    bounded: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {"steps": [-1, 0, 1, 2, 1_000_001, 2**31 - 1, 2**63 - 1]}
    )

    def add(self, *values: str, fields: tuple[str, ...] = ()) -> None:
        """Add real strings (empty ones are ignored), for the named fields in particular."""
        for value in values:
            if not value:
                continue
            if value not in self.strings:
                self.strings.append(value)
            for name in fields:
                self.by_field.setdefault(name, []).append(value)


def _int_strategy(field_type: int, pool: Pool) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field_type]
    edges = sorted(
        {
            v
            for v in (0, 1, -1, 2, 7, 64, 1024, 2**31 - 1, 2**32, low, high, low + 1, high - 1)
            if low <= v <= high
        }
    )
    known = [v for v in pool.integers if low <= v <= high]
    choices: list[st.SearchStrategy[int]] = [
        st.sampled_from(edges),
        st.integers(min_value=max(low, -100), max_value=min(high, 100)),
        st.integers(min_value=low, max_value=high),
    ]
    if known:
        choices.append(st.sampled_from(known))
    return st.one_of(choices)


def _float_strategy(field_type: int) -> st.SearchStrategy[float]:
    width = 32 if field_type == FieldDescriptor.TYPE_FLOAT else 64
    edges = [v for v in _FLOAT_EDGES if width == 64 or not math.isfinite(v) or abs(v) < 3e38]
    return st.one_of(
        st.sampled_from(edges),
        st.floats(width=width, allow_nan=True, allow_infinity=True),
        st.floats(min_value=0.0, max_value=10.0, width=width),
    )


def string_strategy(pool: Pool, field_name: str = "") -> st.SearchStrategy[str]:
    """Strings: real ids from the pool, the edge strings, and arbitrary unicode.

    A field the pool has values for (by name) gets one of them half of the time: a
    fuzzer that never names a real object never gets past NOT_FOUND.
    """
    choices: list[st.SearchStrategy[str]] = [
        st.sampled_from(EDGE_STRINGS),
        st.text(max_size=40),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24),
    ]
    if pool.strings:
        choices.append(st.sampled_from(pool.strings))
    known = pool.by_field.get(field_name)
    if known:
        choices += [st.sampled_from(known)] * len(choices)
    return st.one_of(choices)


def _bytes_strategy() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(b""),
        st.binary(max_size=64),
        st.binary(min_size=1, max_size=4096),
        st.just(b"\x00" * 70_000),
    )


def _scalar_strategy(field: FieldDescriptor, pool: Pool) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        if field.name in pool.bounded:
            return st.sampled_from([v for v in pool.bounded[field.name] if low <= v <= high])
        return _int_strategy(kind, pool)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _float_strategy(kind)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return string_strategy(pool, field.name)
    if kind == FieldDescriptor.TYPE_BYTES:
        return _bytes_strategy()
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        # Unknown numbers too: proto3 enums are open, so a client can send any int32.
        return st.one_of(st.sampled_from(numbers), st.sampled_from([-1, 99, 2**31 - 1]))
    raise AssertionError(f"no strategy for field type {kind} of {field.full_name}")


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
        and _is_repeated(field)
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _field_strategy(field: FieldDescriptor, pool: Pool, depth: int) -> st.SearchStrategy[Any]:
    """A value for one field: a scalar, message, list or dict, as the field needs."""
    if _is_map(field):
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        return st.dictionaries(
            _scalar_strategy(key_field, pool),
            _single_strategy(value_field, pool, depth + 1),
            max_size=4,
        )
    single = _single_strategy(field, pool, depth)
    if _is_repeated(field):
        limit = MAX_REPEATED if field.type == FieldDescriptor.TYPE_MESSAGE else MAX_REPEATED_SCALAR
        return st.lists(single, max_size=limit)
    return single


def _single_strategy(field: FieldDescriptor, pool: Pool, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, pool, depth=depth + 1)
    return _scalar_strategy(field, pool)


def set_field(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set ``field`` of ``message`` to a value drawn by this module's strategies."""
    target = getattr(message, field.name)
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(field):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def message_strategy(
    descriptor: Descriptor, pool: Pool, *, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of fields set to fuzzed values.

    Args:
        descriptor: The message type.
        pool: Real values to mix in.
        depth: Nesting depth of this message (beyond :data:`MAX_DEPTH`: empty).

    Returns:
        A strategy for instances of the generated class.
    """
    cls = message_factory.GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    plain = {
        field.name: _field_strategy(field, pool, depth)
        for field in descriptor.fields
        if field.containing_oneof is None
    }
    # A field the pool has real values for is always set (its strategy still draws
    # edge values and empty strings too): mostly absent ids only ever meet NOT_FOUND.
    always = {name: plain.pop(name) for name in list(plain) if name in pool.by_field}
    oneofs = [
        st.one_of(
            st.none(),
            *(
                st.tuples(st.just(member.name), _field_strategy(member, pool, depth))
                for member in oneof.fields
            ),
        )
        for oneof in descriptor.oneofs
    ]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        values = draw(st.fixed_dictionaries(always, optional=plain))
        for name, value in values.items():
            set_field(message, descriptor.fields_by_name[name], value)
        for oneof in oneofs:
            chosen = draw(oneof)
            if chosen is not None:
                set_field(message, descriptor.fields_by_name[chosen[0]], chosen[1])
        return message

    return build()


def mutated(base: Message, pool: Pool) -> st.SearchStrategy[Message]:
    """A valid request with a few of its fields replaced by fuzzed values (or cleared).

    Reaches the checks behind the first validation, which a request built from nothing
    rarely passes.
    """
    descriptor = base.DESCRIPTOR
    fields = list(descriptor.fields)
    replacement = {
        field.name: st.one_of(st.none(), _field_strategy(field, pool, 1)) for field in fields
    }

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = type(base)()
        message.CopyFrom(base)
        names = draw(st.lists(st.sampled_from([f.name for f in fields]), max_size=3, unique=True))
        for name in names:
            field = descriptor.fields_by_name[name]
            value = draw(replacement[name])
            message.ClearField(name)
            if value is not None:
                set_field(message, field, value)
        return message

    return build()


def _bytes_fields(message: Message) -> list[tuple[Message, FieldDescriptor]]:
    """The set bytes fields of a message and of its (non-repeated) sub-messages."""
    found: list[tuple[Message, FieldDescriptor]] = []
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_BYTES and not _is_repeated(field):
            found.append((message, field))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_repeated(field):
            found += _bytes_fields(value)
    return found


def corrupted(stream: list[Message]) -> st.SearchStrategy[list[Message]]:
    """A complete valid request stream, damaged once: bytes of one bytes field flipped,
    cut short or extended, a message dropped or repeated — or left intact.

    Aimed at the parsers behind the first validation (SEAL key and parameter loading,
    signed-package verification, JSONL decoding), which fuzzed bytes from nothing never
    reach because a size or header check refuses them first.
    """

    @st.composite
    def build(draw: st.DrawFn) -> list[Message]:
        messages = [type(m).FromString(m.SerializeToString()) for m in stream]
        action = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "repeat", "intact"]))
        targets = [pair for m in messages for pair in _bytes_fields(m)]
        if action in ("flip", "truncate", "extend") and targets:
            owner, field = draw(st.sampled_from(targets))
            data = bytearray(getattr(owner, field.name))
            if action == "flip" and data:
                for position in draw(
                    st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=16)
                ):
                    data[position] ^= draw(st.integers(1, 255))
            elif action == "truncate":
                del data[draw(st.integers(0, max(0, len(data) - 1))) :]
            else:
                data += draw(st.binary(min_size=1, max_size=64))
            setattr(owner, field.name, bytes(data))
        elif action == "drop" and len(messages) > 1:
            del messages[draw(st.integers(1, len(messages) - 1))]
        elif action == "repeat":
            index = draw(st.integers(0, len(messages) - 1))
            messages.insert(index, messages[index])
        return messages

    return build()
