"""hive on PostgreSQL with 1, 2 and 3 nodes, against pgqueuer and procrastinate on the same
server in the same run.

Every figure is tasks per second from the moment the producers and the consumers are told
to go (both started and connected before) to the moment the database holds ``--tasks``
(10 000) no-op tasks done; the clock reads the database every 50 ms, the same query
shape for all three systems, so each is timed to its last *durable* completion.

1. hive, for each node count of ``--nodes`` (1, 2, 3), on a fresh database: that many
   ``hive-orchestration serve --db URL`` processes (each its own URL, ``application_name``
   differing, so each gets its own socket); ``--workers`` (6) worker processes in all,
   spread over the nodes, each connected to its node's Unix socket, each taking up to
   ``--slots`` (16) tasks per ``claim_tasks(start=True)`` and completing them
   concurrently; one producer process with ``--lanes`` (2) lanes per node, each sending
   ``create_tasks`` of 100 to its node. Afterwards the runs table is checked: one run per
   task (none handed out twice, none lost), and how the runs spread over the nodes. A
   node refused at start (today a database admits one runtime: fault ``in_use``) makes
   that shape "not available", with the node's error, and the run goes on.
2. pgqueuer (``QueueManager.run``, continuous, ``batch_size``) with C consumer processes
   of one connection each, and one producer sending ``enqueue`` of 100; shapes
   ``--pgqueuer`` (consumers x batch size: 1x10 (its default), 3x10, 1x100, 3x100).
3. procrastinate (``run_worker_async``, listening, ``concurrency`` K) with C worker
   processes, one producer sending ``batch_defer_async`` of 100; shapes
   ``--procrastinate`` (workers x concurrency: 1x10, 3x10).

The ratios printed are 3 nodes / 1 node (goal >= 2x), hive's best / pgqueuer's best shape
(goal >= 3x) and hive's best / procrastinate's best shape, each peer's best shape named.
What bounds each figure is printed beside it from the run itself: the CPU seconds of the
nodes, the workers, the producer, the peer's processes and PostgreSQL's processes (every
child of this server's postmaster, when it runs on this machine), read from
``/proc/<pid>/stat`` before and after, as seconds, as cores used over the wall time and as
milliseconds per task; PostgreSQL's share per kind of process (each connection's
``application_name``, so a hive node's writer, readers, log tailer and listener apart,
else the server process's ``backend_type``); for hive, the nodes' commits and the share
of the time their writers spent committing; and the load average before and after each
shape (the machine may be shared). With ``--waits``, what the shape's PostgreSQL sessions
were waiting for while it ran (``pg_stat_activity`` sampled every 10 ms: a writer in
``Lock:transactionid`` waits for a row lock, such as hive's event counter; in
``Lock:object`` for the lock NOTIFY holds over a COMMIT; in ``LWLock:WALWrite`` or
``IO:WALSync`` for a WAL flush), as the mean number of sessions in each state.

The server: ``HIVE_BENCH_PG`` (or ``HIVE_TEST_PG``) names one to use (a database is
created per shape, and dropped at the end unless ``--keep-databases``); otherwise a
throwaway cluster is made and removed, as ``.ci/run`` makes one (``initdb`` in a temporary
folder, as ``postgres`` through ``runuser`` when root; ``fsync`` and ``synchronous_commit``
on).

Needs the ``postgres`` extra; the peers need the ``bench`` extra (``pip install -e
'.[bench,postgres]'``): a peer that is not installed is skipped, and the reason printed.
Run from the repository root::

    python bench/nodes.py                                   # asyncio, everything
    python bench/nodes.py --backend trio --pgqueuer '' --procrastinate ''
    python bench/nodes.py --nodes 1 --tasks 2000 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio

SCRIPT = str(Path(__file__).resolve())
SCALE_GOAL = 2.0  # 3 nodes over 1 node
PGQUEUER_GOAL = 3.0  # hive over pgqueuer's best shape
CHUNK = 100  # tasks per create_tasks / enqueue / batch_defer call
POLL = 0.05  # seconds between the clock's reads of the database
TIMEOUT = 600.0  # seconds for one shape's tasks; a shape slower than that fails
TASK_TYPE = "bench"
TICKS = os.sysconf("SC_CLK_TCK")


# -- the server ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server() -> Iterator[tuple[str, bool]]:
    """The server's URL, and whether it is this run's own (its databases need no drop)."""
    given = os.environ.get("HIVE_BENCH_PG") or os.environ.get("HIVE_TEST_PG")
    if given:
        yield given, False
        return
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_pg_version)
    if not found:
        raise SystemExit("no PostgreSQL under /usr/lib/postgresql and HIVE_BENCH_PG is unset")
    pg_bin = found[-1].parent
    root = os.geteuid() == 0
    as_pg = ["runuser", "-u", "postgres", "--"] if root else []
    user = "postgres" if root else pwd.getpwuid(os.geteuid()).pw_name
    folder = Path(tempfile.mkdtemp(prefix="hive-bench-pg-"))
    if root:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    try:
        subprocess.run(
            [
                *as_pg,
                str(pg_bin / "initdb"),
                "-D",
                str(data),
                "-U",
                user,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c max_connections=200"
        subprocess.run(
            [
                *as_pg,
                str(pg_bin / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "log"),
                "-w",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
        )
        try:
            yield f"postgresql://{user}@127.0.0.1:{port}/postgres", True
        finally:
            subprocess.run(
                [*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pg_version(initdb: Path) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in initdb.parent.parent.name.split("."))
    except ValueError:
        return (0,)


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[tuple[Any, str]]:
    """An admin connection to the bench's server (:func:`server`) and the URL of a
    database of its own there, dropped at the end (pg_writes.py, pg_sweep.py)."""
    import psycopg

    with server() as (url, _own):
        admin = psycopg.connect(url, autocommit=True)
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin, with_database(url, name)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            admin.close()


def with_database(url: str, name: str, **query: str) -> str:
    parts = urlsplit(url)
    extra = "&".join(f"{key}={value}" for key, value in query.items())
    joined = "&".join(q for q in (parts.query, extra) if q)
    return urlunsplit(parts._replace(path="/" + name, query=joined))


class Server:
    """The admin connection: fresh databases, the clock's reads, the postmaster's pid."""

    def __init__(self, url: str, keep: bool) -> None:
        import psycopg

        self.url = url
        self.keep = keep
        self.conn = psycopg.connect(url, autocommit=True)
        self.made: list[str] = []
        backend = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        # The postmaster is the parent of every backend: its children are the server's
        # CPU. None when the server is not on this machine (the pid is another host's).
        parent = _parent(int(backend[0]))
        self.postmaster = parent if parent is not None and _is_postgres(parent) else None

    def database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.conn.execute(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return with_database(self.url, name)

    def close(self) -> None:
        if not self.keep:
            for name in self.made:
                with contextlib.suppress(Exception):
                    self.conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.conn.close()


# -- CPU, from /proc ----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # not exited, reaped or not


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads), 0 once it is gone."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / TICKS


def children(parent: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _parent(int(entry.name)) == parent:
            found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU seconds per role between :meth:`start` and :meth:`stop`; ``postgres`` is the
    postmaster and all its children (backends, WAL writer, checkpointer...)."""

    def __init__(self, roles: dict[str, list[int]], postmaster: int | None) -> None:
        self.roles = roles
        self.postmaster = postmaster
        self.before: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        roles = dict(self.roles)
        if self.postmaster is not None:
            roles["postgres"] = [self.postmaster, *children(self.postmaster)]
        roles["bench"] = [os.getpid()]
        return {role: {pid: cpu_seconds(pid) for pid in pids} for role, pids in roles.items()}

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> dict[str, dict[int, float]]:
        """CPU seconds since :meth:`start`, per role and pid."""
        after = self._sample()
        return {
            role: {
                pid: seconds - self.before.get(role, {}).get(pid, 0.0)
                for pid, seconds in at.items()
            }
            for role, at in after.items()
        }


# -- what the server's sessions wait for ---------------------------------------------------

#: Seconds between two looks at pg_stat_activity while a shape runs.
WAIT_SAMPLE = 0.01


class WaitSampler:
    """What the shape's own PostgreSQL sessions are doing, sampled every
    :data:`WAIT_SAMPLE` seconds from ``pg_stat_activity`` on a connection of its own (a
    thread): per kind of session (its ``application_name``: a hive node's writer, a
    peer's client...) and state (``wait_event_type:wait_event``, or ``CPU`` for an active
    session waiting for nothing), the mean number of sessions in it over the shape's
    time. A writer in ``Lock:transactionid`` waits for a row lock (hive's event counter),
    in ``Lock:object`` for the lock PostgreSQL's NOTIFY takes over each COMMIT, in
    ``LWLock:WALWrite`` or ``IO:WALSync`` for a WAL flush (its own, or one it joins)."""

    NAME = "bench-waits"

    def __init__(self, url: str) -> None:
        import threading

        self._url = url
        self._stop = threading.Event()
        self._counts: dict[str, int] = {}
        self.ticks = 0
        self.backend = 0  # the sampler's own server process
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Mean sessions per "kind state", the most first."""
        self._stop.set()
        self._thread.join()
        ticks = max(self.ticks, 1)
        found = sorted(self._counts.items(), key=lambda item: -item[1])
        return {key: round(n / ticks, 3) for key, n in found}

    def _run(self) -> None:
        import psycopg

        sql = (
            "SELECT coalesce(application_name, ''), coalesce(wait_event_type || ':'"
            " || wait_event, 'CPU') FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        )
        with psycopg.connect(self._url, autocommit=True) as conn:
            conn.execute(f"SET application_name = '{self.NAME}'")
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            self.backend = 0 if row is None else int(row[0])
            while not self._stop.wait(WAIT_SAMPLE):
                for name, state in conn.execute(sql).fetchall():
                    # "hive-orchestration:writer" -> "writer"; a peer's own names whole.
                    kind = (name.rpartition(":")[2].split() or ["?"])[0]
                    key = f"{kind} {state}"
                    self._counts[key] = self._counts.get(key, 0) + 1
                self.ticks += 1


# -- the processes ------------------------------------------------------------------------


class Child:
    """This script run again in a role: says one JSON line when ready, starts on ``go``,
    stops when its stdin closes."""

    def __init__(self, role: str, backend: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT, "--role", role, "--backend", backend, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.role = role

    @property
    def pid(self) -> int:
        return self.process.pid

    def line(self) -> Any:
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        if not text:
            code = self.process.wait()
            raise RuntimeError(f"the {self.role} process (pid {self.pid}) exited {code}")
        return json.loads(text)

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()


def _end(process: subprocess.Popen[bytes], wait: float) -> None:
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Node:
    """One ``hive-orchestration serve --db URL`` process."""

    def __init__(self, url: str, backend: str, log: Path) -> None:
        self.log = log
        with log.open("wb") as err:  # a file, not a pipe: the server logs as it serves
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hive_orchestration",
                    "serve",
                    "--db",
                    url,
                    "--backend",
                    backend,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.address = ""

    def serving(self) -> str | None:
        """Waits for the node's "serving" line: None once it serves, else its error."""
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        if text:
            shown = json.loads(text)
            self.address = shown["addresses"][0]
            return None
        self.process.wait()
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1] if lines else f"exited {self.process.returncode}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _end(self.process, 30.0)


# -- the roles: hive ----------------------------------------------------------------------


def _say(value: object) -> None:
    print(json.dumps(value), flush=True)


async def _wait_go() -> bool:
    return bool(await anyio.to_thread.run_sync(sys.stdin.buffer.readline))


async def _until_stdin_closes(scope: anyio.CancelScope) -> None:
    await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
    scope.cancel()


@contextlib.asynccontextmanager
async def _client(address: str, name: str) -> Any:
    from hive_orchestration import OrchestrationClient
    from hive_orchestration.remote.client import RemoteRuntime

    async with RemoteRuntime.connect(address, name=name, silence=60.0) as remote:
        # The client a process gets from OrchestrationClient(db_path=...) when the database
        # is another's: here bound to one node's socket by name, since several serve it.
        yield OrchestrationClient._bound(remote, source_agent=None, correlation_id=None)


async def hive_worker(address: str, worker_id: str, slots: str) -> None:
    limit = int(slots)
    async with _client(address, worker_id) as client:
        _say("ready")
        if not await _wait_go():
            return

        async def work() -> None:
            while True:
                claims = await client.claim_tasks(
                    worker_id, TASK_TYPE, limit=limit, start=True, wait=1.0
                )
                async with anyio.create_task_group() as running:
                    for claim in claims:
                        running.start_soon(client.complete_task, claim.lease)

        async with anyio.create_task_group() as group:
            group.start_soon(_until_stdin_closes, group.cancel_scope)
            group.start_soon(work)


async def hive_producer(count: str, lanes: str, *addresses: str) -> None:
    total, per_node = int(count), int(lanes)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(_client(address, f"producer-{n}"))
            for n, address in enumerate(addresses)
        ]
        _say("ready")
        if not await _wait_go():
            return
        every = [clients[n % len(clients)] for n in range(per_node * len(clients))]

        async def lane(number: int) -> None:
            client = every[number]
            for first in range(number * CHUNK, total, len(every) * CHUNK):
                end = min(first + CHUNK, total)
                await client.create_tasks(
                    [{"task_type": TASK_TYPE, "payload": {"n": n}} for n in range(first, end)]
                )

        async with anyio.create_task_group() as group:
            for number in range(len(every)):
                group.start_soon(lane, number)
        _say("done")
        await anyio.to_thread.run_sync(sys.stdin.buffer.read)


# -- the roles: the peers (asyncio only: both are asyncio libraries) -----------------------


async def pgqueuer_consumer(url: str, batch: str) -> None:
    from datetime import timedelta

    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    manager = QueueManager(Queries(PsycopgDriver(conn)))

    @manager.entrypoint(TASK_TYPE)
    async def noop(job: object) -> None:
        return None

    _say("ready")
    if not await _wait_go():
        return

    async def stop() -> None:
        await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
        manager.shutdown.set()  # its buffers flush, then run returns

    async with anyio.create_task_group() as group:
        group.start_soon(stop)
        await manager.run(
            batch_size=int(batch),
            mode=QueueExecutionMode.continuous,
            dequeue_timeout=timedelta(seconds=1),
        )
        group.cancel_scope.cancel()


async def pgqueuer_producer(url: str, count: str) -> None:
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    total = int(count)
    queries = Queries(PsycopgDriver(await psycopg.AsyncConnection.connect(url, autocommit=True)))
    _say("ready")
    if not await _wait_go():
        return
    for first in range(0, total, CHUNK):
        n = min(CHUNK, total - first)
        await queries.enqueue([TASK_TYPE] * n, [None] * n, [0] * n)
    _say("done")
    await anyio.to_thread.run_sync(sys.stdin.buffer.read)


def _procrastinate_app(url: str) -> Any:
    import logging

    import procrastinate

    # Its warning that the app is defined in __main__ is about finding tasks by import
    # path; each process here defines the one task it runs, by name.
    logging.getLogger("procrastinate").setLevel(logging.ERROR)

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name=TASK_TYPE)  # type: ignore[misc]
    async def noop() -> None:
        return None

    return app, noop


async def procrastinate_worker(url: str, concurrency: str) -> None:
    app, _ = _procrastinate_app(url)
    async with app.open_async():
        _say("ready")
        if not await _wait_go():
            return
        async with anyio.create_task_group() as group:
            group.start_soon(_until_stdin_closes, group.cancel_scope)
            await app.run_worker_async(
                wait=True, concurrency=int(concurrency), install_signal_handlers=False
            )


async def procrastinate_producer(url: str, count: str) -> None:
    total = int(count)
    app, noop = _procrastinate_app(url)
    async with app.open_async():
        _say("ready")
        if not await _wait_go():
            return
        for first in range(0, total, CHUNK):
            await noop.batch_defer_async(*([{}] * min(CHUNK, total - first)))
        _say("done")
        await anyio.to_thread.run_sync(sys.stdin.buffer.read)


ROLES: dict[str, Any] = {
    "hive-worker": hive_worker,
    "hive-producer": hive_producer,
    "pgqueuer-consumer": pgqueuer_consumer,
    "pgqueuer-producer": pgqueuer_producer,
    "procrastinate-worker": procrastinate_worker,
    "procrastinate-producer": procrastinate_producer,
}


# -- the measurement ----------------------------------------------------------------------


@dataclass
class Shape:
    system: str  # hive, pgqueuer, procrastinate
    name: str  # "2 nodes", "3 consumers x batch 10", ...
    rate: float | None = None  # tasks/s; None: not available (see error)
    error: str | None = None
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per role
    busiest: str = ""  # the process that used the most CPU, and how many cores
    runs_per_node: dict[str, int] = field(default_factory=dict)  # hive: the work's spread
    commits: int = 0  # hive: storage transactions of all its nodes
    writes: int = 0  # hive: the writes they grouped
    commit_seconds: float = 0.0  # hive: summed time of those commits (statements + COMMIT)
    #: PostgreSQL's CPU seconds by what each process is: a client connection's
    #: application_name (a hive node's writer, reader, tailer...), else its backend_type
    #: (walwriter, checkpointer...); "postmaster" the server's parent process.
    pg_cpu: dict[str, float] = field(default_factory=dict)
    #: The shape's PostgreSQL sessions, sampled while it ran (:class:`WaitSampler`): mean
    #: sessions per "kind state", such as "writer Lock:transactionid".
    waits: dict[str, float] = field(default_factory=dict)
    wait_samples: int = 0  # how many looks at pg_stat_activity those means are over


def _measure(
    server: Server,
    shape: Shape,
    url: str,
    done_sql: str,
    count: int,
    go: Sequence[Child],
    pids: dict[str, list[int]],
    waits: bool = False,
) -> None:
    """Tells each of ``go`` to go, then reads ``done_sql`` on ``url`` every ``POLL``
    seconds until it counts ``count``; ``waits``: sample what the shape's sessions wait
    for meanwhile (:class:`WaitSampler`)."""
    import psycopg

    meter = CpuMeter(pids, server.postmaster)
    watched = {pid: role for role, each in pids.items() for pid in each}
    sampler = WaitSampler(url) if waits else None
    with psycopg.connect(url, autocommit=True) as clock:
        shape.load_before = os.getloadavg()
        meter.start()
        if sampler is not None:
            sampler.start()
        try:
            started = time.perf_counter()
            for child in go:
                child.go()
            deadline = started + TIMEOUT
            while True:
                row = clock.execute(done_sql).fetchone()
                done = 0 if row is None else int(row[0])
                if done >= count:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{done} of {count} tasks done in {TIMEOUT:g} s")
                gone = [f"{role} (pid {pid})" for pid, role in watched.items() if not _alive(pid)]
                if gone:
                    raise RuntimeError(f"{', '.join(gone)} exited, {done} of {count} tasks done")
                time.sleep(POLL)
            shape.seconds = time.perf_counter() - started
            per_pid = meter.stop()
        finally:
            if sampler is not None:
                shape.waits = sampler.stop()
                shape.wait_samples = sampler.ticks
        shape.load_after = os.getloadavg()
        # Read while the backends still live (a backend that ended is "gone").
        kinds = {
            int(pid): (name or kind or "?")
            for pid, name, kind in clock.execute(
                "SELECT pid, application_name, backend_type FROM pg_stat_activity"
            ).fetchall()
        }
    kinds[server.postmaster or 0] = "postmaster"
    if sampler is not None and sampler.backend in per_pid.get("postgres", {}):
        # The sampler's own session is the bench's cost, not the shape's.
        per_pid["bench"][sampler.backend] = per_pid["postgres"].pop(sampler.backend)
    for pid, seconds in per_pid.get("postgres", {}).items():
        kind = kinds.get(pid, "gone")
        shape.pg_cpu[kind] = shape.pg_cpu.get(kind, 0.0) + seconds
    shape.rate = count / shape.seconds
    shape.cpu = {role: sum(each.values()) for role, each in per_pid.items()}
    role, pid, seconds = max(
        ((role, pid, s) for role, each in per_pid.items() for pid, s in each.items()),
        key=lambda found: found[2],
    )
    shape.busiest = f"{role} pid {pid}: {seconds / shape.seconds:.2f} core"


def _measured(
    server: Server,
    shape: Shape,
    url: str,
    done_sql: str,
    count: int,
    go: Sequence[Child],
    pids: dict[str, list[int]],
    waits: bool = False,
) -> bool:
    """:func:`_measure`, or False with the shape's error set if a process of it died or
    the tasks were not done in time (the error is printed by the process on stderr)."""
    try:
        _measure(server, shape, url, done_sql, count, go, pids, waits)
    except RuntimeError as exc:
        shape.error = f"failed: {exc}"
        shape.rate = None
        return False
    return True


def _stop_all(children: Sequence[Child]) -> None:
    for child in children:
        if child.process.stdin is not None:
            with contextlib.suppress(OSError):
                child.process.stdin.close()
    for child in children:
        _end(child.process, 15.0)


def _ready(children: Sequence[Child]) -> None:
    for child in children:
        child.line()


async def _storage(addresses: list[str]) -> tuple[int, int, float]:
    """Transactions, writes and seconds spent committing, summed over the nodes."""
    commits, writes, seconds = 0, 0, 0.0
    for n, address in enumerate(addresses):
        async with _client(address, f"bench-stats-{n}") as client:
            stats = (await client.statistics()).storage
        commits += stats.transactions
        writes += stats.writes
        seconds += stats.commit_seconds.sum
    return commits, writes, seconds


def hive_shape(server: Server, folder: Path, nodes: int, args: argparse.Namespace) -> Shape:
    import psycopg

    count, backend = args.tasks, args.backend
    shape = Shape("hive", f"{nodes} node{'s' if nodes > 1 else ''}")
    url = server.database("hive_bench")
    name = urlsplit(url).path[1:]
    started: list[Node] = []
    kids: list[Child] = []
    try:
        for n in range(nodes):
            # Each node gets its own URL: a socket's address is made from the URL, so one
            # URL would give every node the same socket.
            node_url = with_database(url, name, application_name=f"bench-node-{n}")
            started.append(Node(node_url, backend, folder / f"{name}-node-{n}.log"))
            error = started[-1].serving()
            if error is not None:
                shape.error = f"node {n + 1} of {nodes} refused: {error}"
                return shape
        addresses = [node.address for node in started]
        workers = [
            Child(
                "hive-worker",
                backend,
                addresses[w % nodes],
                f"node{w % nodes}-w{w}",
                str(args.slots),
            )
            for w in range(args.workers)
        ]
        kids += workers
        producer = Child("hive-producer", backend, str(count), str(args.lanes), *addresses)
        kids.append(producer)
        try:
            _ready(kids)
        except RuntimeError as exc:
            shape.error = f"failed: {exc}"
            return shape
        before = anyio.run(_storage, addresses, backend=backend)
        pids = {f"node{n}": [node.process.pid] for n, node in enumerate(started)}
        pids |= {
            "workers": [w.pid for w in workers],
            "producer": [producer.pid],
        }
        done_sql = "SELECT count(*) FROM tasks WHERE status = 'completed'"
        if not _measured(
            server, shape, url, done_sql, count, [*workers, producer], pids, args.waits
        ):
            return shape
        after = anyio.run(_storage, addresses, backend=backend)
        shape.commits = after[0] - before[0]
        shape.writes = after[1] - before[1]
        shape.commit_seconds = after[2] - before[2]
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*), count(DISTINCT task_id) FROM runs").fetchone()
            if row is None or tuple(row) != (count, count):
                # A task handed out twice (or a run lost): the figure is not a valid one.
                runs, tasks = row or (0, 0)
                shape.error = f"{count} tasks done, but {runs} runs of {tasks} distinct tasks"
            spread = conn.execute(
                "SELECT split_part(worker_id, '-', 1), count(*) FROM runs GROUP BY 1 ORDER BY 1"
            ).fetchall()
        shape.runs_per_node = {str(node): int(runs) for node, runs in spread}
        return shape
    finally:
        _stop_all(kids)
        for node in started:
            node.stop()


def _missing(module: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[bench]')"
    return None


async def _install_pgqueuer(url: str) -> None:
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await Queries(PsycopgDriver(conn)).install()


async def _install_procrastinate(url: str) -> None:
    app, _ = _procrastinate_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


#: Per peer: the setup, the consumer and producer roles, and the query counting done jobs
#: (each counts a job once: pgqueuer moves a finished job to its log, procrastinate marks it).
PEERS: dict[str, tuple[Any, str, str, str, str]] = {
    "pgqueuer": (
        _install_pgqueuer,
        "pgqueuer-consumer",
        "pgqueuer-producer",
        "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
        "{} consumer{} x batch {}",
    ),
    "procrastinate": (
        _install_procrastinate,
        "procrastinate-worker",
        "procrastinate-producer",
        "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
        "{} worker{} x concurrency {}",
    ),
}


def peer_shape(
    server: Server, peer: str, consumers: int, each: int, count: int, waits: bool = False
) -> Shape:
    install, consumer_role, producer_role, done_sql, label = PEERS[peer]
    shape = Shape(peer, label.format(consumers, "s" if consumers > 1 else "", each))
    missing = _missing(peer)
    if missing is not None:
        shape.error = missing
        return shape
    url = server.database(f"{peer}_bench")
    anyio.run(install, url, backend="asyncio")
    kids: list[Child] = []
    try:
        consumers_ = [Child(consumer_role, "asyncio", url, str(each)) for _ in range(consumers)]
        kids += consumers_
        producer = Child(producer_role, "asyncio", url, str(count))
        kids.append(producer)
        _ready(kids)
        pids = {"consumers": [c.pid for c in consumers_], "producer": [producer.pid]}
        _measured(server, shape, url, done_sql, count, [*consumers_, producer], pids, waits)
    finally:
        _stop_all(kids)
    return shape


# -- the report ---------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    tasks: int
    workers: int
    slots: int
    lanes: int
    cores: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    shapes: list[Shape]
    ratios: dict[str, float | None]
    compared: dict[str, str]  # which shape each ratio took


def _best(shapes: list[Shape], system: str) -> Shape | None:
    rated = [s for s in shapes if s.system == system and _rate(s)]
    return max(rated, key=lambda s: s.rate or 0.0) if rated else None


def _rate(shape: Shape | None) -> float | None:
    """The shape's figure, if it has one that counts (measured, its checks passed)."""
    return shape.rate if shape is not None and not shape.error else None


def ratios(shapes: list[Shape]) -> tuple[dict[str, float | None], dict[str, str]]:
    found: dict[str, float | None] = {}
    compared: dict[str, str] = {}
    by_name = {(s.system, s.name): s for s in shapes}
    one, three = _rate(by_name.get(("hive", "1 node"))), _rate(by_name.get(("hive", "3 nodes")))
    found["3 nodes / 1 node"] = three / one if one and three else None
    hive = _best(shapes, "hive")
    for peer in PEERS:
        best = _best(shapes, peer)
        key = f"hive / {peer}"
        hive_rate, peer_rate = _rate(hive), _rate(best)
        found[key] = hive_rate / peer_rate if hive_rate and peer_rate else None
        if hive is not None and best is not None:
            compared[key] = f"hive {hive.name} / {peer} {best.name}"
    return found, compared


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def render(r: Result) -> str:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = [
        f"{r.tasks:,} no-op tasks per shape, from go to the last durable completion; hive on"
        f" {r.backend}: {r.workers} worker processes x {r.slots} slots over the nodes, one"
        f" producer with {r.lanes} create_tasks lanes per node; {r.cores} cores",
        f"load average {_load(r.load_before)} before, {_load(r.load_after)} after",
    ]
    for s in r.shapes:
        head = f"  {s.system:<13} {s.name:<30}"
        if s.rate is None:
            lines.append(f"{head} not available: {s.error}")
            continue
        lines.append(
            f"{head} {s.rate:>7,.0f} tasks/s  ({s.seconds:.2f} s; load {s.load_before[0]:.2f}"
            f" -> {s.load_after[0]:.2f})"
        )
        if s.error:
            lines.append(f"      CHECK FAILED, the figure does not count: {s.error}")
        used = sum(s.cpu.values())
        each = "  ".join(
            f"{role} {seconds:.2f} ({seconds / s.seconds:.2f})" for role, seconds in s.cpu.items()
        )
        per_task = "  ".join(
            f"{role} {seconds / r.tasks * 1e3:.2f}" for role, seconds in s.cpu.items()
        )
        lines += [
            f"      CPU seconds (cores): {each}  = {used:.2f} ({used / s.seconds:.2f} of"
            f" {r.cores}); busiest: {s.busiest}",
            f"      CPU ms per task: {per_task}  = {used / r.tasks * 1e3:.2f}",
        ]
        if s.pg_cpu:
            by_kind = "  ".join(
                f"{kind} {seconds / r.tasks * 1e3:.2f}"
                for kind, seconds in sorted(s.pg_cpu.items(), key=lambda item: -item[1])
                if seconds / r.tasks * 1e3 >= 0.005
            )
            lines.append(f"      PostgreSQL ms per task, by connection: {by_kind}")
        if s.waits:
            waiting = "  ".join(
                f"{key} {mean:.2f}" for key, mean in s.waits.items() if mean >= 0.01
            )
            lines.append(
                f"      PostgreSQL sessions active (mean), by what they wait for: {waiting}"
            )
        if s.system == "hive":
            spread = ", ".join(f"{node} {runs:,}" for node, runs in s.runs_per_node.items())
            lines.append(
                f"      {s.commits:,} commits ({s.writes / max(s.commits, 1):.1f} writes each,"
                f" {s.commit_seconds / max(s.commits, 1) * 1e3:.1f} ms each; the nodes' writers"
                f" committing {s.commit_seconds / s.seconds:.2f} of the time);"
                f" runs by node: {spread}"
            )
    scale = r.ratios.get("3 nodes / 1 node")
    lines.append(
        "  3 nodes / 1 node: "
        + ("n/a (a shape was not available)" if scale is None else f"{scale:.2f}x")
        + f"  goal >= {SCALE_GOAL:g}x"
        + ("" if scale is None else f" {verdict(scale >= SCALE_GOAL)}")
    )
    for peer in PEERS:
        key = f"hive / {peer}"
        value = r.ratios.get(key)
        goal = f"  goal >= {PGQUEUER_GOAL:g}x" if peer == "pgqueuer" else ""
        if value is None:
            lines.append(f"  {key}: n/a{goal}")
            continue
        mark = f" {verdict(value >= PGQUEUER_GOAL)}" if peer == "pgqueuer" else ""
        lines.append(f"  {key}: {value:.2f}x ({r.compared[key]}){goal}{mark}")
    return "\n".join(lines)


def _pairs(text: str, option: str) -> list[tuple[int, int]]:
    found = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            left, right = item.split("x")
            found.append((int(left), int(right)))
        except ValueError:
            raise SystemExit(f"{option}: {item!r} is not COUNTxSIZE (e.g. 3x10)") from None
    return found


def run(args: argparse.Namespace) -> Result:
    shapes: list[Shape] = []
    load_before = os.getloadavg()
    with server() as (url, own), tempfile.TemporaryDirectory(prefix="hive-bench-") as name:
        # A database of one's own cluster goes with it; on a given server they are dropped
        # (seconds each: DROP DATABASE checkpoints) unless --keep-databases.
        admin = Server(url, own or args.keep_databases)
        try:
            for nodes in args.nodes:
                shapes.append(hive_shape(admin, Path(name), nodes, args))
                print(render_progress(shapes[-1]), file=sys.stderr, flush=True)
            for peer, option in (
                ("pgqueuer", args.pgqueuer),
                ("procrastinate", args.procrastinate),
            ):
                for consumers, each in _pairs(option, f"--{peer}"):
                    shapes.append(peer_shape(admin, peer, consumers, each, args.tasks, args.waits))
                    print(render_progress(shapes[-1]), file=sys.stderr, flush=True)
                    if shapes[-1].rate is None:
                        break  # not installed: the other shapes would say the same
        finally:
            admin.close()
    found, compared = ratios(shapes)
    return Result(
        backend=args.backend,
        tasks=args.tasks,
        workers=args.workers,
        slots=args.slots,
        lanes=args.lanes,
        cores=os.cpu_count() or 1,
        load_before=load_before,
        load_after=os.getloadavg(),
        shapes=shapes,
        ratios=found,
        compared=compared,
    )


def render_progress(s: Shape) -> str:
    shown = f"{s.rate:,.0f} tasks/s" if s.rate is not None else f"not available: {s.error}"
    return f"# {s.system} {s.name}: {shown}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument(
        "--nodes", type=lambda t: [int(x) for x in t.split(",") if x], default=[1, 2, 3]
    )
    parser.add_argument("--workers", type=int, default=6, help="worker processes in all")
    parser.add_argument("--slots", type=int, default=16, help="claim_tasks limit per worker")
    parser.add_argument("--lanes", type=int, default=2, help="producer lanes per node")
    parser.add_argument("--pgqueuer", default="1x10,3x10,1x100,3x100", help="CxBATCH,...")
    parser.add_argument("--procrastinate", default="1x10,3x10", help="CxCONCURRENCY,...")
    parser.add_argument(
        "--keep-databases",
        action="store_true",
        help="on a server given by HIVE_BENCH_PG, leave the databases made (not dropped)",
    )
    parser.add_argument(
        "--waits",
        action="store_true",
        help="sample what each shape's PostgreSQL sessions wait for (pg_stat_activity,"
        " every 10 ms, on a connection of its own: a little more server CPU)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        anyio.run(ROLES[args.role], *args.role_args, backend=args.backend)
        return
    result = run(args)
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
