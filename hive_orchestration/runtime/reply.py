"""A message's answer: :class:`Request` (a message answered with a typed value), the
one-shot :class:`Reply` slot its asker waits on, and the :class:`Envelope` that carries
a message and its slot through a mailbox.

Every envelope that carries a reply slot is answered exactly once, and answering never
blocks and never raises, so an asker that went away cannot hurt the actor. Separate from
the mailbox and the actor loop: both rely on these rules, and neither needs the other's.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

import anyio
import msgspec

from ..errors import RuntimeStoppedError

__all__ = ["Envelope", "Reply", "Request"]

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

    __slots__ = ("_done", "_error", "_event", "_give_back", "_taken", "_value")

    def __init__(self, event: anyio.Event | None = None) -> None:
        self._event = anyio.Event() if event is None else event
        self._value: R | None = None
        self._error: BaseException | None = None
        self._give_back: object = None
        self._taken = False
        # Answered: the event's state, kept here too because it is read far more often
        # than it changes (the event's own is_set is two calls through anyio's wrapper).
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, value: R, give_back: object = None) -> bool:
        if self._done:
            return False
        self._done = True
        self._value = value
        self._give_back = give_back
        self._event.set()
        return True

    def fail(self, error: BaseException) -> bool:
        if self._done:
            return False
        self._done = True
        self._error = error
        self._event.set()
        return True

    async def settled(self) -> None:
        """Wait until the slot is answered, without taking the answer (:meth:`wait`
        takes it)."""
        await self._event.wait()

    async def wait(self) -> R:
        await self._event.wait()
        # No checkpoint from here to the asker's hands: the value is received.
        self._taken = True
        if self._error is not None:
            # Raised afresh at the asker's call: the frames of the actor that made the
            # error say nothing the caller can act on (its __cause__, if any, is kept).
            raise self._error.with_traceback(None)
        return cast(R, self._value)

    def take(self) -> R:
        """The answer of a slot already answered (:attr:`done`), as :meth:`wait` gives
        it, without waiting (nor yielding to the event loop)."""
        assert self._done
        self._taken = True
        if self._error is not None:
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
