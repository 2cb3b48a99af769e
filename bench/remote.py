"""Benchmark of the message API served over the owner's Unix socket, each figure against
a ceiling measured in the same run.

This process owns the databases (``Runtime.open``, which serves the socket); the clients
are other processes (this script run again in a client role) connecting with
``OrchestrationClient(db_path=...)``, as an app's other processes do.

1. End to end: ``--tasks`` tasks (4 000) go through create, claim, start and complete,
   from ``--clients`` client processes (8) over the socket, each one connection with
   creators (creating their share one at a time) and worker slots (each claiming with a
   wait, starting and completing one task at a time). The shapes of ``bench/tasks.py``'s
   first two: one creator and one slot per process (8 and 8: every task costs a worker three durable
   round trips in a row, so this is bound by commit latency), and 16 of each (128 and
   128, as an agent runner with concurrency 16: bound by the owner's CPU). Ceiling: the
   same creators and slots as tasks of the owner's process, on in-process clients of an
   identical database. Both clocks run from the first create to the owner's subscriber
   seeing the last ``task.completed``. Ratio: remote rate / in-process rate, best of
   ``--repeat`` each, interleaved; with the commits per task of each (fewer is fuller
   group commits), and the CPU a task cost this process (in-process: all of it; remote:
   the owner's, the clients being other processes), least of the runs.
2. Latency of one call: ``get_task`` (a read) and ``create_task`` (a durable write),
   ``--calls`` of each one after another, from one client process over the socket, and
   the same calls on an in-process client in the owner. The added latency is the
   difference of the two (p50, p99). Floor, in the same run: a bare anyio Unix-socket
   echo of a call-sized message between the same two processes (the owner's event loop
   answering), which is what any round trip between two Python processes costs here.
3. Idle connections: ``--connections`` clients (1 000) connect (``RemoteRuntime``, the
   client's own connection, pinging as it does when idle) from one other process; the
   figure is the owner's resident memory after they are all welcomed, less before.

Goals: end to end >= 0.7x in-process; added p50 latency < 100 us; 1 000 idle connections
< 50 MB.

Run from the repository root::

    python bench/remote.py                  # asyncio
    python bench/remote.py --backend trio
    python bench/remote.py --json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import OrchestrationClient, Runtime, RuntimeConfig
from hive_orchestration.remote.client import RemoteRuntime

RATIO_GOAL = 0.7  # remote tasks/s over in-process tasks/s
ADDED_GOAL = 100e-6  # seconds, p50 added by the socket
MEMORY_GOAL = 50 * 1024 * 1024  # bytes, for 1 000 idle connections
#: Client processes (or clients of the in-process lane) of the end-to-end runs (--clients).
CLIENTS = 8
#: Creators and worker slots in each client process (or lane of the ceiling).
SLOTS = (1, 16)
#: What the echo floor sends: about the size of a get_task call's frame.
ECHO_MESSAGE = b"\x00\x00\x00\x3c" + b"x" * 60
SCRIPT = str(Path(__file__).resolve())


@dataclass
class Latency:
    op: str
    local_p50: float  # seconds
    local_p99: float
    remote_p50: float
    remote_p99: float

    @property
    def added_p50(self) -> float:
        return self.remote_p50 - self.local_p50

    @property
    def added_p99(self) -> float:
        return self.remote_p99 - self.local_p99


@dataclass
class Shape:
    slots: int  # creators and worker slots per client process
    local_rate: float  # tasks/s
    remote_rate: float
    ratio: float
    local_commits: float  # storage transactions per task
    remote_commits: float
    #: CPU per task of this process (seconds), best run's: in-process, everything; remote,
    #: the owner's only (the clients are other processes).
    local_cpu: float
    remote_owner_cpu: float


@dataclass
class Result:
    backend: str
    tasks: int
    clients: int
    shapes: list[Shape]
    calls: int
    latencies: list[Latency]
    echo_p50: float  # seconds
    echo_p99: float
    connections: int
    memory: int  # bytes: the owner's RSS with the idle connections, less before
    per_connection: float  # bytes


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the client processes -------------------------------------------------------------------


@asynccontextmanager
async def _clients(
    count: int, role: str, backend: str, *args: str
) -> AsyncIterator[list[tuple[Process, BufferedByteReceiveStream]]]:
    """``count`` processes of this script in ``role``, each started and ready (it printed
    its first line); their stdin closes at the end of the block, which stops them."""
    processes: list[tuple[Process, BufferedByteReceiveStream]] = []
    try:
        for n in range(count):
            process = await anyio.open_process(
                [sys.executable, SCRIPT, "--role", role, "--backend", backend, str(n), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
            assert process.stdout is not None
            processes.append((process, BufferedByteReceiveStream(process.stdout)))
        with anyio.fail_after(120):
            for _, lines in processes:
                await _line(lines)  # ready
        yield processes
    finally:
        with anyio.CancelScope(shield=True):
            for process, _ in processes:
                if process.stdin is not None:
                    await process.stdin.aclose()
            with anyio.move_on_after(30):
                for process, _ in processes:
                    await process.wait()
            for process, _ in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()


async def _line(lines: BufferedByteReceiveStream) -> Any:
    return json.loads(await lines.receive_until(b"\n", 1 << 24))


async def _stdin_closed() -> None:
    await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)


def _say(value: object) -> None:
    print(json.dumps(value), flush=True)


async def load_client(number: int, db_path: str, count: int, slots: int, lanes: int) -> None:
    """One of the ``lanes`` client processes: ready, then on ``go`` its creators and
    worker slots run until stdin closes."""
    async with OrchestrationClient(db_path=db_path) as client:
        assert client.remote
        _say("ready")
        await anyio.to_thread.run_sync(sys.stdin.buffer.readline)
        async with anyio.create_task_group() as group:
            group.start_soon(_lane, client, number, count, slots, lanes)

            async def stop() -> None:
                await _stdin_closed()
                group.cancel_scope.cancel()

            group.start_soon(stop)


async def _lane(
    client: OrchestrationClient, number: int, count: int, slots: int, lanes: int
) -> None:
    async def creator(first: int) -> None:
        for n in range(first, count, lanes * slots):
            await client.create_task("bench", {"n": n})

    async def worker() -> None:
        while True:
            claim = await client.claim_task(f"worker-{number}", "bench", wait=1.0)
            if claim is not None:
                await client.start_task(claim.lease)
                await client.complete_task(claim.lease, {"ok": True})

    async with anyio.create_task_group() as group:
        for slot in range(slots):
            group.start_soon(creator, number * slots + slot)
            group.start_soon(worker)


async def latency_client(_: int, db_path: str, echo: str, calls: int) -> None:
    """The latency client: the echo floor, then each call ``calls`` times."""
    _say("ready")
    found: dict[str, list[float]] = {}
    async with await anyio.connect_unix(echo) as stream:
        found["echo"] = await _timed(lambda: _echo(stream), calls)
    async with OrchestrationClient(db_path=db_path) as client:
        assert client.remote
        task_id = await client.create_task("bench", {"n": 0})
        found["get_task"] = await _timed(lambda: client.get_task(task_id), calls)
        found["create_task"] = await _timed(lambda: client.create_task("bench", {"n": 1}), calls)
    _say({name: _quantiles(samples) for name, samples in found.items()})
    await _stdin_closed()


async def _echo(stream: ByteStream) -> None:
    await stream.send(ECHO_MESSAGE)
    got = 0
    while got < len(ECHO_MESSAGE):
        got += len(await stream.receive())


async def _timed(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    for _ in range(min(count, 100)):  # warm up: first calls import and cache
        await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def idle_client(_: int, address: str, connections: int) -> None:
    """Holds ``connections`` open (each the client's own connection, pinging while idle)
    until stdin closes."""
    ready = 0
    all_ready = anyio.Event()

    async def hold() -> None:
        nonlocal ready
        async with RemoteRuntime.connect(address, silence=60.0):
            ready += 1
            if ready == connections:
                all_ready.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as group:
        for _ in range(connections):
            group.start_soon(hold)
        await all_ready.wait()
        _say("ready")
        await _stdin_closed()
        group.cancel_scope.cancel()


# -- the owner --------------------------------------------------------------------------------


def _config() -> RuntimeConfig:
    return RuntimeConfig(lease_timeout=60.0)


async def _until_completed(
    runtime: Runtime, count: int, go: Callable[[], Awaitable[None]]
) -> tuple[float, float, float]:
    """Tasks per second from ``go()`` to the runtime's subscriber seeing the
    ``count``-th ``task.completed``, the commits per task meanwhile, and what a task
    cost this process in CPU (seconds: load delays it, but does not add to it)."""
    before = (await runtime.statistics()).storage.transactions
    async with runtime.subscribe("task.completed", buffer=count + 10) as completed:
        started = time.perf_counter()
        cpu = time.process_time()
        await go()
        for _ in range(count):
            await completed.receive()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    after = (await runtime.statistics()).storage.transactions
    return count / elapsed, (after - before) / count, cpu / count


async def local_rate(
    folder: Path, run: str, count: int, slots: int, lanes: int
) -> tuple[float, float, float]:
    async with Runtime.open(folder / f"local-{run}.db", config=_config()) as runtime:
        clients = [runtime.client() for _ in range(lanes)]
        async with anyio.create_task_group() as group:

            async def go() -> None:
                for number, client in enumerate(clients):
                    group.start_soon(_lane, client, number, count, slots, lanes)

            found = await _until_completed(runtime, count, go)
            group.cancel_scope.cancel()
    return found


async def remote_rate(
    folder: Path, run: str, count: int, slots: int, backend: str, lanes: int
) -> tuple[float, float, float]:
    path = folder / f"remote-{run}.db"
    load = (str(path), str(count), str(slots), str(lanes))
    async with (
        Runtime.open(path, config=_config()) as runtime,
        _clients(lanes, "load", backend, *load) as processes,
    ):

        async def go() -> None:
            for process, _ in processes:
                assert process.stdin is not None
                await process.stdin.send(b"go\n")

        return await _until_completed(runtime, count, go)


async def latencies(folder: Path, calls: int, backend: str) -> tuple[list[Latency], float, float]:
    path = folder / "latency.db"
    echo_path = str(folder / "echo.socket")

    async def answer(stream: ByteStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    async with (
        Runtime.open(path, config=_config()) as runtime,
        await anyio.create_unix_listener(echo_path) as listener,
        anyio.create_task_group() as group,
    ):
        group.start_soon(listener.serve, answer)
        client = runtime.client()
        task_id = await client.create_task("bench", {"n": 0})
        local = {
            "get_task": await _timed(lambda: client.get_task(task_id), calls),
            "create_task": await _timed(lambda: client.create_task("bench", {"n": 1}), calls),
        }
        async with _clients(1, "latency", backend, str(path), echo_path, str(calls)) as processes:
            remote = await _line(processes[0][1])
        group.cancel_scope.cancel()
    found = []
    for op, samples in local.items():
        local_p50, local_p99 = _quantiles(samples)
        remote_p50, remote_p99 = remote[op]
        found.append(Latency(op, local_p50, local_p99, remote_p50, remote_p99))
    echo_p50, echo_p99 = remote["echo"]
    return found, echo_p50, echo_p99


async def idle_memory(folder: Path, connections: int, backend: str) -> int:
    async with Runtime.open(folder / "idle.db", config=_config()) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        # A few connections first, so that what any first connection loads is not counted.
        async with _clients(1, "idle", backend, server.address, "10"):
            pass
        with anyio.fail_after(30):
            while server.connections:  # noqa: ASYNC110 - the server has no event for it
                await anyio.sleep(0.01)
        gc.collect()
        before = _rss()
        async with _clients(1, "idle", backend, server.address, str(connections)):
            # Ready once every connection was welcomed, so the server holds them all.
            assert server.connections == connections
            await anyio.sleep(0.5)  # settled
            gc.collect()
            after = _rss()
    return after - before


async def run(
    backend: str, count: int, calls: int, connections: int, repeat: int, clients: int
) -> Result:
    with tempfile.TemporaryDirectory(prefix="hive-bench-") as name:
        folder = Path(name)
        # First, while the heap has no free memory left by the other parts to reuse.
        memory = await idle_memory(folder, connections, backend)
        shapes = []
        for slots in SLOTS:
            local: list[tuple[float, float, float]] = []
            remote: list[tuple[float, float, float]] = []
            for n in range(repeat):
                # Interleaved: on a shared machine the drift between runs is larger than
                # many of the differences measured.
                name = f"{slots}-{n}"
                local.append(await local_rate(folder, name, count, slots, clients))
                remote.append(await remote_rate(folder, name, count, slots, backend, clients))
            best_local, best_remote = max(local), max(remote)
            shapes.append(
                Shape(
                    slots=slots,
                    local_rate=best_local[0],
                    remote_rate=best_remote[0],
                    ratio=best_remote[0] / best_local[0],
                    local_commits=best_local[1],
                    remote_commits=best_remote[1],
                    local_cpu=min(found[2] for found in local),
                    remote_owner_cpu=min(found[2] for found in remote),
                )
            )
        found, echo_p50, echo_p99 = await latencies(folder, calls, backend)
    return Result(
        backend=backend,
        tasks=count,
        clients=clients,
        shapes=shapes,
        calls=calls,
        latencies=found,
        echo_p50=echo_p50,
        echo_p99=echo_p99,
        connections=connections,
        memory=memory,
        per_connection=memory / connections,
    )


def render(r: Result) -> str:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    us = 1e6
    lines = [
        f"backend: {r.backend}  (synchronous=FULL, file database, WAL; owner in this process,"
        f" clients in others over its Unix socket)",
        f"end to end, {r.tasks:,} tasks (create, claim, start, complete), {r.clients} client"
        " processes against the same in-process:",
    ]
    for shape in r.shapes:
        lanes = r.clients * shape.slots
        lines.append(
            f"  {lanes:>3} creators + {lanes:>3} worker slots:"
            f" in-process {shape.local_rate:>6,.0f} tasks/s"
            f" ({shape.local_commits:.2f} commits/task)"
            f"   remote {shape.remote_rate:>6,.0f} tasks/s"
            f" ({shape.remote_commits:.2f} commits/task)"
            f" = {shape.ratio:.2f}x  goal >= {RATIO_GOAL}x {verdict(shape.ratio >= RATIO_GOAL)}"
        )
        lines.append(
            f"      CPU per task: in-process {shape.local_cpu * us:6.0f} us (all of it),"
            f" remote {shape.remote_owner_cpu * us:6.0f} us (the owner's)"
        )
    lines += [
        f"latency of one call ({r.calls:,} in a row), p50 / p99 in us:",
        f"  bare anyio Unix-socket echo between the two processes: {r.echo_p50 * us:7.1f} /"
        f" {r.echo_p99 * us:7.1f}  (the floor)",
    ]
    for found in r.latencies:
        lines.append(
            f"  {found.op:<12} in-process {found.local_p50 * us:7.1f} / {found.local_p99 * us:7.1f}"
            f"   remote {found.remote_p50 * us:7.1f} / {found.remote_p99 * us:7.1f}"
            f"   added {found.added_p50 * us:6.1f} / {found.added_p99 * us:7.1f}"
            f" ({found.added_p50 / r.echo_p50:.1f}x the echo)"
            f"  goal p50 < {ADDED_GOAL * us:g} {verdict(found.added_p50 < ADDED_GOAL)}"
        )
    lines.append(
        f"{r.connections:,} idle connections: owner RSS +{r.memory / 2**20:.1f} MiB"
        f" ({r.per_connection / 1024:.1f} KiB each)"
        f"  goal < {MEMORY_GOAL * r.connections / 1000 / 2**20:g} MiB"
        f" {verdict(r.memory < MEMORY_GOAL * r.connections / 1000)}"
    )
    return "\n".join(lines)


ROLES: dict[str, Callable[..., Awaitable[None]]] = {
    "load": lambda n, db, count, slots, lanes: load_client(
        n, db, int(count), int(slots), int(lanes)
    ),
    "latency": lambda n, db, echo, calls: latency_client(n, db, echo, int(calls)),
    "idle": lambda n, address, connections: idle_client(n, address, int(connections)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=4_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--connections", type=int, default=1_000)
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help="client processes of the end-to-end runs"
    )
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end runs of each")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        number, *rest = args.role_args
        anyio.run(ROLES[args.role], int(number), *rest, backend=args.backend)
        return
    result: Result = anyio.run(
        run,
        args.backend,
        args.tasks,
        args.calls,
        args.connections,
        args.repeat,
        args.clients,
        backend=args.backend,
    )
    print(render(result))
    if args.json:
        figures = asdict(result)
        for found, latency in zip(figures["latencies"], result.latencies, strict=True):
            found["added_p50"] = latency.added_p50
            found["added_p99"] = latency.added_p99
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
