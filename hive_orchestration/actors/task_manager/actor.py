"""The TaskManager actor: the one owner of every task, every run and every claim.

It keeps in memory the claimed tasks (assigned, running), the head of each ready queue
(:mod:`.heads`), the most recently finished tasks, and the runs of all of these, and is the only
code that changes tasks and runs. It handles a batch of requests at
a time: each is checked against the state machine (:mod:`.machine`) and applied in memory, and the
whole batch's changes (task rows, run rows and events, in order) go to the storage actor
as ONE write, so that state and event log are committed together. Only after that commit
does any requester get its answer. If the commit fails, memory is put back exactly as it
was before the batch (an undo record per task and per idempotency key) and every change
of the batch is refused with the storage error.

The rest of it, by responsibility:

- :mod:`.state`: the types the modules share: a batch's work and undo, a claim's deadlines
- :mod:`.machine`: the state machine: transitions, runs closed, requeues and attempts
- :mod:`.leases`: leases (the proof of a claim, heartbeats), the clocks, deadlines, the alarm
- :mod:`.claims`: parked claims, and handing out ready tasks to them
- :mod:`.timers`: delayed tasks, expiries and rate limits
- :mod:`.memory`: what memory holds: undo after a failed commit, the ready index, letting go
- :mod:`.heads`: the heads of the ready queues read from storage, and tasks read when asked for
- :mod:`.fencing`: several nodes: fenced writes, conflicts decided again, the sweep
- :mod:`.idempotency`: the idempotency keys of a batch's creates, looked up in storage
- :mod:`.requests`: the requests, each checked and applied in memory
- :mod:`.answers`: a batch's commit and answers, and the plan barrier
- :mod:`.opening`: opening: loading, and recovery of the claims of a process that died
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime

import anyio

from ...errors import ActorFailedError, HiveError, RuntimeStoppedError
from ...messages.leader import RecoverClaims
from ...messages.storage import AppendEvent, StorageMessage, WriteOp
from ...messages.tasks import (
    PLAN_TASK_ENDINGS,
    CancelTask,
    Claim,
    ClaimTask,
    ClaimTasks,
    CompleteTask,
    CompleteTasks,
    DeleteTask,
    FailTask,
    FailTasks,
    FlushQueue,
    PurgeTasks,
    ReadyElsewhere,
    ReleaseWorker,
    RevokedTaskType,
    Run,
    Task,
    TaskManagerMessage,
    UpdateTaskStatus,
)
from ...messages.workers import WorkerRegistryMessage, WorkersSeen
from ...runtime import Actor, ActorRef, Alarm, Deadlines, Envelope, Request
from . import (
    answers,
    claims,
    fencing,
    heads,
    idempotency,
    leases,
    machine,
    memory,
    opening,
    requests,
    retention,
    timers,
)
from .delays import Frame, Timers
from .fencing import _ATTEMPTS
from .limits import RateLimits
from .machine import LIVE, TRANSITIONS
from .ready import ReadyQueue
from .state import _Batch, _Due, _Forward, _Refill, _Waiter

__all__ = ["LIVE", "TRANSITIONS", "TaskManager"]


_LEASED = leases.LEASED
_LEASED_BATCHES = leases.LEASED_BATCHES
#: Requests from outside the plan executor that can end a plan's task: with a plan
#: barrier, their answers wait until the plan executor has applied what the end caused.
#: (The plan executor's own requests are never held: it waits for them.)
_ENDS_PLAN_TASKS = (
    UpdateTaskStatus,
    CancelTask,
    DeleteTask,
    CompleteTask,
    CompleteTasks,
    FailTask,
    FailTasks,
    ReleaseWorker,
    FlushQueue,
)


class TaskManager(Actor[TaskManagerMessage]):
    # Requests that arrive while a batch is being committed are handled as the next batch.
    max_batch = 1024

    def __init__(
        self,
        storage: ActorRef[StorageMessage],
        *,
        workers: ActorRef[WorkerRegistryMessage] | None = None,
        alarm: Alarm[TaskManagerMessage] | None = None,
        recover: bool = False,
        on_recovered: Callable[[], None] | None = None,
        recent: int = 10_000,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        concurrency_limits: Mapping[str, int] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = anyio.current_time,
        rng: random.Random | None = None,
        plan_barrier: bool = False,
        ready_head: int = 1024,
        rate_limits: Mapping[str, tuple[int, float]] | None = None,
        key_rate_limits: Mapping[str, tuple[int, float]] | None = None,
        frame: Frame | None = None,
        delete_on_success: frozenset[str] = frozenset(),
        sweep_interval: float = 1.0,
    ) -> None:
        self._storage = storage
        # Task types whose tasks are deleted as they complete ("*": every type).
        self._delete_on_success = delete_on_success
        # How many of each ready queue's best tasks memory holds; it reads the next ones
        # when fewer than half are left, and lets go of the worst when over twice as many.
        self._head = max(1, ready_head)
        self._low = max(1, self._head // 2)
        # Tasks this batch left out of memory's heads (queued after their queue's bound,
        # or blocked): memory lets go of them once the batch is committed.
        self._spill: set[str] = set()
        self._refilling: _Refill | None = None  # the read of heads in flight, if any
        self._workers = workers
        self._alarm = alarm
        self._recover = recover
        self._on_recovered = on_recovered
        self._clock = clock
        self._monotonic = monotonic  # the alarm's clock: deadlines run on it
        # Both clocks, read together at the start of the batch: a wall time set in the
        # batch (now + a span) is that span after _mono on the monotonic clock.
        self._wall = datetime.fromtimestamp(0, UTC)
        self._mono = 0.0
        self._recent_limit = recent
        self._backoff_base = retry_backoff
        self._backoff_max = retry_backoff_max
        self._type_limits = dict(concurrency_limits or {})
        # Task types whose tasks are not handed out (control.py), durable in their table;
        # the ready queue reads the same dict.
        self._revoked: dict[str, RevokedTaskType] = {}
        self._rng = rng or random.Random()
        self._tasks: dict[str, Task] = {}  # claimed, heads of queues, recently finished
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished, oldest first
        # Idempotency key -> task id, for the tasks in memory only: the keys of tasks that
        # left memory are looked up in storage (see _look_up_keys).
        self._keys: dict[str, str] = {}
        self._runs: dict[str, Run] = {}
        self._runs_of: dict[str, tuple[str, ...]] = {}  # task id -> its runs' ids, in order
        # Derived from the above (rebuilt by _reindex): what can be handed out, which run
        # holds each claimed task, and the claimed runs' next deadlines.
        self._ready = ReadyQueue(self._type_limits, revoked=self._revoked)
        self._held: dict[str, str] = {}  # task id -> the run holding its claim
        # Run id -> its lease or timeout, one entry per claim (moved, not added to, when a
        # heartbeat moves it; dropped when the claim ends), so it stays O(live claims).
        self._deadlines: Deadlines[str] = Deadlines()
        # Monotonic deadlines of what is stored as wall times: each claimed run's lease and
        # timeout, each queued task's end of backoff (kept across _reindex, and put back
        # with the tasks after a failed commit).
        self._due: dict[str, _Due] = {}  # run id -> its deadlines
        self._ready_at: dict[str, float] = {}  # task id -> when its backoff ends
        # The queued tasks among those whose backoff this node decided (a retry it
        # queued), not read from storage: on a store several nodes share, only these
        # end their backoff by this node's clock; a stored backoff read back ends by the
        # database's (claims.lock_claims). Kept with _ready_at, and put back with it.
        self._own_backoffs: set[str] = set()
        # On a store several nodes share: the database's clock when this node's monotonic
        # clock read 0, never behind it, from its readings (at start-up, then at each lock
        # of ready rows: leases.read_database_clock). What it stores as the end of a retry
        # backoff, and what remains of one it reads back, are by that clock
        # (leases.backoff_until), which every node's claims read it due by; a step of this
        # node's wall clock plays no part. None on a store of one owner.
        self._db_epoch: datetime | None = None
        # Parked claims, first come first served, and their wait deadlines (one each).
        self._waiters: dict[int, _Waiter] = {}
        self._waits: Deadlines[int] = Deadlines()
        self._next_waiter = 0
        # The plan barrier: answers to requests that ended a plan's task, held until the
        # plan executor says it has applied the events up to their seq (PlansSettled), so
        # that the caller's next read of the plan sees what the end released.
        self._plan_barrier = plan_barrier
        self._plans_settled = 0
        # Delayed tasks' start times and queued tasks' expiries (delays.py): the earliest
        # of each, read from storage a range at a time, with their monotonic deadlines.
        self._starts = Timers("run_at", self._head)
        self._expiries = Timers("expires_at", self._head)
        self._frame = frame or Frame()  # the process's: read at the first start
        self._timers_failed: float | None = None  # when a read of them last failed
        # At most N claims per interval of a task type or concurrency key (limits.py).
        self._limits = RateLimits(rate_limits, key_rate_limits)
        self._held_back: deque[tuple[int, list[tuple[Envelope[TaskManagerMessage], object]]]] = (
            deque()
        )
        # A store shared by several nodes (PostgreSQL; learnt at start-up): another node
        # may change any task at any time, so memory is the truth for this node's own
        # live claims only. Each write of an existing task is fenced by the version
        # memory read it at (task id -> version); a write that finds another version is
        # a conflict: memory reads those tasks again and the batch is decided again
        # (_refresh). The heads are read again from the best every sweep_interval, so
        # that tasks queued by other nodes are handed out here too.
        self._fenced = False
        self._versions: dict[str, int] = {}
        self._sweep_interval = sweep_interval
        self._next_sweep = 0.0
        # Concurrency keys held back after a conflict (maybe held by other nodes to their
        # limit), until the next sweep.
        self._paused_keys: set[str] = set()
        self._conflicted = False
        # Queues other nodes made tasks ready in (ReadyElsewhere), not yet locked by a
        # claim here: the next claims that take from them lock their rows.
        self._woken: set[tuple[str, tuple[str, ...], str | None]] = set()
        # When a queue's first task still in a retry backoff comes due, by the database's
        # clock, as the last lock of the queue said (claims.backoffs_end): one per queue.
        self._backoff_ends: Deadlines[tuple[str, tuple[str, ...], str | None]] = Deadlines()
        # The batch being decided: a crash in it fails its answers to claims parked
        # before it (a wait it found over, a task it handed out), which are parked no
        # longer and are not among its own messages (those the actor's loop fails).
        self._work: _Batch | None = None

    async def stopped(self, error: BaseException | None) -> None:
        # Held-back answers are of committed changes: they are true whatever happens next.
        self._release_held_back(None)
        cancelled = anyio.get_cancelled_exc_class()
        if error is not None and self._work is not None:
            failure: BaseException = (
                RuntimeStoppedError("the runtime stopped")
                if isinstance(error, cancelled)
                else ActorFailedError(self.name, error)
            )
            for envelope, _ in self._work.answers:
                envelope.fail(failure)  # answered already: nothing
        # Parked claims are nobody else's to answer.
        for waiter in self._waiters.values():
            if error is None:
                waiter.envelope.resolve(waiter.nothing)  # a clean stop: no task for it
            elif isinstance(error, cancelled):
                waiter.envelope.fail(RuntimeStoppedError("the runtime stopped"))
            else:
                waiter.envelope.fail(ActorFailedError(self.name, error))
        self._waiters.clear()
        self._waits.clear()

    @property
    def deadline_entries(self) -> int:
        """Deadlines kept (leases and timeouts of claims, waits of parked claims): one per
        live claim and parked claim, whatever the heartbeats and claims before."""
        return len(self._deadlines) + len(self._waits)

    # -- the batch loop ----------------------------------------------------------------------

    async def receive_batch(self, batch: Sequence[Envelope[TaskManagerMessage]]) -> None:
        # The leader's duties (messages/leader.py; a purge chunk of the automatic
        # policy): each a write of its own, before the batch, fenced by the epoch.
        duties = [e for e in batch if _is_duty(e.message)]
        for envelope in duties:
            envelope.started = True
            message = envelope.message
            try:
                if isinstance(message, RecoverClaims):
                    outcome: object = await self._recover_claims(self._read_clocks(), message)
                else:
                    assert isinstance(message, PurgeTasks)
                    outcome = await retention.purge_as_leader(self, message)
            except HiveError as exc:  # its read or write failed: the leader tries again
                envelope.fail(exc)
            else:
                envelope.resolve(outcome)
        if duties:
            batch = [e for e in batch if not _is_duty(e.message)]
        # Other nodes queued tasks (NOTIFY): the claims parked here look again.
        woken = [e for e in batch if isinstance(e.message, ReadyElsewhere)]
        for envelope in woken:
            envelope.started = True
            assert isinstance(envelope.message, ReadyElsewhere)
            self._ready_elsewhere(envelope.message)
            envelope.resolve(None)
        if woken:
            batch = [e for e in batch if not isinstance(e.message, ReadyElsewhere)]
        # On a store shared by several nodes a write may conflict with another node's
        # (_refresh): the batch is decided again on the tasks as they are now, up to
        # _ATTEMPTS times; the last attempt answers a conflict as the storage error.
        for attempt in range(_ATTEMPTS):
            if attempt:
                # Nodes that raced for the same tasks try again at different moments
                # (jittered, growing, at most 50 ms), not in step with each other.
                await anyio.sleep(self._rng.random() * min(0.05, 0.001 * 2**attempt))
            if await self._decide(batch, may_retry=self._fenced and attempt + 1 < _ATTEMPTS):
                break
        self._work = None  # decided and answered
        self._evict()
        # Heads that ran under half: their next tasks are read while the next batches
        # go on (one read at a time), and taken in before the first batch after it.
        if self._refilling is None:
            self._refilling = await self._send_refill(self._ready.low(self._low))
        self._arm()

    async def _decide(
        self, batch: Sequence[Envelope[TaskManagerMessage]], *, may_retry: bool
    ) -> bool:
        """Handle ``batch`` once: decide, commit, answer. ``False``: its write conflicted
        with another node's, nothing of it was applied or answered, and memory was read
        again: decide it again."""
        work = self._work = _Batch(may_retry=may_retry)
        refill = self._refilling
        if refill is not None and refill.reply.done:
            await self._take_refill(refill)  # the heads read since the last batch
        if self._fenced and self._monotonic() >= self._next_sweep:
            await self._sweep()
        await self._look_up_keys(batch, work)
        now = self._read_clocks()
        self._settle_due(work, now, batch)
        if self._fenced:
            self._wake_backoffs()
        await self._settle_timers(work, now)
        forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]] = []
        seen: set[str] = set()  # workers at work in this batch
        for envelope in batch:
            envelope.started = True
            message = envelope.message
            if isinstance(message, ClaimTask | ClaimTasks):
                seen.add(message.worker_id)
                self._park(envelope, message, work, now)
                continue
            mark = len(work.ops)
            try:
                outcome = await self._handle(message, work, now)
            except HiveError as exc:
                outcome = exc
            else:
                if isinstance(message, _LEASED):  # a refused (stale) token is no sign of life
                    self._saw(message.lease.run_id, seen)
                elif isinstance(message, _LEASED_BATCHES):
                    assert isinstance(outcome, tuple)
                    leases = [item.lease for item in message.items]
                    for lease, done in zip(leases, outcome, strict=True):
                        if done.refused is None:
                            self._saw(lease.run_id, seen)
                if (
                    self._plan_barrier
                    and isinstance(message, _ENDS_PLAN_TASKS)
                    and _ends_a_plan_task(work.ops, mark)
                ):
                    work.plan_enders.add(id(envelope))
            if isinstance(outcome, _Forward):
                forwards.append((envelope, outcome.request))
            else:
                work.answers.append((envelope, outcome))
        if seen and self._workers is not None:
            self._report_seen(seen)  # before the answers: a caller then finds it alive
        self._dispatch_later(work, now)
        unclaimed: list[Claim] = []
        starved = False
        follow_ups = 0
        while True:
            outcome = await self._finish(work, forwards, now)
            if outcome is None:  # a conflict: memory was read again
                if not follow_ups:
                    return False  # the whole batch again
            else:
                unclaimed, starved = outcome, work.starved
                if not unclaimed and not starved:
                    return True
            # Claims whose askers left before the answer: hand the tasks back (and on to
            # whoever is waiting), as one more batch. Claims that a drained head starved:
            # read its next tasks, then hand them out. (After a conflict: the same again.)
            follow_ups += 1
            work = self._work = _Batch(may_retry=self._fenced and follow_ups < _ATTEMPTS)
            forwards = []
            refilled = await self._refill_now() if starved else True
            for claim in unclaimed:
                self._release_unclaimed(claim, work, now)
            self._dispatch_later(work, now, refilled=refilled)

    def _saw(self, run_id: str, seen: set[str]) -> None:
        """A request of the claim of run ``run_id`` was taken: its worker is at work."""
        run = self._runs.get(run_id)
        if run is not None and run.worker_id is not None:
            seen.add(run.worker_id)

    def _report_seen(self, seen: set[str]) -> None:
        """Tell the registry who is at work, so a busy worker is not declared offline
        for want of a registry heartbeat. Best effort: with its mailbox full, the next
        batch tells it again."""
        assert self._workers is not None
        with suppress(RuntimeStoppedError):  # shutting down
            self._workers.try_tell(WorkersSeen(tuple(seen)))

    # The rest of the TaskManager lives in the modules of its responsibilities, as
    # functions that take it as their first argument; named here, they are its
    # methods (self._transition(...)), which other modules call.
    # machine.py
    _close_run = machine.close_run
    _requeue = machine.requeue
    _backoff = machine.backoff
    _end_claim = machine.end_claim
    _release_worker = machine.release_worker
    _update = machine.update
    _transition = machine.transition
    _event = machine.event
    # leases.py
    _read_clocks = leases.read_clocks
    _from_wall = leases.from_wall
    _due_from_wall = leases.due_from_wall
    _backoff_end = leases.backoff_end
    _backoff_until = leases.backoff_until
    _read_database_clock = leases.read_database_clock
    _settle_due = leases.settle_due
    _arm = leases.arm
    _holding = leases.holding
    _heartbeat = leases.heartbeat
    _renewed_from_answer = leases.renewed_from_answer
    _claimed_from_answer = leases.claimed_from_answer
    # claims.py
    _park = claims.park
    _dispatch = claims.dispatch
    _dispatch_later = claims.dispatch_later
    _lock_claims = claims.lock_claims
    _decide_locked = claims.decide_locked
    _ready_elsewhere = claims.ready_elsewhere
    _wake_backoffs = claims.wake_backoffs
    _unpark = claims.unpark
    _assign = claims.assign
    _start = claims.start_run
    _release_unclaimed = claims.release_unclaimed
    # timers.py
    _times = timers.times
    _time = timers.time_task
    _untime = timers.untime_task
    _load_timers = timers.load_timers
    _timers_due = timers.timers_due
    _settle_timers = timers.settle_timers
    _expire = timers.expire
    _pop = timers.pop_ready
    _load_starts = timers.load_starts
    _count_start = timers.count_start
    # memory.py
    _touch = memory.touch
    _set_key = memory.set_key
    _restore = memory.restore
    _reindex = memory.reindex
    _index = memory.index
    _remember_run = memory.remember_run
    _drop = memory.drop
    _evict = memory.evict
    # heads.py
    _send_refill = heads.send_refill
    _refill_now = heads.refill_now
    _take_refill = heads.take_refill
    _take_in = heads.take_in
    _shed = heads.shed
    _fetch = heads.fetch
    # fencing.py
    _fences = fencing.fences
    _bump = fencing.bump
    _repark = fencing.repark
    _refresh = fencing.refresh
    _sweep = fencing.sweep
    # idempotency.py
    _look_up_keys = idempotency.look_up_keys
    # requests.py
    _handle = requests.handle
    _create = requests.create
    _update_run = requests.update_run
    _create_run = requests.create_run
    _delete = requests.delete
    _delete_task = requests.delete_task
    _purge = requests.purge
    _remove = requests.remove
    _cursor = requests.cursor
    _list = requests.list_page
    _find = requests.find
    # answers.py
    _finish = answers.finish
    _plan_barrier_seq = answers.plan_barrier_seq
    _release_held_back = answers.release_held_back
    _commit = answers.commit
    _forward = answers.forward
    # opening.py
    started = opening.started
    _recover_claims = opening.recover_claims


def _is_duty(message: TaskManagerMessage) -> bool:
    """Whether ``message`` is a duty of the leader of several nodes (its own write)."""
    return isinstance(message, RecoverClaims) or (
        isinstance(message, PurgeTasks) and message.epoch is not None
    )


def _ends_a_plan_task(ops: list[WriteOp], start: int) -> bool:
    """Whether ``ops[start:]`` log the end of a plan's task."""
    for op in ops[start:]:
        if isinstance(op, AppendEvent):
            event = op.event
            if event.plan_id is not None and event.type in PLAN_TASK_ENDINGS:
                return True
    return False
