"""What a JSON value costs once decoded, counted before decoding it
(hive_orchestration/api/json_cost.py): never under what decoding takes, for any shape,
nor for garbage after a valid beginning (decoding builds that beginning before it fails);
never much over; and linear on any text."""

from __future__ import annotations

import tracemalloc

import msgspec
import pytest

from hive_orchestration.api.json_cost import MOST_PER_BYTE, decoded_cost, exact_cost, rough_cost

SHAPES: dict[str, object] = {
    "empty maps": [{}] * 20_000,
    "empty arrays": [[]] * 20_000,
    # Each grown to 4 slots as the decoder reads it (88 bytes, not 64).
    "arrays of one element": [[0]] * 20_000,
    "arrays of nine elements": [[0] * 9] * 5_000,
    "a long array": [[0] * 100_000],
    "one-entry maps": [{str(i): i} for i in range(10_000)],
    "maps of an empty key": [{"": 0}] * 10_000,
    "maps in maps": [{"": {"": {"": {}}}}] * 5_000,
    "small maps": [{"a": i, "bc": [i, -i], "d": None} for i in range(10_000)],
    "a big map": {str(i): i for i in range(20_000)},
    "tasks": [{"task_type": "build", "payload": {"n": i, "x": 1.5}} for i in range(5_000)],
    "records": [
        {"id": f"id-{i}", "name": "x" * 20, "tags": ["a", "b"], "n": i * 1000, "ok": True}
        for i in range(5_000)
    ],
    "ints": list(range(-40_000, 40_000, 3)),
    "small ints": [i % 10 for i in range(40_000)],
    "negative ints": [-(i % 10) for i in range(40_000)],
    "big ints": [2**63 + i for i in range(10_000)],
    # Past 64 bits an int takes 4 bytes a 9 digits: 468 bytes for 1 000 digits.
    "huge ints": [10**999 + i for i in range(300)],
    "floats": [i / 3 for i in range(20_000)],
    "strings": [f"s{i}" * (i % 7) for i in range(20_000)],
    "one-character strings": ["a"] * 20_000,
    "literals": [True, False, None] * 10_000,
    "text past U+FFFF": ["a" * 50 + "\U0001f600"] * 2_000,
    "deep": [[[[[[{"k": [1]}]]]]]] * 2_000,
    "brackets in strings": ["{[{[:,:,]}]}" * 10] * 2_000,
}


def _taken(data: bytes) -> int:
    """The bytes the decoded value holds, by tracemalloc."""
    tracemalloc.start()
    try:
        decoded = msgspec.json.decode(data)
        taken = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del decoded
    return taken


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_the_count_is_never_under_what_decoding_takes_nor_far_over(shape: str) -> None:
    data = msgspec.json.encode(SHAPES[shape])
    taken = _taken(data)
    exact = exact_cost(data)
    assert taken <= exact <= 3 * taken + 1024, (taken, exact)
    assert taken <= rough_cost(data)
    assert exact <= MOST_PER_BYTE * len(data)


def test_escaped_text_and_whitespace_are_counted_as_what_they_decode_into() -> None:
    # A \u escape may make a whole string four bytes a character; whitespace is nothing.
    data = msgspec.json.encode([["a" * 50 + "\\ud83d\\ude00"]] * 2_000).replace(b"\\\\", b"\\")
    spaced = msgspec.json.format(msgspec.json.encode(SHAPES["small maps"]), indent=4)
    for text in (data, spaced):
        taken = _taken(text)
        assert taken <= exact_cost(text) <= 3 * taken + 1024
        assert taken <= rough_cost(text)


def test_empty_strings_are_counted_as_strings() -> None:
    # The one shape counted far over: CPython shares the empty string, counted as any
    # other (49 bytes). Four MiB of them is still within a request's budget.
    data = msgspec.json.encode([""] * 20_000)
    taken = _taken(data)
    assert taken <= exact_cost(data) <= 10 * taken
    assert exact_cost(data) <= 24 * len(data)


_GARBAGE = [b"true" * 5_000, b'""' * 5_000, b"}" * 5_000, b":" * 5_000, b"," * 5_000, b"x"]


@pytest.mark.parametrize("shape", ["empty maps", "ints", "maps in maps", "records", "strings"])
@pytest.mark.parametrize("garbage", _GARBAGE, ids=["true", "quotes", "}", ":", ",", "x"])
def test_garbage_after_a_valid_beginning_is_never_counted_under_it(
    shape: str, garbage: bytes
) -> None:
    # Decoding builds the beginning, then fails on the garbage: what it held at its peak
    # is under the count of the whole text, whatever follows the beginning.
    whole = msgspec.json.encode(SHAPES[shape])
    data = whole[:-1] + b"," + garbage  # the array left open, then garbage
    tracemalloc.start()
    try:
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= exact_cost(data), (peak, exact_cost(data))
    assert peak <= rough_cost(data)


@pytest.mark.parametrize(
    "data",
    [
        b'"' + b'\\"' * 500_000,  # one string never closed, of escaped quotes
        b'["' + b'\\"' * 500_000,
        b'"\\' * 500_000,
        b"[" * 1_000_000,
    ],
    ids=["escaped quotes", "in an array", "backslashes", "open arrays"],
)
def test_any_text_is_counted_in_one_pass(data: bytes) -> None:
    # A search for strings that backtracked from every quote would take hours here.
    assert exact_cost(data) >= 0
    assert decoded_cost(data, 0) > 0


def test_a_small_value_is_not_looked_at_and_a_large_one_only_as_needed() -> None:
    data = msgspec.json.encode(SHAPES["records"])
    most = MOST_PER_BYTE * len(data)
    assert decoded_cost(data, most) == most
    # Past what it could take: the rough count if within the budget, else the exact one.
    rough, exact = rough_cost(data), exact_cost(data)
    assert exact < rough < most
    assert decoded_cost(data, rough) == rough
    assert decoded_cost(data, rough - 1) == exact
