"""Running agents: each copy of each registered agent is a worker of the runtime.

``async with AgentRunner(runtime, registry):`` starts, for every agent, ``copies``
workers named ``<agent_type>-<n>``. Each registers (with the agent's capabilities),
heartbeats on its own, and loops: claim a task it can take (waiting, not polling), start
it, run the handler, then complete the task with the handler's result or fail it with the
handler's exception (the agent carries on). While the handler runs, the lease is renewed
in the background; the handler is cancelled if the task is cancelled (``cancel_task``),
if its lease is lost, or at the task's ``timeout`` (the run then ends timed out).

Leaving the block stops the copies: they claim nothing more, in-flight handlers get
``stop_timeout`` seconds to finish and report, and past that they are cancelled and their
tasks handed back to the queue (``release_task``: not counted as an attempt). The workers
are then unregistered. No task is left running and none is lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ..errors import HiveError, LeaseLostError, RuntimeStoppedError
from ..messages.tasks import Claim, Lease, Task
from .registry import AgentRegistry, AgentSpec

if TYPE_CHECKING:
    from ..embedded import Runtime

__all__ = ["AgentRunner", "TaskContext"]

log = logging.getLogger("hive_orchestration.agents")


class TaskContext:
    """What a handler gets: the task, and a way to report progress on it."""

    def __init__(self, runtime: Runtime, claim: Claim, worker_id: str) -> None:
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


class AgentRunner:
    """Runs the agents of a registry against a runtime for the length of an ``async with``."""

    def __init__(
        self,
        runtime: Runtime,
        registry: AgentRegistry,
        *,
        stop_timeout: float = 10.0,
        claim_wait: float = 5.0,
    ) -> None:
        self._runtime = runtime
        self._registry = registry
        self._stop_timeout = stop_timeout
        self._claim_wait = claim_wait
        self._group: TaskGroup | None = None
        self._stopping = anyio.Event()
        self._running: dict[str, anyio.CancelScope] = {}  # task id -> its handler's scope
        self._copies = 0
        self._all_stopped = anyio.Event()
        #: Tasks completed / failed by handlers since the start (for dashboards and tests).
        self.completed = 0
        self.failed = 0

    @property
    def worker_ids(self) -> list[str]:
        return [
            f"{spec.agent_type}-{n}"
            for spec in self._registry.list_agents()
            for n in range(1, spec.copies + 1)
        ]

    async def __aenter__(self) -> AgentRunner:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        try:
            await self._group.start(self._watch_cancellations)
            for spec in self._registry.list_agents():
                for n in range(1, spec.copies + 1):
                    await self._group.start(self._copy, spec, f"{spec.agent_type}-{n}")
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
        return await self._group.__aexit__(exc_type, exc, tb)

    # -- one copy ------------------------------------------------------------------------------

    async def _copy(
        self, spec: AgentSpec, worker_id: str, *, task_status: TaskStatus[None]
    ) -> None:
        rt = self._runtime
        await rt.register_worker(
            worker_id,
            spec.agent_type,
            spec.handles,
            {"agent_type": spec.agent_type, "description": spec.description},
        )
        self._copies += 1
        task_status.started()
        try:
            async with anyio.create_task_group() as beats:
                beats.start_soon(self._heartbeat, worker_id)
                while not self._stopping.is_set():
                    try:
                        claim = await self._claim(spec, worker_id)
                        if claim is not None:
                            await self._work(spec, worker_id, claim)
                    except RuntimeStoppedError:
                        break  # the runtime is going away: nothing more to claim
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
                contextlib.suppress(RuntimeStoppedError),
            ):
                await rt.unregister_worker(worker_id)
            self._copies -= 1
            if self._copies == 0:
                self._all_stopped.set()

    async def _claim(self, spec: AgentSpec, worker_id: str) -> Claim | None:
        """Wait for a task, until one comes or the runner stops."""
        async with anyio.create_task_group() as tg:
            claim: Claim | None = None

            async def stop_waiting() -> None:
                await self._stopping.wait()
                tg.cancel_scope.cancel()

            async def claim_one() -> None:
                nonlocal claim
                claim = await self._runtime.claim_task(
                    worker_id, lease=spec.lease, wait=self._claim_wait
                )
                tg.cancel_scope.cancel()

            tg.start_soon(stop_waiting)
            tg.start_soon(claim_one)
        # A claim cancelled while its answer was on the way is handed back by the
        # TaskManager (the reply slot was closed), so nothing is left held here.
        return claim

    async def _heartbeat(self, worker_id: str) -> None:
        interval = self._runtime.config.worker_timeout / 3
        while True:
            await anyio.sleep(interval)
            try:
                await self._runtime.update_worker_heartbeat(worker_id)
            except HiveError as exc:
                log.warning("worker %s: heartbeat failed: %s", worker_id, exc)

    async def _work(self, spec: AgentSpec, worker_id: str, claim: Claim) -> None:
        rt = self._runtime
        lease = claim.lease
        try:
            await rt.start_task(lease)
        except LeaseLostError:
            return
        context = TaskContext(rt, claim, worker_id)
        result: Mapping[str, object] | None = None
        error: BaseException | None = None
        lost = False
        finished = False
        scope = anyio.CancelScope()
        self._running[lease.task_id] = scope
        try:
            async with anyio.create_task_group() as tg:

                async def keep_lease() -> None:
                    nonlocal lost
                    seconds = (spec.lease or rt.config.lease_timeout) / 3
                    while True:
                        await anyio.sleep(seconds)
                        try:
                            await rt.heartbeat(lease)
                        except LeaseLostError:
                            lost = True
                            scope.cancel()
                            return

                async def stop_deadline() -> None:
                    await self._stopping.wait()
                    await anyio.sleep(self._stop_timeout)
                    scope.cancel()  # past the grace period: hand the task back

                tg.start_soon(keep_lease)
                tg.start_soon(stop_deadline)
                timeout = claim.task.timeout if claim.task.timeout is not None else math.inf
                with scope, anyio.move_on_after(timeout):
                    try:
                        result = await spec.handler(context)
                        finished = True
                    except Exception as exc:
                        error = exc
                tg.cancel_scope.cancel()
        finally:
            del self._running[lease.task_id]
        with anyio.CancelScope(shield=True):
            await self._report(worker_id, lease, result, error, finished, lost)

    async def _report(
        self,
        worker_id: str,
        lease: Lease,
        result: Mapping[str, object] | None,
        error: BaseException | None,
        finished: bool,
        lost: bool,
    ) -> None:
        rt = self._runtime
        try:
            if error is not None:
                await rt.fail_task(lease, f"{type(error).__name__}: {error}"[:10_000])
                self.failed += 1
            elif finished:
                await rt.complete_task(lease, result)
                self.completed += 1
            elif not lost and self._stopping.is_set():
                await rt.release_task(lease, reason=f"{worker_id} stopped before finishing")
            # Otherwise the task was cancelled or timed out: the runtime already ended it.
        except LeaseLostError:
            pass  # cancelled, timed out or taken over meanwhile: the result is not ours to give
        except RuntimeStoppedError:
            log.warning("worker %s: runtime stopped before %s was reported", worker_id, lease)

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
                    async for event in events:
                        scope = self._running.get(event.task_id or "")
                        if scope is not None:
                            scope.cancel()
        except RuntimeStoppedError:
            pass
