"""Retention: purge old finished tasks, trim the event log (docs/RETENTION.md).

Both are admin operations (an ``agent`` token may not call them) shared by ``Runtime``
and ``OrchestrationClient``, and the automatic policy (``RuntimeConfig.retention``) calls
them too. Each works in chunks, one transaction per chunk, so that a purge of a million
rows holds the write connection a few milliseconds at a time and every other writer goes
between two chunks. A chunk is all or nothing; a call cancelled between chunks leaves
the chunks done so far done, and the next call goes on from there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import anyio
import msgspec

from ..._validate import check_bool, check_int, check_optional_text, check_seconds
from ...config import RetentionPolicy, RuntimeConfig
from ...errors import HiveError, InvalidInputError, RuntimeStoppedError
from ...messages.events import Event, JsonValue
from ...messages.storage import (
    AppendEvent,
    FenceLeader,
    PlanEventTrim,
    RetentionDue,
    StorageMessage,
    TrimEventLog,
    Write,
    WriteOp,
)
from ...messages.tasks import TERMINAL, PurgeTasks, TaskManagerMessage, TaskStatus
from ...runtime import ActorRef
from .caller import Caller

__all__ = ["RetentionOps", "retain"]

log = logging.getLogger("hive_orchestration.retention")

#: A hundred years: the longest age a purge or a trim takes.
_LONGEST = 100 * 365 * 86400.0
_TERMINAL = tuple(sorted(status.value for status in TERMINAL))
#: Seconds between two looks of a node that does not lead at whether it leads now.
_NOT_LEADING = 1.0
#: Most rows one chunk deletes: a chunk is one transaction, which holds the writers up.
MAX_CHUNK = 100_000


class RetentionOps(Caller):
    """Mixed into :class:`Runtime` and :class:`OrchestrationClient`; needs ``_tasks`` (the
    TaskManager) and ``_storage``."""

    _tasks: ActorRef[TaskManagerMessage]
    _storage: ActorRef[StorageMessage]
    _config: RuntimeConfig

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    async def purge_tasks(
        self,
        older_than: float,
        *,
        statuses: Iterable[str] | None = None,
        task_type: str | None = None,
        include_keyed: bool = False,
        chunk: int = 250,
        source_agent: str | None = None,
    ) -> int:
        """Delete the finished tasks last changed more than ``older_than`` seconds ago,
        with their runs and events; returns how many. An admin operation.

        ``statuses`` narrows which finished ones (``completed``, ``failed``,
        ``cancelled``, ``timed_out``; default all), ``task_type`` to one type. Never
        purged: a live task, a task of a plan that has not ended (its finished subtasks
        are its later steps' inputs), and, unless ``include_keyed``, a task that holds an
        idempotency key (the key stays its task's for good: purging the task frees it).
        ``chunk`` tasks are deleted per transaction; each logs a ``retention.purged``
        event (who: ``source_agent``)."""
        self._check_open()
        message = PurgeTasks(
            older_than=check_seconds(older_than, "older_than", minimum=0.0, maximum=_LONGEST),
            statuses=_statuses(statuses),
            task_type=check_optional_text(task_type, "task_type"),
            include_keyed=check_bool(include_keyed, "include_keyed"),
            limit=check_int(chunk, "chunk", minimum=1, maximum=MAX_CHUNK),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        return await self._purge(message)

    async def _purge(self, message: PurgeTasks) -> int:
        total = 0
        while True:
            began = anyio.current_time()
            outcome = await self._tasks.ask(message)
            total += outcome.purged
            if not outcome.more:
                return total
            await _give_way(began)

    async def trim_events(
        self,
        *,
        older_than: float | None = None,
        max_events: int | None = None,
        max_bytes: int | None = None,
        chunk: int = 1000,
        source_agent: str | None = None,
    ) -> int:
        """Trim the oldest events of the log: those older than ``older_than`` seconds,
        and as many more as keep at most ``max_events`` events and ``max_bytes`` bytes of
        them (docs/RETENTION.md says how an event is weighed). Returns the sequence number
        the log is now trimmed through (0: nothing was trimmed). An admin operation.

        A read from a sequence number before it (``read_events(after=...)``, an event
        stream's replay) then gets :class:`EventsTrimmedError` naming the oldest kept
        one. Sequence numbers never go back, even once the log is empty. ``chunk`` events
        are deleted per transaction; each logs a ``retention.trimmed`` event."""
        self._check_open()
        if older_than is not None:
            older_than = check_seconds(older_than, "older_than", minimum=0.0, maximum=_LONGEST)
        if max_events is not None:
            max_events = check_int(max_events, "max_events", minimum=0)
        if max_bytes is not None:
            max_bytes = check_int(max_bytes, "max_bytes", minimum=0)
        if older_than is None and max_events is None and max_bytes is None:
            raise InvalidInputError(
                "older_than", "give older_than, max_events or max_bytes: what to trim by"
            )
        chunk = check_int(chunk, "chunk", minimum=1, maximum=MAX_CHUNK)
        source = check_optional_text(self._agent(source_agent), "source_agent")
        return await self._trim(older_than, max_events, max_bytes, chunk, source)

    async def _trim(
        self,
        older_than: float | None,
        max_events: int | None,
        max_bytes: int | None,
        chunk: int,
        source: str | None,
        *,
        epoch: int | None = None,
    ) -> int:
        """``epoch``: a pass of the leader of several nodes (see :func:`retain`), each
        chunk's write fenced by it."""
        before = None if older_than is None else time.time() - older_than
        plan = await self._storage.ask(PlanEventTrim(before, max_events, max_bytes))
        if plan.through == 0:
            return 0
        reasons = [
            name
            for name, value in (
                ("older_than", older_than),
                ("max_events", max_events),
                ("max_bytes", max_bytes),
            )
            if value is not None
        ]
        done = plan.first_seq - 1
        while done < plan.through:
            # Seq ranges, not row counts: a range may hold fewer rows (a purge's holes).
            through = min(plan.through, done + chunk)
            data: dict[str, JsonValue] = {"through": through, "reason": ",".join(reasons)}
            event = Event(
                type="retention.trimmed",
                timestamp=time.time(),
                source=source or "runtime",
                data=data,
            )
            ops: tuple[WriteOp, ...] = (
                TrimEventLog(through),
                AppendEvent(event, msgspec.json.encode(data)),
            )
            if epoch is not None:
                ops = (FenceLeader(epoch), *ops)
            began = anyio.current_time()
            await self._storage.ask(Write(ops))
            done = through
            if done < plan.through:
                await _give_way(began)
        return plan.through


async def _give_way(began: float) -> None:
    """Wait as long as the chunk just done took: a writer that queued behind it is then
    committed alone, not with the next chunk too, so that a purge or a trim takes at most
    about half the write connection's time, and adds at most one chunk to a writer's
    wait (bench/retention.py measures it)."""
    await anyio.sleep(anyio.current_time() - began)


def _statuses(value: Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return _TERMINAL
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidInputError("statuses", "must be a list of finished statuses")
    chosen: set[str] = set()
    for i, item in enumerate(value):
        try:
            status = TaskStatus(item)
        except ValueError:
            status = None
        if status is None or status not in TERMINAL:
            raise InvalidInputError(
                f"statuses[{i}]",
                f"{item!r} is not a finished status: only {', '.join(_TERMINAL)} are purged",
            )
        chosen.add(status.value)
    if not chosen:
        raise InvalidInputError("statuses", "must name at least one finished status")
    return tuple(sorted(chosen))


async def retain(
    ops: RetentionOps,
    policy: RetentionPolicy,
    leading: Callable[[], int | None] | None = None,
) -> None:
    """The automatic policy, for the runtime's life: a pass, then sleep until the next
    thing is due (the oldest finished task or event reaching its age; the size limits
    every ``interval``), never sooner than ``interval``. No polling of what is not due:
    a task that finishes later comes of age later than the oldest one.

    ``leading``: where several nodes share the database, the epoch of this node's term
    as leader (None: it does not lead). Passes run on the leader only, each chunk fenced
    by the epoch the pass began in (a leader that lost the role deletes nothing); a node
    that does not lead looks again every :data:`_NOT_LEADING` seconds, so that a new
    leader runs its first pass soon after taking the role."""
    while True:
        epoch = None if leading is None else leading()
        if leading is not None and epoch is None:
            await anyio.sleep(min(policy.interval, _NOT_LEADING))
            continue
        waits: list[float] = []
        try:
            if policy.finished_max_age is not None:
                message = PurgeTasks(
                    older_than=policy.finished_max_age,
                    statuses=_TERMINAL,
                    include_keyed=policy.include_keyed,
                    limit=policy.chunk,
                    source_agent="retention",
                    reason="retention policy",
                    epoch=epoch,
                )
                purged = await ops._purge(message)
                if purged:
                    log.info("retention: purged %d finished task(s)", purged)
            if (
                policy.events_max_age is not None
                or policy.events_max_count is not None
                or policy.events_max_bytes is not None
            ):
                through = await ops._trim(
                    policy.events_max_age,
                    policy.events_max_count,
                    policy.events_max_bytes,
                    # A task is about five rows (its run, its events): a trim chunk of
                    # four times as many events holds the writers up about as long.
                    4 * policy.chunk,
                    "retention",
                    epoch=epoch,
                )
                if through:
                    log.info("retention: event log trimmed through seq %d", through)
            oldest_task, oldest_event = await ops._storage.ask(RetentionDue(policy.include_keyed))
        except RuntimeStoppedError:
            return
        except HiveError as exc:
            # A busy database, a full disk: try again at the next interval.
            log.warning("retention pass failed, retried in %gs: %s", policy.interval, exc)
            oldest_task, oldest_event = None, None
        now = time.time()
        if policy.finished_max_age is not None:
            due = policy.finished_max_age
            if oldest_task is not None:
                due += oldest_task.timestamp() - now
            waits.append(due)
        if policy.events_max_age is not None:
            due = policy.events_max_age
            if oldest_event is not None:
                due += oldest_event - now
            waits.append(due)
        if policy.events_max_count is not None or policy.events_max_bytes is not None:
            waits.append(policy.interval)
        await anyio.sleep(max(policy.interval, min(waits, default=policy.interval)))
