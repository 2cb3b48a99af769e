"""Prometheus metrics of a hive-orchestration database (extra ``metrics``:
prometheus-client).

Three kinds of figures, each computed from what the runtime publicly says:

- **Counted from events** (``hive_events_total``, ``hive_tasks_created_total``,
  ``hive_tasks_finished_total``, ``hive_task_retries_total``, ``hive_leases_lost_total``,
  and the histograms ``hive_task_queue_wait_seconds``, ``hive_task_run_seconds``,
  ``hive_event_delivery_seconds``): :meth:`Metrics.run` follows the event log from its end
  when it starts, so, as for any Prometheus counter, they count what happened since the
  exporter started (``rate()`` is the figure to graph). Every task transition is an event
  carrying the task's type, its new status and its previous one, so nothing is guessed.
- **Read at each scrape** (``hive_tasks``, ``hive_claims_in_flight``, ``hive_queue_depth``,
  ``hive_queue_oldest_age_seconds``, ``hive_workers``, ``hive_plans``): bounded public
  reads (``count_tasks``, ``queue_depths`` where a runtime answers, else ``list_tasks``,
  ``list_workers``, ``get_execution_plans``). A per-type or per-status figure whose page
  of rows came back full (``MAX_READ`` rows) is left out rather than under-reported.
- **The runtime's own statistics** (:meth:`Runtime.statistics`, ``statistics`` through
  its socket or over TCP): ``hive_mailbox_depth``, ``hive_actor_restarts_total``,
  ``hive_storage_commits_total``, ``hive_storage_writes_total``,
  ``hive_commit_batch_size_max``, the histograms ``hive_commit_seconds`` and
  ``hive_commit_batch_size``, ``hive_subscriber_lagged_total``... read at each scrape
  wherever a runtime answers; the file alone (no runtime owns it) has none, and a
  runtime of an older version that refuses the operation is not asked again.

How these figures are rendered as metric families is in :mod:`.collectors`.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
from anyio.abc import TaskStatus as StartStatus
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .._validate import MAX_READ
from ..errors import InvalidInputError
from ..messages.events import Entry, Event
from ..messages.plans import PlanStatus
from ..messages.tasks import TaskStatus
from .collectors import _Counted, _Histogram, _SnapshotCollector
from .source import Source

if TYPE_CHECKING:
    from ..api.embedded import Runtime, RuntimeStatistics
    from ..remote.status import ServerStatus

__all__ = ["DURATION_BUCKETS", "Metrics", "metrics_app", "watch"]

_T = TypeVar("_T")

log = logging.getLogger("hive_orchestration.observe")

#: Seconds, from a few milliseconds to a day: a queue wait or a run may last hours.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
)  # fmt: skip
#: From the event's timestamp to its arrival here: sub-millisecond to seconds.
DELIVERY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Tasks waiting (or running) whose start time is remembered to time their wait (or run):
#: beyond it the oldest are forgotten, and their wait is not observed, rather than
#: growing without bound on a deep queue.
TRACKED = 100_000
#: Finished runs kept for the dashboard's throughput and latency percentiles.
RECENT = 2000
#: How a run that ended without its worker is named in ``task.retrying``/``task.failed``.
LOST_REASONS = frozenset({"lease_expired", "worker_lost"})

_QUEUED, _ASSIGNED, _RUNNING = "queued", "assigned", "running"
_ACTIVE = frozenset({_ASSIGNED, _RUNNING})
_NUMBER = (int, float)
#: The events whose task's waits and runs are timed.
_TASK_EVENTS = ("task.", "plan.subtask_ready")
_FINAL = frozenset(
    s.value
    for s in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT)
)


@dataclass(frozen=True)
class Finished:
    """A task that ended, for the dashboard: when, how, and its last run's duration."""

    at: float
    task_type: str
    status: str
    run_seconds: float | None


@dataclass
class _Snapshot:
    """What the last scrape read."""

    tasks: dict[str, int] = field(default_factory=dict)
    queue_depth: dict[str, int] | None = None  # None: too many queued tasks to count by type
    queue_oldest: dict[str, float] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    plans: dict[str, int] = field(default_factory=dict)
    statistics: RuntimeStatistics | None = None
    server: ServerStatus | None = None


def _timestamp(text: str, default: float) -> float:
    """An event's ISO 8601 time as Unix seconds (``default`` if it is not one)."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return default


def _forget_oldest(tracked: MutableMapping[str, Any]) -> None:
    while len(tracked) > TRACKED:
        del tracked[next(iter(tracked))]


class Metrics:
    """The metrics of one source, in a registry of their own (never the global one, so
    that two runtimes of a process, or a test, do not mix)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.registry = CollectorRegistry(auto_describe=True)
        # Folded into plain dicts, rendered at scrape (_Counted): an event costs a few
        # dict updates, not a prometheus-client child lookup and lock per figure.
        self.events: dict[str, int] = {}
        self.created: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.leases_lost: dict[str, int] = {}
        self.queue_wait: dict[str, _Histogram] = {}
        self.run_seconds: dict[str, _Histogram] = {}
        self.delivery = _Histogram(DELIVERY_BUCKETS)
        self.registry.register(_Counted(self))
        self._snapshot = _Snapshot()
        self.registry.register(_SnapshotCollector(self))
        self._ready: dict[str, float] = {}  # task id -> when it became claimable
        self._claimed: dict[str, tuple[float, str]] = {}  # task id -> (claimed at, type)
        #: The newest finished tasks (the dashboard's throughput and percentiles).
        self.recent: deque[Finished] = deque(maxlen=RECENT)
        #: When the newest tasks were created, and their type (the queues' rates).
        self.recent_created: deque[tuple[float, str]] = deque(maxlen=RECENT)
        #: The last seq folded in.
        self.last_seq = 0
        #: When it began to count (Unix seconds).
        self.started = time.time()
        self._refreshing = anyio.Lock()

    # -- counted from events ------------------------------------------------------------

    def observe(self, event: Event, received: float | None = None) -> None:
        """Fold one event in (each once, in log order)."""
        self.last_seq = max(self.last_seq, event.seq)
        events = self.events
        events[event.type] = events.get(event.type, 0) + 1
        if received is not None:
            self.delivery.observe(received - event.timestamp)
        if event.task_id is not None and event.type.startswith(_TASK_EVENTS):
            self._task_event(event)

    def _fold(self, entries: Sequence[Entry]) -> None:
        """:meth:`observe` of one commit's events, as the tap hands them over: the same
        counts, with the per-event work inlined (this runs in the runtime's fan-out)."""
        received = time.time()
        events = self.events
        delivery = self.delivery
        bounds, counts = delivery.bounds, delivery.counts
        total = 0.0
        for event, _ in entries:
            kind = event.type
            events[kind] = events.get(kind, 0) + 1
            late = received - event.timestamp
            if late < 0.0:
                late = 0.0
            counts[bisect_left(bounds, late)] += 1
            total += late
            if event.task_id is not None and kind.startswith(_TASK_EVENTS):
                self._task_event(event)
        delivery.sum += total
        self.last_seq = max(self.last_seq, entries[-1][0].seq)

    def _task_event(self, event: Event) -> None:
        task_id, at, data = cast(str, event.task_id), event.timestamp, event.data
        task_type = str(data.get("task_type", ""))
        status = data.get("status")
        kind = event.type
        if kind == "task.created":
            self.created[task_type] = self.created.get(task_type, 0) + 1
            self.recent_created.append((at, task_type))
            if event.plan_id is None:  # a plan's task waits, blocked, until it is ready
                run_at = data.get("run_at")  # a delayed task is ready from its start time
                due = at if not isinstance(run_at, str) else max(at, _timestamp(run_at, at))
                self._ready[task_id] = due
                if len(self._ready) > TRACKED:
                    _forget_oldest(self._ready)
            return
        if kind == "task.deleted":
            self._ready.pop(task_id, None)
            self._claimed.pop(task_id, None)
            return
        run_seconds = None
        if data.get("previous") in _ACTIVE and status not in _ACTIVE:
            claimed = self._claimed.pop(task_id, None)
            if claimed is not None:
                run_seconds = max(0.0, at - claimed[0])
                _histogram(self.run_seconds, claimed[1]).observe(run_seconds)
        if status == _QUEUED:
            retry_in = data.get("retry_in")
            delay = float(retry_in) if isinstance(retry_in, _NUMBER) else 0.0
            self._ready[task_id] = at + delay
            if len(self._ready) > TRACKED:
                _forget_oldest(self._ready)
        elif status == _ASSIGNED:
            ready_at = self._ready.pop(task_id, None)
            if ready_at is not None:
                _histogram(self.queue_wait, task_type).observe(max(0.0, at - ready_at))
            self._claimed[task_id] = (at, task_type)
            if len(self._claimed) > TRACKED:
                _forget_oldest(self._claimed)
        elif status == _RUNNING:
            return  # a run that started: nothing more to count
        reason = data.get("reason")
        if kind == "task.retrying" and isinstance(reason, str):
            self.retries[reason] = self.retries.get(reason, 0) + 1
        if isinstance(reason, str) and reason in LOST_REASONS:
            self.leases_lost[reason] = self.leases_lost.get(reason, 0) + 1
        if isinstance(status, str) and status in _FINAL:
            self._ready.pop(task_id, None)
            key = (task_type, status)
            self.finished[key] = self.finished.get(key, 0) + 1
            self.recent.append(Finished(at, task_type, status, run_seconds))

    async def run(
        self,
        *,
        after: int | None = None,
        task_status: StartStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the log from its end (or from seq ``after``), folding every new event
        in, until cancelled (or the runtime stops). Started (``task_group.start``) once
        its place in the log is taken: every event committed after that is counted."""
        runtime = self.source.runtime
        if runtime is not None and after is None:
            # In the runtime's process: folded in its fan-out (messages/tap.py), at a
            # fraction of a subscription's cost per event.
            async with runtime.tap(self._fold) as tap:
                self.last_seq = max(self.last_seq, await runtime.last_seq())
                self.started = time.time()
                task_status.started()
                try:
                    await tap.receive()  # nothing is queued on a tap: this is its end
                except anyio.EndOfStream:
                    return  # the runtime stopped
            # Lagged: the broadcast actor crashed and was restarted. Events of the commit
            # it crashed on may not have been folded: go on from the log, which has them.
            log.warning("metrics: event tap broke after event %d; following the log", self.last_seq)
        elif after is None:
            self.last_seq = await self.source.reader.last_seq()
            self.started = time.time()
            task_status.started()
        else:
            self.last_seq = after
            task_status.started()
        async for event in self.source.follow(self.last_seq):
            self.observe(event, time.time())

    # -- read at each scrape ------------------------------------------------------------

    async def _optional(
        self, op: str, ask: Callable[[], Awaitable[_T]] | None, instead: str
    ) -> _T | None:
        """What the source's runtime answers to ``op``, or None where there is none to ask
        (the file alone) or it does not know the operation (the runtime of an older
        version, through its socket: asked no more); ``instead`` says what the scrape
        does then."""
        if ask is None:
            return None
        try:
            return await ask()
        except InvalidInputError as error:
            if error.field != "op":
                raise
            log.warning("metrics: the runtime serves no %s (an older version); %s", op, instead)
            self.source.refused(op)
            return None

    async def refresh(self) -> None:
        """Read the figures of the moment (one scrape at a time)."""
        async with self._refreshing:
            reader = self.source.reader
            snapshot = _Snapshot(tasks=await reader.task_counts())
            # A queue the page cannot hold is not read at all (a million queued tasks
            # would cost a full page a scrape for figures that are then left out).
            full = snapshot.tasks.get(TaskStatus.QUEUED.value, 0) >= MAX_READ
            depths = await self._optional(
                "queue_depths",
                self.source.queue_depths,
                f"reading queued tasks instead, depth left out past {MAX_READ}",
            )
            if depths is not None:
                # A runtime answers (in its process or through its socket): one aggregate
                # query, exact at any depth, no row decoded (a page of queued tasks is
                # about 14 ms of CPU per thousand, and says nothing past MAX_READ).
                now = time.time()
                snapshot.queue_depth = {t: count for t, (count, _) in depths.items()}
                snapshot.queue_oldest = {
                    t: max(0.0, now - since.timestamp()) for t, (_, since) in depths.items()
                }
                full = True  # nothing more to read
            queued = [] if full else await reader.tasks(TaskStatus.QUEUED, limit=MAX_READ)
            if depths is None and not full and len(queued) < MAX_READ:
                now = time.time()
                depth: dict[str, int] = {}
                for task in queued:
                    depth[task.task_type] = depth.get(task.task_type, 0) + 1
                    # Queued since its last transition, claimable from available_at
                    # (a delayed task from its run_at: it waits for no worker before).
                    since = task.updated_at.timestamp()
                    for claimable in (task.available_at, task.run_at):
                        if claimable is not None:
                            since = max(since, claimable.timestamp())
                    age = max(0.0, now - since)
                    snapshot.queue_oldest[task.task_type] = max(
                        age, snapshot.queue_oldest.get(task.task_type, 0.0)
                    )
                snapshot.queue_depth = depth
            for worker in await reader.workers():
                key = worker.status.value
                snapshot.workers[key] = snapshot.workers.get(key, 0) + 1
            for plan_status in PlanStatus:
                plans = await reader.plans(plan_status, limit=MAX_READ)
                if len(plans) < MAX_READ:
                    snapshot.plans[plan_status.value] = len(plans)
            snapshot.statistics = await self._optional(
                "statistics",
                self.source.statistics,
                "mailbox, restart, commit and delivery figures left out",
            )
            snapshot.server = await self._optional(
                "server_status", self.source.server_status, "the socket server's figures left out"
            )
            self._snapshot = snapshot

    async def exposition(self) -> bytes:
        """The text a scrape gets: the figures read now, and the counters."""
        await self.refresh()
        return generate_latest(self.registry)

    # -- for the dashboard --------------------------------------------------------------

    def throughput(self, window: float = 300.0, now: float | None = None) -> dict[str, float]:
        """Tasks finished per minute over the last ``window`` seconds, by final status
        (of those seen since the exporter started)."""
        now = time.time() if now is None else now
        seen = max(1.0, min(window, now - self.started))  # a younger exporter saw less
        rates: dict[str, float] = {}
        for done in self.recent:
            if now - done.at <= window:
                rates[done.status] = rates.get(done.status, 0.0) + 60.0 / seen
        return rates

    def created_rate(self, window: float = 300.0, now: float | None = None) -> dict[str, float]:
        """Tasks created per minute over the last ``window`` seconds, by type (of the
        newest ones seen since the exporter started)."""
        now = time.time() if now is None else now
        seen = max(1.0, min(window, now - self.started))
        rates: dict[str, float] = {}
        for at, task_type in self.recent_created:
            if now - at <= window:
                rates[task_type] = rates.get(task_type, 0.0) + 60.0 / seen
        return rates

    def run_percentiles(self, points: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
        """Run durations of the newest finished tasks at each percentile (empty if none)."""
        durations = sorted(d.run_seconds for d in self.recent if d.run_seconds is not None)
        if not durations:
            return {}
        last = len(durations) - 1
        return {f"p{p:g}": durations[min(last, round(last * p / 100))] for p in points}


def _histogram(by: dict[str, _Histogram], key: str) -> _Histogram:
    found = by.get(key)
    if found is None:
        found = by[key] = _Histogram(DURATION_BUCKETS)
    return found


def metrics_app(metrics: Metrics) -> Callable[..., Awaitable[None]]:
    """An ASGI app that answers every GET with the exposition, to mount where an app's
    own server wants it (``Mount("/metrics", metrics_app(m))``)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"GET only\n", b"text/plain; charset=utf-8")
            return
        body = await metrics.exposition()
        await _respond(send, 200, body, CONTENT_TYPE_LATEST.encode())

    return app


async def _respond(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def watch(runtime: Runtime) -> AsyncIterator[Metrics]:
    """The metrics of a runtime of this process, counted for the block::

    async with Runtime.open("app.db") as runtime, watch(runtime) as metrics:
        app.mount("/metrics", metrics_app(metrics))  # in the app's own ASGI server
    """
    metrics = Metrics(Source.of_runtime(runtime))
    async with anyio.create_task_group() as group:
        await group.start(metrics.run)
        try:
            yield metrics
        finally:
            group.cancel_scope.cancel()
