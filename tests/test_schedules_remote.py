"""Schedules from another process, through the owner's socket, exactly as in-process; and
what an ``agent`` token may do with them (its own schedules only)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from reliability._remote import DEADLINE, owner

from hive_orchestration import (
    AccessDeniedError,
    InvalidInputError,
    NotFoundError,
    OrchestrationClient,
    Runtime,
    Schedule,
    ScheduleFiredEvent,
)
from hive_orchestration.remote.access import Authorizer, Identity

pytestmark = pytest.mark.anyio


async def test_schedules_through_the_socket_work_as_in_process(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend, schedule_clock_check=0.05),
        OrchestrationClient(db_path=db_path, source_agent="remote-app") as client,
    ):
        assert client.remote
        start = datetime.now(UTC) + timedelta(seconds=0.5)
        created = await client.create_schedule(
            "ping", 0.2, "ping", {"x": 1}, start_at=start, priority=3
        )
        assert isinstance(created, Schedule)
        assert (created.start_at, created.every, created.source_agent) == (
            start,
            0.2,
            "remote-app",
        )
        assert created.task.payload == {"x": 1}
        with anyio.fail_after(DEADLINE):
            async with client.events(after=0, pattern="schedule.fired") as stream:
                event = await stream.receive()
        data = ScheduleFiredEvent.from_event(event)
        steps = (data.slot - start) / timedelta(seconds=0.2)
        assert data.slot >= start  # slots are start_at + k * every, from start_at on
        assert abs(steps - round(steps)) < 1e-6
        task = await client.get_task(data.task_id)
        assert task is not None
        assert (task.task_type, task.priority, task.source_agent) == ("ping", 3, "remote-app")
        tokyo = await client.create_schedule(
            "nightly", "0 3 * * *", "report", timezone="Asia/Tokyo"
        )
        assert tokyo.next_slot is not None
        assert (tokyo.next_slot.hour, tokyo.next_slot.minute) == (18, 0)  # 03:00 JST in UTC
        assert [s.name for s in await client.list_schedules()] == ["nightly", "ping"]
        with pytest.raises(InvalidInputError) as info:
            await client.create_schedule("ping", 1.0, "ping")
        assert info.value.field == "name"
        with pytest.raises(NotFoundError):
            await client.resume_schedule("nope")
        assert (await client.pause_schedule("ping")).paused
        got = await client.get_schedule("ping")
        assert got is not None
        assert got.paused
        assert await client.delete_schedule("ping")
        assert await client.get_schedule("ping") is None


async def test_an_agent_token_manages_its_own_schedules_only(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        await runtime.client(source_agent="app").create_schedule("mine", 60.0, "t")
        await runtime.client(source_agent="other").create_schedule("theirs", 60.0, "t")
        agent = Authorizer(Identity("app", "agent", frozenset({"app"})), runtime.client())
        for op in ("get_schedule", "pause_schedule", "resume_schedule", "delete_schedule"):
            assert await agent.check(op, {"name": "mine"}, None) == "app"
        assert await agent.check("list_schedules", {}, None) == "app"
        assert await agent.check("get_schedule", {"name": "theirs"}, None) == "app"
        for op in ("pause_schedule", "resume_schedule", "delete_schedule"):
            with pytest.raises(AccessDeniedError):
                await agent.check(op, {"name": "theirs"}, None)
        new = {"name": "new", "when": 60.0, "task_type": "t"}
        assert await agent.check("create_schedule", new, None) == "app"
        with pytest.raises(AccessDeniedError):
            await agent.check("create_schedule", {**new, "source_agent": "other"}, None)
        with pytest.raises(AccessDeniedError):
            await agent.check("create_schedule", {**new, "name": "theirs", "replace": True}, None)
        assert await agent.check("create_schedule", {**new, "name": "mine", "replace": True}, None)
