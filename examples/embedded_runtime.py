"""Embed the runtime in an app: publish durable events, watch them live, read the log back.

    python examples/embedded_runtime.py [DB_PATH] [--backend trio]

Runs on asyncio by default. The database defaults to a temporary file, so the example
leaves nothing behind; give a path to keep the log and see it grow across runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import Runtime, RuntimeConfig, SubscriberLaggedError


async def main(db_path: str) -> None:
    config = RuntimeConfig(synchronous="FULL")  # a reply means the write survived power loss
    async with Runtime.open(db_path, config=config) as runtime:
        async with runtime.subscribe("deploy.*", correlation_id="release-42") as live:
            for step in ("deploy.requested", "deploy.started", "deploy.completed"):
                event = await runtime.publish(
                    step,
                    {"service": "api", "env": "production"},
                    source="orchestrator-app",
                    correlation_id="release-42",
                )
                print(f"durable #{event.seq}: {event.type}")
            try:
                for _ in range(3):
                    seen = await live.receive()
                    print(f"live    #{seen.seq}: {seen.type} {seen.data}")
            except SubscriberLaggedError as lag:
                # Too slow to keep up: the log is durable, so catch up from where it broke.
                missed = await runtime.read_events(after=lag.last_seq)
                print(f"caught up on {len(missed)} missed event(s)")
        history = await runtime.read_events(after=0)
        print(f"the log holds {len(history)} event(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
