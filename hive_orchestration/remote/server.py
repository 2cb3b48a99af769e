"""The runtime's message API served to other processes (see :mod:`.protocol`).

A :class:`Server` runs inside ``Runtime.open`` for the runtime's whole life: it listens,
admits connections and refuses those past its limits; each connection is then served by
:mod:`.connection` (its handshake, frames in and subscriptions), :mod:`.connection_calls`
(its calls), :mod:`.connection_out` (its frames out) and :mod:`.connection_workers` (the
workers it carries). Every call runs as the same operation of an
:class:`~hive_orchestration.OrchestrationClient` in this process, so it gets exactly the
checks, answers and errors an in-process caller gets. A peer of another user is refused
before a byte is read.

Given TCP addresses (``RuntimeConfig.listen``, see :mod:`.tcp`), it serves them too, TLS
when it has a certificate; a TCP peer's hello must carry a token (see :mod:`.connection`).
At most ``max_connections`` connections are served at once (Unix socket and TCP
together): one more is answered Refused (ConnectionLostError naming the limit) and
closed; past a few such refusals at once, closed without a word. What their requests
hold together is bounded by ``max_held_bytes`` (:mod:`.budget`).
"""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import suppress
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketStream, TaskStatus
from anyio.streams.tls import TLSStream

from ..api.wire import held_by
from ..errors import ConfigError, ConnectionLostError, HiveError
from ..storage import SCHEMA_VERSION
from ..storage.port import STOPPING
from .access import Tokens
from .address import ABSTRACT, choose_address, connect_path, peer_uid, remove_address
from .budget import CONNECTION_BYTES, Budget
from .connection import _REFUSAL_TIME, HANDSHAKE_TIMEOUT, _Connection, _linger
from .protocol import Refused, encode_error, frame
from .status import ServerStatus

if TYPE_CHECKING:
    from ..api.client import OrchestrationClient
    from ..api.embedded import Runtime
    from ..storage.port import StoreClaim
    from .tcp import TcpSettings


__all__ = ["HANDSHAKE_TIMEOUT", "Server"]

log = logging.getLogger("hive_orchestration.remote")

#: Connections past ``max_connections`` told so at once; past these too, one is closed
#: without a word (a flood of them costs a closed socket each, nothing more).
_REFUSING = 16


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
        #: Admitted, waiting for their share of the budget: counted as connections.
        self._sharing = 0
        #: Where clients reach it over TCP (``hive://`` or ``hives://HOST:PORT``).
        self.tcp_addresses: list[str] = []
        self._tcp_scope: anyio.CancelScope | None = None
        self.max_frame = config.max_frame_bytes
        self.max_in_flight = config.max_calls_in_flight
        #: The most a connection's calls in flight may hold (their frames' arguments and
        #: what those may decode into): what one call of the largest frame may. Past it
        #: the connection is not read until a call ends; a call is always let in alone.
        self.max_held = held_by(self.max_frame)
        if config.max_held_bytes < self.max_held:
            raise ConfigError(
                "max_held_bytes",
                f"is {config.max_held_bytes} bytes, less than one call of max_frame_bytes"
                f" ({self.max_frame}) may hold: {self.max_held} bytes (its frame and the"
                " most it may decode into); raise max_held_bytes or lower max_frame_bytes",
            )
        lasting = config.max_connections * CONNECTION_BYTES
        if config.max_held_bytes < self.max_held + lasting:
            raise ConfigError(
                "max_held_bytes",
                f"is {config.max_held_bytes} bytes, less than the read buffers of"
                f" max_connections ({config.max_connections} x {CONNECTION_BYTES} bytes)"
                f" and one call of max_frame_bytes ({self.max_held} bytes) may hold:"
                f" {self.max_held + lasting} bytes; raise max_held_bytes, or lower"
                " max_connections or max_frame_bytes",
            )
        #: What all connections and their requests may hold at once (see :mod:`.budget`).
        self.budget = Budget(
            config.max_held_bytes, waiting_room=config.max_held_bytes - self.max_held - lasting
        )
        #: Bytes queued for one connection past which it is closed (.connection_out).
        self.max_queued = config.max_queued_bytes
        self.timeout = config.remote_timeout
        #: A connection silent this long (no call, no ping) is closed.
        self.idle = 3 * config.remote_timeout
        self._connections: set[_Connection] = set()
        #: The connection that last acted for each worker (see .connection_workers.note_worker).
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
        if len(self._connections) + self._sharing >= self.max_connections:
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
        if not await self._take_share(stream, peer):
            return
        try:
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
        finally:
            self.budget.give(CONNECTION_BYTES)

    async def _take_share(self, stream: ByteStream, peer: str) -> bool:
        """Take the connection's share of the budget (:data:`.budget.CONNECTION_BYTES`)
        before its hello is read: at once if it fits, else in line; False (refused) if
        it is not granted within the handshake's time."""
        budget = self.budget
        if budget.take_past_line(CONNECTION_BYTES):
            return True
        ticket = budget.queue(CONNECTION_BYTES)
        self._arriving += 1
        self._sharing += 1
        try:
            with anyio.move_on_after(HANDSHAKE_TIMEOUT):
                await ticket.granted.wait()
            if ticket.granted.is_set():
                return True
            budget.withdraw(ticket)
            log.warning("connection from %s refused: max_held_bytes held for %gs", peer,
                        HANDSHAKE_TIMEOUT)  # fmt: skip
            error = ConnectionLostError(
                f"the runtime holds all of its max_held_bytes ({budget.capacity} bytes) for"
                f" other connections' requests, and did not free this connection's share"
                f" within {HANDSHAKE_TIMEOUT:g}s: retry later"
            )
            await self._refuse(stream, error)
            return False
        except BaseException:
            budget.withdraw(ticket)
            raise
        finally:
            self._arriving -= 1
            self._sharing -= 1

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
        budget = self.budget.statistics()
        return ServerStatus(
            pid=os.getpid(),
            db_path=self._runtime.path,
            schema_version=SCHEMA_VERSION,
            address=self.address,
            connections=[connection.status() for connection in connections],
            held_bytes=budget.held,
            max_held_bytes=budget.capacity,
            peak_held_bytes=budget.peak,
            held_back=sum(connection.held_back for connection in connections),
        )


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
