"""The ai-deployer: a process of its own with nothing but a client of the database, and
two copies of its agent under ``AgentRunner`` on it. They take the plan's deployments as
their dependencies allow, until SIGTERM (or Ctrl-C), which drains them.

    python examples/deployment/deployer.py DB_PATH [--backend trio]

(``hive-orchestration worker agents:deploy --task-types deployment --concurrency 2`` run
from this folder does the same.)
"""

from __future__ import annotations

import argparse
import signal

import anyio
from agents import deploy  # agents.py, beside this script

from hive_orchestration import AgentRegistry, AgentRunner, OrchestrationClient


async def main(db_path: str) -> None:
    registry = AgentRegistry()
    registry.register("ai-deployer", deploy, capabilities=["deployment"], copies=2)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            OrchestrationClient(db_path=db_path, source_agent="ai-deployer") as client,
            AgentRunner(client, registry) as runner,
        ):
            print(f"ai-deployer: {', '.join(runner.worker_ids)} at work", flush=True)
            async for _ in signals:
                break  # leaving the block drains the copies and unregisters them
    print(f"ai-deployer: stopped after {runner.completed} deployment(s)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", help="the database file")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.db_path, backend=args.backend)
