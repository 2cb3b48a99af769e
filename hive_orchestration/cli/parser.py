"""The command line's grammar: the commands, their options, and the argument types that
refuse a bad value with a usage error (exit 2) before anything runs."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from .._validate import MAX_READ
from ..config import DB_PATH_ENV, DEFAULT_DB_PATH, TLS_CA_ENV, TOKEN_ENV, URL_ENV
from ..messages.plans import PlanStatus
from ..messages.tasks import TaskStatus
from ..messages.workers import WorkerStatus
from .worker import MAX_CONCURRENCY

__all__ = ["build_parser"]


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
