"""One client's connection to a :class:`~.server.Server`: its handshake, its calls and
subscriptions, and what is undone when it closes.

Each connection is one task group: a reader that takes frames in order, a runner task per call
in flight (at most ``max_calls_in_flight``: past that the reader stops reading, so a
client that sends faster than the runtime answers is slowed, not buffered; runners are
kept for the next calls, since starting a task costs more than a call's own work), a task
per subscription pumping committed events out as they come, and a watchdog for silence.
Whichever task has a frame to send while none is writing writes it, with whatever the
others queued meanwhile (no hop to a writer task on the way out).

What a peer can do to the server is bounded: a frame is refused unread past
``max_frame_bytes``; a call (and a frame over a chunk, before its body is read) is
counted what it may hold (:func:`..api.wire.held_by` of its frame's size) against the
connection's bound and then the server's budget (:mod:`.budget`), and the connection is
not read until both have room (told meanwhile by unasked pongs that this side is alive);
a peer that does not say hello within :data:`HANDSHAKE_TIMEOUT`, or
sends nothing (not even a ping) for three times ``remote_timeout`` (clients are told, and
ping more often), or does not take a frame within ``remote_timeout`` of it being sent, is
disconnected; anything that is not a frame of the protocol closes the connection, the
peer told why first (``_Connection._tell_violation``: docs/PROTOCOL.md, "Protocol
errors"). What a
connection left behind is undone as it closes: its calls are cancelled (a claim answered
as the caller left goes back to the queue), its subscriptions end, the claims it was
answered but never acknowledged go back, and the workers it carried are dead with it
(:mod:`.connection_workers`).

A TCP peer's hello must carry a token of the tokens file (see :mod:`.access`), read under
a small frame limit until it does; a wrong or missing one is answered Refused and the
connection closed before anything runs. Every call then passes
``_Connection._authorize`` before it runs: the one place an agent token is held to its
identity and its worker ids. How a call runs is in :mod:`.connection_calls`, how frames
go out in :mod:`.connection_out`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import ByteStream, SocketAttribute, TaskGroup, TaskStatus

from ..api.wire import held_by
from ..errors import AccessDeniedError, HiveError, InvalidInputError
from ..messages.events import Lagged
from ..messages.plans import PlanningRequest, UnclaimedRequest
from ..messages.tasks import Claim, Unclaimed
from .access import OWNER, Authorizer, Identity, Tokens
from .address import peer_pid
from .connection_calls import _Runner, _stopping, run_calls
from .connection_out import check_drained, close_connection, send_message
from .connection_workers import workers_gone
from .protocol import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    ClientFrame,
    Ended,
    Events,
    Failure,
    FrameError,
    FrameReader,
    Goodbye,
    Hello,
    Ping,
    Pong,
    Received,
    Refused,
    ResultOut,
    Subscribe,
    Unsubscribe,
    Welcome,
    encode_error,
)
from .status import ConnectionStatus

if TYPE_CHECKING:
    from ..api.client import OrchestrationClient
    from ..api.subscription import Subscription
    from .server import Server


log = logging.getLogger("hive_orchestration.remote")

#: How long a new connection has to say hello.
HANDSHAKE_TIMEOUT = 5.0
#: Most subscriptions one connection may hold at once.
MAX_SUBSCRIPTIONS = 1000
#: Most events in one Events frame (a commit's worth is sent in as few as fit).
_EVENTS_PER_FRAME = 1000
#: How long telling a connection past the limit may take.
_REFUSAL_TIME = 1.0
#: Largest hello read from a peer not yet authenticated (a token is a few dozen bytes).
_HELLO_LIMIT = 64 * 1024
#: Most bytes read and dropped from a refused peer before closing on it.
_LINGER_BYTES = 1024 * 1024
#: How the failure (id 0) that says why the server closes a connection begins.
_CLOSED = "the runtime closed the connection for a frame this client sent: "
#: While a connection's frames are held back (no room for the next), how often it is
#: sent an unasked pong: its pings wait unread behind that frame, and a client hears
#: nothing else while its calls wait (the shortest silence a client allows is 1 s).
_HELD_BACK_PONG = 0.5


class _Connection:
    """One client's connection: reads its frames, runs its calls and subscriptions."""

    def __init__(
        self,
        server: Server,
        stream: ByteStream,
        number: int,
        *,
        tokens: Tokens | None = None,
        peer: str = "unix",
    ) -> None:
        self._server = server
        self._runtime = server._runtime
        self._stream = stream
        self.number = number
        self.peer = peer
        #: None: the owner's own user (Unix socket); else the hello must give one of them.
        self._tokens = tokens
        self.identity: Identity = OWNER
        #: The rules an agent token's calls pass (None: admin, anything goes).
        self._access: Authorizer | None = None
        self._calls: dict[int, anyio.CancelScope] = {}
        #: What the calls in flight may hold (.api.wire.held_by of their frames' sizes),
        #: and the frame being read if it was charged before its body; at most max_held.
        self.held = 0
        #: Taken from the server's budget for the large frame being read (before its body).
        self._reserved = 0
        #: What each call in flight holds of the server's budget (a call that waits for
        #: other clients gives it back as it starts waiting: .api.carried.WAITING).
        self._charged: dict[int, int] = {}
        #: The reader waits for room (its own calls', or the server's budget).
        self.held_back = False
        # The reader waits on this while max_in_flight calls run, or they hold max_held
        # (it stops reading).
        self._slot_freed: anyio.Event | None = None
        # Tasks that ran a call and wait for the next: handing a call to one costs a
        # fraction of starting a task.
        self._idle: list[_Runner] = []
        # Frames queued for the task writing now, in the order they were sent; their size.
        self._outbox: list[bytes] = []
        self._outbox_size = 0
        #: Bytes handed to send_frame and not yet written (the outbox and the batch
        #: being written): past max_queued_bytes only while the peer takes them at
        #: once, else the connection is closed (.connection_out).
        self._queued = 0
        self._max_queued = server.max_queued
        #: What is queued past max_queued_bytes, taken from the server's budget.
        self._borrowed = 0
        self._writing = False
        # Past max_queued_bytes: its notice is the last frame written (.connection_out).
        self._cut = False
        self._flushing: anyio.CancelScope | None = None
        self._room: anyio.Event | None = None  # the outbox went under _OUTBOX_HIGH
        # The backend's own classes: made per call, and anyio's dispatch to the backend
        # at each construction costs more than the object.
        self._event_type = type(anyio.Event())
        self._scope_type = type(anyio.CancelScope())
        # When the reader last heard from the peer (time.monotonic()); None while it is
        # not reading (it waits for a call slot).
        self._heard: float | None = time.monotonic()
        self._subscriptions: dict[int, Subscription] = {}
        # Exclusive answers sent and not yet acknowledged: given back unless taken.
        self._unacknowledged: dict[int, object] = {}
        self._clients: OrderedDict[tuple[str | None, str | None], OrchestrationClient] = (
            OrderedDict()
        )
        self._group: TaskGroup | None = None
        self._broken = False
        # The peer broke the protocol and was told: it is let to read that before closing.
        self._violated = False
        #: The workers this connection acts for (see :func:`.connection_workers.note_worker`).
        self._workers: set[str] = set()
        self.name: str | None = None
        #: The runtime is stopping: no new call is run; set ``drained`` once none runs.
        self.stopping = False
        self.drained = anyio.Event()
        self.connected_at = datetime.now(UTC)
        raw = stream.extra(SocketAttribute.raw_socket, None)
        self.pid = None if raw is None else peer_pid(raw)

    def status(self) -> ConnectionStatus:
        return ConnectionStatus(
            id=self.number,
            name=self.name,
            pid=self.pid,
            connected_at=self.connected_at,
            calls_in_flight=len(self._calls),
            subscriptions=len(self._subscriptions),
            held_bytes=self.held,
            held_back=self.held_back,
        )

    async def run(self) -> None:
        reader = FrameReader(self._stream, ClientFrame, self._server.max_frame)
        if self._tokens is not None:
            reader.limit = _HELLO_LIMIT  # the full limit once its token is known
        hello: object = None
        with anyio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
            try:
                hello = await reader.read()
            except (FrameError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                log.info("connection %d: no hello (%s)", self.number, exc or type(exc).__name__)
                return
        if handshake.cancelled_caught:
            log.info("connection %d: no hello within %gs", self.number, HANDSHAKE_TIMEOUT)
            return
        if not isinstance(hello, Hello) or hello.version != PROTOCOL_VERSION:
            version = hello.version if isinstance(hello, Hello) else None
            reason = (
                f"protocol version {version} is not served here (this runtime speaks"
                f" {PROTOCOL_VERSION}): use the same version of hive-orchestration"
                if version is not None
                else "the first frame must be a hello"
            )
            await send_message(self, Refused(Failure(0, "HiveError", reason)))
            return
        self.name = hello.name
        if self._tokens is not None:
            identity = self._tokens.find(hello.token)
            if identity is None:
                await self._refuse_token(hello.token)
                return
            self.identity = identity
            reader.limit = self._server.max_frame
            if identity.role == "agent":
                self._access = Authorizer(identity, self._server.client(None, None))
        # From now on a large frame waits for room before its body is read.
        reader.gate_with(self._gate)
        config = self._runtime.config
        await send_message(
            self,
            Welcome(
                version=PROTOCOL_VERSION,
                pid=os.getpid(),
                db_path=self._runtime.path,
                max_frame=self._server.max_frame,
                max_in_flight=self._server.max_in_flight,
                subscriber_buffer=config.subscriber_buffer,
                subscriber_overflow=config.subscriber_overflow,
                idle=self._server.idle,
                lease_timeout=config.lease_timeout,
                worker_timeout=config.worker_timeout,
                role=self.identity.role,
                identity=self.identity.name,
            ),
        )
        if self._broken:
            return
        log.debug(
            "connection %d (%s) opened from %s as %s",
            self.number,
            self.name,
            self.peer,
            self.identity.name or "the owner's user",
        )
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._watch, reader)
                try:
                    await self._read(reader)
                finally:
                    group.cancel_scope.cancel()
            if self._violated and not self._broken:
                with anyio.CancelScope(shield=True):
                    with suppress(
                        NotImplementedError,
                        anyio.BrokenResourceError,
                        anyio.ClosedResourceError,
                        OSError,
                    ):
                        await self._stream.send_eof()
                    await _linger(self._stream)
        finally:
            self.drained.set()  # nothing more will be sent on this connection
            # A call handed to an idle runner as the connection closed may never have
            # run (its runner cancelled as it woke): what it took is given back here.
            self._unreserve()
            budget = self._server.budget
            for charge in self._charged.values():
                if charge > 0:
                    budget.give(charge)
                else:  # a waiting call's kept share
                    budget.unkeep(-charge)
            self._charged.clear()
            if self._borrowed:  # queued past max_queued_bytes when its writer was cancelled
                budget.give(self._borrowed)
                self._borrowed = 0
            with anyio.CancelScope(shield=True):
                for subscription in self._subscriptions.values():
                    subscription.close()
                for value in self._unacknowledged.values():
                    await self._give_back(value)
                self._unacknowledged.clear()
                await workers_gone(self)
            log.debug("connection %d (%s) closed", self.number, self.name)

    async def _refuse_token(self, token: str | None) -> None:
        """No token, or an unknown one: Refused, and the connection closes; nothing ran."""
        if token:
            reason = (
                "the token is not one this runtime knows: check the token given"
                " (token=, $HIVE_ORCHESTRATION_TOKEN) against the server's tokens file"
            )
        else:
            reason = (
                "this runtime is served over TCP and needs a token: pass token= or set"
                " $HIVE_ORCHESTRATION_TOKEN (the server's tokens file lists them)"
            )
        log.warning(
            "connection %d from %s refused: %s token",
            self.number,
            self.peer,
            "an unknown" if token else "no",
        )
        await send_message(self, Refused(encode_error(0, AccessDeniedError("connect", reason))))
        await _linger(self._stream)

    async def _read(self, reader: FrameReader) -> None:
        try:
            while True:
                self._heard = time.monotonic()
                try:
                    message = await reader.read()
                except FrameError as exc:
                    log.info("connection %d (%s) closed: %s", self.number, self.name, exc)
                    opened = exc.call_id
                    if opened in self._calls or opened in self._unacknowledged:
                        opened = 0  # an id in use: its failure would pass for that call's
                    await self._tell_violation(str(exc), call_id=opened, field=exc.field)
                    return
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                except (anyio.BrokenResourceError, OSError) as exc:
                    log.info("connection %d (%s) broke: %s", self.number, self.name, exc)
                    return
                if not await self._dispatch(message, reader.size):
                    return
                if self._reserved:  # a large frame that was not a call: done with
                    self._unreserve()
        finally:
            # A large frame cut off (the peer left, its body was garbage): given back.
            self._unreserve()

    async def _watch(self, reader: FrameReader) -> None:
        """Close the connection once the peer has been silent for ``idle`` seconds (not
        even a ping), or took longer than that to send a frame (its body trickling in:
        a large frame holds its share of the budget meanwhile). One task that wakes about
        once a period, where a deadline per frame read would cost a timer set and
        cancelled per frame."""
        idle = self._server.idle
        while True:
            heard = self._heard
            if heard is None:  # the reader waits for a call slot, not for the peer
                await anyio.sleep(idle)
                continue
            silent = time.monotonic() - heard
            if silent >= idle:
                if not reader.pending:
                    close_connection(self, f"silent for {idle:g}s")
                    return
                # Not silent, too slow: the peer is told why before the close (it may be
                # reading while it writes), as for a frame that breaks the protocol, and
                # what it sends meanwhile is read and dropped (closing on unread bytes
                # would reset the connection before it read why).
                why = (
                    f"a frame of {reader.pending} bytes did not arrive within {idle:g}s"
                    f" ({reader.arrived} bytes of it did): the server waits that long"
                    " for a frame (3 x remote_timeout)"
                )
                log.info("connection %d (%s) closed: %s", self.number, self.name, why)
                await self._tell_violation(why)
                assert self._group is not None
                self._group.cancel_scope.cancel()
                return
            await anyio.sleep(idle - silent)

    async def _dispatch(self, message: object, size: int) -> bool:
        """Act on one frame from the peer (of ``size`` bytes); False if the connection
        must end."""
        match message:
            case Call():
                if message.id in self._calls or message.id in self._unacknowledged:
                    log.info("connection %d: call id %d reused", self.number, message.id)
                    await self._tell_violation(
                        f"call id {message.id} is the id of a call still running or of a"
                        " claim not yet acknowledged"
                    )
                    return False
                if self.stopping:
                    await send_message(self, encode_error(message.id, _stopping()))
                    return True
                charge = self._reserved
                if charge:  # a large frame: charged before its body was read
                    self._reserved = 0
                else:
                    charge = held_by(size)
                    await self._charge(charge)
                    if self._stopped_meanwhile(charge):
                        await send_message(self, encode_error(message.id, _stopping()))
                        return True
                self._charged[message.id] = charge
                scope = self._scope_type()
                self._calls[message.id] = scope
                if self._idle:
                    self._idle.pop().hand(message, scope, charge)
                else:
                    assert self._group is not None
                    self._group.start_soon(run_calls, self, message, scope, charge)
            case Cancel(id=call_id):
                running = self._calls.get(call_id)
                if running is not None:
                    running.cancel()
                elif call_id in self._unacknowledged:
                    await self._give_back(self._unacknowledged.pop(call_id))
            case Received(id=call_id, kept=kept):
                value = self._unacknowledged.pop(call_id, None)
                if value is not None and not kept:
                    await self._give_back(value)
            case Subscribe():
                if message.id in self._subscriptions:
                    log.info("connection %d: subscription %d reused", self.number, message.id)
                    await self._tell_violation(
                        f"subscription id {message.id} is the id of a subscription still open"
                    )
                    return False
                if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                    error = HiveError(
                        f"this connection holds {MAX_SUBSCRIPTIONS} subscriptions, the"
                        " most it may: close some first"
                    )
                    await send_message(self, encode_error(message.id, error))
                    return True
                assert self._group is not None
                await self._group.start(self._subscription, message)
            case Unsubscribe(id=subscription_id):
                subscription = self._subscriptions.get(subscription_id)
                if subscription is not None:
                    subscription.close()  # its pump sends Ended
            case Ping(nonce=nonce):
                await send_message(self, Pong(nonce))
            case Hello():
                log.info("connection %d: a second hello", self.number)
                await self._tell_violation("a second hello")
                return False
        return True

    async def _tell_violation(self, reason: str, *, call_id: int = 0, field: str = "frame") -> None:
        """The peer broke the protocol: before the connection closes, tell it why. The
        call (or subscription) the bad frame opened, if it named one, is answered
        InvalidInputError (nothing of it ran); then a failure of id 0 says why the
        connection closes (a client that predates it has no call 0 and ignores it).
        What the peer sent after it is read and dropped for a moment, so that closing
        does not reset the connection before the peer read this."""
        why = f"{_CLOSED}{reason}"
        if call_id:
            refused = InvalidInputError(field, f"{reason}; the connection is closed")
            await send_message(self, encode_error(call_id, refused))
        await send_message(self, encode_error(0, HiveError(why)))
        with anyio.move_on_after(self._server.timeout):
            while (self._writing or self._outbox) and not self._broken:
                if self._room is None:
                    self._room = self._event_type()
                await self._room.wait()
        self._violated = True

    def _full(self, held: int) -> bool:
        """Whether a call that may hold ``held`` bytes must wait for one to end."""
        server = self._server
        return len(self._calls) >= server.max_in_flight or (
            self.held + held > server.max_held and bool(self._calls)
        )

    async def _gate(self, size: int) -> None:
        """A frame of ``size`` bytes, larger than a chunk, is next: its body is read
        once there is room for it as for a call (the connection's, then the server's),
        taken now (see _dispatch)."""
        charge = held_by(size)
        await self._charge(charge)
        self._reserved = charge
        self._heard = time.monotonic()  # its body has the whole idle time to come

    async def _charge(self, charge: int) -> None:
        """Count ``charge`` against the connection's bound, then the server's budget,
        once each has room (in that order: waiting for its own calls to end, it holds
        nothing of the server's)."""
        if self._full(charge):
            await self._room_for(charge)
        if not self._server.budget.try_take(charge):
            await self._take(charge)
        self.held += charge

    def _stopped_meanwhile(self, charge: int) -> bool:
        """The runtime began stopping while a call waited for room: give it back."""
        if not self.stopping:
            return False
        self.held -= charge
        self._server.budget.give(charge)
        return True

    def _unreserve(self) -> None:
        charge, self._reserved = self._reserved, 0
        if charge:
            self.held -= charge
            self._server.budget.give(charge)

    async def _room_for(self, charge: int) -> None:
        """Past a limit of the connection's own: stop reading until a call ends
        (backpressure). Its calls end without anything more read."""
        self.held_back = True
        try:
            while self._full(charge):
                self._slot_freed = self._event_type()
                await self._held_back(self._slot_freed)
        finally:
            self.held_back = False

    async def _take(self, charge: int) -> None:
        """Wait in the server's line for ``charge`` bytes of its budget (not reading
        meanwhile: backpressure); cancelled, what was granted is given back."""
        budget = self._server.budget
        ticket = budget.queue(charge)
        self.held_back = True
        try:
            await self._held_back(ticket.granted)
        except BaseException:
            budget.withdraw(ticket)
            raise
        finally:
            self.held_back = False

    async def _held_back(self, room: anyio.Event) -> None:
        """Wait for ``room``, not reading the peer. It is not silent meanwhile (this
        side is not listening), and it is told that this side is alive: an unasked pong
        every _HELD_BACK_PONG seconds, as its pings wait unread behind the frame held."""
        self._heard = None
        while True:
            with anyio.move_on_after(_HELD_BACK_PONG):
                await room.wait()
                return
            await send_message(self, Pong(0))

    def cancel_calls(self) -> None:
        """Stopping: end the calls still running (each is answered RuntimeStoppedError)."""
        for scope in self._calls.values():
            scope.cancel()

    async def _authorize(self, op: str, args: Mapping[str, Any], agent: str | None) -> str | None:
        """Whether this connection may make this call, and as which source agent: every
        call passes here before it runs, whatever frame a client sends. The owner's user
        (Unix socket) and admin tokens may call anything as anyone; an agent token runs
        as its identity by the rules of :data:`.access.AGENT_RULES`, or is refused
        (AccessDeniedError) with nothing done."""
        if self._access is None:
            return agent
        return await self._access.check(op, args, agent)

    async def _subscription(
        self, message: Subscribe, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            subscription = await self._runtime._open_subscription(
                message.pattern,
                buffer=message.buffer,
                overflow=message.overflow,
                filters=message.filters,
            )
        except HiveError as error:
            task_status.started()
            await send_message(self, encode_error(message.id, error))
            return
        self._subscriptions[message.id] = subscription
        task_status.started()  # registered: later frames (an Unsubscribe) find it
        feed = subscription._feed
        ended = Ended(message.id)
        try:
            await send_message(self, ResultOut(message.id, message.id))
            while True:
                await feed.wait_readable()
                try:
                    taken = feed.take_nowait(_EVENTS_PER_FRAME)
                except anyio.WouldBlock:
                    continue
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                if isinstance(taken, Lagged):
                    ended = Ended(message.id, lagged=taken.last_seq)
                    break
                entries = [(msgspec.structs.replace(e, data={}), data) for e, data in taken]
                await send_message(self, Events(message.id, entries))
            await send_message(self, ended)
        finally:
            subscription.close()
            del self._subscriptions[message.id]

    async def goodbye(self, reason: str) -> None:
        await send_message(self, Goodbye(reason))
        check_drained(self)

    async def _give_back(self, value: object) -> None:
        """Hand back what an exclusive call answered and its caller never took."""
        try:
            if isinstance(value, Claim):
                await self._runtime._tasks.tell(Unclaimed((value,)))
            elif isinstance(value, tuple | list) and value and isinstance(value[0], Claim):
                await self._runtime._tasks.tell(Unclaimed(tuple(value)))
            elif isinstance(value, PlanningRequest):
                await self._runtime._plans.tell(UnclaimedRequest(value))
        except HiveError as error:  # stopping: recovery at the next open requeues it
            log.info("connection %d: could not give back a claim: %s", self.number, error)


async def _linger(stream: ByteStream) -> None:
    """After a refusal: read and drop what the peer sent (its hello, calls behind it)
    until it closes, for a moment at most. Closing with unread bytes would reset the
    connection, and the peer might lose the Refused frame that says why."""
    dropped = 0
    with anyio.move_on_after(_REFUSAL_TIME):
        with suppress(
            anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
        ):
            while dropped < _LINGER_BYTES:
                dropped += len(await stream.receive())
