"""Retention: results you do not keep, old tasks purged, an event log kept small, and a
reader that replays from a point the log no longer holds.

    python examples/retention.py [DB_PATH] [--backend trio]

Runs on asyncio by default. The database defaults to a temporary file. docs/RETENTION.md
says what each call keeps and why.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import EventsTrimmedError, Runtime, RuntimeConfig


async def main(db_path: str) -> None:
    # Sent mail needs no record once sent: its tasks go as they complete (a failure stays).
    config = RuntimeConfig(delete_on_success=("mail",))
    async with Runtime.open(db_path, config=config) as runtime:
        for kind in ("mail", "mail", "report"):
            await runtime.create_task(kind, {"to": "ops@example.com"})
            claim = await runtime.claim_task("worker-1", kind, start=True)
            assert claim is not None
            await runtime.complete_task(claim.lease, {"ok": True})
        counts = await runtime.count_tasks()
        print(f"after the work: {counts.get('completed', 0)} completed task(s) kept (the report)")

        # Every finished task older than 0 s, i.e. all of them, with runs and events.
        reader_at = await runtime.last_seq()
        purged = await runtime.purge_tasks(0, source_agent="ops")
        print(f"purged {purged} finished task(s)")

        for n in range(10):
            await runtime.publish("app.note", {"n": n})
        through = await runtime.trim_events(max_events=5, source_agent="ops")
        print(f"event log trimmed through seq {through}")
        try:
            await runtime.read_events(after=1)
        except EventsTrimmedError as trimmed:
            # The reader starts again from the current state, then reads on from here.
            print(f"a replay from seq 1 is refused: the oldest kept is {trimmed.oldest_seq}")
            reader_at = trimmed.oldest_seq - 1
        kept = await runtime.read_events(after=reader_at)
        print(f"the reader goes on with {len(kept)} event(s) from seq {kept[0].seq}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
