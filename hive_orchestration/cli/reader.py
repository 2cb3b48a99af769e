"""Where the read-only commands get their answers: the runtime that owns the database,
or the file.

The reports (:mod:`.report`) ask a :class:`Reader`: the few typed reads they need. Two
things answer them:

- :class:`OwnerReader`, a client of the runtime that owns the database: through its Unix
  socket when it serves one (found beside its lock), or over TCP with ``--url`` (on
  another machine, with a token). Its answers are the runtime's own, what only it knows
  included (heartbeats not yet written), and no file is opened.
- :class:`~hive_orchestration.inspector.Inspector`, which reads the file read-only, when
  no runtime serves it.

:func:`answer` picks one for a command and asks it; a socket that breaks in the middle
(its owner stopped) sends the question to the file instead. With ``--url`` there is no
file to fall back on: a refusal or a lost server is the command's error.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Protocol, TypeVar

import anyio

from .._validate import MAX_READ
from ..api.client import OrchestrationClient
from ..api.embedded import RuntimeStatistics
from ..config import TLS_CA_ENV, TOKEN_ENV
from ..errors import ConnectionLostError
from ..inspector import Inspector
from ..messages.events import Event
from ..messages.plans import ExecutionPlan, PlanProgress, PlanStatus, SubtaskState
from ..messages.tasks import Run, Task, TaskStatus
from ..messages.workers import Worker, WorkerStatus
from ..remote.client import RemoteRuntime
from ..remote.status import ServerStatus
from .owner import connected

__all__ = ["OwnerReader", "Reader", "answer", "open_reader", "owner_reader"]

T = TypeVar("T")

#: The first stretch of the log that a read of the newest events looks into, in seqs;
#: each further stretch, further back, is 4 times as long (see OwnerReader.events).
_WINDOW = 1024
#: Tasks of a plan read at once, for their statuses (calls pipelined on one connection).
_AT_ONCE = 32


class Reader(Protocol):
    """The reads of the commands' reports, each one bounded: what the
    :class:`~hive_orchestration.inspector.Inspector` answers from the file and
    :class:`OwnerReader` from the runtime that owns it."""

    @property
    def path(self) -> str: ...

    async def schema_version(self) -> int: ...

    async def last_seq(self) -> int: ...

    async def task_counts(self) -> dict[str, int]: ...

    async def tasks(
        self,
        status: TaskStatus | str | None = None,
        *,
        task_type: str | None = None,
        limit: int = 100,
    ) -> list[Task]: ...

    async def task(self, task_id: str) -> Task | None: ...

    async def runs(self, task_id: str) -> list[Run]: ...

    async def workers(self, status: WorkerStatus | str | None = None) -> list[Worker]: ...

    async def plans(
        self, status: PlanStatus | str | None = None, *, limit: int = 100
    ) -> list[ExecutionPlan]: ...

    async def plan(self, plan_id: str) -> ExecutionPlan | None: ...

    async def plan_subtasks(self, plan_id: str) -> list[SubtaskState]: ...

    async def plan_task_statuses(self, plan_id: str) -> dict[str, TaskStatus]: ...

    async def plan_progress(self, plan_id: str) -> PlanProgress: ...

    async def events(
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
        newest: bool = False,
    ) -> list[Event]: ...


class OwnerReader:
    """The reports' reads, asked of the runtime that owns the database through a client
    of it (its socket, or TCP): public operations only, so an ``agent`` token may make
    them all (they are reads, docs/SERVING.md)."""

    def __init__(self, client: OrchestrationClient, name: str) -> None:
        self.client = client
        #: What this command calls itself on the connection (to leave itself out of
        #: the list of connected clients).
        self.name = name
        self._status: ServerStatus | None = None

    @property
    def path(self) -> str:
        """The database the owner holds, as it says (on another machine: its path
        there)."""
        return self.client.db_path

    async def server_status(self) -> ServerStatus:
        self._status = await self.client.server_status()
        return self._status

    async def schema_version(self) -> int:
        status = self._status or await self.server_status()
        return status.schema_version

    async def last_seq(self) -> int:
        return await self.client.last_seq()

    async def task_counts(self) -> dict[str, int]:
        return await self.client.count_tasks()

    async def queue_depths(self) -> dict[str, tuple[int, datetime]]:
        """The owner's one aggregate count of its queued tasks by type (not a read the
        file alone answers: the exporter reads a page of queued tasks there)."""
        return await self.client.queue_depths()

    async def statistics(self) -> RuntimeStatistics:
        """The owner's own figures (mailboxes, restarts, commits, deliveries): what only
        a runtime can say, the file alone does not."""
        return await self.client.statistics()

    async def tasks(
        self,
        status: TaskStatus | str | None = None,
        *,
        task_type: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        return await self.client.list_tasks(status, task_type=task_type, limit=limit)

    async def task(self, task_id: str) -> Task | None:
        return await self.client.get_task(task_id)

    async def runs(self, task_id: str) -> list[Run]:
        return await self.client.get_runs(task_id)

    async def workers(self, status: WorkerStatus | str | None = None) -> list[Worker]:
        return await self.client.list_workers(status)

    async def plans(
        self, status: PlanStatus | str | None = None, *, limit: int = 100
    ) -> list[ExecutionPlan]:
        return await self.client.get_execution_plans(status, limit=limit)

    async def plan(self, plan_id: str) -> ExecutionPlan | None:
        return await self.client.get_execution_plan(plan_id)

    async def plan_subtasks(self, plan_id: str) -> list[SubtaskState]:
        return await self.client.get_plan_subtasks(plan_id)

    async def plan_task_statuses(self, plan_id: str) -> dict[str, TaskStatus]:
        """The status of the task of each subtask that has one: each task read by id (a
        few calls in flight at once on the one connection)."""
        pending = deque(
            (state.subtask_id, state.task_id)
            for state in await self.client.get_plan_subtasks(plan_id)
            if state.task_id is not None
        )
        found: dict[str, TaskStatus] = {}

        async def read() -> None:
            while pending:
                subtask_id, task_id = pending.popleft()
                task = await self.client.get_task(task_id)
                if task is not None:  # deleted since: as the file shows it, without one
                    found[subtask_id] = task.status

        async with anyio.create_task_group() as group:
            for _ in range(min(_AT_ONCE, len(pending))):
                group.start_soon(read)
        return found

    async def plan_progress(self, plan_id: str) -> PlanProgress:
        return await self.client.get_plan_progress(plan_id)

    async def events(
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
        newest: bool = False,
    ) -> list[Event]:
        """As :meth:`Inspector.events`. The owner reads the log forward only
        (``read_events``); the newest ``limit`` are found by reading stretches of the log
        backwards from its end, each 4 times as long as the last, until enough are found
        or the log's start is reached: a few reads for a common filter, about log4(N)
        for a rare one, and never more than ``limit`` events kept."""

        async def read(after: int, limit: int) -> list[Event]:
            return await self.client.read_events(
                after,
                limit=limit,
                pattern=pattern,
                task_id=task_id,
                plan_id=plan_id,
                correlation_id=correlation_id,
            )

        if not newest:
            return await read(after, limit)
        end = await self.client.last_seq()  # the log as it is now: later events are not
        found: deque[Event] = deque(maxlen=limit)  # newest last
        width = max(limit, _WINDOW)
        while end > after and len(found) < limit:
            start = max(after, end - width)
            stretch: deque[Event] = deque(maxlen=limit - len(found))
            cursor = start
            while True:
                page = await read(cursor, MAX_READ)
                inside = [event for event in page if event.seq <= end]
                stretch.extend(inside)
                if len(inside) < len(page) or len(page) < MAX_READ:
                    break
                cursor = page[-1].seq
            found.extendleft(reversed(stretch))
            end = start
            width *= 4
        return list(found)

    async def server(self, name: str) -> ServerStatus:
        """The owner's status, this command's own connection left out."""
        status = await self.server_status()
        here = os.getpid()
        # Over TCP the server knows no pid of its clients: this command is its newest
        # connection of this name.
        mine = [c for c in status.connections if c.name == name and c.pid in (here, None)]
        skip = max(mine, key=lambda c: c.id).id if mine else None
        return ServerStatus(
            pid=status.pid,
            db_path=status.db_path,
            schema_version=status.schema_version,
            address=status.address,
            connections=[c for c in status.connections if c.id != skip],
        )


def _url(args: argparse.Namespace) -> str | None:
    return getattr(args, "url", None)


@asynccontextmanager
async def owner_reader(args: argparse.Namespace, name: str) -> AsyncIterator[OwnerReader | None]:
    """A reader of the runtime the command names: the one at ``--url`` (its refusal or
    absence raised), else the one that owns ``--db`` through its socket (None if no
    runtime serves it)."""
    url = _url(args)
    if url is not None:
        token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
        tls_ca = args.tls_ca if args.tls_ca is not None else os.environ.get(TLS_CA_ENV)
        # The connection's name is only a label (an agent token's calls are its
        # identity's whatever it says): the command's name, as on the socket.
        async with RemoteRuntime.connect_url(
            url, token=token or None, tls_ca=tls_ca or None, name=name
        ) as remote:
            client = OrchestrationClient._bound(remote, source_agent=None, correlation_id=None)
            yield OwnerReader(client, name)
        return
    async with connected(args.db, name) as local:
        yield None if local is None else OwnerReader(local, name)


@asynccontextmanager
async def open_reader(args: argparse.Namespace, name: str) -> AsyncIterator[Reader]:
    """The runtime that owns the database if one serves it (or the one at ``--url``),
    else the file, read-only."""
    async with AsyncExitStack() as stack:
        reader: Reader | None = await stack.enter_async_context(owner_reader(args, name))
        if reader is None:
            reader = await stack.enter_async_context(Inspector.open(args.db))
        yield reader


async def answer(args: argparse.Namespace, name: str, ask: Callable[[Reader], Awaitable[T]]) -> T:
    """``ask`` of the runtime that serves the database, or of the file. If the owner goes
    away as it answers, the file is asked instead (once: a runtime that serves it again
    is asked then)."""
    try:
        async with open_reader(args, name) as reader:
            return await ask(reader)
    except ConnectionLostError:
        if _url(args) is not None:
            raise
    async with open_reader(args, name) as reader:
        return await ask(reader)
