"""The actor kernel: mailboxes, references, envelopes and the loop that runs an actor.

It knows no task, plan or SQL word. An actor owns its state and a bounded mailbox; it
handles one batch of envelopes at a time (one envelope, unless it asks for more). Other
code reaches it only through an :class:`ActorRef`: ``tell`` to send, ``ask`` to send and
wait for the typed reply.

Invariants the rest of the package relies on:

- Every envelope that carries a reply slot is answered exactly once: with the reply, a
  domain error, :class:`ActorFailedError` if the actor crashed while handling it, or
  :class:`RuntimeStoppedError` if the actor stopped first. An asker never hangs.
- Answering never blocks and never raises, so an asker that went away cannot hurt the actor.
- The mailbox outlives the actor: a crashed actor's replacement continues with the same
  mailbox, and envelopes it had taken but not started are handed to the replacement first.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectStreamStatistics

from ..errors import ActorFailedError, HiveError, RequestTimeoutError, RuntimeStoppedError

__all__ = [
    "Actor",
    "ActorRef",
    "AskWatchdog",
    "Envelope",
    "Mailbox",
    "Reply",
    "Request",
    "run_actor",
]

log = logging.getLogger("hive_orchestration.runtime")

M = TypeVar("M")
R = TypeVar("R")

# Closes the reply slot of an asker that stopped waiting; never raised to anyone.
_ABANDONED = RuntimeStoppedError("the asker stopped waiting for this reply")
R_co = TypeVar("R_co", covariant=True)


class Request(msgspec.Struct, Generic[R_co], frozen=True):
    """Base of every message that is answered with a value of type ``R_co``.

    ``ActorRef.ask`` returns ``R`` for a ``Request[R]``, so replies are typed end to end.
    """


class Reply(Generic[R]):
    """A one-shot reply slot: a result or an error, then an event. The first answer wins.

    An actor that hands out something exclusive (a claimed task) resolves with a
    ``give_back`` message. Being answered is not being received: an asker cancelled after
    the answer came but before it resumed never sees the value, so :meth:`abandon` returns
    that message and the asker tells it to the actor, which takes the thing back.
    """

    __slots__ = ("_error", "_event", "_give_back", "_taken", "_value")

    def __init__(self, event: anyio.Event | None = None) -> None:
        self._event = anyio.Event() if event is None else event
        self._value: R | None = None
        self._error: BaseException | None = None
        self._give_back: object = None
        self._taken = False

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, value: R, give_back: object = None) -> bool:
        if self._event.is_set():
            return False
        self._value = value
        self._give_back = give_back
        self._event.set()
        return True

    def fail(self, error: BaseException) -> bool:
        if self._event.is_set():
            return False
        self._error = error
        self._event.set()
        return True

    async def wait(self) -> R:
        await self._event.wait()
        # No checkpoint from here to the asker's hands: the value is received.
        self._taken = True
        if self._error is not None:
            # Raised afresh at the asker's call: the frames of the actor that made the
            # error say nothing the caller can act on (its __cause__, if any, is kept).
            raise self._error.with_traceback(None)
        return cast(R, self._value)

    def abandon(self) -> object:
        """The asker leaves: close the slot if still open. Returns the resolver's
        ``give_back`` message if a value came but was never taken, else ``None``."""
        if self.fail(_ABANDONED) or self._taken:
            return None
        give_back, self._give_back = self._give_back, None
        return give_back


class Envelope(Generic[M]):
    """A message in a mailbox, with the reply slot of its asker (``None`` for a tell).

    ``started`` is set by the actor when it begins handling the envelope: if the actor
    crashes, started envelopes are failed and the others are handed to its replacement.
    ``done`` is set once it is answered (for a tell: once it is handled).
    """

    __slots__ = ("done", "message", "reply", "started")

    def __init__(self, message: M, reply: Reply[Any] | None = None) -> None:
        self.message = message
        self.reply = reply
        self.started = False
        self.done = False

    def resolve(self, value: object, give_back: object = None) -> bool:
        """Answer the asker; False when its reply was already closed (it stopped waiting).

        ``give_back`` is told back to this actor if the asker leaves without the value
        after all (see :class:`Reply`); pass it with anything only one asker may hold."""
        self.done = True
        return self.reply is None or self.reply.resolve(value, give_back)

    def fail(self, error: BaseException) -> bool:
        """Hand ``error`` to the asker; False when there is none (a tell) or it was answered."""
        self.done = True
        return self.reply is not None and self.reply.fail(error)


class Mailbox(Generic[M]):
    """An actor's bounded inbox. It belongs to the supervisor's child slot, not the actor,
    so that it survives the actor's restarts.

    A deque and one wake-up, rather than a memory stream: the actor takes what is queued
    without yielding to the event loop, and is woken once when it waits on an empty box
    (anyio's ``receive`` yields on every call, queued items or not, and builds a waiter
    each time). Senders waiting for room are served first come first served.
    """

    __slots__ = (
        "_broken",
        "_closed",
        "_crash",
        "_inline",
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

    def put_nowait(self, envelope: Envelope[M]) -> bool:
        """Enqueue without waiting; False when the mailbox is full."""
        if self._closed:
            raise RuntimeStoppedError(f"actor {self.owner!r} is stopped")
        if self._senders or len(self._queue) >= self.size:
            return False
        receiver = self._receiver
        if receiver is not None:
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
            self._crash = exc
            self._wake_receiver()
            return True
        self._inline = inline
        envelope.done = handled
        envelope.started = handled
        return handled

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
        while not self._queue and not self._senders and self._crash is None:
            if self._closed:
                return False
            receiver = self._receiver = anyio.Event()
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


class AskWatchdog:
    """Enforces the default ``ask`` deadline of one actor without a timer per ask.

    A timer per request (``move_on_after``) costs more than the rest of a round trip. Asks
    that use the reference's default timeout have non-decreasing deadlines, so a FIFO queue
    is already in deadline order: one task, run by the supervisor, wakes every ``tick``
    seconds and fails the overdue ones with :class:`RequestTimeoutError`. A deadline is
    thus enforced never early and at most one tick late (1/20 of the timeout, between 1 ms
    and 1 s). Answered entries are dropped from the head as new asks arrive, and the whole
    queue is compacted when it grows, so it holds about what is in flight.

    It is also the last word on every ask still open when its actor's supervisor has
    stopped (:meth:`close`): an actor may hand a message on to something that never
    answers it (a storage reader cancelled at shutdown before it ran the read it was
    handed), and nothing else would ever wake that asker.
    """

    __slots__ = ("_held", "_queue", "owner", "running", "tick", "timeout")

    #: Past this many entries, ``expire`` also drops answered ones behind a slow head.
    COMPACT_ABOVE = 4096

    def __init__(self, owner: str, timeout: float) -> None:
        self.owner = owner
        self.timeout = timeout
        self.tick = min(1.0, max(timeout / 20, 0.001))
        self.running = False
        self._queue: deque[tuple[float, Reply[Any], str]] = deque()
        #: Asks whose deadline their own cancel scope keeps: failed only by :meth:`close`.
        self._held: set[Reply[Any]] = set()

    def add(self, reply: Reply[Any], message: str) -> None:
        queue = self._queue
        while queue and queue[0][1].done:
            queue.popleft()
        queue.append((anyio.current_time() + self.timeout, reply, message))

    async def run(self) -> None:
        self.running = True
        try:
            while True:
                await anyio.sleep(self.tick)
                self.expire(anyio.current_time())
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
        held, self._held = self._held, set()
        for reply in held:
            failed += reply.fail(error)
        return failed


class ActorRef(Generic[M]):
    """The only handle other code has on an actor: its name and its mailbox."""

    __slots__ = ("_event_type", "ask_timeout", "deadlines", "mailbox", "name")

    def __init__(self, name: str, *, mailbox_size: int, ask_timeout: float) -> None:
        self.name = name
        self.mailbox: Mailbox[M] = Mailbox(name, mailbox_size)
        self.ask_timeout = ask_timeout
        self.deadlines = AskWatchdog(name, ask_timeout)
        # anyio.Event() looks its backend up on every call; a reference lives on one event
        # loop, so the backend's class is looked up once.
        self._event_type: type[anyio.Event] | None = None

    def __repr__(self) -> str:
        return f"<ActorRef {self.name}>"

    async def tell(self, message: M) -> None:
        """Send without waiting for a reply; waits only while the mailbox is full."""
        await self.mailbox.put(Envelope(message))

    def try_tell(self, message: M) -> bool:
        """Send if there is room right now; never waits. False when the mailbox is full."""
        return self.mailbox.put_nowait(Envelope(message))

    async def forward(self, message: Request[R], reply: Reply[R]) -> None:
        """Send ``message`` with someone else's reply slot: this actor answers the original
        asker directly (whose own deadline still applies). Waits only for mailbox room."""
        await self.mailbox.put(Envelope(cast(M, message), reply))

    async def request(self, message: Request[R]) -> Reply[R]:
        """Enqueue ``message`` and return its reply slot without waiting for the answer,
        so that more messages can be queued behind it first. ``await reply.wait()`` for the
        answer; no deadline is kept for it (bound the wait with a cancel scope)."""
        if self._event_type is None:
            self._event_type = type(anyio.Event())
        reply: Reply[R] = Reply(self._event_type())
        await self.mailbox.put(Envelope(cast(M, message), reply))
        return reply

    # The deadline is part of ask's contract (with a default from the config), so it is a
    # parameter rather than the caller's cancel scope.
    async def ask(self, message: Request[R], *, timeout: float | None = None) -> R:  # noqa: ASYNC109
        """Send ``message`` and wait for its reply, at most ``timeout`` seconds in all.

        Raises the actor's domain error as is, :class:`ActorFailedError` if the actor
        crashed on it, :class:`RuntimeStoppedError` if it is stopped, and
        :class:`RequestTimeoutError` past the deadline (the message may still be handled).
        """
        if self._event_type is None:
            self._event_type = type(anyio.Event())
        reply: Reply[R] = Reply(self._event_type())
        envelope = Envelope(cast(M, message), reply)
        try:
            if timeout is None and self.deadlines.running and self.mailbox.put_nowait(envelope):
                # The common case: room in the mailbox, default deadline kept by the watchdog.
                self.deadlines.add(reply, type(message).__name__)
                return await reply.wait()
            deadline = self.ask_timeout if timeout is None else timeout
            self.deadlines.hold(reply)  # answered at the stop if nothing else answers it
            try:
                with anyio.move_on_after(deadline):
                    await self.mailbox.put(envelope)
                    return await reply.wait()
            finally:
                self.deadlines.release(reply)
            raise RequestTimeoutError(self.name, type(message).__name__, deadline)
        finally:
            # An asker that leaves (deadline, cancellation) closes its reply slot, so an
            # actor that hands out something exclusive can see its answer was not taken;
            # if the answer came first, the asker hands it back.
            give_back = reply.abandon()
            if give_back is not None:
                await self._give_back(cast(M, give_back))

    async def _give_back(self, message: M) -> None:
        """Tell ``message`` even while the asker is being cancelled: it returns something
        the actor handed out, which nobody else would ever return."""
        try:
            if self.mailbox.put_nowait(Envelope(message)):
                return
            with anyio.CancelScope(shield=True):
                await self.mailbox.put(Envelope(message))
        except RuntimeStoppedError:
            # The actor is stopped: what it handed out is recovered when it next starts.
            log.info("%s: stopped before %s could be given back", self.name, message)

    def statistics(self) -> MemoryObjectStreamStatistics:
        return self.mailbox.statistics()


class Actor(Generic[M]):
    """Base class of every actor: override :meth:`receive` (or :meth:`receive_batch`).

    The outcome table for one message lives in :meth:`receive_batch`:

    ============================  ==================================================
    ``receive`` returns a value    the asker gets it
    raises a :class:`HiveError`    the asker gets it; the actor carries on
    raises anything else           the asker gets ActorFailedError; the actor crashes
                                   and its supervisor restarts it
    is cancelled                   the asker gets RuntimeStoppedError; cancellation
                                   propagates
    ============================  ==================================================
    """

    #: Most envelopes handed to one :meth:`receive_batch` call.
    max_batch: int = 1
    #: The name of the mailbox it runs on; set by :func:`run_actor`.
    name: str = "actor"

    async def started(self) -> None:
        """Runs before the first message. An exception here fails the start-up."""

    async def stopped(self, error: BaseException | None) -> None:
        """Runs once the actor ends, in a shielded scope: release resources.

        ``error`` is ``None`` after a clean stop (mailbox closed and drained), the
        exception after a crash (a replacement will take over the mailbox), or the
        cancellation exception when the runtime cancelled it.
        """

    async def receive(self, message: M) -> object:
        raise HiveError(f"{type(self).__name__} does not handle {type(message).__name__}")

    def receive_inline(self, message: M) -> bool:
        """Handle a told ``message`` at once, in the sender's task; False to queue it.

        Called only while the actor is idle (waiting on an empty mailbox, so the order of
        messages is kept) and only for tells: it saves waking the actor's task. It must
        not wait (it cannot) and should be quick. Its outcomes are a told message's in
        :meth:`receive_batch`: a :class:`HiveError` is logged, anything else crashes the
        actor (its task wakes and raises it, and its supervisor restarts it).
        """
        return False

    async def receive_batch(self, batch: Sequence[Envelope[M]]) -> None:
        for envelope in batch:
            envelope.started = True
            try:
                result = await self.receive(envelope.message)
            except HiveError as err:
                if not envelope.fail(err) and envelope.reply is None:
                    log.warning(
                        "%s: %s on a told %s",
                        self.name,
                        type(err).__name__,
                        type(envelope.message).__name__,
                    )
            else:
                envelope.resolve(result)


async def run_actor(
    actor: Actor[M],
    mailbox: Mailbox[M],
    carry: deque[Envelope[M]],
    *,
    on_ready: Callable[[], None] | None = None,
    on_crash: Callable[[BaseException], None] | None = None,
) -> None:
    """Run ``actor`` on ``mailbox`` until the mailbox is closed and drained.

    ``carry`` holds envelopes a previous incarnation took but never started; they are
    handled before anything new. Returns normally only on a clean stop; a crash propagates
    (after settling the batch) so that the supervisor can restart the actor.
    ``on_crash`` is called at the moment a handler crashes, before anything is awaited,
    so that what it records comes before anything the woken askers do next.
    """
    actor.name = mailbox.owner
    await actor.started()
    if on_ready is not None:
        on_ready()
    limit = max(1, actor.max_batch)
    error: BaseException | None = None
    unyielding = 0  # batches taken in a row without waiting for the loop
    overridden = type(actor).receive_inline is not Actor.receive_inline
    inline = actor.receive_inline if overridden else None
    try:
        while True:
            batch: list[Envelope[M]] = []
            while carry and len(batch) < limit:
                batch.append(carry.popleft())
            if len(batch) < limit:
                batch += mailbox.take(limit - len(batch))
            if batch:
                unyielding += 1
                if unyielding >= _YIELD_EVERY:
                    # Busy without pause: let the rest of the loop (and a cancellation)
                    # in now and then, as a memory stream's receive did on every call.
                    unyielding = 0
                    await anyio.lowlevel.checkpoint()
            else:
                unyielding = 0
                mailbox._inline = inline
                try:
                    more = await mailbox.wait()
                finally:
                    mailbox._inline = None
                crash = mailbox.take_crash()
                if crash is not None:
                    if on_crash is not None:
                        on_crash(crash)
                    raise crash
                if not more:
                    return  # closed and drained: a clean stop
                batch = mailbox.take(limit)
            try:
                await actor.receive_batch(batch)
            except BaseException as exc:
                _settle(mailbox.owner, batch, exc, carry)
                if on_crash is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                    on_crash(exc)
                raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await actor.stopped(error)


#: An actor that always finds a batch waiting yields to the event loop once per this many.
_YIELD_EVERY = 8


def _settle(
    owner: str, batch: Sequence[Envelope[Any]], exc: BaseException, carry: deque[Envelope[Any]]
) -> None:
    """After a batch failed: answer what was started, carry over what was not."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        error: BaseException = RuntimeStoppedError(f"actor {owner!r} stopped before answering")
    else:
        error = ActorFailedError(owner, exc)
    leftover = []
    for envelope in batch:
        if envelope.done:
            continue
        if envelope.started:
            if not envelope.fail(error):
                log.error("%s crashed on a told %s", owner, type(envelope.message).__name__)
        else:
            leftover.append(envelope)
    # Keep mailbox order: the carried envelopes were taken before anything still queued.
    carry.extendleft(reversed(leftover))
