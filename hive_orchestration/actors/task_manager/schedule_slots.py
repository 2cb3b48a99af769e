"""What the TaskManager adds to its write for a task that fires a schedule's slot.

The Scheduler owns schedules but not tasks: it asks the TaskManager to create each slot's
task, and hands it the slot (:class:`ScheduleSlot`). The TaskManager puts the schedule's
advance and the ``schedule.fired`` event in the same write as the task, so a crash at any
moment leaves the task and the advance both committed or both not: a slot can neither
fire twice nor be lost. A slot whose task already exists (its idempotency key is known:
the Scheduler asked again after an answer it did not get) writes the advance alone, which
is forward only and so changes nothing if it was already made.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ...messages.events import Event, JsonValue
from ...messages.storage import AppendEvent, SetScheduleSlot, WriteOp
from ...messages.tasks import ScheduleSlot, Task

__all__ = ["slot_ops"]


def slot_ops(slot: ScheduleSlot, task_id: str, task: Task | None, now: datetime) -> list[WriteOp]:
    """The schedule's advance to ``slot``, with its ``schedule.fired`` event when ``task``
    was created by this write (None: it existed already)."""
    ops: list[WriteOp] = [SetScheduleSlot(slot.schedule_id, slot.slot, task_id, now)]
    if task is not None:
        data: dict[str, JsonValue] = {**slot.data, "task_id": task_id}
        event = Event(
            type="schedule.fired",
            timestamp=now.timestamp(),
            source=slot.source_agent or "scheduler",
            correlation_id=task.correlation_id,
            task_id=task_id,
            data=data,
        )
        ops.append(AppendEvent(event, msgspec.json.encode(data)))
    return ops
