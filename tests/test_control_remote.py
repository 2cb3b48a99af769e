"""Control by hand (docs/CONTROL.md) from another process, through the owner's socket, and
what of it survives the owner's SIGKILL: a revoked task type, a retried task, idempotency
keys held while live. A real owner process (``_owner.py``) on a real file, on both
backends; the test's client talks to it through the real socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from reliability._remote import DEADLINE, owner
from test_remote_tcp import ADMIN, DEPLOYER, serve, write_tokens

from hive_orchestration import (
    AccessDeniedError,
    IllegalTransitionError,
    OrchestrationClient,
    RequestTimeoutError,
    Runtime,
    TaskStatus,
)

pytestmark = pytest.mark.anyio


async def test_control_through_the_socket_and_across_a_sigkill(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend) as process,
        OrchestrationClient(db_path=db_path, source_agent="ops") as client,
    ):
        assert client.remote
        # wait_for_task: woken in the owner's process by the task's end.
        task_id = await client.create_task("build")
        got: list[Any] = []

        async def wait() -> None:
            got.append(await client.wait_for_task(task_id, timeout=DEADLINE))

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                claim = await client.claim_task("w1", ["build"], start=True)
                assert claim is not None
                await client.fail_task(claim.lease, "boom", retryable=False)
        assert (got[0].status, got[0].error) == (TaskStatus.FAILED, "boom")
        with pytest.raises(RequestTimeoutError):
            await client.wait_for_task(await client.create_task("other"), timeout=0.05)
        # retry_task, with who did it.
        retried = await client.retry_task(task_id, reason="fixed")
        assert (retried.status, retried.attempts) == (TaskStatus.QUEUED, 0)
        with pytest.raises(IllegalTransitionError):
            await client.retry_task(task_id)
        # Revoke: nothing of the type is handed out, across the kill below.
        assert await client.revoke_task_type("build", reason="maintenance") is True
        assert await client.claim_task("w1", ["build"]) is None
        assert [r.task_type for r in await client.get_revoked_task_types()] == ["build"]
        # Keys held while live, and one held forever.
        live = await client.create_task("mail", idempotency_key="l", idempotency_scope="active")
        ended = await client.create_task("mail", idempotency_key="e", idempotency_scope="active")
        await client.cancel_task(ended)
        # Flush and counts.
        await client.create_task("junk")
        await client.create_task("junk")
        assert await client.flush_queue("junk") == 2
        assert await client.get_task_counts() == {
            "queued": {"build": 1, "mail": 1, "other": 1},
            "cancelled": {"mail": 1},
        }
        process.kill()
        with anyio.fail_after(DEADLINE):
            await process.process.wait()
    async with Runtime.open(db_path) as runtime:
        assert [r.task_type for r in await runtime.get_revoked_task_types()] == ["build"]
        assert await runtime.claim_task("w1", ["build"]) is None
        assert await runtime.create_task("mail", idempotency_key="l") == live
        assert await runtime.create_task("mail", idempotency_key="e") != ended
        assert await runtime.restore_task_type("build") is True
        claim = await runtime.claim_task("w1", ["build"])
        assert claim is not None
        assert claim.task.id == task_id
        assert claim.lease.attempt == 2
        (event,) = await runtime.read_events(0, pattern="task.retried")
        assert (event.source, event.data["by"], event.data["note"]) == ("ops", "ops", "fixed")
        revoked = await runtime.read_events(0, pattern="task.type_revoked")
        assert [(e.data["task_type"], e.data["reason"]) for e in revoked] == [
            ("build", "maintenance")
        ]


async def test_over_tcp_an_agent_retries_its_own_tasks_and_only_an_admin_controls_types(
    db_path: str, anyio_backend: str, tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path)
    async with serve(
        db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
    ) as served:
        url = served.url()
        async with (
            OrchestrationClient(url=url, token=ADMIN, source_agent="ops") as admin,
            OrchestrationClient(url=url, token=DEPLOYER) as deployer,
        ):
            others = await admin.create_task("deploy")
            await admin.cancel_task(others)
            own = await deployer.create_task("deploy")
            await deployer.cancel_task(own)
            before = await admin.last_seq()
            refusals = [
                lambda: deployer.retry_task(others),  # not a task it created
                lambda: deployer.revoke_task_type("deploy"),
                lambda: deployer.restore_task_type("deploy"),
                lambda: deployer.flush_queue("deploy"),
                lambda: deployer.flush_queue(),
            ]
            for refused in refusals:
                with pytest.raises(AccessDeniedError):
                    await refused()
            assert await admin.last_seq() == before  # nothing was done
            # Its own task it may retry (recorded as itself), and it may read and wait.
            assert (await deployer.retry_task(own)).status is TaskStatus.QUEUED
            assert (await deployer.wait_for_task(others, timeout=DEADLINE)).id == others
            assert await deployer.get_task_counts() == {
                "queued": {"deploy": 1},
                "cancelled": {"deploy": 1},
            }
            assert await deployer.get_revoked_task_types() == []
            (event,) = await admin.read_events(before, pattern="task.retried")
            assert (event.source, event.data["by"]) == ("ai-deployer", "ai-deployer")
            # The admin may do what the agent may not.
            assert await admin.revoke_task_type("deploy") is True
            assert await admin.restore_task_type("deploy") is True
            assert await admin.flush_queue("deploy") == 1
