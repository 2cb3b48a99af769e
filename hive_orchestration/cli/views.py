"""The person-readable output of the commands: rich tables, progress bars and the DAG.

Imported only for a command run without ``--json``, as ``rich`` is an optional extra
(``pip install 'hive-orchestration[cli]'``). Every value from the database is drawn as
plain :class:`~rich.text.Text`, never as markup, so that a title such as ``[red]x`` is
shown as written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime

import msgspec
from rich import box
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..messages.events import Event
from ..messages.tasks import Run, Task
from ..messages.workers import Worker
from .report import PlanReport, PlanSummary, Progress, StatusReport, TaskReport

__all__ = [
    "console",
    "event_line",
    "render_events",
    "render_plan",
    "render_plans",
    "render_status",
    "render_task",
    "render_tasks",
    "render_workers",
]

#: An id is what a person copies into the next command: never cut one short.
_ID_WIDTH = 36
_STYLES = {
    "completed": "green",
    "failed": "red",
    "timed_out": "red",
    "lost": "red",
    "cancelled": "yellow",
    "skipped": "yellow",
    "running": "cyan",
    "executing": "cyan",
    "assigned": "cyan",
    "ready": "cyan",
    "busy": "cyan",
    "offline": "dim",
    "blocked": "dim",
}


def console() -> Console:
    """A console on the current ``sys.stdout``. Piped output gets a wide page, so that a
    table is not squeezed to 80 columns (and its ids cut) in a file or a pager."""
    out = sys.stdout
    width = None if out.isatty() else 200
    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def _text(value: object, style: str = "") -> Text:
    return Text("" if value is None else str(value), style=style)


def _status(value: object) -> Text:
    text = "" if value is None else str(value)
    return Text(text, style=_STYLES.get(text, ""))


def _when(value: datetime | float | None) -> Text:
    """Local time, to the second: how a person reads a log."""
    if value is None:
        return Text("")
    stamp = value.timestamp() if isinstance(value, datetime) else value
    return Text(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)))


def _ago(value: datetime) -> Text:
    seconds = max(0.0, time.time() - value.timestamp())
    if seconds < 120:
        words = f"{seconds:.0f}s ago"
    elif seconds < 7200:
        words = f"{seconds / 60:.0f}m ago"
    elif seconds < 172_800:
        words = f"{seconds / 3600:.0f}h ago"
    else:
        words = f"{seconds / 86_400:.0f}d ago"
    return Text(words)


def _json(value: object, limit: int = 120) -> Text:
    if value is None:
        return Text("")
    text = msgspec.json.encode(value).decode()
    return Text(text if len(text) <= limit else text[: limit - 1] + "…")


def _table(title: str | None = None) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)


def _id_column(table: Table, header: str = "id") -> None:
    table.add_column(header, no_wrap=True, min_width=_ID_WIDTH)


def _bar(progress: Progress) -> Table:
    """A bar and its figures on one line (a plan's subtasks that ended, of all)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    bar = ProgressBar(total=max(progress.total, 1), completed=progress.done, width=20)
    label = Text(f"{progress.done}/{progress.total} ({progress.percent:.0f}%)")
    grid.add_row(bar, label)
    return grid


def _print(out: Console, table: Table, rows: int) -> None:
    """A table, or its title and "none": an empty table is only a row of headers."""
    if rows:
        out.print(table)
    else:
        out.print(Text.assemble((str(table.title or ""), "italic"), ("  none", "dim")))


# -- status ------------------------------------------------------------------------------


def render_status(out: Console, report: StatusReport) -> None:
    out.print(
        Text.assemble(
            ("database ", "bold"),
            report.db,
            f"  schema {report.schema_version}",
            f"  {report.last_seq} event(s) in the log",
        )
    )
    tasks = _table(f"Tasks ({report.total_tasks})")
    tasks.add_column("status")
    tasks.add_column("count", justify="right")
    for status, count in report.tasks.items():
        tasks.add_row(_status(status), _text(count, "" if count else "dim"))
    out.print(tasks)
    render_owner(out, report)
    render_workers(out, report.workers, title=f"Active workers ({len(report.workers)})")
    render_plans(out, report.plans, title=f"Executing plans ({len(report.plans)})")


def render_owner(out: Console, report: StatusReport) -> None:
    owner = report.owner
    if owner is None:
        out.print(Text("no runtime serves this database now (or it serves no socket)", "dim"))
        return
    out.print(
        Text.assemble(
            ("owned by ", "bold"), f"process {owner.pid}", f"  serving on {owner.address}"
        )
    )
    if owner.max_held_bytes:
        out.print(
            f"held for connections and requests: {_mib(owner.held_bytes)} of"
            f" {_mib(owner.max_held_bytes)}"
            f" (max_held_bytes); {owner.held_back} client(s) waiting for room"
        )
    table = _table(f"Connected clients ({len(owner.clients)})")
    for header in ("#", "name", "pid", "connected", "calls in flight", "subscriptions", "held"):
        table.add_column(header, justify="right" if header in ("#", "pid") else "left")
    for client in owner.clients:
        table.add_row(
            _text(client.id),
            _text(client.name),
            _text(client.pid),
            _ago(client.connected_at),
            _text(client.calls_in_flight),
            _text(client.subscriptions),
            _mib(client.held_bytes) + (" (waiting)" if client.held_back else ""),
        )
    _print(out, table, len(owner.clients))


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


# -- tasks -------------------------------------------------------------------------------


def render_tasks(out: Console, tasks: Sequence[Task], title: str | None = None) -> None:
    table = _table(title or f"Tasks ({len(tasks)}, newest first)")
    _id_column(table)
    # attempts: runs that ended without success (a task is tried up to max_retries + 1).
    for header in ("type", "status", "priority", "attempts", "worker", "title", "updated"):
        table.add_column(header, justify="right" if header in ("priority", "attempts") else "left")
    for task in tasks:
        table.add_row(
            _text(task.id),
            _text(task.task_type),
            _status(task.status.value),
            _text(task.priority),
            _text(task.attempts),
            _text(task.assigned_worker),
            _text(task.title),
            _when(task.updated_at),
        )
    _print(out, table, len(tasks))


def render_task(out: Console, report: TaskReport) -> None:
    task = report.task
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    rows: list[tuple[str, Text]] = [
        ("task", _text(task.id)),
        ("title", _text(task.title)),
        ("type", _text(task.task_type)),
        ("status", _status(task.status.value)),
        ("priority", _text(task.priority)),
        ("attempts", _text(f"{task.attempts} (retries allowed: {task.max_retries})")),
        ("worker", _text(task.assigned_worker)),
        ("created", _when(task.created_at)),
        ("updated", _when(task.updated_at)),
        ("available at", _when(task.available_at)),
        ("run at", _when(task.run_at)),
        ("expires at", _when(task.expires_at)),
        ("plan", _text(f"{task.plan_id} / {task.subtask_id}" if task.plan_id else None)),
        ("correlation", _text(task.correlation_id)),
        ("idempotency key", _text(task.idempotency_key)),
        ("source agent", _text(task.source_agent)),
        ("requires", _text(", ".join(task.requires) or None)),
        ("payload", _json(task.payload, limit=400)),
        ("result", _json(task.result, limit=400)),
        ("error", _text(task.error, "red")),
    ]
    for name, value in rows:
        if value.plain:
            fields.add_row(name, value)
    out.print(fields)
    render_runs(out, report.runs)
    title = f"Events ({len(report.events)}, newest last)"
    render_events(out, report.events, title=title, task=False)


def render_runs(out: Console, runs: Sequence[Run]) -> None:
    table = _table(f"Runs ({len(runs)})")
    table.add_column("#", justify="right")
    _id_column(table, "run")
    for header in ("status", "worker", "phase", "started", "completed", "error / result"):
        table.add_column(header)
    for run in runs:
        outcome = _text(run.error, "red") if run.error else _json(run.result, limit=80)
        table.add_row(
            _text(run.run_number),
            _text(run.id),
            _status(run.status.value),
            _text(run.worker_id),
            _text(run.phase),
            _when(run.started_at),
            _when(run.completed_at),
            outcome,
        )
    _print(out, table, len(runs))


# -- workers -----------------------------------------------------------------------------


def render_workers(out: Console, workers: Sequence[Worker], title: str | None = None) -> None:
    table = _table(title or f"Workers ({len(workers)})")
    table.add_column("id", no_wrap=True)
    for header in ("role", "status", "capabilities", "current task", "last heartbeat"):
        table.add_column(header)
    for worker in workers:
        table.add_row(
            _text(worker.id),
            _text(worker.role),
            _status(worker.status.value),
            _text(", ".join(worker.capabilities)),
            _text(worker.current_task_id),
            _ago(worker.last_heartbeat),
        )
    _print(out, table, len(workers))


# -- plans -------------------------------------------------------------------------------


def render_plans(out: Console, plans: Sequence[PlanSummary], title: str | None = None) -> None:
    table = _table(title or f"Plans ({len(plans)}, newest first)")
    _id_column(table)
    for header in ("title", "status", "progress", "created", "started"):
        table.add_column(header)
    for plan in plans:
        table.add_row(
            _text(plan.id),
            _text(plan.title),
            _status(plan.status.value),
            _bar(plan.progress),
            _when(plan.generated_at),
            _when(plan.started_at),
        )
    _print(out, table, len(plans))


def render_plan(out: Console, report: PlanReport) -> None:
    plan = report.plan
    out.print(Text.assemble(("plan ", "bold"), plan.id, "  ", (plan.title, "bold")))
    out.print(
        Text.assemble(
            "status ",
            _status(plan.status.value),
            f"  policy {plan.failure_policy.value}",
            f"  {plan.subtask_count} subtask(s), {plan.dependency_count} dependency(ies)",
        )
    )
    times = [
        ("created", plan.generated_at),
        ("started", plan.started_at),
        ("ended", plan.completed_at),
    ]
    out.print(Text("  ".join(f"{name} {_when(at).plain}" for name, at in times if at)))
    if plan.error:
        out.print(Text(f"error: {plan.error}", style="red"))
    out.print(_bar(report.progress))
    counts = ", ".join(f"{status} {count}" for status, count in report.progress.counts.items())
    out.print(Text(counts, style="dim"))
    table = _table("Subtasks by dependency layer (a layer runs once those above completed)")
    table.add_column("layer", justify="right")
    table.add_column("subtask", no_wrap=True)
    for header in ("type", "status", "task status", "depends on"):
        table.add_column(header)
    _id_column(table, "task")
    for layer in report.layers:
        for view in layer:
            table.add_row(
                _text(view.layer),
                _text(view.id),
                _text(view.task_type),
                _status(view.status),
                _status(None if view.task_status is None else view.task_status.value),
                _text(", ".join(view.dependencies) or "-"),
                _text(view.task_id),
            )
        table.add_section()
    out.print(table)


# -- events ------------------------------------------------------------------------------


def render_events(
    out: Console, events: Sequence[Event], title: str | None = None, *, task: bool = True
) -> None:
    """The events as a table; ``task=False`` leaves out the task column (a task's view)."""
    table = _table(title or f"Events ({len(events)})")
    table.add_column("seq", justify="right")
    headers = ("time", "type", "source", *(("task",) if task else ()), "plan", "data")
    for header in headers:
        table.add_column(header, no_wrap=header in ("time", "type"))
    for event in events:
        cells = [_text(event.seq), _when(event.timestamp), _text(event.type, "bold")]
        cells.append(_text(event.source))
        if task:
            cells.append(_text(event.task_id))
        cells += [_text(event.plan_id), _json(event.data, limit=100)]
        table.add_row(*cells)
    _print(out, table, len(events))


def event_line(event: Event) -> Text:
    """One event on one line, for ``events --follow``."""
    parts: list[str | Text | tuple[str, str]] = [
        (f"{event.seq:>6} ", "dim"),
        _when(event.timestamp),
        " ",
        (event.type, "bold"),
        f"  {event.source}",
    ]
    for name in ("task_id", "plan_id", "worker_id", "correlation_id"):
        value = getattr(event, name)
        if value is not None:
            parts.append(f"  {name.removesuffix('_id')}={value}")
    if event.data:
        parts.append("  ")
        parts.append(_json(event.data, limit=200))
    return Text.assemble(*parts)
