"""The example agents (the follow-up seed's adapters): planner, reviewer, deployer,
tester and monitor. Each simulates its work in a few steps, reporting progress, and
returns a result a real agent of its kind would. ``examples/`` and the demo run them."""

from __future__ import annotations

from collections.abc import Mapping

import anyio

from .registry import AgentCapability, AgentRegistry
from .runner import TaskContext

__all__ = ["auto_register_adapters"]


async def _steps(context: TaskContext, names: list[str]) -> None:
    delay = context.payload.get("step_seconds", 0.02)
    seconds = float(delay) if isinstance(delay, int | float) else 0.02
    for done, name in enumerate(names, 1):
        await anyio.sleep(seconds)
        await context.progress({"done": done, "of": len(names)}, phase=name)


async def plan(context: TaskContext) -> Mapping[str, object]:
    goal = str(context.payload.get("goal", context.task.title))
    await _steps(context, ["analyse", "decompose"])
    return {"goal": goal, "steps": ["build", "test", "review", "deploy"]}


async def review(context: TaskContext) -> Mapping[str, object]:
    await _steps(context, ["read", "comment"])
    return {"approved": True, "comments": []}


async def deploy(context: TaskContext) -> Mapping[str, object]:
    services = context.payload.get("services", ["api"])
    await _steps(context, ["package", "rollout", "verify"])
    return {"environment": context.payload.get("environment", "production"), "deployed": services}


async def test(context: TaskContext) -> Mapping[str, object]:
    await _steps(context, ["unit", "integration"])
    return {"passed": 42, "failed": 0}


async def monitor(context: TaskContext) -> Mapping[str, object]:
    await _steps(context, ["probe"])
    return {"healthy": True}


def auto_register_adapters(registry: AgentRegistry, *, copies: int = 1) -> AgentRegistry:
    """Register the five example agents, ``copies`` workers each; returns ``registry``."""
    agents = (
        ("ai-planner", plan, "planning", "Turns a goal into a plan of subtasks"),
        ("ai-reviewer", review, "review", "Reviews a change"),
        ("ai-deployer", deploy, "deployment", "Deploys services to an environment"),
        ("ai-tester", test, "testing", "Runs the test suites"),
        ("ai-monitor", monitor, "monitoring", "Checks that services are healthy"),
    )
    for agent_type, handler, capability, description in agents:
        registry.register(
            agent_type,
            handler,
            capabilities=[AgentCapability(capability, (capability,), description)],
            copies=copies,
            description=description,
        )
    return registry
