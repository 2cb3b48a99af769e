"""The readers: ``status``, ``tasks``, ``task``, ``workers``, ``plans``, ``plan`` and
``events`` (with ``--follow``). Each asks the runtime that owns the database, through its
socket, when it serves one, and otherwise reads the file through the read-only
:class:`~hive_orchestration.inspector.Inspector` (:mod:`.reader`): either way they write
nothing. ``events --follow`` is pushed new events by a runtime that serves the file, and
polls the file while none does (:data:`POLL_INTERVAL`)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack

import anyio
import msgspec

from ..errors import ConnectionLostError
from ..inspector import Inspector
from ..messages.events import Event
from .output import print_json, show_answer
from .reader import OwnerReader, Reader, answer, owner_reader
from .report import OwnerView, plan_report, plan_summaries, status_report, task_report

__all__ = [
    "POLL_INTERVAL",
    "events",
    "follow",
    "plan",
    "plans",
    "status",
    "task",
    "tasks",
    "workers",
]


#: How often ``events --follow`` reads the log for new events while no runtime serves the
#: database (one that does pushes them through its socket). SQLite tells a reader nothing
#: when a writer commits, so without a runtime to ask, following is polling: one indexed
#: read from the last seq seen, 4 times a second, each time looking for an owner too.
POLL_INTERVAL = 0.25
#: Events read per poll; a backlog larger than this is read page by page without pause.
_PAGE = 1000


def _name(args: argparse.Namespace) -> str:
    """What the command calls itself on the owner's connection list."""
    return f"hive-orchestration {args.command}"


async def status(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        report = await status_report(reader)
        if isinstance(reader, OwnerReader):
            # Who is connected only the owner knows.
            status = await reader.server(_name(args))
            owner = OwnerView(
                pid=status.pid,
                address=status.address,
                clients=status.connections,
                held_bytes=status.held_bytes,
                max_held_bytes=status.max_held_bytes,
                held_back=status.held_back,
            )
            report = msgspec.structs.replace(report, owner=owner)
        return report

    show_answer(args, await answer(args, _name(args), ask), "render_status")


async def tasks(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await reader.tasks(args.status, task_type=args.task_type, limit=args.limit)

    show_answer(args, await answer(args, _name(args), ask), "render_tasks")


async def task(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await task_report(reader, args.task_id, events=args.events)

    show_answer(args, await answer(args, _name(args), ask), "render_task")


async def workers(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await reader.workers(args.status)

    show_answer(args, await answer(args, _name(args), ask), "render_workers")


async def plans(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await plan_summaries(reader, await reader.plans(args.status, limit=args.limit))

    show_answer(args, await answer(args, _name(args), ask), "render_plans")


async def plan(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await plan_report(reader, args.plan_id)

    show_answer(args, await answer(args, _name(args), ask), "render_plan")


async def events(args: argparse.Namespace) -> None:
    if args.follow:
        await follow(args)
        return

    async def ask(reader: Reader) -> object:
        if not args.limit:
            return []
        return await reader.events(
            args.after or 0,
            limit=args.limit,
            pattern=args.pattern,
            task_id=args.task_id,
            plan_id=args.plan_id,
            correlation_id=args.correlation_id,
            newest=args.after is None,
        )

    show_answer(args, await answer(args, _name(args), ask), "render_events")


async def follow(args: argparse.Namespace) -> None:
    """Print the backlog, then every new event that matches, until a bound is reached:
    pushed by the runtime that serves the database while one does, read from the file
    while none does (with ``--url``: from that server alone)."""
    if args.json:

        def emit(event: Event) -> None:
            print_json(event)

    else:
        from . import views

        out = views.console()

        def emit(event: Event) -> None:
            out.print(views.event_line(event))

    shown = 0

    def show(batch: Sequence[Event]) -> bool:
        """Print ``batch``; True once ``--max-events`` are out."""
        nonlocal shown
        for event in batch:
            emit(event)
            shown += 1
            if args.max_events is not None and shown >= args.max_events:
                return True
        return False

    async def read(reader: Reader, after: int, limit: int, *, newest: bool = False) -> list[Event]:
        return await reader.events(
            after,
            limit=limit,
            pattern=args.pattern,
            task_id=args.task_id,
            plan_id=args.plan_id,
            correlation_id=args.correlation_id,
            newest=newest,
        )

    filters = {
        name: value
        for name in ("task_id", "plan_id", "correlation_id")
        if (value := getattr(args, name)) is not None
    }
    name = "hive-orchestration events --follow"
    cursor: int | None = None
    inspector: Inspector | None = None
    with anyio.move_on_after(math.inf if args.duration is None else args.duration):
        async with AsyncExitStack() as files:
            while True:
                async with owner_reader(args, name) as owner:
                    reader: Reader
                    if owner is not None:
                        reader = owner
                    else:
                        if inspector is None:  # opened once, kept while no runtime serves
                            inspector = await files.enter_async_context(Inspector.open(args.db))
                        reader = inspector
                    if cursor is None:
                        if args.after is None:
                            # The log's end first, then the backlog: whatever is committed
                            # in between is in the backlog or after the cursor, never skipped.
                            cursor = await reader.last_seq()
                            backlog = (
                                await read(reader, 0, args.limit, newest=True) if args.limit else []
                            )
                            cursor = max([cursor, *(event.seq for event in backlog)])
                        else:
                            cursor, backlog = args.after, []
                        print(
                            f"following {shlex.quote(reader.path)} after seq {cursor}"
                            " (Ctrl-C to stop)",
                            file=sys.stderr,
                            flush=True,
                        )
                        if show(backlog):
                            return
                    if owner is not None:
                        # A runtime that serves the file pushes its events as it commits them.
                        stream = owner.client.events(after=cursor, pattern=args.pattern, **filters)
                        try:
                            async with stream:
                                async for event in stream:  # ends when the owner stops
                                    if show([event]):
                                        return
                        except ConnectionLostError:
                            if args.url is not None:
                                raise
                            # killed: read the file until a runtime serves it again
                        cursor = max(cursor, stream.last_seq)
                        continue
                # Nothing pushes: read the log, and look for an owner again.
                assert inspector is not None
                end = await inspector.last_seq()
                batch = await read(inspector, cursor, _PAGE)
                if show(batch):
                    return
                if batch:
                    cursor = batch[-1].seq
                if len(batch) < _PAGE:
                    # Every event up to the log's end before the read has been seen (the
                    # filters skipped the others): the next read starts there.
                    cursor = max(cursor, end)
                    await anyio.sleep(POLL_INTERVAL)
