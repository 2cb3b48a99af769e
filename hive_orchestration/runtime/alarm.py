"""Alarms: how an actor gets woken at a time of its choosing, without sleeping or polling.

An actor that keeps deadlines (leases, retry backoff, timeouts) computes its earliest one
itself and calls :meth:`Alarm.set`; at that time the alarm tells the actor its wake-up
message, and the actor handles whatever is due and sets the alarm again. The actor's
loop never sleeps, so it stays free to handle messages, and there is one timer per
actor, not one per deadline. Time is a parameter (``clock``), so tests need not sleep.

The clock must be monotonic (the default, the event loop's own clock, is), and the one
the actor computes its deadlines on: a wall clock that is stepped would fire an alarm an
hour early or an hour late.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

from ..errors import RuntimeStoppedError
from .actor import ActorRef

__all__ = ["Alarm"]

M = TypeVar("M")


class Alarm(Generic[M]):
    """Tells ``ref`` the ``message`` at the time last given to :meth:`set`.

    Run :meth:`run` for the actor's whole life (``ChildSpec(services=...)`` does). Setting
    a new time replaces the previous one; ``set(None)`` disarms. The alarm fires once per
    ``set``; a time already past fires at once.
    """

    __slots__ = ("_at", "_changed", "_clock", "_until", "message", "ref")

    def __init__(
        self,
        ref: ActorRef[M],
        message: M,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.ref = ref
        self.message = message
        self._clock = clock
        self._at: float | None = None
        self._changed: anyio.Event | None = None
        # When run() wakes next by itself (inf: never; -inf: it is not waiting). A later
        # time needs no wake-up: run() looks again when it wakes and sleeps on.
        self._until = -math.inf

    @property
    def at(self) -> float | None:
        """When it will fire next, or ``None`` when disarmed."""
        return self._at

    def set(self, at: float | None) -> None:
        if at is not None and math.isnan(at):
            raise ValueError("an alarm time cannot be NaN")
        self._at = at
        # Only an earlier time wakes run() now. An actor moves its alarm after most of its
        # batches, mostly later (a new lease ends after the ones before it), and waking
        # the alarm's task for each would cost a round of the event loop per batch.
        if self._changed is not None and at is not None and at < self._until:
            self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed = anyio.Event()
            at = self._at
            if at is None:
                self._until = math.inf
                try:
                    await self._changed.wait()
                finally:
                    self._until = -math.inf
                continue
            delay = at - self._clock()
            if delay > 0:
                self._until = at
                try:
                    with anyio.move_on_after(delay):
                        await self._changed.wait()
                finally:
                    self._until = -math.inf
                continue  # changed, or due: look again
            self._at = None
            try:
                if not self.ref.try_tell(self.message):
                    await self.ref.tell(self.message)
            except RuntimeStoppedError:
                return
