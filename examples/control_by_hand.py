"""Control by hand: an outage of the mail provider, handled by an operator.

    python examples/control_by_hand.py [DB_PATH] [--backend trio]

The mail task type is revoked while the provider is down (its tasks wait in the queue), a
mail that failed meanwhile is retried by hand once it is back, the app waits for its
result, a queue of stale reports is flushed, and the tasks are counted by status and type.
Runs on asyncio by default, on a temporary database unless given a path.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import Runtime, TaskStatus


async def main(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        app = runtime.client(source_agent="shop-app")
        ops = runtime.client(source_agent="ops-anna")
        # A mail that fails for good: the provider rejected it.
        first = await app.create_task("mail", {"to": "a@example.com"}, max_retries=0)
        claim = await runtime.claim_task("mailer-1", ["mail"], start=True)
        assert claim is not None
        await runtime.fail_task(claim.lease, "SMTP 421: service not available")
        # The operator holds the mail queue back while the provider is down.
        await ops.revoke_task_type("mail", reason="provider outage")
        # At most one welcome mail per customer in the queue, whatever the app retries.
        welcome = await app.create_task(
            "mail",
            {"to": "b@example.com"},
            idempotency_key="welcome-b",
            idempotency_scope="active",
        )
        assert await app.create_task("mail", idempotency_key="welcome-b") == welcome
        assert await runtime.claim_task("mailer-1", ["mail"]) is None  # held back
        for day in range(3):
            await app.create_task("report", {"day": day})
        print(f"flushed {await ops.flush_queue('report')} stale report(s)")
        # The provider is back: retry the failed mail, and let the queue go.
        await ops.retry_task(first, reason="provider is back")
        await ops.restore_task_type("mail")

        async def mailer() -> None:
            while (claim := await runtime.claim_task("mailer-1", ["mail"], start=True)) is not None:
                await runtime.complete_task(claim.lease, {"sent_to": claim.task.payload["to"]})

        async with anyio.create_task_group() as group:
            group.start_soon(mailer)
            done = await app.wait_for_task(first, timeout=30)
        print(f"mail {done.status.value} after a retry by hand: {done.result}")
        assert done.status is TaskStatus.COMPLETED
        counts = await runtime.get_task_counts()
        print(f"tasks by status and type: {counts}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
