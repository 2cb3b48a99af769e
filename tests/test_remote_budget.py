"""The socket server's budget for all its connections' requests (remote/budget.py,
``RuntimeConfig.max_held_bytes``): backpressure past it, first come first served, calls
that wait for other clients holding none of it, and every share given back however a
connection ends.

The owner runs in this process (its budget is read directly); its clients are other
processes (tests/_budget_peer.py) or raw sockets, so that what the server sees is what a
peer sends, cut where it is cut. The budget is set to what one call of the largest frame
(1 MiB here) may hold, 73 MiB, and the read buffers of 8 connections (2 MiB).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from _frames import read_frame, read_until_closed
from _memory import resident
from anyio.abc import Process

from hive_orchestration import ConfigError, Runtime, RuntimeConfig
from hive_orchestration.api.carried import WAITING, carried
from hive_orchestration.api.client import OrchestrationClient
from hive_orchestration.api.wire import held_by
from hive_orchestration.remote.budget import CONNECTION_BYTES, WAITING_SHARE, Budget
from hive_orchestration.remote.connection import _Connection
from hive_orchestration.remote.protocol import (
    PROTOCOL_VERSION,
    Call,
    Failure,
    Hello,
    Pong,
    Refused,
    Result,
    ServerFrame,
    Welcome,
    frame,
)
from hive_orchestration.remote.server import Server

pytestmark = pytest.mark.anyio

PEER = str(Path(__file__).with_name("_budget_peer.py"))
MIB = 1024 * 1024
#: Only turns a hang into a failure.
DEADLINE = 60.0
#: Connections the owners of these tests serve at once.
CONNECTIONS = 8


def _config(connections: int = CONNECTIONS, **overrides: Any) -> RuntimeConfig:
    """1 MiB frames, and a budget of one call of them and ``connections`` shares."""
    settings: dict[str, Any] = {
        "max_frame_bytes": MIB,
        "max_held_bytes": held_by(MIB) + connections * CONNECTION_BYTES,
        "max_connections": connections,
        "remote_timeout": 20.0,
    }
    settings.update(overrides)
    return RuntimeConfig(**settings)


class _Peer:
    """A child process and its stdout, line by line."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self._buffer = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        with anyio.fail_after(DEADLINE):
            while b"\n" not in self._buffer:
                try:
                    self._buffer += await self.process.stdout.receive()
                except anyio.EndOfStream:
                    assert self.process.stderr is not None
                    error = b""
                    with anyio.move_on_after(1.0):
                        async for chunk in self.process.stderr:
                            error += chunk
                    raise AssertionError(f"the peer ended: {error.decode()[-2000:]}") from None
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def say(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(text.encode() + b"\n")


@asynccontextmanager
async def _peers() -> AsyncIterator[Callable[..., Any]]:
    started: list[Process] = []

    async def start(*args: str) -> _Peer:
        process = await anyio.open_process(
            [sys.executable, PEER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        return _Peer(process)

    try:
        yield start
    finally:
        with anyio.CancelScope(shield=True):
            for process in started:
                if process.returncode is None:
                    process.kill()
                await process.wait()
                await process.aclose()


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(DEADLINE):
        while not condition():  # noqa: ASYNC110 - the server's counters: no event to wait on
            await anyio.sleep(0.01)


@asynccontextmanager
async def _large_answers(
    tmp_path: Path, calls: int
) -> AsyncIterator[tuple[Server, _Connection, socket.socket, bytes]]:
    """A runtime whose server queues at most 2 MiB for a client (max_queued_bytes), a task
    of 400 KB, a raw connection admitted, and ``calls`` get_task frames of it, not sent.
    Closed at the end, the connection goes and the budget gets back all it lent."""
    config = _config(max_queued_bytes=2 * MIB)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        task_id = await runtime.create_task("job", {"blob": "x" * 400_000})
        sock = await anyio.to_thread.run_sync(_raw_connect, server.address)
        frames = b"".join(_call(n, "get_task", task_id=task_id) for n in range(1, calls + 1))
        try:
            await _until(lambda: len(server._connections) == 1)
            (connection,) = server._connections
            yield server, connection, sock, frames
        finally:
            sock.close()
        await _until(lambda: not server._connections and server.budget.held == 0)


def _raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(DEADLINE)
    target = address.removeprefix("unix:")
    if address.startswith("abstract:"):
        target = "\0" + address.removeprefix("abstract:")
    sock.connect(target)
    sock.sendall(frame(Hello(PROTOCOL_VERSION)))
    assert isinstance(read_frame(sock), Welcome)
    return sock


def _call(call_id: int, op: str, **args: object) -> bytes:
    raw = {name: msgspec.Raw(msgspec.msgpack.encode(value)) for name, value in args.items()}
    return frame(Call(call_id, op, raw))


# -- the budget alone -------------------------------------------------------------------------


async def test_the_first_in_line_is_served_first_even_past_one_that_would_fit(
    anyio_backend: str,
) -> None:
    budget = Budget(100)
    assert budget.try_take(60)
    big = budget.queue(70)  # does not fit: waits
    small = budget.queue(10)  # would fit, but comes after
    assert not big.granted.is_set()
    assert not small.granted.is_set()
    assert not budget.try_take(1)  # nor may anyone pass the line
    stats = budget.statistics()
    assert (stats.held, stats.waiting, stats.waiting_bytes) == (60, 2, 80)
    budget.give(60)
    assert big.granted.is_set()
    assert small.granted.is_set()  # 70 + 10 fit together
    assert budget.held == 80
    budget.give(70)
    budget.give(10)
    assert (budget.held, budget.peak) == (0, 80)


async def test_a_waiter_that_leaves_gives_back_exactly_what_it_was_granted(
    anyio_backend: str,
) -> None:
    budget = Budget(100)
    assert budget.try_take(70)
    first = budget.queue(50)
    second = budget.queue(20)  # would fit, but is behind the first
    assert not second.granted.is_set()
    budget.withdraw(first)  # leaves ungranted: the one behind it fits now
    assert second.granted.is_set()
    assert budget.held == 90
    budget.give(70)
    third = budget.queue(85)
    assert not third.granted.is_set()
    budget.withdraw(second)  # granted, then left (cancelled as it was woken): given back
    assert third.granted.is_set()
    budget.withdraw(third)
    assert budget.held == 0
    assert budget.statistics().waiting == 0

    # A task cancelled while it waits leaves the line; one granted as it was cancelled
    # gives it back: either way nothing stays taken.
    budget = Budget(10)
    assert budget.try_take(10)
    for grant_first in (False, True):
        ticket = budget.queue(5)
        with anyio.CancelScope() as scope:
            if grant_first:
                budget.give(10)  # granted, and cancelled before it woke
            scope.cancel()
            try:
                await ticket.granted.wait()
            except BaseException:
                budget.withdraw(ticket)
                raise
        assert scope.cancelled_caught
        assert budget.held == (0 if grant_first else 10)
        assert budget.statistics().waiting == 0


async def test_a_waiting_call_keeps_at_most_its_small_share_and_only_within_the_room(
    anyio_backend: str,
) -> None:
    budget = Budget(1000 * 1024, waiting_room=200 * 1024)
    assert budget.try_take(300 * 1024)  # a large claim's share
    assert budget.try_take(10 * 1024)  # a small one's
    waiter = budget.queue(800 * 1024)
    assert not waiter.granted.is_set()
    assert budget.keep(300 * 1024) == WAITING_SHARE  # the rest given back: it fits now
    assert waiter.granted.is_set()
    assert budget.keep(10 * 1024) == 10 * 1024
    assert budget.kept == WAITING_SHARE + 10 * 1024
    assert budget.held == budget.kept + 800 * 1024
    budget.withdraw(waiter)
    assert budget.try_take(100 * 1024)
    assert budget.keep(100 * 1024) == 0  # past the room: all of it given back
    assert budget.held == budget.kept == WAITING_SHARE + 10 * 1024
    budget.unkeep(WAITING_SHARE)
    budget.unkeep(10 * 1024)
    assert (budget.held, budget.kept) == (0, 0)


async def test_a_budget_smaller_than_one_call_of_the_largest_frame_is_refused(
    tmp_path: Path, anyio_backend: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        async with Runtime.open(
            tmp_path / "hive.db", config=_config(max_held_bytes=held_by(MIB) - 1)
        ):
            pass
    assert refused.value.field == "max_held_bytes"
    assert "max_frame_bytes" in str(refused.value)
    with pytest.raises(ConfigError, match="max_held_bytes"):
        RuntimeConfig(max_held_bytes=1000).validated()


def test_every_operation_that_waits_for_other_clients_gives_its_share_back() -> None:
    # An operation that can wait for what another client does must not hold the
    # server's budget meanwhile (that client's call may need it to be read).
    for name, operation in carried(OrchestrationClient).items():
        if "wait" in operation.types or name.startswith("wait_for"):
            assert name in WAITING, name


# -- over sockets, between processes ----------------------------------------------------------


async def test_past_the_budget_connections_wait_unread_and_alive_until_it_is_given_back(
    tmp_path: Path, anyio_backend: str
) -> None:
    # A takes nearly all the budget with a large frame it does not finish; B (a large
    # call) and C (a small one) wait unread, the Python client in each alive for 2.5
    # times its 2 s silence limit (the server tells it so while it waits); A goes, and
    # both calls are served.
    db_path = str(tmp_path / "hive.db")
    async with Runtime.open(db_path, config=_config()) as runtime, _peers() as start:
        server = runtime._server
        assert server is not None
        assert server.address
        budget = server.budget
        a = await start("partial", server.address, str(MIB - 100))
        assert await a.line() == "held"
        await _until(lambda: budget.held > MIB)
        taken = budget.held
        b = await start("client", anyio_backend, db_path, "200000")
        assert await b.line() == "connected"
        await _until(lambda: budget.statistics().waiting == 1)
        c = await start("client", anyio_backend, db_path, "10")
        assert await c.line() == "connected"
        await _until(lambda: budget.statistics().waiting == 2)
        await anyio.sleep(5.0)
        status = server.status()
        assert status.held_bytes == taken + 2 * CONNECTION_BYTES  # B's and C's shares
        assert status.max_held_bytes == held_by(MIB) + CONNECTIONS * CONNECTION_BYTES
        assert status.held_back == 2
        assert sorted(each.held_back for each in status.connections) == [False, True, True]
        assert b.process.returncode is None
        assert c.process.returncode is None
        assert await runtime.list_tasks() == []
        await a.say("quit")  # closes its socket with its frame cut
        b_task, c_task = await b.line(), await c.line()
        tasks = {task.id for task in await runtime.list_tasks()}
        assert tasks == {b_task, c_task}, (b_task, c_task)
        await _until(lambda: budget.held == 0 and not budget.statistics().waiting)


async def test_a_large_request_first_in_line_is_not_passed_over_by_small_ones(
    tmp_path: Path, anyio_backend: str
) -> None:
    # A holds 30 MB of the 76 (a 300 KB frame unfinished); B's call of nearly 1 MiB
    # (76 MB) waits, its body unread; C's call (3 KB: 0.3 MB counted) would fit beside A
    # but comes after B: it waits too, and is served after B's. Beside B's call there is
    # no room for C's, even once A leaves and its connection's share is given back
    # (three connections at most: no other connections' shares to spare).
    db_path = str(tmp_path / "hive.db")
    config = _config(3)
    async with Runtime.open(db_path, config=config) as runtime, _peers() as start:
        server = runtime._server
        assert server is not None
        assert server.address
        budget = server.budget
        a = await start("partial", server.address, "300000")
        assert await a.line() == "held"
        await _until(lambda: budget.held > 0)
        b = await start("client", anyio_backend, db_path, str(MIB - 1000))
        assert await b.line() == "connected"
        await _until(lambda: budget.statistics().waiting == 1)
        c = await start("client", anyio_backend, db_path, "3000")
        assert await c.line() == "connected"
        await _until(lambda: budget.statistics().waiting == 2)
        assert budget.held + held_by(3100) < budget.capacity  # C would fit, but is behind B
        # B's write of its frame is held back longer than its 2 s silence limit: its
        # client waits on, since the server says (pongs) that it is alive.
        await anyio.sleep(5.0)
        assert budget.statistics().waiting == 2
        await a.say("rest")
        assert (await a.line()).startswith("Result 1")
        b_task, c_task = await b.line(), await c.line()
        b_created = (await runtime.get_task(b_task)).created_at  # type: ignore[union-attr]
        c_created = (await runtime.get_task(c_task)).created_at  # type: ignore[union-attr]
        assert b_created <= c_created
        await _until(lambda: budget.held == 0)


async def test_calls_that_wait_for_other_clients_hold_none_of_the_budget(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Thirty claims that wait for work, each with 256 long task types (a 37 KB frame,
    # counted 3.7 MB): together more than the budget. Were they to hold it while they
    # wait, the calls that queue their work could not be read before their wait ends.
    # This budget leaves no room for waiting calls (waiting_room 0): each gives all of
    # its share back (the test below gives them some).
    config = _config()
    types = [f"t{n}-" + "x" * 140 for n in range(256)]
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        address = server.address
        assert 30 * held_by(len(_call(1, "claim_task", worker_id="w", task_types=types))) > (
            server.budget.capacity
        )

        def claims(connection: int) -> list[object]:
            sock = _raw_connect(address)
            try:
                sock.sendall(
                    b"".join(
                        _call(n, "claim_task", worker_id=f"w{connection}", task_types=types,
                              wait=20.0)
                        for n in range(1, 11)
                    )
                )  # fmt: skip
                answers = [read_frame(sock) for _ in range(10)]
                return [msgspec.msgpack.decode(answer.value) for answer in answers]
            finally:
                sock.close()

        answered: list[object] = []

        async def run(connection: int) -> None:
            answered.extend(await anyio.to_thread.run_sync(claims, connection))

        with anyio.fail_after(15.0):  # well within the claims' wait
            async with anyio.create_task_group() as group:
                for connection in range(3):
                    group.start_soon(run, connection)
                await _until(lambda: sum(len(c._calls) for c in server._connections) == 30)
                # A call is among its connection's calls before its arguments are counted
                # and it starts waiting, when it gives its share back: held falls to the
                # connections' own shares within the claims' wait (20 s), or never, were
                # they to hold it.
                await _until(lambda: server.budget.held == 3 * CONNECTION_BYTES)
                sock = await anyio.to_thread.run_sync(_raw_connect, address)
                try:
                    await anyio.to_thread.run_sync(
                        sock.sendall,
                        b"".join(_call(n, "create_task", task_type=types[0]) for n in range(30)),
                    )
                    for _ in range(30):
                        await anyio.to_thread.run_sync(read_frame, sock)
                finally:
                    sock.close()
        assert len(answered) == 30
        assert all(isinstance(claim, dict) for claim in answered), answered
        await _until(lambda: server.budget.held == 0)


async def test_connections_that_come_and_go_give_back_all_they_took(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Eight processes, four connections each, one after another: frames cut mid-body,
    # calls left in flight, claims waiting, cancels, large calls answered; closed
    # cleanly or reset. Once they are gone, nothing is held and nobody waits.
    # Up to 32 connections at once: a peer's next connection may come before the server
    # saw its last one close.
    config = _config(32)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        async with _peers() as start:
            peers = [await start("churn", server.address, str(seed)) for seed in range(8)]
            for peer in peers:
                assert await peer.line() == "done"
                await peer.process.wait()
        await _until(lambda: not server._connections)
        stats = server.budget.statistics()
        assert (stats.held, stats.waiting, stats.waiting_bytes) == (0, 0, 0)
        assert 0 < stats.peak <= stats.capacity


async def test_a_client_that_does_not_read_its_answers_is_cut_past_max_queued_bytes(
    tmp_path: Path, anyio_backend: str
) -> None:
    # A client asks for 40 answers of 400 KB and reads none: the server queued them all
    # (16 MB) and waited for remote_timeout (20 s) before closing. Past 2 MiB
    # (max_queued_bytes) what is queued is taken from the server's budget
    # (max_held_bytes) while the server waits a second for the client to take it; it
    # does not: the server drops what is not being written, and once the client takes
    # what is, tells it why (a failure of id 0) and closes, giving the budget back.
    # (Before, it was cut as soon as 2 MiB were queued, as a client reading at full
    # speed was: next test.)
    limit = 2 * MIB
    async with _large_answers(tmp_path, 40) as (server, connection, sock, calls):
        held = server.budget.held
        await anyio.to_thread.run_sync(sock.sendall, calls)
        lent = 0
        with anyio.fail_after(10.0):  # half the remote_timeout the server had waited
            while not connection._broken:
                # Past the bound, all of it is in the server's budget (but for the
                # frame that passed it alone, behind less than 256 KiB of others).
                assert connection._queued <= limit + connection._borrowed + 500_000
                lent = max(lent, connection._borrowed)
                await anyio.sleep(0.001)
        assert lent > 0
        # What is being written stays (the client may yet take it, then its notice:
        # else the write's deadline closes the connection), its excess in the budget
        # (but for the notice, a few hundred bytes).
        assert 0 <= connection._queued - limit - connection._borrowed < 1024
        assert connection in server._connections  # until the client takes its notice

        frames = await anyio.to_thread.run_sync(read_until_closed, sock)
    # The answers being written when it was cut, if any (the 40 come at once, and
    # the writer may have taken them all into its round), then why.
    *answers, told = frames
    assert len(answers) <= 40
    assert all(isinstance(answer, Result) for answer in answers), answers
    assert isinstance(told, Failure)
    assert told.id == 0
    assert f"past max_queued_bytes ({limit}), and it did not take them" in told.message
    assert held > 0


async def test_a_client_that_reads_its_answers_at_full_speed_is_not_cut(
    tmp_path: Path, anyio_backend: str
) -> None:
    # 80 answers of 400 KB that one commit's reads finish together land at once, 32 MB
    # past the 2 MiB of max_queued_bytes: a client that takes them as fast as they are
    # written gets them all (it was cut), what was queued past the bound held in the
    # server's budget meanwhile and given back.
    async with _large_answers(tmp_path, 80) as (_server, connection, sock, calls):

        def talk() -> list[Any]:
            sock.sendall(calls)
            return [read_frame(sock) for _ in range(80)]

        answers = await anyio.to_thread.run_sync(talk)
        assert [type(answer) for answer in answers] == [Result] * 80, answers[-1]
        assert sorted(answer.id for answer in answers) == list(range(1, 81))
        assert connection._borrowed == 0


async def test_a_client_that_leaves_in_a_burst_past_max_queued_bytes_leaves_nothing_held(
    tmp_path: Path, anyio_backend: str
) -> None:
    # 80 answers of 400 KB land at once past 2 MiB (max_queued_bytes), what passes it
    # taken from the server's budget; the client reads one and closes: however the
    # connection ends (its writer cancelled mid-write), the budget gets it all back.
    async with _large_answers(tmp_path, 80) as (_server, connection, sock, calls):
        await anyio.to_thread.run_sync(sock.sendall, calls)
        await _until(lambda: connection._borrowed > 0)
        assert isinstance(await anyio.to_thread.run_sync(read_frame, sock), Result)


class _PaddedPing(msgspec.Struct, tag="ping", tag_field="kind"):
    """A ping with a field the server does not know (and skips): a 60 KB frame that asks
    for nothing but a pong."""

    nonce: int
    padding: bytes


async def test_each_connection_holds_a_share_for_its_read_buffers_and_lets_go_of_them(
    tmp_path: Path, anyio_backend: str
) -> None:
    # A connection's socket is read in chunks of up to 64 KiB (and 256 KiB on asyncio)
    # that no call counted: 1024 connections could hold some 100-300 MiB beside the
    # budget. Each now holds CONNECTION_BYTES of it while open, the budget must have
    # room for max_connections of them beside one call of the largest frame, and a
    # connection idle after a 60 KB frame held on to its chunk: now let go.
    with pytest.raises(ConfigError, match="max_connections") as refused:
        async with Runtime.open(
            tmp_path / "refused.db", config=_config(max_connections=CONNECTIONS + 1)
        ):
            pass
    assert refused.value.field == "max_held_bytes"
    many = 32
    config = _config(many)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        address = server.address
        assert address
        socks = [await anyio.to_thread.run_sync(_raw_connect, address) for _ in range(many)]
        try:
            assert server.budget.held == many * CONNECTION_BYTES
            before = resident()

            def pings() -> None:
                for n, sock in enumerate(socks, 1):
                    for _ in range(8):  # eight frames a connection, each read and answered
                        sock.sendall(frame(_PaddedPing(n, b"x" * 60_000)))
                        assert read_frame(sock) == Pong(n)

            await anyio.to_thread.run_sync(pings)
            # What is left is each connection's last chunk, if it keeps it: 32 x 60 KB.
            grown = resident() - before
            assert grown < many * 20_000, grown
        finally:
            for sock in socks:
                sock.close()
        await _until(lambda: server.budget.held == 0)


async def test_calls_that_wait_keep_what_their_arguments_hold_within_the_room_left_for_them(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Claims that wait gave their whole share back: their arguments (a few KB, some
    # 80 KB for 256 long task types) were outside the budget for as long as they
    # waited. Each now keeps what its arguments may hold (at most WAITING_SHARE) while
    # the waiting calls' shares fit in what the budget has left beside one call of the
    # largest frame and every connection's share (2 MiB here); past it, it gives it back.
    room = 2 * MIB
    config = _config(max_held_bytes=held_by(MIB) + CONNECTIONS * CONNECTION_BYTES + room)
    long_types = ["job"] + [f"t{n}-" + "x" * 140 for n in range(255)]
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        budget = server.budget
        assert budget.waiting_room == room
        sock = await anyio.to_thread.run_sync(_raw_connect, server.address)
        try:
            (connection,) = server._connections
            small = [_call(n, "claim_task", worker_id="w", task_types=["job"], wait=20.0)
                     for n in range(1, 4)]  # fmt: skip
            large = [_call(n, "claim_task", worker_id="w", task_types=long_types, wait=20.0)
                     for n in range(4, 24)]  # fmt: skip
            assert held_by(len(large[0])) > WAITING_SHARE
            await anyio.to_thread.run_sync(sock.sendall, b"".join(small + large))
            # Every claim waits: each kept its share (noted negative) or gave it back.
            await _until(
                lambda: (
                    len(connection._calls) == 23
                    and all(charge < 0 for charge in connection._charged.values())
                )
            )
            kept = -sum(connection._charged.values())
            assert budget.kept == kept
            assert budget.held == CONNECTION_BYTES + kept
            assert room - WAITING_SHARE < kept <= room  # the room is full: some gave back
            assert len(connection._charged) < 23
            assert sum(held_by(len(call) - 4) for call in small) + 15 * WAITING_SHARE <= kept
            for _ in range(23):
                await runtime.create_task("job", {})
            answers = [await anyio.to_thread.run_sync(read_frame, sock) for _ in range(23)]
            assert all(msgspec.msgpack.decode(answer.value) for answer in answers)
            await _until(lambda: budget.held == CONNECTION_BYTES)
            assert budget.kept == 0
        finally:
            sock.close()
        await _until(lambda: budget.held == 0)


async def test_a_frame_that_trickles_in_is_cut_at_the_idle_limit_and_its_sender_told_why(
    tmp_path: Path, anyio_backend: str
) -> None:
    # A slow loris: the header of a 300 KB call, then a byte every 0.2 s. The server
    # holds the frame's share of the budget (30 MB, counted before its body) and the
    # bytes that came, for the idle limit (3 x remote_timeout: 3 s here), then closes
    # the connection. It said "silent" (it was not) and told the client nothing; it now
    # tells it why, as for a frame that breaks the protocol (a failure of id 0).
    config = _config(remote_timeout=1.0)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        budget = server.budget
        sock = await anyio.to_thread.run_sync(_raw_connect, server.address)
        data = _call(1, "create_task", task_type="job", payload={"blob": "x" * 300_000})

        def trickle() -> tuple[bytes, float]:
            sock.settimeout(0.2)
            sock.sendall(data[:100])
            received = b""
            start = time.monotonic()
            for byte in range(100, 200):
                with contextlib.suppress(TimeoutError):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return received, time.monotonic() - start
                    received += chunk
                with contextlib.suppress(OSError):
                    sock.send(data[byte : byte + 1])
            raise AssertionError("the server did not close the connection in 20 s")

        result: list[tuple[bytes, float]] = []

        async def run() -> None:
            result.append(await anyio.to_thread.run_sync(trickle))

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(run)
                await _until(lambda: budget.held > CONNECTION_BYTES)
                assert budget.held == CONNECTION_BYTES + held_by(len(data) - 4)
        finally:
            sock.close()
        received, took = result[0]
        assert 2.5 < took < 10.0, took
        decoder = msgspec.msgpack.Decoder(ServerFrame)
        size = int.from_bytes(received[:4], "big")
        told = decoder.decode(received[4 : 4 + size])
        assert isinstance(told, Failure)
        assert told.id == 0
        assert f"a frame of {len(data) - 4} bytes did not arrive within 3s" in told.message
        await _until(lambda: budget.held == 0)


async def test_a_connection_waits_for_its_share_and_counts_against_max_connections_meanwhile(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Two connections' unfinished frames take all but less than a connection's share
    # of the budget: a third connection waits for its share, its hello unread. It is
    # counted against max_connections (3) meanwhile, so a fourth is refused at once,
    # where it passed the count and would have held a share beyond what the budget was
    # checked for once both were served. The first goes: the third is welcomed.
    config = _config(3)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        address = server.address
        assert address
        budget = server.budget

        def call_of(payload: int) -> bytes:
            return _call(1, "create_task", task_type="job", payload={"blob": "x" * payload})

        first = call_of(300_000)
        a1 = await anyio.to_thread.run_sync(_raw_connect, address)
        await anyio.to_thread.run_sync(a1.sendall, first[:-1000])
        await _until(lambda: budget.held == CONNECTION_BYTES + held_by(len(first) - 4))
        # The second frame leaves less than a share beside the two connections'.
        room = budget.capacity - budget.held - CONNECTION_BYTES
        second = call_of((room - CONNECTION_BYTES // 2) // 101 - 60)
        assert 0 <= room - held_by(len(second) - 4) < CONNECTION_BYTES
        a2 = await anyio.to_thread.run_sync(_raw_connect, address)
        await anyio.to_thread.run_sync(a2.sendall, second[:-1000])
        await _until(lambda: budget.held + CONNECTION_BYTES > budget.capacity)
        welcomed: list[socket.socket] = []

        async def third() -> None:
            welcomed.append(await anyio.to_thread.run_sync(_raw_connect, address))

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(third)
                await _until(lambda: budget.statistics().waiting == 1)
                fourth = socket.socket(socket.AF_UNIX)
                try:
                    fourth.settimeout(DEADLINE)
                    target = address.removeprefix("unix:")
                    if address.startswith("abstract:"):
                        target = "\0" + address.removeprefix("abstract:")
                    await anyio.to_thread.run_sync(fourth.connect, target)
                    refused = await anyio.to_thread.run_sync(read_frame, fourth)
                finally:
                    fourth.close()
                assert isinstance(refused, Refused)
                assert refused.error.type == "ConnectionLostError"
                assert "max_connections" in refused.error.message
                assert not welcomed
                a1.close()  # its share and its frame's go back: the third is served
            assert len(welcomed) == 1
            await _until(lambda: len(server._connections) == 2)  # the first, closed, gone
        finally:
            for sock in (a1, a2, *welcomed):
                sock.close()
        await _until(lambda: budget.held == 0)
