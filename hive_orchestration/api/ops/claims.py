"""The claim operations of the seeds, what a worker calls, as messages to the
TaskManager: take tasks, hold them by their lease, and end or hand back each claim.

Every argument is checked here, at the boundary, so that a bad one is an
:class:`InvalidInputError` naming it and nothing is sent, let alone written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import cast

import msgspec

from ..._validate import (
    YEAR,
    check_bool,
    check_delay,
    check_identifier,
    check_int,
    check_lease,
    check_optional_text,
    check_str,
)
from ...errors import InvalidInputError
from ...messages.tasks import (
    Claim,
    ClaimTask,
    ClaimTasks,
    CompleteTask,
    CompleteTasks,
    FailTask,
    FailTasks,
    Heartbeat,
    Lease,
    ReleaseTask,
    ReleaseWorker,
    StartTask,
    Task,
    TaskOutcome,
)
from ...messages.workers import GetWorker
from .task_base import _MAX_BATCH, TaskCalls, _batch_items, _lease, _types

__all__ = ["ClaimOps"]


class ClaimOps(TaskCalls):
    """What a worker calls about the tasks it takes. Mixed into :class:`Runtime`; needs
    ``_tasks`` (the TaskManager), ``_workers`` and ``_config``."""

    async def claim_task(
        self,
        worker_id: str,
        task_types: str | Iterable[str] | None = None,
        *,
        lease: float | None = None,
        wait: float = 0.0,
        start: bool = False,
    ) -> Claim | None:
        """Take the best ready task (highest priority, then oldest) that ``worker_id`` can
        do, or ``None`` if there is none.

        What it can do: ``task_types`` (task types or capabilities: one, several), or by
        default the capabilities it registered with (any task if it registered none or
        is not registered). A task without ``requires`` matches by its type; a task with
        ``requires`` matches a worker that has all of them.

        With ``wait`` seconds, a claim with nothing to take waits for a matching task
        and gets it as soon as it is queued (no polling). Each task goes to exactly one
        claim. The claim holds a lease of ``lease`` seconds (default: the config's
        ``lease_timeout``): renew it with :meth:`heartbeat`, or the task goes back to
        the queue. Pass ``claim.lease`` to every later call about the task.

        With ``start``, the task is also started (as :meth:`start_task` would, in the
        same commit): it comes back running, and ``task.started`` follows
        ``task.assigned``.
        """
        self._check_open()
        worker_id = check_identifier(worker_id, "worker_id")
        message = ClaimTask(
            worker_id=worker_id,
            task_types=await self._claim_types(worker_id, task_types),
            lease=self._lease_seconds(lease),
            wait=check_delay(wait, "wait"),
            start=check_bool(start, "start"),
        )
        # The actor answers by the end of the wait; the usual deadline covers the rest.
        return await self._tasks.ask(message, timeout=message.wait + self._config.ask_timeout)

    async def claim_tasks(
        self,
        worker_id: str,
        task_types: str | Iterable[str] | None = None,
        *,
        limit: int,
        lease: float | None = None,
        wait: float = 0.0,
        start: bool = False,
    ) -> list[Claim]:
        """Take up to ``limit`` ready tasks at once (best first), for a worker with that
        many free slots: one call and one commit instead of one per task.

        As :meth:`claim_task` otherwise, each claim with its own lease and token. When
        nothing is ready it waits up to ``wait`` seconds and returns as soon as tasks
        arrive (possibly fewer than ``limit``); ``[]`` if none do.
        """
        self._check_open()
        worker_id = check_identifier(worker_id, "worker_id")
        message = ClaimTasks(
            worker_id=worker_id,
            task_types=await self._claim_types(worker_id, task_types),
            lease=self._lease_seconds(lease),
            wait=check_delay(wait, "wait"),
            start=check_bool(start, "start"),
            limit=check_int(limit, "limit", minimum=1, maximum=_MAX_BATCH),
        )
        timeout = message.wait + self._config.ask_timeout
        return list(await self._tasks.ask(message, timeout=timeout))

    async def _claim_types(
        self, worker_id: str, task_types: str | Iterable[str] | None
    ) -> tuple[str, ...] | None:
        """What a claim may take: ``task_types``, else the worker's registered capabilities."""
        types = _types(task_types, "task_types")
        if task_types is None:
            worker = await self._workers.ask(GetWorker(worker_id))
            if worker is not None and worker.capabilities:
                types = worker.capabilities
        return types

    def _lease_seconds(self, lease: float | None) -> float:
        seconds = self._config.lease_timeout if lease is None else lease
        return check_lease(seconds, "lease")

    async def heartbeat(
        self,
        lease: Lease,
        *,
        progress: Mapping[str, object] | None = None,
        phase: str | None = None,
        extend: float | None = None,
    ) -> datetime:
        """Renew the claim's lease (for its length, or ``extend`` seconds from now) and
        return when it now expires. ``progress`` and ``phase`` are stored on the run and
        published as ``task.progress``. Raises :class:`LeaseLostError` if the claim is over.
        """
        self._check_open()
        message = Heartbeat(
            lease=_lease(lease),
            extend=None if extend is None else check_lease(extend, "extend"),
            progress=self._json(progress, "progress"),
            phase=check_optional_text(phase, "phase"),
        )
        return await self._tasks.ask(message)

    async def report_progress(
        self, lease: Lease, progress: Mapping[str, object], *, phase: str | None = None
    ) -> datetime:
        """Record progress on the claimed run (it renews the lease too)."""
        return await self.heartbeat(lease, progress=progress, phase=phase)

    async def start_task(self, lease: Lease) -> Task:
        """Mark the claimed task running (``task.started``)."""
        self._check_open()
        return await self._tasks.ask(StartTask(_lease(lease)))

    async def complete_task(self, lease: Lease, result: Mapping[str, object] | None = None) -> Task:
        """Complete the claimed task; ``result`` is stored on the task and on the run.

        Only the claim that holds the task can complete it, once: any other token gets
        :class:`LeaseLostError`, so a worker that stalled past its lease cannot overwrite
        the result of the worker that took over.
        """
        self._check_open()
        message = CompleteTask(lease=_lease(lease), result=self._json(result, "result"))
        return await self._tasks.ask(message)

    async def fail_task(
        self,
        lease: Lease,
        error: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> Task:
        """Fail the claimed run. While attempts remain (``attempts <= max_retries``) and
        the error is ``retryable``, the task is queued again after an exponential backoff
        with jitter (or ``retry_after`` seconds); otherwise it fails for good with this
        error. Returns the task as it now is."""
        self._check_open()
        message = FailTask(
            lease=_lease(lease),
            error=check_str(error, "error", empty=False),
            retryable=check_bool(retryable, "retryable"),
            retry_after=None
            if retry_after is None
            else check_delay(retry_after, "retry_after", maximum=YEAR),
        )
        return await self._tasks.ask(message)

    async def complete_tasks(self, items: Iterable[Mapping[str, object]]) -> list[TaskOutcome]:
        """Complete several claimed tasks in one durable commit: one
        :class:`TaskOutcome` per item, in order.

        Each item holds :meth:`complete_task`'s arguments by name (``{"lease":
        claim.lease, "result": {...}}``). Each item is decided on its own, as
        :meth:`complete_task` would decide it: an item whose lease no longer holds its
        task (expired, already completed, another run's, a wrong secret) changes
        nothing, and its outcome's ``refused`` says why (``LeaseLostError``, field
        ``items[i].lease``; ``outcome.result()`` raises it); the other items complete,
        each publishing its ``task.completed``. A malformed item (not a mapping, no
        lease, a result that is not a JSON object) refuses the whole call before
        anything is sent (``InvalidInputError`` naming ``items[i].<field>``). At most
        1 000 items per call.
        """
        self._check_open()
        messages: list[CompleteTask] = []
        for field, item in _batch_items(items, "items", _COMPLETE_ARGS, _NOT_COMPLETE_ARG):
            try:
                messages.append(
                    CompleteTask(
                        lease=_item_lease(item),
                        # Checked as complete_task's: a JSON object, or None.
                        result=self._json(cast(Mapping[str, object], item.get("result")), "result"),
                    )
                )
            except InvalidInputError as exc:
                raise InvalidInputError(f"{field}.{exc.field}", exc.reason) from None
        if not messages:
            return []
        return list(await self._tasks.ask(CompleteTasks(tuple(messages))))

    async def fail_tasks(self, items: Iterable[Mapping[str, object]]) -> list[TaskOutcome]:
        """Fail several claimed runs in one durable commit: one :class:`TaskOutcome` per
        item, in order, each decided on its own, as :meth:`complete_tasks`.

        Each item holds :meth:`fail_task`'s arguments by name (``{"lease":
        claim.lease, "error": "...", "retryable": False, "retry_after": 5}``); each task is
        retried or fails for good as :meth:`fail_task` says. At most 1 000 items per call.
        """
        self._check_open()
        messages: list[FailTask] = []
        for field, item in _batch_items(items, "items", _FAIL_ARGS, _NOT_FAIL_ARG):
            try:
                if "error" not in item:
                    raise InvalidInputError("error", "is missing")
                retry_after = item.get("retry_after")
                messages.append(
                    FailTask(
                        lease=_item_lease(item),
                        error=check_str(item["error"], "error", empty=False),
                        retryable=check_bool(item.get("retryable", True), "retryable"),
                        retry_after=None
                        if retry_after is None
                        else check_delay(retry_after, "retry_after", maximum=YEAR),
                    )
                )
            except InvalidInputError as exc:
                raise InvalidInputError(f"{field}.{exc.field}", exc.reason) from None
        if not messages:
            return []
        return list(await self._tasks.ask(FailTasks(tuple(messages))))

    async def release_task(self, lease: Lease, *, reason: str | None = None) -> Task:
        """Hand the claimed task back unfinished (say, the worker is shutting down): it is
        queued again at once and the attempt does not count."""
        self._check_open()
        message = ReleaseTask(
            lease=_lease(lease), reason=None if reason is None else check_str(reason, "reason")
        )
        return await self._tasks.ask(message)

    async def release_worker_tasks(self, worker_id: str, *, reason: str = "worker offline") -> int:
        """Declare ``worker_id`` gone: every task it holds goes back to the queue (its runs
        end as lost and count an attempt). Returns how many tasks it held."""
        self._check_open()
        message = ReleaseWorker(
            worker_id=check_identifier(worker_id, "worker_id"),
            reason=check_str(reason, "reason", empty=False),
        )
        return await self._tasks.ask(message)


#: The argument names an item of complete_tasks, or of fail_tasks, may hold.
_COMPLETE_ARGS = frozenset({"lease", "result"})
_FAIL_ARGS = frozenset({"lease", "error", "retryable", "retry_after"})
#: Why a name outside them is refused.
_NOT_COMPLETE_ARG = f"is not an item's argument ({', '.join(sorted(_COMPLETE_ARGS))})"
_NOT_FAIL_ARG = f"is not an item's argument ({', '.join(sorted(_FAIL_ARGS))})"


def _item_lease(item: Mapping[str, object]) -> Lease:
    """An item's lease: the :class:`Lease` of a claim, or its fields as a mapping (as
    it comes through the wire)."""
    if "lease" not in item:
        raise InvalidInputError("lease", "is missing")
    value = item["lease"]
    if type(value) is not Lease and isinstance(value, Mapping):  # a Lease skips the ABC
        try:
            value = msgspec.convert(value, Lease)
        except msgspec.ValidationError as exc:
            raise InvalidInputError("lease", f"is not a lease: {exc}") from None
    return _lease(value)
