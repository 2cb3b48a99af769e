"""How a connection's frames go out: one writer at a time, no task hop on the way out,
frames queued meanwhile joined into few writes, and a peer that stalls or breaks closed.

Separate from :mod:`.connection`, which decides what to send: this is only the outbox,
its backpressure (:data:`_OUTBOX_HIGH`), its bound (``max_queued_bytes``) and the
deadline on each write.

Backpressure alone does not bound what is queued: a frame is encoded before its sender
waits for room, and a connection has up to ``max_calls_in_flight`` calls and 1000
subscriptions that may each be waiting with one, of any size (an answer is as large as
what was asked for). So every byte handed to :func:`send_frame` is counted until it is
written (``_Connection._queued``). Past ``max_queued_bytes`` the peer is judged by what
it takes, not by what landed at once: answers that a commit finishes together may pass
the bound for a peer that reads at full speed. What is queued past it is taken from the
server's budget (``max_held_bytes``, :mod:`.budget`: so 1024 connections cannot each
queue without bound), and the sender waits for the writer to bring the queue back
under the bound; a peer that has not taken that much within :data:`_DRAIN_GRACE`, or
whose excess does not fit in the budget, asks for more than it reads: it is cut.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import msgspec

from ..errors import HiveError
from .protocol import encode_error, frame

if TYPE_CHECKING:
    from .connection import _Connection


log = logging.getLogger("hive_orchestration.remote")

#: Bytes queued for a peer past which whoever sends to it waits for the writer.
_OUTBOX_HIGH = 256 * 1024
#: Frames smaller than this that are queued together are written as one.
_JOIN_BELOW = 64 * 1024
#: How long a peer may take to bring what is queued for it back under
#: ``max_queued_bytes`` once past it: a client that reads at full speed takes a burst of
#: answers in milliseconds on a local link, some 100 MB a second on a fast network.
_DRAIN_GRACE = 1.0


async def send_message(conn: _Connection, message: msgspec.Struct) -> None:
    await send_frame(conn, frame(message))


async def send_frame(conn: _Connection, data: bytes) -> None:
    """Send one frame. The first task to send while none is writing writes it, and
    whatever other tasks queue meanwhile, in as few writes as it can (no task hop on
    the way out: that costs more than the write). Another task's frame only waits its
    turn, unless the peer is a lot behind (_OUTBOX_HIGH queued): then its sender waits
    too, so a peer that reads slowly slows the calls and subscriptions it is sent for.

    A peer that does not take a write within ``remote_timeout`` is stalled, and one
    whose connection broke is gone: either way the connection is closed (its reader
    then ends, and with it every task of the connection)."""
    if conn._broken:
        return
    if conn._group is None:  # the handshake: nothing else sends yet
        await write_now(conn, data)
        return
    conn._outbox.append(data)
    conn._outbox_size += len(data)
    queued = conn._queued = conn._queued + len(data)
    if queued > conn._max_queued and queued - len(data) > _OUTBOX_HIGH:
        # A frame goes however large, behind at most an outbox's worth of others; past
        # that and the bound, the peer must take what is queued at once.
        await _drain_or_cut(conn)
        return
    if not conn._writing:
        await flush(conn)
        return
    while conn._outbox_size > _OUTBOX_HIGH and conn._writing and not conn._broken:
        if conn._room is None:
            conn._room = conn._event_type()
        await conn._room.wait()


async def flush(conn: _Connection) -> None:
    timeout = conn._server.timeout
    conn._writing = True
    try:
        with anyio.CancelScope() as conn._flushing:
            if len(conn._calls) > 1:
                # Other calls run: those that end in this round of the event loop
                # (a commit answers many at once) join this write.
                await anyio.lowlevel.checkpoint()
            while conn._outbox:
                size = conn._outbox_size
                frames, conn._outbox, conn._outbox_size = conn._outbox, [], 0
                conn._flushing.deadline = anyio.current_time() + timeout
                for data in _batches(frames):
                    await conn._stream.send(data)
                conn._queued -= size
                if conn._borrowed:
                    _repay(conn)
                room, conn._room = conn._room, None
                if room is not None:
                    room.set()
        if conn._cut:  # its notice written, or the write's deadline passed
            close_connection(conn, "cut")
        elif conn._flushing.cancelled_caught and not conn._broken:
            close_connection(conn, f"the peer took no frame for {timeout:g}s")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        conn._flushing = None
        close_connection(conn, "the peer went away")
    finally:
        conn._writing = False
        conn._flushing = None
        check_drained(conn)


async def write_now(conn: _Connection, data: bytes) -> None:
    if conn._broken:
        return
    with anyio.move_on_after(conn._server.timeout) as sending:
        try:
            await conn._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            close_connection(conn, "the peer went away")
            return
    if sending.cancelled_caught:
        close_connection(conn, f"the peer took no frame for {conn._server.timeout:g}s")


async def _drain_or_cut(conn: _Connection) -> None:
    """Past ``max_queued_bytes``: the excess is taken from the server's budget and the
    sender waits (up to :data:`_DRAIN_GRACE`) for the peer to take the queue back under
    the bound; if the budget has no room for it, or the peer does not take it in time,
    the peer is cut."""
    excess = conn._queued - conn._max_queued - conn._borrowed
    if excess > 0:
        if not conn._server.budget.try_take(excess):
            _cut(conn, conn._queued, "and the server's max_held_bytes has no room for more")
            return
        conn._borrowed += excess
    if not conn._writing:  # pragma: no cover - past an outbox's worth, one writes
        await flush(conn)
    with anyio.move_on_after(_DRAIN_GRACE):
        while conn._queued > conn._max_queued and conn._writing and not conn._broken:
            if conn._room is None:
                conn._room = conn._event_type()
            await conn._room.wait()
    if conn._queued > conn._max_queued and not conn._broken:
        _cut(conn, conn._queued, f"and it did not take them within {_DRAIN_GRACE:g}s")


def _repay(conn: _Connection) -> None:
    """Give the server's budget back what is no longer queued past the bound."""
    keep = conn._queued - conn._max_queued
    keep = keep if keep > 0 else 0
    if keep < conn._borrowed:
        conn._server.budget.give(conn._borrowed - keep)
        conn._borrowed = keep


def _cut(conn: _Connection, queued: int, how: str) -> None:
    """Past ``max_queued_bytes``: nothing more is queued for the peer (its calls are
    stopped, what was queued and not yet being written is dropped), and once what is
    being written is taken it is told why (a failure of id 0) and the connection closes.
    A writer is at work (more than an outbox's worth was queued); one whose peer takes
    nothing meets the write's deadline, which closes the connection as before."""
    why = (
        f"{queued} bytes of answers and events were queued for this client, past"
        f" max_queued_bytes ({conn._max_queued}), {how}: it does not read what it asks for"
    )
    log.warning("connection %d (%s) closed: %s", conn.number, conn.name, why)
    conn._broken = conn._cut = True  # what is sent from now on is dropped
    conn.cancel_calls()
    notice = frame(encode_error(0, HiveError(f"the runtime closed the connection: {why}")))
    conn._queued += len(notice) - conn._outbox_size
    conn._outbox, conn._outbox_size = [notice], len(notice)
    if conn._borrowed:
        _repay(conn)
    if not conn._writing:  # pragma: no cover - past an outbox's worth, one writes
        close_connection(conn, why)


def close_connection(conn: _Connection, why: str) -> None:
    if not conn._broken:
        conn._broken = True
        log.info("connection %d (%s) closed: %s", conn.number, conn.name, why)
    conn._outbox.clear()
    conn._outbox_size = conn._queued = 0
    if conn._borrowed:
        _repay(conn)
    if conn._flushing is not None:
        conn._flushing.cancel()  # a write to a peer that is gone or stalled
    room, conn._room = conn._room, None
    if room is not None:
        room.set()
    if conn._group is not None:
        conn._group.cancel_scope.cancel()
    check_drained(conn)


def check_drained(conn: _Connection) -> None:
    """Stopping: ``drained`` once no call runs and every answer was written."""
    if conn.stopping and not conn._calls and not conn._writing and not conn._outbox:
        conn.drained.set()


def _batches(frames: list[bytes]) -> list[bytes]:
    """Frames queued together as few writes: small ones joined (one system call for a
    burst of answers), a large one alone (not copied again)."""
    if len(frames) == 1:
        return frames
    batches: list[bytes] = []
    small: list[bytes] = []
    size = 0
    for data in frames:
        if len(data) >= _JOIN_BELOW:
            if small:
                batches.append(b"".join(small))
                small, size = [], 0
            batches.append(data)
            continue
        small.append(data)
        size += len(data)
        if size >= _JOIN_BELOW:
            batches.append(b"".join(small))
            small, size = [], 0
    if small:
        batches.append(b"".join(small))
    return batches
