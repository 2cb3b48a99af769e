"""The default deadline of ``ActorRef.ask``, kept by one task per actor
(:class:`AskWatchdog`) rather than a timer per ask, and the last word on every ask still
open when the actor's supervisor has stopped.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ..errors import RequestTimeoutError
from .clock import loop_clock
from .reply import Reply

__all__ = ["AskWatchdog"]


class AskWatchdog:
    """Enforces the default ``ask`` deadline of one actor without a timer per ask.

    A timer per request (``move_on_after``) costs more than the rest of a round trip. Asks
    that use the reference's default timeout have non-decreasing deadlines, so a FIFO queue
    is already in deadline order: one task, run by the supervisor, wakes every ``tick``
    seconds and fails the overdue ones with :class:`RequestTimeoutError`. A deadline is
    thus enforced never early and at most one tick late (1/20 of the timeout, between 1 ms
    and 1 s). Answered entries are dropped from the head as new asks arrive, and the whole
    queue is compacted when it grows, so it holds about what is in flight.

    An ask with a deadline of its own at least the default (a claim that waits: its
    wait plus the default) is kept here too, in a heap by deadline (:meth:`add_timed`),
    rather than by a timer and a cancel scope of its own: one tick late is then at most
    1/20 of its deadline. Answered entries leave the heap at their deadline, or all at
    once when it grows past ``COMPACT_ABOVE``.

    It is also the last word on every ask still open when its actor's supervisor has
    stopped (:meth:`close`): an actor may hand a message on to something that never
    answers it (a storage reader cancelled at shutdown before it ran the read it was
    handed), and nothing else would ever wake that asker.
    """

    __slots__ = (
        "_clock",
        "_held",
        "_order",
        "_queue",
        "_timed",
        "owner",
        "running",
        "tick",
        "timeout",
    )

    #: Past this many entries, ``expire`` also drops answered ones behind a slow head.
    COMPACT_ABOVE = 4096

    def __init__(self, owner: str, timeout: float) -> None:
        self.owner = owner
        self.timeout = timeout
        self.tick = min(1.0, max(timeout / 20, 0.001))
        self.running = False
        # The event loop's clock, found when run() starts (add and add_timed are called
        # only while it runs): anyio.current_time() without its look-up of the backend.
        self._clock: Callable[[], float] = anyio.current_time
        self._queue: deque[tuple[float, Reply[Any], str]] = deque()
        # Asks with deadlines of their own: (deadline, order, reply, message, timeout).
        self._timed: list[tuple[float, int, Reply[Any], str, float]] = []
        self._order = itertools.count()  # ties of deadline never compare replies
        #: Asks whose deadline their own cancel scope keeps: failed only by :meth:`close`.
        self._held: set[Reply[Any]] = set()

    def add(self, reply: Reply[Any], message: str) -> None:
        queue = self._queue
        while queue and queue[0][1].done:
            queue.popleft()
        queue.append((self._clock() + self.timeout, reply, message))

    def add_timed(self, reply: Reply[Any], message: str, timeout: float) -> None:
        """Keep an ask's own deadline, ``timeout`` seconds from now (at least the default
        timeout: a shorter one would be late by too large a part of it)."""
        timed = self._timed
        if len(timed) > self.COMPACT_ABOVE:
            self._timed = timed = [entry for entry in timed if not entry[2].done]
            heapq.heapify(timed)
        entry = (self._clock() + timeout, next(self._order), reply, message, timeout)
        heapq.heappush(timed, entry)

    async def run(self) -> None:
        self._clock = clock = loop_clock()
        self.running = True
        try:
            while True:
                await anyio.sleep(self.tick)
                self.expire(clock())
        finally:
            self.running = False

    def expire(self, now: float) -> None:
        queue = self._queue
        while queue:
            deadline, reply, message = queue[0]
            if not reply.done and deadline > now:
                break
            queue.popleft()
            reply.fail(RequestTimeoutError(self.owner, message, self.timeout))
        if len(queue) > self.COMPACT_ABOVE:
            self._queue = deque(entry for entry in queue if not entry[1].done)
        timed = self._timed
        while timed and timed[0][0] <= now:
            _, _, reply, message, timeout = heapq.heappop(timed)
            reply.fail(RequestTimeoutError(self.owner, message, timeout))

    def hold(self, reply: Reply[Any]) -> None:
        """Track an ask this watchdog does not time, until :meth:`release`, so that
        :meth:`close` still answers it."""
        self._held.add(reply)

    def release(self, reply: Reply[Any]) -> None:
        self._held.discard(reply)

    def close(self, error: BaseException) -> int:
        """Fail every ask still unanswered with ``error``; returns how many.

        For the supervisor, once every child and service of it has ended: no answer can
        come any more. Asks made after this find the mailbox discarded."""
        failed = 0
        queue, self._queue = self._queue, deque()
        for _, reply, _ in queue:
            failed += reply.fail(error)
        timed, self._timed = self._timed, []
        for _, _, reply, _, _ in timed:
            failed += reply.fail(error)
        held, self._held = self._held, set()
        for reply in held:
            failed += reply.fail(error)
        return failed
