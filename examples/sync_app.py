"""A synchronous app: the same runtime from plain functions and threads, no ``async``.

    python examples/sync_app.py [DB_PATH] [--backend trio]

``SyncOrchestrationClient`` runs an embedded runtime on an event loop of its own (in a
background thread) for its ``with`` block; every method blocks until the answer comes and
may be called from any thread. The app queues report tasks, follows them with a plain
callback (``subscribe_to_task_events``: it runs in a worker thread), and a worker in a
plain ``threading.Thread`` claims and completes them. Finally the durable log is read
back with ``client.events(after=0)`` and ``events.get(timeout)``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path
from typing import Literal

from hive_orchestration import Event, SyncOrchestrationClient, TaskStatus

DAYS = ["monday", "tuesday", "wednesday"]
WORKER = "report-worker-1"


def worker_loop(client: SyncOrchestrationClient, stop: threading.Event) -> None:
    """A worker thread: claim a report, do it, complete it; until told to stop."""
    client.register_worker(WORKER, "reporter", ["report"])
    while not stop.is_set():
        # Blocks this thread (not the runtime) up to `wait` seconds for a task; short,
        # so that the loop sees `stop` soon after it is set.
        claim = client.claim_task(WORKER, wait=0.2)
        if claim is None:
            continue
        client.start_task(claim.lease)
        day = claim.task.payload.get("day")
        client.complete_task(claim.lease, {"day": day, "pages": 3})
    client.unregister_worker(WORKER)


def main(db_path: str, backend: Literal["asyncio", "trio"]) -> None:
    with SyncOrchestrationClient(db_path=db_path, source_agent="cron", backend=backend) as client:
        ids: list[str] = []  # ours, filled in before any of them can complete
        finished: list[str] = []
        lock = threading.Lock()  # the callback runs in worker threads, one call at a time
        all_done = threading.Event()

        def on_task_event(event: Event) -> None:
            if event.type == "task.completed" and event.task_id in ids:
                with lock:
                    finished.append(event.task_id)
                    if len(finished) == len(ids):
                        all_done.set()
            print(f"  callback: #{event.seq} {event.type:14} {event.source}")

        handle = client.subscribe_to_task_events("*", on_task_event)  # every task's task.*
        for day in DAYS:
            ids.append(client.create_task("report", {"day": day}, title=f"report {day}"))
        print(f"queued {len(ids)} report(s); pending: {len(client.get_pending_tasks())}")

        stop = threading.Event()
        worker = threading.Thread(target=worker_loop, args=(client, stop), name=WORKER)
        worker.start()
        try:
            if not all_done.wait(timeout=10):
                raise TimeoutError("the worker did not finish the reports in time")
        finally:
            stop.set()
            worker.join()
        handle.cancel()
        print(f"the callback saw {handle.delivered} event(s)")

        # The durable log, from the start; `get` returns None if nothing came in time.
        print("task.completed in the log:")
        wanted = set(ids)
        with client.events(after=0, pattern="task.completed") as events:
            while wanted and (event := events.get(timeout=5)) is not None:
                wanted.discard(event.task_id or "")
                print(f"  #{event.seq} {event.type} {event.data.get('result')}")

        tasks = [client.get_task(task_id) for task_id in ids]
        done = [t for t in tasks if t is not None and t.status is TaskStatus.COMPLETED]
        by = sorted({str(t.assigned_worker) for t in done})
        print(f"completed {len(done)} of {len(ids)} report(s) in a plain thread: {by}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        main(path, args.backend)
