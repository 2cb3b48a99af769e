"""Child process of ``test_remote_faults.py`` and ``test_take_over.py``: clients of a
database that another process owns. One JSON object per line on stdout, flushed at once,
each written only after the call it reports returned.

Usage::

    python _remote_child.py load BACKEND DB_PATH TAG CLIENTS ROUNDS
    python _remote_child.py slow_owner BACKEND DB_PATH TAG
    python _remote_child.py take_over BACKEND DB_PATH TAG

- ``load``: opens CLIENTS clients at once (each its own connection to the owner), prints
  ``{"op": "open"}`` once all are connected, waits for a line on stdin (so that every
  child's clients are connected before any starts), then each client, ROUNDS times:
  creates a ``job`` task (idempotency key ``TAG-C-R``), claims one (any client's) and
  completes it: ``{"op": "created" | "claimed" | "completed", "task": T, ...}``. Prints
  ``{"op": "done"}`` and exits once every client is through.
- ``slow_owner``: an owner caught opening: takes the database's lock as a runtime that
  will serve does (its lock file says ``starting``), prints ``{"op": "claimed"}``; on a
  line ``clear`` on stdin, clears its lock file's records as it does when it lets the lock
  go, still holding it (``{"op": "cleared"}``); on any other line, lets the lock go and
  opens a client (which owns the database, or
  connects to whoever took it meanwhile): ``{"op": "open", "remote": BOOL}``; exits once
  its stdin closes.
- ``take_over``: one client with ``take_over=True``; prints ``{"op": "open", "remote":
  BOOL}``, then creates tasks (key ``TAG-N``) one after another, printing ``{"op":
  "created", "task": T, "key": K, "remote": BOOL, "owner": PID}`` (the owner's pid just
  after, by ``server_status``), or ``{"op": "unknown", "key": K,
  "error": NAME}`` for a call that failed (its outcome unknown), until its stdin closes;
  then ``{"op": "closed"}`` once the client (and the runtime, if it took the database
  over) has closed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import anyio.to_thread

from hive_orchestration import (
    ConnectionLostError,
    OrchestrationClient,
    RuntimeConfig,
    RuntimeStoppedError,
)


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def load(db_path: str, tag: str, clients: int, rounds: int) -> None:
    async with anyio.create_task_group() as group:
        opened = 0
        go = anyio.Event()
        all_open = anyio.Event()

        async def one(n: int) -> None:
            nonlocal opened
            worker = f"{tag}-w{n}"
            async with OrchestrationClient(db_path=db_path, source_agent=worker) as client:
                assert client.remote, "the database is owned by another process"
                opened += 1
                if opened == clients:
                    all_open.set()
                await go.wait()
                for r in range(rounds):
                    task_id = await client.create_task(
                        "job", {"n": r}, idempotency_key=f"{tag}-{n}-{r}"
                    )
                    say(op="created", task=task_id, key=f"{tag}-{n}-{r}")
                    claim = await client.claim_task(worker, ["job"], wait=60)
                    assert claim is not None, "as many claims as tasks: one always comes"
                    say(op="claimed", task=claim.task.id, run=claim.lease.run_id, worker=worker)
                    done = await client.complete_task(claim.lease, {"by": worker})
                    say(op="completed", task=done.id, run=claim.lease.run_id, worker=worker)

        for n in range(clients):
            group.start_soon(one, n)
        await all_open.wait()
        say(op="open")
        await anyio.to_thread.run_sync(sys.stdin.readline)
        go.set()
    say(op="done")


async def slow_owner(db_path: str) -> None:
    from hive_orchestration.storage.store import open_store

    claim = open_store(db_path).claim(serving=True)
    await anyio.to_thread.run_sync(claim.acquire)
    say(op="claimed")
    while (await anyio.to_thread.run_sync(sys.stdin.readline)).strip() == "clear":
        claim.clear_records()  # as release() does first, the lock still held
        say(op="cleared")
    claim.release()
    async with OrchestrationClient(db_path=db_path) as client:
        say(op="open", remote=client.remote)
        await anyio.to_thread.run_sync(sys.stdin.read)


async def take_over(db_path: str, tag: str) -> None:
    config = RuntimeConfig(take_over=True)
    stop = anyio.Event()

    async def until_stdin_closes() -> None:
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        stop.set()

    async with OrchestrationClient(db_path=db_path, config=config, source_agent=tag) as client:
        say(op="open", remote=client.remote)
        async with anyio.create_task_group() as group:
            group.start_soon(until_stdin_closes)
            n = 0
            while not stop.is_set():
                key = f"{tag}-{n}"
                try:
                    task_id = await client.create_task("job", {"key": key}, idempotency_key=key)
                except (ConnectionLostError, RuntimeStoppedError) as exc:
                    say(op="unknown", key=key, error=type(exc).__name__, message=str(exc))
                else:
                    try:  # who answered it (the owner now)
                        owner = (await client.server_status()).pid
                    except (ConnectionLostError, RuntimeStoppedError):
                        owner = None
                    say(op="created", task=task_id, key=key, remote=client.remote, owner=owner)
                n += 1
                await anyio.sleep(0.01)
            group.cancel_scope.cancel()
    say(op="closed")


if __name__ == "__main__":
    mode, backend, path, tag = sys.argv[1:5]
    if mode == "load":
        anyio.run(load, path, tag, int(sys.argv[5]), int(sys.argv[6]), backend=backend)
    elif mode == "take_over":
        anyio.run(take_over, path, tag, backend=backend)
    elif mode == "slow_owner":
        anyio.run(slow_owner, path, backend=backend)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
