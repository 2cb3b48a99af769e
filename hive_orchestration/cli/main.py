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
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from .._loop import backend_options
from .._validate import MAX_READ
from ..api.embedded import Runtime
from ..config import (
    DB_PATH_ENV,
    DEFAULT_DB_PATH,
    TLS_CA_ENV,
    TOKEN_ENV,
    URL_ENV,
    RuntimeConfig,
    choose_db_path,
)
from ..errors import (
    ConnectionLostError,
    HiveError,
    InvalidInputError,
    NewerSchemaError,
    StorageError,
)
from ..inspector import Inspector
from ..messages.events import Event
from ..messages.plans import PlanStatus
from ..messages.tasks import TaskStatus
from ..messages.workers import WorkerStatus
from ..storage import SCHEMA_VERSION, open_store
from .demo import run_demo
from .reader import OwnerReader, Reader, answer, owner_reader
from .report import OwnerView, plan_report, plan_summaries, status_report, task_report
from .worker import MAX_CONCURRENCY, run_worker

__all__ = ["POLL_INTERVAL", "build_parser", "main"]

#: How often ``events --follow`` reads the log for new events while no runtime serves the
#: database (one that does pushes them through its socket). SQLite tells a reader nothing
#: when a writer commits, so without a runtime to ask, following is polling: one indexed
#: read from the last seq seen, 4 times a second, each time looking for an owner too.
POLL_INTERVAL = 0.25
#: Events read per poll; a backlog larger than this is read page by page without pause.
_PAGE = 1000

RICH_MISSING = (
    "this command draws tables with rich, which is not installed:"
    " pip install 'hive-orchestration[cli]' (or add --json for machine-readable output)"
)

_Handler = Callable[[argparse.Namespace], Awaitable[None]]


# -- argument types ----------------------------------------------------------------------


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not minimum <= value <= MAX_READ:
            raise argparse.ArgumentTypeError(
                f"must be between {minimum} and {MAX_READ}, got {value}"
            )
        return value

    return parse


def _bounded(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be between {minimum} and {maximum}, got {value}"
            )
        return value

    return parse


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


# -- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hive-orchestration",
        description="Run the demo, look into a hive-orchestration database even while "
        "an app is using it (read-only: nothing is written), or run workers for it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        help=f"database file (default: ${DB_PATH_ENV} if set, else {DEFAULT_DB_PATH}; shown"
        " as an absolute path)",
    )
    common.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    shown = argparse.ArgumentParser(add_help=False)
    shown.add_argument(
        "--json", action="store_true", help="print JSON instead of tables (needs no extra)"
    )
    both = [common, shown]
    remote = argparse.ArgumentParser(add_help=False)
    served = remote.add_argument_group(
        "a runtime served over TCP (instead of --db; docs/SERVING.md)"
    )
    served.add_argument(
        "--url",
        metavar="URL",
        help=f"hives://HOST:PORT (TLS) or hive://127.0.0.1:PORT (loopback): ask the runtime"
        f" served there (default: ${URL_ENV} if set and --db is not given)",
    )
    served.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"its token (default: ${TOKEN_ENV}; prefer it, as other users can read a"
        " --token in ps); an agent token may read",
    )
    served.add_argument(
        "--tls-ca",
        metavar="PEM",
        help=f"the authorities to check its certificate against (default: ${TLS_CA_ENV},"
        " else the system's)",
    )
    readers = [common, shown, remote]

    commands.add_parser(
        "demo", parents=[common], help="run the embedded runtime on a local SQLite file"
    )
    commands.add_parser(
        "status", parents=readers, help="task counts by status, active workers, executing plans"
    )

    tasks = commands.add_parser("tasks", parents=readers, help="list tasks, newest first")
    tasks.add_argument("--status", choices=[*dict.fromkeys(s.value for s in TaskStatus)])
    tasks.add_argument("--type", dest="task_type", metavar="TYPE", help="only this task type")
    tasks.add_argument("--limit", type=_count(1), default=50, help="at most N (default 50)")

    task = commands.add_parser("task", parents=readers, help="one task with its runs and events")
    task.add_argument("task_id", metavar="ID")
    task.add_argument(
        "--events", type=_count(1), default=50, help="its newest N events (default 50)"
    )

    workers = commands.add_parser("workers", parents=readers, help="registered workers")
    workers.add_argument("--status", choices=[s.value for s in WorkerStatus])

    plans = commands.add_parser("plans", parents=readers, help="execution plans, newest first")
    plans.add_argument("--status", choices=[s.value for s in PlanStatus])
    plans.add_argument("--limit", type=_count(1), default=50, help="at most N (default 50)")

    plan = commands.add_parser(
        "plan", parents=readers, help="one plan: its DAG in dependency layers, and its progress"
    )
    plan.add_argument("plan_id", metavar="ID")

    events = commands.add_parser(
        "events",
        parents=readers,
        help="the event log: the newest events, or those after a seq; --follow for new ones",
        description="Without --after: the newest --limit events that match; with --after "
        "SEQ: the first --limit events after SEQ. With --follow, --after SEQ prints every "
        "event after SEQ (without it, the newest --limit), then goes on printing new events "
        "as they are written (pushed by the runtime that owns the database, through its "
        "socket, or by the one at --url; read from the file 4 times a second while none "
        "serves it) until Ctrl-C, "
        "--max-events or --for; with --json, one JSON object per line.",
    )
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument(
        "--pattern", default="*", metavar="GLOB", help="event types to show ('task.*')"
    )
    events.add_argument("--after", type=_seq, metavar="SEQ", help="events after this seq")
    events.add_argument("--task", dest="task_id", metavar="ID", help="events of this task")
    events.add_argument("--plan", dest="plan_id", metavar="ID", help="events of this plan")
    events.add_argument("--correlation", dest="correlation_id", metavar="ID")
    events.add_argument(
        "--limit",
        type=_count(0),
        default=50,
        help="at most N events (with --follow: N events of backlog first; default 50)",
    )
    events.add_argument(
        "--max-events", type=_count(1), metavar="N", help="with --follow: stop after N events"
    )
    events.add_argument(
        "--for",
        dest="duration",
        type=_seconds,
        metavar="SECONDS",
        help="with --follow: stop after SECONDS",
    )

    _worker_parser(commands, common)
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the runtime and serve its message API (Unix socket, TCP) until stopped",
        description="Open the database (as an app would: the runtime is this process's) and"
        " serve its message API on its Unix socket, and on every --listen tcp://HOST:PORT,"
        " until SIGTERM or SIGINT; then stop cleanly (clients are told, calls in flight"
        " finish). Prints one JSON line once serving: the database, the pid and the"
        " addresses clients connect to (a port 0 replaced by the one bound). Off loopback,"
        " TCP needs --tls-cert and --tls-key; every TCP client needs a token of --tokens"
        " (docs/SERVING.md). The other settings come from HIVE_ORCHESTRATION_* variables.",
    )
    serve.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="tcp://HOST:PORT to serve on too (repeatable; 'unix' or none: the socket alone)",
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="the server's certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--tokens", metavar="FILE", help="tokens of TCP clients (TOML, or .json): identity, role"
    )
    serve.add_argument(
        "--max-connections", type=_count(1), metavar="N", help="connections at once (1024)"
    )
    serve.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="serve the web dashboard and /metrics there too (extra 'dashboard'; off"
        " loopback it needs $HIVE_ORCHESTRATION_DASHBOARD_TOKEN)",
    )

    dashboard = commands.add_parser(
        "dashboard",
        parents=[common, remote],
        help="a read-only web dashboard of the database (and /metrics), until stopped",
        description="Serve a web dashboard (overview, queues, workers, tasks, plans drawn"
        " live, the event tail) and Prometheus /metrics for --db (its runtime through its"
        " socket if one serves it, else the file) or --url. It only reads. Loopback by"
        " default; another --host needs $HIVE_ORCHESTRATION_DASHBOARD_TOKEN, which a"
        " browser gives once as ?token=TOKEN and a scraper as 'Authorization: Bearer'."
        " Needs the 'dashboard' extra.",
    )
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    dashboard.add_argument(
        "--port", type=_bounded(0, 65535), default=7734, help="port (default 7734; 0: any free one)"
    )

    db = commands.add_parser("db", help="the database's schema version, and migrating it")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser(
        "current", parents=both, help="the file's schema version against this package's"
    )
    db_commands.add_parser(
        "upgrade",
        parents=both,
        help="migrate the file to this package's schema (the app using it must be stopped)",
    )
    return parser


def _worker_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    worker = commands.add_parser(
        "worker",
        parents=[common],
        help="run an agent's handler as workers in this process, until SIGTERM",
        description="Import HANDLER from MODULE (an async function of a TaskContext, as "
        "AgentRunner runs) and run --concurrency copies of it as workers of the runtime "
        "that owns --db (through its socket; if no process owns it, this one opens it). "
        "They register, heartbeat, claim, run and report on one connection: if it breaks, "
        "the runtime requeues their tasks at once. SIGTERM or Ctrl-C drains: in-flight "
        "handlers get --drain-timeout seconds, the rest go back to the queue uncounted; "
        "exit 0. Exit 1 if the runtime goes away, 2 for a bad MODULE:HANDLER or MODULE:CLASS.",
    )
    worker.add_argument("handler", metavar="MODULE:HANDLER", help="e.g. myapp.agents:deploy")
    worker.add_argument(
        "--concurrency",
        type=_bounded(1, MAX_CONCURRENCY),
        default=1,
        metavar="N",
        help="copies of the handler, each a worker taking one task at a time (default 1)",
    )
    worker.add_argument(
        "--task-types",
        nargs="+",
        metavar="TYPE",
        help="the task types (capabilities) its workers take (default: the agent type)",
    )
    worker.add_argument(
        "--agent-type",
        metavar="TYPE",
        help="the role its workers register with (default: the handler's name)",
    )
    worker.add_argument(
        "--worker-id",
        metavar="PREFIX",
        help="its workers are PREFIX-1 .. PREFIX-N (default: AGENT_TYPE-HOST-PID; give each"
        " process its own: a worker registering under a live worker's id replaces it)",
    )
    worker.add_argument(
        "--lease",
        type=_seconds,
        metavar="SECONDS",
        help="the lease of each claim (default: the runtime's lease_timeout)",
    )
    worker.add_argument(
        "--retry-on",
        nargs="+",
        action="extend",
        metavar="MODULE:CLASS",
        help="retry only a handler's exceptions of these classes (and subclasses), as "
        "'myapp.errors:Transient' or a builtin's name ('TimeoutError'); any other fails "
        "the task at once (default: every exception is retried while attempts remain)",
    )
    worker.add_argument(
        "--fail-on",
        nargs="+",
        action="extend",
        metavar="MODULE:CLASS",
        help="fail the task at once, never retried, on these exception classes (wins "
        "over --retry-on)",
    )
    worker.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight handlers may take to finish (default 10)",
    )
    worker.add_argument(
        "--trace",
        action="store_true",
        help="each run is an OpenTelemetry span continuing the trace that created its task"
        " (extra otel; spans go to the global tracer provider, which the handler's module or"
        " `opentelemetry-instrument` sets up)",
    )
    worker.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="the package's log on stderr (default warning)",
    )


# -- entry point -------------------------------------------------------------------------


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
        handler: _Handler = _demo
    elif args.command == "worker":
        handler = run_worker
    elif args.command == "serve":
        handler = _serve
    elif args.command == "dashboard":
        handler = _dashboard
    else:
        if args.command != "db" and not args.json and not _rich_available():
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
        _silence_stdout()
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


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _print_json(value: object) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode())
    sys.stdout.write("\n")
    sys.stdout.flush()


# -- the commands ------------------------------------------------------------------------


def _show(args: argparse.Namespace, value: object, render: str) -> None:
    """Print ``value`` as JSON, or as a table with ``views.<render>`` (imported only then:
    it needs rich)."""
    if args.json:
        _print_json(value)
        return
    from . import views

    getattr(views, render)(views.console(), value)


async def _demo(args: argparse.Namespace) -> None:
    await run_demo(args.db)


DASHBOARD_MISSING = (
    "the dashboard needs Starlette, Hypercorn and prometheus-client:"
    " pip install 'hive-orchestration[dashboard]'"
)


def _observe() -> Any:
    """The dashboard's module (imported only by the commands that serve it)."""
    try:
        from ..observe import command
    except ImportError as exc:
        raise InvalidInputError("dashboard", f"{DASHBOARD_MISSING} ({exc})") from exc
    return command


async def _dashboard(args: argparse.Namespace) -> None:
    await _observe().run_dashboard(args)


async def _serve(args: argparse.Namespace) -> None:
    observe = None if args.dashboard is None else _observe()
    if observe is not None:
        observe.dashboard_token(observe.parse_address(args.dashboard, 7734)[0])
    overrides: dict[str, Any] = {}
    if args.listen:  # else $HIVE_ORCHESTRATION_LISTEN, if set
        overrides["listen"] = tuple(address for address in args.listen if address != "unix")
    for name, value in (
        ("tls_cert", args.tls_cert),
        ("tls_key", args.tls_key),
        ("tokens_file", args.tokens),
        ("max_connections", args.max_connections),
    ):
        if value is not None:
            overrides[name] = value
    config = RuntimeConfig.load(**overrides)
    # A server's log is its only account of who connected, and who was refused.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Before the runtime opens: a signal that comes while it opens stops it once open.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with Runtime.open(args.db, config=config) as runtime:
            server = runtime._server
            addresses = [] if server is None else list(server.tcp_addresses)
            if server is not None and server.address:
                addresses.insert(0, server.address)
            async with anyio.create_task_group() as beside:
                shown: dict[str, object] = {
                    "serving": runtime.path,
                    "pid": os.getpid(),
                    "addresses": addresses,
                }
                if observe is not None:
                    shown["dashboard"] = await beside.start(
                        observe.serve_beside, runtime, args.dashboard
                    )
                _print_json(shown)
                async for signum in signals:
                    print(
                        f"{signal.Signals(signum).name}: stopping (clients are told; calls in"
                        " flight finish)",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
                beside.cancel_scope.cancel()
    _print_json({"stopped": runtime.path})


def _name(args: argparse.Namespace) -> str:
    """What the command calls itself on the owner's connection list."""
    return f"hive-orchestration {args.command}"


async def _status(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        report = await status_report(reader)
        if isinstance(reader, OwnerReader):
            # Who is connected only the owner knows.
            status = await reader.server(_name(args))
            owner = OwnerView(pid=status.pid, address=status.address, clients=status.connections)
            report = msgspec.structs.replace(report, owner=owner)
        return report

    _show(args, await answer(args, _name(args), ask), "render_status")


async def _tasks(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await reader.tasks(args.status, task_type=args.task_type, limit=args.limit)

    _show(args, await answer(args, _name(args), ask), "render_tasks")


async def _task(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await task_report(reader, args.task_id, events=args.events)

    _show(args, await answer(args, _name(args), ask), "render_task")


async def _workers(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await reader.workers(args.status)

    _show(args, await answer(args, _name(args), ask), "render_workers")


async def _plans(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await plan_summaries(reader, await reader.plans(args.status, limit=args.limit))

    _show(args, await answer(args, _name(args), ask), "render_plans")


async def _plan(args: argparse.Namespace) -> None:
    async def ask(reader: Reader) -> object:
        return await plan_report(reader, args.plan_id)

    _show(args, await answer(args, _name(args), ask), "render_plan")


async def _events(args: argparse.Namespace) -> None:
    if args.follow:
        await _follow(args)
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

    _show(args, await answer(args, _name(args), ask), "render_events")


async def _follow(args: argparse.Namespace) -> None:
    """Print the backlog, then every new event that matches, until a bound is reached:
    pushed by the runtime that serves the database while one does, read from the file
    while none does (with ``--url``: from that server alone)."""
    if args.json:

        def emit(event: Event) -> None:
            _print_json(event)

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


async def _db_current(args: argparse.Namespace) -> None:
    version = await anyio.to_thread.run_sync(open_store(args.db).read_schema_version)
    if version == SCHEMA_VERSION:
        state, advice = "current", "up to date"
    elif version < SCHEMA_VERSION:
        state = "older"
        advice = f"older: run `hive-orchestration db upgrade --db {shlex.quote(args.db)}`"
    else:
        state, advice = "newer", "newer: upgrade hive-orchestration to read it"
    if args.json:
        _print_json(
            {
                "db": args.db,
                "schema_version": version,
                "package_schema_version": SCHEMA_VERSION,
                "state": state,
            }
        )
    else:
        print(
            f"{args.db}: schema version {version}; this hive-orchestration uses"
            f" {SCHEMA_VERSION} ({advice})"
        )


async def _db_upgrade(args: argparse.Namespace) -> None:
    before: int | None
    try:
        before = await anyio.to_thread.run_sync(open_store(args.db).read_schema_version)
    except StorageError as exc:
        if exc.fault != "needs_recovery":
            raise
        # A write a killed program left half-done: a reader cannot undo it, and the
        # version is unknown until it is undone. Opening for writing undoes it first.
        before = None
    if before is not None and before > SCHEMA_VERSION:
        raise NewerSchemaError(args.db, before, SCHEMA_VERSION)
    if before is None or before < SCHEMA_VERSION:
        # Opening a runtime migrates, in one transaction; it refuses a database that
        # another runtime holds, so an app's file is never migrated under its feet. It
        # also does what any open does (requeue the tasks a stopped app left claimed),
        # which the app's next start would do anyway.
        async with Runtime.open(args.db):
            pass
    after = await anyio.to_thread.run_sync(open_store(args.db).read_schema_version)
    if args.json:
        _print_json(
            {
                "db": args.db,
                "from_version": before,
                "to_version": after,
                "migrated": after != before,
                "recovered": before is None,
            }
        )
    elif before is None:
        print(
            f"{args.db}: recovered from a write a killed program left unfinished; now at"
            f" schema version {after}"
        )
    elif after != before:
        print(f"{args.db}: migrated from schema version {before} to {after}")
    else:
        print(f"{args.db}: already at schema version {after}; nothing to do")


_HANDLERS: dict[str, _Handler] = {
    "status": _status,
    "tasks": _tasks,
    "task": _task,
    "workers": _workers,
    "plans": _plans,
    "plan": _plan,
    "events": _events,
    "db current": _db_current,
    "db upgrade": _db_upgrade,
}
