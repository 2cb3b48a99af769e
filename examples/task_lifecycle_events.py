"""A task's life as events: callbacks, a live subscription, typed events, the durable log.

    python examples/task_lifecycle_events.py [DB_PATH] [--backend trio]

The seeds' full workflow. A callback follows every task's events (``subscribe_to_task_events``
with ``"*"``); a planner creates a deployment task; a live subscription follows that one
task (``client.subscribe("task.*", task_id=...)``); a deployer starts it and completes it
by publishing a ``TaskCompletedEvent`` (the runtime makes it true through the state
machine, then logs ``task.completed``); a reviewer publishes an app event built with
``create_task_event``. Finally the whole durable log is replayed with ``client.events(after=0)``,
showing who caused each event (``source_agent``) and the workflow it belongs to
(``correlation_id``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio
from anyio.abc import TaskStatus as StartStatus

from hive_orchestration import (
    Event,
    OrchestrationClient,
    TaskCompletedEvent,
    TaskStatus,
    UnifiedEventType,
    create_task_event,
)

WORKFLOW = "release-42"
LIFECYCLE = ["task.created", "task.started", "task.completed"]


async def follow_live(
    client: OrchestrationClient, task_id: str, *, task_status: StartStatus[None]
) -> None:
    """Print the task's events as they happen, until it completes."""
    async with client.subscribe("task.*", task_id=task_id) as live:
        task_status.started()  # subscribed: nothing committed from now on is missed
        async for event in live:
            print(f"  live     #{event.seq} {event.type}")
            if event.type == UnifiedEventType.TASK_COMPLETED:
                break


async def main(db_path: str) -> None:
    async with OrchestrationClient(db_path=db_path, source_agent="orchestrator-app") as client:
        # One client per agent, sharing the runtime; the planner's tasks carry the
        # workflow's correlation id, and so does every event about them.
        planner = client.bind(source_agent="ai-planner", correlation_id=WORKFLOW)
        deployer = client.bind(source_agent="ai-deployer")

        seen: list[Event] = []
        completed = anyio.Event()

        async def on_task_event(event: Event) -> None:
            # Called in log order, one event at a time, for every task ("*").
            seen.append(event)
            print(f"  callback #{event.seq} {event.event_type} from {event.source_agent}")
            if event.type == UnifiedEventType.TASK_COMPLETED:
                completed.set()

        await client.subscribe_to_task_events("*", on_task_event)

        task_id = await planner.create_task(
            task_type="deployment",
            payload={"script": "deploy.sh", "env": "production", "services": ["api", "worker"]},
        )
        print(f"created task {task_id}")

        async with anyio.create_task_group() as tg:
            await tg.start(follow_live, client, task_id)
            await deployer.update_task_status(task_id, TaskStatus.RUNNING)
            # A lifecycle event is not just logged: it completes the task for real.
            await deployer.publish_task_event(
                TaskCompletedEvent(task_id=task_id, result={"deployed_services": ["api", "worker"]})
            )
        with anyio.fail_after(10):
            await completed.wait()

        # An app event (not the runtime's own namespace): appended to the log as it is.
        review = create_task_event(
            UnifiedEventType.REVIEW_COMPLETED,
            task_id,
            correlation_id=WORKFLOW,
            source_agent="ai-reviewer",
            additional_data={"review_score": 9},
        )
        logged = await client.publish_event(review)
        assert logged is not None
        print(f"published #{logged.seq} {logged.event_type} {logged.payload}")

        task = await client.get_task(task_id)
        assert task is not None
        print(f"task {task.task_type}: {task.status.value}, result {task.result}")

        # The durable log from the start (then live: stop at the last event we know of).
        print("replay of the durable log:")
        async with client.events(after=0) as history:
            with anyio.fail_after(10):
                async for event in history:
                    print(
                        f"  #{event.seq} {event.type:18} source={event.source_agent:12}"
                        f" correlation={event.correlation_id}"
                    )
                    if event.seq >= logged.seq:
                        break

        order = [event.type for event in seen if event.task_id == task_id]
        if order == LIFECYCLE and task.status is TaskStatus.COMPLETED:
            print(f"saw {', '.join(order)} in order")
        else:
            print(f"unexpected: saw {order}, task {task.status.value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
