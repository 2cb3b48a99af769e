"""Two processes on one database file: one runtime owns it, a second is refused.

The rule (docs/delivery.md): a database file belongs to one runtime
at a time. ``Runtime.open`` takes an exclusive ``flock`` on ``<file>.lock`` beside the real
file for as long as the runtime is open; a second ``Runtime.open`` of the same file, from
any process and under any name that reaches the same file through symlinks, is refused at
once with a :class:`StorageError` (``fault == "in_use"``) naming the file and the pid of
the owner. The kernel drops the lock when the owner dies, even by SIGKILL, so the file can
be opened again right away, with every acknowledged write in it. Reading beside the owner
is supported: the read-only :class:`Inspector` (and the CLI built on it) opens the file
while the owner writes, and sees each commit as it lands.

The owners here are real child processes (``_db_child.py``) on real SQLite files.
"""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from hive_orchestration import Runtime, StorageError, TaskStatus
from hive_orchestration.inspector import Inspector

from ._audit import audit_tasks, read_log
from ._children import Child, child

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.sqlite_only("the flock on the lock file beside the database file, and its names"),
]

#: Tasks the owner creates before it says it is ready, and acknowledgements to see after.
BEFORE, WHILE = 20, 30


def lock_holder(path: str) -> str:
    """What the lock file beside ``path`` says: the owner's pid, or nothing (the
    address it serves on follows the pid)."""
    words = Path(f"{path}.lock").read_text().split()
    return words[0] if words else ""


async def refused_by(path: str, owner: int) -> StorageError:
    """Open ``path`` (which ``owner`` holds): it must be refused at once, naming the owner."""
    with anyio.fail_after(5), pytest.raises(StorageError) as caught:  # a refusal, not a wait
        async with Runtime.open(path):
            pytest.fail("two runtimes own one database")
    error = caught.value
    assert error.fault == "in_use", error
    assert error.path == path
    assert f"pid {owner}" in str(error), error
    assert "already open in another runtime" in str(error)
    return error


async def test_a_second_process_is_refused_and_the_claim_dies_with_its_owner(
    new_db_path: str, tmp_path: Path, anyio_backend: str
) -> None:
    Path(new_db_path).parent.mkdir(parents=True)
    acked: list[str] = []
    async with child(
        "runtime",
        anyio_backend,
        new_db_path,
        str(BEFORE),
        "--forever",
        stderr_path=tmp_path / "err",
    ) as owner:
        ready = await owner.expect("ready")
        assert ready["ready"] == owner.pid
        acked += ready["tasks"]
        await refused_by(new_db_path, owner.pid)
        assert lock_holder(new_db_path) == str(owner.pid)

        # The inspector reads beside the owner, and sees its commits as they land.
        async with Inspector.open(new_db_path) as inspector:
            for _ in range(WHILE):
                acked.append((await owner.expect("ack"))["ack"])
            seen = await inspector.task_counts()
            assert seen.get("queued", 0) >= len(acked), (seen, len(acked))
            last = await inspector.task(acked[-1])
            assert last is not None
            assert last.status is TaskStatus.QUEUED
            # The owner goes on writing while the inspector is open.
            acked.append((await owner.expect("ack"))["ack"])

        # SIGKILL, in the middle of its writes: no clean close, no chance to unlock.
        os.kill(owner.pid, signal.SIGKILL)
        with anyio.fail_after(10):
            assert await owner.process.wait() == -signal.SIGKILL
        while (line := await owner.line()) is not None:  # acknowledged before it died
            acked.append(line["ack"])

    with anyio.fail_after(10):  # the kernel released the lock with the process
        async with Runtime.open(new_db_path) as runtime:
            assert lock_holder(new_db_path) == str(os.getpid())
            client = runtime.client()
            _, tasks, _, problems = await audit_tasks(client, await read_log(client))
    assert not problems, "\n".join(problems)
    missing = set(acked) - set(tasks)
    assert not missing, f"{len(missing)} acknowledged task(s) lost: {sorted(missing)[:5]}"
    # Every task is whole (a killed writer leaves no torn row).
    assert all(task.status is TaskStatus.QUEUED for task in tasks.values())
    assert all(task.payload.keys() == {"n"} for task in tasks.values())
    # Closed cleanly: no pid left behind for the next opener to report.
    assert lock_holder(new_db_path) == ""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the children run both backends
async def test_of_processes_racing_to_open_one_file_exactly_one_wins(
    new_db_path: str, tmp_path: Path
) -> None:
    Path(new_db_path).parent.mkdir(parents=True)
    outcomes: dict[int, dict[str, Any]] = {}

    async def first_line(racer: Child) -> None:
        line = await racer.line()
        assert line is not None, racer.stderr()
        outcomes[racer.pid] = line

    async with AsyncExitStack() as stack:
        racers = [
            await stack.enter_async_context(
                child("runtime", backend, new_db_path, "1", stderr_path=tmp_path / f"err{i}")
            )
            for i, backend in enumerate(["asyncio", "trio"])
        ]
        async with anyio.create_task_group() as tg:
            for racer in racers:
                tg.start_soon(first_line, racer)
        winners = [pid for pid, line in outcomes.items() if "ready" in line]
        assert len(winners) == 1, outcomes
        (winner,) = winners
        for pid, line in outcomes.items():
            if pid != winner:
                assert line["fault"] == "in_use", line
                assert line["path"] == new_db_path
                # The winner's pid, unless the loser looked in the instant between the
                # winner's taking the lock and its writing its pid there.
                message = line["error"]
                assert f"pid {winner}" in message or "pid unknown" in message, line
        for racer in racers:
            assert await racer.finish() == (0 if racer.pid == winner else 3), racer.stderr()


async def test_the_same_file_under_another_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """The lock is taken beside the real file: a symlink to the file or to its folder, or a
    relative path, reaches the same lock. (A hard link is another name the lock cannot
    see: do not open a database through one.)"""
    real = tmp_path / "data" / "hive.db"
    real.parent.mkdir()
    (tmp_path / "link.db").symlink_to(real)
    (tmp_path / "folder-link").symlink_to(real.parent)
    monkeypatch.chdir(tmp_path)
    names = [str(tmp_path / "link.db"), str(tmp_path / "folder-link" / "hive.db"), "data/hive.db"]
    async with Runtime.open(real) as runtime:
        await runtime.client().create_task("job")
        for name in names:
            with pytest.raises(StorageError, match="already open") as caught:
                async with Runtime.open(name):
                    pytest.fail(f"opened {name} while {real} is open")
            assert caught.value.fault == "in_use"
            assert f"pid {os.getpid()}, this process" in str(caught.value)
    for name in names:  # each name works once the owner has closed
        async with Runtime.open(name) as runtime:
            assert len(await runtime.client().get_tasks_by_status(TaskStatus.QUEUED)) == 1
