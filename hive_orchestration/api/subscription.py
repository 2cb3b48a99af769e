"""A live subscription in this process: the events the broadcast actor hands one
subscriber, in log order (:meth:`Runtime.subscribe`; a client of another process gets the
same object, fed through its socket)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio

from ..errors import RuntimeStoppedError, SubscriberLaggedError, WrongEventLoopError
from ..messages.events import Event, EventFeed, Lagged

__all__ = ["Subscription", "wrong_loop"]


class Subscription:
    """Live events matching a pattern, in log order. Iterate it with ``async for``.

    Iteration ends when the runtime stops, after every event committed before it stopped.
    If a commit comes while the subscriber is its buffer's worth behind, not just on the
    last commit it was given, iteration raises :class:`SubscriberLaggedError` once it has
    read what it was given (unless it subscribed with ``overflow="drop"``); replay the log
    from ``error.last_seq`` to catch up.
    """

    def __init__(
        self, feed: EventFeed, pattern: str, close: Callable[[], None], thread: int
    ) -> None:
        self._feed = feed
        self._close = close
        self._thread = thread  # the runtime's event loop thread (see Runtime._check_loop)
        self.pattern = pattern
        #: The sequence number of the last event received.
        self.last_seq = 0
        self._lagged: SubscriberLaggedError | None = None

    @property
    def unread(self) -> int:
        """Events handed to this subscription and not received yet."""
        return self._feed.unread

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except RuntimeStoppedError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving (idempotent); ``async with runtime.subscribe(...)`` does it for you."""
        self._close()

    async def receive(self) -> Event:
        """The next event; :class:`RuntimeStoppedError` once the runtime stopped, and
        :class:`SubscriberLaggedError` (every time) once the subscriber was dropped."""
        if threading.get_ident() != self._thread:
            raise wrong_loop(self._thread)
        if self._lagged is not None:
            raise SubscriberLaggedError(self._lagged.last_seq)
        try:
            item = await self._feed.receive()
        except anyio.EndOfStream:
            raise RuntimeStoppedError("the subscription ended: the runtime stopped") from None
        except anyio.ClosedResourceError:
            raise RuntimeStoppedError("the subscription was closed") from None
        if isinstance(item, Lagged):
            self._lagged = SubscriberLaggedError(item.last_seq)
            raise self._lagged
        self.last_seq = item.seq
        return item


def wrong_loop(owner: int) -> WrongEventLoopError:
    """The error for a call from a thread other than ``owner``, the runtime's event loop
    thread, naming both threads."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    caller = threading.current_thread().name
    return WrongEventLoopError(names.get(owner, f"thread {owner}"), caller)
