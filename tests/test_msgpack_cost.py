"""What a msgpack value costs once decoded, counted before decoding it
(hive_orchestration/api/msgpack_cost.py): never much under what decoding takes, for any
shape, and the walk stops once over its budget."""

from __future__ import annotations

import tracemalloc
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hive_orchestration.api import msgpack_cost
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


# -- runs counted at once ---------------------------------------------------------------------

#: Scalars of every encoding (fixint, negative fixint, int and uint of each size, float,
#: nil, booleans), and the one-byte containers and strings.
_SCALARS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, 127, -1, -32, 128, 255, -33, -128, 65535, -32768, 2**32, -(2**40)]),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.sampled_from(["", b"", (), {}]),
    st.text(max_size=3),
    st.binary(max_size=3),
)


def _runs(scalar: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    """Long lists of one scalar kind, or of a mix, as runs are found in."""
    return st.one_of(
        st.lists(scalar, min_size=14, max_size=70),
        scalar.flatmap(lambda value: st.integers(14, 70).map(lambda n: [value] * n)),
    )


_VALUES = st.recursive(
    _SCALARS | _runs(_SCALARS),
    lambda inner: st.one_of(
        st.lists(inner, max_size=20),
        st.dictionaries(st.integers(0, 40) | st.text(max_size=2), inner, max_size=20),
    ),
    max_leaves=50,
)


def _step_by_step(data: bytes, budget: int) -> int:
    """The walk with no run counted at once: every value a step."""
    saved = msgpack_cost._RUN_FROM
    msgpack_cost._RUN_FROM = 1 << 62
    try:
        return walk(data, budget)
    finally:
        msgpack_cost._RUN_FROM = saved


def _in_slices(data: bytes, budget: int, size: int) -> int:
    """The walk in slices of ``size`` bytes, as :func:`decoded_cost_paced` walks it."""
    view = memoryview(data)
    pos, cost, pending = 0, 0, 1
    while True:
        pos, cost, pending = msgpack_cost._walk(
            view, pos, cost, pending, budget, min(len(view), pos + size)
        )
        if not pending or pos >= len(view) or cost > budget:
            return cost


@settings(max_examples=150, deadline=None)
@given(
    value=_VALUES,
    cut=st.integers(0, 200),
    budget=st.integers(0, 200_000),
    slice_size=st.integers(1, 64),
)
def test_runs_counted_at_once_count_what_the_steps_count(
    value: object, cut: int, budget: int, slice_size: int
) -> None:
    # Whole or cut short, within the budget or not, in one go or in slices (a slice may
    # end inside a run, which the next one takes up): a run counted at once gives the
    # count of its values one by one, and is over the budget exactly when they are.
    data = msgspec.msgpack.encode(value)
    for each in (data, data[: max(0, len(data) - cut)]):
        assert walk(each, 1 << 62) == _step_by_step(each, 1 << 62)
        steps = _step_by_step(each, budget)
        for counted in (walk(each, budget), _in_slices(each, budget, slice_size)):
            assert (counted > budget) == (steps > budget), (counted, steps)
            if steps <= budget:
                assert counted == steps


def test_a_run_is_read_no_further_than_the_budget_allows() -> None:
    # 16 MiB of small ints, with room in the budget for 1 MB past the list itself (its
    # header and places): the run stops some 125 000 values in (8 bytes each), as the
    # steps would, and reads no further.
    values = 16 * 1024 * 1024
    data = msgspec.msgpack.encode([0] * values)
    budget = 8 + 56 + 8 * values + 1_000_000
    assert budget < walk(data, budget) <= budget + 8


@pytest.mark.anyio
async def test_the_paced_count_is_the_count_and_lets_other_tasks_run(anyio_backend: str) -> None:
    # 2 MiB of small nested arrays, the slowest shape to walk: the same count as in one
    # go, and the event loop turns (another task runs) every 64 KiB walked.
    data = msgspec.msgpack.encode([[1, 2, 3]] * (2 * 1024 * 1024 // 4))
    turns = 0
    done = False

    async def other() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await anyio.lowlevel.checkpoint()

    # Within its budget (64 MiB + 8 x its size: walked whole), and over a smaller one.
    for budget in (msgpack_cost.decoded_budget(len(data)), 10_000_000):
        turns = 0
        done = False
        async with anyio.create_task_group() as group:
            group.start_soon(other)
            await anyio.lowlevel.checkpoint()
            counted = await msgpack_cost.decoded_cost_paced(data, budget)
            done = True
        assert counted == decoded_cost(data, budget) or min(counted, walk(data, budget)) > budget
        walked = len(data) if counted <= budget else budget // 28  # 28 a byte counted
        # About a turn a slice (trio's scheduler may run the other task every other one).
        assert turns >= walked // msgpack_cost._SLICE // 2, (turns, walked)
    assert await msgpack_cost.decoded_cost_paced(data[:1000], 1 << 20) == 1000 * MOST_PER_BYTE


@pytest.mark.anyio
async def test_the_paced_count_takes_up_a_run_in_each_slice(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's paced count of 1 MiB of nil (16 slices), and of the same after one
    # value of another kind (which ends the list's first run at once): all but its first
    # slice are counted as runs, in C, not a Python step a value. Only the first slice
    # was, whatever followed (16 MiB of nil: 1.1 s of the server's loop, against 0.03 s).
    counted_at_once = 0
    run = msgpack_cost._run

    def counting(*args: Any) -> tuple[int, int, int]:
        nonlocal counted_at_once
        pos, cost, pending = run(*args)
        counted_at_once += args[3] - pending
        return pos, cost, pending

    monkeypatch.setattr(msgpack_cost, "_run", counting)
    values = 1 << 20
    for value in ([None] * values, [1000] + [None] * (values - 1)):
        data = msgspec.msgpack.encode(value)
        counted_at_once = 0
        budget = msgpack_cost.decoded_budget(len(data))
        assert await msgpack_cost.decoded_cost_paced(data, budget) == walk(data, budget)
        assert counted_at_once >= values - msgpack_cost._SLICE, counted_at_once
