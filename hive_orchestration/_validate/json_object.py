"""The check of a JSON object (a payload, a result, a plan) and its encoding.

The work is bounded by the limit, not by the size of the value: a walk that counts a lower
bound of the encoded size as it goes and stops as soon as that passes the limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgspec

from ..errors import InvalidInputError
from .values import _SQLITE_MAX, _SQLITE_MIN, _show


def _mapping_to_dict(value: object) -> object:
    # msgspec encodes dicts natively; any other Mapping (checked before) is encoded as one.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


_encoder = msgspec.json.Encoder(enc_hook=_mapping_to_dict)


def encode_json_object(
    value: object,
    field: str,
    *,
    max_bytes: int,
    max_depth: int,
    setting: str = "max_payload_bytes",
) -> tuple[dict[str, Any], bytes]:
    """Check that ``value`` is a JSON object SQLite and msgspec can round-trip; encode it.

    Returns a deep copy in plain JSON types, decoded from what will be stored (so later
    changes to the caller's objects cannot reach the runtime, and tuples become lists
    before, not after, a restart), and its JSON encoding. ``None`` becomes ``{}``.

    The work is bounded by ``max_bytes``, not by the size of ``value``: the check counts
    a lower bound of the encoded size as it goes (a container by its length before its
    items are read, a string by its length before its characters are) and stops as soon
    as that passes the limit, so an oversized payload is refused having read at most
    about ``max_bytes`` worth of it. ``setting`` names the config field of the limit.
    """
    if value is None:
        return {}, b"{}"
    if type(value) is not dict and not isinstance(value, Mapping):  # a dict skips the ABC
        raise InvalidInputError(
            field, f"must be a JSON object (a dict), got {type(value).__name__}"
        )
    _check_json(value, field, max_bytes=max_bytes, max_depth=max_depth, setting=setting)
    try:
        encoded = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:  # pragma: no cover - checked above
        raise InvalidInputError(field, f"cannot be encoded as JSON: {exc}") from None
    if len(encoded) > max_bytes:
        # The count above is a lower bound (a character may take up to 6 bytes, a number
        # up to 24), so the encoding, at most a few times the limit, is measured too.
        raise InvalidInputError(
            field,
            f"is {len(encoded)} bytes once encoded, over the limit of {max_bytes} "
            f"({setting}): send less, or raise {setting}",
        )
    return msgspec.json.decode(encoded), encoded


def check_json_object(
    value: object, field: str, *, max_bytes: int, max_depth: int, setting: str
) -> None:
    """The checks of :func:`encode_json_object` without the encoding (a JSON object
    inside a larger one, checked against a smaller limit of its own)."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            field, f"must be a JSON object (a dict), got {type(value).__name__}"
        )
    _check_json(value, field, max_bytes=max_bytes, max_depth=max_depth, setting=setting)


def _min_size(value: object) -> int:
    """A lower bound of the encoded size of a container, from its length alone: ``[]``
    is 2 bytes, a list of n items at least 2n+1 (an item is at least 1 byte, with the
    commas between them), an object of n members at least 5n+1 (``"":0`` and a comma)."""
    n = len(value)  # type: ignore[arg-type]
    if not n:
        return 2
    return 5 * n + 1 if type(value) is dict or isinstance(value, Mapping) else 2 * n + 1


class _TooBig(Exception):
    """The walk's count passed the limit: raised inside the walk, reported by _check_json
    (with the count reached, ``args[0]``)."""


class _Bad(Exception):
    """A value the walk refuses: ``(container, key, reason)``, where the key is an index,
    a member's name, ``_Key(name)`` for the name itself, or None for the container. The
    walk keeps no path (it would cost every value of every valid payload): _check_json
    finds the container again to name the field."""


class _Key(str):
    """A member's name as the thing refused (a key that is not valid text)."""


def _check_json(
    root: Mapping[Any, Any], field: str, *, max_bytes: int, max_depth: int, setting: str
) -> None:
    try:
        _walk(root, max_bytes, max_depth)
    except _TooBig as stop:
        raise too_big(field, max_bytes, stop.args[0], setting) from None
    except _Bad as bad:
        container, key, reason = bad.args
        path = _path_to(root, container, field, max_depth)
        if isinstance(key, _Key):
            path += f".{_show(str(key))}"
        elif key is not None:
            path += _segment(key)
        raise InvalidInputError(path, reason) from None


def too_big(field: str, max_bytes: int, counted: int, setting: str) -> InvalidInputError:
    """The refusal of a JSON value whose encoding is known to pass ``max_bytes`` (the
    config's ``setting``) from ``counted``, a lower bound, before it was read whole."""
    return InvalidInputError(
        field,
        f"is more than {max_bytes} bytes once encoded (at least {counted} counted before "
        f"the check stopped), over the limit of {max_bytes} ({setting}): send less, or "
        f"raise {setting}",
    )


def _walk(root: Mapping[Any, Any], max_bytes: int, max_depth: int) -> None:
    """Check every value under ``root``; raise _TooBig or _Bad.

    Iterative, so that a hostile depth cannot exhaust the Python stack. ``used`` is a
    lower bound of the encoded size of every value met so far, a container counted by its
    length when it is met (before its items are read), and the walk stops at the first
    value that takes it past ``max_bytes``: it reads at most about ``max_bytes / 2``
    values, whatever the payload's size.

    This is the hot path of every payload, hence one loop with the plain JSON types
    tested inline by exact type (a call, an allocation or an ABC isinstance per value
    would double the cost); anything else (subclasses, other Mappings and sequences,
    errors) goes to _member. Each value adds to ``used`` what it takes beyond the 1 byte
    counted with its container (an integer adds nothing).
    """
    used = _min_size(root)
    if used > max_bytes:
        raise _TooBig(used)
    values: list[Any] = [root]  # containers still to read, and their depths
    depths = [1]
    while values:
        value = values.pop()
        depth = depths.pop()
        if depth > max_depth:
            raise _Bad(value, None, f"is nested deeper than {max_depth} levels")
        depth += 1  # of its items
        kind = type(value)
        if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
            members: Iterable[tuple[Any, Any]] = value.items()
            if type(value) is not dict:
                # Only a dict's length is known to match what it yields; another Mapping
                # is read no further than its length says (it cannot feed the walk forever).
                members = _bounded(members, len(value), value)
            for key, item in members:
                if type(key) is not str and not isinstance(key, str):
                    reason = f"object keys must be strings, got {type(key).__name__}"
                    raise _Bad(value, None, reason)
                used += len(key)  # its quotes and colon were counted with the object
                if used > max_bytes:
                    raise _TooBig(used)
                if not key.isascii():
                    _text(value, _Key(key), key)
                kind = type(item)
                if kind is str:
                    used += len(item) + 1
                    if used > max_bytes:
                        raise _TooBig(used)  # before reading a character of it
                    if not item.isascii():  # ASCII is valid text; isascii() costs nothing
                        _text(value, key, item)
                elif kind is int:
                    if not _SQLITE_MIN <= item <= _SQLITE_MAX:
                        _member(item, value, key, values, depths, depth, used, max_bytes)
                elif kind is float:
                    used += 2  # msgspec writes a float in 3 bytes at least ("0.0", "1e16")
                    if used > max_bytes:
                        raise _TooBig(used)
                    if item - item != 0.0:  # NaN or an infinity
                        _member(item, value, key, values, depths, depth, used, max_bytes)
                elif kind is dict or kind is list:
                    n = len(item)
                    used += (5 * n if kind is dict else 2 * n) if n else 1
                    if used > max_bytes:
                        raise _TooBig(used)
                    if n:
                        values.append(item)
                        depths.append(depth)
                    elif depth > max_depth:  # nothing in it to read but its depth
                        raise _Bad(value, key, f"is nested deeper than {max_depth} levels")
                elif item is None or item is True or item is False:
                    used += 3 if item is not False else 4
                    if used > max_bytes:
                        raise _TooBig(used)
                else:
                    used += _member(item, value, key, values, depths, depth, used, max_bytes)
                    if used > max_bytes:
                        raise _TooBig(used)
        else:
            items: Sequence[Any] = value
            if type(value) is not list and type(value) is not tuple:
                items = list(_bounded(value, len(value), value))  # counted already
            for item in items:
                kind = type(item)
                if kind is str:
                    used += len(item) + 1
                    if used > max_bytes:
                        raise _TooBig(used)
                    if not item.isascii():
                        _text(value, _index(items, item), item)
                elif kind is int:
                    if not _SQLITE_MIN <= item <= _SQLITE_MAX:
                        index = _index(items, item)
                        _member(item, value, index, values, depths, depth, used, max_bytes)
                elif kind is float:
                    used += 2
                    if used > max_bytes:
                        raise _TooBig(used)
                    if item - item != 0.0:
                        index = _index(items, item)
                        _member(item, value, index, values, depths, depth, used, max_bytes)
                elif kind is dict or kind is list:
                    n = len(item)
                    used += (5 * n if kind is dict else 2 * n) if n else 1
                    if used > max_bytes:
                        raise _TooBig(used)
                    if n:
                        values.append(item)
                        depths.append(depth)
                    elif depth > max_depth:
                        reason = f"is nested deeper than {max_depth} levels"
                        raise _Bad(value, _index(items, item), reason)
                elif item is None or item is True or item is False:
                    used += 3 if item is not False else 4
                    if used > max_bytes:
                        raise _TooBig(used)
                else:
                    index = _index(items, item)
                    used += _member(item, value, index, values, depths, depth, used, max_bytes)
                    if used > max_bytes:
                        raise _TooBig(used)


def _text(container: object, key: str | int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(container, key, "contains a lone surrogate, which is not valid text") from None


def _index(items: Iterable[object], item: object) -> int:
    """Where ``item`` (the object itself) is in ``items``: an array's items are read
    without their index, which only an error needs."""
    for index, candidate in enumerate(items):
        if candidate is item:
            return index
    raise AssertionError("not an item")  # pragma: no cover - item came from items


def _bounded(items: Iterable[Any], length: int, container: object) -> Iterator[Any]:
    for count, item in enumerate(items):
        if count >= length:
            raise _Bad(container, None, "yields more items than its len() says")
        yield item


def _member(
    item: object,
    container: object,
    key: str | int,
    values: list[Any],
    depths: list[int],
    depth: int,
    used: int,
    max_bytes: int,
) -> int:
    """What ``item`` adds to the count, for a value the loops of _walk do not take inline:
    a subclass of a JSON type, another Mapping or sequence (queued), or an error."""
    if isinstance(item, str):  # a StrEnum member, say: encoded as its text
        if used + len(item) + 1 > max_bytes:
            raise _TooBig(used + len(item) + 1)  # before reading a character of it
        if not item.isascii():
            _text(container, key, item)
        return len(item) + 1
    if isinstance(item, int):  # an IntEnum member, say (bool is never a subclass)
        if not _SQLITE_MIN <= item <= _SQLITE_MAX:
            reason = f"{_show(item)} does not fit in 64 bits (an SQLite integer)"
            raise _Bad(container, key, reason)
        return 0
    if isinstance(item, float):
        if not math.isfinite(item):
            raise _Bad(container, key, f"must be a finite number, got {_show(item)}")
        return 2
    if isinstance(item, Mapping | list | tuple):
        values.append(item)
        depths.append(depth)
        return _min_size(item) - 1
    raise _Bad(container, key, f"{type(item).__name__} is not a JSON value")


def _segment(key: str | int) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    return f".{key if len(key) <= 80 else key[:77] + '...'}"


def _path_to(root: object, target: object, field: str, max_depth: int) -> str:
    """The field path of ``target``, a container under ``root``, found again by identity
    (only to report an error: the walk keeps no path), in the walk's own order."""
    if target is root:
        return field
    stack: list[tuple[object, str, int]] = [(root, field, 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            continue
        if isinstance(value, Mapping):
            children: Iterable[tuple[str | int, object]] = value.items()
        elif isinstance(value, list | tuple):
            children = enumerate(value)
        else:
            continue
        for key, item in children:
            if item is target:
                return path + _segment(key)
            if isinstance(item, Mapping | list | tuple) and item:
                stack.append((item, path + _segment(key), depth + 1))
    return field  # pragma: no cover - the walk found target under root
