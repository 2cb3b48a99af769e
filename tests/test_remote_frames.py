"""The wire's frames on a stream: how they are read, written and interleaved.

The frame reader is driven by a scripted stream (what a socket hands over, chunk by
chunk); the server's writes by a real owner in this process and a raw socket client in a
worker thread, which can stop reading to make the server's writes block.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
import termios
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from _frames import read_frame, read_until_closed
from _memory import peak_growth
from anyio.abc import SocketAttribute

from hive_orchestration import (
    AccessDeniedError,
    HiveError,
    OrchestrationClient,
    Runtime,
    RuntimeConfig,
)
from hive_orchestration.errors import ConnectionLostError, InvalidInputError, OutcomeUnknownError
from hive_orchestration.messages.events import Event
from hive_orchestration.remote.address import connect_path
from hive_orchestration.remote.client import RemoteRuntime
from hive_orchestration.remote.protocol import (
    PROTOCOL_VERSION,
    Call,
    CallOut,
    Cancel,
    ClientFrame,
    Events,
    Failure,
    FrameError,
    FrameReader,
    Hello,
    Ping,
    Pong,
    Result,
    ResultOut,
    ServerFrame,
    Subscribe,
    Welcome,
    frame,
)

pytestmark = pytest.mark.anyio

#: Only turns a hang into a failure.
DEADLINE = 30.0


class Scripted(anyio.abc.ByteReceiveStream):
    """A stream that hands over ``chunks`` as a socket would: at most what is asked for,
    the rest of a chunk kept for the next receive. Counts the receives."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)
        self.receives = 0
        self.largest = 0  # the most bytes handed over at once

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        self.receives += 1
        if not self._chunks:
            raise anyio.EndOfStream
        chunk = self._chunks.pop(0)
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            self._chunks.insert(0, rest)
        self.largest = max(self.largest, len(chunk))
        return chunk

    async def aclose(self) -> None:
        self._chunks.clear()


def _call(call_id: int, op: str = "get_task", **args: object) -> bytes:
    raw = {name: msgspec.Raw(msgspec.msgpack.encode(value)) for name, value in args.items()}
    return frame(Call(call_id, op, raw))


async def test_frames_that_arrive_together_are_read_with_one_receive() -> None:
    calls = [_call(n, task_id=f"t{n}") for n in range(1, 4)]
    stream = Scripted([b"".join(calls)])
    reader = FrameReader(stream, ClientFrame, 1 << 20)
    got = [await reader.read() for _ in calls]
    assert [message.id for message in got] == [1, 2, 3]
    assert msgspec.msgpack.decode(got[2].args["task_id"]) == "t3"
    assert stream.receives == 1
    with pytest.raises(anyio.EndOfStream):  # a clean end, between frames
        await reader.read()


async def test_a_frame_cut_anywhere_is_read_whole() -> None:
    data = _call(7, task_id="x" * 5000) + _call(8, task_id="y")
    for cut in (1, 3, 4, 5, 100, len(data) - 40, len(data) - 1):
        stream = Scripted([data[:cut], data[cut:]])
        reader = FrameReader(stream, ClientFrame, 1 << 20)
        first, second = await reader.read(), await reader.read()
        assert (first.id, second.id) == (7, 8), cut
        assert msgspec.msgpack.decode(first.args["task_id"]) == "x" * 5000


async def test_a_large_frame_is_read_in_chunks_and_nothing_of_the_next() -> None:
    big = _call(1, task_id="z" * 3_000_000)
    after = _call(2, task_id="after")
    stream = Scripted([big[:1000], big[1000:] + after])
    reader = FrameReader(stream, ClientFrame, 4 << 20)
    first = await reader.read()
    assert msgspec.msgpack.decode(first.args["task_id"]) == "z" * 3_000_000
    # The rest of the big frame was asked for by its size: the next frame was not taken
    # with it, and comes whole from the next read.
    assert (await reader.read()).id == 2
    assert stream.largest <= 1 << 20  # read on in chunks of at most 1 MiB


async def test_a_clients_count_of_a_large_frame_lets_other_tasks_run() -> None:
    # A client counts what a server's frame would take once decoded before it decodes
    # it: 1 MiB of ints and nils of alternating kinds, a step of the walk each (a 64 MiB
    # frame of them held the client's loop for 3.3 s, every other call waiting). The
    # walk lets the loop run every 64 KiB: other tasks run after the last byte came in
    # and before the frame is read (before, not once).
    body = msgspec.msgpack.encode([1000, None] * (256 * 1024))
    turns = 0
    at_receive = 0

    class Watched(Scripted):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            nonlocal at_receive
            chunk = await super().receive(max_bytes)
            at_receive = turns
            return chunk

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    stream = Watched([struct.pack(">I", len(body)) + body])
    reader = FrameReader(stream, Any, 4 << 20, counted=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await anyio.lowlevel.checkpoint()
        value = await reader.read()
        after = turns - at_receive
        tg.cancel_scope.cancel()
    assert len(value) == 512 * 1024
    assert after >= len(body) // (64 * 1024) - 2, after


async def test_an_oversized_frame_is_refused_before_its_body_is_read() -> None:
    header = struct.pack(">I", 10_000_000)
    stream = Scripted([header + b"x" * 100, b"y" * 65536, b"z" * 65536])
    reader = FrameReader(stream, ClientFrame, 1 << 20)
    with pytest.raises(FrameError, match="over the limit"):
        await reader.read()
    assert stream.receives == 1


@pytest.mark.parametrize(
    "chunks",
    [[b"\x00\x00"], [b"\x00\x00\x00\x10abc"], [_call(1, task_id="t")[:-1]]],
    ids=["half a header", "half a body", "all but a byte"],
)
async def test_a_stream_that_ends_in_a_frame_is_a_frame_error(chunks: list[bytes]) -> None:
    reader = FrameReader(Scripted(chunks), ClientFrame, 1 << 20)
    with pytest.raises(FrameError, match="middle of a frame"):
        await reader.read()


@pytest.mark.parametrize(
    ("sent", "built", "into"),
    [
        (
            Call(3, "create_task", {"task_type": msgspec.Raw(msgspec.msgpack.encode("b"))}),
            CallOut(3, "create_task", {"task_type": "b"}),
            ClientFrame,
        ),
        (
            Result(9, msgspec.Raw(msgspec.msgpack.encode({"a": [1, 2.5, None]}))),
            ResultOut(9, {"a": [1, 2.5, None]}),
            ServerFrame,
        ),
    ],
    ids=["call", "result"],
)
def test_a_frame_built_in_one_pass_is_the_same_bytes(
    sent: msgspec.Struct, built: msgspec.Struct, into: Any
) -> None:
    assert frame(built) == frame(sent)
    assert msgspec.msgpack.decode(frame(built)[4:], type=into) == sent


# -- the server's writes ------------------------------------------------------------------


def _unread(sock: socket.socket) -> int:
    """Bytes received on ``sock`` and not yet read (FIONREAD)."""
    found = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, found)
    return found[0]


def _frames_after(address: str, sent: bytes) -> list[Any]:
    """Every frame the server sends on a connection welcomed, then sent ``sent``, until it
    closes it (blocking: run in a thread)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(DEADLINE)
    sock.connect(connect_path(address))
    try:
        sock.sendall(frame(Hello(PROTOCOL_VERSION)))
        assert isinstance(read_frame(sock), Welcome)
        sock.sendall(sent)
        return read_until_closed(sock)
    finally:
        sock.close()


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(DEADLINE):
        while not condition():  # noqa: ASYNC110 - a socket's state: no event to wait on
            await anyio.sleep(0.005)


async def test_a_cancel_that_comes_while_the_answer_is_written_does_not_cut_it(
    db_path: str, anyio_backend: str
) -> None:
    # The answer (an event of 900 KB) is more than the socket holds, and the client
    # does not read: the server's write of it blocks. A Cancel of that call, then a
    # ping, come meanwhile. The answer must still go out whole, then the pong: a frame
    # cut in two would garble every frame after it.
    config = RuntimeConfig(remote_timeout=60.0)
    async with Runtime.open(db_path, config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(DEADLINE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await anyio.to_thread.run_sync(sock.connect, connect_path(server.address))
        try:
            # Blocking calls in a thread: the owner's loop is this one.
            await anyio.to_thread.run_sync(sock.sendall, frame(Hello(PROTOCOL_VERSION)))
            assert isinstance(await anyio.to_thread.run_sync(read_frame, sock), Welcome)
            blob = "x" * 900_000
            args = {"event_type": "app.big", "data": {"blob": blob}}
            await anyio.to_thread.run_sync(sock.sendall, _call(1, "publish", **args))
            await _until(lambda: _unread(sock) > 0)  # the answer is on its way
            await anyio.to_thread.run_sync(sock.sendall, frame(Cancel(1)) + frame(Ping(7)))
            (connection,) = server._connections
            served = connection._stream.extra(SocketAttribute.raw_socket)
            await _until(lambda: _unread(served) == 0)  # the server read both
            await anyio.wait_all_tasks_blocked()  # and acted on them

            def read_two() -> list[Any]:
                return [read_frame(sock), read_frame(sock)]

            answer, pong = await anyio.to_thread.run_sync(read_two)
        finally:
            sock.close()
    assert isinstance(answer, Result)
    assert answer.id == 1
    assert msgspec.msgpack.decode(answer.value)["data"] == {"blob": blob}
    assert pong == Pong(7)


async def test_past_its_calls_in_flight_a_connection_is_not_read_nor_cut_as_silent(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Two calls in flight at most; two claims wait for work longer than the connection
    # may be silent (3 x remote_timeout = 3 s): the third call waits unread, and the
    # connection stays open, since it is this side that does not listen.
    config = RuntimeConfig(remote_timeout=1.0, max_calls_in_flight=2)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address

        def talk() -> list[tuple[int, object]]:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(DEADLINE)
            sock.connect(connect_path(server.address or ""))
            try:
                sock.sendall(frame(Hello(PROTOCOL_VERSION)))
                assert isinstance(read_frame(sock), Welcome)
                claim = {"worker_id": "w", "task_types": ["nothing"], "wait": 3.5}
                sock.sendall(
                    _call(1, "claim_task", **claim)
                    + _call(2, "claim_task", **claim)
                    + _call(3, "get_task", task_id="no-such-task")
                )
                answers = []
                for _ in range(3):
                    answer = read_frame(sock, unasked=unasked)
                    answers.append((answer.id, msgspec.msgpack.decode(answer.value)))
                return answers
            finally:
                sock.close()

        unasked: list[Pong] = []
        answers = await anyio.to_thread.run_sync(talk)
    assert sorted(answers[:2]) == [(1, None), (2, None)]
    assert answers[2] == (3, None)
    # Held back for 3.5 s, the client was told the server is alive (its pings unread):
    # a pong every half second.
    assert len(unasked) >= 4, unasked


# -- a malicious server: what the client makes of crafted errors ----------------------------


async def _crafted_server(
    listener: Any,
    answers: dict[str, Any],
    *,
    welcome: bytes | None = None,
    closed: anyio.Event | None = None,
    events: list[tuple[Event, bytes]] | None = None,
) -> None:
    """Serve one client: welcome it (or answer its hello with the bytes ``welcome``),
    then answer each call by ``answers[op]`` (a callable of the call's id giving the
    frame to send), and each subscription with ``events`` (each event beside its data's
    JSON, as a server sends them). ``closed`` is set once the client closed the
    connection."""

    async def serve(stream: Any) -> None:
        reader = FrameReader(stream, ClientFrame, 1 << 20)
        async with stream:
            try:
                while True:
                    message = await reader.read()
                    if isinstance(message, Hello):
                        if welcome is not None:
                            await stream.send(welcome)
                            continue
                        hello = Welcome(PROTOCOL_VERSION, 1, "/nowhere", 1 << 20, 8, 100, "error")
                        await stream.send(frame(hello))
                    elif isinstance(message, Call):
                        await stream.send(answers[message.op](message.id))
                    elif isinstance(message, Subscribe) and events is not None:
                        await stream.send(frame(ResultOut(message.id, None)))
                        await stream.send(frame(Events(message.id, events)))
                    elif isinstance(message, Ping):
                        await stream.send(frame(Pong(message.nonce)))
            except (anyio.EndOfStream, anyio.BrokenResourceError, FrameError):
                pass
            if closed is not None:
                closed.set()

    await listener.serve(serve)


@pytest.mark.parametrize(
    "attrs",
    [
        {"args": 5},  # BaseException.args takes a sequence only
        {"characters_written": "x"},  # an OSError's (AccessDeniedError is one): an int only
        {"with_traceback": "x", "add_note": 1},  # the class's methods, shadowed
    ],
)
async def test_a_servers_crafted_error_attributes_never_break_the_client(
    attrs: dict[str, Any],
) -> None:
    """A server (or a peer posing as one) answers a call's Failure, and a batch item's
    Refusal, with attribute names that are the exception class's own (``args``, an
    OSError's ``characters_written``, its methods): the client still gets the package's
    error, with the server's message, and goes on; its reader does not die of a
    TypeError, and the error's methods are the class's. An outcome with neither a task
    nor a refusal is the package's error too, not an AssertionError."""

    outcome = {
        "refused": {
            "error": "AccessDeniedError",
            "field": "items[0].lease",
            "message": "crafted",
            "attributes": attrs,
        }
    }
    answers = {
        # An outcome as described, and one that says neither what was done nor why not.
        "complete_tasks": lambda i: frame(ResultOut(i, [outcome, {}])),
        "get_task": lambda i: frame(Failure(i, "AccessDeniedError", "crafted", attrs)),
        "last_seq": lambda i: frame(ResultOut(i, 7)),
    }
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    with anyio.fail_after(DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(_crafted_server, listener, answers)
            async with OrchestrationClient(url=f"hive://127.0.0.1:{port}") as client:
                with pytest.raises(AccessDeniedError, match="crafted") as failed:
                    await client.get_task("t1")
                assert callable(failed.value.with_traceback)
                got, empty = await client.complete_tasks(
                    [{"lease": {"task_id": "t1", "run_id": "r1", "attempt": 1}}]
                )
                with pytest.raises(HiveError, match="crafted") as refused:
                    got.result()
                assert isinstance(refused.value, AccessDeniedError)
                assert str(refused.value) == "crafted"
                with pytest.raises(HiveError, match="neither"):
                    empty.result()
                assert await client.last_seq() == 7  # the connection serves on
            tg.cancel_scope.cancel()


# -- what a frame may make the server allocate --------------------------------------------

#: A hostile call's arguments: 2 MiB of one-byte empty maps (``{}``), each 64 bytes of
#: Python objects and a list slot once decoded (about 150 MB all told, before the fix).
_SMALL_VALUES = 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("op", "args", "field"),
    [
        ("create_tasks", {"tasks": [{}] * _SMALL_VALUES}, "tasks"),
        ("create_task", {"task_type": "t", "payload": {"a": [{}] * _SMALL_VALUES}}, "payload"),
        ("publish", {"event_type": "app.x", "data": {"a": [[]] * _SMALL_VALUES}}, "data"),
        ("create_execution_plan", {"plan_data": {"subtasks": [{}] * _SMALL_VALUES}}, "plan_data"),
    ],
    ids=["create_tasks", "create_task payload", "publish data", "plan subtasks"],
)
async def test_a_frame_of_small_values_is_refused_before_it_is_decoded(
    db_path: str, anyio_backend: str, op: str, args: dict[str, object], field: str
) -> None:
    # One frame of 2 MiB that decodes into ~150 MB: the server refuses it with
    # InvalidInputError on the argument, having grown by less than a few frames (it
    # holds the frame's bytes, and walks them without building anything), writes
    # nothing, and goes on serving the connection.
    config = RuntimeConfig(remote_timeout=60.0)
    async with Runtime.open(db_path, config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        data = _call(1, op, **args)
        size = len(data)
        assert size > _SMALL_VALUES
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(DEADLINE)
        await anyio.to_thread.run_sync(sock.connect, connect_path(server.address))
        try:
            await anyio.to_thread.run_sync(sock.sendall, frame(Hello(PROTOCOL_VERSION)))
            assert isinstance(await anyio.to_thread.run_sync(read_frame, sock), Welcome)
            with peak_growth() as growth:
                await anyio.to_thread.run_sync(sock.sendall, data)
                refused = await anyio.to_thread.run_sync(read_frame, sock)
            grown = growth.peak
            await anyio.to_thread.run_sync(sock.sendall, _call(2, "list_tasks"))
            listed = await anyio.to_thread.run_sync(read_frame, sock)
        finally:
            sock.close()
        assert await runtime.client().list_tasks() == []
        assert await runtime.client().get_execution_plans() == []
    # The frame itself is read into memory (and its copy made of the socket's chunks):
    # a few times its size, where decoding it took some 70 times.
    assert grown < 6 * size, (
        f"the server grew by {grown} bytes for a frame of {size} ({growth.how})"
    )
    assert isinstance(refused, Failure), refused
    assert (refused.id, refused.type, refused.attrs["field"]) == (1, "InvalidInputError", field)
    assert "too many small values" in refused.message
    assert isinstance(listed, Result)
    assert (listed.id, msgspec.msgpack.decode(listed.value)) == (2, [])


async def test_past_what_its_calls_may_hold_a_connection_is_not_read(
    tmp_path: Path, anyio_backend: str
) -> None:
    # The smallest frames (64 KiB): a connection's calls in flight may hold one such
    # call's arguments and what they may decode into, 6.6 MB. Each claim below sends
    # 37 KB of task types, which may decode into 3.7 MB: the second is not read until
    # the first ends (it waits for work for a second), nor the get_task sent after it,
    # though far fewer calls than max_calls_in_flight are in flight.
    config = RuntimeConfig(remote_timeout=60.0, max_frame_bytes=64 * 1024)
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address

        def talk() -> list[tuple[int, object]]:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(DEADLINE)
            sock.connect(connect_path(server.address or ""))
            try:
                sock.sendall(frame(Hello(PROTOCOL_VERSION)))
                assert isinstance(read_frame(sock), Welcome)
                types = [f"t{n}-" + "x" * 140 for n in range(256)]
                claim = {"worker_id": "w", "task_types": types, "wait": 1.0}
                sock.sendall(
                    _call(1, "claim_task", **claim)
                    + _call(2, "claim_task", **claim)
                    + _call(3, "get_task", task_id="no-such-task")
                )
                answers = []
                for _ in range(3):
                    answer = read_frame(sock)
                    answers.append((answer.id, msgspec.msgpack.decode(answer.value)))
                return answers
            finally:
                sock.close()

        answers = await anyio.to_thread.run_sync(talk)
        await _until(lambda: all(c.held == 0 for c in server._connections))
    assert answers[0] == (1, None)
    assert sorted(answers[1:]) == [(2, None), (3, None)]


#: A hostile frame's map of names: some 7 bytes a name, 16 times that once decoded.
_NAMES = dict.fromkeys(map(str, range(500_000)), "")


@pytest.mark.parametrize(
    "message",
    [
        {"kind": "call", "id": 1, "op": "get_task", "args": _NAMES},
        {"kind": "subscribe", "id": 1, "pattern": "*", "filters": _NAMES},
    ],
    ids=["a call of many argument names", "a subscription of many filters"],
)
async def test_a_frame_of_too_many_names_is_cut_off_before_they_are_decoded(
    db_path: str, anyio_backend: str, message: dict[str, object]
) -> None:
    # A call names at most 64 arguments (an operation takes at most 23), a subscription
    # 256 filters: a longer map is no frame of the protocol, refused at its header (the
    # frame reader decodes a frame's map of arguments or filters before anything looks
    # at it). The connection is closed as for any garbage, the call or subscription
    # refused on its field first, and the connection's reason; the server serves on.
    async with Runtime.open(db_path, config=RuntimeConfig(remote_timeout=60.0)) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address
        body = msgspec.msgpack.encode(message)
        size = len(body)

        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(DEADLINE)
            sock.connect(connect_path(server.address or ""))
            sock.sendall(frame(Hello(PROTOCOL_VERSION)))
            assert isinstance(read_frame(sock), Welcome)
            return sock

        sock = await anyio.to_thread.run_sync(connect)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            await anyio.to_thread.run_sync(sock.sendall, struct.pack(">I", size) + body)
            refused = await anyio.to_thread.run_sync(read_frame, sock)
            notice = await anyio.to_thread.run_sync(read_frame, sock)
            closed = await anyio.to_thread.run_sync(sock.recv, 1)
            grown = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
            sock.close()
        assert grown < 6 * size, f"the server grew by {grown} bytes for a frame of {size}"
        field = "args" if message["kind"] == "call" else "filters"
        assert isinstance(refused, Failure)
        assert (refused.id, refused.type, refused.attrs["field"]) == (1, "InvalidInputError", field)
        assert isinstance(notice, Failure)
        assert notice.id == 0
        assert closed == b""
        again = await anyio.to_thread.run_sync(connect)
        try:
            await anyio.to_thread.run_sync(again.sendall, _call(2, "list_tasks"))
            listed = await anyio.to_thread.run_sync(read_frame, again)
        finally:
            again.close()
        assert isinstance(listed, Result)
        assert msgspec.msgpack.decode(listed.value) == []


async def test_a_subscription_of_too_many_filters_is_refused_naming_them(db_path: str) -> None:
    # In the runtime's process, and by a client of its socket before it sends the frame
    # (the server would close the connection): the same error, the connection kept.
    filters = {f"f{n}": "x" for n in range(257)}
    async with (
        Runtime.open(db_path) as runtime,
        OrchestrationClient(db_path=db_path) as remote,
    ):
        assert remote.remote
        for client in (runtime.client(), remote):
            with pytest.raises(InvalidInputError, match="257 filters; at most 256") as refused:
                async with client.subscribe("*", **filters):
                    pass
            assert refused.value.field == "filters"
            async with client.subscribe("*", **dict(list(filters.items())[:256])):
                pass
        assert await remote.list_tasks() == []


# -- what a server can make its client allocate ---------------------------------------------


def _body(message: dict[str, object]) -> bytes:
    """``message`` as one frame, whatever its fields (a server need not send a frame
    of the protocol)."""
    body = msgspec.msgpack.encode(message)
    return struct.pack(">I", len(body)) + body


#: A crafted answer's small values: 2 MiB of one-byte empty maps, some 150 MB once
#: decoded (encoded once: encoding them per call, under tracemalloc, takes seconds).
_CRAFTED = msgspec.Raw(msgspec.msgpack.encode([{}] * (2 * 1024 * 1024)))


@pytest.mark.parametrize(
    "answer",
    [
        # Decoded with the frame: a failure's attributes.
        lambda i: _body(
            {
                "kind": "failure",
                "id": i,
                "type": "HiveError",
                "message": "x",
                "attrs": {"a": _CRAFTED},
            }
        ),
        # Decoded into the call's answer (a task, its payload read first).
        lambda i: _body({"kind": "result", "id": i, "value": {"payload": {"a": _CRAFTED}}}),
    ],
    ids=["failure attributes", "a task's payload"],
)
async def test_a_servers_frame_of_small_values_is_refused_before_it_is_decoded(
    anyio_backend: str, answer: Callable[[int], bytes]
) -> None:
    # Whatever answers at the address a client was given: a frame of 2 MiB that would
    # take 150 MB once decoded is refused unread, the call in flight fails with the
    # package's error saying why, and the connection is dropped (the server sees it
    # closed while the client is still open); later calls are refused at once.
    closed = anyio.Event()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    # Counting 2 MiB of values under tracemalloc takes seconds on a loaded machine: the
    # client must not declare the server silent meanwhile.
    config = RuntimeConfig(remote_timeout=DEADLINE)
    with anyio.fail_after(2 * DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(partial(_crafted_server, closed=closed), listener, {"get_task": answer})
            url = f"hive://127.0.0.1:{port}"
            async with OrchestrationClient(url=url, config=config) as client:
                with peak_growth() as growth, pytest.raises(OutcomeUnknownError) as failed:
                    await client.get_task("t1")
                peak = growth.peak
                await closed.wait()
                with pytest.raises(ConnectionLostError, match="too many small values"):
                    await client.get_task("t2")
            tg.cancel_scope.cancel()
    assert "too many small values" in str(failed.value)
    assert "2097" in str(failed.value)  # the frame's size, in bytes
    # Decoding would take some 70 times the frame's size. Refused unread, the process
    # holds a few copies of it: the client's chunks and their join, and (the server is
    # in this process too, and the peak is the process's RSS when the kernel lets it be
    # reset) the server's encoding of the frame and what it sends. CI saw 6.4 times.
    assert peak < 12 * len(_CRAFTED), f"the client took {peak} bytes ({growth.how})"


#: An event's data as the server sends it (the JSON it is stored as, beside the event):
#: 8 MiB of empty objects, some 230 MB once decoded (past the frame's budget of 64 MiB
#: plus 8 times its size).
_CRAFTED_DATA = b'{"a":[' + b"{}," * (2800 * 1024) + b"{}]}"


async def test_a_servers_event_data_of_small_values_is_refused_before_it_is_decoded(
    anyio_backend: str,
) -> None:
    # An event's data travels as JSON bytes beside it, decoded as the subscriber takes
    # the event: the frame's count saw bytes only, so 8 MiB of empty objects (some
    # 230 MB once decoded, 27 times the frame) passed it. The subscription ends with the
    # package's error saying why, nothing of the data decoded, and the connection is
    # dropped.
    closed = anyio.Event()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    event = Event(seq=1, type="task.created", timestamp=1.0, source="x")
    serve = partial(_crafted_server, events=[(event, _CRAFTED_DATA)], closed=closed)

    config = RuntimeConfig(remote_timeout=DEADLINE)
    with anyio.fail_after(2 * DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(serve, listener, {})
            url = f"hive://127.0.0.1:{port}"
            async with OrchestrationClient(url=url, config=config) as client:
                failed: HiveError | None = None
                with peak_growth() as growth:
                    async with client.subscribe("*") as events:
                        try:
                            await events.receive()  # the crafted event, or the refusal
                        except HiveError as exc:
                            failed = exc
                peak = growth.peak
                if failed is not None:
                    await closed.wait()
            tg.cancel_scope.cancel()
    assert failed is not None, f"the event was decoded: the client took {peak} bytes"
    assert "too many small values" in str(failed)
    # Decoded, 27 times the data; refused, a few copies of it in this process, which
    # holds the server too (its frame and its send) beside the client's chunks and join:
    # the bound is the small-values frame's, above.
    assert peak < 12 * len(_CRAFTED_DATA), f"the client took {peak} bytes ({growth.how})"


@pytest.mark.parametrize(
    "data",
    [b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"a": nope}'],
    ids=["nested too deeply", "not json"],
)
async def test_a_servers_unreadable_event_data_is_the_packages_error(
    anyio_backend: str, data: bytes
) -> None:
    # An event's data is decoded as the subscriber takes the event: data nested past
    # msgspec's limit raised RecursionError, and data that is no JSON msgspec's
    # DecodeError, out of the subscriber's loop. Now the package's error, saying so; the
    # next event is read as ever.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    bad = Event(seq=1, type="task.created", timestamp=1.0, source="x")
    good = Event(seq=2, type="task.created", timestamp=2.0, source="x")
    entries = [(bad, data), (good, b'{"b": 1}')]

    with anyio.fail_after(DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(partial(_crafted_server, events=entries), listener, {})
            async with (
                OrchestrationClient(url=f"hive://127.0.0.1:{port}") as client,
                client.subscribe("*") as events,
            ):
                with pytest.raises(HiveError, match="event 1's data cannot be read"):
                    await events.receive()
                after = await events.receive()
                assert isinstance(after, Event)
                assert (after.seq, after.data) == (2, {"b": 1})
            tg.cancel_scope.cancel()


async def test_a_servers_frame_over_the_clients_limit_is_refused_unread(anyio_backend: str) -> None:
    # A header announcing 600 MiB: refused as soon as it is read (the client reads at
    # most half of max_answer_bytes, 512 MiB: every value takes at least its bytes once
    # decoded), the call fails naming the limit, and the connection is dropped.
    closed = anyio.Event()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    answers = {"get_task": lambda i: struct.pack(">I", 600 * 1024 * 1024) + b"\x80" * 10}
    with anyio.fail_after(DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(partial(_crafted_server, closed=closed), listener, answers)
            async with OrchestrationClient(url=f"hive://127.0.0.1:{port}") as client:
                limit = r"over the limit of 268435456 \(half of max_answer_bytes"
                with pytest.raises(OutcomeUnknownError, match=limit):
                    await client.get_task("t1")
                await closed.wait()
            tg.cancel_scope.cancel()


async def test_what_one_server_frame_may_make_the_client_hold_is_max_answer_bytes(
    anyio_backend: str,
) -> None:
    # The frame's bytes and what its values decode into, together, within the client's
    # max_answer_bytes (16 MiB here; 512 MiB by default): 3 MiB of zeros (some 27 MiB
    # once decoded) is refused before it is decoded, although within 64 MiB + 8 times
    # its size, the only bound before (a 512 MiB frame could take 4.5 GB), and an
    # answer of 3 MiB of text (some 6 MiB in all) is not. The call fails with the
    # package's error naming the setting, and the connection is dropped.
    closed = anyio.Event()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    text = "x" * (3 * 1024 * 1024)
    zeros = msgspec.Raw(msgspec.msgpack.encode([0] * (3 * 1024 * 1024)))
    answers = {
        "get_task": lambda i: frame(Failure(i, "HiveError", text)),
        "get_run": lambda i: _body({"kind": "result", "id": i, "value": zeros}),
    }
    config = RuntimeConfig(remote_timeout=DEADLINE, max_answer_bytes=16 * 1024 * 1024)
    with anyio.fail_after(2 * DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(partial(_crafted_server, closed=closed), listener, answers)
            url = f"hive://127.0.0.1:{port}"
            async with OrchestrationClient(url=url, config=config) as client:
                with pytest.raises(HiveError) as answered:
                    await client.get_task("t1")
                assert str(answered.value) == text
                with pytest.raises(OutcomeUnknownError) as failed:
                    await client.get_run("r1")
                await closed.wait()
                with pytest.raises(ConnectionLostError, match="max_answer_bytes"):
                    await client.get_task("t2")
            tg.cancel_scope.cancel()
    assert "max_answer_bytes" in str(failed.value)
    assert "16777216" in str(failed.value)


async def test_a_servers_event_data_counts_within_max_answer_bytes(anyio_backend: str) -> None:
    # 3 MiB of empty objects as an event's JSON data: some 81 MiB once decoded, within
    # 64 MiB + 8 times its size (the only bound before), past the 16 MiB the client
    # may hold for one frame. Refused before it is decoded, naming the setting.
    closed = anyio.Event()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    event = Event(seq=1, type="task.created", timestamp=1.0, source="x")
    data = b"[" + b"{}," * (1024 * 1024) + b"{}]"
    serve = partial(_crafted_server, events=[(event, data)], closed=closed)
    config = RuntimeConfig(remote_timeout=DEADLINE, max_answer_bytes=16 * 1024 * 1024)
    with anyio.fail_after(2 * DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(serve, listener, {})
            url = f"hive://127.0.0.1:{port}"
            async with OrchestrationClient(url=url, config=config) as client:
                async with client.subscribe("*") as events:
                    with pytest.raises(HiveError, match="max_answer_bytes") as failed:
                        await events.receive()
                await closed.wait()
            tg.cancel_scope.cancel()
    assert "16777216" in str(failed.value)


@pytest.mark.parametrize(
    "welcome",
    [
        # A refusal of 1 MiB of small values (some 75 MB once decoded).
        _body(
            {
                "kind": "refused",
                "error": {
                    "kind": "failure",
                    "id": 0,
                    "type": "HiveError",
                    "message": "no",
                    "attrs": {"a": [{}] * (1024 * 1024)},
                },
            }
        ),
        # Not a frame: an HTTP server, say (its first bytes read as a length of 1.2 GB).
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
    ],
    ids=["a refusal of small values", "an http server"],
)
async def test_what_answers_a_hello_is_read_only_as_far_as_a_welcome_goes(
    anyio_backend: str, welcome: bytes
) -> None:
    # Before its welcome, the client reads a frame of at most 64 KiB: whatever answers
    # at the address is refused at the frame's header, with ConnectionLostError saying
    # it is no welcome of this protocol.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    with anyio.fail_after(DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(partial(_crafted_server, welcome=welcome), listener, {})
            tracemalloc.start()
            try:
                with pytest.raises(ConnectionLostError) as failed:
                    async with OrchestrationClient(url=f"hive://127.0.0.1:{port}"):
                        pass
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            tg.cancel_scope.cancel()
    assert "not a welcome of this protocol" in str(failed.value)
    assert "over the limit of 65536" in str(failed.value)
    assert peak < 1024 * 1024, f"the client took {peak} bytes"


# -- a client that breaks the protocol is told why ---------------------------------------


@pytest.mark.parametrize(
    ("sent", "refused_call"),
    [
        # A call naming more than 64 arguments: the call is answered, then the notice.
        (
            _body(
                {"kind": "call", "id": 3, "op": "get_task", "args": {f"a{n}": 1 for n in range(65)}}
            ),
            (3, "args", "length <= 64"),
        ),
        (_body({"kind": "call", "id": "three", "op": "get_task"}), None),
        (b"\x00\x00\x00\x01\xc1", None),  # not msgpack
        (struct.pack(">I", 64 * 1024 * 1024), None),  # over max_frame, unread
        (_call(1, "claim_task", worker_id="w", task_types=["none"], wait=5.0) * 2, None),
        (frame(Hello(PROTOCOL_VERSION)), None),  # a second hello
    ],
    ids=[
        "too many arguments",
        "an id that is no int",
        "not msgpack",
        "over max_frame",
        "a call id in use",
        "a second hello",
    ],
)
async def test_a_frame_that_breaks_the_protocol_is_answered_why_before_closing(
    db_path: str,
    anyio_backend: str,
    sent: bytes,
    refused_call: tuple[int, str, str] | None,
) -> None:
    # The server used to close the connection without a word: the client could only
    # say it lost the runtime. Now the call the frame opened (if its id could be read)
    # is answered InvalidInputError naming the field, then a failure of id 0 says why
    # the connection closes, then it closes. The server serves on.
    async with Runtime.open(db_path, config=RuntimeConfig(remote_timeout=60.0)) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address

        frames = await anyio.to_thread.run_sync(_frames_after, server.address, sent)
        assert await runtime.client().list_tasks() == []
    notice = frames[-1]
    assert isinstance(notice, Failure), frames
    assert (notice.id, notice.type) == (0, "HiveError")
    assert "closed the connection for a frame this client sent" in notice.message
    if refused_call is None:
        assert len(frames) == 1, frames
    else:
        call_id, field, reason = refused_call
        assert len(frames) == 2, frames
        refused = frames[0]
        assert isinstance(refused, Failure)
        assert (refused.id, refused.type, refused.attrs["field"]) == (
            call_id,
            "InvalidInputError",
            field,
        )
        assert reason in refused.message


async def test_the_client_that_broke_the_protocol_is_told_why_and_what_is_true(
    db_path: str, anyio_backend: str
) -> None:
    # A client's call the server cannot take as a frame (here 65 argument names, which
    # the Python client never sends for an operation): that call raises InvalidInputError
    # naming its field (nothing of it ran); a call in flight beside it, which the server
    # stops as it closes, raises OutcomeUnknownError saying why the connection closed;
    # a later call ConnectionLostError, the same. None of them says the runtime was lost.
    async with (
        Runtime.open(db_path, config=RuntimeConfig(remote_timeout=60.0)) as runtime,
        RemoteRuntime.connect(runtime._server.address or "") as remote,
    ):
        results: dict[str, BaseException] = {}

        async def waiting() -> None:
            with pytest.raises(OutcomeUnknownError) as failed:
                await remote.call(
                    "claim_task",
                    {"worker_id": "w", "task_types": ["none"], "wait": 20.0},
                    agent=None,
                    correlation=None,
                    returns=Any,
                )
            results["waiting"] = failed.value

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting)
                await _until(lambda: len(remote._pending) == 1)
                with pytest.raises(InvalidInputError) as refused:
                    await remote.call(
                        "get_task",
                        {f"a{n}": 1 for n in range(65)},
                        agent=None,
                        correlation=None,
                        returns=Any,
                    )
            with pytest.raises(ConnectionLostError) as later:
                await remote.call("last_seq", {}, agent=None, correlation=None, returns=int)
        assert await runtime.client().last_seq() == 0
    assert refused.value.field == "args"
    assert "length <= 64" in refused.value.reason
    for error in (results["waiting"], later.value):
        assert "closed the connection for a frame this client sent" in str(error)
        assert "length <= 64" in str(error)
        assert "lost the runtime" not in str(error)
    assert "may or may not have been applied" in str(results["waiting"])


# -- values nested too deeply to decode ---------------------------------------------------

#: A msgpack value nested 5 000 deep (arrays of one element): msgspec refuses it with a
#: RecursionError, not a DecodeError, whether it decodes it or skips it.
_DEEP = b"\x91" * 5_000 + b"\x90"


def _deep_body(message: dict[str, object]) -> bytes:
    """``message`` as one frame, with the None it ends with (its last field's value,
    or that value's last) replaced by a value nested too deeply."""
    body = msgspec.msgpack.encode(message)
    assert body.endswith(b"\xc0")
    body = body[:-1] + _DEEP
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "sent",
    [
        # Arguments that are no map, nested too deeply.
        _deep_body({"kind": "call", "id": 3, "op": "get_task", "args": None}),
        # A field no frame has, skipped by the decoder, nested too deeply.
        _deep_body({"kind": "call", "id": 4, "op": "get_task", "extra": None}),
    ],
    ids=["nested arguments", "a nested unknown field"],
)
async def test_a_frame_nested_too_deeply_is_answered_why_and_the_server_serves_on(
    db_path: str, anyio_backend: str, sent: bytes
) -> None:
    # msgspec raises RecursionError for a value nested past its limit, whether it
    # decodes or skips it: the server took it for no frame error, and the connection's
    # task died of it (the peer was told nothing). The call's id cannot be read (the
    # head is read by skipping the rest), so only the connection's notice comes.
    async with Runtime.open(db_path, config=RuntimeConfig(remote_timeout=60.0)) as runtime:
        server = runtime._server
        assert server is not None
        assert server.address

        frames = await anyio.to_thread.run_sync(_frames_after, server.address, sent)
        assert await runtime.client().list_tasks() == []
        # Another connection is served as before.
        async with RemoteRuntime.connect(server.address) as remote:
            listed = await remote.call("list_tasks", {}, agent=None, correlation=None, returns=Any)
        assert listed == []
    notice = frames[-1]
    assert isinstance(notice, Failure), frames
    assert (notice.id, notice.type) == (0, "HiveError")
    assert "not a frame of this protocol" in notice.message
    assert len(frames) == 1, frames


@pytest.mark.parametrize(
    "answer",
    [
        lambda i: _deep_body(
            {"kind": "failure", "id": i, "type": "HiveError", "message": "x", "attrs": {"a": None}}
        ),
        lambda i: _deep_body({"kind": "result", "id": i, "value": None}),
    ],
    ids=["failure attributes", "a result"],
)
async def test_a_servers_frame_nested_too_deeply_fails_the_call_not_the_client(
    anyio_backend: str, answer: Callable[[int], bytes]
) -> None:
    # A hostile server's answer nested too deeply: the call fails with the package's
    # error (the frame decoded as the reader reads it, or the value as the call
    # decodes it), the client never raises RecursionError out of its block.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    with anyio.fail_after(DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(_crafted_server, listener, {"get_task": answer})
            async with OrchestrationClient(url=f"hive://127.0.0.1:{port}") as client:
                with pytest.raises(HiveError, match="nested too deeply"):
                    await client.get_task("t1")
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("idle", [0.0, -1.0])
async def test_a_servers_idle_limit_of_nothing_does_not_make_the_client_ping_without_pause(
    anyio_backend: str, idle: float
) -> None:
    # The client pings at a quarter of the idle limit the welcome says: a welcome of
    # idle 0 (or less) made it ping in a loop with no pause, as fast as the socket took
    # the pings, its event loop busy with nothing else. It pings at most ten times a
    # second whatever the welcome says (a server's real limit is seconds).
    pings = 0
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)

    async def serve(stream: Any) -> None:
        nonlocal pings
        reader = FrameReader(stream, ClientFrame, 1 << 20)
        async with stream:
            try:
                while True:
                    message = await reader.read()
                    if isinstance(message, Hello):
                        hello = Welcome(
                            PROTOCOL_VERSION, 1, "/nowhere", 1 << 20, 8, 100, "error", idle=idle
                        )
                        await stream.send(frame(hello))
                    elif isinstance(message, Ping):
                        pings += 1
                        await stream.send(frame(Pong(message.nonce)))
            except (anyio.EndOfStream, anyio.BrokenResourceError, FrameError):
                pass

    with anyio.fail_after(DEADLINE):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            async with OrchestrationClient(url=f"hive://127.0.0.1:{port}"):
                await anyio.sleep(1.0)
            tg.cancel_scope.cancel()
    assert pings <= 12, f"{pings} pings in a second"
