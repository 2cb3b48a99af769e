"""An actor's bounded mailbox (:class:`Mailbox`), and the senders waiting for room in it.

The mailbox outlives the actor: a crashed actor's replacement continues with the same
mailbox. Separate from the actor loop (:mod:`.actor`), which takes from it, and from the
references (:class:`~.actor.ActorRef`) that put into it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectStreamStatistics

from ..errors import ActorFailedError, HiveError, RuntimeStoppedError
from .reply import Envelope

__all__ = ["Mailbox"]

log = logging.getLogger("hive_orchestration.runtime")

M = TypeVar("M")


class Mailbox(Generic[M]):
    """An actor's bounded inbox. It belongs to the supervisor's child slot, not the actor,
    so that it survives the actor's restarts.

    A deque and one wake-up, rather than a memory stream: the actor takes what is queued
    without yielding to the event loop, and is woken once when it waits on an empty box
    (anyio's ``receive`` yields on every call, queued items or not, and builds a waiter
    each time). Senders waiting for room are served first come first served.
    """

    __slots__ = (
        "_borrow",
        "_borrowed",
        "_broken",
        "_closed",
        "_crash",
        "_event_type",
        "_inline",
        "_on_crash",
        "_queue",
        "_receiver",
        "_senders",
        "owner",
        "size",
    )

    def __init__(self, owner: str, size: int) -> None:
        self.owner = owner
        self.size = size
        self._queue: deque[Envelope[M]] = deque()
        self._senders: deque[_Sender[M]] = deque()  # waiting for room, oldest first
        self._receiver: anyio.Event | None = None  # the actor, waiting on an empty box
        self._closed = False  # no new messages; what is queued is still handled
        self._broken: BaseException | None = None  # discarded: nothing is handled
        # The idle actor's Actor.receive_inline, while it waits (see run_actor), and what
        # it raised, for the actor's own task to crash with.
        self._inline: Callable[[M], bool] | None = None
        self._crash: Exception | None = None
        # anyio.Event() looks its backend up on every call; the actor waits on one loop.
        self._event_type: type[anyio.Event] | None = None
        # The idle actor's Actor.receive_batch, while it waits, for an actor that lets a
        # sender run its batch (Actor.lends_batches); True while a sender runs one.
        self._borrow: Callable[[Sequence[Envelope[M]]], Awaitable[None]] | None = None
        self._borrowed = False
        # The supervisor's record of a crash (run_actor's on_crash), called at the moment
        # a handler run in a sender's task crashes, as the actor's loop calls it.
        self._on_crash: Callable[[BaseException], None] | None = None

    def put_nowait(self, envelope: Envelope[M]) -> bool:
        """Enqueue without waiting; False when the mailbox is full."""
        if self._closed:
            raise RuntimeStoppedError(f"actor {self.owner!r} is stopped")
        if self._senders or len(self._queue) >= self.size:
            return False
        receiver = self._receiver
        if receiver is not None and not self._borrowed:
            # The actor waits on an empty box: a tell it can handle at once is handled
            # here, in order (nothing is queued before it), without waking its task.
            inline = self._inline
            if inline is not None and envelope.reply is None and self._run_inline(inline, envelope):
                return True
            self._receiver = None
            receiver.set()
        self._queue.append(envelope)
        return True

    def _run_inline(self, inline: Callable[[M], bool], envelope: Envelope[M]) -> bool:
        self._inline = None  # a tell to this actor from inside the handler is queued
        envelope.started = True
        try:
            handled = inline(envelope.message)
        except HiveError as err:
            kind = type(envelope.message).__name__
            log.warning("%s: %s on a told %s", self.owner, type(err).__name__, kind)
            handled = True
        except Exception as exc:
            # The actor crashes on it as if in its own loop: its task wakes and raises it.
            envelope.done = True
            self._crashed(exc)
            self._wake_receiver()
            return True
        self._inline = inline
        envelope.done = handled
        envelope.started = handled
        return handled

    def can_lend(self) -> bool:
        """Whether a sender may run a batch of the actor now (:meth:`run_borrowed`): it
        lends its batches, waits on an empty mailbox, and nothing else is due."""
        return (
            self._borrow is not None
            and self._receiver is not None
            and not self._queue
            and not self._senders
            and not self._closed
            and self._crash is None
        )

    async def run_borrowed(self, envelope: Envelope[M]) -> None:
        """Run the idle actor's batch of ``envelope`` in the sender's task (only when
        :meth:`can_lend`): what its task would do once woken, without waking it.

        Meanwhile the actor's task stays asleep whatever arrives (it is queued, and the
        actor is woken for it after), so batches never overlap. The outcomes are those of
        the actor's own loop: an answer or a domain error reaches the asker through
        ``envelope``; an unexpected error is answered as :class:`ActorFailedError` and
        the actor's task wakes and crashes with it (its supervisor restarts it); a
        cancelled sender's envelope gets :class:`RuntimeStoppedError`, and the
        cancellation propagates.
        """
        batch = self._borrow
        assert batch is not None
        assert self._receiver is not None
        inline = self._inline
        self._borrow = None
        self._inline = None  # tells that arrive meanwhile are queued behind it
        self._borrowed = True
        try:
            await batch([envelope])
        except Exception as exc:
            # As the actor's loop settles a batch that crashed (actor.py, _settle).
            if not envelope.started:
                self._queue.appendleft(envelope)  # its replacement handles it
            elif not envelope.done:
                envelope.fail(ActorFailedError(self.owner, exc))
            self._crashed(exc)
        except BaseException:
            if not envelope.started:
                self._queue.appendleft(envelope)
            elif not envelope.done:
                envelope.fail(RuntimeStoppedError(f"actor {self.owner!r} stopped before answering"))
            raise
        finally:
            self._borrowed = False
            if self._receiver is not None and self._crash is None:
                self._borrow = batch
                self._inline = inline
            if self._queue or self._senders or self._closed or self._crash is not None:
                self._wake_receiver()

    def _crashed(self, exc: Exception) -> None:
        """A handler run in a sender's task crashed: recorded now, before anything the
        failed askers do next; the actor's task wakes to crash with it (take_crash)."""
        self._crash = exc
        if self._on_crash is not None:
            self._on_crash(exc)

    def take_crash(self) -> Exception | None:
        """What an inline handler raised, once (see :meth:`Actor.receive_inline`)."""
        crash, self._crash = self._crash, None
        return crash

    async def put(self, envelope: Envelope[M]) -> None:
        """Enqueue, waiting for room (backpressure) when the mailbox is full."""
        if self.put_nowait(envelope):
            return
        sender = _Sender(envelope)
        self._senders.append(sender)
        self._wake_receiver()  # it takes waiting senders' envelopes as room frees
        try:
            await sender.event.wait()
        except BaseException:
            if sender.outcome is None:
                self._senders.remove(sender)  # still waiting: withdrawn
            raise  # else already taken: the message is in, whatever stopped the wait
        if sender.outcome is not _TAKEN:
            raise RuntimeStoppedError(f"actor {self.owner!r} is stopped")

    def waiting(self) -> Iterator[M]:
        """The messages not taken yet, oldest first: those queued, then those of the
        senders waiting for room. Iterate without awaiting (the deques change meanwhile)."""
        for envelope in self._queue:
            yield envelope.message
        for sender in self._senders:
            yield sender.envelope.message

    def take(self, limit: int) -> list[Envelope[M]]:
        """Up to ``limit`` envelopes, oldest first, without waiting."""
        queue = self._queue
        senders = self._senders
        batch: list[Envelope[M]] = []
        while len(batch) < limit:
            if queue:
                batch.append(queue.popleft())
                if not senders:
                    continue
                # Room freed: let the oldest waiting sender in, behind what is queued.
                queue.append(senders.popleft().let_in())
            elif senders:
                batch.append(senders.popleft().let_in())
            else:
                break
        return batch

    async def wait(self) -> bool:
        """Wait until something is queued; False once the box is closed and empty."""
        while self._borrowed or (not self._queue and not self._senders and self._crash is None):
            if self._closed and not self._borrowed:
                return False
            if self._event_type is None:
                self._event_type = type(anyio.Event())
            receiver = self._receiver = self._event_type()
            try:
                await receiver.wait()
            finally:
                if self._receiver is receiver:
                    self._receiver = None
        return True

    def close(self) -> None:
        """Refuse new messages; the actor finishes what is queued, then its loop ends.

        Senders already waiting for room stay queued: the actor handles their messages too.
        """
        self._closed = True
        self._wake_receiver()

    def discard(self, error: BaseException) -> int:
        """Close for good and fail every envelope still queued. Returns how many.

        Idempotent: discarding a discarded mailbox does nothing."""
        self._closed = True
        if self._broken is None:
            self._broken = error
        failed = 0
        while self._queue:
            failed += self._queue.popleft().fail(error)
        # Senders still waiting for room get RuntimeStoppedError from ``put``.
        while self._senders:
            sender = self._senders.popleft()
            sender.outcome = error
            sender.event.set()
        self._wake_receiver()
        return failed

    def _wake_receiver(self) -> None:
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            receiver.set()

    def statistics(self) -> MemoryObjectStreamStatistics:
        return MemoryObjectStreamStatistics(
            current_buffer_used=len(self._queue),
            max_buffer_size=self.size,
            open_send_streams=0 if self._closed else 1,
            open_receive_streams=0 if self._broken is not None else 1,
            tasks_waiting_send=len(self._senders),
            tasks_waiting_receive=0 if self._receiver is None else 1,
        )


_TAKEN = object()


class _Sender(Generic[M]):
    """A sender waiting for room: woken once its envelope is in, or the box discarded."""

    __slots__ = ("envelope", "event", "outcome")

    def __init__(self, envelope: Envelope[M]) -> None:
        self.envelope = envelope
        self.event = anyio.Event()
        self.outcome: object = None  # _TAKEN, or the error of a discarded box

    def let_in(self) -> Envelope[M]:
        self.outcome = _TAKEN
        self.event.set()
        return self.envelope
