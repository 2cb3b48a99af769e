"""The runtime's message API served to other processes (see :mod:`.protocol`).

A :class:`Server` runs inside ``Runtime.open`` for the runtime's whole life. Each
connection is one task group: a reader that takes frames in order, a task per call in
flight (at most ``max_calls_in_flight``: past that the reader stops reading, so a client
that sends faster than the runtime answers is slowed, not buffered), and a task per
subscription pumping committed events out as they come. Every call runs as the same
operation of an :class:`~hive_orchestration.OrchestrationClient` in this process, so it
gets exactly the checks, answers and errors an in-process caller gets.

What a peer can do to the server is bounded: a frame is refused unread past
``max_frame_bytes``; a peer that does not say hello within :data:`HANDSHAKE_TIMEOUT`, or
sends nothing (not even a ping) for three times ``remote_timeout`` (clients are told, and
ping more often), or does not take a frame within ``remote_timeout`` of it being sent, is
disconnected; anything that is not a
frame of the protocol closes the connection. A peer of another user is refused before a
byte is read. What a connection left behind is undone as it closes: its calls are
cancelled (a claim answered as the caller left goes back to the queue), its
subscriptions end, and the claims it was answered but never acknowledged go back.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import msgspec
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus

from ..errors import HiveError, RuntimeStoppedError
from ..messages.events import Lagged
from ..messages.plans import PlanningRequest, UnclaimedRequest
from ..messages.tasks import Claim, Unclaimed
from ..storage.database import STOPPING
from ..wire import EXCLUSIVE, msgpack_arguments
from .address import ABSTRACT, choose_address, connect_path, peer_pid, peer_uid, remove_address
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
    Result,
    Subscribe,
    Unsubscribe,
    Welcome,
    encode_error,
    frame,
)
from .status import ConnectionStatus, ServerStatus

if TYPE_CHECKING:
    from ..client import OrchestrationClient
    from ..embedded import Runtime, Subscription
    from ..storage.database import DatabaseClaim

__all__ = ["HANDSHAKE_TIMEOUT", "Server"]

log = logging.getLogger("hive_orchestration.remote")

#: How long a new connection has to say hello.
HANDSHAKE_TIMEOUT = 5.0
#: Most subscriptions one connection may hold at once.
MAX_SUBSCRIPTIONS = 1000
#: Most events in one Events frame (a commit's worth is sent in as few as fit).
_EVENTS_PER_FRAME = 1000
#: Clients kept per connection for the (agent, correlation) pairs it calls as.
_CLIENTS_PER_CONNECTION = 64

_encode = msgspec.msgpack.Encoder().encode


class Server:
    """Serves one runtime on a Unix socket (see :mod:`.address` for where)."""

    def __init__(self, runtime: Runtime, claim: DatabaseClaim) -> None:
        self._runtime = runtime
        self._claim = claim
        config = runtime.config
        self.max_frame = config.max_frame_bytes
        self.max_in_flight = config.max_calls_in_flight
        self.timeout = config.remote_timeout
        #: A connection silent this long (no call, no ping) is closed.
        self.idle = 3 * config.remote_timeout
        self._connections: set[_Connection] = set()
        self._ids = itertools.count(1)
        self.address: str | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports the address once it is recorded for clients."""
        try:
            address = await anyio.to_thread.run_sync(choose_address, self._runtime.path)
            mode = None if address.startswith(ABSTRACT) else 0o600
            listener = await anyio.create_unix_listener(connect_path(address), mode=mode)
        except (OSError, HiveError) as exc:
            # The runtime works without it; only other processes cannot reach it.
            log.warning("not serving the message API on a socket: %s", exc)
            with suppress(OSError):
                self._claim.record_address("")  # no longer "starting": clients give up
            task_status.started("")
            return
        try:
            await anyio.to_thread.run_sync(self._claim.record_address, address)
            self.address = address
            log.info("serving the runtime's message API on %s", address)
            with anyio.CancelScope() as self._scope:
                async with listener, anyio.create_task_group() as group:
                    task_status.started(address)
                    await listener.serve(self._accept, task_group=group)
        finally:
            self.address = None
            with suppress(OSError):
                # Closing: a client that comes now waits for the file to be free.
                self._claim.record_address(STOPPING)
            remove_address(address)

    async def stop(self, grace: float) -> None:
        """Stop serving: every connection is told goodbye and takes no new call; calls in
        flight get up to ``grace`` seconds to finish (one still waiting then, for work or
        for a plan, is answered RuntimeStoppedError), then every connection is closed."""
        connections = list(self._connections)
        with anyio.CancelScope(shield=True):
            for connection in connections:
                connection.stopping = True
            with anyio.move_on_after(grace):
                async with anyio.create_task_group() as group:
                    for connection in connections:
                        group.start_soon(connection.goodbye, "the runtime is stopping")
                for connection in connections:
                    await connection.drained.wait()
            for connection in connections:
                connection.cancel_calls()
            with anyio.move_on_after(1.0):  # their answers go out
                for connection in connections:
                    await connection.drained.wait()
        if self._scope is not None:
            self._scope.cancel()

    async def _accept(self, stream: SocketStream) -> None:
        async with stream:
            raw = stream.extra(SocketAttribute.raw_socket)
            uid = peer_uid(raw)
            if uid is not None and uid != os.geteuid():
                log.warning("refused a connection from user %d on the runtime's socket", uid)
                return  # not a byte read or written for another user
            connection = _Connection(self, stream, next(self._ids))
            self._connections.add(connection)
            try:
                await connection.run()
            finally:
                self._connections.discard(connection)

    def client(self, agent: str | None, correlation: str | None) -> OrchestrationClient:
        return self._runtime.client(source_agent=agent, correlation_id=correlation)

    def status(self) -> ServerStatus:
        """Where it serves and who is connected now, oldest connection first (what
        ``OrchestrationClient.server_status`` answers)."""
        connections = sorted(self._connections, key=lambda connection: connection.number)
        return ServerStatus(
            pid=os.getpid(),
            db_path=self._runtime.path,
            address=self.address,
            connections=[connection.status() for connection in connections],
        )


class _Connection:
    """One client's connection: reads its frames, runs its calls and subscriptions."""

    def __init__(self, server: Server, stream: SocketStream, number: int) -> None:
        self._server = server
        self._runtime = server._runtime
        self._stream = stream
        self.number = number
        self._lock = anyio.Lock()
        self._slots = anyio.Semaphore(server.max_in_flight)
        self._calls: dict[int, anyio.CancelScope] = {}
        self._subscriptions: dict[int, Subscription] = {}
        # Exclusive answers sent and not yet acknowledged: given back unless taken.
        self._unacknowledged: dict[int, object] = {}
        self._clients: OrderedDict[tuple[str | None, str | None], OrchestrationClient] = (
            OrderedDict()
        )
        self._group: TaskGroup | None = None
        self._broken = False
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
        )

    async def run(self) -> None:
        reader = FrameReader(self._stream, ClientFrame, self._server.max_frame)
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
            await self._send(Refused(Failure(0, "HiveError", reason)))
            return
        self.name = hello.name
        config = self._runtime.config
        await self._send(
            Welcome(
                version=PROTOCOL_VERSION,
                pid=os.getpid(),
                db_path=self._runtime.path,
                max_frame=self._server.max_frame,
                max_in_flight=self._server.max_in_flight,
                subscriber_buffer=config.subscriber_buffer,
                subscriber_overflow=config.subscriber_overflow,
                idle=self._server.idle,
            )
        )
        if self._broken:
            return
        log.debug("connection %d (%s) opened", self.number, self.name)
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                try:
                    await self._read(reader)
                finally:
                    group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for subscription in self._subscriptions.values():
                    subscription.close()
                for value in self._unacknowledged.values():
                    await self._give_back(value)
                self._unacknowledged.clear()
            log.debug("connection %d (%s) closed", self.number, self.name)

    async def _read(self, reader: FrameReader) -> None:
        idle = self._server.idle
        while True:
            with anyio.move_on_after(idle) as waiting:
                try:
                    message = await reader.read()
                except FrameError as exc:
                    log.info("connection %d (%s) closed: %s", self.number, self.name, exc)
                    return
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                except (anyio.BrokenResourceError, OSError) as exc:
                    log.info("connection %d (%s) broke: %s", self.number, self.name, exc)
                    return
            if waiting.cancelled_caught:
                log.info("connection %d (%s): silent for %gs", self.number, self.name, idle)
                return
            match message:
                case Call():
                    if message.id in self._calls or message.id in self._unacknowledged:
                        log.info("connection %d: call id %d reused", self.number, message.id)
                        return
                    if self.stopping:
                        await self._send(encode_error(message.id, _stopping()))
                        continue
                    await self._slots.acquire()  # past the limit: stop reading (backpressure)
                    scope = anyio.CancelScope()
                    self._calls[message.id] = scope
                    assert self._group is not None
                    self._group.start_soon(self._call, message, scope)
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
                        return
                    if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                        error = HiveError(
                            f"this connection holds {MAX_SUBSCRIPTIONS} subscriptions, the"
                            " most it may: close some first"
                        )
                        await self._send(encode_error(message.id, error))
                        continue
                    assert self._group is not None
                    await self._group.start(self._subscription, message)
                case Unsubscribe(id=subscription_id):
                    subscription = self._subscriptions.get(subscription_id)
                    if subscription is not None:
                        subscription.close()  # its pump sends Ended
                case Ping(nonce=nonce):
                    await self._send(Pong(nonce))
                case Hello():
                    log.info("connection %d: a second hello", self.number)
                    return

    async def _call(self, message: Call, scope: anyio.CancelScope) -> None:
        try:
            answer: Result | Failure | None = None
            with scope:
                try:
                    answer = await self._run(message)
                except HiveError as error:
                    answer = encode_error(message.id, error)
                except Exception as error:  # a bug: the caller hears of it, the server goes on
                    log.exception("connection %d: %s failed", self.number, message.op)
                    answer = encode_error(message.id, error)
            if answer is not None:
                # Outside the call's scope: a Cancel that came as the answer was being
                # written would cut the frame short, and the client would read the frames
                # after it as its rest. (A claim answered to a caller that left goes back
                # below.)
                await self._send(answer)
            elif scope.cancelled_caught and self.stopping:
                with anyio.CancelScope(shield=True):
                    await self._send(encode_error(message.id, _stopping()))
        finally:
            del self._calls[message.id]
            self._slots.release()
            if scope.cancel_called and message.id in self._unacknowledged:
                # The caller left (it said so) while its claim was on its way: nobody holds it.
                with anyio.CancelScope(shield=True):
                    await self._give_back(self._unacknowledged.pop(message.id))
            if self.stopping and not self._calls:
                self.drained.set()

    def cancel_calls(self) -> None:
        """Stopping: end the calls still running (each is answered RuntimeStoppedError)."""
        for scope in self._calls.values():
            scope.cancel()

    async def _run(self, message: Call) -> Result:
        args = msgpack_arguments(message.op, message.args)
        client = self._client(message.agent, message.correlation)
        method: Callable[..., Awaitable[object]] = getattr(client, message.op)
        value = await method(**args)
        if message.op in EXCLUSIVE and value:
            self._unacknowledged[message.id] = value
        return Result(message.id, msgspec.Raw(_encode(value)))

    def _client(self, agent: str | None, correlation: str | None) -> OrchestrationClient:
        key = (agent, correlation)
        client = self._clients.get(key)
        if client is None:
            client = self._server.client(agent, correlation)
            self._clients[key] = client
            if len(self._clients) > _CLIENTS_PER_CONNECTION:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
        return client

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
            await self._send(encode_error(message.id, error))
            return
        self._subscriptions[message.id] = subscription
        task_status.started()  # registered: later frames (an Unsubscribe) find it
        feed = subscription._feed
        ended = Ended(message.id)
        try:
            await self._send(Result(message.id, msgspec.Raw(_encode(message.id))))
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
                await self._send(Events(message.id, entries))
            await self._send(ended)
        finally:
            subscription.close()
            del self._subscriptions[message.id]

    async def _send(self, message: msgspec.Struct) -> None:
        """Write one frame. A peer that does not take it within ``remote_timeout`` is
        stalled, and one whose connection broke is gone: either way the connection is
        closed (its reader then ends, and with it every task of the connection)."""
        if self._broken:
            return
        data = frame(message)
        async with self._lock:
            with anyio.move_on_after(self._server.timeout) as sending:
                try:
                    await self._stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    self._close("the peer went away")
                    return
        if sending.cancelled_caught:
            self._close(f"the peer took no frame for {self._server.timeout:g}s")

    def _close(self, why: str) -> None:
        if not self._broken:
            self._broken = True
            log.info("connection %d (%s) closed: %s", self.number, self.name, why)
        if self._group is not None:
            self._group.cancel_scope.cancel()

    async def goodbye(self, reason: str) -> None:
        if not self._calls:
            self.drained.set()
        await self._send(Goodbye(reason))

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


def _stopping() -> RuntimeStoppedError:
    return RuntimeStoppedError(
        "the runtime stopped before answering this call (a claim it was waiting for went"
        " back to the queue)"
    )
