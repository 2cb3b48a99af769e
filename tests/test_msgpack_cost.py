"""What a msgpack value costs once decoded, counted before decoding it
(hive_orchestration/api/msgpack_cost.py): never much under what decoding takes, for any
shape, and the walk stops once over its budget."""

from __future__ import annotations

import tracemalloc

import msgspec
import pytest

from hive_orchestration.api.msgpack_cost import MOST_PER_BYTE, decoded_cost, walk
from hive_orchestration.api.wire import msgpack_arguments
from hive_orchestration.errors import InvalidInputError

SHAPES: dict[str, object] = {
    "empty maps": [{}] * 20_000,
    "empty arrays": [[]] * 20_000,
    "one-entry maps": [{i: i} for i in range(10_000)],
    "small maps": [{"a": i, "bc": [i, -i], "d": None} for i in range(10_000)],
    "a big map": {str(i): i for i in range(20_000)},
    "tasks": [{"task_type": "build", "payload": {"n": i, "x": 1.5}} for i in range(5_000)],
    "ints": list(range(-40_000, 40_000, 3)),
    "floats": [i / 3 for i in range(20_000)],
    "strings": [f"s{i}" * (i % 7) for i in range(20_000)],
    "binaries": [b"xy" * (i % 50) for i in range(5_000)],
    "ext": [msgspec.msgpack.Ext(1, b"x" * (i % 20)) for i in range(5_000)],
    "deep": [[[[[[{"k": [1]}]]]]]] * 2_000,
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_the_count_is_never_under_what_decoding_takes_nor_far_over(shape: str) -> None:
    data = msgspec.msgpack.encode(SHAPES[shape])
    counted = walk(data, 1 << 62)
    tracemalloc.start()
    try:
        decoded = msgspec.msgpack.decode(data)
        taken = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del decoded
    assert taken <= counted <= 3 * taken + 1024, (taken, counted)
    assert counted <= MOST_PER_BYTE * len(data)


def test_the_walk_stops_once_over_its_budget() -> None:
    # A million arrays each in the one before: the count grows 72 bytes a byte.
    data = b"\x91" * 1_000_000 + b"\xc0"
    assert 100_000 < decoded_cost(data, 100_000) <= 100_000 + 72
    # An array of a million values is over at its header.
    assert decoded_cost(msgspec.msgpack.encode([{}] * 1_000_000), 100_000) > 8_000_000
    # Small enough that no shape could pass the budget: not walked, its most counted.
    assert decoded_cost(data[:1000], 1000 * MOST_PER_BYTE) == 1000 * MOST_PER_BYTE


@pytest.mark.parametrize(
    "data",
    [b"", b"\xdd\xff\xff\xff\xff", b"\x92\x01", b"\xdb\x00\x00\x10", b"\xc1", b"\xc7"],
    ids=["empty", "a huge array announced", "an array cut short", "a string cut", "c1", "ext"],
)
def test_a_malformed_value_is_counted_as_far_as_it_goes(data: bytes) -> None:
    # Decoding it then fails (msgspec's own error); the count only must not.
    assert walk(data, 1 << 20) <= 1 << 10
    with pytest.raises(msgspec.DecodeError):
        msgspec.msgpack.decode(data)


@pytest.mark.parametrize(
    "item", [{"": 0}, {"": []}, [], {}, {"": {"": 0}}, 0.5], ids=lambda item: repr(item)
)
def test_a_payload_at_its_size_limit_is_never_refused_for_its_shape(item: object) -> None:
    # As many of the item as a payload of max_payload_bytes (1 MiB as JSON) holds: the
    # shapes with the most objects a byte. The arguments pass the decoded budget.
    one = len(msgspec.json.encode(item)) + 1
    payload = {"v": [item] * ((1024 * 1024 - 10) // one)}
    assert len(msgspec.json.encode(payload)) <= 1024 * 1024
    args = {
        "task_type": msgspec.Raw(msgspec.msgpack.encode("t")),
        "payload": msgspec.Raw(msgspec.msgpack.encode(payload)),
    }
    assert msgpack_arguments("create_task", args)["payload"] == payload


def test_arguments_over_the_budget_are_refused_on_the_argument() -> None:
    args = {
        "task_type": msgspec.Raw(msgspec.msgpack.encode("t")),
        "payload": msgspec.Raw(msgspec.msgpack.encode({"v": [{}] * 2_000_000})),
    }
    with pytest.raises(InvalidInputError, match="too many small values") as refused:
        msgpack_arguments("create_task", args)
    assert refused.value.field == "payload"
