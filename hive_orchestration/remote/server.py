"""The runtime's message API served to other processes (see :mod:`.protocol`).

A :class:`Server` runs inside ``Runtime.open`` for the runtime's whole life. Each
connection is one task group: a reader that takes frames in order, a runner task per call
in flight (at most ``max_calls_in_flight``: past that the reader stops reading, so a
client that sends faster than the runtime answers is slowed, not buffered; runners are
kept for the next calls, since starting a task costs more than a call's own work), a task
per subscription pumping committed events out as they come, and a watchdog for silence.
Whichever task has a frame to send while none is writing writes it, with whatever the
others queued meanwhile (no hop to a writer task on the way out). Every call runs as the same
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
subscriptions end, and the claims it was answered but never acknowledged go back. A
worker that registered, heartbeat or claimed through it, and did not unregister, is dead
with it: its tasks go back to the queue at once and it is declared offline (see
``_Connection._note_worker``).

Given TCP addresses (``RuntimeConfig.listen``, see :mod:`.tcp`), it serves them too, TLS
when it has a certificate. A TCP peer's hello must carry a token of the tokens file (see
:mod:`.access`), read under a small frame limit until it does; a wrong or missing one is
answered Refused and the connection closed before anything runs. Every call then passes
``_Connection._authorize`` before it runs: the one place an agent token is held to its
identity and its worker ids. At most ``max_connections`` connections are served at once
(Unix socket and TCP together): one more is answered Refused (ConnectionLostError naming
the limit) and closed; past a few such refusals at once, closed without a word.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketStream, TaskGroup, TaskStatus
from anyio.streams.tls import TLSStream

from .._trace import CARRIED, check_trace
from ..api.wire import EXCLUSIVE, msgpack_arguments
from ..errors import (
    AccessDeniedError,
    ConfigError,
    ConnectionLostError,
    HiveError,
    RuntimeStoppedError,
)
from ..messages.events import Lagged
from ..messages.plans import PlanningRequest, UnclaimedRequest
from ..messages.tasks import Claim, Unclaimed
from ..messages.workers import WorkerStatus
from ..storage import SCHEMA_VERSION
from ..storage.port import STOPPING
from .access import OWNER, Authorizer, Identity, Tokens
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
    ResultOut,
    Subscribe,
    Unsubscribe,
    Welcome,
    encode_error,
    frame,
)
from .status import ConnectionStatus, ServerStatus

if TYPE_CHECKING:
    from ..api.client import OrchestrationClient
    from ..api.embedded import Runtime
    from ..api.subscription import Subscription
    from ..storage.port import StoreClaim
    from .tcp import TcpSettings

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
#: The operations by which a connection acts for the worker named by their ``worker_id``.
_WORKER_OPS = frozenset(
    {"register_worker", "update_worker_heartbeat", "claim_task", "claim_tasks", "unregister_worker"}
)
#: Most worker ids one connection is held to account for (a process runs a few workers;
#: past this, more are not tracked and are left to the heartbeat timeout).
MAX_WORKERS_PER_CONNECTION = 10_000
#: Connections past ``max_connections`` told so at once; past these too, one is closed
#: without a word (a flood of them costs a closed socket each, nothing more).
_REFUSING = 16
#: How long telling a connection past the limit may take.
_REFUSAL_TIME = 1.0
#: Largest hello read from a peer not yet authenticated (a token is a few dozen bytes).
_HELLO_LIMIT = 64 * 1024
#: Most bytes read and dropped from a refused peer before closing on it.
_LINGER_BYTES = 1024 * 1024

#: Idle call runners a connection keeps (more run while more calls are in flight).
_IDLE_RUNNERS = 64
#: Bytes queued for a peer past which whoever sends to it waits for the writer.
_OUTBOX_HIGH = 256 * 1024
#: Frames smaller than this that are queued together are written as one.
_JOIN_BELOW = 64 * 1024


class Server:
    """Serves one runtime on a Unix socket (see :mod:`.address` for where), and on the
    TCP addresses of ``tcp`` (see :mod:`.tcp`) when given."""

    def __init__(self, runtime: Runtime, claim: StoreClaim, tcp: TcpSettings | None = None) -> None:
        self._runtime = runtime
        self._claim = claim
        self._tcp = tcp
        config = runtime.config
        self.max_connections = config.max_connections
        #: Accepted, not yet a connection: in the TLS handshake, or being refused.
        self._arriving = 0
        #: Where clients reach it over TCP (``hive://`` or ``hives://HOST:PORT``).
        self.tcp_addresses: list[str] = []
        self._tcp_scope: anyio.CancelScope | None = None
        self.max_frame = config.max_frame_bytes
        self.max_in_flight = config.max_calls_in_flight
        self.timeout = config.remote_timeout
        #: A connection silent this long (no call, no ping) is closed.
        self.idle = 3 * config.remote_timeout
        self._connections: set[_Connection] = set()
        #: The connection that last acted for each worker (see _Connection._note_worker).
        self.worker_connections: dict[str, _Connection] = {}
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
        if self._tcp_scope is not None:
            self._tcp_scope.cancel()

    async def _accept(self, stream: SocketStream) -> None:
        async with stream:
            raw = stream.extra(SocketAttribute.raw_socket)
            uid = peer_uid(raw)
            if uid is not None and uid != os.geteuid():
                log.warning("refused a connection from user %d on the runtime's socket", uid)
                return  # not a byte read or written for another user
            if self._flooded("unix"):
                return
            await self._admit(stream, "unix", None)

    async def run_tcp(
        self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the TCP addresses until cancelled; reports where clients reach them
        (a port 0 replaced by the one bound). An address that cannot be bound raises
        :class:`ConfigError` (the runtime does not start: it was asked to serve there)."""
        assert self._tcp is not None
        listeners: list[Listener[SocketStream]] = []
        try:
            for endpoint in self._tcp.endpoints:
                try:
                    bound = await anyio.create_tcp_listener(
                        local_host=endpoint.host, local_port=endpoint.port
                    )
                except OSError as exc:
                    raise ConfigError(
                        "listen",
                        f"cannot listen on tcp://{endpoint.host}:{endpoint.port}:"
                        f" {exc.strerror or exc}; choose another address or port, or stop"
                        " what listens there",
                    ) from None
                listeners.append(bound)
                for host, port in _bound(bound):
                    self.tcp_addresses.append(endpoint._replace(host=host, port=port).url())
            for address in self.tcp_addresses:
                log.info("serving the runtime's message API on %s", address)
            with anyio.CancelScope() as self._tcp_scope:
                async with anyio.create_task_group() as group:
                    for listener in listeners:
                        group.start_soon(listener.serve, self._accept_tcp, group)
                    task_status.started(list(self.tcp_addresses))
        finally:
            self.tcp_addresses = []
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _accept_tcp(self, stream: SocketStream) -> None:
        assert self._tcp is not None
        peer = _peer(stream)
        async with stream:
            if self._flooded(peer):
                return
            served: ByteStream = stream
            if self._tcp.tls is not None:
                self._arriving += 1
                try:
                    with anyio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                        served = await TLSStream.wrap(
                            stream,
                            server_side=True,
                            ssl_context=self._tcp.tls,
                            standard_compatible=False,
                        )
                except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                    # ssl.SSLError is an OSError: a plain client, a wrong certificate...
                    log.info("connection from %s: TLS handshake failed: %s", peer, exc)
                    return
                except Exception:  # never the listener's end, and with it the runtime's
                    log.exception("connection from %s: TLS handshake failed", peer)
                    return
                finally:
                    self._arriving -= 1
                if handshake.cancelled_caught:
                    log.info(
                        "connection from %s: no TLS handshake within %gs", peer, HANDSHAKE_TIMEOUT
                    )
                    return
            await self._admit(served, peer, self._tcp.tokens)

    def _flooded(self, peer: str) -> bool:
        """Past the limit and the room to say so: the caller closes without a word."""
        if len(self._connections) + self._arriving < self.max_connections + _REFUSING:
            return False
        log.warning("connection from %s closed: past max_connections, and busy refusing", peer)
        return True

    async def _admit(self, stream: ByteStream, peer: str, tokens: Tokens | None) -> None:
        """Serve one connection (``tokens``: the hello must present one of them), or
        refuse it past ``max_connections``."""
        if len(self._connections) >= self.max_connections:
            log.warning(
                "connection from %s refused: %d connections, max_connections",
                peer,
                len(self._connections),
            )
            error = ConnectionLostError(
                f"the runtime serves {self.max_connections} connections, the most it may"
                " (max_connections): retry later, or raise max_connections in its config"
            )
            self._arriving += 1
            try:
                await self._refuse(stream, error)
            finally:
                self._arriving -= 1
            return
        connection = _Connection(self, stream, next(self._ids), tokens=tokens, peer=peer)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:
            # A bug in serving one connection must not take the listener, and with it
            # the runtime, down: that connection ends, the others go on.
            log.exception("connection %d failed", connection.number)
        finally:
            self._connections.discard(connection)

    async def _refuse(self, stream: ByteStream, error: HiveError) -> None:
        """Answer Refused with ``error``; the caller then closes the connection."""
        with anyio.move_on_after(_REFUSAL_TIME):
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await stream.send(frame(Refused(encode_error(0, error))))
        await _linger(stream)

    def client(self, agent: str | None, correlation: str | None) -> OrchestrationClient:
        return self._runtime.client(source_agent=agent, correlation_id=correlation)

    def status(self) -> ServerStatus:
        """Where it serves and who is connected now, oldest connection first (what
        ``OrchestrationClient.server_status`` answers)."""
        connections = sorted(self._connections, key=lambda connection: connection.number)
        return ServerStatus(
            pid=os.getpid(),
            db_path=self._runtime.path,
            schema_version=SCHEMA_VERSION,
            address=self.address,
            connections=[connection.status() for connection in connections],
        )


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
        # The reader waits on this while max_in_flight calls run (it stops reading).
        self._slot_freed: anyio.Event | None = None
        # Tasks that ran a call and wait for the next: handing a call to one costs a
        # fraction of starting a task.
        self._idle: list[_Runner] = []
        # Frames queued for the task writing now, in the order they were sent; their size.
        self._outbox: list[bytes] = []
        self._outbox_size = 0
        self._writing = False
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
        #: The workers this connection acts for (see _note_worker).
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
            await self._send(Refused(Failure(0, "HiveError", reason)))
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
                lease_timeout=config.lease_timeout,
                worker_timeout=config.worker_timeout,
                role=self.identity.role,
                identity=self.identity.name,
            )
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
                group.start_soon(self._watch)
                try:
                    await self._read(reader)
                finally:
                    group.cancel_scope.cancel()
        finally:
            self.drained.set()  # nothing more will be sent on this connection
            with anyio.CancelScope(shield=True):
                for subscription in self._subscriptions.values():
                    subscription.close()
                for value in self._unacknowledged.values():
                    await self._give_back(value)
                self._unacknowledged.clear()
                await self._workers_gone()
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
        await self._send(Refused(encode_error(0, AccessDeniedError("connect", reason))))
        await _linger(self._stream)

    async def _read(self, reader: FrameReader) -> None:
        while True:
            self._heard = time.monotonic()
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
            if not await self._dispatch(message):
                return

    async def _watch(self) -> None:
        """Close the connection once the peer has been silent for ``idle`` seconds (not
        even a ping). One task that wakes about once a period, where a deadline per frame
        read would cost a timer set and cancelled per frame."""
        idle = self._server.idle
        while True:
            heard = self._heard
            if heard is None:  # the reader waits for a call slot, not for the peer
                await anyio.sleep(idle)
                continue
            silent = time.monotonic() - heard
            if silent >= idle:
                self._close(f"silent for {idle:g}s")
                return
            await anyio.sleep(idle - silent)

    async def _dispatch(self, message: object) -> bool:
        """Act on one frame from the peer; False if the connection must end."""
        match message:
            case Call():
                if message.id in self._calls or message.id in self._unacknowledged:
                    log.info("connection %d: call id %d reused", self.number, message.id)
                    return False
                if self.stopping:
                    await self._send(encode_error(message.id, _stopping()))
                    return True
                if len(self._calls) >= self._server.max_in_flight:
                    # Past the limit: stop reading until a call ends (backpressure); the
                    # peer is not silent meanwhile, this side is not listening.
                    self._heard = None
                    while len(self._calls) >= self._server.max_in_flight:
                        self._slot_freed = self._event_type()
                        await self._slot_freed.wait()
                scope = self._scope_type()
                self._calls[message.id] = scope
                if self._idle:
                    self._idle.pop().hand(message, scope)
                else:
                    assert self._group is not None
                    self._group.start_soon(self._runner, message, scope)
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
                    return False
                if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                    error = HiveError(
                        f"this connection holds {MAX_SUBSCRIPTIONS} subscriptions, the"
                        " most it may: close some first"
                    )
                    await self._send(encode_error(message.id, error))
                    return True
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
                return False
        return True

    async def _runner(self, message: Call, scope: anyio.CancelScope) -> None:
        """Run calls one after another: this one, then each handed to it while it waits
        among the idle (a few are kept; past that it ends)."""
        while True:
            await self._call(message, scope)
            if len(self._idle) >= _IDLE_RUNNERS:
                return
            runner = _Runner(self._event_type())
            self._idle.append(runner)
            await runner.handed.wait()
            message, scope = runner.call

    async def _call(self, message: Call, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                try:
                    # Encoded here: a value that cannot be is this call's failure.
                    answer = frame(await self._run(message))
                except HiveError as error:
                    answer = frame(encode_error(message.id, error))
                except Exception as error:  # a bug: the caller hears of it, the server goes on
                    log.exception("connection %d: %s failed", self.number, message.op)
                    answer = frame(encode_error(message.id, error))
            if scope.cancelled_caught:
                if not self.stopping:
                    return  # the caller left: nobody waits for an answer
                answer = frame(encode_error(message.id, _stopping()))
            # Outside the call's scope: a Cancel that comes now must not cut the frame.
            await self._send_frame(answer)
        finally:
            del self._calls[message.id]
            freed, self._slot_freed = self._slot_freed, None
            if freed is not None:
                freed.set()
            if scope.cancel_called and message.id in self._unacknowledged:
                # The caller left (it said so) while its claim was on its way: nobody holds it.
                with anyio.CancelScope(shield=True):
                    await self._give_back(self._unacknowledged.pop(message.id))
            self._check_drained()

    def cancel_calls(self) -> None:
        """Stopping: end the calls still running (each is answered RuntimeStoppedError)."""
        for scope in self._calls.values():
            scope.cancel()

    async def _run(self, message: Call) -> ResultOut:
        args = msgpack_arguments(message.op, message.args)
        agent = await self._authorize(message.op, args, message.agent)
        client = self._client(agent, message.correlation)
        method: Callable[..., Awaitable[object]] = getattr(client, message.op)
        trace = check_trace(message.traceparent, message.tracestate)
        if trace is None:
            value = await method(**args)
        else:
            # The task this call creates continues the caller's trace, not the server's.
            carried = CARRIED.set(trace)
            try:
                value = await method(**args)
            finally:
                CARRIED.reset(carried)
        if message.op in EXCLUSIVE and value:
            self._unacknowledged[message.id] = value
        if message.op in _WORKER_OPS:
            self._note_worker(message.op, args, value)
        return ResultOut(message.id, value)

    async def _authorize(self, op: str, args: Mapping[str, Any], agent: str | None) -> str | None:
        """Whether this connection may make this call, and as which source agent: every
        call passes here before it runs, whatever frame a client sends. The owner's user
        (Unix socket) and admin tokens may call anything as anyone; an agent token runs
        as its identity by the rules of :data:`.access.AGENT_RULES`, or is refused
        (AccessDeniedError) with nothing done."""
        if self._access is None:
            return agent
        return await self._access.check(op, args, agent)

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

    # -- the workers this connection acts for --------------------------------------------------

    def _note_worker(self, op: str, args: dict[str, Any], value: object) -> None:
        """After a worker operation succeeded: this connection now carries that worker.

        A worker is alive only as long as the connection that carries its work: once it
        registered, heartbeat or claimed here, the end of this connection is its death
        (unless it unregistered, or said it is offline, or another connection acted for it
        since: a worker restarted in a new process owns its id from then on)."""
        worker_id = args.get("worker_id")
        if not isinstance(worker_id, str):
            return
        owners = self._server.worker_connections
        if op == "unregister_worker" or (
            op == "update_worker_heartbeat"
            and (not value or args.get("status") == WorkerStatus.OFFLINE)
        ):
            if op == "unregister_worker" or owners.get(worker_id) is self:
                owners.pop(worker_id, None)
            self._workers.discard(worker_id)
            return
        if worker_id not in self._workers:
            if len(self._workers) >= MAX_WORKERS_PER_CONNECTION:
                return
            self._workers.add(worker_id)
        owners[worker_id] = self

    async def _workers_gone(self) -> None:
        """The connection ended: each worker it carried is dead. Its tasks go back to the
        queue now (runs lost, an attempt counted, as when a silent worker is declared
        offline) rather than when their leases run out, and it is declared offline.

        Through the runtime's public operations (``release_worker_tasks``, then
        ``update_worker_heartbeat(..., "offline")``), so it is the very change an operator
        would make, logged and committed as such. Not when the runtime is stopping: its
        workers are not dead, and the next open requeues what they held."""
        owners = self._server.worker_connections
        gone = [worker_id for worker_id in self._workers if owners.get(worker_id) is self]
        self._workers.clear()
        for worker_id in gone:
            del owners[worker_id]
        if not gone or self.stopping:
            return
        client = self._server.client(None, None)
        reason = f"the connection of worker {{}} to the runtime closed ({self.name or 'a client'})"
        with anyio.move_on_after(self._server.timeout):
            for worker_id in gone:
                try:
                    released = await client.release_worker_tasks(
                        worker_id, reason=reason.format(worker_id)
                    )
                    if owners.get(worker_id) is None:  # not back on another connection
                        await client.update_worker_heartbeat(worker_id, WorkerStatus.OFFLINE)
                except HiveError as error:  # stopping: recovery at the next open requeues
                    log.info("connection %d: worker %s: %s", self.number, worker_id, error)
                    return
                log.info(
                    "connection %d (%s) closed: worker %s offline, %d task(s) requeued",
                    self.number,
                    self.name,
                    worker_id,
                    released,
                )

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
            await self._send(ResultOut(message.id, message.id))
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
        await self._send_frame(frame(message))

    async def _send_frame(self, data: bytes) -> None:
        """Send one frame. The first task to send while none is writing writes it, and
        whatever other tasks queue meanwhile, in as few writes as it can (no task hop on
        the way out: that costs more than the write). Another task's frame only waits its
        turn, unless the peer is a lot behind (_OUTBOX_HIGH queued): then its sender waits
        too, so a peer that reads slowly slows the calls and subscriptions it is sent for.

        A peer that does not take a write within ``remote_timeout`` is stalled, and one
        whose connection broke is gone: either way the connection is closed (its reader
        then ends, and with it every task of the connection)."""
        if self._broken:
            return
        if self._group is None:  # the handshake: nothing else sends yet
            await self._write_now(data)
            return
        self._outbox.append(data)
        self._outbox_size += len(data)
        if not self._writing:
            await self._flush()
            return
        while self._outbox_size > _OUTBOX_HIGH and self._writing and not self._broken:
            if self._room is None:
                self._room = self._event_type()
            await self._room.wait()

    async def _flush(self) -> None:
        timeout = self._server.timeout
        self._writing = True
        try:
            with anyio.CancelScope() as self._flushing:
                if len(self._calls) > 1:
                    # Other calls run: those that end in this round of the event loop
                    # (a commit answers many at once) join this write.
                    await anyio.lowlevel.checkpoint()
                while self._outbox:
                    frames, self._outbox, self._outbox_size = self._outbox, [], 0
                    self._flushing.deadline = anyio.current_time() + timeout
                    for data in _batches(frames):
                        await self._stream.send(data)
                    room, self._room = self._room, None
                    if room is not None:
                        room.set()
            if self._flushing.cancelled_caught and not self._broken:
                self._close(f"the peer took no frame for {timeout:g}s")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._flushing = None
            self._close("the peer went away")
        finally:
            self._writing = False
            self._flushing = None
            self._check_drained()

    async def _write_now(self, data: bytes) -> None:
        if self._broken:
            return
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
        self._outbox.clear()
        if self._flushing is not None:
            self._flushing.cancel()  # a write to a peer that is gone or stalled
        room, self._room = self._room, None
        if room is not None:
            room.set()
        if self._group is not None:
            self._group.cancel_scope.cancel()
        self._check_drained()

    def _check_drained(self) -> None:
        """Stopping: ``drained`` once no call runs and every answer was written."""
        if self.stopping and not self._calls and not self._writing and not self._outbox:
            self.drained.set()

    async def goodbye(self, reason: str) -> None:
        await self._send(Goodbye(reason))
        self._check_drained()

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


class _Runner:
    """An idle call runner of a connection, waiting to be handed a call."""

    __slots__ = ("call", "handed")

    def __init__(self, handed: anyio.Event) -> None:
        self.handed = handed
        self.call: tuple[Call, anyio.CancelScope]

    def hand(self, message: Call, scope: anyio.CancelScope) -> None:
        self.call = (message, scope)
        self.handed.set()


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


def _stopping() -> RuntimeStoppedError:
    return RuntimeStoppedError(
        "the runtime stopped before answering this call (a claim it was waiting for went"
        " back to the queue)"
    )


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


def _bound(listener: Listener[SocketStream]) -> list[tuple[str, int]]:
    """The (host, port) pairs a TCP listener bound (one per address family)."""
    found = []
    for each in getattr(listener, "listeners", [listener]):
        address = each.extra(SocketAttribute.local_address)
        found.append((str(address[0]), int(address[1])))
    return found


def _peer(stream: SocketStream) -> str:
    """A TCP peer's address, for the log."""
    try:
        address = stream.extra(SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:  # pragma: no cover - TCP streams have it
        return "tcp"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
