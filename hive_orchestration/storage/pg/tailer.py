"""The log tailer: what publishes every node's events to this node's subscribers.

Several runtimes (nodes) write one PostgreSQL database. Each numbers its events as it
commits (the counter row, ``sql.py``'s ``numbered_events``), so that the log is dense and
in commit order: a reader that sees number N + 1 sees N. But a node's storage actor only
knows its own commits, and its broadcast actor must hand subscribers every event once,
in seq order, with no gap (``events(after=)``'s replay-then-live relies on it). So on
PostgreSQL the storage actor hands its commits to this tailer (:meth:`committed`), and the
tailer publishes:

- **its own commit from memory, without a read**, when it is exactly next (the log's next
  number is its first): the common case, and all of it on a single node. The storage
  actor publishes it itself, in its turn (after the tailer's step in progress), before
  it answers the writers, as it does where it is the only writer; a commit that is not
  next is queued for the tailer;
- **the others' events read from the log** (``seq > published ORDER BY seq LIMIT n``,
  on a connection of its own) when its own commit is not next (the numbers between are
  other nodes' commits, committed before its own: the counter orders them), when another
  node says it committed (``NOTIFY hive_events``, sent in each commit that appends events,
  payload ``<origin>:<last seq>``, one per batch), and every :data:`POLL_SECONDS` in case a
  notification was lost (they are, while the listener is disconnected).

A hole in what it reads is an event retention deleted (a purged task's), never one not
yet committed: the counter makes a commit visible only after every lower number's.

**The listener** is a thread on a connection of its own (pg-design section 2: psycopg's
async mode runs on asyncio only), in ``notifies(timeout=1)``, handing the greatest number
of a burst of notifications to the event loop; it skips this node's own (the storage
actor told the tailer first-hand). Connection lost (a database restart): it reconnects
with a backoff, listens again and asks for one sweep of the log. To stop it, a flag plus a
``NOTIFY`` on a channel only this tailer listens on, which wakes it at once (a flag alone
waits out the timeout; ``cancel_safe()`` does not wake a thread waiting for
notifications).

Nothing here ever crashes the runtime on a database failure: a read that fails is retried
with a backoff (the storage actor's writers get the errors), and the own commits wait in
a bounded queue meanwhile (the storage actor waits when it is full).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import anyio
import anyio.from_thread
import anyio.to_thread
import psycopg

from ...messages.events import Event, Interest, Publish
from ..port import Publisher, QueueKey, ReadyNotified, StoreError
from ..rows import event_from_row
from .driver import PostgresDriver
from .sql import (
    EVENTS_CHANNEL,
    NOTICE_FIELDS,
    READY_CHANNEL,
    Kinds,
    parse_events_notice,
    parse_ready,
)

__all__ = ["POLL_SECONDS", "LogTailer"]

log = logging.getLogger("hive_orchestration.storage")

#: The safety poll: the log is read this often even without a notification.
POLL_SECONDS = 1.0
#: Events read from the log at a time (and published as one commit).
PAGE = 1000
#: Own commits waiting to be published before the storage actor waits.
_QUEUE = 256
#: Backoff of a failed read or a lost listener (doubling up to the second figure).
_RETRY = (0.05, 2.0)
#: Seconds the listener waits for notifications between looks at its stop flag.
_LISTEN_TIMEOUT = 1.0

_COLUMNS = "seq, type, timestamp, source, correlation_id, task_id, plan_id, worker_id, data"
_READ = f"SELECT {_COLUMNS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
_NO_BOUND = 2**62
#: The event fields a subscription may require (set), as columns.
_REQUIRABLE = frozenset({"source", "correlation_id", "task_id", "plan_id", "worker_id"})
_EVERYTHING = Interest(everything=True)


def wanted(interest: Interest, kinds: Kinds) -> bool:
    """Whether a commit of ``kinds`` (its notice's) may hold an event ``interest`` asks
    for: an event type it names, with the fields it requires set on some event of that
    type, or of a prefix it names; not said (None): it may."""
    if kinds is None or interest.everything:
        return True
    needed = dict(interest.types)
    for type_, letters in kinds:
        needs = needed.get(type_)
        if needs is not None and all(NOTICE_FIELDS.get(n, "?") in letters for n in needs):
            return True
        if any(type_.startswith(prefix) for prefix in interest.prefixes):
            return True
    return False


def read_sql(interest: Interest) -> tuple[str, tuple[object, ...]]:
    """The page read of the log, narrowed to what ``interest`` asks for: its text and the
    parameters after (seq >, seq <=), before LIMIT. Every event it leaves out goes to no
    subscriber of this node (a superset of what they match: broadcast.interest_of)."""
    if interest.everything:
        return _READ, ()
    terms: list[str] = []
    params: list[object] = []
    by_needs: dict[tuple[str, ...], list[str]] = {}
    for type_, needs in interest.types:
        by_needs.setdefault(tuple(n for n in needs if n in _REQUIRABLE), []).append(type_)
    for needs, types in sorted(by_needs.items()):
        terms.append(" AND ".join(["type = ANY(?)", *(f"{need} IS NOT NULL" for need in needs)]))
        params.append(types)
    for prefix in interest.prefixes:
        terms.append("starts_with(type, ?)")
        params.append(prefix)
    sql = (
        f"SELECT {_COLUMNS} FROM events WHERE seq > ? AND seq <= ? AND ({' OR '.join(terms)})"
        " ORDER BY seq LIMIT ?"
    )
    return sql, tuple(params)


def _entry(row: tuple[Any, ...]) -> tuple[Event, bytes]:
    return event_from_row(row), cast(str, row[-1]).encode()


class LogTailer:
    """The :class:`~hive_orchestration.storage.port.LogFeed` of a runtime on PostgreSQL
    (see the module). ``publish`` hands one commit's events to the broadcast actor."""

    def __init__(
        self,
        url: str,
        publish: Publisher,
        *,
        connect_timeout: float,
        poll: float = POLL_SECONDS,
        page: int = PAGE,
        ready: ReadyNotified | None = None,
        interest: Callable[[], Interest] | None = None,
    ) -> None:
        self.origin = uuid.uuid4().hex[:16]
        #: What this node's subscribers could match now (None: everything): only that is
        #: read of the other nodes' events; nothing at all while it is nothing.
        self._interest = interest
        #: Told the queues other nodes made tasks ready in (None: all), once per burst.
        self._ready = ready
        self._url = url
        self._publish = publish
        self._connect_timeout = connect_timeout
        self._poll = poll
        self._page = page
        #: The last seq published (None until the storage actor first opened the log).
        self._published: int | None = None
        self._handed = 0  # the last seq of the own commits handed over
        self._own: deque[Publish] = deque()
        self._hint = 0  # the greatest seq another node said it committed
        #: The other nodes' commits said and not yet passed, in seq order: (first, last,
        #: kinds), for moving past those no subscriber here could want without a read.
        self._notices: deque[tuple[int, int, Kinds]] = deque()
        #: Other nodes' commits moved past without a read (their notices said enough).
        self.skipped = 0
        self._sweep = False
        self._begun = anyio.Event()
        self._wake = anyio.Event()
        self._progress = anyio.Event()
        #: Who publishes now: the tailer, or the storage actor publishing its own commit
        #: that is next (one at a time, so that the order holds).
        self._turn = anyio.Lock()
        self._stop = threading.Event()
        self._stop_channel = f"hive_stop_{self.origin}"
        self._listen_delay = _RETRY[0]
        self._reader = PostgresDriver(
            url,
            application_name="hive-orchestration:tailer",
            connect_timeout=connect_timeout,
        )
        #: Reads of the log so far (a single node's own commits need none).
        self.reads = 0
        #: Listener connections opened so far (the first, then one per reconnection).
        self.listens = 0

    # -- the storage actor's side --------------------------------------------------------

    def begin(self, last_seq: int) -> None:
        if self._published is None:
            self._published = last_seq
            self._begun.set()

    async def committed(self, message: Publish) -> None:
        last = message.events[-1].seq
        self._handed = max(self._handed, last)
        if not self._own:
            # Its turn after the tailer's step in progress, if any (a read or a publish:
            # never a backoff, which the tailer waits out without the turn).
            async with self._turn:
                position = self._published
                if position is not None and last <= position:
                    return  # the tailer read it from the log meanwhile: published
                if position is not None and message.events[0].seq == position + 1:
                    # Next: published here, in the storage actor's task, before the
                    # writers are answered (as where it is the only writer).
                    await self._emit(message, last)
                    return
        # Behind other nodes' commits not yet read, or behind own ones still queued: the
        # tailer publishes it in turn.
        while len(self._own) >= _QUEUE:
            await self._progress.wait()
        self._own.append(message)
        self._wake.set()

    async def drain(self) -> None:
        while self._own or (self._published or 0) < self._handed:
            await self._progress.wait()

    # -- the service --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen)
                try:
                    await self._tail()
                finally:
                    # First of all, before the task group waits for the listener's thread.
                    self._stop.set()
                    with anyio.CancelScope(shield=True):
                        await self._wake_listener()
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.close()

    async def _tail(self) -> None:
        await self._begun.wait()
        delay = _RETRY[0]
        while True:
            # A new event before looking: a wake-up after the look is not lost.
            wake = self._wake = anyio.Event()
            try:
                async with self._turn:
                    busy = await self._step()
            except StoreError as exc:
                log.warning(
                    "event log tailer: cannot read the log (%s); again in %.2fs",
                    exc.fault or "error",
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, _RETRY[1])
                continue
            delay = _RETRY[0]
            if busy:
                continue
            with anyio.move_on_after(self._poll) as waited:
                await wake.wait()
            if waited.cancelled_caught:
                self._sweep = True

    async def _step(self) -> bool:
        """Publish what is known to be next; whether anything was to do."""
        if self._own:
            await self._own_commit(self._own[0])
            self._own.popleft()
            self._advanced()
            return True
        published = self._position()
        if self._hint > published or self._sweep:
            if not self._sweep and self._pass_unwanted() and self._hint <= self._position():
                return True  # all said: none of it wanted here
            hint, self._sweep = self._hint, False
            await self._catch_up(_NO_BOUND)
            # Notified after its commit: everything up to it is committed (and what was
            # not read of it, retention deleted, or nobody here wants).
            self._published = max(self._position(), hint)
            self._forget_notices()
            self._advanced()
            return True
        return False

    def _pass_unwanted(self) -> bool:
        """Move past the other nodes' commits that are next (the first just after the
        position, then the one after it...) whose notices say no subscriber here could
        want their events, without reading them; whether it moved. Only what follows the
        position without a gap: a number between is a commit not said yet (its notice on
        its way, this node's own, or one whose notice was lost), which only a read may
        pass (the counter orders notices as it orders commits)."""
        self._forget_notices()
        interest = _EVERYTHING if self._interest is None else self._interest()
        moved = False
        while self._notices:
            first, last, kinds = self._notices[0]
            if first != self._position() + 1 or wanted(interest, kinds):
                break
            self._notices.popleft()
            self._published = last
            self.skipped += 1
            moved = True
        if moved:
            self._advanced()
        return moved

    def _forget_notices(self) -> None:
        position = self._position()
        while self._notices and self._notices[0][1] <= position:
            self._notices.popleft()

    def _position(self) -> int:
        assert self._published is not None  # _tail waits for begin()
        return self._published

    async def _own_commit(self, message: Publish) -> None:
        events = message.events
        first, last = events[0].seq, events[-1].seq
        if last <= self._position():
            return  # read from the log already
        if first > self._position() + 1:
            self._pass_unwanted()
        if first > self._position() + 1:
            # Other nodes' commits (or a commit of ours whose outcome was lost) took the
            # numbers between: committed before ours, as the counter orders them.
            await self._catch_up(first - 1)
            self._published = max(self._position(), first - 1)
        skip = self._position() + 1 - first
        if skip > 0:
            message = Publish(events[skip:], message.data_json[skip:])
        await self._emit(message, last)

    async def _catch_up(self, through: int) -> None:
        """Publish the log's events after the position, up to ``through``, page by page:
        those this node's subscribers could match (the others go to nobody: they are
        passed over, unread, and the callers move the position past them)."""
        interest = _EVERYTHING if self._interest is None else self._interest()
        if interest.nothing:
            return
        sql, narrowed = read_sql(interest)
        while True:
            rows = await self._reader.fetchall(
                sql, (self._position(), through, *narrowed, self._page)
            )
            self.reads += 1
            if not rows:
                return
            entries = [_entry(row) for row in rows]
            events = tuple(event for event, _ in entries)
            await self._emit(Publish(events, tuple(data for _, data in entries)), events[-1].seq)
            if len(rows) < self._page:
                return

    async def _emit(self, message: Publish, last: int) -> None:
        await self._publish(message)
        self._published = last
        self._advanced()

    def _advanced(self) -> None:
        progress, self._progress = self._progress, anyio.Event()
        progress.set()

    # -- the listener -------------------------------------------------------------------

    async def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                await anyio.to_thread.run_sync(self._listen_thread)
            except (psycopg.Error, StoreError) as exc:
                if self._stop.is_set():
                    return
                delay = self._listen_delay
                self._listen_delay = min(delay * 2, _RETRY[1])
                log.warning(
                    "event log listener lost its connection (%s); again in %.2fs",
                    type(exc).__name__,
                    delay,
                )
                await anyio.sleep(delay)

    def _listen_thread(self) -> None:
        """In a worker thread: listen until stopped, or until the connection fails."""
        conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(
            self._url,
            autocommit=True,
            application_name="hive-orchestration:listener",
            connect_timeout=max(1, round(min(self._connect_timeout, 5.0))),
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        try:
            conn.execute(f"LISTEN {EVENTS_CHANNEL}")
            if self._ready is not None:
                conn.execute(f"LISTEN {READY_CHANNEL}")
            conn.execute(f"LISTEN {self._stop_channel}")
            anyio.from_thread.run_sync(self._listening)
            while not self._stop.is_set():
                said: list[tuple[int, int, Kinds]] = []
                # Coalesced: a burst's ready queues are told once (None: all of them).
                ready: set[QueueKey] | None = set()
                woken = False
                # The first notification (or the timeout), then whatever came with it.
                # (stop_after, not a break: a break drops the rest of the packet the
                # first came in, such as the other of a commit's two notices.)
                for timeout, stop in ((_LISTEN_TIMEOUT, 1), (0.0, None)):
                    for note in conn.notifies(timeout=timeout, stop_after=stop):
                        if note.channel == self._stop_channel:
                            return
                        if note.channel == READY_CHANNEL:
                            notice = parse_ready(note.payload)
                            if notice is not None and notice[0] != self.origin:
                                woken = True
                                if notice[1] is None or ready is None:
                                    ready = None
                                else:
                                    ready.update(notice[1])
                        else:
                            events = parse_events_notice(note.payload)
                            if events is not None and events[0] != self.origin:
                                said.append(events[1:])
                if self._stop.is_set():
                    break
                if woken:
                    told = None if ready is None else tuple(ready)
                    anyio.from_thread.run_sync(self._ready_notified, told)
                if said:
                    anyio.from_thread.run_sync(self._notified, said)
        finally:
            conn.close()

    def _listening(self) -> None:
        # Whatever was notified while there was no listener is read now.
        self.listens += 1
        self._listen_delay = _RETRY[0]
        self._sweep = True
        self._wake.set()
        if self.listens > 1:
            self._ready_notified(None)  # ready notices may have been lost: read them all

    def _ready_notified(self, queues: tuple[QueueKey, ...] | None) -> None:
        if self._ready is not None:
            self._ready(queues)

    def _notified(self, said: list[tuple[int, int, Kinds]]) -> None:
        """Other nodes' commits, in the order they committed (their notices' order)."""
        for last, first, kinds in said:
            if first and (not self._notices or self._notices[-1][1] < last):
                self._notices.append((first, last, kinds))
        seq = max(last for last, _, _ in said)
        if seq > self._hint:
            self._hint = seq
            self._wake.set()

    async def _wake_listener(self) -> None:
        # No server to send it through: the listener sees its flag within a second.
        with contextlib.suppress(StoreError):
            await self._reader.execute("SELECT pg_notify(?, '')", (self._stop_channel,))
