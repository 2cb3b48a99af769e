"""The command line: parsing, the commands, and their exit codes.

The readers (``status``, ``tasks``, ``task``, ``workers``, ``plans``, ``plan``,
``events``) ask the runtime that owns the database, through its socket, when it serves
one, and otherwise read the file through the read-only
:class:`~hive_orchestration.inspector.Inspector` (:mod:`.reader`): either way they work
while an app holds the database, and write nothing to it. Through the socket they also
show who is connected (``status``), and new events as the owner commits them (``events
--follow``, pushed). With ``--url`` (or ``$HIVE_ORCHESTRATION_URL``) they ask a runtime
served over TCP, on another machine, with a token, and open no file at all.
``worker`` (:mod:`.worker`) runs an agent's handler as workers of the runtime that owns
it; ``serve`` runs a runtime of its own and serves its message API (Unix socket, TCP)
until SIGTERM or SIGINT. Exit codes: 0 done, 1 not found or refused by the runtime (the
reason on stderr), 2 bad usage or input, 130 interrupted.

This module is the entry point: it parses (:mod:`.parser`), chooses the database or
server, and runs the command (:mod:`.read_commands`, :mod:`.serve_commands`,
:mod:`.db_commands`, :mod:`.worker`) on its event loop.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio

from .._loop import backend_options
from ..config import URL_ENV, choose_db_path
from ..errors import HiveError, InvalidInputError
from ..storage import open_store
from .db_commands import db_current, db_upgrade
from .output import RICH_MISSING, rich_available, silence_stdout
from .parser import build_parser
from .read_commands import POLL_INTERVAL, events, plan, plans, status, task, tasks, workers
from .serve_commands import dashboard, demo, serve
from .worker import run_worker

__all__ = ["POLL_INTERVAL", "build_parser", "main"]


_Handler = Callable[[argparse.Namespace], Awaitable[None]]


#: The commands that run until stopped, on an event loop of their own.
_LONG_RUNNERS = frozenset({"demo", "worker", "serve"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (``sys.exit(main())``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits: 2 for a usage error, 0 for --help
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "events" and not args.follow:
        bounds = [("--max-events", args.max_events), ("--for", args.duration)]
        unused = [name for name, value in bounds if value is not None]
        if unused:
            usage = f"{' and '.join(unused)} only bound --follow"
            print(f"hive-orchestration events: error: {usage}", file=sys.stderr)
            return 2
    try:
        if hasattr(args, "url"):
            args.url = _url(args)
        args.db = _database(args.db)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":
        handler: _Handler = demo
    elif args.command == "worker":
        handler = run_worker
    elif args.command == "serve":
        handler = serve
    elif args.command == "dashboard":
        handler = dashboard
    else:
        if args.command != "db" and not args.json and not rich_available():
            print(f"error: {RICH_MISSING}", file=sys.stderr)
            return 2
        handler = _HANDLERS[args.command if args.command != "db" else f"db {args.db_command}"]
    # The long runners own their loop for the life of the process: uvloop when installed.
    options = backend_options(args.backend) if args.command in _LONG_RUNNERS else {}
    try:
        anyio.run(handler, args, backend=args.backend, backend_options=options)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HiveError as exc:  # NotFoundError, StorageError...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from failing
        # again when it flushes stdout at exit.
        silence_stdout()
        return 1
    return 0


def _url(args: argparse.Namespace) -> str | None:
    """The server a reader asks: ``--url``, else ``$HIVE_ORCHESTRATION_URL`` unless
    ``--db`` names a file (as ``OrchestrationClient`` chooses)."""
    if args.url is not None:
        if args.db is not None:
            raise InvalidInputError("--url", "give --url or --db, not both")
        if not args.url.strip():
            raise InvalidInputError("--url", "must be a non-empty url (hives://HOST:PORT)")
        return str(args.url)
    if args.db is not None:
        return None
    value = os.environ.get(URL_ENV)
    if value is not None and not value.strip():
        raise InvalidInputError(URL_ENV, "is empty: unset it or name a server")
    return value


def _database(given: str | None) -> str:
    """The database a command uses, as an absolute path (a server's URL as it is given):
    ``--db``, else ``$HIVE_ORCHESTRATION_DB_PATH``, else the default (as ``Runtime.open``
    chooses), so that what the command names is the very file an app of this environment
    opens."""
    chosen, _ = choose_db_path(given)
    text = os.fspath(chosen)
    if not text.strip():
        raise InvalidInputError("--db", "must be a non-empty path")
    # Refused here (a ConfigError) if it names a store this installation does not have.
    store = open_store(text, field="--db")
    if text == ":memory:" or store.kind != "sqlite":
        return text  # a server's URL is no file to anchor to the working directory
    return str(Path(text).absolute())


_HANDLERS: dict[str, _Handler] = {
    "status": status,
    "tasks": tasks,
    "task": task,
    "workers": workers,
    "plans": plans,
    "plan": plan,
    "events": events,
    "db current": db_current,
    "db upgrade": db_upgrade,
}
