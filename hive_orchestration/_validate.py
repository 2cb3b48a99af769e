"""Checks run at the API boundary, before anything is sent to an actor.

msgspec validates types only when decoding, not when a Struct is built, so values coming
from user code are checked here: a wrong type, NaN, an integer SQLite cannot store, a lone
surrogate, or a payload nested too deep or too large becomes an :class:`InvalidInputError`
naming the field, and never a crash inside an actor.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from .errors import InvalidInputError
from .messages.storage import ReadEvents

__all__ = [
    "MAX_NAMES",
    "MAX_READ",
    "check_event_read",
    "check_identifier",
    "check_names",
    "check_int",
    "check_optional_text",
    "check_text",
    "encode_json_object",
]

_SQLITE_MIN = -(2**63)
_SQLITE_MAX = 2**63 - 1
# C0, DEL and C1: the characters Unicode calls "control" (category Cc).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _mapping_to_dict(value: object) -> object:
    # msgspec encodes dicts natively; any other Mapping (checked before) is encoded as one.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


_encoder = msgspec.json.Encoder(enc_hook=_mapping_to_dict)


def _show(value: object, limit: int = 80) -> str:
    """``value`` for an error message: its repr cut to ``limit`` characters, an integer too
    long to print (Python refuses past 4300 digits) by its size, and a value whose repr
    fails (nested too deep, or a caller's object that raises) by its type."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_identifier(value: object, field: str, *, max_length: int = 256) -> str:
    """A non-empty string without surrogates or control characters (names, ids, types)."""
    if not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, got {type(value).__name__}")
    if value.isascii() and value.isprintable() and value.strip() and len(value) <= max_length:
        return value  # the common case: plain ASCII, no control characters
    if not value or not value.strip():
        raise InvalidInputError(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidInputError(field, f"must be at most {max_length} characters")
    check_text(value, field)
    if _CONTROL.search(value):
        raise InvalidInputError(field, "must not contain control characters")
    return value


#: Most names a list of names holds (tags, requirements, capabilities, task types): a
#: bound on the row and on the claim's matching work, far above real use.
MAX_NAMES = 256


def check_names(value: object, field: str) -> tuple[str, ...]:
    """A list of names (``check_identifier`` each, ``field[i]`` in an error), at most
    :data:`MAX_NAMES` of them; an iterator is read no further than that."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidInputError(field, "must be a list of strings")
    names: list[str] = []
    for i, item in enumerate(value):
        if i == MAX_NAMES:
            raise InvalidInputError(field, f"holds more than {MAX_NAMES} names")
        names.append(check_identifier(item, f"{field}[{i}]"))
    return tuple(names)


def check_optional_text(value: object, field: str, *, max_length: int = 256) -> str | None:
    return None if value is None else check_identifier(value, field, max_length=max_length)


def check_int(value: object, field: str, *, minimum: int, maximum: int = _SQLITE_MAX) -> int:
    # bool is an int subclass; True as a limit or an offset is a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(field, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidInputError(
            field, f"must be between {minimum} and {maximum}, got {_show(value)}"
        )
    return value


def check_seconds(
    value: object, field: str, *, positive: bool = True, maximum: float = 366 * 86_400.0
) -> float:
    """A duration: a finite number of seconds, above 0 (or at least 0 when not
    ``positive``) and at most ``maximum`` (a year by default)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(field, f"must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an integer past the largest float: refused by the bounds below
        seconds = math.inf if value > 0 else -math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(field, f"must be a finite number of seconds, got {_show(value)}")
    if seconds < 0 or (positive and seconds == 0):
        bound = "more than 0" if positive else "at least 0"
        raise InvalidInputError(field, f"must be {bound} seconds, got {_show(value)}")
    if seconds > maximum:
        raise InvalidInputError(field, f"must be at most {maximum:g} seconds, got {_show(value)}")
    return seconds


E = TypeVar("E", bound=enum.StrEnum)


def check_choice(
    value: object, choices: type[E], field: str, *, aliases: tuple[str, ...] = ()
) -> E:
    """A member of the string enum ``choices``, given as itself or as its value."""
    if isinstance(value, choices):
        return value
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return choices(value)
    except ValueError:
        valid = ", ".join([*aliases, *(choice.value for choice in choices)])
        raise InvalidInputError(field, f"must be one of {valid}, got {_show(value)}") from None


def check_str(value: object, field: str, *, empty: bool = True, limit: int = 10_000) -> str:
    """Free text (a title, a description, an error): a string of at most ``limit``
    characters, valid as text, and not blank unless ``empty``."""
    if not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, got {type(value).__name__}")
    if not empty and not value.strip():
        raise InvalidInputError(field, "must not be empty")
    if len(value) > limit:
        raise InvalidInputError(field, f"must be at most {limit} characters")
    check_text(value, field)
    return value


def check_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(field, f"must be a bool, got {type(value).__name__}")
    return value


def check_text(value: str, field: str) -> None:
    """Refuse a string that is not valid text (a lone surrogate cannot be stored)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            field, "contains a lone surrogate, which is not valid text"
        ) from None


def encode_json_object(
    value: object, field: str, *, max_bytes: int, max_depth: int
) -> tuple[dict[str, Any], bytes]:
    """Check that ``value`` is a JSON object SQLite and msgspec can round-trip; encode it.

    Returns a deep copy in plain JSON types, decoded from what will be stored (so later
    changes to the caller's objects cannot reach the runtime, and tuples become lists
    before, not after, a restart), and its JSON encoding. ``None`` becomes ``{}``.
    """
    if value is None:
        return {}, b"{}"
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            field, f"must be a JSON object (a dict), got {type(value).__name__}"
        )
    _check_json(value, field, max_depth)
    try:
        encoded = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:  # pragma: no cover - checked above
        raise InvalidInputError(field, f"cannot be encoded as JSON: {exc}") from None
    if len(encoded) > max_bytes:
        raise InvalidInputError(
            field, f"is {len(encoded)} bytes once encoded, over the limit of {max_bytes}"
        )
    return msgspec.json.decode(encoded), encoded


def _is_flat_ascii(value: dict[object, object]) -> bool:
    for key, item in value.items():
        if not isinstance(key, str) or not key.isascii():
            return False
        if isinstance(item, str):
            if not item.isascii():
                return False
        elif item is None or isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not _SQLITE_MIN <= item <= _SQLITE_MAX:
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        else:
            return False
    return True


# A node of the walk: (value, parent node, key in the parent, depth). The field path of a
# node is only spelled out when it is reported, so a valid payload costs no string work.
_Node = tuple[object, "_Node | None", "str | int | None", int]


def _path(node: _Node, root: str) -> str:
    parts: list[str] = []
    current: _Node | None = node
    while current is not None and current[1] is not None:
        key = current[2]
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        current = current[1]
    return root + "".join(reversed(parts))


def _check_json(root: object, field: str, max_depth: int) -> None:
    if type(root) is dict and _is_flat_ascii(root):
        return  # the common case: one level of plain keys and values, nothing to report
    # Iterative, so that a hostile depth cannot exhaust the Python stack.
    stack: list[_Node] = [(root, None, None, 1)]
    while stack:
        node = stack.pop()
        value, _, _, depth = node
        if value is None or value is True or value is False:
            continue
        if isinstance(value, str):
            if not value.isascii():
                check_text(value, _path(node, field))
        elif isinstance(value, int):
            if not _SQLITE_MIN <= value <= _SQLITE_MAX:
                raise InvalidInputError(
                    _path(node, field),
                    f"{_show(value)} does not fit in 64 bits (an SQLite integer)",
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidInputError(
                    _path(node, field), f"must be a finite number, got {_show(value)}"
                )
        elif isinstance(value, Mapping):
            if depth > max_depth:
                raise InvalidInputError(
                    _path(node, field), f"is nested deeper than {max_depth} levels"
                )
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidInputError(
                        _path(node, field),
                        f"object keys must be strings, got {type(key).__name__}",
                    )
                if not key.isascii():
                    check_text(key, f"{_path(node, field)}.{key!r}")
                stack.append((item, node, key, depth + 1))
        elif isinstance(value, list | tuple):
            if depth > max_depth:
                raise InvalidInputError(
                    _path(node, field), f"is nested deeper than {max_depth} levels"
                )
            stack.extend((item, node, i, depth + 1) for i, item in enumerate(value))
        else:
            raise InvalidInputError(
                _path(node, field), f"{type(value).__name__} is not a JSON value"
            )


#: Most rows one read returns.
MAX_READ = 10_000


def check_event_read(
    after: object,
    limit: object,
    pattern: object,
    task_id: object,
    plan_id: object,
    correlation_id: object,
    newest: object = False,
) -> ReadEvents:
    """A read of the event log, every argument checked (``Runtime`` and ``Inspector``)."""
    return ReadEvents(
        after=check_int(after, "after", minimum=0),
        limit=check_int(limit, "limit", minimum=1, maximum=MAX_READ),
        pattern=check_identifier(pattern, "pattern"),
        task_id=check_optional_text(task_id, "task_id"),
        plan_id=check_optional_text(plan_id, "plan_id"),
        correlation_id=check_optional_text(correlation_id, "correlation_id"),
        newest=check_bool(newest, "newest"),
    )
