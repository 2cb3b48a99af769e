"""The client's side of a connection to the runtime of another process.

:class:`RemoteRuntime` stands where an in-process :class:`~hive_orchestration.Runtime`
stands for an :class:`~hive_orchestration.OrchestrationClient`: it carries the client's
operations as calls over the socket (pipelined: many calls share one connection, each
answered when it is done), its subscriptions as server-pushed event frames into the same
:class:`~hive_orchestration.Subscription` an in-process subscriber reads, and its
callbacks in a task group of its own. One reader task takes every frame from the server
and hands it to whoever waits for it; it never waits for a slow reader, which lags as an
in-process subscriber does (:mod:`.client_inbound`). How it reaches the server is in
:mod:`.client_dial`, how a call is written and its answer read in :mod:`.client_calls`.

When the connection breaks (the owner exited or was killed, or sent nothing for
``remote_timeout`` seconds although pinged), every call in flight fails with
:class:`OutcomeUnknownError`, later calls with :class:`ConnectionLostError`, and every
subscription ends with the same. An owner that stops cleanly says goodbye first: then it
is :class:`RuntimeStoppedError` and subscriptions end as they do in-process.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec
from anyio.abc import ByteStream, TaskGroup

from .._groups import raise_cause
from ..config import RuntimeConfig
from ..errors import (
    ConnectionLostError,
    HiveError,
    InvalidInputError,
    RuntimeStoppedError,
    WrongEventLoopError,
)
from ..messages.events import Event, EventFeed
from .address import connect_path
from .protocol import (
    MAX_FILTERS,
    Cancel,
    FrameReader,
    Received,
    ServerFrame,
    Subscribe,
    Unsubscribe,
    Welcome,
    frame,
    too_large,
)

if TYPE_CHECKING:
    from ..api.subscription import Subscription

from .client_calls import _call_frame, _decoder, _Pending
from .client_dial import dial_tcp, handshake
from .client_inbound import close_gracefully, keepalive, lose, lost_reason, read_loop, stopped_text

__all__ = ["RemoteRuntime"]

log = logging.getLogger("hive_orchestration.remote")

#: Largest frame read before the server's welcome (a welcome or a refusal is a few
#: hundred bytes): whatever answers at an address is not trusted with more.
_WELCOME_LIMIT = 64 * 1024


class RemoteRuntime:
    """A connection to the runtime that owns a database in another process."""

    def __init__(
        self, stream: ByteStream, welcome: Welcome, address: str, *, silence: float = 10.0
    ) -> None:
        self._stream = stream
        self._welcome = welcome
        self.address = address
        self.owner_pid = welcome.pid
        self._silence = silence
        # Calls running on the connection, at most as many as the owner runs at once.
        self._in_flight = 0
        self._max_in_flight = max(1, welcome.max_in_flight)
        self._slot_freed: anyio.Event | None = None
        # What the owner told: the defaults of this side's subscriptions, and the timeouts
        # a worker of this process keeps its leases and heartbeats by.
        defaults = RuntimeConfig()
        self._config = RuntimeConfig(
            subscriber_buffer=welcome.subscriber_buffer,
            subscriber_overflow=welcome.subscriber_overflow,
            lease_timeout=welcome.lease_timeout or defaults.lease_timeout,
            worker_timeout=welcome.worker_timeout or defaults.worker_timeout,
        )
        # Frames queued for the task writing now, in the order they were sent.
        self._outbox: list[bytes] = []
        self._writing = False
        # The write in progress, whose deadline each frame from the owner pushes back.
        self._sending: anyio.CancelScope | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._feeds: dict[int, tuple[EventFeed, int, Literal["error", "drop"]]] = {}
        self._thread = threading.get_ident()
        self._lost: HiveError | None = None  # why no call can be made any more
        self._goodbye: str | None = None  # the owner is stopping: no new calls
        self._closed = False
        self._last_heard = anyio.current_time()
        self._callbacks: TaskGroup | None = None
        self._event_type = type(anyio.Event())
        #: Set once no call can be made any more (the owner went away or said goodbye).
        self.gone = anyio.Event()
        self._reader_done = anyio.Event()

    # -- lifetime ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str,
        *,
        name: str | None = None,
        silence: float = 10.0,
        held: int | None = None,
    ) -> AsyncIterator[RemoteRuntime]:
        """Connect to the runtime serving at ``address`` (as its lock file records it) for
        the block; ``silence`` is how long a silent connection lives (``remote_timeout``),
        ``held`` the most one frame from it may take with its values decoded
        (``max_answer_bytes``, 512 MiB unless given). Raises :class:`ConnectionLostError`
        if nothing answers there."""
        try:
            stream = await anyio.connect_unix(connect_path(address))
        except OSError as exc:
            raise ConnectionLostError(
                f"cannot connect to the runtime at {address}: {exc.strerror or exc}"
            ) from None
        async with cls._session(stream, address, name, silence, None, held) as remote:
            yield remote

    @classmethod
    @asynccontextmanager
    async def connect_url(
        cls,
        url: str,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        name: str | None = None,
        silence: float = 10.0,
        held: int | None = None,
    ) -> AsyncIterator[RemoteRuntime]:
        """Connect to the runtime served at ``url`` (``hive://HOST:PORT``, loopback only,
        or ``hives://HOST:PORT``: TLS, the server's certificate checked against ``tls_ca``
        or the system's authorities) with ``token``. Refused before connecting
        (:class:`InvalidInputError` on ``url``) when malformed or off loopback without
        TLS; :class:`ConnectionLostError` if nothing answers there or the TLS handshake
        fails; :class:`AccessDeniedError` if the server refuses the token. ``silence`` and
        ``held`` as for :meth:`connect`."""
        from .tcp import client_context, parse_url

        endpoint = parse_url(url)
        context = client_context(tls_ca) if endpoint.tls else None
        shown = endpoint.url()
        stream = await dial_tcp(endpoint, context, shown)
        hint = "" if endpoint.tls else "; if it serves TLS, connect with hives://"
        async with cls._session(stream, shown, name, silence, token, held, hint) as remote:
            yield remote

    @classmethod
    @asynccontextmanager
    async def _session(
        cls,
        stream: ByteStream,
        address: str,
        name: str | None,
        silence: float,
        token: str | None,
        held: int | None,
        hint: str = "",
    ) -> AsyncIterator[RemoteRuntime]:
        """The connection over ``stream``, from the handshake until the block ends."""
        async with stream:
            # Every frame's values are counted before they are decoded (a server, or
            # whatever answers at the address, cannot make this side take more than a
            # few times what it sent, nor more than max_answer_bytes for one frame): a
            # frame over any limit is a FrameError.
            reader = FrameReader(stream, ServerFrame, _WELCOME_LIMIT, counted=True)
            welcome = await handshake(stream, reader, address, name, token, hint)
            if held is None:
                held = RuntimeConfig().max_answer_bytes
            reader.hold_at_most(held, "max_answer_bytes")
            remote = cls(stream, welcome, address, silence=silence)
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(read_loop, remote, reader)
                    group.start_soon(keepalive, remote, silence)
                    try:
                        # The app's event callbacks: they stop before the connection does.
                        async with anyio.create_task_group() as callbacks:
                            remote._callbacks = callbacks
                            try:
                                yield remote
                            finally:
                                callbacks.cancel_scope.cancel()
                    finally:
                        remote._closed = True
                        remote.gone.set()
                        await close_gracefully(remote, stream)
                        group.cancel_scope.cancel()
            except BaseExceptionGroup as failed:
                raise_cause(failed)

    @property
    def path(self) -> str:
        """The database file the owner holds."""
        return self._welcome.db_path

    @property
    def identity(self) -> str | None:
        """The identity the server acts as for this connection (a token's), or None for
        the owner's own user on the Unix socket."""
        return self._welcome.identity

    @property
    def role(self) -> str:
        """What the connection may do: ``admin`` or ``agent`` (see docs/SERVING.md)."""
        return self._welcome.role

    @property
    def config(self) -> RuntimeConfig:
        """The defaults that apply on this side (the owner's own config governs the rest)."""
        return self._config

    def _check_running(self) -> None:
        lost = self._lost
        if lost is not None:
            raise type(lost)(str(lost))  # a fresh one: several callers may raise it at once
        if self._goodbye is not None:
            raise RuntimeStoppedError(stopped_text(self, self._goodbye))
        if self._closed:
            raise RuntimeStoppedError("the connection to the runtime is closed")

    def _check_loop(self) -> None:
        if threading.get_ident() != self._thread:
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            raise WrongEventLoopError(
                names.get(self._thread, f"thread {self._thread}"), threading.current_thread().name
            )

    def _check_open(self) -> None:
        self._check_running()
        self._check_loop()

    def _spawn(self, function: Callable[[], Coroutine[Any, Any, object]]) -> None:
        self._check_running()
        assert self._callbacks is not None
        self._callbacks.start_soon(function)

    # -- calls ------------------------------------------------------------------------------

    async def call(
        self,
        op: str,
        args: Mapping[str, object],
        *,
        agent: str | None,
        correlation: str | None,
        returns: Any,
        exclusive: bool = False,
    ) -> Any:
        """Run ``op`` on the owner; its answer decoded into ``returns``, or its error."""
        self._check_open()
        call_id = next(self._ids)
        data = _call_frame(call_id, op, args, agent, correlation)
        if len(data) - 4 > self._welcome.max_frame:
            raise too_large(f"this {op} call", len(data) - 4, self._welcome.max_frame)
        pending = _Pending(self._event_type())
        while self._in_flight >= self._max_in_flight:
            # The owner stops reading a connection with as many calls running as it
            # said it runs (its pings too, so it would look dead): more wait here.
            if self._slot_freed is None:
                self._slot_freed = self._event_type()
            await self._slot_freed.wait()
        self._in_flight += 1
        self._pending[call_id] = pending
        try:
            await self._send_bytes(data)
            await pending.done.wait()
        except BaseException:
            # Sent even as this task is cancelled (the write is shielded).
            if self._pending.pop(call_id, None) is not None and not pending.done.is_set():
                await self._send_quietly(Cancel(call_id))
            elif exclusive and pending.value is not None:
                await self._send_quietly(Received(call_id, kept=False))
            raise
        finally:
            self._in_flight -= 1
            freed, self._slot_freed = self._slot_freed, None
            if freed is not None:
                freed.set()
        self._pending.pop(call_id, None)
        if pending.error is not None:
            raise pending.error.with_traceback(None)
        assert pending.value is not None
        try:
            value = _decoder(returns).decode(pending.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if exclusive:
                await self._send_quietly(Received(call_id, kept=False))
            raise HiveError(f"the runtime's answer to {op} could not be read: {exc}") from None
        if exclusive:
            await self._send_quietly(Received(call_id, kept=True))
        return value

    async def _send_bytes(self, data: bytes) -> None:
        """Send one frame; :class:`ConnectionLostError` if the connection is gone. The
        first task to send while none is writing writes it, and whatever other tasks
        queue meanwhile, in as few writes as it can; the others go on at once (each
        waits for its answer, which fails, outcome unknown, if the connection breaks
        before it comes)."""
        self._check_running()
        self._outbox.append(data)
        if not self._writing:
            await self._flush()

    async def _flush(self) -> None:
        self._writing = True
        try:
            # Shielded: a frame cut short by a caller's cancellation would garble the
            # connection (the owner would read the frames after it as its rest). An owner
            # that takes none and says nothing for as long as a silent one lives is as
            # good as gone; one that holds the write back but is heard from (it has no
            # room for this side's calls yet, and says so with pongs) is waited for.
            with anyio.CancelScope(shield=True) as sending:
                self._sending = sending
                if len(self._pending) > 1:
                    # Other calls wait: callers woken with this one (answers that came
                    # together) send in this round of the event loop, and join this write.
                    await anyio.lowlevel.checkpoint()
                while self._outbox:
                    frames, self._outbox = self._outbox, []
                    sending.deadline = anyio.current_time() + self._silence
                    await self._stream.send(frames[0] if len(frames) == 1 else b"".join(frames))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._outbox.clear()
            lose(self, ConnectionLostError(lost_reason(self, f"the connection broke ({exc})")))
            self._check_running()
        finally:
            self._writing = False
            self._sending = None
        if sending.cancelled_caught:
            self._outbox.clear()
            lose(
                self,
                ConnectionLostError(
                    lost_reason(self, f"the runtime took no frame for {self._silence:g}s")
                ),
            )
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()  # half a frame went out: nothing more may follow
            self._check_running()

    async def _send_quietly(self, message: msgspec.Struct) -> None:
        """Send a notice the server needs but nobody waits on (cancel, receipt)."""
        if self._lost is not None or self._closed:
            return
        with suppress(HiveError):
            await self._send_bytes(frame(message))

    # -- events -----------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        pattern: str = "*",
        *,
        buffer: int | None = None,
        overflow: Literal["error", "drop"] | None = None,
        **filters: str,
    ) -> AsyncIterator[Subscription]:
        subscription = await self._open_subscription(
            pattern, buffer=buffer, overflow=overflow, filters=filters
        )
        try:
            yield subscription
        finally:
            subscription.close()

    async def _open_subscription(
        self,
        pattern: str,
        *,
        buffer: int | None,
        overflow: Literal["error", "drop"] | None,
        filters: Mapping[str, str],
    ) -> Subscription:
        """A subscription registered with the owner (its checks are the owner's)."""
        from ..api.subscription import Subscription

        self._check_open()
        if not isinstance(pattern, str):
            raise InvalidInputError("pattern", f"must be a string, got {type(pattern).__name__}")
        if len(filters) > MAX_FILTERS:  # a longer map is no frame of the protocol
            reason = f"holds {len(filters)} filters; at most {MAX_FILTERS}"
            raise InvalidInputError("filters", reason)
        subscription_id = next(self._ids)
        feed = EventFeed()
        capacity = self._config.subscriber_buffer
        if isinstance(buffer, int) and buffer > 0:
            capacity = buffer
        policy = overflow if overflow in ("error", "drop") else self._config.subscriber_overflow
        self._feeds[subscription_id] = (feed, capacity, policy)
        try:
            await self.call_frame(
                subscription_id,
                Subscribe(subscription_id, pattern, dict(filters), buffer, overflow),
            )
        except BaseException:
            self._feeds.pop(subscription_id, None)
            feed.close()
            raise

        def close() -> None:
            feed.close()
            if self._feeds.pop(subscription_id, None) is not None and self._lost is None:
                with suppress(HiveError):
                    self._spawn_notice(Unsubscribe(subscription_id))

        return Subscription(feed, pattern, close, self._thread)

    async def call_frame(self, call_id: int, message: msgspec.Struct) -> None:
        """Send a frame answered like a call (a subscribe), and wait for that answer."""
        pending = _Pending(self._event_type())
        self._pending[call_id] = pending
        try:
            await self._send_bytes(frame(message))
            await pending.done.wait()
        finally:
            self._pending.pop(call_id, None)
        if pending.error is not None:
            raise pending.error.with_traceback(None)

    def _spawn_notice(self, message: msgspec.Struct) -> None:
        """Send ``message`` soon, from a task of the connection (``close()`` is sync)."""
        if self._callbacks is not None and not self._closed:
            self._callbacks.start_soon(self._send_quietly, message)

    async def read_events(
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
    ) -> list[Event]:
        args: dict[str, object] = {"after": after, "limit": limit, "pattern": pattern}
        for name, value in (
            ("task_id", task_id),
            ("plan_id", plan_id),
            ("correlation_id", correlation_id),
        ):
            if value is not None:
                args[name] = value
        events: list[Event] = await self.call(
            "read_events", args, agent=None, correlation=None, returns=list[Event]
        )
        return events

    async def last_seq(self) -> int:
        seq: int = await self.call("last_seq", {}, agent=None, correlation=None, returns=int)
        return seq

    async def publish(
        self,
        event_type: str,
        data: Mapping[str, object] | None = None,
        *,
        source: str = "runtime",
        correlation_id: str | None = None,
        task_id: str | None = None,
        plan_id: str | None = None,
        worker_id: str | None = None,
    ) -> Event:
        args: dict[str, object] = {"event_type": event_type}
        if data is not None:
            args["data"] = data
        for name, value in (("task_id", task_id), ("plan_id", plan_id), ("worker_id", worker_id)):
            if value is not None:
                args[name] = value
        event: Event = await self.call(
            "publish", args, agent=source, correlation=correlation_id, returns=Event
        )
        return event
