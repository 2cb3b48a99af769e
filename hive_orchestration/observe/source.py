"""Where the metrics and the dashboard read from: a :class:`~..cli.reader.Reader` (the
runtime that owns the database, through its socket or over TCP, or the file read-only),
and what only a runtime can say, wherever one answers (in its process, or through its
socket or TCP): its count of its queued tasks by type (``queue_depths``) and its own
figures (mailboxes, restarts, commits: ``statistics``, :meth:`Runtime.statistics`).

New events come from ``client.events(after=)`` when a runtime answers (pushed as it
commits them, caught up from the log after a lag), and from reading the log every
``POLL_INTERVAL`` when only the file does (nothing pushes then).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias

import anyio

from ..cli.reader import OwnerReader, Reader, open_reader
from ..messages.events import Event

if TYPE_CHECKING:
    from ..api.embedded import Runtime, RuntimeStatistics
    from ..remote.status import ServerStatus

__all__ = ["POLL_INTERVAL", "QueueDepths", "ServerFigures", "Source", "Statistics"]

#: The queued tasks by type: how many, and since when the longest-waiting one has been
#: claimable (``queue_depths`` of a runtime or of a client).
QueueDepths: TypeAlias = Callable[[], Awaitable[dict[str, tuple[int, datetime]]]]
#: The runtime's own figures (``statistics`` of a runtime or of a client).
Statistics: TypeAlias = Callable[[], Awaitable["RuntimeStatistics"]]
#: Its socket server's connections and budget (``server_status`` of a client).
ServerFigures: TypeAlias = Callable[[], Awaitable["ServerStatus"]]

#: How often the log is read for new events when no runtime pushes them (the file alone).
POLL_INTERVAL = 0.5
#: Events read from the file at once while following it.
_PAGE = 1000


class Source:
    """The reads of an observer, and its feed of new events."""

    def __init__(self, reader: Reader, runtime: Runtime | None = None) -> None:
        self.reader = reader
        #: The runtime, when the observer runs in its process: asked directly.
        self.runtime = runtime
        #: The operations the runtime behind a reader refused (an older version), by
        #: the reader they were asked through.
        self._refused: dict[str, Reader] = {}

    def _owner(self, op: str) -> OwnerReader | None:
        """The reader, if a runtime answers through it that did not refuse ``op``.
        Looked up at each use: the dashboard swaps the reader when the runtime it read
        stops."""
        reader = self.reader
        if isinstance(reader, OwnerReader) and self._refused.get(op) is not reader:
            return reader
        return None

    @property
    def queue_depths(self) -> QueueDepths | None:
        """The runtime's one aggregate count of its queued tasks by type, exact at any
        depth: in its process, or through its socket or TCP. None for the file alone (the
        read-only inspector), where a page of queued tasks is read instead."""
        if self.runtime is not None:
            return self.runtime.queue_depths
        owner = self._owner("queue_depths")
        return None if owner is None else owner.queue_depths

    @property
    def statistics(self) -> Statistics | None:
        """The runtime's own figures: in its process, or through its socket or TCP. None
        for the file alone, which has none, or a runtime that refused them."""
        if self.runtime is not None:
            return self.runtime.statistics
        owner = self._owner("statistics")
        return None if owner is None else owner.statistics

    @property
    def server_status(self) -> ServerFigures | None:
        """The runtime's socket server, as it says (its connections, what their requests
        hold of its budget). None for the file alone."""
        owner = self._owner("server_status")
        return None if owner is None else owner.server_status

    def refused(self, op: str) -> None:
        """The reader's runtime does not know ``op`` (an older version): not asked again
        of it (it will not learn it while connected)."""
        self._refused[op] = self.reader

    @classmethod
    def of_runtime(cls, runtime: Runtime, name: str = "observe") -> Source:
        """The source of a runtime of this process: its public operations, through a
        client of its own (as any agent's), and its queue depths and statistics asked
        of it directly."""
        client = runtime.client(source_agent=name)
        return cls(OwnerReader(client, name), runtime)

    @classmethod
    @asynccontextmanager
    async def open(cls, args: argparse.Namespace, name: str) -> AsyncIterator[Source]:
        """The source the command line names (``--db`` or ``--url``), for the block: the
        runtime that serves it if one does, else the file, read-only."""
        async with open_reader(args, name) as reader:
            yield cls(reader)

    async def follow(
        self,
        after: int,
        *,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """Every event after seq ``after`` that matches, in log order, then each new one
        as it comes, until cancelled (or, from a runtime, until it stops)."""
        filters: dict[str, str] = {
            name: value
            for name, value in (
                ("task_id", task_id),
                ("plan_id", plan_id),
                ("correlation_id", correlation_id),
            )
            if value is not None
        }
        if isinstance(self.reader, OwnerReader):
            stream = self.reader.client.events(after, pattern, buffer=None, **filters)
            async with stream:
                async for event in stream:
                    yield event
            return
        cursor = after
        while True:
            end = await self.reader.last_seq()
            batch = await self.reader.events(
                cursor,
                limit=_PAGE,
                pattern=pattern,
                task_id=task_id,
                plan_id=plan_id,
                correlation_id=correlation_id,
            )
            for event in batch:
                yield event
            if batch:
                cursor = batch[-1].seq
            if len(batch) < _PAGE:
                # Everything up to the log's end before the read was seen (the filters
                # skipped the rest): the next read starts there.
                cursor = max(cursor, end)
                await anyio.sleep(POLL_INTERVAL)
