"""A call as it goes to the server and its answer as it comes back: the call's frame
(its arguments encoded with it in one pass; an argument that cannot be sent is named),
the shapes msgspec cannot encode as they are, the decoder of each operation's answer, and
:class:`_Pending`, a call waiting for its answer.

Separate from :mod:`.client`, which decides when a call is sent and how it ends: this is
only how one is written and read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .._trace import outgoing
from ..errors import HiveError, InvalidInputError
from .protocol import TRACED_OPS, CallOut, frame

if TYPE_CHECKING:
    pass


def _call_frame(
    call_id: int,
    op: str,
    args: Mapping[str, object],
    agent: str | None,
    correlation: str | None,
) -> bytes:
    """A call as one frame, its arguments encoded with it in one pass. An argument that
    cannot be sent is named: each is tried on its own then (only then)."""
    trace = outgoing() if op in TRACED_OPS else None
    try:
        arguments = args if isinstance(args, dict) else dict(args)
        if trace is not None:
            call = CallOut(call_id, op, arguments, agent, correlation, trace[0], trace[1])
        else:
            call = CallOut(call_id, op, arguments, agent, correlation)
        return frame(call, _encoder)
    except (TypeError, ValueError, OverflowError, RecursionError):
        for name, value in args.items():
            _encode_argument(name, value)
        raise


def _encode_argument(name: str, value: object) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(name, f"cannot be sent to the runtime: {exc}") from None
    except RecursionError:
        raise InvalidInputError(name, "is nested too deeply") from None


@functools.cache
def _decoder(returns: Any) -> msgspec.msgpack.Decoder[Any]:
    """The decoder of answers of type ``returns`` (one per operation's return type)."""
    return msgspec.msgpack.Decoder(returns)


class _Pending:
    """A call waiting for its answer."""

    __slots__ = ("done", "error", "value")

    def __init__(self, done: anyio.Event) -> None:
        self.done = done
        self.value: msgspec.Raw | None = None
        self.error: HiveError | None = None


def _argument(value: object) -> object:
    """What msgspec cannot encode as it is: the shapes a Python caller may pass."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise NotImplementedError


def _enc_hook(value: object) -> object:
    try:
        return _argument(value)
    except NotImplementedError:
        raise TypeError(f"a {type(value).__name__} cannot be sent") from None


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
