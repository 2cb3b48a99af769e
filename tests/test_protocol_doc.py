"""docs/PROTOCOL.md against the code: its example frames are decoded with the real
decoder and sent to a real runtime, whose answers must be the page's bytes; its lists of
frames, fields, operations and error attributes must be the code's."""

from __future__ import annotations

import re
import socket
import struct
import typing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hive_orchestration import Runtime, errors
from hive_orchestration.api.wire import OPERATIONS
from hive_orchestration.remote.address import connect_path
from hive_orchestration.remote.protocol import (
    Call,
    ClientFrame,
    Failure,
    Hello,
    Result,
    ServerFrame,
    Welcome,
    encode_error,
)

PAGE = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
DEADLINE = 30.0

#: Each example of the page: the map it shows, and the frame the real decoder must make.
EXAMPLES: dict[str, tuple[dict[str, Any], Any, msgspec.Struct]] = {
    "hello": ({"kind": "hello", "version": 1}, ClientFrame, Hello(version=1)),
    "call-get-task": (
        {"kind": "call", "id": 1, "op": "get_task", "args": {"task_id": "t1"}},
        ClientFrame,
        Call(1, "get_task", {"task_id": msgspec.Raw(msgspec.msgpack.encode("t1"))}),
    ),
    "call-cancel-task": (
        {"kind": "call", "id": 2, "op": "cancel_task", "args": {"task_id": "no-such-task"}},
        ClientFrame,
        Call(2, "cancel_task", {"task_id": msgspec.Raw(msgspec.msgpack.encode("no-such-task"))}),
    ),
    "result": (
        {"kind": "result", "id": 1, "value": None},
        ServerFrame,
        Result(1, msgspec.Raw(msgspec.msgpack.encode(None))),
    ),
    "failure": (
        {
            "kind": "failure",
            "id": 2,
            "type": "NotFoundError",
            "message": "task 'no-such-task' not found",
            "attrs": {"kind": "task", "id": "no-such-task"},
        },
        ServerFrame,
        Failure(
            2,
            "NotFoundError",
            "task 'no-such-task' not found",
            {"kind": "task", "id": "no-such-task"},
        ),
    ),
}


def _example(name: str) -> bytes:
    found = re.search(rf"<!-- frame: {name} -->\n```text\n(.*?)```", PAGE, re.DOTALL)
    assert found, f"no example {name!r} on the page"
    return bytes.fromhex(found.group(1))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_is_the_frame_it_says(name: str) -> None:
    shown, kind, decoded = EXAMPLES[name]
    data = _example(name)
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    # The bytes are the msgpack of the map the page shows, in its order...
    assert data[4:] == msgspec.msgpack.encode(shown)
    # ... and the real decoder reads them as the frame the page says.
    assert msgspec.msgpack.decode(data[4:], type=kind) == decoded


@pytest.mark.anyio
async def test_the_examples_are_what_a_real_runtime_answers(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        assert runtime._server is not None
        address = connect_path(runtime._server.address or "")

        def talk() -> tuple[object, set[bytes]]:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(DEADLINE)
                sock.connect(address)
                sock.sendall(_example("hello"))
                welcome = msgspec.msgpack.decode(_frame(sock)[4:], type=ServerFrame)
                sock.sendall(_example("call-get-task") + _example("call-cancel-task"))
                return welcome, {_frame(sock), _frame(sock)}

        # Blocking socket calls in a thread: the runtime's loop is this one.
        welcome, answers = await anyio.to_thread.run_sync(talk)
    assert isinstance(welcome, Welcome)
    assert answers == {_example("result"), _example("failure")}


def _frame(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        need = 4 - len(data) if len(data) < 4 else 4 + struct.unpack(">I", data[:4])[0] - len(data)
        chunk = sock.recv(need)
        assert chunk, "the runtime closed the connection"
        data += chunk
    return data


def test_every_frame_and_field_is_on_the_page() -> None:
    for union in (ClientFrame, ServerFrame):
        for cls in typing.get_args(union):
            info = msgspec.inspect.type_info(cls)
            assert f"`{info.tag}`" in PAGE, info.tag
            for field in info.fields:
                assert f"`{field.encode_name}`" in PAGE, (info.tag, field.encode_name)


def test_the_operations_on_the_page_are_the_served_ones() -> None:
    start, end = PAGE.index("exactly\nthose `call_json` takes:"), PAGE.index("The [API reference]")
    listed = PAGE[start:end]
    assert set(re.findall(r"`([a-z_]+)`", listed)) - {"call_json"} == OPERATIONS


#: One of each error the page lists, to compare its attributes on the wire with the page.
ERRORS: list[errors.HiveError] = [
    errors.InvalidInputError("field", "reason"),
    errors.ConfigError("field", "reason"),
    errors.NotFoundError("task", "t1"),
    errors.IllegalTransitionError("task", "t1", "queued", "completed"),
    errors.LeaseLostError("t1", "r1", 1, "queued", "expired"),
    errors.AccessDeniedError("delete_task", "an agent may not"),
    errors.RequestTimeoutError("tasks", "GetTask", 5.0),
    errors.ActorFailedError("tasks", RuntimeError("boom")),
    errors.RuntimeFailedError("tasks", 3, 60.0, RuntimeError("boom")),
    errors.RuntimeStoppedError("stopping"),
    errors.StorageError("disk full", path="/x.db", fault="disk_full"),
    errors.NewerSchemaError("/x.db", 9, 7),
    errors.SubscriberLaggedError(42),
    errors.EventsTrimmedError(3, 10),
    errors.ConnectionLostError("too many"),
    errors.HiveError("anything"),
]


def test_the_error_table_is_what_the_server_sends() -> None:
    table = PAGE[
        PAGE.index("| `type` | `attrs` | when |") : PAGE.index("A client that does not know")
    ]
    rows = {
        match.group(1): set(re.findall(r"`([a-z_]+)`", match.group(2)))
        for match in re.finditer(r"^\| `(\w+)` \|([^|]*)\|", table, re.MULTILINE)
        if match.group(1) != "type"
    }
    assert set(rows) == {type(error).__name__ for error in ERRORS}
    for error in ERRORS:
        assert set(encode_error(0, error).attrs) == rows[type(error).__name__], error
