"""The records every task allocates on its way (tasks, runs, claims, events and the write
ops that carry them) are not tracked by Python's cycle collector (msgspec ``gc=False``):
they hold data only, so they can never be part of a reference cycle, and left tracked
each one made the collector run more often and walk more on every run (docs/performance.md,
"The batch calls")."""

from __future__ import annotations

import gc

import msgspec
import msgspec.inspect as mi
import pytest

from hive_orchestration import Runtime
from hive_orchestration.messages.events import Event, Publish
from hive_orchestration.messages.storage_writes import (
    AppendEvent,
    Committed,
    PutRun,
    PutTask,
    SetRunState,
    SetTaskState,
)
from hive_orchestration.messages.task_models import Claim, Lease, Run, Task

UNTRACKED: tuple[type[msgspec.Struct], ...] = (
    Task,
    Run,
    Lease,
    Claim,
    Event,
    Publish,
    AppendEvent,
    PutTask,
    SetTaskState,
    PutRun,
    SetRunState,
    Committed,
)


def _data_only(info: mi.Type, path: str) -> None:
    """Every type a field may hold is a value that cannot reach back to its holder: a
    scalar, a time, a JSON object (the runtime's own copy, decoded from its encoding),
    a tuple of these, or another untracked record."""
    match info:
        case (
            mi.StrType()
            | mi.IntType()
            | mi.FloatType()
            | mi.BoolType()
            | mi.NoneType()
            | mi.BytesType()
            | mi.DateTimeType()
            | mi.EnumType()
            | mi.LiteralType()
        ):
            return
        case mi.UnionType(types=types):
            for member in types:
                _data_only(member, path)
        case mi.VarTupleType(item_type=item):
            _data_only(item, f"{path}[]")
        case mi.DictType(key_type=mi.StrType(), value_type=mi.AnyType()):
            return  # a JsonObject
        case mi.StructType(cls=cls, fields=fields):
            assert cls.__struct_config__.gc is False, f"{path}: {cls.__name__} is tracked"
            for field in fields:
                _data_only(field.type, f"{path}.{field.name}")
        case _:
            pytest.fail(f"{path} may hold {info!r}, which could reach back to its holder")


@pytest.mark.parametrize("cls", UNTRACKED, ids=lambda cls: cls.__name__)
def test_the_records_of_the_task_path_hold_data_only_and_are_untracked(
    cls: type[msgspec.Struct],
) -> None:
    _data_only(mi.type_info(cls), cls.__name__)


@pytest.mark.anyio
async def test_what_a_task_leaves_in_memory_is_not_tracked(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("untracked", {"nested": {"list": [1, 2]}})
        claim = await rt.claim_task("w", "untracked", start=True)
        assert claim is not None
        done = await rt.complete_task(claim.lease, {"ok": [True]})
        events = await rt.read_events(0)
        held = await rt.get_task(task_id)
        runs = await rt.get_runs(task_id)
    assert events
    assert held is not None
    assert runs
    for record in (claim, claim.task, claim.lease, done, held, *runs, *events):
        assert not gc.is_tracked(record), type(record).__name__
    # The JSON values inside are ordinary objects, tracked as ever when they hold others.
    assert gc.is_tracked(held.payload)
