"""The bytes a :class:`~.server.Server` holds for all its connections' requests at once
(``RuntimeConfig.max_held_bytes``): one budget the connections take from before they read
or run a call, and give back as it ends.

Each connection is bounded alone (its frames, its calls in flight and what they hold:
:mod:`.connection`), but ``max_connections`` of them together could hold hundreds of
gigabytes. A call is charged what its connection is charged for it
(:func:`..api.wire.held_by` of its frame's size: the frame's bytes and the most they may
decode into), before the body of a large frame is read and before any call runs; a
connection that wants more than is left waits (its socket is not read meanwhile:
backpressure), and calls already running are never failed for it.

Waiting is first come, first served: a request that is first in line is granted before
any after it, even one that would fit now, so a large request is never passed over for
ever by a stream of small ones. Every holder gives its share back in a bounded time,
and any one request fits in the whole budget (the server checks ``max_held_bytes``
against ``max_frame_bytes`` as it starts), so whoever waits is served.

A call that waits for what other clients do (:data:`..api.carried.WAITING`: a claim
with ``wait``) may wait for ever, and the calls that would end its wait may need room to
be read. As it starts waiting it keeps what its checked arguments may hold (its share,
at most :data:`WAITING_SHARE`) only while the waiting calls' shares together fit in
``waiting_room``: what is left of the budget once one call of the largest frame and
``max_connections`` connections' shares are set aside. Past that it gives its share
back (its arguments are then outside the budget, a few KB each, at most
``max_calls_in_flight`` such calls a connection).

Each connection also holds :data:`CONNECTION_BYTES` of it for as long as it is open
(what reading its socket may hold), taken as it is admitted, before its hello is read:
past those who wait if it fits (a new connection is not held up by a large request in
line), else in line. Those are the only shares not given back in a bounded time, so the
server checks that ``max_connections`` of them leave room for one call of
``max_frame_bytes``: whoever waits is still served.
"""

from __future__ import annotations

from collections import deque

import anyio
import msgspec

__all__ = ["CONNECTION_BYTES", "WAITING_SHARE", "Budget", "BudgetStatistics", "Ticket"]

#: What one connection holds of the budget while it is open: what reading its socket may
#: hold besides the frames counted as calls. On asyncio the event loop reads up to
#: 256 KiB at a time, of which the frame reader takes 64 KiB chunks (a copy: the rest
#: waits in the stream); under trio, a 64 KiB chunk. A chunk read through is let go
#: (FrameReader._receive), so an idle connection holds far less.
CONNECTION_BYTES = 256 * 1024
#: The most a waiting call keeps of its share: what the checked arguments of a waiting
#: operation may hold (a claim naming 256 task types of 256 characters: some 80 KB).
WAITING_SHARE = 128 * 1024


class BudgetStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The server's budget now (``ServerStatus`` and the metrics carry it)."""

    #: What the budget allows (``max_held_bytes``), and what is taken from it now.
    capacity: int
    held: int
    #: The most that was ever held at once since the server started.
    peak: int
    #: Connections waiting in line for a share, and what they wait for in all.
    waiting: int
    waiting_bytes: int
    #: What calls waiting for other clients keep of it (within ``waiting_room``).
    kept: int = 0


class Ticket:
    """A place in the line: ``granted`` is set once its ``amount`` is taken for it."""

    __slots__ = ("amount", "granted")

    def __init__(self, amount: int, granted: anyio.Event) -> None:
        self.amount = amount
        self.granted = granted


class Budget:
    """Bytes taken and given back, at most ``capacity`` at once, waiters served in order.

    Not thread-safe: used from the server's event loop only."""

    def __init__(self, capacity: int, waiting_room: int = 0) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0
        #: The most waiting calls may keep in all (see the module's docstring).
        self.waiting_room = waiting_room
        self.kept = 0
        self._line: deque[Ticket] = deque()

    def try_take(self, amount: int) -> bool:
        """Take ``amount`` if it fits and nobody waits before it (no await: the way
        nearly every call takes its share)."""
        if self._line or self.held + amount > self.capacity:
            return False
        self.held += amount
        if self.held > self.peak:
            self.peak = self.held
        return True

    def take_past_line(self, amount: int) -> bool:
        """Take ``amount`` if it fits, even past those who wait: a connection's share
        (:data:`CONNECTION_BYTES`). It cannot keep one who waits out for ever: at most
        ``max_connections`` such shares are held, and the server checks that they leave
        room for the largest call."""
        if self.held + amount > self.capacity:
            return False
        self.held += amount
        if self.held > self.peak:
            self.peak = self.held
        return True

    def queue(self, amount: int) -> Ticket:
        """Join the line for ``amount``: the ticket is granted as soon as everyone
        before it was and ``amount`` fits. The caller must :meth:`withdraw` it if it
        stops waiting (cancelled), granted or not."""
        ticket = Ticket(amount, anyio.Event())
        self._line.append(ticket)
        self._grant()
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """Leave the line: what was granted to the ticket is given back, and a ticket
        still waiting is taken out (those behind it may fit now)."""
        if ticket.granted.is_set():
            self.give(ticket.amount)
            return
        try:
            self._line.remove(ticket)
        except ValueError:  # pragma: no cover - a ticket is in the line until granted
            return
        self._grant()

    def give(self, amount: int) -> None:
        """Give back ``amount`` taken before; the next in line get theirs."""
        self.held -= amount
        if self._line:
            self._grant()

    def keep(self, share: int) -> int:
        """A call taken ``share`` for starts waiting: it keeps at most
        :data:`WAITING_SHARE` of it if the waiting calls' shares fit in
        ``waiting_room`` (what it kept is returned, else 0), and gives back the rest."""
        kept = share if share < WAITING_SHARE else WAITING_SHARE
        if self.kept + kept > self.waiting_room:
            kept = 0
        self.kept += kept
        self.held -= share - kept
        if self._line:
            self._grant()
        return kept

    def unkeep(self, amount: int) -> None:
        """A waiting call that kept ``amount`` ended: given back."""
        self.kept -= amount
        self.give(amount)

    def _grant(self) -> None:
        line = self._line
        while line and self.held + line[0].amount <= self.capacity:
            ticket = line.popleft()
            self.held += ticket.amount
            ticket.granted.set()
        if self.held > self.peak:
            self.peak = self.held

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            capacity=self.capacity,
            held=self.held,
            peak=self.peak,
            waiting=len(self._line),
            waiting_bytes=sum(ticket.amount for ticket in self._line),
            kept=self.kept,
        )
