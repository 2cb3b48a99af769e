"""Benchmark: does a large purge, or a large trim of the event log, stall a writer?

The database is bench/reads.py's (built once and cached in ``bench/.cache/``): ``--tasks``
(1 000 000) finished tasks of type ``bench``, each with its run and its four events. On a
copy of it, at the default ``synchronous=FULL``:

1. A steady writer (create a task, claim it, complete it, over and over, each call
   awaiting its durable reply) alone for ``--seconds``: p50, p99 and worst latency.
2. The same writer while ``purge_tasks(0, task_type="bench", chunk=--chunk)`` deletes
   every one of those tasks with its run and events (5 rows a task in three tables, plus
   the indexes): the writer's latencies during it, and the purge's time and rate.
3. On a fresh copy, the writer while ``trim_events(max_events=1000, chunk=--trim-chunk)``
   trims the log to its last thousand events.
4. What the file looks like after the purge: its size, and its free pages (SQLite keeps
   freed pages in the file, on its freelist, and reuses them for new rows; the runtime
   does not vacuum: see docs/RETENTION.md).

Goal: the writer's p99 during the purge and the trim stays under 10 ms (bench/reads.py's
goal for the largest read).

Run from the repository root::

    python bench/retention.py                    # asyncio, a million tasks
    python bench/retention.py --backend trio
    python bench/retention.py --tasks 100000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))

from reads import CACHE, Writer, _summary, _write_until, cached

from hive_orchestration import Runtime, RuntimeConfig

P99_GOAL = 0.010  # seconds
DRIVER: Any = os.environ.get("HIVE_BENCH_DRIVER", "auto")


@dataclass
class Result:
    backend: str
    tasks: int
    events: int
    chunk: int
    trim_chunk: int
    alone: Writer
    during_purge: Writer
    purge_seconds: float
    purged: int
    during_trim: Writer
    trim_seconds: float
    trimmed_through: int
    file_mb: float
    free_pages: int
    pages: int
    load: str = ""


def _config() -> RuntimeConfig:
    # Generous deadlines: a stalled writer is measured, not cut short at 30 s.
    return RuntimeConfig(
        lease_timeout=600.0, worker_timeout=600.0, ask_timeout=600.0, storage_driver=DRIVER
    )


async def _during(rt: Runtime, work: Any) -> tuple[list[float], float, Any]:
    """The writer's latencies while ``work()`` runs (only the calls made meanwhile), the
    work's time and its answer."""
    latencies: list[float] = []
    stop = anyio.Event()
    answer: Any = None
    seconds = 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(_write_until, rt, stop, latencies)
        await anyio.sleep(0.2)  # the writer is going before the work starts
        skip = len(latencies)
        began = time.perf_counter()
        answer = await work()
        seconds = time.perf_counter() - began
        stop.set()
    del latencies[:skip]
    return latencies, seconds, answer


async def run(
    backend: str, count: int, seconds: float, chunk: int, trim_chunk: int, source: Path
) -> Result:
    with tempfile.TemporaryDirectory(prefix="hive-bench-retention-") as folder:
        path = Path(folder) / "purge.db"
        shutil.copyfile(source, path)
        async with Runtime.open(path, config=_config()) as rt:
            await rt.register_worker("writer", "bench", ["write"])
            events = await rt.last_seq()
            alone: list[float] = []
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_write_until, rt, stop, alone)
                await anyio.sleep(seconds)
                stop.set()

            async def purge() -> int:
                return await rt.purge_tasks(0, task_type="bench", chunk=chunk)

            during_purge, purge_seconds, purged = await _during(rt, purge)
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        finally:
            conn.close()
        file_mb = path.stat().st_size / 1e6

        path = Path(folder) / "trim.db"
        shutil.copyfile(source, path)
        async with Runtime.open(path, config=_config()) as rt:
            await rt.register_worker("writer", "bench", ["write"])

            async def trim() -> int:
                return await rt.trim_events(max_events=1000, chunk=trim_chunk)

            during_trim, trim_seconds, through = await _during(rt, trim)
    return Result(
        backend=backend,
        tasks=count,
        events=events,
        chunk=chunk,
        trim_chunk=trim_chunk,
        alone=_summary(alone),
        during_purge=_summary(during_purge),
        purge_seconds=purge_seconds,
        purged=purged,
        during_trim=_summary(during_trim),
        trim_seconds=trim_seconds,
        trimmed_through=through,
        file_mb=file_mb,
        free_pages=free,
        pages=pages,
        load=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )


def render(r: Result) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms"

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines = [
        f"backend {r.backend}: {r.tasks:,} finished tasks, {r.events:,} events;"
        f" load average {r.load}"
    ]
    for name, writer in (
        ("alone", r.alone),
        ("during the purge", r.during_purge),
        ("during the trim", r.during_trim),
    ):
        lines.append(
            f"writer {name:>16}: {writer.calls:>6,} calls  p50 {ms(writer.p50)}"
            f"  p99 {ms(writer.p99)}  worst {ms(writer.worst)}"
        )
    rate = r.purged / r.purge_seconds if r.purge_seconds else 0.0
    lines.append(
        f"purge: {r.purged:,} tasks (with runs and events) in {r.purge_seconds:.2f} s,"
        f" {rate:,.0f} tasks/s, chunks of {r.chunk:,}"
    )
    lines.append(
        f"trim: through seq {r.trimmed_through:,} in {r.trim_seconds:.2f} s,"
        f" chunks of {r.trim_chunk:,}"
    )
    lines.append(
        f"after the purge: file {r.file_mb:.1f} MB, {r.free_pages:,} of {r.pages:,} pages free"
        " (kept for reuse; not vacuumed)"
    )
    lines.append(
        f"goal: writer p99 < {ms(P99_GOAL)} during the purge"
        f" {verdict(r.during_purge.p99 < P99_GOAL)}, during the trim"
        f" {verdict(r.during_trim.p99 < P99_GOAL)}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="the writer alone")
    parser.add_argument("--chunk", type=int, default=250, help="tasks per purge transaction")
    parser.add_argument("--trim-chunk", type=int, default=1000, help="events per trim chunk")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the database is kept")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    source, _ = cached(args.cache, args.tasks)
    result: Result = anyio.run(
        run,
        args.backend,
        args.tasks,
        args.seconds,
        args.chunk,
        args.trim_chunk,
        source,
        backend=args.backend,
    )
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
