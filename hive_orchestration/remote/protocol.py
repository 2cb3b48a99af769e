"""The wire: what a client and the runtime that owns a database say to each other.

A connection carries frames, each a 4-byte big-endian length then that many bytes of
msgpack: one :data:`ClientFrame` or :data:`ServerFrame` (tagged msgspec Structs). The
length is checked against the receiver's limit before a byte of the body is read, so a
peer cannot make the other side buffer more than it agreed to.

A conversation: the client sends :class:`Hello` (the protocol version, a token where
one is needed), the server answers :class:`Welcome` (its limits and what it is) or
:class:`Refused` and closes. Then the client sends :class:`Call` frames, each with its
own id, and may send more before the first is answered (pipelining); the server answers
each with :class:`Result` or :class:`Failure` in whatever order they finish. Operations
are the client's public operations by name, arguments by name, each argument its own
msgpack value (decoded by the server into the type the operation takes). A call that
hands the caller something exclusive (a claim) is acknowledged by the client with
:class:`Received`: a claim the client did not take goes back at once. Subscriptions push
:class:`Events` frames until :class:`Ended`. :class:`Ping` proves the peer alive.
docs/PROTOCOL.md describes the same for implementers in other languages.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeAlias

import anyio
import msgspec
from anyio.abc import ByteReceiveStream

from .._validate import MAX_NAMES
from ..api.msgpack_cost import (
    CALL_DECODED_BASE,
    CALL_DECODED_PER_BYTE,
    MOST_PER_BYTE,
    decoded_budget,
    decoded_cost_paced,
)
from ..errors import HiveError, InvalidInputError, plain_attributes, rebuild_error
from ..messages.events import Event

__all__ = [
    "PROTOCOL_VERSION",
    "Call",
    "CallOut",
    "Cancel",
    "ClientFrame",
    "Ended",
    "Events",
    "Failure",
    "FrameError",
    "FrameReader",
    "Goodbye",
    "Hello",
    "Ping",
    "Pong",
    "Received",
    "Refused",
    "Result",
    "ResultOut",
    "ServerFrame",
    "Subscribe",
    "Unsubscribe",
    "Welcome",
    "decode_error",
    "encode_error",
    "frame",
]

#: The calls whose frame carries the caller's trace context: those that create tasks.
TRACED_OPS = frozenset({"create_task", "create_tasks"})

#: Bumped on any change a peer of the previous version would misread.
PROTOCOL_VERSION = 1

_HEADER = struct.Struct(">I")

#: The most arguments a call may name (an operation takes at most 23), and filters a
#: subscription may give: msgspec refuses a longer map at its header, before building a
#: key of it (a frame of a million one-byte names would take some 16 times its size).
MAX_ARGUMENTS = 64
MAX_FILTERS = MAX_NAMES


class _Frame(msgspec.Struct, frozen=True, tag_field="kind"):
    """Every frame names its kind in the field ``kind``."""


# -- client -> server ---------------------------------------------------------------------


class Hello(_Frame, frozen=True, tag="hello"):
    version: int
    #: Who the client is, for the server's log and statistics (not an identity).
    name: str | None = None
    token: str | None = None


class Call(_Frame, frozen=True, tag="call"):
    """Run operation ``op`` with ``args`` (each its own msgpack value), as ``agent`` with
    ``correlation`` as the defaults a client stamps on what it causes."""

    id: int
    op: str
    args: Annotated[dict[str, msgspec.Raw], msgspec.Meta(max_length=MAX_ARGUMENTS)] = {}
    agent: str | None = None
    correlation: str | None = None
    #: The caller's W3C trace context (hive_orchestration/_trace.py), when tracing is on
    #: there: a task the call creates continues the caller's trace.
    traceparent: str | None = None
    tracestate: str | None = None


class CallOut(_Frame, frozen=True, tag="call"):
    """A :class:`Call` as its sender builds it: the arguments as they are, encoded with
    the frame rather than each on its own first (the same bytes, made in one pass)."""

    id: int
    op: str
    args: dict[str, Any] = {}
    agent: str | None = None
    correlation: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None


class Cancel(_Frame, frozen=True, tag="cancel"):
    """The caller stopped waiting for call ``id``: stop it if it still runs."""

    id: int


class Received(_Frame, frozen=True, tag="received"):
    """The caller took (``kept``) or did not take the exclusive result of call ``id``."""

    id: int
    kept: bool


class Subscribe(_Frame, frozen=True, tag="subscribe"):
    """Open a live subscription; answered with a :class:`Result` (its id is ``id``) once
    it is registered, then fed with :class:`Events` until :class:`Ended`."""

    id: int
    pattern: str
    filters: Annotated[dict[str, str], msgspec.Meta(max_length=MAX_FILTERS)] = {}
    buffer: int | None = None
    overflow: Literal["error", "drop"] | None = None


class Unsubscribe(_Frame, frozen=True, tag="unsubscribe"):
    id: int


class Ping(_Frame, frozen=True, tag="ping"):
    nonce: int


ClientFrame: TypeAlias = Hello | Call | Cancel | Received | Subscribe | Unsubscribe | Ping


# -- server -> client ---------------------------------------------------------------------


class Welcome(_Frame, frozen=True, tag="welcome"):
    version: int
    #: The owning process and the database it serves (absolute path).
    pid: int
    db_path: str
    #: Largest frame the server reads; a bigger call is refused before it is sent.
    max_frame: int
    #: Calls a connection may have in flight; more wait (the server stops reading).
    max_in_flight: int
    #: Defaults of a subscription's buffer and overflow policy.
    subscriber_buffer: int
    subscriber_overflow: Literal["error", "drop"]
    #: The server closes a connection silent this long: ping more often than that.
    idle: float = 30.0
    #: What the connection may do: ``admin`` (the owner's own user), ``agent``.
    role: str = "admin"
    #: The identity every call is made as, when the server pins it (a token's).
    identity: str | None = None
    #: The owner's lease and worker timeouts: a worker renews its leases and heartbeats
    #: by them (a third of each); absent from an older server (then the defaults).
    lease_timeout: float | None = None
    worker_timeout: float | None = None


class Refused(_Frame, frozen=True, tag="refused"):
    """The handshake failed (wrong version, token, peer): ``error`` as :class:`Failure`."""

    error: Failure


class Result(_Frame, frozen=True, tag="result"):
    id: int
    value: msgspec.Raw


class ResultOut(_Frame, frozen=True, tag="result"):
    """A :class:`Result` as the server builds it: the value as it is, encoded once with
    the frame (the same bytes as a Result of that value's msgpack)."""

    id: int
    value: Any


class Failure(_Frame, frozen=True, tag="failure"):
    """Call ``id`` raised: the package error's class name, message and attributes."""

    id: int
    type: str
    message: str
    attrs: dict[str, Any] = {}


class Events(_Frame, frozen=True, tag="events"):
    """Committed events of subscription ``id``, in log order; each event's ``data`` is
    empty and its data travels beside it as the JSON it is stored as."""

    id: int
    entries: list[tuple[Event, bytes]]


class Ended(_Frame, frozen=True, tag="ended"):
    """Subscription ``id`` is over: ``lagged`` (the last seq it was given) if it fell a
    whole buffer behind, else the runtime stopped or the client unsubscribed."""

    id: int
    lagged: int | None = None


class Pong(_Frame, frozen=True, tag="pong"):
    nonce: int


class Goodbye(_Frame, frozen=True, tag="goodbye"):
    """The runtime is stopping: nothing more will be answered on this connection."""

    reason: str


ServerFrame: TypeAlias = Welcome | Refused | Result | Failure | Events | Ended | Pong | Goodbye


# -- frames on a byte stream --------------------------------------------------------------


class FrameError(HiveError):
    """A peer sent something that is not a frame of this protocol (or too big a one).

    ``call_id`` is the id of the call or subscription the frame opened, when it named
    one that could be read (else 0), and ``field`` where in the frame it went wrong
    (``"args"``, or ``"frame"``): what the server tells the client before closing."""

    def __init__(self, message: str, *, call_id: int = 0, field: str = "frame") -> None:
        super().__init__(message)
        self.call_id = call_id
        self.field = field


class _Head(msgspec.Struct):
    """What a frame that could not be decoded says it is, if that much can be read (its
    other fields are skipped unread)."""

    kind: str = ""
    id: int = 0


_head = msgspec.msgpack.Decoder(_Head)
# msgspec names the place of a type error as "... - at `$.args`".
_AT = re.compile(r" - at `\$\.([A-Za-z_]+)")


def _undecodable(body: bytes | bytearray | memoryview, exc: Exception) -> FrameError:
    """The FrameError of a body that did not decode as a frame: the call or
    subscription it opens, if its kind and id can be read, and the field at fault.
    msgspec raises RecursionError for a value nested past its limit, whether it decodes
    or skips it (then the head, whose other fields are skipped, cannot be read)."""
    try:
        head = _head.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        head = _Head()
    opened = head.id if head.kind in ("call", "subscribe") and head.id > 0 else 0
    at = _AT.search(str(exc))
    reason = "a value is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return FrameError(
        f"not a frame of this protocol: {reason}",
        call_id=opened,
        field=at.group(1) if at else "frame",
    )


_encoder = msgspec.msgpack.Encoder()
#: Most bytes asked of the stream at once. Frames that came together are read from one
#: chunk with no further wait; a bigger frame is read on in chunks of up to _LARGE.
_CHUNK = 64 * 1024
_LARGE = 1024 * 1024
#: The largest frame whose values cannot take more than their budget once decoded.
_NEVER_WALKED = CALL_DECODED_BASE // (MOST_PER_BYTE - CALL_DECODED_PER_BYTE)


def frame(message: msgspec.Struct, encoder: msgspec.msgpack.Encoder = _encoder) -> bytes:
    """``message`` as one frame: its length, then its msgpack."""
    body = encoder.encode(message)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Reads frames of one kind from a byte stream, each checked against ``limit``.

    It asks the stream for whatever has arrived (up to 64 KiB) rather than for a header
    then a body: a frame costs one read of the stream, or none when it came with the one
    before (pipelined calls, a burst of events). A frame's length is checked as soon as
    its header is in, before the rest of it is read, so a peer cannot make this side hold
    more than ``limit`` bytes (and one chunk) for it.

    With ``counted`` (a client reading its server), what a frame's values will take once
    decoded is counted too, before any is (:func:`..api.msgpack_cost.decoded_cost`,
    paced: the loop serves other tasks every 64 KiB walked): past 64 MiB plus 8 times
    its size, it is a :class:`FrameError`, nothing of it decoded. A frame under 671 KB
    is never walked. :meth:`hold_at_most` bounds the frame and its values together too.
    (The server counts each call's arguments instead, since a call over budget is
    refused alone.)

    With a gate (:meth:`gate_with`: the server's, see :mod:`.budget`), a frame larger
    than a chunk waits for it after its header is read and before its body is: a peer
    cannot make this side hold the body of a large frame before there is room for it.
    """

    def __init__(
        self, stream: ByteReceiveStream, kind: Any, limit: int, *, counted: bool = False
    ) -> None:
        self._stream = stream
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(kind)
        self.limit = limit
        # Frames up to this size are never walked (none could take more than its
        # budget): one comparison a frame, where a call would cost more.
        self._walked_above = _NEVER_WALKED if counted else 1 << 64
        # The most a frame and what its values decode into may take together, and the
        # setting that says so (:meth:`hold_at_most`).
        self.held = 1 << 64
        self._held_by = ""
        #: What the last frame's values take once decoded (as counted), or, for a frame
        #: too small to be walked, the most they could: what is left of ``held`` beside
        #: it is what an events frame's JSON data may take.
        self.cost = 0
        # Received and not yet read: ``_data[_pos:]``. Never changed in place, only
        # replaced: a frame decoded from it may keep views of it (``msgspec.Raw``).
        self._data = b""
        self._pos = 0
        #: The size of the last frame read (its body, without the header).
        self.size = 0
        self._gate: Callable[[int], Awaitable[None]] | None = None
        self._gated_above = 1 << 64
        #: While a frame's body arrives over several reads: its size, and how much of
        #: it came (0, 0 otherwise): what the server tells a peer it cuts mid-frame.
        self.pending = 0
        self.arrived = 0

    def hold_at_most(self, held: int, setting: str) -> None:
        """Refuse a frame whose bytes and decoded values together would take more than
        ``held`` (``setting`` names it in the refusal). Since every value takes at
        least its bytes once decoded, a frame over half of it is refused at its header,
        unread; frames too small to be walked stay under a quarter of it."""
        self.held = held
        self._held_by = setting
        self.limit = held // 2
        self._walked_above = min(self._walked_above, held // (4 * MOST_PER_BYTE))

    def gate_with(self, gate: Callable[[int], Awaitable[None]]) -> None:
        """Await ``gate(size)`` for each frame larger than a chunk, between its header
        and its body (frames up to a chunk come whole with a receive, or nearly)."""
        self._gate = gate
        self._gated_above = _CHUNK

    async def read(self) -> Any:
        """The next frame; :class:`anyio.EndOfStream` at a clean end between frames,
        :class:`FrameError` for anything else (half a frame, too big, not msgpack)."""
        while len(self._data) - self._pos < _HEADER.size:
            await self._receive()
        (size,) = _HEADER.unpack_from(self._data, self._pos)
        if size > self.limit:
            raise FrameError(
                f"a frame of {size} bytes is over the limit of {self.limit}"
                + (f" (half of {self._held_by}, {self.held})" if self._held_by else "")
            )
        self.size = size
        if size > self._gated_above:
            assert self._gate is not None
            await self._gate(size)
        start = self._pos + _HEADER.size
        end = start + size
        body: bytes | bytearray | memoryview
        if end <= len(self._data):
            body = memoryview(self._data)[start:end]
            self._pos = end
        else:
            body = await self._rest(start, size)
        self.cost = size * MOST_PER_BYTE
        if size > self._walked_above:
            await self._count(body, size)
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise _undecodable(body, exc) from None

    async def _count(self, body: bytes | bytearray | memoryview, size: int) -> None:
        """Refuse ``body`` if its values would take more than their budget once decoded:
        64 MiB + 8 x its size, and what ``held`` leaves beside it."""
        budget = decoded_budget(size)
        held = self.held - size
        self.cost = cost = await decoded_cost_paced(body, min(budget, held))
        if cost > budget:
            raise FrameError(
                f"a frame of {size} bytes holds too many small values: it would take"
                f" more than {budget} bytes once decoded (at most 64 MiB + 8 x its size)"
            )
        if cost > held:
            raise FrameError(
                f"a frame of {size} bytes would take more than {held} bytes once decoded:"
                f" with its bytes, over the {self.held} bytes of {self._held_by} one frame"
                " may hold"
            )

    async def _receive(self) -> None:
        """Take what has arrived onto what is left of the last chunk."""
        rest = self._data[self._pos :] if self._pos < len(self._data) else b""
        # A chunk read through is let go before the wait: an idle connection would
        # otherwise hold up to 64 KiB of frames it already handled.
        self._data = rest
        self._pos = 0
        try:
            chunk = await self._stream.receive(_CHUNK)
        except anyio.EndOfStream:
            if rest:
                raise FrameError("the connection closed in the middle of a frame") from None
            raise
        self._data = rest + chunk if rest else chunk  # a header cut in two: a few bytes

    async def _rest(self, start: int, size: int) -> bytearray:
        """A frame longer than what has arrived of it: the rest of it, and nothing of the
        frame after it."""
        body = bytearray(memoryview(self._data)[start:])
        self._data = b""
        self._pos = 0
        self.pending = size
        while len(body) < size:
            self.arrived = len(body)
            try:
                body += await self._stream.receive(min(size - len(body), _LARGE))
            except anyio.EndOfStream:
                raise FrameError("the connection closed in the middle of a frame") from None
        self.pending = self.arrived = 0
        return body


# -- errors across the wire ---------------------------------------------------------------


def encode_error(call_id: int, error: BaseException) -> Failure:
    """A package error as a :class:`Failure`: its class name, message and plain attributes
    (``field``, ``reason``, ``kind``, ``id``...). Anything else is reported as a
    :class:`HiveError` that names its type, never with its traceback."""
    if isinstance(error, HiveError):
        return Failure(call_id, type(error).__name__, str(error), plain_attributes(error))
    return Failure(
        call_id, "HiveError", f"the runtime failed on this call: {type(error).__name__}: {error}"
    )


def decode_error(failure: Failure) -> HiveError:
    """The error a :class:`Failure` describes, of the same class when it is one of the
    package's (with its attributes), else a :class:`HiveError` with its message."""
    return rebuild_error(failure.type, failure.message, dict(failure.attrs))


def too_large(what: str, size: int, limit: int) -> InvalidInputError:
    return InvalidInputError(
        "request",
        f"{what} is {size} bytes once encoded, over the {limit} bytes the runtime reads in"
        " one frame: send less per call",
    )
