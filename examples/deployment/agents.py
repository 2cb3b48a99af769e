"""The handlers the deployment's worker processes run: each an async function of a
``TaskContext`` returning the task's result (as ``AgentRunner`` and ``hive-orchestration
worker`` take them)."""

from __future__ import annotations

import anyio

from hive_orchestration import TaskContext


async def deploy(context: TaskContext) -> dict[str, object]:
    """Roll one service out (the ai-deployer's work)."""
    service = str(context.payload.get("service", "all"))
    await anyio.sleep(0.02)  # the work itself
    await context.progress({"service": service}, phase="rollout")
    await anyio.sleep(0.02)
    return {"service": service, "version": context.payload.get("version"), "healthy": True}


async def check(context: TaskContext) -> dict[str, object]:
    """Test, review or monitor (run by `hive-orchestration worker agents:check`)."""
    await anyio.sleep(0.02)
    return {"check": context.task.task_type, "passed": True}
