"""Schedules to and from rows (the ``schedules`` table, schema version 10).

The definition is a JSON document written whole by :class:`PutSchedule`; what a schedule
fired (``last_slot``, ``last_task_id``, ``fired``) has its own columns, written on insert
and afterwards only by :class:`SetScheduleSlot`, which moves them forward and never back.
That op rides in the TaskManager's write that creates the slot's task, so a slot's task
and the schedule's advance are one transaction: a crash keeps both or neither.

Times are fixed-width UTC text (``2026-12-06T19:00:00.000000+00:00``): comparing the
text compares the instants, which the forward-only update relies on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

import msgspec

from ..messages.schedules import Schedule
from ..messages.storage import DeleteScheduleRow, PutSchedule, SetScheduleSlot
from .port import Driver, Statement

__all__ = ["load_schedules", "schedule_statement", "stamp"]

_COLUMNS = (
    "id, name, definition, paused, not_before, last_slot, last_task_id, fired,"
    " created_at, updated_at"
)
# A redefinition (same id) writes the definition and pause state only: never what the
# schedule fired, which moves with the TaskManager's writes alone.
_PUT = (
    f"INSERT INTO schedules ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET name = excluded.name, definition = excluded.definition,"
    " paused = excluded.paused, not_before = excluded.not_before,"
    " updated_at = excluded.updated_at"
)
# Forward only: a slot at or before the last one changes no row, and that is no error.
# (The drivers fail a transaction whose UPDATE misses a row its writer expected to exist,
# drivers.check_updated, for statements that begin with UPDATE: this one begins with a
# comment, as it may rightly change nothing.)
_SET_SLOT = (
    "/* forward only */ UPDATE schedules SET last_slot = ?, last_task_id = ?,"
    " fired = fired + 1, updated_at = ? WHERE id = ? AND (last_slot IS NULL OR last_slot < ?)"
)
_DELETE = "DELETE FROM schedules WHERE id = ?"
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Schedule).decode


def stamp(value: datetime) -> str:
    """Fixed-width UTC text: its order is the instants' order."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else stamp(value)


def schedule_statement(op: PutSchedule | SetScheduleSlot | DeleteScheduleRow) -> Statement:
    match op:
        case PutSchedule(schedule=schedule):
            # The columns are the truth for what they hold; the document keeps the rest.
            definition = msgspec.structs.replace(
                schedule, last_slot=None, last_task_id=None, fired=0, next_slot=None
            )
            return (
                _PUT,
                (
                    schedule.id,
                    schedule.name,
                    _encode(definition).decode(),
                    int(schedule.paused),
                    stamp(schedule.not_before),
                    _stamp(schedule.last_slot),
                    schedule.last_task_id,
                    schedule.fired,
                    stamp(schedule.created_at),
                    stamp(schedule.updated_at),
                ),
            )
        case SetScheduleSlot(schedule_id=schedule_id, slot=slot, task_id=task_id, at=at):
            text = stamp(slot)
            return (_SET_SLOT, (text, task_id, stamp(at), schedule_id, text))
        case DeleteScheduleRow(schedule_id=schedule_id):
            return (_DELETE, (schedule_id,))


def _from_row(row: tuple[object, ...]) -> Schedule:
    definition, paused, not_before, last_slot, last_task_id, fired, updated_at = row
    schedule = _decode(cast(str, definition))
    return msgspec.structs.replace(
        schedule,
        paused=bool(paused),
        not_before=datetime.fromisoformat(cast(str, not_before)),
        last_slot=None if last_slot is None else datetime.fromisoformat(cast(str, last_slot)),
        last_task_id=cast("str | None", last_task_id),
        fired=cast(int, fired),
        updated_at=datetime.fromisoformat(cast(str, updated_at)),
    )


async def load_schedules(db: Driver) -> tuple[Schedule, ...]:
    rows = await db.fetchall(
        "SELECT definition, paused, not_before, last_slot, last_task_id, fired, updated_at"
        " FROM schedules ORDER BY name"
    )
    return tuple(_from_row(tuple(row)) for row in rows)
