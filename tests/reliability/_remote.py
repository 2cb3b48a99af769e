"""Real owners and raw peers for the socket's fault tests.

:func:`owner` runs ``tests/_owner.py`` (a process that owns a database and serves it on
its socket) for an ``async with`` block; :func:`start_owner` does the same for sync code
(a module-scoped fixture). :class:`RawPeer` speaks the wire by hand on a blocking socket,
so that a test can send exactly the bytes it means to (half a frame, garbage, a call and
then nothing) and see exactly what the owner answers.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration.remote.protocol import (
    PROTOCOL_VERSION,
    Call,
    Failure,
    Hello,
    Received,
    Result,
    ServerFrame,
    Welcome,
    frame,
)

OWNER = Path(__file__).parent.parent / "_owner.py"
#: Only turns a hang into a failure.
DEADLINE = 30.0


class Owner:
    def __init__(self, process: Process, address: str, pid: int) -> None:
        self.process = process
        self.address = address
        self.pid = pid

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        """Close its stdin: it stops its runtime cleanly and exits."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(DEADLINE):
            return await self.process.wait()


def _command(db_path: str, backend: str, config: dict[str, Any]) -> list[str]:
    return [sys.executable, str(OWNER), db_path, backend, json.dumps(config)]


@asynccontextmanager
async def owner(db_path: str, backend: str, **config: Any) -> AsyncIterator[Owner]:
    """A process that owns ``db_path`` and serves it, until the block ends (killed then
    if it still runs)."""
    process = await anyio.open_process(
        _command(db_path, backend, config),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(DEADLINE):
            try:
                ready = json.loads(await lines.receive_until(b"\n", 1 << 16))
            except (anyio.EndOfStream, anyio.IncompleteRead):
                raise AssertionError("the owner did not start") from None
        yield Owner(process, ready["ready"], ready["pid"])
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


def start_owner(db_path: str, backend: str, **config: Any) -> tuple[subprocess.Popen[bytes], str]:
    """:func:`owner` for sync code: the process and its address (kill it when done)."""
    process = subprocess.Popen(
        _command(db_path, backend, config),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise AssertionError("the owner did not start")
    return process, json.loads(line)["ready"]


def connect_raw(address: str, timeout: float = DEADLINE) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    if address.startswith("abstract:"):
        sock.connect("\0" + address.removeprefix("abstract:"))
    else:
        sock.connect(address.removeprefix("unix:"))
    return sock


_server_frames = msgspec.msgpack.Decoder(ServerFrame)
_encode = msgspec.msgpack.encode


def call_frame(call_id: int, op: str, **args: object) -> bytes:
    """A Call frame of ``op`` with ``args`` (each its own msgpack value)."""
    raw = {name: msgspec.Raw(_encode(value)) for name, value in args.items()}
    return frame(Call(call_id, op, raw))


HELLO = frame(Hello(PROTOCOL_VERSION, name="raw-peer"))


class RawPeer:
    """One connection to an owner, spoken by hand (blocking: run it in a thread)."""

    def __init__(self, address: str, timeout: float = DEADLINE) -> None:
        self.sock = connect_raw(address, timeout)
        self._buffer = b""
        self._ids = iter(range(1, 1 << 62))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> Welcome:
        self.send(HELLO)
        welcome = self.read()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def read(self) -> Any:
        """The next frame from the owner (``None`` once it closed the connection)."""
        while True:
            if len(self._buffer) >= 4:
                (size,) = struct.unpack(">I", self._buffer[:4])
                if len(self._buffer) >= 4 + size:
                    body, self._buffer = self._buffer[4 : 4 + size], self._buffer[4 + size :]
                    return _server_frames.decode(body)
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self._buffer, f"closed in the middle of a frame: {self._buffer!r}"
                return None
            self._buffer += chunk

    def start(self, op: str, **args: object) -> int:
        """Send a call of ``op``; its id (read its answer with :meth:`answer`)."""
        call_id = next(self._ids)
        self.send(call_frame(call_id, op, **args))
        return call_id

    def answer(self, call_id: int) -> Result | Failure:
        while True:
            got = self.read()
            assert got is not None, f"the owner closed the connection before answering {call_id}"
            if isinstance(got, Result | Failure) and got.id == call_id:
                return got

    def call(self, op: str, **args: object) -> Any:
        """Run ``op``; its answer as plain values (raises AssertionError on a Failure)."""
        answer = self.answer(self.start(op, **args))
        assert isinstance(answer, Result), answer
        return msgspec.msgpack.decode(answer.value)

    def acknowledge(self, call_id: int, *, kept: bool) -> None:
        self.send(frame(Received(call_id, kept)))

    def frames_until_closed(self, seconds: float) -> list[Any] | None:
        """Every frame the owner sends until it closes the connection, or ``None`` if it
        has not closed it within ``seconds``."""
        self.sock.settimeout(seconds)
        frames = []
        try:
            while (got := self.read()) is not None:
                frames.append(got)
        except TimeoutError:
            return None
        return frames

    def close(self, *, reset: bool = False) -> None:
        """Close; ``reset``: abortively (RST, what a killed process's socket may do)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


CHILD = Path(__file__).with_name("_remote_child.py")


class Child:
    """A ``_remote_child.py`` process: its JSON lines, and its stdin to steer it."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self.process = process
        self.pid = process.pid
        self._stdout = BufferedByteReceiveStream(process.stdout)
        self.lines: list[dict[str, Any]] = []

    async def line(self) -> dict[str, Any] | None:
        """Its next line (kept in :attr:`lines`), or None once its stdout closed."""
        try:
            raw = await self._stdout.receive_until(b"\n", 1 << 20)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            return None
        value = json.loads(raw)
        assert isinstance(value, dict)
        self.lines.append(value)
        return value

    async def expect(self, op: str) -> dict[str, Any]:
        """Read lines until one of ``op``."""
        with anyio.fail_after(DEADLINE):
            while True:
                line = await self.line()
                assert line is not None, f"child {self.pid} ended before {op!r}: {self.lines[-3:]}"
                if line.get("op") == op:
                    return line

    async def tell(self, text: str = "\n") -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(text.encode())

    async def finish(self) -> int:
        """Close its stdin, read the rest of its lines, and wait for it to exit."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(DEADLINE):
            while await self.line() is not None:
                pass
            return await self.process.wait()


@asynccontextmanager
async def child(*args: str) -> AsyncIterator[Child]:
    """Run ``_remote_child.py`` with ``args``; killed on the way out if still running."""
    process = await anyio.open_process(
        [sys.executable, str(CHILD), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        yield Child(process)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = DEADLINE) -> None:
    """Wait until ``check()`` holds: what it reads changes in another process (a claim
    going back, a lease running out), which pushes nothing here to wait on."""
    with anyio.fail_after(within):
        while True:
            if await check():
                return
            await anyio.sleep(0.02)
