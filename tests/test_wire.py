"""The JSON entry point (``hive_orchestration.api.wire.call_json``): a task's whole life from
JSON requests, and each kind of malformed request refused by name. Its fuzzing is in
``tests/reliability/test_fuzz.py``."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hive_orchestration import InvalidInputError, OrchestrationClient, RuntimeConfig
from hive_orchestration.api import wire
from hive_orchestration.api.wire import _UNCOUNTED_REQUEST, OPERATIONS, call_json

pytestmark = pytest.mark.anyio


def request(op: str, **args: object) -> bytes:
    return msgspec.json.encode({"op": op, "args": args})


def _padded(raw: bytes | str) -> bytes | str:
    """``raw`` with whitespace after it, long enough that call_json counts what its
    arguments would take before decoding them (a request of at most 1 MiB is read at
    once: nothing that small can take too much)."""
    pad = _UNCOUNTED_REQUEST + 1 - len(raw)
    return raw + (" " if isinstance(raw, str) else b" ") * max(0, pad)


@pytest.fixture(params=[False, True], ids=["small", "counted"])
def sent(request: pytest.FixtureRequest) -> Any:
    """Each request as it is (read at once), or padded (counted first): the same
    answers, the same refusals."""
    return _padded if request.param else lambda raw: raw


async def test_a_task_through_its_life_in_json(sent: Any) -> None:
    async def call_json(client: OrchestrationClient, raw: bytes | str) -> bytes:
        return await wire.call_json(client, sent(raw))

    async with OrchestrationClient(":memory:", source_agent="gateway") as client:
        created = await call_json(
            client,
            request("create_task", task_type="build", payload={"ref": "main"}, priority=5),
        )
        task_id = msgspec.json.decode(created)
        claim = msgspec.json.decode(await call_json(client, request("claim_task", worker_id="w1")))
        assert claim["task"]["id"] == task_id
        lease = claim["lease"]  # sent back as the object it came as
        await call_json(client, request("start_task", lease=lease))
        await call_json(client, request("heartbeat", lease=lease, progress={"half": True}))
        done = msgspec.json.decode(
            await call_json(client, request("complete_task", lease=lease, result={"ok": True}))
        )
        assert done["status"] == "completed"
        assert done["result"] == {"ok": True}
        # Text works as well as bytes, and args may be left out.
        assert msgspec.json.decode(await call_json(client, '{"op": "last_seq"}')) > 0
        assert await call_json(client, request("get_task", task_id="nope")) == b"null"


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b"", "request", "not valid JSON"),
        (b"[1]", "request", "Expected `object`"),
        (b"\xff", "request", "not valid JSON"),
        (b"[" * 100_000, "request", ""),
        ('{"op": "\ud800"}', "request", "lone surrogate"),
        (b'{"args": {}}', "op", "missing required field"),
        (b'{"op": 1}', "op", "Expected `str`"),
        (b'{"op": "get_task", "extra": 1}', "request", "unknown field `extra`"),
        (b'{"op": "subscribe"}', "op", "unknown operation"),
        (b'{"op": "drop_database"}', "op", "unknown operation"),
        (b'{"op": "get_task", "args": []}', "args", "Expected `object`"),
        (b'{"op": "get_task"}', "task_id", "is required"),
        (b'{"op": "get_task", "args": {"task_id": "a", "b": 1}}', "b", "not an argument"),
        # A name that is not UTF-8: a large request's count skipped its text (msgspec
        # checks a string's UTF-8 as it decodes it) and its read of the names raised
        # msgspec's DecodeError (the wire fuzz, once, on a request of 1.1 MB).
        (b'{"op": "get_task", "args": {"task_id": "a", "\xffb": 1}}', "request", "not valid"),
        (b'{"op": "get_task", "args": {"task_id": 5}}', "task_id", "must be a string"),
        (b'{"op": "start_task", "args": {"lease": {"task_id": 1}}}', "lease.task_id", ""),
        (b'{"op": "start_task", "args": {"lease": {"task_id": "a"}}}', "lease.run_id", ""),
        (b'{"op": "create_task", "args": {"task_type": "a", "timeout": 1e999}}', "timeout", ""),
        (
            b'{"op": "create_task", "args": {"task_type": "a", "due_date": "2030-01-01T00:00:00"}}',
            "due_date",
            "timezone-aware",
        ),
        (
            b'{"op": "create_task", "args": {"task_type": "a", "priority": ' + b"9" * 5000 + b"}}",
            "priority",
            "out of range",
        ),
    ],
)
async def test_a_malformed_request_is_refused_by_name(
    raw: bytes | str, field: str, reason: str, sent: Any
) -> None:
    async with OrchestrationClient(":memory:") as client:
        with pytest.raises(InvalidInputError) as refused:
            await call_json(client, sent(raw))
        assert refused.value.field == field
        assert reason in refused.value.reason
        assert await client.last_seq() == 0  # nothing was written


#: Requests of each kind of argument (a string, numbers, an object holding a list of
#: every kind of value, a lease), for a change anywhere in them.
_CHANGED = (
    request("get_task", task_id="abc"),
    request("create_task", task_type="t", payload={"k": [1, -2.5, True, None, "s"]}, priority=3),
    request("start_task", lease={"task_id": "a", "run_id": "b", "attempt": 1, "secret": "c"}),
)


def _read(raw: bytes) -> object:
    """What call_json makes of ``raw`` before it runs anything: the operation and its
    arguments decoded, or the field its InvalidInputError names (any other error
    raised: a leak)."""
    try:
        return wire._read_request(raw)
    except InvalidInputError as refused:
        return refused.field


@settings(max_examples=200, deadline=None, database=None)
@given(
    raw=st.sampled_from(_CHANGED),
    where=st.floats(0.0, 1.0, exclude_max=True),
    byte=st.one_of(st.sampled_from(b'\x00\x80\xff"\\{}[]:,-.0e'), st.integers(0, 255)),
    how=st.sampled_from(["changed", "inserted", "cut"]),
)
def test_a_request_read_as_a_large_one_reads_as_a_small_one_whatever_changed(
    raw: bytes, where: float, byte: int, how: str
) -> None:
    """A request over 1 MiB is read by another path (its arguments counted before they
    are decoded: _counted_request) than a small one: with one byte changed, inserted or
    cut anywhere in its operation, names and arguments, it reads the same, or is refused
    on the same field, or on ``request`` for text that is not JSON further on (a small
    request is decoded whole and refused at its first fault: ``"args": ""lease"...``
    on ``args``, not an object). The wire fuzz seldom makes a request that large, and
    then changes a byte of its large value, where this changes the rest. Each request is
    read both ways as it is, the large way by lowering the size that takes it (3 ms a
    read of a padded MiB: the sent fixture's padded requests read it for real)."""
    at = int(where * len(raw))
    if how == "changed":
        changed = raw[:at] + bytes([byte]) + raw[at + 1 :]
    elif how == "inserted":
        changed = raw[:at] + bytes([byte]) + raw[at:]
    else:
        changed = raw[:at]
    small = _read(changed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "_UNCOUNTED_REQUEST", 0)
        counted = _read(changed)
    if counted != small:
        # Refused for text that is not JSON, and the small one at a fault before it.
        assert isinstance(small, str)
        assert counted == "request"
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(changed)


def test_the_operations_are_the_clients_json_ones() -> None:
    assert {"create_task", "claim_task", "complete_task", "wait_for_plan"} <= OPERATIONS
    assert not {"subscribe", "events", "on_event", "attach", "bind"} & OPERATIONS
    assert not {"publish_event", "aclose_callbacks", "subscribe_to_task_events"} & OPERATIONS


MiB = 1024 * 1024


def _create_task_with_items(count: int) -> bytes:
    """A create_task request whose payload is a list of ``count`` zeros."""
    head = b'{"op": "create_task", "args": {"task_type": "t", "payload": {"items": ['
    return head + b"0," * (count - 1) + b"0]}}}"


async def _refused_unread(client: OrchestrationClient, raw: bytes | str) -> InvalidInputError:
    """Refused, with no more memory than a fraction of the 4 MiB request limit: the
    request was not decoded (a 40 MiB request of small values decodes into gigabytes)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError) as refused:
            await call_json(client, raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB, f"the refusal allocated {peak} bytes"
    return refused.value


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _create_task_with_items(20 * MiB), id="bytes-of-small-values"),
        pytest.param(lambda: _create_task_with_items(20 * MiB).decode(), id="text-of-small-values"),
        pytest.param(
            lambda: b'{"op": "create_task", "args": {"task_type": "' + b"t" * 40 * MiB + b'"}}',
            id="one-huge-string",
        ),
        pytest.param(lambda: b"[" * (40 * MiB), id="not-even-json"),
    ],
)
async def test_an_oversized_request_is_refused_before_it_is_decoded(make: Any) -> None:
    raw = make()
    assert len(raw) >= 40 * MiB
    async with OrchestrationClient(":memory:") as client:
        error = await _refused_unread(client, raw)
        assert error.field == "request"
        assert "max_request_bytes" in error.reason
        assert str(4 * MiB) in error.reason
        assert await client.last_seq() == 0  # nothing was written
        # The runtime goes on: the next request is served.
        assert msgspec.json.decode(await call_json(client, request("create_task", task_type="t")))


async def test_the_request_limit_is_the_configs_and_a_request_within_it_is_served() -> None:
    config = RuntimeConfig(max_request_bytes=64 * 1024, max_payload_bytes=64 * 1024)
    raw = _create_task_with_items(20_000)  # 40 kB
    async with OrchestrationClient(":memory:", config=config) as client:
        task_id = msgspec.json.decode(await call_json(client, raw))
        task = await client.get_task(task_id)
        assert task is not None
        assert len(task.payload["items"]) == 20_000
        # Text is measured in bytes: 40 000 characters of two bytes each are over.
        wide = request("create_task", task_type="t", payload={"s": "é" * 40_000}).decode()
        assert len(wide) < 64 * 1024 < len(wide.encode())
        error = await _refused_unread(client, wide)
        assert error.field == "request"
        assert "65536" in error.reason
        over = _create_task_with_items(40_000)  # 80 kB
        assert (await _refused_unread(client, over)).field == "request"
        assert await client.last_seq() == 1  # the one task.created


# -- what a request may make the runtime allocate ------------------------------------------

#: Empty maps in a request just under 4 MiB: three bytes each (``{},``), 72 bytes of
#: Python objects once decoded (some 90 MB all told, before the fix).
_SMALL_VALUES = 1_300_000


@pytest.mark.parametrize(
    ("op", "args", "field"),
    [
        ("create_tasks", {"tasks": [{}] * _SMALL_VALUES}, "tasks"),
        ("create_task", {"task_type": "t", "payload": {"a": [{}] * _SMALL_VALUES}}, "payload"),
        ("publish", {"event_type": "app.x", "data": {"a": [{}] * _SMALL_VALUES}}, "data"),
        ("create_execution_plan", {"plan_data": {"subtasks": [{}] * _SMALL_VALUES}}, "plan_data"),
    ],
    ids=["create_tasks", "create_task payload", "publish data", "plan subtasks"],
)
async def test_a_request_of_small_values_is_refused_before_it_is_decoded(
    op: str, args: dict[str, object], field: str
) -> None:
    # Within max_request_bytes, but its arguments would take some 25 times their size
    # once decoded: refused on the argument, with a few copies of the request's bytes
    # at most (where decoding took 25 times them), nothing written; the next is served.
    raw = request(op, **args)
    assert 3 * MiB < len(raw) < 4 * MiB
    async with OrchestrationClient(":memory:") as client:
        tracemalloc.start()
        try:
            with pytest.raises(InvalidInputError) as refused:
                await call_json(client, raw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * len(raw), f"the refusal allocated {peak} bytes for {len(raw)}"
        assert refused.value.field == field
        assert "too many small values" in refused.value.reason
        assert await client.last_seq() == 0
        assert msgspec.json.decode(await call_json(client, request("create_task", task_type="t")))


async def test_a_request_of_many_names_is_refused_at_the_first_unknown_one() -> None:
    # A map of 300 000 argument names would take some 15 times the request once decoded
    # (a name, a view of its value and an entry each): the first that is not one of the
    # operation's is refused, before the next is read.
    names = {f"k{n}": 0 for n in range(300_000)}
    raw = msgspec.json.encode({"op": "get_task", "args": {"task_id": "t", **names}})
    assert 3 * MiB < len(raw) < 4 * MiB
    async with OrchestrationClient(":memory:") as client:
        tracemalloc.start()
        try:
            with pytest.raises(InvalidInputError) as refused:
                await call_json(client, raw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < MiB, f"the refusal allocated {peak} bytes"
    assert refused.value.field == "k0"
    assert "is not an argument of get_task" in refused.value.reason


@pytest.mark.parametrize(
    "item", [{"": 0}, {"": []}, [], {}, {"": {"": 0}}, 0.5], ids=lambda item: repr(item)
)
async def test_a_payload_at_its_size_limit_is_never_refused_for_its_shape(item: object) -> None:
    # As many of the item as a payload of max_payload_bytes (1 MiB as JSON) holds: the
    # shapes with the most objects a byte, in a request counted before it is decoded.
    one = len(msgspec.json.encode(item)) + 1
    payload = {"v": [item] * ((MiB - 10) // one)}
    raw = request("create_task", task_type="t", payload=payload)
    assert len(raw) > _UNCOUNTED_REQUEST
    async with OrchestrationClient(":memory:") as client:
        task = await client.get_task(msgspec.json.decode(await call_json(client, raw)))
        assert task is not None
        assert task.payload == payload


async def test_a_large_batch_is_served_whole() -> None:
    # A thousand tasks of 3.5 kB each: counted before it is decoded, well within budget.
    tasks = [{"task_type": "t", "payload": {"n": n, "text": "x" * 3500}} for n in range(1000)]
    raw = request("create_tasks", tasks=tasks)
    assert 3 * MiB < len(raw) < 4 * MiB
    async with OrchestrationClient(":memory:") as client:
        ids = msgspec.json.decode(await call_json(client, raw))
        assert len(ids) == 1000
        assert await client.count_tasks() == {"queued": 1000}
