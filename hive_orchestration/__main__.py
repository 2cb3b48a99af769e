"""``python -m hive_orchestration`` / ``hive-orchestration``: the command line.

For now it has one command, ``demo``: it opens the embedded runtime on a local SQLite file,
subscribes to events, publishes a few through the storage actor (each reply means the write
is durable), then closes the runtime, opens it again and shows that the log survived.
Run it twice and the history of the first run is still there.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence

import anyio

from . import DEFAULT_DB_PATH, HiveError, Runtime


async def _demo(path: str) -> None:
    run_id = f"demo-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    async with Runtime.open(path) as runtime:
        before = (await runtime.statistics()).storage.last_seq
        print(f"opened {runtime.path}: {before} event(s) already in the log")
        steps = ["plan.requested", "plan.approved", "deploy.started", "deploy.completed"]
        async with runtime.subscribe("*", correlation_id=run_id) as live:
            for step in steps:
                event = await runtime.publish(
                    step,
                    {"target": "production", "services": ["api", "worker"]},
                    source="demo",
                    correlation_id=run_id,
                )
                print(f"  durable  #{event.seq:<5} {event.type}")
            for _ in steps:
                seen = await live.receive()
                print(f"  live     #{seen.seq:<5} {seen.type}  (seen by a subscriber)")
        stats = await runtime.statistics()
        storage = stats.storage
        print(
            f"storage: {storage.writes} write(s) in {storage.transactions} transaction(s), "
            f"driver {storage.driver}, synchronous={storage.synchronous}"
        )

    print("runtime closed; opening it again")
    async with Runtime.open(path) as runtime:
        history = await runtime.read_events(after=0, limit=10_000)
        runs = sorted({e.correlation_id for e in history if e.correlation_id})
        mine = [e for e in history if e.correlation_id == run_id]
        print(f"the log holds {len(history)} event(s) from {len(runs)} demo run(s):")
        for event in mine:
            print(f"  #{event.seq:<5} {event.type:<18} {event.correlation_id}")
        print("run the demo again: the history above will still be there.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hive-orchestration", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded runtime on a local SQLite file")
    demo.add_argument(
        "--db", default=str(DEFAULT_DB_PATH), help="database file (default: %(default)s)"
    )
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    try:
        anyio.run(_demo, args.db, backend=args.backend)
    except HiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
