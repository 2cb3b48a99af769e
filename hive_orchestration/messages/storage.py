"""What the storage actor is asked to do. A reply to a :class:`Write` means durable."""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

from ..runtime import Request
from .events import Event
from .tasks import Run, Task
from .workers import Worker

__all__ = [
    "AppendEvent",
    "Committed",
    "DeleteTaskRow",
    "DeleteWorkerRow",
    "FetchRun",
    "FetchRuns",
    "FetchTask",
    "LoadIdempotencyKeys",
    "LoadRuns",
    "LoadTasks",
    "LoadWorkers",
    "PutRun",
    "PutTask",
    "PutWorker",
    "QueryTasks",
    "GetStorageStats",
    "ReadEvents",
    "StorageMessage",
    "StorageStats",
    "Write",
    "WriteOp",
]


class AppendEvent(msgspec.Struct, frozen=True, tag="append_event"):
    """Append ``event`` to the log; ``data_json`` is its ``data``, encoded at the boundary.

    The storage actor assigns the sequence number and, once committed, publishes the event.
    """

    event: Event
    data_json: bytes


class PutTask(msgspec.Struct, frozen=True, tag="put_task"):
    """Insert the task, or replace every column of its row: the owner sends whole state."""

    task: Task


class DeleteTaskRow(msgspec.Struct, frozen=True, tag="delete_task"):
    """Delete a task; its runs go with it (ON DELETE CASCADE)."""

    task_id: str


class PutRun(msgspec.Struct, frozen=True, tag="put_run"):
    run: Run


class PutWorker(msgspec.Struct, frozen=True, tag="put_worker"):
    """Insert the worker, or replace every column of its row."""

    worker: Worker


class DeleteWorkerRow(msgspec.Struct, frozen=True, tag="delete_worker"):
    worker_id: str


WriteOp: TypeAlias = AppendEvent | PutTask | DeleteTaskRow | PutRun | PutWorker | DeleteWorkerRow


class Committed(msgspec.Struct, frozen=True):
    """The write is durable. ``seqs``: the sequence number of each appended event, in order."""

    seqs: tuple[int, ...]


class Write(Request[Committed], frozen=True):
    """Apply ``ops`` in order, all or nothing, in the next group commit."""

    ops: tuple[WriteOp, ...]


class ReadEvents(Request[tuple[Event, ...]], frozen=True):
    """Durable events with ``seq > after``, oldest first, at most ``limit``."""

    after: int = 0
    limit: int = 1000


class LoadTasks(Request[tuple[Task, ...]], frozen=True):
    """Every task in one of ``statuses`` (the TaskManager's live set, at start-up)."""

    statuses: tuple[str, ...]


class LoadRuns(Request[tuple[Run, ...]], frozen=True):
    """Every run of the tasks in one of ``statuses``, oldest first."""

    statuses: tuple[str, ...]


class LoadIdempotencyKeys(Request[tuple[tuple[str, str], ...]], frozen=True):
    """(key, task id) for every task that has an idempotency key."""


class QueryTasks(Request[list[Task]], frozen=True, kw_only=True):
    """Tasks in ``status``, by priority (highest first), then creation time."""

    status: str
    task_type: str | None = None
    limit: int | None = None


class FetchTask(Request["Task | None"], frozen=True):
    task_id: str


class FetchRun(Request["Run | None"], frozen=True):
    run_id: str


class FetchRuns(Request[list[Run]], frozen=True):
    task_id: str


class StorageStats(msgspec.Struct, frozen=True):
    path: str
    driver: str
    synchronous: Literal["FULL", "NORMAL"]
    schema_version: int
    transactions: int
    writes: int
    failed_writes: int
    largest_batch: int
    last_seq: int


class GetStorageStats(Request[StorageStats], frozen=True):
    pass


class LoadWorkers(Request[tuple[Worker, ...]], frozen=True):
    """Every registered worker (the WorkerRegistry's state, at start-up)."""


StorageMessage: TypeAlias = (
    Write
    | ReadEvents
    | GetStorageStats
    | LoadTasks
    | LoadRuns
    | LoadIdempotencyKeys
    | QueryTasks
    | FetchTask
    | FetchRun
    | FetchRuns
    | LoadWorkers
)
