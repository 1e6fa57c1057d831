r"""Canonical JSON: the JSON Canonicalization Scheme (JCS, RFC 8785).

Everything TGSP signs or binds as associated data is a JSON object in this encoding,
so that two writers in two languages produce the same bytes for the same value and a
reader can reject any other spelling. RFC 8785 in brief:

* UTF-8, no insignificant whitespace;
* object members sorted by their names compared as UTF-16 code units (RFC 8785 §3.2.3);
* strings with only ``"``, ``\`` and control characters (< U+0020) escaped, the
  controls as ``\b \t \n \f \r`` or lower-case ``\u00xx``; everything else literal;
* numbers as ECMAScript's ``Number.prototype.toString`` prints IEEE-754 doubles
  (shortest round-trip digits, fixed notation for exponents in [-6, 21), otherwise
  ``1e+21`` style), so ``1.0`` is ``1`` and ``1e-5`` is ``0.00001``.

Integers outside ±(2**53 - 1) are refused (I-JSON, RFC 7493 §2.2): another language's
parser would read them as doubles and lose digits. NaN and infinities are refused.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from json.encoder import encode_basestring
from typing import TypeAlias

from tensafe.common.errors import InvalidArgument

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
"""A value that can be encoded as JSON."""

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer every IEEE-754 double reader represents exactly (RFC 7493 §2.2)."""


def canonical_json(value: JsonValue) -> bytes:
    """Encode ``value`` as RFC 8785 canonical JSON.

    Args:
        value: Nested dicts (string keys), lists, strings, ints, floats, bools and None.

    Returns:
        The canonical UTF-8 bytes.

    Raises:
        InvalidArgument: A value has no canonical form (NaN, infinity, an integer beyond
            2**53 - 1, a non-string key, a lone surrogate, an unsupported type).
    """
    parts: list[str] = []
    _encode(value, parts, "$")
    text = "".join(parts)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument("json", "string holds a lone surrogate; not UTF-8") from exc


def parse_canonical_json(data: bytes | memoryview, *, field: str) -> JsonValue:
    """Parse bytes that must be canonical JSON and return the value.

    The bytes are decoded strictly (UTF-8, duplicate member names refused, no NaN) and
    re-encoded; anything but an exact match is refused, so a reader accepts one spelling
    per value and a signature over the bytes is a signature over the value.

    Args:
        data: The bytes to parse.
        field: Name of what is being parsed, used in error messages.

    Returns:
        The decoded value.

    Raises:
        InvalidArgument: The bytes are not UTF-8, not JSON, or not in canonical form.
    """
    raw = bytes(data)
    value = parse_json_strictly(raw, field=field)
    if canonical_json(value) != raw:
        raise InvalidArgument(field, "not in canonical JSON form (RFC 8785)")
    return value


def parse_json_strictly(data: bytes | memoryview, *, field: str) -> JsonValue:
    """Parse UTF-8 JSON, refusing duplicate member names and NaN or infinities.

    Args:
        data: The bytes to parse.
        field: Name of what is being parsed, used in error messages.

    Returns:
        The decoded value (its spelling is not checked; see :func:`parse_canonical_json`).

    Raises:
        InvalidArgument: The bytes are not UTF-8 or not such JSON.
    """
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(field, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        value: JsonValue = json.loads(
            text,
            object_pairs_hook=_no_duplicate_members,
            parse_constant=_refuse_constant,
        )
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"not valid JSON ({exc.msg} at char {exc.pos})") from exc
    except _DuplicateMember as exc:
        raise InvalidArgument(field, f"duplicate member name {exc.args[0]!r}") from exc
    except _NonFiniteNumber as exc:
        raise InvalidArgument(field, f"non-finite number {exc.args[0]}") from exc
    return value


class _DuplicateMember(ValueError):
    pass


class _NonFiniteNumber(ValueError):
    pass


def _no_duplicate_members(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
    result: dict[str, JsonValue] = {}
    for name, member in pairs:
        if name in result:
            raise _DuplicateMember(name)
        result[name] = member
    return result


def _refuse_constant(name: str) -> JsonValue:
    raise _NonFiniteNumber(name)


def _utf16_key(name: str) -> bytes:
    # RFC 8785 §3.2.3 sorts by UTF-16 code units; big-endian UTF-16 bytes compare the
    # same way. "surrogatepass" keeps lone surrogates sortable so that the UTF-8 step
    # reports them instead of this one.
    return name.encode("utf-16-be", "surrogatepass")


def _encode(value: JsonValue, parts: list[str], path: str) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise InvalidArgument(path, f"integer {value} is beyond 2**53 - 1 (RFC 7493)")
        parts.append(str(value))
    elif isinstance(value, float):
        parts.append(_format_number(value, path))
    elif isinstance(value, str):
        # The stdlib's non-ASCII string encoder escapes exactly the RFC 8785 set.
        parts.append(encode_basestring(value))
    elif isinstance(value, list):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _encode(item, parts, f"{path}[{index}]")
        parts.append("]")
    elif isinstance(value, dict):
        for name in value:
            if not isinstance(name, str):
                raise InvalidArgument(path, f"object member name {name!r} is not a string")
        parts.append("{")
        for index, name in enumerate(sorted(value, key=_utf16_key)):
            if index:
                parts.append(",")
            parts.append(encode_basestring(name))
            parts.append(":")
            _encode(value[name], parts, f"{path}.{name}")
        parts.append("}")
    else:
        raise InvalidArgument(path, f"type {type(value).__name__} has no JSON encoding")


def _format_number(value: float, path: str) -> str:
    """Print a double as ECMAScript's Number.prototype.toString does (ECMA-262 §6.1.6.1.20)."""
    if not math.isfinite(value):
        raise InvalidArgument(path, f"non-finite number {value!r} has no JSON encoding")
    if value == 0:
        return "0"  # also for -0.0, as ECMAScript prints it
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digit string that round-trips, as ECMAScript requires.
    digits_tuple, exponent = Decimal(repr(abs(value))).as_tuple()[1:]
    if not isinstance(exponent, int):  # 'n', 'N' or 'F' only for non-finite values
        raise InvalidArgument(path, f"number {value!r} has no decimal expansion")
    digits = "".join(str(d) for d in digits_tuple).lstrip("0")
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    k = len(digits)
    n = k + exponent  # the decimal point sits after n digits: value = 0.digits * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text
