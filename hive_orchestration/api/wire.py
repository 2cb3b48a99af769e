"""The client's operations as JSON bytes: one request in, one JSON answer out.

An agent in another process (another language, a sandbox, a remote machine) cannot hold an
:class:`~hive_orchestration.OrchestrationClient`, but it can send JSON over whatever
transport the app already has: a pipe, a socket, HTTP, a message queue. The app reads the
bytes and hands them to :func:`call_json`, with the client that speaks for that agent:

    answer = await call_json(client, b'{"op": "create_task", "args": {"task_type": "build"}}')
    # b'"01a1fe79-..."'

A request is ``{"op": "<operation>", "args": {...}}``: the name of one of the client's
operations and its arguments by name, exactly as in Python (``args`` may be left out). A
lease is sent back as the object ``claim_task`` answered (``{"task_id": ..., "run_id": ...,
"attempt": ..., "secret": ...}``), secret included: the claim's answer is the only place
the secret is ever shown, and a lease without it (one rebuilt from ``get_runs``) is refused
with :class:`~hive_orchestration.errors.LeaseLostError`, as a wrong one is. A datetime
travels as an ISO 8601 string. The answer is the operation's result encoded as JSON (a
task, a list of them, an id, ``null``...).

Nothing is trusted more for coming as bytes, and nothing less: a malformed request (not
JSON, not such an object, an unknown operation, an unknown, missing or mistyped argument)
is an :class:`InvalidInputError` naming the field and the reason, and nothing is written;
the arguments then go through the operation's own checks, exactly as a call from Python
(its refusals are its own :class:`HiveError`). A request over the config's
``max_request_bytes`` is refused before it is decoded at all; one whose arguments would
take more than CALL_DECODED_BASE plus CALL_DECODED_PER_BYTE times their size once
decoded (4 MiB of ``[{}, {}, ...]`` takes some 100 MB) is refused on the argument that
passes it, before any is decoded, as on the socket. The caller may also give
what a Python caller may, ``source_agent`` for one: an app that must pin who is calling
checks the request's ``args`` before handing it over. ``tests/reliability/test_fuzz.py``
fuzzes this.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from ..errors import InvalidInputError
from . import json_cost
from .carried import EXCLUSIVE, carried
from .client import OrchestrationClient
from .msgpack_cost import (
    CALL_DECODED_BASE,
    CALL_DECODED_PER_BYTE,
    MOST_PER_BYTE,
    decoded_cost,
    decoded_cost_paced,
)

__all__ = [
    "CALL_DECODED_BASE",
    "CALL_DECODED_PER_BYTE",
    "EXCLUSIVE",
    "OPERATIONS",
    "WireRequest",
    "call_json",
    "held_by",
    "most_held",
    "msgpack_arguments",
]

# msgspec names the place of a type error as "... - at `$.args.lease`".
_AT = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `(.*)`")


class WireRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The envelope of a request: the operation's name and its arguments by name."""

    op: str
    #: Each argument as its JSON text, decoded once its operation says what it must be.
    args: dict[str, msgspec.Raw] = {}


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A request as a large one is first read: its arguments one view of its text, not
    decoded (not even into a map of names: a map of a million names takes some 25
    bytes a byte)."""

    op: str
    args: msgspec.Raw = msgspec.Raw(b"{}")


#: The largest request that is never counted before it is decoded: nothing this small
#: can take more than CALL_DECODED_BASE once decoded (json_cost.MOST_PER_BYTE a byte).
_UNCOUNTED_REQUEST = CALL_DECODED_BASE // json_cost.MOST_PER_BYTE

_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$", re.DOTALL)

_OPERATIONS = carried(OrchestrationClient)
#: The operations a request may name: every public async operation of the client whose
#: arguments and result are JSON values (not callbacks, registries, event objects or streams).
OPERATIONS: frozenset[str] = frozenset(_OPERATIONS)


def _refusal(field: str, error: msgspec.ValidationError) -> InvalidInputError:
    """An InvalidInputError for a msgspec error: ``field``, then where in it (a missing
    field is named; an unknown one is named by the reason, since it is no field)."""
    text = str(error)
    match = _AT.search(text)
    where = match.group(1) if match else ""
    reason = text[: match.start()] if match else text
    missing = _MISSING.search(reason)
    if missing:
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return InvalidInputError(".".join(part for part in (field, where) if part) or "request", reason)


def _request_bytes(raw: object, limit: int) -> bytes:
    """The request as bytes, refused unread when over ``limit`` bytes: decoding builds
    a Python object per JSON value (a 40 MiB request of small values takes gigabytes and
    seconds), so the size is checked first, and only on what was received."""
    if isinstance(raw, str):
        # A character takes at least one byte: a text this long is over the limit.
        if len(raw) > limit:
            raise _too_large(f"more than {limit} bytes ({len(raw)} characters)", limit)
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("request", "is not valid text (a lone surrogate)") from None
    if not isinstance(raw, bytes):
        raise InvalidInputError("request", f"must be bytes or str, got {type(raw).__name__}")
    if len(raw) > limit:
        raise _too_large(f"{len(raw)} bytes", limit)
    return raw


def _too_large(size: str, limit: int) -> InvalidInputError:
    return InvalidInputError(
        "request",
        f"is {size}, over the limit of {limit} bytes for one request (max_request_bytes): "
        "send less per request, or raise max_request_bytes in the runtime's config",
    )


def _decode(raw: bytes | msgspec.Raw, field: str, into: Any) -> Any:
    """``raw`` decoded as JSON into ``into``; any failure an InvalidInputError on ``field``."""
    try:
        return msgspec.json.decode(raw, type=into)
    except msgspec.ValidationError as exc:
        raise _refusal("" if field == "request" else field, exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(field, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInputError(field, "is nested too deeply") from None


def _decode_msgpack(raw: bytes | msgspec.Raw, field: str, into: Any) -> Any:
    """``raw`` decoded as msgpack into ``into``; any failure an InvalidInputError."""
    try:
        return msgspec.msgpack.decode(raw, type=into)
    except msgspec.ValidationError as exc:
        raise _refusal(field, exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(field, f"is not a valid value: {exc}") from None
    except RecursionError:
        raise InvalidInputError(field, "is nested too deeply") from None


def _short(name: str) -> str:
    """A name the caller made up, cut short for a message."""
    return name if len(name) <= 80 else f"{name[:77]}..."


def _arguments(
    op: str,
    args: Mapping[str, msgspec.Raw],
    decode: Callable[[msgspec.Raw, str, Any], Any] = _decode,
) -> dict[str, Any]:
    """The arguments of a request for ``op``, each decoded (by ``decode``: JSON, or
    msgpack for the socket protocol) into the type the operation takes."""
    operation = _OPERATIONS.get(op)
    if operation is None:
        raise _unknown_operation(op)
    for name in args:
        if name not in operation.types:
            raise _unknown_argument(op, name)
    for name in operation.required:
        if name not in args:
            raise InvalidInputError(name, f"is required by {op}")
    return {name: decode(value, name, operation.types[name]) for name, value in args.items()}


def _unknown_operation(op: str) -> InvalidInputError:
    return InvalidInputError(
        "op", f"unknown operation {_short(op)!r}; one of {', '.join(sorted(OPERATIONS))}"
    )


def _unknown_argument(op: str, name: str) -> InvalidInputError:
    valid = ", ".join(_OPERATIONS[op].types) or "none"
    return InvalidInputError(_short(name), f"is not an argument of {op} ({valid})")


def most_held(args: Mapping[str, msgspec.Raw]) -> int:
    """:func:`held_by` for these msgpack arguments alone (without the rest of their frame)."""
    return held_by(sum(len(value) for value in args.values()))


def held_by(size: int) -> int:
    """The most a call's frame of ``size`` bytes can make the server hold, found without
    walking it: its bytes, and the most :func:`msgpack_arguments` lets its arguments
    decode into (MOST_PER_BYTE a byte for small ones, else the call's budget). The
    frame's other fields (its operation's name, agent, correlation, trace context) are
    text, which decodes into about its own size, within that."""
    return size + min(MOST_PER_BYTE * size, CALL_DECODED_BASE + CALL_DECODED_PER_BYTE * size)


def msgpack_arguments(op: str, args: Mapping[str, msgspec.Raw]) -> dict[str, Any]:
    """:func:`call_json`'s checks of a request, for arguments sent as msgpack values.

    msgpack packs a small value into a byte (``{}``: one byte, 64 bytes once decoded),
    so before any is decoded, what they will take is counted: over CALL_DECODED_BASE
    plus CALL_DECODED_PER_BYTE times their size, the call is refused (InvalidInputError
    on the argument that passes the budget) with nothing decoded nor run."""
    size = sum(len(value) for value in args.values())
    if size * MOST_PER_BYTE > CALL_DECODED_BASE + CALL_DECODED_PER_BYTE * size:
        _check_decoded(args, size, decoded_cost)
    return _arguments(op, args, _decode_msgpack)


async def msgpack_arguments_paced(op: str, args: Mapping[str, msgspec.Raw]) -> dict[str, Any]:
    """:func:`msgpack_arguments` for the socket server, on its event loop: the count of
    what large arguments decode into lets other tasks run as it goes (a frame of small
    nested containers takes it up to a second)."""
    size = sum(len(value) for value in args.values())
    budget = CALL_DECODED_BASE + CALL_DECODED_PER_BYTE * size
    if size * MOST_PER_BYTE > budget:
        spent = 0
        for name, value in args.items():
            spent += await decoded_cost_paced(value, budget - spent)
            if spent > budget:
                raise _too_many_values(name, size, budget)
    return _arguments(op, args, _decode_msgpack)


def _check_decoded(
    args: Mapping[str, msgspec.Raw], size: int, cost: Callable[[msgspec.Raw, int], int]
) -> None:
    """Refuse arguments of ``size`` bytes in all that ``cost`` counts over their budget
    once decoded (InvalidInputError on the argument that passes it)."""
    budget = CALL_DECODED_BASE + CALL_DECODED_PER_BYTE * size
    spent = 0
    for name, value in args.items():
        spent += cost(value, budget - spent)
        if spent > budget:
            raise _too_many_values(name, size, budget)


def _too_many_values(name: str, size: int, budget: int) -> InvalidInputError:
    return InvalidInputError(
        _short(name),
        f"holds too many small values: the call's {size} bytes of arguments"
        f" would take more than {budget} bytes once decoded (at most"
        f" {CALL_DECODED_BASE} + {CALL_DECODED_PER_BYTE} x their size); send"
        " fewer values per call, or bigger ones (a string, not a list of"
        " one-character strings)",
    )


def _json_cost(value: msgspec.Raw, budget: int) -> int:
    return json_cost.decoded_cost(bytes(value), budget)


@functools.cache
def _raw_arguments(op: str) -> tuple[tuple[str, ...], msgspec.json.Decoder[Any]]:
    """The names of ``op``'s arguments, and a decoder of its map of arguments into one
    undecoded value each: a name that is not one of them stops it at once, and a name
    given again replaces the value before, so it builds at most one value a name."""
    names = tuple(_OPERATIONS[op].types)
    fields = [(name, msgspec.Raw, msgspec.Raw()) for name in names]
    shape = msgspec.defstruct(f"{op}_arguments", fields, forbid_unknown_fields=True)
    return names, msgspec.json.Decoder(shape)


def _counted_request(raw: bytes) -> tuple[str, dict[str, msgspec.Raw]]:
    """A large request's operation and arguments, each still JSON text, refused (as
    :func:`_arguments` would, or for what its arguments would take once decoded)
    with nothing of it built but its operation's name and a view per argument."""
    envelope: _Envelope = _decode(raw, "request", _Envelope)
    op = envelope.op
    if op not in _OPERATIONS:
        raise _unknown_operation(op)
    names, decoder = _raw_arguments(op)
    try:
        given = decoder.decode(envelope.args)
    except msgspec.ValidationError as exc:
        unknown = _UNKNOWN.match(str(exc))
        if unknown is None:
            raise _refusal("args", exc) from None
        raise _unknown_argument(op, unknown.group(1)) from None
    except msgspec.DecodeError as exc:
        # The envelope's read skipped the arguments' text, and msgspec checks the UTF-8
        # of a string only as it decodes it: a name that is not UTF-8 is found here (it
        # escaped as msgspec's own error). Refused as a request read at once refuses it.
        raise InvalidInputError("request", f"is not valid JSON: {exc}") from None
    args = {
        name: value
        for name, value in zip(names, msgspec.structs.astuple(given), strict=True)
        if len(value)
    }
    _check_decoded(args, sum(len(value) for value in args.values()), _json_cost)
    return op, args


async def call_json(client: OrchestrationClient, raw: bytes | str) -> bytes:
    """Run the operation a JSON request names on ``client`` and return its result as JSON.

    ``raw`` is ``{"op": "<operation>", "args": {...}}`` (bytes in UTF-8, or text). A
    request that is not valid JSON, not such an object, names an operation not in
    :data:`OPERATIONS`, or gives an unknown, missing or wrongly typed argument raises
    :class:`InvalidInputError` naming the field; the operation raises its own
    :class:`HiveError` as it would in Python. A request over the config's
    ``max_request_bytes`` (4 MiB by default) is refused (on ``request``) before it is
    decoded, and one whose arguments would take too much once decoded (4 MiB of
    ``[{}, {}, ...]``: some 100 MB) on the argument that passes the budget, before any
    is decoded: see :func:`msgpack_arguments`, whose budget it shares.
    """
    op, args = _read_request(_request_bytes(raw, client._config.max_request_bytes))
    method: Callable[..., Awaitable[object]] = getattr(client, op)
    return msgspec.json.encode(await method(**args))


def _read_request(data: bytes) -> tuple[str, dict[str, Any]]:
    """A request's operation and its arguments decoded, or InvalidInputError: a small
    one read at once, a large one counted first (:func:`_counted_request`), with the
    same refusals."""
    if len(data) <= _UNCOUNTED_REQUEST:
        request: WireRequest = _decode(data, "request", WireRequest)
        return request.op, _arguments(request.op, request.args)
    op, counted = _counted_request(data)
    return op, _arguments(op, counted)
