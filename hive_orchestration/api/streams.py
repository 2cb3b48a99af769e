"""The client's event streams: the durable log from a sequence number then live events
(:class:`EventStream`, ``client.events()``), and callbacks run on one
(:class:`CallbackSubscription`, ``client.on_event()`` and its kin)."""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import Mapping

import anyio

from .._validate import check_identifier
from ..errors import ConnectionLostError, HiveError, RuntimeStoppedError, SubscriberLaggedError
from ..events import EventHandler
from ..messages.events import Event, compile_pattern, matches_filters
from .keeper import Backend, Keeper, usable
from .subscription import Subscription

__all__ = ["CallbackSubscription", "EventStream"]

# The callbacks' failures are logged as the client's: apps configure that logger.
log = logging.getLogger("hive_orchestration.client")

#: Events in one page of a stream's replay of the log.
_PAGE = 1000


class EventStream:
    """The durable log from a sequence number, then live events: no gap, no duplicate.

    It subscribes first, then replays the log; live events the replay already gave are
    skipped by sequence number. If the live buffer overflows (the reader is slow), it
    subscribes again and replays from the last event it gave, so nothing is lost. Use it
    with ``async with`` (or call :meth:`aclose`) so the subscription ends with the block.

    Its counters say how it is doing: events given from the log (``replayed``) and from
    the live subscription (``live``), live events skipped because the replay had given
    them (``skipped``), and times the reader fell a whole buffer behind and caught up from
    the log (``lags``: if it keeps growing, read faster or pass a larger ``buffer``).
    """

    def __init__(
        self,
        runtime: Backend,
        *,
        pattern: str = "*",
        after: int | None = None,
        buffer: int | None = None,
        filters: Mapping[str, str] | None = None,
        keeper: Keeper | None = None,
    ) -> None:
        self._runtime = runtime
        #: With ``take_over``: where the next runtime comes from when this one goes away.
        self._keeper = keeper
        self._moving = False
        self._open_done = False
        self.pattern = check_identifier(pattern, "pattern")
        self._matches = compile_pattern(pattern)
        self._filters = dict(filters or {})
        self._filter_items = tuple(sorted(self._filters.items()))
        self._buffer = buffer
        self._sql_pattern = "*" if "[" in pattern else pattern
        self._sql_filters = {
            key: value
            for key, value in self._filters.items()
            if key in ("task_id", "plan_id", "correlation_id")
        }
        self._after = after
        #: The sequence number of the last event given (or skipped past while replaying).
        self.last_seq = 0 if after is None else after
        self._subscription: Subscription | None = None
        self._pending: deque[Event] = deque()
        self._replaying = after is not None
        #: Where the replay reads next (ahead of ``last_seq`` past unmatched events).
        self._cursor = self.last_seq
        self._opened = False
        self._closed = False
        self.replayed = 0
        self.live = 0
        self.skipped = 0
        self.lags = 0

    async def open(self) -> None:
        """Register the live subscription (done by the first read if not called)."""
        if self._opened:
            return
        self._opened = True
        await self._subscribe()
        if self._after is None:
            # "From now": everything after the log's end as the subscription began.
            self.last_seq = self._cursor = await self._runtime.last_seq()
        self._open_done = True

    async def _subscribe(self) -> None:
        self._subscription = await self._runtime._open_subscription(
            self.pattern, buffer=self._buffer, overflow="error", filters=self._filters
        )

    async def __aenter__(self) -> EventStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except RuntimeStoppedError:
            await self.aclose()
            raise StopAsyncIteration from None

    async def receive(self) -> Event:
        """The next event; :class:`RuntimeStoppedError` once the runtime stopped."""
        if self._closed:
            raise RuntimeStoppedError("the event stream was closed")
        while True:
            try:
                if self._moving:
                    await self._resume()
                return await self._receive()
            except (ConnectionLostError, RuntimeStoppedError):
                old = self._runtime
                if self._keeper is None or self._closed or usable(old):
                    raise
                # The runtime changed hands (take_over): go on with the next one, from the
                # last event given. The log is durable: the next has every event.
                self._runtime = await self._keeper.replaced(old)
                self._moving = True

    async def _resume(self) -> None:
        self._moving = False
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        if not self._open_done:
            self._opened = False  # open again, on the next runtime
            return
        await self._subscribe()  # first, then the replay: no gap between them
        self._pending.clear()
        self._cursor = self.last_seq
        self._replaying = True

    async def _receive(self) -> Event:
        await self.open()
        while True:
            if self._pending:
                event = self._pending.popleft()
                self.last_seq = event.seq
                self.replayed += 1
                return event
            if self._replaying:
                await self._replay_page()
                continue
            assert self._subscription is not None
            try:
                event = await self._subscription.receive()
            except SubscriberLaggedError:
                # Fell behind: subscribe again first, then fill the gap from the log.
                self.lags += 1
                self._subscription.close()
                await self._subscribe()
                self._cursor = self.last_seq
                self._replaying = True
                continue
            if event.seq <= self.last_seq:
                self.skipped += 1
                continue  # already given by the replay
            self.last_seq = event.seq
            self.live += 1
            return event

    async def _replay_page(self) -> None:
        # The log narrows what it can (the type glob, the event fields); the predicate the
        # live side uses decides the rest, so replay and live agree exactly.
        page = await self._runtime.read_events(
            self._cursor, limit=_PAGE, pattern=self._sql_pattern, **self._sql_filters
        )
        if not page:
            self._replaying = False
            # The unmatched tail of the log is behind us too: no live event in it matches.
            self.last_seq = max(self.last_seq, self._cursor)
            return
        self._cursor = page[-1].seq
        for event in page:
            if self._matches(event.type) and matches_filters(event, self._filter_items):
                self._pending.append(event)


class CallbackSubscription:
    """A running callback subscription: cancel it, or read how it is doing."""

    def __init__(
        self,
        stream: EventStream,
        callback: EventHandler,
        owner: set[CallbackSubscription],
    ) -> None:
        self._stream = stream
        self._callback = callback
        self._owner = owner
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        #: Events handed to the callback, and how many of those calls raised.
        self.delivered = 0
        self.errors = 0
        #: What ended the subscription early (the runtime failing a read), if anything.
        self.error: BaseException | None = None

    @property
    def pattern(self) -> str:
        return self._stream.pattern

    @property
    def last_seq(self) -> int:
        """The sequence number of the last event handed to the callback."""
        return self._stream.last_seq

    @property
    def active(self) -> bool:
        return not self._done.is_set()

    def cancel(self) -> None:
        """Stop calling the callback (it is not interrupted mid-call if it is sync)."""
        self._stream._runtime._check_loop()
        self._scope.cancel()

    async def aclose(self) -> None:
        """Stop, and wait until the callback is no longer running."""
        self._stream._runtime._check_loop()
        self._scope.cancel()
        await self._done.wait()

    async def _run(self) -> None:
        cancelled = anyio.get_cancelled_exc_class()
        try:
            with self._scope:
                async for event in self._stream:
                    try:
                        outcome = self._callback(event)
                        if inspect.isawaitable(outcome):
                            await outcome
                    except Exception:
                        self.errors += 1
                        log.exception("event callback %r failed on %s", self._callback, event.type)
                    except cancelled:
                        if _being_cancelled():
                            raise  # this subscription, or the runtime, is stopping
                        # The callback's own: it awaited something that another task
                        # cancelled (an asyncio future, say). Let through, it would end this
                        # task as cancelled, and anyio would then cancel the app's block.
                        self.errors += 1
                        log.exception(
                            "event callback %r raised a cancellation of its own on %s "
                            "(no scope of the runtime was cancelled)",
                            self._callback,
                            event.type,
                        )
                    self.delivered += 1
        except HiveError as error:
            self.error = error
            log.error("event callback %r stopped: %s", self._callback, error)
        except cancelled as error:
            if _being_cancelled():
                raise
            # A cancellation that no cancel scope of this task claims: asyncio's own
            # Task.cancel() of this task, or the callback's own cancellation arriving just
            # as the handle was cancelled (so the handle's scope does not recognise it).
            # It ends this subscription, never the app's block.
            if not self._scope.cancel_called:
                self.error = error
                log.error("event callback %r stopped by a foreign cancellation", self._callback)
        except (KeyboardInterrupt, SystemExit) as error:
            # asyncio raises these out of its event loop from the task they end, at once:
            # the loop stops mid-step and the runtime's shutdown never runs in full. In a
            # group they end this task as any failure does: the runtime cancels the app's
            # block and raises the exception from it, in the app's own task.
            raise BaseExceptionGroup(f"event callback {self._callback!r} raised", [error]) from None
        finally:
            await self._stream.aclose()
            self._owner.discard(self)
            self._done.set()


def _being_cancelled() -> bool:
    """Whether a cancel scope around the current task is cancelled (anyio reports the
    effective deadline of a cancelled task as minus infinity, on asyncio and trio alike).

    A cancellation exception is the runtime's to propagate only then; otherwise something
    other than a cancel scope raised it, and it is an error like any other.
    """
    return anyio.current_effective_deadline() == -math.inf
