"""Benchmark of worker heartbeats against raw sqlite3 updates, in the same run.

1 000 workers are registered; then each sends heartbeats in a loop
(``update_worker_heartbeat``: a durable write, answered after COMMIT) until ``--beats``
heartbeats are done. Ceilings, on the same schema and file system: raw stdlib sqlite3
doing the heartbeat UPDATE one per commit, and 1 000 per transaction. All at the default
``synchronous=FULL``, WAL, on a file database.

Run from the repository root::

    python bench/workers.py                 # asyncio
    python bench/workers.py --backend trio
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

from hive_orchestration import Runtime
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

WORKERS = 1_000
UPDATE = "UPDATE workers SET last_heartbeat = ?, status = ? WHERE id = ?"


@dataclass
class Result:
    backend: str
    workers: int
    beats: int
    runtime: float  # heartbeats/s
    raw_per_commit: float
    raw_batched: float
    transactions: int


async def runtime_heartbeats(folder: Path, beats: int) -> tuple[float, int]:
    async with Runtime.open(folder / "workers.db") as rt:
        async with anyio.create_task_group() as tg:
            for n in range(WORKERS):
                tg.start_soon(rt.register_worker, f"worker-{n}", "bench", ["bench"])
        per_worker = beats // WORKERS  # main() makes sure it is at least 1
        before = (await rt.statistics()).storage.transactions

        async def beat(worker_id: str) -> None:
            for _ in range(per_worker):
                assert await rt.update_worker_heartbeat(worker_id)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for n in range(WORKERS):
                tg.start_soon(beat, f"worker-{n}")
        elapsed = time.perf_counter() - start
        transactions = (await rt.statistics()).storage.transactions - before
    return per_worker * WORKERS / elapsed, transactions


def raw(folder: Path, beats: int, per_txn: int) -> float:
    conn = sqlite3.connect(folder / f"raw-{per_txn}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    conn.executemany(
        "INSERT INTO workers (id, role, status) VALUES (?, 'bench', 'active')",
        [(f"worker-{n}",) for n in range(WORKERS)],
    )
    now = datetime.now(UTC).isoformat()
    rows = [(now, "active", f"worker-{n % WORKERS}") for n in range(beats)]
    start = time.perf_counter()
    for first in range(0, beats, per_txn):
        conn.execute("BEGIN")
        for row in rows[first : first + per_txn]:
            conn.execute(UPDATE, row)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return beats / elapsed


async def run(backend: str, beats: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
        path = Path(folder)
        rate, transactions = await runtime_heartbeats(path, beats)
        per_commit = raw(path, min(beats, 3_000), 1)
        batched = raw(path, beats, 1_000)
    return Result(backend, WORKERS, beats, rate, per_commit, batched, transactions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--beats", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.beats < WORKERS:
        parser.error(f"--beats must be at least {WORKERS:,}: every worker beats at least once")
    args.beats -= args.beats % WORKERS  # every worker beats as often as the others
    r: Result = anyio.run(run, args.backend, args.beats, backend=args.backend)
    print(
        f"backend: {r.backend}  (synchronous=FULL, file database, WAL; {r.workers:,} workers)\n"
        f"raw sqlite3, 1 heartbeat UPDATE per commit:   {r.raw_per_commit:>9,.0f}/s\n"
        f"raw sqlite3, 1000 heartbeat UPDATEs per txn:  {r.raw_batched:>9,.0f}/s\n"
        f"update_worker_heartbeat, {r.workers:,} workers at once: {r.runtime:>9,.0f}/s"
        f" = {r.runtime / r.raw_per_commit:.1f}x one-per-commit,"
        f" {r.runtime / r.raw_batched:.1%} of batched;"
        f" {r.beats / max(r.transactions, 1):.0f} heartbeats per commit"
    )
    if args.json:
        print(json.dumps(asdict(r), indent=2))


if __name__ == "__main__":
    main()
