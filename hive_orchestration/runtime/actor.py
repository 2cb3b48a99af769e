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

The reply slots are in :mod:`.reply`, the mailbox in :mod:`.mailbox`, the ask deadlines
in :mod:`.watchdog`; this module holds the reference, the actor base class and its loop.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectStreamStatistics

from ..errors import ActorFailedError, HiveError, RequestTimeoutError, RuntimeStoppedError
from .mailbox import Mailbox
from .reply import Envelope, Reply, Request
from .watchdog import AskWatchdog

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

    async def request_now(self, message: Request[R]) -> Reply[R]:
        """:meth:`request`, except that when the actor lends its batches
        (:attr:`Actor.lends_batches`) and is idle, its batch of ``message`` runs here
        and now, in this task, and the reply comes back answered: the actor's task is
        not woken for it, nor this one for the answer. Otherwise queued as by
        :meth:`request`."""
        mailbox = self.mailbox
        if not mailbox.can_lend():
            return await self.request(message)
        if self._event_type is None:
            self._event_type = type(anyio.Event())
        reply: Reply[R] = Reply(self._event_type())
        await mailbox.run_borrowed(Envelope(cast(M, message), reply))
        return reply

    # The deadline is part of ask's contract (with a default from the config), so it is a
    # parameter rather than the caller's cancel scope.
    async def ask(self, message: Request[R], *, timeout: float | None = None) -> R:  # noqa: ASYNC109
        """Send ``message`` and wait for its reply, at most ``timeout`` seconds in all.

        Raises the actor's domain error as is, :class:`ActorFailedError` if the actor
        crashed on it, :class:`RuntimeStoppedError` if it is stopped, and
        :class:`RequestTimeoutError` past the deadline (the message may still be handled).
        The default deadline, and a ``timeout`` at least as long, are kept by the
        reference's :class:`AskWatchdog` (never early, at most a tick late); a shorter
        ``timeout`` by a cancel scope of its own.
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
            if (
                timeout is not None
                and timeout >= self.ask_timeout
                and self.deadlines.running
                and self.mailbox.put_nowait(envelope)
            ):
                # A longer deadline (a claim's wait plus the default): kept by the
                # watchdog too, at most a tick (1/20 of the default) late, rather than by
                # a timer and a cancel scope per ask.
                self.deadlines.add_timed(reply, type(message).__name__, timeout)
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
    #: Whether a sender may run a batch in its own task while this actor is idle
    #: (:meth:`ActorRef.request_now`): for an actor whose batches may run in any task
    #: (it owns nothing bound to its own), to save waking it and its asker.
    lends_batches: bool = False
    #: The name of the mailbox it runs on; set by :func:`run_actor`.
    name: str = "actor"
    #: What :meth:`waiting` reads; set by :func:`run_actor`.
    _waiting: Callable[[], Iterator[M]] | None = None

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

    def waiting(self) -> Iterator[M]:
        """The messages sent to this actor that no batch has taken yet, oldest first:
        those its crashed predecessor took but never started, those queued in its
        mailbox, then those whose senders wait for room. For an actor whose decision in a
        batch must count what was sent before it but waits behind the batch (a deadline
        that a queued message would move). Iterate without awaiting: the mailbox changes
        meanwhile. Empty until :func:`run_actor` runs the actor."""
        return iter(()) if self._waiting is None else self._waiting()

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
    borrow = actor.receive_batch if actor.lends_batches else None
    mailbox._on_crash = on_crash  # a crash in a sender's task is recorded there and then

    def waiting() -> Iterator[M]:
        for envelope in carry:
            yield envelope.message
        yield from mailbox.waiting()

    actor._waiting = waiting
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
                mailbox._borrow = borrow
                try:
                    more = await mailbox.wait()
                finally:
                    mailbox._inline = None
                    mailbox._borrow = None
                crash = mailbox.take_crash()
                if crash is not None:
                    raise crash  # on_crash was called when it happened (Mailbox._crashed)
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
