"""Bad input at the public API: a clear InvalidInputError naming the field, nothing written.

Every refusal is checked from the outside: the error's ``field``, an unchanged durable log
(``read_events`` and the storage counters), no event fanned out, and a runtime that keeps
working (the next valid publish gets the next sequence number).
"""

from __future__ import annotations

import math
import tracemalloc
import types
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec
import pytest
from _raw import fresh_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hive_orchestration._validate import encode_json_object
from hive_orchestration.agents import AgentRegistry
from hive_orchestration.api.embedded import Runtime
from hive_orchestration.config import RuntimeConfig
from hive_orchestration.errors import InvalidInputError, NotFoundError, RequestTimeoutError
from hive_orchestration.events import TopicRegistry, UnifiedEvent
from hive_orchestration.messages.events import Event

pytestmark = pytest.mark.anyio

TIMEOUT = 20
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _nested_lists(levels: int) -> object:
    """``levels`` lists inside each other around a 0, built without recursion."""
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


def _nested_dicts(levels: int) -> object:
    value: object = 0
    for _ in range(levels):
        value = {"k": value}
    return value


def _with_depth(levels: int) -> dict[str, object]:
    """A payload whose containers nest ``levels`` deep, the top-level object included."""
    return {"v": _nested_lists(levels - 1)}


class _Checked:
    """A runtime with one event already logged, to check that a refusal changed nothing."""

    def __init__(self, rt: Runtime, first: Event) -> None:
        self.rt = rt
        self.first = first

    async def assert_nothing_written(self) -> None:
        stats = await self.rt.statistics()
        assert stats.storage.last_seq == self.first.seq
        assert stats.storage.writes == 1
        assert stats.storage.failed_writes == 0
        assert stats.broadcast.published == 1
        assert await self.rt.read_events() == [self.first]

    async def assert_still_works(self) -> None:
        async with self.rt.subscribe() as sub:
            ok = await self.rt.publish("still.works", {"ok": True})
            assert ok.seq == self.first.seq + 1
            with anyio.fail_after(TIMEOUT):
                assert await sub.receive() == ok  # the bad input was never fanned out
        assert await self.rt.read_events() == [self.first, ok]


def _refused(err: pytest.ExceptionInfo[InvalidInputError], field: str) -> None:
    """``field`` is exact, or a prefix when it ends with '*'."""
    got = err.value.field
    if field.endswith("*"):
        assert got.startswith(field[:-1]), got
    else:
        assert got == field, got
    assert isinstance(err.value, ValueError)  # callers catching ValueError see it too
    assert str(err.value).startswith(f"invalid {got}: ")
    assert err.value.reason


# -- publish --------------------------------------------------------------------------------

PublishCase = Callable[[], dict[str, Any]]


def _publish_cases() -> Iterator[Any]:
    def case(field: str, id: str, **kwargs: Any) -> Any:
        kwargs.setdefault("event_type", "ok.type")
        return pytest.param(lambda: kwargs, field, id=id)

    def lazy(field: str, id: str, make: PublishCase) -> Any:
        # For values too big to build at collection time (or to print in an id).
        return pytest.param(lambda: {"event_type": "ok.type", **make()}, field, id=id)

    # event_type
    yield case("event_type", "type-empty", event_type="")
    yield case("event_type", "type-blank", event_type="   ")
    yield case("event_type", "type-int", event_type=42)
    yield case("event_type", "type-none", event_type=None)
    yield case("event_type", "type-bytes", event_type=b"task.created")
    yield case("event_type", "type-newline", event_type="task\ncreated")
    yield case("event_type", "type-nul", event_type="task\x00created")
    yield case("event_type", "type-escape", event_type="task\x1b[31m")
    yield case("event_type", "type-del", event_type="task\x7fcreated")
    yield case("event_type", "type-c1-control", event_type="task\x85created")
    yield case("event_type", "type-surrogate", event_type="task.\ud800")
    yield case("event_type", "type-too-long", event_type="t" * 257)
    # data: not an object
    yield case("data", "data-list", data=[1, 2])
    yield case("data", "data-str", data="{}")
    yield case("data", "data-int", data=7)
    # data: values JSON or SQLite cannot hold
    yield case("data.x", "data-surrogate-value", data={"x": "ok \ud800"})
    yield case("data.*", "data-surrogate-key", data={"\udfff": 1})
    yield case("data.a.*", "data-nested-surrogate-key", data={"a": {"\ud800x": 1}})
    yield case("data.a", "data-nan", data={"a": math.nan})
    yield case("data.a", "data-inf", data={"a": math.inf})
    yield case("data.a", "data-neg-inf", data={"a": -math.inf})
    yield case("data.a.b[1]", "data-nested-inf", data={"a": {"b": [1.0, math.inf]}})
    yield case("data.items[3]", "data-int-too-big", data={"items": [0, 1, 2, INT64_MAX + 1]})
    yield case("data.n", "data-int-too-small", data={"n": INT64_MIN - 1})
    yield case("data.n", "data-int-huge", data={"n": 10**100})
    yield case("data", "data-int-key", data={1: "x"})
    yield case("data", "data-none-key", data={None: "x"})
    yield case("data.a", "data-nested-bool-key", data={"a": {True: 1}})
    yield case("data.o", "data-object", data={"o": object()})
    yield case("data.s", "data-set", data={"s": {1, 2}})
    yield case("data.b", "data-bytes", data={"b": b"x"})
    yield case("data.c", "data-complex", data={"c": 1j})
    yield case("data.l[1].f", "data-function-in-list", data={"l": [0, {"f": print}]})
    # data: nesting
    yield lazy("data*", "data-depth-33", lambda: {"data": _with_depth(33)})
    yield lazy("data*", "data-hostile-list-depth", lambda: {"data": {"x": _nested_lists(100_000)}})
    yield lazy("data*", "data-hostile-dict-depth", lambda: {"data": _nested_dicts(100_000)})
    yield lazy("data", "data-over-1mib", lambda: {"data": {"blob": "x" * (1024 * 1024)}})
    # metadata
    yield case("source", "source-none", source=None)
    yield case("source", "source-empty", source="")
    yield case("source", "source-int", source=1)
    yield case("correlation_id", "correlation-int", correlation_id=123)
    yield case("correlation_id", "correlation-blank", correlation_id=" ")
    yield case("task_id", "task-bytes", task_id=b"t1")
    yield case("task_id", "task-surrogate", task_id="t\ud800")
    yield case("plan_id", "plan-list", plan_id=["p"])
    yield case("worker_id", "worker-control", worker_id="w\n1")
    yield case("worker_id", "worker-too-long", worker_id="w" * 257)


@pytest.mark.parametrize(("make", "field"), list(_publish_cases()))
async def test_publish_refuses_bad_input(db_path: str, make: PublishCase, field: str) -> None:
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", {"n": 1}))
        kwargs = make()
        with anyio.fail_after(TIMEOUT), pytest.raises(InvalidInputError) as err:
            await rt.publish(**kwargs)
        del kwargs  # a hostile value is freed before anything else runs
        _refused(err, field)
        await checked.assert_nothing_written()
        await checked.assert_still_works()


async def test_many_bad_payloads_then_a_good_one(db_path: str) -> None:
    # A burst of refused payloads (hostile ones included) leaves the runtime untouched.
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        for param in _publish_cases():
            make, field = cast("tuple[PublishCase, str]", param.values)
            if not field.startswith("data"):
                continue
            with pytest.raises(InvalidInputError):
                await rt.publish(**make())
        await checked.assert_nothing_written()
        await checked.assert_still_works()


async def test_payload_depth_limit_is_exact(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        deepest = _with_depth(32)  # the default max_payload_depth
        ok = await rt.publish("deep", deepest)
        assert ok.data == deepest
        assert (await rt.read_events())[0].data == deepest
        with pytest.raises(InvalidInputError) as err:
            await rt.publish("deep", _with_depth(33))
        _refused(err, "data*")
        assert (await rt.statistics()).storage.last_seq == ok.seq


async def test_payload_depth_limit_from_config(db_path: str) -> None:
    async with Runtime.open(db_path, config=RuntimeConfig(max_payload_depth=3)) as rt:
        await rt.publish("ok", {"a": {"b": [1, 2]}})
        with pytest.raises(InvalidInputError) as err:
            await rt.publish("deep", {"a": {"b": [[1]]}})
        _refused(err, "data.a.b*")
        with pytest.raises(InvalidInputError):
            await rt.publish("deep", {"a": [{"c": {}}]})
        assert (await rt.statistics()).storage.last_seq == 1


async def test_payload_size_limit_counts_encoded_bytes(db_path: str) -> None:
    config = RuntimeConfig(max_payload_bytes=1024)
    async with Runtime.open(db_path, config=config) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        # {"b":"..."} is 8 bytes plus the string: 1016 characters make exactly 1024 bytes.
        fits = {"b": "x" * 1016}
        assert len(msgspec.json.encode(fits)) == 1024
        for too_big in (
            {"b": "x" * 1017},
            {"b": "é" * 509},  # 517 characters, but 1026 bytes of UTF-8
            {"items": list(range(400))},
        ):
            with pytest.raises(InvalidInputError) as err:
                await rt.publish("big", too_big)
            _refused(err, "data")
            assert "1024" in err.value.reason
        await checked.assert_nothing_written()
        ok = await rt.publish("big", fits)
        assert ok.seq == checked.first.seq + 1
        assert (await rt.read_events(after=checked.first.seq)) == [ok]


async def test_boundary_values_are_accepted_and_round_trip(db_path: str) -> None:
    data = {
        "max": INT64_MAX,
        "min": INT64_MIN,
        "tiny": 5e-324,
        "huge": 1.7976931348623157e308,
        "neg_zero": -0.0,
        "text": "é \u2028 \U0001f600 \x00 \x7f",
        "": "empty key",
        "nested": {"list": [None, True, False, 0, 1.5, "s", [], {}]},
    }
    async with Runtime.open(db_path) as rt:
        ev = await rt.publish("edge.values", data, task_id="t", plan_id="p", worker_id="w")
        (stored,) = await rt.read_events()
    assert stored == ev
    assert stored.data == data
    assert msgspec.json.encode(stored.data) == msgspec.json.encode(data)  # same types too


async def test_publish_with_a_mapping_that_is_not_a_dict(db_path: str) -> None:
    # The signature takes any Mapping. Accepting it (as an equal dict) or refusing it as
    # InvalidInputError on "data" are both clear; a crash or a partial write is not.
    data = types.MappingProxyType({"a": 1, "nested": types.MappingProxyType({"b": [2]})})
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        refused: InvalidInputError | None = None
        try:
            ev = await rt.publish("mapping", data)
        except InvalidInputError as exc:
            refused = exc
        if refused is None:
            assert ev.data == {"a": 1, "nested": {"b": [2]}}
            assert (await rt.read_events(after=checked.first.seq)) == [ev]
        else:
            assert refused.field == "data"
            await checked.assert_nothing_written()
            await checked.assert_still_works()


# -- read_events ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"after": -1}, "after", id="after-negative"),
        pytest.param({"after": "1"}, "after", id="after-str"),
        pytest.param({"after": True}, "after", id="after-bool"),
        pytest.param({"after": 1.0}, "after", id="after-float"),
        pytest.param({"after": None}, "after", id="after-none"),
        pytest.param({"after": 2**63}, "after", id="after-over-int64"),
        pytest.param({"limit": 0}, "limit", id="limit-zero"),
        pytest.param({"limit": -5}, "limit", id="limit-negative"),
        pytest.param({"limit": 10**9}, "limit", id="limit-huge"),
        pytest.param({"limit": 10_001}, "limit", id="limit-over-max"),
        pytest.param({"limit": True}, "limit", id="limit-bool"),
        pytest.param({"limit": "10"}, "limit", id="limit-str"),
    ],
)
async def test_read_events_refuses_bad_input(
    db_path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        with pytest.raises(InvalidInputError) as err:
            await rt.read_events(**kwargs)
        _refused(err, field)
        await checked.assert_nothing_written()
        await checked.assert_still_works()


async def test_read_events_limits_are_inclusive(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        first = await rt.publish("first", None)
        assert await rt.read_events(after=INT64_MAX) == []
        assert await rt.read_events(after=0, limit=10_000) == [first]
        assert await rt.read_events(limit=1) == [first]


# -- subscribe ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"pattern": ""}, "pattern", id="pattern-empty"),
        pytest.param({"pattern": "  "}, "pattern", id="pattern-blank"),
        pytest.param({"pattern": None}, "pattern", id="pattern-none"),
        pytest.param({"pattern": 5}, "pattern", id="pattern-int"),
        pytest.param({"pattern": "task.\n*"}, "pattern", id="pattern-control"),
        pytest.param({"pattern": "task.\ud800"}, "pattern", id="pattern-surrogate"),
        pytest.param({"buffer": 0}, "buffer", id="buffer-zero"),
        pytest.param({"buffer": -1}, "buffer", id="buffer-negative"),
        pytest.param({"buffer": True}, "buffer", id="buffer-bool"),
        pytest.param({"buffer": 1.5}, "buffer", id="buffer-float"),
        pytest.param({"buffer": "5"}, "buffer", id="buffer-str"),
        pytest.param({"buffer": 10**7}, "buffer", id="buffer-huge"),
        pytest.param({"overflow": "sometimes"}, "overflow", id="overflow-unknown"),
        pytest.param({"overflow": ""}, "overflow", id="overflow-empty"),
        pytest.param({"overflow": 1}, "overflow", id="overflow-int"),
        pytest.param({"task_id": 5}, "filters.task_id", id="filter-int"),
        pytest.param({"task_id": None}, "filters.task_id", id="filter-none"),
        pytest.param({"color": ""}, "filters.color", id="filter-empty"),
        pytest.param({"color": "r\ud800"}, "filters.color", id="filter-surrogate"),
        pytest.param({"color": "r\ned"}, "filters.color", id="filter-control"),
    ],
)
async def test_subscribe_refuses_bad_input(
    db_path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        with pytest.raises(InvalidInputError) as err:
            async with rt.subscribe(**kwargs):
                pytest.fail("subscribed with bad input")
        _refused(err, field)
        stats = await rt.statistics()
        assert stats.broadcast.subscribers == 0  # nothing was registered
        await checked.assert_nothing_written()
        await checked.assert_still_works()


# -- property: any JSON-like payload is either stored exactly or refused --------------------

# st.text() never yields lone surrogates, whatever its alphabet: join characters for those.
_clean_text = st.text(max_size=12)
_bad_text = st.lists(
    st.characters(exclude_categories=())
    | st.characters(categories=["Cs"])
    | st.characters(categories=["Cc"]),
    min_size=1,
    max_size=8,
).map("".join)
# Each kind of bad value is one branch among many, so that most payloads hold at most one.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    st.integers(),  # unbounded: sometimes past 64 bits
    st.integers(min_value=INT64_MIN - 2, max_value=INT64_MIN + 2),
    st.integers(min_value=INT64_MAX - 2, max_value=INT64_MAX + 2),
    st.floats(),  # nan, inf and -inf included, but rarely: hence the next line
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308]),
    _clean_text,
    _bad_text,
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_clean_text, inner, max_size=4),
    max_leaves=10,
)
_payloads = st.one_of(
    st.none(),
    st.dictionaries(_clean_text, _json, max_size=4),
    st.dictionaries(_clean_text | _bad_text, _json, max_size=2),
)
_event_types = (
    st.sampled_from(["task.created", "plan.completed", "review.done", "x"])
    | _clean_text
    | _bad_text
)


def _payload_is_valid(value: object) -> bool:
    """An independent oracle: what the runtime must accept (nesting stays shallow here)."""
    if isinstance(value, str):
        return not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_payload_is_valid, value))
    if isinstance(value, dict):
        return all(_payload_is_valid(k) and _payload_is_valid(v) for k, v in value.items())
    raise AssertionError(f"the strategy made a {type(value).__name__}")


# Written out by hand: the runtime's own namespaces, refused to publishers.
_RUNTIME_OWNED = {"task", "run", "worker", "plan", "planning", "actor"}


def _reads_as_runtime_owned(value: str) -> bool:
    """The namespace, compatibility- and case-folded, is a runtime one or its plural."""
    namespace = unicodedata.normalize("NFKC", value.split(".", 1)[0]).casefold().strip()
    return namespace in _RUNTIME_OWNED or namespace.removesuffix("s") in _RUNTIME_OWNED


def _type_is_surely_valid(value: str) -> bool:
    return (
        bool(value.strip())
        and _payload_is_valid(value)
        and value.isprintable()
        and value.split(".", 1)[0].isascii()  # accents and the like are folded too
        and not _reads_as_runtime_owned(value)
    )


def _type_is_surely_invalid(value: str) -> bool:
    return (
        not value.strip()
        or not _payload_is_valid(value)
        or any(ord(ch) < 0x20 for ch in value)
        or len(value) > 256
        or (_payload_is_valid(value) and _reads_as_runtime_owned(value))
    )


async def _check_examples(
    examples: list[tuple[str, Mapping[str, object] | None]],
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with Runtime.open(":memory:") as rt, rt.subscribe(buffer=100) as sub:
            accepted: list[Event] = []
            for event_type, data in examples:
                data_ok = data is None or _payload_is_valid(data)
                refused: InvalidInputError | None = None
                try:
                    event = await rt.publish(event_type, data)
                except InvalidInputError as exc:
                    refused = exc
                if refused is not None:
                    if not data_ok:
                        assert refused.field.startswith("data"), refused
                    else:
                        assert refused.field == "event_type", refused
                        assert not _type_is_surely_valid(event_type), refused
                    continue
                assert data_ok, f"accepted invalid data {data!r}"
                assert not _type_is_surely_invalid(event_type), event_type
                expected = {} if data is None else data
                assert event.type == event_type
                assert event.data == expected
                # Same JSON types too (True is not 1, 1.0 is not 1).
                assert msgspec.json.encode(event.data) == msgspec.json.encode(expected)
                accepted.append(event)
            assert await rt.read_events() == accepted
            assert [e.seq for e in accepted] == list(range(1, len(accepted) + 1))
            assert [await sub.receive() for _ in accepted] == accepted


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(examples=st.lists(st.tuples(_event_types, _payloads), min_size=1, max_size=8))
def test_any_payload_is_stored_exactly_or_refused(
    backend: str, examples: list[tuple[str, Mapping[str, object] | None]]
) -> None:
    # One runtime (":memory:") per generated batch of up to 8 publishes.
    anyio.run(_check_examples, examples, backend=backend)


# -- oversized payloads: refused without being read whole -----------------------------------
#
# The check counts a lower bound of the encoded size as it reads (a container by its length
# before its items, a string by its length before its characters) and stops once the count
# passes the limit. What proves it here cannot flake: the memory the refusal allocates
# (tracemalloc; reading a 40 MiB payload whole takes at least its encoding, 40 MiB) and
# values the check must never touch (_Unread), placed where the limit is already passed.

MiB = 1024 * 1024
BIG = 40 * MiB
#: Most memory a refusal may allocate: a fraction of the 1 MiB limit (it reads nothing
#: whole; the count and the error take a few kilobytes).
REFUSAL_PEAK = MiB // 4


def _huge_string() -> dict[str, object]:
    return {"blob": "x" * BIG}


def _huge_text() -> dict[str, object]:
    return {"blob": "é" * (BIG // 2)}  # 40 MiB of UTF-8: valid text, not ASCII


def _huge_list() -> dict[str, object]:
    return {"items": ["abcdef"] * (BIG // 9 + 1)}  # '"abcdef",' is 9 bytes


def _wide_object() -> dict[str, object]:
    value = "v" * 100
    # '"key-0000000":"v...v",' is 13 + 1 + 102 + 1 bytes.
    return {f"key-{i:07d}": value for i in range(BIG // 117 + 1)}


def _deep_tree() -> dict[str, object]:
    tree: object = ["abcdef"] * 1_300  # shared: 8**4 leaves of 11.7 kB, 6 levels deep
    for _ in range(4):
        tree = {f"k{j}": tree for j in range(8)}
    return {"tree": tree}


def _many_lists() -> dict[str, object]:
    return {"rows": [[0] * 10_000] * 2_100}  # 2 100 lists of 20 kB: each fits, not all


OVERSIZED = [
    pytest.param(_huge_string, id="one-huge-string"),
    pytest.param(_huge_text, id="one-huge-non-ascii-text"),
    pytest.param(_huge_list, id="huge-list-of-small-items"),
    pytest.param(_wide_object, id="wide-object"),
    pytest.param(_deep_tree, id="deep-and-wide-tree"),
    pytest.param(_many_lists, id="many-lists-each-under-the-limit"),
]


async def _refusal_peak(call: Callable[[], Any]) -> tuple[InvalidInputError, int]:
    """The error ``call()`` raises and the most memory it allocated meanwhile. The
    refusal happens before the call's first await: nothing else runs during it."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError) as err:
            await call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return err.value, peak


@pytest.mark.parametrize("make", OVERSIZED)
async def test_an_oversized_payload_is_refused_without_reading_it_whole(
    db_path: str, make: Callable[[], dict[str, object]]
) -> None:
    data = make()
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        error, peak = await _refusal_peak(lambda: rt.publish("big", data))
        assert error.field == "data"
        assert "1048576" in error.reason
        assert "max_payload_bytes" in error.reason
        assert peak < REFUSAL_PEAK, f"the refusal allocated {peak} bytes"
        await checked.assert_nothing_written()
        await checked.assert_still_works()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # no runtime: once is enough
@pytest.mark.parametrize("make", OVERSIZED)
def test_each_oversized_shape_is_as_big_as_it_says(
    anyio_backend: str, make: Callable[[], dict[str, object]]
) -> None:
    assert len(msgspec.json.encode(make())) > BIG


class _Unread(Mapping[str, object]):
    """A value the check must never read: it is placed past the point where the count
    has passed the limit (its length, 1, may be asked)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, key: str) -> object:
        raise AssertionError("the check read past the limit")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the check read past the limit")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param({"blob": "x" * 2 * MiB, "after": _Unread()}, "data", id="after-a-string"),
        pytest.param(
            {"a": {"blob": "é" * MiB, "after": [_Unread()]}}, "data", id="after-nested-text"
        ),
        pytest.param({"items": [[0] * 300_000] * 2 + [_Unread()]}, "data", id="after-lists"),
        pytest.param(
            {"items": list(range(600_000)), "after": _Unread()}, "data", id="after-numbers"
        ),
    ],
)
async def test_the_check_stops_once_the_limit_is_passed(
    db_path: str, data: dict[str, object], field: str
) -> None:
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", None))
        with pytest.raises(InvalidInputError) as err:
            await rt.publish("big", data)
        _refused(err, field)
        await checked.assert_nothing_written()


def _huge() -> dict[str, object]:
    return {"items": ["x" * 100] * (BIG // 103 + 1)}


async def _claimed(rt: Runtime) -> Any:
    await rt.create_task("job")
    claim = await rt.claim_task("w1", lease=60)
    assert claim is not None
    return claim


def _plan_of_many_subtasks() -> dict[str, object]:
    return {"subtasks": [{}] * (BIG // 3)}


def _subtasks_with(payload: dict[str, object]) -> dict[str, object]:
    return {"subtasks": [{"id": "a", "task_type": "t", "payload": payload}]}


# (what to build before the call, the call with it, the field it is refused on)
Oversized = tuple[Callable[[], Any], Callable[[Runtime, Any, Any], Any], str]
ENTRY_POINTS: dict[str, Oversized] = {
    "create_task": (_huge, lambda rt, c, big: rt.create_task("t", big), "payload"),
    "create_task-workflow": (
        _huge,
        lambda rt, c, big: rt.create_task("t", {"ok": 1}, workflow=big),
        "workflow",
    ),
    "create_tasks": (
        _huge,
        lambda rt, c, big: rt.create_tasks(
            [{"task_type": "t"}, {"task_type": "t", "payload": big}]
        ),
        "tasks[1].payload",
    ),
    "update_task_status": (
        _huge,
        lambda rt, c, big: rt.update_task_status(c.task.id, "completed", result=big),
        "result",
    ),
    "complete_task": (_huge, lambda rt, c, big: rt.complete_task(c.lease, big), "result"),
    "heartbeat": (_huge, lambda rt, c, big: rt.heartbeat(c.lease, progress=big), "progress"),
    "register_worker": (
        _huge,
        lambda rt, c, big: rt.register_worker("w2", metadata=big),
        "metadata",
    ),
    "queue_planning_request": (
        _huge,
        lambda rt, c, big: rt.queue_planning_request("plan it", context_data=big),
        "context_data",
    ),
    "subtask-payload": (
        lambda: _subtasks_with(_huge()),
        lambda rt, c, big: rt.create_execution_plan(big),
        "plan_data.subtasks[0].payload",
    ),
    "plan-data": (
        lambda: {"subtasks": [{"id": "a", "task_type": "t"}], "notes": _huge()},
        lambda rt, c, big: rt.create_execution_plan(big),
        "plan_data",
    ),
    "plan-of-many-subtasks": (
        _plan_of_many_subtasks,
        lambda rt, c, big: rt.create_execution_plan(big),
        "plan_data",
    ),
    "publish_event": (
        lambda: UnifiedEvent(event_type="task.completed", payload={"task_id": "t", **_huge()}),
        lambda rt, c, big: rt.client().publish_event(
            msgspec.structs.replace(big, task_id=c.task.id)
        ),
        "result",
    ),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
async def test_every_json_argument_is_refused_oversized_without_being_read_whole(
    db_path: str, entry: str
) -> None:
    make, call, field = ENTRY_POINTS[entry]
    big = make()
    # The plan's own limit (64 MiB by default) is lowered to a few payloads here.
    config = RuntimeConfig(max_plan_bytes=4 * MiB)
    async with Runtime.open(db_path, config=config) as rt:
        claim = await _claimed(rt)
        before = await rt.statistics()
        error, peak = await _refusal_peak(lambda: call(rt, claim, big))
        assert error.field == field
        assert "max_p" in error.reason  # names the setting: max_payload_bytes, max_plan_bytes
        assert peak < REFUSAL_PEAK, f"the refusal allocated {peak} bytes"
        after = await rt.statistics()
        assert after.storage.writes == before.storage.writes
        assert after.storage.last_seq == before.storage.last_seq
        task = await rt.get_task(claim.task.id)
        assert task is not None
        assert task.status == "assigned"


KiB = 1024


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        pytest.param({"b": "x" * (MiB - 8)}, MiB, id="string-1MiB"),
        pytest.param({"b": "x" * (64 * KiB - 8)}, 64 * KiB, id="string"),
        pytest.param({"b": "é" * ((64 * KiB - 8) // 2)}, 64 * KiB, id="non-ascii-text"),
        pytest.param({"i": [7] * ((64 * KiB - 8) // 2)}, 64 * KiB, id="numbers"),
        pytest.param({"i": [0.5] * ((64 * KiB - 8) // 4)}, 64 * KiB, id="floats"),
        pytest.param({"i": [[]] * ((64 * KiB - 8) // 3)}, 64 * KiB, id="empty-lists"),
        pytest.param({"i": [{}] * ((64 * KiB - 8) // 3)}, 64 * KiB, id="empty-objects"),
        pytest.param({"i": [None] * ((64 * KiB - 8) // 5)}, 64 * KiB, id="nulls"),
        pytest.param({"i": [False] * ((64 * KiB - 8) // 6)}, 64 * KiB, id="falses"),
    ],
)
async def test_a_payload_at_the_limit_is_accepted(
    db_path: str, data: dict[str, Any], limit: int
) -> None:
    size = len(msgspec.json.encode(data))
    assert limit - 8 <= size <= limit
    async with Runtime.open(db_path, config=RuntimeConfig(max_payload_bytes=size)) as rt:
        event = await rt.publish("at.limit", data)
        assert event.data == data
        (stored,) = await rt.read_events(after=event.seq - 1, limit=1)
        assert stored.data == data
        with pytest.raises(InvalidInputError) as err:
            await rt.publish("over.limit", {**data, "": 0})
        _refused(err, "data")


_sizable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.dictionaries(st.text(), _sizable, max_size=6))
def test_the_size_check_never_refuses_a_payload_within_the_limit(data: dict[str, Any]) -> None:
    # The walk's count is a lower bound of the encoded size: a payload exactly at the
    # limit passes, one byte over is refused.
    size = len(msgspec.json.encode(data))
    checked, encoded = encode_json_object(data, "data", max_bytes=size, max_depth=100)
    assert len(encoded) == size
    assert checked == data
    with pytest.raises(InvalidInputError) as err:
        encode_json_object(data, "data", max_bytes=size - 1, max_depth=100)
    assert err.value.field == "data"


# -- durations: bounds a user can live with --------------------------------------------------
#
# A lease, a lease extension or a run timeout is at least 0.1 s; a caller's deadline at least
# 0.01 s; a delay or a wait is 0 or at least 0.001 s. Leases, extensions and waits are at
# most a day, timeouts and delays at most a year; NaN and infinities are refused.

DurationCall = Callable[[Runtime, Any, float], Any]
TINY = [1e-300, 1e-320]


async def _prepared(rt: Runtime) -> Any:
    """A claim, and something ready for each wait (so that an accepted wait returns at
    once): a task of type ``ready`` and a planning request."""
    claim = await _claimed(rt)
    await rt.create_task("ready")
    await rt.queue_planning_request("plan it")
    return claim


def _plan_with_timeout(seconds: float) -> dict[str, object]:
    return {"subtasks": [{"id": "a", "task_type": "t", "timeout": seconds}]}


DURATIONS: dict[str, tuple[DurationCall, str, float, float, bool]] = {
    # name: (call, field, shortest accepted, longest accepted, 0 accepted)
    "claim_task-lease": (
        lambda rt, c, s: rt.claim_task("w2", lease=s),
        "lease",
        0.1,
        86_400.0,
        False,
    ),
    "claim_tasks-lease": (
        lambda rt, c, s: rt.claim_tasks("w2", limit=1, lease=s),
        "lease",
        0.1,
        86_400.0,
        False,
    ),
    "claim_task-wait": (
        lambda rt, c, s: rt.claim_task("w2", ["ready"], wait=s),
        "wait",
        0.001,
        86_400.0,
        True,
    ),
    "heartbeat-extend": (
        lambda rt, c, s: rt.heartbeat(c.lease, extend=s),
        "extend",
        0.1,
        86_400.0,
        False,
    ),
    "create_task-timeout": (
        lambda rt, c, s: rt.create_task("t", timeout=s),
        "timeout",
        0.1,
        366 * 86_400.0,
        False,
    ),
    "fail_task-retry_after": (
        lambda rt, c, s: rt.fail_task(c.lease, "boom", retry_after=s),
        "retry_after",
        0.001,
        366 * 86_400.0,
        True,
    ),
    "claim_planning_request-wait": (
        lambda rt, c, s: rt.claim_planning_request("planner", wait=s),
        "wait",
        0.001,
        86_400.0,
        True,
    ),
    "wait_for_plan-timeout": (
        lambda rt, c, s: rt.wait_for_plan("no-such-plan", timeout=s),
        "timeout",
        0.01,
        366 * 86_400.0,
        False,
    ),
    "subtask-timeout": (
        lambda rt, c, s: rt.create_execution_plan(_plan_with_timeout(s)),
        "plan_data.subtasks[0].timeout",
        0.1,
        366 * 86_400.0,
        False,
    ),
}


def _duration_cases() -> Iterator[Any]:
    for name, (_, field, low, high, zero) in DURATIONS.items():
        bad = [*TINY, low * 0.99, high * 1.01, math.nan, math.inf, -low]
        if not zero:
            bad.append(0.0)
        for value in bad:
            yield pytest.param(name, value, field, id=f"{name}-{value!r}")


@pytest.mark.parametrize(("name", "value", "field"), list(_duration_cases()))
async def test_a_duration_out_of_its_bounds_is_refused(
    db_path: str, name: str, value: float, field: str
) -> None:
    call = DURATIONS[name][0]
    async with Runtime.open(db_path) as rt:
        claim = await _prepared(rt)
        before = await rt.statistics()
        with pytest.raises(InvalidInputError) as err:
            await call(rt, claim, value)
        _refused(err, field)
        assert "seconds" in err.value.reason or "finite" in err.value.reason
        after = await rt.statistics()
        assert after.storage.writes == before.storage.writes
        task = await rt.get_task(claim.task.id)
        assert task is not None
        assert task.status == "assigned"


@pytest.mark.parametrize("name", list(DURATIONS))
async def test_a_duration_at_its_bounds_is_accepted(
    db_path: str, tmp_path: Path, name: str
) -> None:
    call, _, low, high, zero = DURATIONS[name]
    for i, value in enumerate([low, high, *([0.0] if zero else [])]):
        # A database each: db_path, then as many again in this run's store.
        async with Runtime.open(db_path if i == 0 else fresh_database(tmp_path / str(i))) as rt:
            claim = await _prepared(rt)
            try:
                with anyio.fail_after(TIMEOUT):
                    await call(rt, claim, value)
            except InvalidInputError as exc:
                pytest.fail(f"{name}={value!r} refused: {exc}")
            except (NotFoundError, RequestTimeoutError):
                pass  # wait_for_plan of an unknown plan, told or timed out: accepted


@pytest.mark.parametrize("lease", [1e-300, 0.05, 86_401.0, math.nan])
def test_an_agent_lease_out_of_bounds_is_refused(lease: float) -> None:
    registry = AgentRegistry()
    with pytest.raises(InvalidInputError) as err:
        registry.register("job", lambda context: None, lease=lease)
    _refused(err, "lease")
    registry.register("job", lambda context: None, lease=0.1)


# -- event types that read as the runtime's own --------------------------------------------

LOOK_ALIKES = [
    "Task.completed",
    "TASK.completed",
    "tasks.completed",
    "Tasks.completed",
    "\uff54ask.completed",  # fullwidth t
    "\uff34\uff21\uff33\uff2b.completed",  # fullwidth TASK
    "t\u00e1sk.completed",  # an accent
    "ta\u0301sk.completed",  # a combining accent
    "ta\u200bsk.completed",  # a zero-width space
    "ta\u00adsk.completed",  # a soft hyphen
    "task\u3000.completed",  # an ideographic space
    "Plan.completed",
    "plans.completed",
    "Planning.requested",
    "Workers.offline",
    "RUN.lost",
    "runs.lost",
    "Actor.restarted",
    "Task",
    "tasks",
]
APP_TYPES = [
    "tasking.done",
    "taskforce.started",
    "runner.started",
    "planner.done",
    "workflow.completed",
    "review.completed",
    "t.ask",
    "ta sk.completed",
    "s.completed",
]


@pytest.mark.parametrize("event_type", LOOK_ALIKES)
async def test_publish_refuses_a_look_alike_of_a_runtime_namespace(
    db_path: str, event_type: str
) -> None:
    async with Runtime.open(db_path) as rt:
        checked = _Checked(rt, await rt.publish("first", {"n": 1}))
        client = rt.client()
        for publish in (
            lambda: rt.publish(event_type, {"x": 1}),
            lambda: client.publish(event_type, {"x": 1}),
            lambda: client.publish_event(UnifiedEvent(event_type=event_type, payload={"x": 1})),
        ):
            with pytest.raises(InvalidInputError) as err:
                await publish()
            _refused(err, "event_type")
            assert "reads as the runtime's own namespace" in err.value.reason
        await checked.assert_nothing_written()
        await checked.assert_still_works()


@pytest.mark.parametrize("event_type", APP_TYPES)
async def test_publish_takes_an_app_namespace_that_only_starts_like_one(
    db_path: str, event_type: str
) -> None:
    async with Runtime.open(db_path) as rt:
        event = await rt.publish(event_type, {"x": 1})
        assert await rt.read_events() == [event]


@pytest.mark.parametrize("pattern", ["Task.*", "tasks.*", "\uff54ask.completed", "Plans"])
async def test_subscribe_refuses_a_pattern_only_a_refused_event_could_match(
    db_path: str, pattern: str
) -> None:
    async with Runtime.open(db_path) as rt:
        with pytest.raises(InvalidInputError) as err:
            async with rt.subscribe(pattern):
                pytest.fail("subscribed")
        _refused(err, "pattern")
        assert "can match no event" in err.value.reason
        assert (await rt.statistics()).broadcast.subscribers == 0
        with pytest.raises(InvalidInputError):
            TopicRegistry().register(pattern, print)
        # Those patterns are case-sensitive globs: the runtime's own are matched exactly.
        async with rt.subscribe("task*") as loose, rt.subscribe("task.*") as own:
            task_id = await rt.create_task("job")
            app = await rt.publish("taskforce.started", {"task_id": task_id})
            with anyio.fail_after(TIMEOUT):
                created = await own.receive()
                assert created.type == "task.created"
                assert await loose.receive() == created
                assert await loose.receive() == app
