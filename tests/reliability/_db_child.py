"""Child process of the storage fault and two-process tests. One JSON object per line on
stdout, flushed at once, so that the parent can follow what the child did.

Usage::

    python _db_child.py runtime BACKEND DB_PATH TASKS [--forever]
    python _db_child.py lock DB_PATH MODE
    python _db_child.py fsize BACKEND DB_PATH LIMIT_BYTES
    python _db_child.py checkpoints BACKEND DB_PATH

- ``checkpoints``: ``runtime ... 0 --forever`` at ``synchronous=NORMAL`` (where the WAL
  checkpoint thread runs), the thread
  checkpointing after every commit (``storage/sqlite/checkpoints.py``: one page, no
  gap), each ``{"ack": ID, "checkpoints": N}`` saying how many it had run by then.

- ``runtime``: opens a runtime on the file (``{"error": ...}`` and exit code 3 if it is
  refused), creates TASKS tasks, prints ``{"ready": PID, "tasks": [...]}``, then, with
  ``--forever``, keeps creating tasks, printing ``{"ack": TASK_ID}`` once each is durable.
  It closes the runtime and exits 0 when its stdin reaches end of file.
- ``lock``: a plain sqlite3 connection that takes SQLite's lock on the file and holds it
  until stdin reaches end of file, printing ``{"locked": PID}`` once it holds it. MODE
  ``write`` holds the write lock (``BEGIN IMMEDIATE``: readers go on, writers wait);
  ``exclusive`` holds the whole file (``locking_mode=EXCLUSIVE``: readers wait too).
- ``fsize``: caps the size of any file this process writes (``RLIMIT_FSIZE``, no
  privilege needed; Python ignores ``SIGXFSZ``, so a write past it fails with ``EFBIG``),
  opens a runtime and creates tasks until three are refused, printing ``{"ack": ID}`` and
  ``{"refused": FAULT, "message": ...}``, then ``{"read": N}`` (the tasks it can still
  read) and ``{"closed": true}`` once the runtime has closed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any

# The runtime's imports wait until a command needs them: ``lock`` starts in milliseconds.


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def until_stdin_closes() -> None:
    import anyio.to_thread

    await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)


#: The checkpoint threads the runtime started (``checkpoints`` only).
CHECKPOINTERS: list[Any] = []


def checkpoint_always() -> None:
    from hive_orchestration.storage.sqlite import checkpoints

    checkpoints.PAGES = 1
    checkpoints.MIN_GAP = 0.0
    start = checkpoints.Checkpointer.start

    def started(self: checkpoints.Checkpointer) -> None:
        CHECKPOINTERS.append(self)
        start(self)

    checkpoints.Checkpointer.start = started  # type: ignore[method-assign]


def checkpoints_run() -> dict[str, int]:
    if not CHECKPOINTERS:
        return {}
    return {"checkpoints": sum(c.statistics().checkpoints for c in CHECKPOINTERS)}


async def run_runtime(path: str, tasks: int, forever: bool, synchronous: str = "FULL") -> int:
    import anyio

    from hive_orchestration import Runtime, RuntimeConfig, StorageError

    try:
        config = RuntimeConfig(synchronous=synchronous)  # type: ignore[arg-type]
        async with Runtime.open(path, config=config) as runtime:
            client = runtime.client(source_agent=f"child-{os.getpid()}")
            created = [await client.create_task("job", {"n": n}) for n in range(tasks)]
            say(ready=os.getpid(), tasks=created)

            async def write_forever() -> None:
                n = tasks
                while True:
                    say(ack=await client.create_task("job", {"n": n}), **checkpoints_run())
                    n += 1
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                if forever:
                    tg.start_soon(write_forever)
                await until_stdin_closes()
                tg.cancel_scope.cancel()
    except StorageError as exc:
        say(error=str(exc), fault=exc.fault, path=exc.path, pid=os.getpid())
        return 3
    return 0


def hold_lock(path: str, mode: str) -> int:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    if mode == "exclusive":
        # In WAL mode, the first read in exclusive locking mode takes the file for good.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("SELECT count(*) FROM events").fetchone()
    else:
        conn.execute("BEGIN IMMEDIATE")
    say(locked=os.getpid())
    sys.stdin.buffer.read()
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()
    return 0


async def fill_under_limit(path: str, limit: int) -> int:
    import resource

    from hive_orchestration import Runtime, StorageError, TaskStatus

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    refused = 0
    async with Runtime.open(path) as runtime:
        client = runtime.client(source_agent="fsize")
        n = 0
        while refused < 3 and n < 2000:
            try:
                say(ack=await client.create_task("job", {"n": n, "blob": "x" * 20_000}))
            except StorageError as exc:
                refused += 1
                say(refused=exc.fault, message=str(exc), path=exc.path)
            n += 1
        say(read=len(await client.get_tasks_by_status(TaskStatus.QUEUED)))
    say(closed=True)
    return 0


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "lock":
        return hold_lock(argv[1], argv[2])
    import anyio

    if command == "runtime":
        backend, path, tasks = argv[1], argv[2], int(argv[3])
        forever = "--forever" in argv[4:]
        return anyio.run(run_runtime, path, tasks, forever, backend=backend)
    if command == "checkpoints":
        checkpoint_always()
        return anyio.run(run_runtime, argv[2], 0, True, "NORMAL", backend=argv[1])
    if command == "fsize":
        backend, path, limit = argv[1], argv[2], int(argv[3])
        return anyio.run(fill_under_limit, path, limit, backend=backend)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
