"""What comes from the server to a :class:`~.client.RemoteRuntime`: the one reader task
that hands every frame to whoever waits for it (never waiting for a slow subscriber, which
lags as an in-process one does), the keepalive that pings while quiet, and how the client
ends when the connection does.

When the connection breaks (the owner exited or was killed, or sent nothing for
``remote_timeout`` seconds although pinged), every call in flight fails with
:class:`OutcomeUnknownError`, later calls with :class:`ConnectionLostError`, and every
subscription ends with the same (:func:`lose`). An owner that stops cleanly says goodbye
first: then it is :class:`RuntimeStoppedError` and subscriptions end as they do
in-process (:func:`stopped`). A server that closes the connection on a frame this side
sent that broke the protocol says why first (a failure of id 0): the calls in flight
and later fail with that reason, not as if the runtime were lost.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream

from ..api import json_cost
from ..api.msgpack_cost import decoded_budget
from ..errors import ConnectionLostError, OutcomeUnknownError, RuntimeStoppedError
from ..messages.events import Event
from .protocol import (
    Ended,
    Events,
    Failure,
    FrameError,
    FrameReader,
    Goodbye,
    Ping,
    Pong,
    Result,
    Unsubscribe,
    decode_error,
)

if TYPE_CHECKING:
    from .client import RemoteRuntime


log = logging.getLogger("hive_orchestration.remote")


async def read_loop(remote: RemoteRuntime, reader: FrameReader) -> None:
    """Hand every frame from the server to whoever waits for it, until it closes."""
    try:
        await read_frames(remote, reader)
    finally:
        remote._reader_done.set()


async def read_frames(remote: RemoteRuntime, reader: FrameReader) -> None:
    goodbye: str | None = None
    closing: str | None = None  # why the server closes the connection on this client
    try:
        while True:
            message = await reader.read()
            heard = remote._last_heard = anyio.current_time()
            sending = remote._sending
            if sending is not None:  # the owner is alive: a write it holds back may wait
                sending.deadline = max(sending.deadline, heard + remote._silence)
            match message:
                case Result(id=call_id, value=value):
                    pending = remote._pending.get(call_id)
                    if pending is not None:
                        pending.value = value
                        pending.done.set()
                case Failure(id=call_id):
                    pending = remote._pending.get(call_id)
                    if pending is not None:
                        pending.error = decode_error(message)
                        pending.done.set()
                    elif call_id == 0:  # the connection's: the server closes it next
                        closing = message.message
                case Events(id=subscription_id, entries=entries):
                    _count_data(entries, reader)
                    deliver(remote, subscription_id, entries)
                case Ended(id=subscription_id, lagged=lagged):
                    found = remote._feeds.pop(subscription_id, None)
                    if found is not None:
                        if lagged is not None:
                            found[0].lag(lagged)
                        else:
                            found[0].finish()
                case Goodbye(reason=reason):
                    goodbye = remote._goodbye = reason
                case Pong():
                    pass
                case _:
                    raise FrameError(f"unexpected {type(message).__name__}")
    except anyio.EndOfStream:
        why = "the connection closed"
    except FrameError as exc:
        why = f"the runtime sent something this client cannot read ({exc})"
        # Nothing after it can be trusted to be a frame: the connection is dropped.
        with anyio.CancelScope(shield=True):
            await remote._stream.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        why = f"the connection broke ({exc})"
    if goodbye is not None:
        stopped(remote, goodbye)
    elif closing is not None:
        # This side broke the protocol (a bug of this client, or of a peer it relays):
        # the runtime is there, it refused the connection.
        lose(
            remote,
            ConnectionLostError(
                f"{closing} (the runtime of process {remote.owner_pid} at {remote.address};"
                " this is a bug of the client: open a new one)"
            ),
        )
    else:
        lose(remote, ConnectionLostError(lost_reason(remote, why)))


def _count_data(entries: Sequence[tuple[Event, bytes]], reader: FrameReader) -> None:
    """Refuse events whose data (JSON bytes beside each event, which the frame's count
    took for bytes) would take more than its budget once decoded, as the subscriber
    takes them: ``{},`` is three bytes and some 80 once decoded. The budget is 64 MiB +
    8 x the data's size, and what ``max_answer_bytes`` leaves beside the frame and its
    values. A FrameError, as a frame over its count is: nothing of them is decoded."""
    size = 0
    for _, data in entries:
        size += len(data)
    ratio = decoded_budget(size)
    left = reader.held - reader.size - reader.cost
    budget = min(ratio, left)
    if size * json_cost.MOST_PER_BYTE <= budget:
        return  # no JSON this short can pass it
    spent = 0
    for _, data in entries:
        spent += json_cost.decoded_cost(data, budget - spent)
        if spent > budget:
            if budget == ratio:
                raise FrameError(
                    f"events of {size} bytes of data hold too many small values: they"
                    f" would take more than {budget} bytes once decoded (at most 64 MiB"
                    " + 8 x their size)"
                )
            raise FrameError(
                f"events of {size} bytes of data would take more than {budget} bytes once"
                f" decoded: with their frame, over the {reader.held} bytes of"
                " max_answer_bytes one frame may hold"
            )


def deliver(
    remote: RemoteRuntime, subscription_id: int, entries: list[tuple[Event, bytes]]
) -> None:
    found = remote._feeds.get(subscription_id)
    if found is None or not entries:
        return  # closed on this side: its Unsubscribe is on its way
    feed, capacity, policy = found
    if feed.reader_closed:
        return
    # The in-process rule: a reader behind by its buffer's worth, beyond what is left of
    # the last batch it was given, lags; a batch is handed over whole.
    if feed.unread > capacity:
        if policy == "drop":
            return
        del remote._feeds[subscription_id]
        feed.lag(entries[0][0].seq - 1)
        remote._spawn_notice(Unsubscribe(subscription_id))
        return
    feed.push(entries)


#: The shortest pause between two pings.
_LEAST_PING = 0.1


async def keepalive(remote: RemoteRuntime, silence: float) -> None:
    """Ping while quiet; a server silent for ``silence`` seconds is gone. Pings come
    often enough for the server's own idle limit too."""
    # At most ten a second whatever the welcome says: a server's idle limit is seconds,
    # and one of 0 (or less, or no number) would make this a loop with no pause.
    interval = max(min(silence / 4, remote._welcome.idle / 4, 5.0), _LEAST_PING)
    nonce = itertools.count(1)
    while True:
        await anyio.sleep(interval)
        quiet = anyio.current_time() - remote._last_heard
        if quiet >= silence:
            lose(
                remote,
                ConnectionLostError(
                    lost_reason(
                        remote, f"the runtime sent nothing for {quiet:.1f}s although pinged"
                    )
                ),
            )
            await remote._stream.aclose()
            return
        await remote._send_quietly(Ping(next(nonce)))


async def close_gracefully(remote: RemoteRuntime, stream: ByteStream) -> None:
    """Say this side is done (EOF) and let the server close the connection, so that the
    reader ends on its own: a receive cancelled (or a socket closed under it) on
    asyncio just as bytes arrive makes the loop log an InvalidStateError (the socket's
    readiness callback fires on a finished future). Bounded: a server that does not
    close within a second is cut off by the caller."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
        try:
            await stream.send_eof()
        except (NotImplementedError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        except OSError:
            return
        await remote._reader_done.wait()


def lose(remote: RemoteRuntime, error: ConnectionLostError) -> None:
    """The connection is gone: fail what waits, end every subscription."""
    if remote._lost is not None:
        return
    remote._lost = error
    remote.gone.set()
    if not remote._closed:
        log.warning("%s", error)
    for pending in remote._pending.values():
        pending.error = OutcomeUnknownError(
            f"{error}; this call was in flight, so it may or may not have been applied"
        )
        pending.done.set()
    remote._pending.clear()
    for feed, _, _ in remote._feeds.values():
        feed.fail(ConnectionLostError(str(error)))
    remote._feeds.clear()


def lost_reason(remote: RemoteRuntime, what: str) -> str:
    return (
        f"lost the runtime of process {remote.owner_pid} ({remote.address}) that owns"
        f" {remote.path!r}: {what}. Open a new client once a runtime owns the database again"
    )


def stopped(remote: RemoteRuntime, reason: str) -> None:
    """The owner said goodbye, then closed: like an in-process runtime stopping."""
    error = RuntimeStoppedError(stopped_text(remote, reason))
    remote._lost = error
    remote.gone.set()
    for pending in remote._pending.values():
        pending.error = error
        pending.done.set()
    remote._pending.clear()
    for feed, _, _ in remote._feeds.values():
        feed.finish()
    remote._feeds.clear()


def stopped_text(remote: RemoteRuntime, reason: str) -> str:
    return f"the runtime of process {remote.owner_pid} that owns {remote.path!r} stopped: {reason}"
