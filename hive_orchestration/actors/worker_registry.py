"""The WorkerRegistry actor: the one owner of every worker's record and liveness.

Every worker is in memory. A batch of requests is applied in memory and written as ONE
write (worker rows and events together); answers go out after the commit, and a failed
commit puts memory back as it was.

Liveness: a worker that sends no heartbeat for ``timeout`` seconds, and does no work
either, is declared offline (``worker.offline``), and the TaskManager is told to put what
it holds back in the queue. Work counts as a sign of life: the TaskManager tells
:class:`WorkersSeen` for the workers that claimed or used a lease in each of its batches.
That moves ``last_heartbeat`` in memory only (the stored row catches up with the worker's
next write), so a busy worker costs no extra commit.
Deadlines are a heap checked at the start of each batch and woken by an
:class:`~hive_orchestration.runtime.Alarm`; a heartbeat only moves the worker's time, and
a deadline that comes up early is pushed back to the real one, so the heap holds one
entry per live worker.

A sign of life sent before the batch that finds a worker's deadline due counts, however
late the registry takes it: a heartbeat or ``WorkersSeen`` in that batch, or still
waiting behind it (queued in the mailbox, or its sender waiting for room:
:meth:`~hive_orchestration.runtime.Actor.waiting`; a batch takes at most ``max_batch``
messages, and a flood leaves more behind), spares the worker, which is watched again from
a new deadline and renewed when its message is handled. The registry being busy past the
deadline does not make the worker late. A worker that sent nothing more is declared
offline by the first batch that begins after its deadline, flood or not: ``timeout`` after
its last sign of life was handled (a heartbeat: after its answer, which follows the batch's
commit, for the worker counts its next heartbeat from there), plus the alarm's wake-up and
the end of the batch in progress then (at most ``max_batch`` messages and one commit).
Looking into the mailbox costs a pass over it, only in a batch that finds a deadline due.
The other ways: not expiring while batches come full (more may be waiting) would need an
arbitrary bound on the extra time (a dead worker kept that much longer under a flood, a
heartbeat queued behind more than that still lost); stamping each heartbeat with its
sending time would count the registry's delay against the worker, whose heartbeat is an
ask: it sends the next one only once the registry has answered this one.
A worker that comes back (heartbeat) is live again; one that
registers again is a new *incarnation*: what the old one held is released, not
inherited. Unregistering a worker releases what it held too.

When the runtime opens, every live worker gets a whole ``timeout`` to heartbeat again
before it is declared offline.

Liveness runs on ``monotonic`` (the event loop's clock, the alarm's too): each worker's
last sign of life is kept as a monotonic time beside its ``last_heartbeat``, which is a
wall time, stored and shown only. A wall clock stepped forward therefore declares no live
worker offline, and one stepped back does not keep a dead one alive.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain

import anyio
import msgspec

from .._ids import new_id
from ..errors import ActorFailedError, HiveError, RuntimeStoppedError, StorageError
from ..messages.events import Event, JsonValue
from ..messages.storage import (
    AppendEvent,
    DeleteWorkerRow,
    FenceLeader,
    FenceWorker,
    LoadWorkers,
    PutWorker,
    StorageMessage,
    StoreFences,
    Write,
    WriteOp,
)
from ..messages.tasks import ReleaseWorker, TaskManagerMessage
from ..messages.workers import (
    GetActiveWorkers,
    GetWorker,
    GetWorkers,
    RegisterWorker,
    RegistryWake,
    UnregisterWorker,
    Worker,
    WorkerHeartbeat,
    WorkerRegistryMessage,
    WorkersLost,
    WorkersRecheck,
    WorkersSeen,
    WorkerStatus,
)
from ..runtime import Actor, ActorRef, Alarm, Envelope

__all__ = ["WorkerRegistry"]

log = logging.getLogger("hive_orchestration.workers")

_WRITES = (RegisterWorker, WorkerHeartbeat, UnregisterWorker)
_READS = (GetWorker, GetActiveWorkers, GetWorkers)


@dataclass(slots=True)
class _Batch:
    ops: list[WriteOp] = field(default_factory=list)
    undo: dict[str, Worker | None] = field(default_factory=dict)
    #: Workers whose claims the TaskManager must release once this batch is committed.
    releases: list[tuple[str, str]] = field(default_factory=list)
    answers: list[tuple[Envelope[WorkerRegistryMessage], object]] = field(default_factory=list)
    #: Workers whose own call (a heartbeat, a registration) this batch answers: their
    #: time runs from the answer (see receive_batch).
    #: None: none (no list made for a batch of others, nor for WorkersSeen taken inline).
    answered: list[str] | None = None
    #: On a store several nodes share: the workers other nodes watch, read for this
    #: batch's reads (None: no read in the batch, or one node).
    others: dict[str, Worker] | None = None

    def answer(self, worker_id: str) -> None:
        """``worker_id``'s own call is answered by this batch."""
        if self.answered is None:
            self.answered = [worker_id]
        else:
            self.answered.append(worker_id)


class WorkerRegistry(Actor[WorkerRegistryMessage]):
    max_batch = 1024

    def __init__(
        self,
        storage: ActorRef[StorageMessage],
        tasks: ActorRef[TaskManagerMessage],
        *,
        alarm: Alarm[WorkerRegistryMessage] | None = None,
        timeout: float = 30.0,
        publish_heartbeats: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._storage = storage
        self._tasks = tasks
        self._alarm = alarm
        self._timeout = timeout
        self._publish_heartbeats = publish_heartbeats
        self._clock = clock
        self._monotonic = monotonic  # the alarm's clock: deadlines run on it
        self._mono = 0.0  # read at the start of each batch
        self._workers: dict[str, Worker] = {}
        # Worker id -> its last sign of life, on the monotonic clock (kept after a failed
        # commit: the worker did call).
        self._alive: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []  # (heartbeat deadline, worker id)
        self._scheduled: set[str] = set()  # workers with an entry in the heap: one each
        self._shared = False  # a store several nodes share (PostgreSQL)

    async def started(self) -> None:
        self._shared = await self._storage.ask(StoreFences())
        workers = await self._storage.ask(LoadWorkers(watched=True))
        self._workers = {worker.id: worker for worker in workers}
        self._mono = self._monotonic()
        for worker in workers:
            if worker.status is not WorkerStatus.OFFLINE:
                self._alive[worker.id] = self._mono
                self._schedule(worker.id, self._mono + self._timeout)
        self._arm()
        log.info("worker registry: %d worker(s)", len(self._workers))

    def receive_inline(self, message: WorkerRegistryMessage) -> bool:
        # The TaskManager tells who is at work after each of its batches: while this actor
        # is idle, nothing is due and every worker named is live, that moves times in
        # memory only (what a batch would do, writing nothing), so it is done at once
        # in the sender's task rather than by waking this actor once per batch.
        if not isinstance(message, WorkersSeen):
            return False
        mono = self._monotonic()
        if self._deadlines and self._deadlines[0][0] <= mono:
            return False  # a deadline is due: a batch settles it, and may write
        workers = self._workers
        for worker_id in message.worker_ids:
            worker = workers.get(worker_id)
            if worker is not None and worker.status is WorkerStatus.OFFLINE:
                return False  # back to work: live again, written by a batch
        self._mono = mono
        now = self._clock()
        work = _Batch()
        for worker_id in message.worker_ids:
            self._seen(worker_id, work, now)
        assert not work.ops  # only live workers: memory only
        return True

    async def receive_batch(self, batch: Sequence[Envelope[WorkerRegistryMessage]]) -> None:
        now = self._clock()
        self._mono = self._monotonic()
        # The leader's duty (messages/workers.py): a write of its own, before the batch.
        for envelope in batch:
            if isinstance(envelope.message, WorkersLost):
                envelope.started = True
                envelope.resolve(await self._lost(envelope.message, now))
        batch = [e for e in batch if not isinstance(e.message, WorkersLost)]
        work = _Batch()
        rechecks = [e for e in batch if isinstance(e.message, WorkersRecheck)]
        if rechecks:
            batch = [e for e in batch if not isinstance(e.message, WorkersRecheck)]
            live = [w.id for w in self._workers.values() if w.status is not WorkerStatus.OFFLINE]
            await self._recheck(live, work)
            for envelope in rechecks:
                envelope.started = True
                envelope.resolve(None)
        expiring = self._expiring()
        # Read before anything is awaited: what was sent before the deadlines were looked at.
        renewed = self._renewed(expiring, batch) if expiring else set()
        if expiring and self._shared:
            # The leader may have declared them offline already (this node was stuck):
            # then they are offline here too, not declared (and logged) a second time.
            await self._recheck(expiring, work)
        if renewed:
            expiring = self._spare(expiring, renewed)
        self._expire(expiring, work, now)
        if self._shared and any(isinstance(e.message, _READS) for e in batch):
            try:
                work.others = await self._others()
            except StorageError as exc:
                for envelope in batch:
                    if isinstance(envelope.message, _READS):
                        envelope.started = True
                        envelope.fail(exc)
                batch = [e for e in batch if not isinstance(e.message, _READS)]
        for envelope in batch:
            envelope.started = True
            try:
                outcome = self._handle(envelope.message, work, now)
            except HiveError as exc:
                outcome = exc
            work.answers.append((envelope, outcome))
        error = await self._commit(work)
        if error is None:
            # Before answering: a worker that registered again and then claims finds its
            # old incarnation's claims already released (the TaskManager's mailbox is FIFO).
            await self._release(work.releases)
        else:
            self._restore(work)
        if work.answered is not None:
            # A worker sends its next heartbeat a while after the answer to this one (the
            # runner: a third of the timeout), so its time runs from the answer, not from
            # the start of the batch: a commit held up (a slow fsync, a database backend
            # waiting for a CPU) is the registry's delay, not the worker's. Counted from
            # the batch's start, a 1 s timeout with a commit of 0.7 s or more declared
            # offline a worker whose next heartbeat came a third of it after the answer.
            # (An entry in the heap, coming up early, is pushed back to the real deadline.)
            answered = self._monotonic()
            alive = self._alive
            for worker_id in work.answered:
                if worker_id in alive:
                    alive[worker_id] = answered
        for envelope, outcome in work.answers:
            if error is not None and isinstance(envelope.message, _WRITES):
                envelope.fail(error)
            elif isinstance(outcome, HiveError):
                envelope.fail(outcome)
            else:
                envelope.resolve(outcome)
        self._arm()

    def _handle(self, message: WorkerRegistryMessage, work: _Batch, now: datetime) -> object:
        match message:
            case RegisterWorker():
                return self._register(message, work, now)
            case GetWorker(worker_id=worker_id):
                held = self._workers.get(worker_id)
                return held if held is not None or not work.others else work.others.get(worker_id)
            case GetActiveWorkers(role=role):
                live = [
                    worker
                    for worker in self._every(work)
                    if worker.status is not WorkerStatus.OFFLINE
                    and (role is None or worker.role == role)
                ]
                live.sort(key=lambda worker: worker.last_heartbeat, reverse=True)
                return live
            case GetWorkers(status=status):
                found = [w for w in self._every(work) if status is None or w.status is status]
                found.sort(key=lambda worker: worker.last_heartbeat, reverse=True)
                return found
            case WorkerHeartbeat(worker_id=worker_id, status=status):
                work.answer(worker_id)
                return self._heartbeat(worker_id, status, work, now)
            case UnregisterWorker(worker_id=worker_id):
                worker = self._workers.get(worker_id)
                if worker is None:
                    return False
                self._touch(worker_id, work)
                del self._workers[worker_id]
                work.ops.append(DeleteWorkerRow(worker_id))
                work.ops.append(self._event("worker.unregistered", worker, now, {}))
                work.releases.append((worker_id, "worker unregistered"))
                return True
            case WorkersSeen(worker_ids=worker_ids):
                for worker_id in worker_ids:
                    self._seen(worker_id, work, now)
                return None
            case RegistryWake():
                return None  # what was due was settled when the batch began
        raise HiveError(f"the worker registry does not handle {type(message).__name__}")

    async def _others(self) -> dict[str, Worker]:
        """The workers of the other nodes of a shared store, as their rows stand: each
        node writes its own workers' rows, and only it knows their last sign of life to
        the moment (a busy worker's row catches up with its next write)."""
        stored = await self._storage.ask(LoadWorkers())
        return {worker.id: worker for worker in stored if worker.id not in self._workers}

    def _every(self, work: _Batch) -> list[Worker]:
        """This node's workers, and on a shared store the other nodes' too."""
        mine = list(self._workers.values())
        return mine if not work.others else mine + list(work.others.values())

    def _register(self, message: RegisterWorker, work: _Batch, now: datetime) -> Worker:
        previous = self._workers.get(message.worker_id)
        worker = Worker(
            id=message.worker_id,
            role=message.role,
            capabilities=message.capabilities,
            metadata=message.metadata,
            incarnation=new_id(),
            last_heartbeat=now,
            registered_at=now if previous is None else previous.registered_at,
        )
        self._put(worker, work)
        data: dict[str, JsonValue] = {
            "role": worker.role,
            "capabilities": list(worker.capabilities),
            "incarnation": worker.incarnation,
            "again": previous is not None,
        }
        work.ops.append(self._event("worker.registered", worker, now, data))
        self._alive[worker.id] = self._mono
        work.answer(worker.id)
        self._schedule(worker.id, self._mono + self._timeout)
        if previous is not None:
            # A worker that registers again restarted: its old incarnation is gone.
            work.releases.append((worker.id, "worker registered again (a new incarnation)"))
        return worker

    def _heartbeat(
        self, worker_id: str, status: WorkerStatus | None, work: _Batch, now: datetime
    ) -> bool:
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        was_offline = worker.status is WorkerStatus.OFFLINE
        if status is None:
            status = WorkerStatus.ACTIVE if was_offline else worker.status
        updated = msgspec.structs.replace(worker, status=status, last_heartbeat=now)
        self._put(updated, work)
        self._alive[worker_id] = self._mono
        if status is not worker.status:
            data: dict[str, JsonValue] = {"status": status.value, "previous": worker.status.value}
            event = "worker.offline" if status is WorkerStatus.OFFLINE else "worker.status_changed"
            work.ops.append(self._event(event, updated, now, data))
        elif self._publish_heartbeats:
            work.ops.append(self._event("worker.heartbeat", updated, now, {}))
        if status is WorkerStatus.OFFLINE and not was_offline:
            work.releases.append((worker_id, "worker went offline"))
        elif was_offline and status is not WorkerStatus.OFFLINE:
            self._schedule(worker_id, self._mono + self._timeout)
        return True

    def _seen(self, worker_id: str, work: _Batch, now: datetime) -> None:
        worker = self._workers.get(worker_id)
        if worker is None:
            return  # workers need not register to work
        if worker.status is WorkerStatus.OFFLINE:
            self._heartbeat(worker_id, None, work, now)  # back to work: live again, written
            return
        # In memory only; the deadline already in the heap is pushed back when it comes
        # up early (see _expire).
        self._alive[worker_id] = self._mono
        if worker.last_heartbeat < now:
            self._workers[worker_id] = msgspec.structs.replace(worker, last_heartbeat=now)

    def _expiring(self) -> list[str]:
        """The live workers whose heartbeat deadline has passed (their entries taken off
        the heap; an entry that came up early is pushed back to its real deadline)."""
        mono = self._mono
        deadlines = self._deadlines
        expiring: list[str] = []
        while deadlines and deadlines[0][0] <= mono:
            _, worker_id = heapq.heappop(deadlines)
            self._scheduled.discard(worker_id)
            worker = self._workers.get(worker_id)
            if worker is None:
                self._alive.pop(worker_id, None)  # unregistered
                continue
            if worker.status is WorkerStatus.OFFLINE:
                continue
            due = self._alive.get(worker_id, mono) + self._timeout
            if due > mono:
                self._schedule(worker_id, due)  # it heartbeat since
                continue
            expiring.append(worker_id)
        return expiring

    def _renewed(
        self, expiring: list[str], batch: Sequence[Envelope[WorkerRegistryMessage]]
    ) -> set[str]:
        """Of ``expiring``, those with a sign of life in ``batch`` or waiting behind it.
        Every message of the batch, and every one still waiting (:meth:`waiting`: queued,
        or its sender waiting for room), was sent before this batch looked at the
        deadlines, so a heartbeat or a :class:`WorkersSeen` among them was sent in time
        even when the registry, busy, takes it only now or several batches later."""
        wanted = set(expiring)
        renewed: set[str] = set()
        messages = chain((envelope.message for envelope in batch), self.waiting())
        for message in messages:  # no await: the mailbox must not change meanwhile
            match message:
                case WorkerHeartbeat(worker_id=worker_id) if worker_id in wanted:
                    renewed.add(worker_id)
                case WorkersSeen(worker_ids=worker_ids):
                    renewed.update(wanted.intersection(worker_ids))
                case _:
                    continue
            if len(renewed) == len(wanted):
                break  # every one found: the rest need not be read
        return renewed

    def _spare(self, expiring: list[str], renewed: set[str]) -> list[str]:
        """``expiring`` but the ``renewed``: those are not declared offline, and are
        watched again from a new deadline (the handling of their message moves their time,
        and the entry, coming up early, is pushed back to it)."""
        for worker_id in expiring:
            if worker_id in renewed:
                self._schedule(worker_id, self._mono + self._timeout)
        return [worker_id for worker_id in expiring if worker_id not in renewed]

    def _expire(self, expiring: list[str], work: _Batch, now: datetime) -> None:
        """Declare offline the ``expiring`` workers (:meth:`_expiring`) still live."""
        for worker_id in expiring:
            worker = self._workers.get(worker_id)
            if worker is None or worker.status is WorkerStatus.OFFLINE:
                continue  # the leader declared it offline (:meth:`_recheck`)
            offline = msgspec.structs.replace(worker, status=WorkerStatus.OFFLINE)
            self._put(offline, work)
            data: dict[str, JsonValue] = {
                "status": WorkerStatus.OFFLINE.value,
                "previous": worker.status.value,
                "last_heartbeat": worker.last_heartbeat.isoformat(),
                "timeout": self._timeout,
            }
            work.ops.append(self._event("worker.offline", offline, now, data))
            work.releases.append((worker_id, f"no heartbeat for {self._timeout:g}s"))
            log.warning("worker %r missed its heartbeats; declared offline", worker_id)

    async def _lost(self, message: WorkersLost, now: datetime) -> int:
        """Declare offline, as :meth:`_expire` does, the live workers of dead nodes (no
        one hears their heartbeats), in one write fenced by the leader's epoch and by each
        row still naming its dead node. They are this node's to watch from then on."""
        work = _Batch()
        fences: list[WriteOp] = [FenceLeader(message.epoch)]
        for worker, node in zip(message.workers, message.dead_nodes, strict=True):
            known = self._workers.get(worker.id)
            if worker.status is WorkerStatus.OFFLINE or (
                known is not None and known.status is not WorkerStatus.OFFLINE
            ):
                continue  # it came back here meanwhile
            fences.append(FenceWorker(worker.id, node))
            offline = msgspec.structs.replace(worker, status=WorkerStatus.OFFLINE)
            self._put(offline, work)
            data: dict[str, JsonValue] = {
                "status": WorkerStatus.OFFLINE.value,
                "previous": worker.status.value,
                "last_heartbeat": worker.last_heartbeat.isoformat(),
                "timeout": self._timeout,
                "node_id": node,
            }
            work.ops.append(self._event("worker.offline", offline, now, data))
        if not work.ops:
            return 0
        work.ops[:0] = fences
        if await self._commit(work) is not None:
            self._restore(work)  # the role moved on, or the worker came back elsewhere
            return 0
        for worker_id in work.undo:
            log.warning("worker %r was watched by a dead node; declared offline", worker_id)
        return len(work.undo)

    async def _recheck(self, worker_ids: Sequence[str], work: _Batch) -> None:
        """On a shared store, of ``worker_ids`` (live here): those whose rows the leader
        declared offline while this node did not act (``WorkersLost``: it took the node
        for stuck) are offline here too, with nothing written or logged again, and what
        they held is released after the batch's commit. Each one's next call makes it
        live again (written), as after a missed heartbeat here. Asked after this node
        did not act for a while (:class:`WorkersRecheck`), and before it declares any
        worker offline itself."""
        if not self._shared or not worker_ids:
            return
        try:
            stored = {worker.id: worker for worker in await self._storage.ask(LoadWorkers())}
        except HiveError as exc:
            log.warning("could not read the workers' rows: %s", exc)
            return
        for worker_id in worker_ids:
            worker = self._workers.get(worker_id)
            row = stored.get(worker_id)
            if worker is None or worker.status is WorkerStatus.OFFLINE:
                continue
            if row is None or row.status is not WorkerStatus.OFFLINE:
                continue
            self._workers[worker_id] = msgspec.structs.replace(worker, status=WorkerStatus.OFFLINE)
            work.releases.append((worker_id, "declared offline by the leader: this node was stuck"))
            log.warning("worker %r was declared offline while this node did not act", worker_id)

    # -- helpers -----------------------------------------------------------------------------

    def _schedule(self, worker_id: str, at: float) -> None:
        """Check ``worker_id`` at ``at`` unless it already has an entry (which, when it
        comes up early, is pushed back to the worker's real deadline)."""
        if worker_id not in self._scheduled:
            self._scheduled.add(worker_id)
            heapq.heappush(self._deadlines, (at, worker_id))

    def _touch(self, worker_id: str, work: _Batch) -> None:
        if worker_id not in work.undo:
            work.undo[worker_id] = self._workers.get(worker_id)

    def _put(self, worker: Worker, work: _Batch) -> None:
        self._touch(worker.id, work)
        self._workers[worker.id] = worker
        work.ops.append(PutWorker(worker))

    def _restore(self, work: _Batch) -> None:
        for worker_id, worker in work.undo.items():
            if worker is None:
                self._workers.pop(worker_id, None)
            else:
                self._workers[worker_id] = worker
                if worker.status is not WorkerStatus.OFFLINE:
                    alive = self._alive.setdefault(worker_id, self._mono)
                    self._schedule(worker_id, alive + self._timeout)
        log.warning("commit failed; %d worker(s) restored in memory", len(work.undo))

    async def _commit(self, work: _Batch) -> HiveError | None:
        if not work.ops:
            return None
        reply = await self._storage.request(Write(tuple(work.ops)))
        try:
            # No deadline: the storage batch is shielded and always ends; giving up early
            # could put memory back while the write still lands.
            await reply.wait()
        except StorageError as exc:
            return exc  # rolled back whole
        except HiveError as exc:
            # Outcome unknown: fail this batch's askers and restart from the database.
            for envelope, _ in work.answers:
                envelope.fail(ActorFailedError(self.name, exc))
            raise RuntimeError(f"storage did not say whether a batch was committed: {exc}") from exc
        return None

    async def _release(self, releases: list[tuple[str, str]]) -> None:
        for worker_id, reason in releases:
            try:
                await self._tasks.tell(ReleaseWorker(worker_id=worker_id, reason=reason))
            except RuntimeStoppedError:
                # Shutting down: the next open requeues whatever was still held.
                log.debug("task manager stopped; %r's claims left to recovery", worker_id)

    def _event(
        self, event_type: str, worker: Worker, now: datetime, data: dict[str, JsonValue]
    ) -> AppendEvent:
        event = Event(
            type=event_type,
            timestamp=now.timestamp(),
            source=worker.id,
            worker_id=worker.id,
            data=data,
        )
        return AppendEvent(event, msgspec.json.encode(data))

    def _arm(self) -> None:
        if self._alarm is None:
            return
        wake = self._deadlines[0][0] if self._deadlines else None
        if wake != self._alarm.at:
            self._alarm.set(wake)
