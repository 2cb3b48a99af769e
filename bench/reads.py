"""Benchmark: do the largest reads stall a writer? And do empty event reads scan the log?

The database: ``--tasks`` (1 000 000) finished tasks, each with its run and its four events
(created, assigned, started, completed), so a log of 4 000 000 events. It is built once and
kept in ``bench/.cache/`` (gitignored; ``--cache DIR`` to put it elsewhere), named by
size and schema version, then copied for each run so that runs start alike:

1. a runtime opens a scratch file and puts one task through create, claim, start and
   complete, so that every row and event is the runtime's own;
2. stdlib sqlite3 copies that task's row, its run and its events ``--tasks`` times in one
   transaction (new time-ordered ids, creation times one millisecond apart, the events'
   ``task_id`` set to the copy's), which takes about a minute for a million tasks.

What is measured, on the copy, at the default ``synchronous=FULL``:

1. A steady writer: one producer that creates a task, claims it, completes it, over and
   over, each call awaiting its durable reply; every call's latency is recorded. First
   alone for ``--seconds``, then while the largest read runs; p50 and p99 of each.
2. The largest read: every completed task. Where the listing pages (a ``limit`` and an
   ``after`` cursor), it reads every page at the largest limit; on code without paging,
   one unbounded ``get_tasks_by_status("completed")``. Its time, its rows.
3. Event reads that match nothing: ``read_events`` with a type pattern no event has
   (``nothing.*``), an exact type (``nothing.here``), a pattern with no literal prefix
   (``*.nothing``), and an unknown task id; each one's time (median of ``--repeat``).

Goal: while the largest read runs, the writer's p99 stays under 10 ms.

Run from the repository root::

    python bench/reads.py                    # asyncio, a million tasks
    python bench/reads.py --backend trio
    python bench/reads.py --tasks 100000 --json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration._ids import new_id
from hive_orchestration.storage.sqlite.schema import SCHEMA_VERSION

P99_GOAL = 0.010  # seconds: the writer's p99 while the largest read runs
CACHE = Path(__file__).parent / ".cache"
DRIVER: Any = os.environ.get("HIVE_BENCH_DRIVER", "auto")
#: Rows per executemany while building: bounded memory, whatever the size.
CHUNK = 20_000


@dataclass
class Writer:
    calls: int
    p50: float  # seconds
    p99: float
    worst: float


@dataclass
class Result:
    backend: str
    tasks: int
    events: int
    build_seconds: float  # 0 when the cached database was used
    alone: Writer
    during: Writer
    read_seconds: float
    read_rows: int
    read_pages: int
    empty_reads: dict[str, float] = field(default_factory=dict)  # seconds each
    load: str = ""


# -- the database ---------------------------------------------------------------------------


async def _exemplar(path: Path) -> None:
    """One task through its whole life, written by the runtime itself."""
    async with Runtime.open(path) as rt:
        await rt.create_task("bench", {"n": 1}, title="finished")
        claim = await rt.claim_task("w-1", "bench")
        assert claim is not None
        await rt.start_task(claim.lease)
        await rt.complete_task(claim.lease, {"ok": True})


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def build(path: Path, count: int) -> None:
    anyio.run(_exemplar, path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        task_cols = _columns(conn, "tasks")
        run_cols = _columns(conn, "runs")
        event_cols = _columns(conn, "events")
        task = list(conn.execute("SELECT * FROM tasks").fetchone())
        run = list(conn.execute("SELECT * FROM runs").fetchone())
        events = [list(row) for row in conn.execute("SELECT * FROM events ORDER BY seq")]
        t_id, t_created = task_cols.index("id"), task_cols.index("created_at")
        r_id, r_task = run_cols.index("id"), run_cols.index("task_id")
        e_seq, e_task = event_cols.index("seq"), event_cols.index("task_id")
        start = datetime(2026, 1, 1, tzinfo=UTC)
        conn.execute("BEGIN")
        for table in ("runs", "tasks", "events"):  # the exemplar's own rows go: copies only
            conn.execute(f"DELETE FROM {table}")
        seq = 0
        put_task = f"INSERT INTO tasks VALUES ({', '.join('?' * len(task_cols))})"
        put_run = f"INSERT INTO runs VALUES ({', '.join('?' * len(run_cols))})"
        put_event = f"INSERT INTO events VALUES ({', '.join('?' * len(event_cols))})"
        for first in range(0, count, CHUNK):
            tasks, runs, rows = [], [], []
            for n in range(first, min(first + CHUNK, count)):
                task_id = new_id()
                task[t_id] = task_id
                task[t_created] = (start + timedelta(milliseconds=n)).isoformat()
                tasks.append(tuple(task))
                run[r_id], run[r_task] = new_id(), task_id
                runs.append(tuple(run))
                for event in events:
                    seq += 1
                    event[e_seq], event[e_task] = seq, task_id
                    rows.append(tuple(event))
            conn.executemany(put_task, tasks)
            conn.executemany(put_run, runs)
            conn.executemany(put_event, rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def cached(cache: Path, count: int) -> tuple[Path, float]:
    """The cached database of ``count`` tasks, built first if missing; build time."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"reads-v{SCHEMA_VERSION}-{count}.db"
    if path.exists():
        return path, 0.0
    # Each builder its own partial file (two runs may build at once, as the suite's
    # workers do); the rename is atomic, and the last one wins with the same content.
    partial = cache / f"{path.name}.building-{os.getpid()}"
    for leftover in cache.glob(f"{partial.name}*"):
        leftover.unlink()
    began = time.perf_counter()
    build(partial, count)
    partial.replace(path)
    for leftover in cache.glob(f"{partial.name}*"):  # its -wal, -shm and lock files
        leftover.unlink()
    return path, time.perf_counter() - began


# -- the measurements -----------------------------------------------------------------------


def _summary(latencies: list[float]) -> Writer:
    ordered = sorted(latencies)
    if not ordered:
        return Writer(0, 0.0, 0.0, 0.0)
    return Writer(
        calls=len(ordered),
        p50=statistics.median(ordered),
        p99=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        worst=ordered[-1],
    )


async def _write_until(rt: Runtime, stop: anyio.Event, latencies: list[float]) -> None:
    clock = time.perf_counter
    while not stop.is_set():
        began = clock()
        await rt.create_task("write", {"n": 1})
        after_create = clock()
        claim = await rt.claim_task("writer", "write")
        after_claim = clock()
        assert claim is not None
        await rt.complete_task(claim.lease, {"ok": True})
        done = clock()
        latencies += [after_create - began, after_claim - after_create, done - after_claim]


async def _largest_read(rt: Runtime, page_size: int | None) -> tuple[int, int]:
    """Every completed task: paged (at the largest limit unless ``page_size``) where the
    listing pages, else in one unbounded call."""
    parameters = inspect.signature(rt.get_tasks_by_status).parameters
    if "after" not in parameters:
        return len(await rt.get_tasks_by_status("completed")), 1
    from hive_orchestration.listing import MAX_LIMIT  # only where listings page

    limit = page_size or MAX_LIMIT
    rows = pages = 0
    after: str | None = None
    while True:
        page = await rt.get_tasks_by_status("completed", limit=limit, after=after)
        rows += len(page)
        pages += 1
        if len(page) < limit:
            return rows, pages
        after = page[-1].id


async def run(
    backend: str,
    count: int,
    seconds: float,
    repeat: int,
    source: Path,
    build_seconds: float,
    page_size: int | None,
) -> Result:
    with tempfile.TemporaryDirectory(prefix="hive-bench-reads-") as folder:
        path = Path(folder) / "reads.db"
        shutil.copyfile(source, path)
        # Generous deadlines: a stalled writer is measured, not cut short at 30 s.
        config = RuntimeConfig(
            lease_timeout=600.0, worker_timeout=600.0, ask_timeout=600.0, storage_driver=DRIVER
        )
        async with Runtime.open(path, config=config) as rt:
            await rt.register_worker("writer", "bench", ["write"])
            events = await rt.last_seq()
            # The writer alone.
            alone: list[float] = []
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_write_until, rt, stop, alone)
                await anyio.sleep(seconds)
                stop.set()
            # The writer while the largest read runs: only the calls made during the read.
            during: list[float] = []
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_write_until, rt, stop, during)
                await anyio.sleep(0.2)  # the writer is going before the read starts
                skip = len(during)
                began = time.perf_counter()
                rows, pages = await _largest_read(rt, page_size)
                read_seconds = time.perf_counter() - began
                stop.set()
            del during[:skip]
            empty: dict[str, float] = {}
            reads: dict[str, dict[str, str]] = {
                "pattern nothing.*": {"pattern": "nothing.*"},
                "exact nothing.here": {"pattern": "nothing.here"},
                "pattern *.nothing": {"pattern": "*.nothing"},
                "unknown task_id": {"task_id": new_id()},
            }
            for name, filters in reads.items():
                times = []
                for _ in range(repeat):
                    began = time.perf_counter()
                    found = await rt.read_events(0, limit=100, **filters)  # type: ignore[arg-type]
                    times.append(time.perf_counter() - began)
                    assert not found
                empty[name] = statistics.median(times)
    return Result(
        backend=backend,
        tasks=count,
        events=events,
        build_seconds=build_seconds,
        alone=_summary(alone),
        during=_summary(during),
        read_seconds=read_seconds,
        read_rows=rows,
        read_pages=pages,
        empty_reads=empty,
        load=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )


def render(r: Result) -> str:
    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms"

    lines = [
        f"backend {r.backend}: {r.tasks:,} finished tasks, {r.events:,} events"
        + (f" (built in {r.build_seconds:.0f} s)" if r.build_seconds else " (cached)")
        + f"; load average {r.load}"
    ]
    for name, writer in (("alone", r.alone), ("during the read", r.during)):
        lines.append(
            f"writer {name:>15}: {writer.calls:>6,} calls  p50 {ms(writer.p50)}"
            f"  p99 {ms(writer.p99)}  worst {ms(writer.worst)}"
        )
    lines.append(
        f"largest read: {r.read_rows:,} completed tasks in {r.read_pages:,} page(s),"
        f" {r.read_seconds:.2f} s"
    )
    lines.append(
        f"goal: writer p99 during the read < {ms(P99_GOAL)} {verdict(r.during.p99 < P99_GOAL)}"
    )
    for name, seconds in r.empty_reads.items():
        lines.append(f"read_events matching nothing, {name:<20}: {ms(seconds)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="the writer alone")
    parser.add_argument("--repeat", type=int, default=5, help="each empty event read")
    parser.add_argument("--page", type=int, help="the largest read's limit (default: the most)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the database is kept")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    source, build_seconds = cached(args.cache, args.tasks)  # before the loop: it runs one
    result: Result = anyio.run(
        run,
        args.backend,
        args.tasks,
        args.seconds,
        args.repeat,
        source,
        build_seconds,
        args.page,
        backend=args.backend,
    )
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
