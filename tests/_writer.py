"""Child process of ``tests/test_durability.py``: publishes events until it is killed.

Usage::

    python _writer.py BACKEND DB_PATH SYNCHRONOUS ROUND WRITERS

Prints ``ready LAST_SEQ`` once the runtime is open, then runs ``WRITERS`` concurrent tasks
that each publish events in a loop. After each ``publish`` returns (the event is durable)
the task prints ``SEQ ID`` and flushes, so every line on stdout is an acknowledged event.

Each event describes itself, so that the parent can check any row it finds without this
module: ``data["id"]`` is ``r{ROUND}-w{WRITER}-{N}``, equal to the event's
``correlation_id``, and ``data["digest"]`` is the SHA-256 of ``data["blob"]``, whose length
varies from a few bytes to several database pages.
"""

from __future__ import annotations

import hashlib
import sys

import anyio

from hive_orchestration import Runtime, RuntimeConfig

EVENT_TYPE = "durability.tick"


def blob_for(uid: str, n: int) -> str:
    size = 16 + (n * 977) % 9000
    seed = hashlib.sha256(uid.encode()).hexdigest()
    return (seed * (size // len(seed) + 1))[:size]


async def write_forever(runtime: Runtime, round_: int, writer: int) -> None:
    n = 0
    while True:
        uid = f"r{round_}-w{writer}-{n}"
        blob = blob_for(uid, n)
        data = {
            "id": uid,
            "round": round_,
            "writer": writer,
            "n": n,
            "blob": blob,
            "digest": hashlib.sha256(blob.encode()).hexdigest(),
        }
        event = await runtime.publish(
            EVENT_TYPE,
            data,
            source=f"writer-{writer}",
            correlation_id=uid,
            task_id=f"task-{writer}",
        )
        sys.stdout.write(f"{event.seq} {uid}\n")
        sys.stdout.flush()
        n += 1


async def main(path: str, synchronous: str, round_: int, writers: int) -> None:
    config = RuntimeConfig(synchronous=synchronous)  # type: ignore[arg-type]
    async with Runtime.open(path, config=config) as runtime:
        stats = await runtime.statistics()
        sys.stdout.write(f"ready {stats.storage.last_seq}\n")
        sys.stdout.flush()
        async with anyio.create_task_group() as tg:
            for writer in range(writers):
                tg.start_soon(write_forever, runtime, round_, writer)


if __name__ == "__main__":
    backend, db, sync, round_arg, writers_arg = sys.argv[1:]
    anyio.run(main, db, sync, int(round_arg), int(writers_arg), backend=backend)
