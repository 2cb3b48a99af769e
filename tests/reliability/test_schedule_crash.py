"""Schedules across SIGKILL: each slot fires exactly once, or is counted as missed.

Eight interval schedules (every 0.1 s, 80 slots a second between them) are created, then
a child process (``_schedule_child.py``) opens the database and lets its Scheduler fire;
the parent kills it with SIGKILL right after it reports a seeded random number of
firings, so the kill lands while the next slots are being fired (the TaskManager's write
of a slot's task, the schedule's advance and its event in flight). Six rounds, each a new
child that first catches up what passed while none ran. Then, on the file as the last
kill left it (a plain connection, nothing reopened), for each schedule:

- one task per fired slot, its idempotency key naming the slot; ``fired`` counts them,
  ``last_slot`` is the latest, ``last_task_id`` its task: the advance and the tasks never
  part ways (a task without its advance would fire again; an advance without its task
  would be a lost slot);
- one ``schedule.fired`` event per task, naming it and its slot: no event without its
  task, no task without its event;
- in firing order the slots only move forward, on the schedule's grid, and between two
  fired slots every slot passed over is counted in the later one's ``missed``: no slot is
  lost without a word, none fires twice.

Finally the runtime is opened in-process once more and fires on from the last slot.
The seed is printed; ``HIVE_RELIABILITY_SEED`` replays one (the kill points).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest
from _raw import as_json, raw_rows
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import Runtime, RuntimeConfig

pytestmark = pytest.mark.anyio

CHILD = Path(__file__).with_name("_schedule_child.py")
#: Only turns a hung child into a failure.
DEADLINE = 60.0
SCHEDULES = 8
EVERY = 0.1
ROUNDS = 6
CONFIG = RuntimeConfig(schedule_clock_check=0.05)


async def _round(db_path: str, backend: str, kill_after: int, stderr: Path) -> int:
    """Run one child until it reported ``kill_after`` firings, then SIGKILL it; how many
    firings it reported."""
    command = [sys.executable, str(CHILD), backend, db_path]
    with stderr.open("wb") as err:
        process = await anyio.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
        )
    seen = 0
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(DEADLINE):
            ready = json.loads(await lines.receive_until(b"\n", 1 << 20))
            assert "ready" in ready, (ready, _text(stderr))
            while seen < kill_after:
                line = json.loads(await lines.receive_until(b"\n", 1 << 20))
                assert "fired" in line, line
                seen += 1
        os.kill(process.pid, signal.SIGKILL)
        with anyio.fail_after(DEADLINE):
            code = await process.wait()
        assert code == -signal.SIGKILL, (code, _text(stderr))
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
    return seen


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _check(db_path: str) -> dict[str, int]:
    """The invariants of the module docstring on the file as it is; fired slots per
    schedule."""
    schedules = raw_rows(
        db_path, "SELECT id, name, definition, last_slot, last_task_id, fired FROM schedules"
    )
    # Every tick task in the order it was created (its task.created event's seq: both
    # stores keep that order, SQLite's rowid has no twin on PostgreSQL).
    ticks = raw_rows(
        db_path,
        "SELECT t.id, t.idempotency_key, t.payload FROM tasks t JOIN events e"
        " ON e.task_id = t.id AND e.type = 'task.created'"
        " WHERE t.task_type = 'tick' ORDER BY e.seq",
    )
    fired = [
        as_json(data)
        for (data,) in raw_rows(
            db_path, "SELECT data FROM events WHERE type = 'schedule.fired' ORDER BY seq"
        )
    ]
    counts = {}
    for schedule_id, name, definition, last_slot, last_task_id, count in schedules:
        spec = as_json(definition)
        start = datetime.fromisoformat(spec["start_at"])
        # The schedule's tasks by their payload (each schedule has its own n), not by
        # what the Scheduler stamps on them.
        tasks = [
            (task_id, key)
            for task_id, key, payload in ticks
            if as_json(payload)["n"] == spec["task"]["payload"]["n"]
        ]
        events = [e for e in fired if e["schedule_id"] == schedule_id]
        # One event per task, in the same order, and no slot twice.
        assert [e["task_id"] for e in events] == [task_id for task_id, _ in tasks], name
        slots = {e["task_id"]: datetime.fromisoformat(e["slot"]) for e in events}
        assert len(set(slots.values())) == len(slots), (name, "a slot fired twice")
        assert len(slots) == count, (name, len(slots), count)
        for task_id, key in tasks:
            assert key == f"schedule:{schedule_id}:{slots[task_id].isoformat()}", name
        if count:
            assert datetime.fromisoformat(last_slot) == max(slots.values()), name
            assert last_task_id == tasks[-1][0], name
        else:
            assert last_slot is None
        # Forward only, on the grid, and every slot passed over is counted.
        position = -1
        for event in events:
            step = (datetime.fromisoformat(event["slot"]) - start) / timedelta(seconds=EVERY)
            assert abs(step - round(step)) < 1e-6, (name, event)
            assert round(step) == position + event["missed"] + 1, (name, position, event)
            position = round(step)
        counts[name] = count
    return counts


async def test_each_slot_fires_exactly_once_across_sigkill(
    db_path: str, tmp_path: Path, anyio_backend: str
) -> None:
    seed = int(os.environ.get("HIVE_RELIABILITY_SEED", random.randrange(1 << 32)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        client = runtime.client(source_agent="crash-test")
        for n in range(SCHEDULES):
            await client.create_schedule(f"s{n}", EVERY, "tick", {"n": n})
    reported = 0
    for round_number in range(ROUNDS):
        stderr = tmp_path / f"child-{round_number}.err"
        reported += await _round(db_path, anyio_backend, rng.randint(1, 40), stderr)
        _check(db_path)
    counts = _check(db_path)
    total = sum(counts.values())
    print(f"{ROUNDS} kills, {reported} firings reported, {total} slots fired")
    # Non-trivial: the children fired (more than they reported: the kill comes after).
    assert total >= reported >= ROUNDS
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        client = runtime.client()
        with anyio.fail_after(DEADLINE):
            async with client.subscribe("schedule.fired") as events:
                async for _ in events:
                    break
        before = {s.name: s.fired for s in await client.list_schedules()}
    after = _check(db_path)
    assert all(after[name] >= before[name] >= counts[name] for name in counts)
    assert sum(after.values()) > total
