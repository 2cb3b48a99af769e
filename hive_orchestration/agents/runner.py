"""Running agents: each copy of each registered agent is a worker of the runtime.

``async with AgentRunner(runtime, registry):`` starts, for every agent, ``copies``
workers named ``<agent_type>-<n>`` (or ``<worker_prefix>-<n>``). Each registers (with
the agent's capabilities), heartbeats on its own, and loops: claim and start a task it can
take in one commit (waiting, not polling), run the handler, then complete the task with
the handler's result or fail it with the handler's exception (the agent carries on).
While the handler runs, the lease is renewed in the background; the handler is cancelled
if the task is cancelled (``cancel_task``), if its lease is lost, or at the task's
``timeout`` (the run then ends timed out).

Leaving the block stops the copies: they claim nothing more, in-flight handlers get
``stop_timeout`` seconds to finish and report, and past that they are cancelled and their
tasks handed back to the queue (``release_task``: not counted as an attempt). The workers
are then unregistered. No task is left running and none is lost. If the runtime goes away
on its own (it stops, or the connection to it breaks), the copies stop: :meth:`wait`
returns and :attr:`stopped_by` says why.

A handler's exception fails its run; ``retry_on`` and ``fail_on`` say whether the task may
be tried again (while attempts remain) or fails for good at once (see :mod:`.retry`).

``runtime`` is a :class:`~hive_orchestration.Runtime` or an
:class:`~hive_orchestration.OrchestrationClient`, which may be a client of the runtime of
another process: then every copy's calls, heartbeats as much as work, travel on that
client's one connection. If it breaks, the owner declares the copies offline and requeues
their tasks at once, and here their handlers are cancelled and the copies stop.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeAlias

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .._groups import leaves
from .._trace import run_span
from ..errors import (
    ConnectionLostError,
    HiveError,
    InvalidInputError,
    LeaseLostError,
    RuntimeStoppedError,
)
from ..messages.plan_data import DependencyResult
from ..messages.tasks import Claim, Lease, Task
from .registry import AgentRegistry, AgentSpec
from .retry import RetryPolicy

if TYPE_CHECKING:
    from ..api.client import OrchestrationClient
    from ..api.embedded import Runtime
    from ..config import RuntimeConfig

    #: What the runner talks to: the runtime, or a client (of it, or of another process's).
    Target: TypeAlias = Runtime | OrchestrationClient

__all__ = ["AgentRunner", "TaskContext"]

log = logging.getLogger("hive_orchestration.agents")


class TaskContext:
    """What a handler gets: the task, and a way to report progress on it."""

    def __init__(self, runtime: Target, claim: Claim, worker_id: str) -> None:
        self._runtime = runtime
        self.task: Task = claim.task
        self.lease: Lease = claim.lease
        self.worker_id = worker_id

    @property
    def payload(self) -> Mapping[str, object]:
        return self.task.payload

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    async def progress(self, data: Mapping[str, object], *, phase: str | None = None) -> None:
        """Record progress on the run (stored, published as ``task.progress``)."""
        await self._runtime.report_progress(self.lease, data, phase=phase)

    async def dependency_results(self) -> dict[str, DependencyResult]:
        """For a plan subtask: every dependency, by subtask id, with how it ended and its
        result (``get_dependency_results``, page after page). Each page is bounded; a
        subtask with thousands of large inputs reads them with ``subtask_ids`` or pages
        of its own instead of all at once."""
        found: dict[str, DependencyResult] = {}
        after: str | None = None
        while True:
            page = await self._runtime.get_dependency_results(self.task.id, after=after)
            found.update((d.subtask_id, d) for d in page.dependencies)
            if page.next_after is None:
                return found
            after = page.next_after

    async def dependency_result(self, subtask_id: str) -> DependencyResult:
        """For a plan subtask: its dependency ``subtask_id``, with its result."""
        page = await self._runtime.get_dependency_results(self.task.id, [subtask_id])
        return page.dependencies[0]


@dataclass(slots=True)
class _Outcome:
    """How one run of a handler ended."""

    result: Mapping[str, object] | None = None
    error: Exception | None = None
    finished: bool = False
    lost: bool = False  # the lease was lost (expired, cancelled, deleted, taken over)
    timed_out: bool = False
    retryable: bool = True  # the error, by the agent's (or the runner's) retry policy

    def describe(self) -> str:
        """How the run ended, in a word (its span's ``hive.run.outcome``)."""
        if self.lost:
            return "lost"
        if self.timed_out:
            return "timed_out"
        if self.error is not None:
            return "failed"
        return "completed" if self.finished else "released"


@dataclass(slots=True)
class _Held:
    """The task a copy is running, for its lease keeper."""

    lease: Lease
    outcome: _Outcome
    scope: anyio.CancelScope


@dataclass(slots=True)
class _Copy:
    """One copy's state, shared by its loop and its lease keeper."""

    held: _Held | None = None


class AgentRunner:
    """Runs the agents of a registry against a runtime for the length of an ``async with``."""

    def __init__(
        self,
        runtime: Target,
        registry: AgentRegistry,
        *,
        stop_timeout: float = 10.0,
        claim_wait: float = 5.0,
        retry_on: Iterable[type[BaseException]] | None = None,
        fail_on: Iterable[type[BaseException]] = (),
    ) -> None:
        self._runtime = runtime
        #: Which handler exceptions are retried (None: all) and which fail at once, for
        #: the agents registered without a policy of their own.
        self.retry_policy = RetryPolicy.of(retry_on, fail_on)
        self._registry = registry
        self._stop_timeout = stop_timeout
        self._claim_wait = claim_wait
        self._group: TaskGroup | None = None
        self._stopping = anyio.Event()
        # task id -> run id -> the scope its handler runs in (a task can have two runs in
        # flight here: one unwinding after a timeout while another copy took it over).
        self._running: dict[str, dict[str, anyio.CancelScope]] = {}
        # The claims copies are waiting in, cancelled when the runner stops; and whether
        # the stop's grace period is over (a handler starting after that is cancelled).
        self._claiming: set[anyio.CancelScope] = set()
        self._grace_over = False
        self._gone = False  # the connection to the runtime broke: nothing can be reported
        self._copies = 0
        self._all_stopped = anyio.Event()
        #: Tasks completed / failed by handlers since the start (for dashboards and tests),
        #: and handed back unfinished when the runner stopped (not counted as attempts).
        self.completed = 0
        self.failed = 0
        self.released = 0
        #: Why the copies stopped on their own, if they did: the runtime stopped, or the
        #: connection to the runtime of another process broke.
        self.stopped_by: HiveError | None = None

    @property
    def worker_ids(self) -> list[str]:
        return [
            spec.worker_id(n)
            for spec in self._registry.list_agents()
            for n in range(1, spec.copies + 1)
        ]

    @property
    def _config(self) -> RuntimeConfig:
        # The runtime's, or a client's copy of it: for a client of another process, the
        # owner's timeouts as its welcome told them (renewals and heartbeats follow them).
        return self._runtime._config

    async def wait(self) -> None:
        """Until every copy has stopped: the runner stops, or the runtime went away (then
        :attr:`stopped_by` says how). A process that only runs agents waits on this."""
        await self._all_stopped.wait()

    async def __aenter__(self) -> AgentRunner:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        try:
            await self._group.start(self._watch_cancellations)
            self._group.start_soon(self._stop_copies)
            for spec in self._registry.list_agents():
                for n in range(1, spec.copies + 1):
                    await self._group.start(self._copy, spec, spec.worker_id(n))
        except BaseException as exc:
            self._stopping.set()
            await self._group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._group is not None
        self._stopping.set()
        try:
            return await self._group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The block's own exception comes out as itself, not wrapped with the
            # cancellations it caused.
            cancelled = anyio.get_cancelled_exc_class()
            if exc is not None and all(
                leaf is exc or isinstance(leaf, cancelled) for leaf in leaves(group)
            ):
                return None
            raise

    # -- one copy ------------------------------------------------------------------------------

    async def _copy(
        self, spec: AgentSpec, worker_id: str, *, task_status: TaskStatus[None]
    ) -> None:
        await self._register(spec, worker_id)
        self._copies += 1
        task_status.started()
        state = _Copy()
        try:
            # Long-lived helpers, not one set per task: spawning tasks and task groups for
            # every task cost a copy more than the rest of its loop.
            async with anyio.create_task_group() as beats:
                beats.start_soon(self._heartbeat, spec, worker_id)
                beats.start_soon(self._keep_lease, spec, worker_id, state)
                while not self._stopping.is_set():
                    try:
                        claim = await self._claim(spec, worker_id)
                        if claim is not None:
                            await self._work(spec, worker_id, claim, state)
                    except (RuntimeStoppedError, ConnectionLostError) as exc:
                        # The runtime is going away, or the connection to it broke (it
                        # does not come back: the owner has requeued what this copy
                        # held): nothing more to claim.
                        if self.stopped_by is None and not self._stopping.is_set():
                            self.stopped_by = exc
                        break
                    except HiveError as exc:
                        # A storage fault or a restarting actor: the task, if any, is
                        # still leased and comes back on its own; keep the agent alive.
                        log.warning("worker %s: %s; going on", worker_id, exc)
                        await anyio.sleep(min(1.0, self._claim_wait))
                beats.cancel_scope.cancel()
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self._stop_timeout),
                contextlib.suppress(HiveError),
            ):
                await self._runtime.unregister_worker(worker_id)
            self._copies -= 1
            if self._copies == 0:
                self._all_stopped.set()

    async def _register(self, spec: AgentSpec, worker_id: str) -> None:
        await self._runtime.register_worker(
            worker_id,
            spec.agent_type,
            spec.handles,
            {"agent_type": spec.agent_type, "description": spec.description},
        )

    async def _claim(self, spec: AgentSpec, worker_id: str) -> Claim | None:
        """Wait for a task, until one comes or the runner stops (then ``None``)."""
        with anyio.CancelScope() as waiting:
            self._claiming.add(waiting)  # cancelled by _stop_copies
            if self._stopping.is_set():
                waiting.cancel()
            try:
                # The agent's own types, named every time: a copy whose worker record went
                # missing must still take only what the agent handles. Claimed and
                # started in one commit: one durable round trip less per task.
                return await self._runtime.claim_task(
                    worker_id,
                    spec.handles,
                    lease=spec.lease,
                    wait=self._claim_wait,
                    start=True,
                )
            finally:
                self._claiming.discard(waiting)
        # A claim cancelled while its answer was on the way is handed back by the
        # TaskManager (the reply slot was closed), so nothing is left held here.
        return None

    async def _stop_copies(self) -> None:
        """When the runner stops: end the copies' waits for work at once, and cancel the
        handlers still running once the grace period (``stop_timeout``) is over."""
        await self._stopping.wait()
        for waiting in list(self._claiming):
            waiting.cancel()
        with anyio.move_on_after(self._stop_timeout):
            await self._all_stopped.wait()
            return
        self._grace_over = True  # a handler that starts from now on is cancelled at once
        for runs in list(self._running.values()):
            for scope in list(runs.values()):
                scope.cancel()  # the task is handed back (released), not counted

    async def _keep_lease(self, spec: AgentSpec, worker_id: str, state: _Copy) -> None:
        """Renew the lease of whatever task the copy runs, every third of the lease.

        It ticks whether or not a task is held, so a task is renewed at most a third of a
        lease after its claim (the claim itself set the lease), then every third."""
        interval = (spec.lease or self._config.lease_timeout) / 3
        while True:
            await anyio.sleep(interval)
            held = state.held
            if held is None:
                continue
            try:
                await self._runtime.heartbeat(held.lease)
            except LeaseLostError:
                if state.held is held:  # not a late answer about a task already reported
                    held.outcome.lost = True
                    held.scope.cancel()
            except HiveError as exc:  # try again at the next tick
                log.warning("worker %s: lease renewal failed: %s", worker_id, exc)

    async def _heartbeat(self, spec: AgentSpec, worker_id: str) -> None:
        interval = self._config.worker_timeout / 3
        while True:
            await anyio.sleep(interval)
            try:
                if not await self._runtime.update_worker_heartbeat(worker_id):
                    # Unregistered behind our back: this copy is alive, so register again.
                    await self._register(spec, worker_id)
            except HiveError as exc:
                log.warning("worker %s: heartbeat failed: %s", worker_id, exc)

    async def _work(self, spec: AgentSpec, worker_id: str, claim: Claim, state: _Copy) -> None:
        lease = claim.lease
        outcome = _Outcome()
        scope = anyio.CancelScope()
        if self._grace_over:
            scope.cancel()
        # From here the watcher cancels the scope when the task is cancelled. A cancel
        # committed between the claim (which started the task) and now is caught by a
        # bare heartbeat, answered from the TaskManager's memory with no commit of its
        # own: the watcher alone could have missed it (its subscription drops events
        # when it falls behind).
        runs = self._running.setdefault(lease.task_id, {})
        runs[lease.run_id] = scope
        # The run's span (tracing on: _trace.py), from the claim to the report, current
        # for the handler: its own spans, and the tasks it creates, are its children.
        with run_span(claim.task, worker_id, lease.run_id) as span:
            try:
                await self._run(spec, worker_id, claim, state, outcome, scope)
            finally:
                span.ended(outcome.describe(), outcome.error)

    async def _run(
        self,
        spec: AgentSpec,
        worker_id: str,
        claim: Claim,
        state: _Copy,
        outcome: _Outcome,
        scope: anyio.CancelScope,
    ) -> None:
        rt = self._runtime
        lease = claim.lease
        runs = self._running[lease.task_id]
        try:
            await rt.heartbeat(lease)
            context = TaskContext(rt, claim, worker_id)
            state.held = _Held(lease, outcome, scope)  # renewed by _keep_lease from now on
            timeout = claim.task.timeout if claim.task.timeout is not None else math.inf
            with scope, anyio.move_on_after(timeout) as deadline:
                try:
                    outcome.result = await spec.handler(context)
                    outcome.finished = True
                except Exception as exc:
                    outcome.error = exc
                    outcome.retryable = (spec.retry_policy or self.retry_policy).retryable(exc)
            outcome.timed_out = deadline.cancelled_caught
        except LeaseLostError:
            outcome.lost = True  # cancelled or taken over before its handler started
        finally:
            state.held = None
            del runs[lease.run_id]
            if not runs:
                del self._running[lease.task_id]
            # Shielded and in a finally: even when the runner is torn down by an error,
            # the task is reported or handed back, never left held by a dead copy.
            with anyio.CancelScope(shield=True):
                await self._report(worker_id, lease, outcome)

    async def _report(self, worker_id: str, lease: Lease, outcome: _Outcome) -> None:
        rt = self._runtime
        try:
            if outcome.lost or outcome.timed_out or self._gone:
                return  # the runtime already ended this run (or the connection to it broke)
            if outcome.error is not None:
                error = outcome.error
                await rt.fail_task(
                    lease,
                    f"{type(error).__name__}: {error}"[:10_000],
                    retryable=outcome.retryable,
                )
                self.failed += 1
            elif outcome.finished:
                try:
                    await rt.complete_task(lease, outcome.result)
                    self.completed += 1
                except InvalidInputError as exc:
                    # The handler's result cannot be stored (not JSON, too big): that is
                    # the handler's failure, reported as such rather than left to expire.
                    await rt.fail_task(lease, f"the handler returned an invalid result: {exc}")
                    self.failed += 1
            else:
                # Interrupted: the runner stops, or its task group was torn down.
                await rt.release_task(lease, reason=f"{worker_id} stopped before finishing")
                self.released += 1
        except LeaseLostError:
            pass  # cancelled, timed out or taken over meanwhile: the result is not ours to give
        except HiveError as exc:
            # The lease runs out and the task comes back: late, but not lost.
            log.warning("worker %s: could not report task %s: %s", worker_id, lease.task_id, exc)

    # -- cancellation reaches running handlers ---------------------------------------------

    async def _watch_cancellations(self, *, task_status: TaskStatus[None]) -> None:
        if not self._registry.list_agents():
            self._all_stopped.set()
        try:
            async with self._runtime.subscribe("task.cancelled", overflow="drop") as events:
                task_status.started()
                async with anyio.create_task_group() as tg:

                    async def stop() -> None:
                        await self._all_stopped.wait()  # every handler has ended
                        tg.cancel_scope.cancel()

                    tg.start_soon(stop)
                    try:
                        async for event in events:
                            runs = self._running.get(event.task_id or "", {})
                            for run_id, scope in runs.items():
                                log.info(
                                    "task %s cancelled: stopping run %s", event.task_id, run_id
                                )
                                scope.cancel()
                    except RuntimeStoppedError:
                        # Caught here, not around the task group (which would wrap it): the
                        # runtime stops, and the copies stop on their own.
                        pass
                    except ConnectionLostError as exc:
                        self._connection_lost(exc)
        except (RuntimeStoppedError, ConnectionLostError):
            pass  # the subscription could not even start: the copies stop on their own

    def _connection_lost(self, error: ConnectionLostError) -> None:
        """The connection to the runtime of another process broke (this subscription
        hears of it at once). The owner has requeued every task the copies held, so their
        handlers' work is no longer theirs: cancel them now rather than at the next lease
        renewal, and report nothing."""
        if self.stopped_by is None and not self._stopping.is_set():
            self.stopped_by = error
        self._gone = True
        for runs in list(self._running.values()):
            for scope in list(runs.values()):
                scope.cancel()
