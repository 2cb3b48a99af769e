"""What a msgpack value will cost once decoded, found before it is decoded.

msgpack packs small values into a byte each: ``{}`` is one byte, and an empty dict is 64
bytes of Python objects (and 8 more for its place in a list), so 16 MiB of ``[{}, {}, ...]``
decodes into more than a gigabyte. :func:`decoded_cost` walks the value's headers (never
building it) and adds up what the decoded objects will take, as CPython 3.11+ lays them
out (a little over, never much under, for any shape): a caller refuses what is over its
budget before decoding a byte of it.

The walk is flat (one counter of values still to read, no stack), reads each value's
header once and skips strings and binaries whole, and stops as soon as the budget is
passed: its time is bounded by the budget, not by what the peer sent. A value whose
size is too small to be over any budget (every value takes at least a byte, and none
costs more than :data:`MOST_PER_BYTE` bytes a byte) is not walked at all.

The values a peer can pack most of into a frame are those of one byte (a small int,
nil, a boolean, an empty map, array or string) or of a few (an int, a float): a step
of the walk each made a 16 MiB frame of them cost up to a second or two of the
server's loop. So where a container of at least :data:`_RUN_FROM` values starts with a
run of one-byte values, or of scalars of one kind, the run is found and counted in C (a
regular expression and a count a class; every size-th byte for scalars): the same
count as step by step, 5 to 60 times faster for a frame of them (``bench/msgpack_walk.py``). Small
containers (fewer values than a run's search costs steps) are walked step by step;
the socket server walks in slices (:func:`decoded_cost_paced`), serving others between.
"""

from __future__ import annotations

import re
import struct

import anyio
import msgspec

__all__ = [
    "CALL_DECODED_BASE",
    "CALL_DECODED_PER_BYTE",
    "MOST_PER_BYTE",
    "decoded_budget",
    "decoded_cost",
    "decoded_cost_paced",
]

#: The most a call's arguments (or a frame a client reads) may take once decoded (as
#: :func:`decoded_cost` counts it): this many bytes, plus CALL_DECODED_PER_BYTE times
#: their encoded size. Values under CALL_DECODED_BASE / MOST_PER_BYTE bytes (671 KB)
#: are never walked. A payload of max_payload_bytes (1 MiB) of any shape takes less
#: than CALL_DECODED_BASE (some 55 bytes a byte of its JSON at worst: ``[{"": 0}, ...]``).
CALL_DECODED_BASE = 64 * 1024 * 1024
CALL_DECODED_PER_BYTE = 8

#: The most a byte of msgpack can cost once decoded (``[{0: 0}, ...]``: 3 bytes, a
#: one-entry dict of 224 bytes, its key and value, its place in the list), rounded up.
MOST_PER_BYTE = 100

#: A value's own cost, beyond the 8 bytes of its place in its container.
_LIST = 56  # and 8 per element
_STR = 49  # and a byte per byte (more for text mixing ASCII with astral characters)
_BYTES = 33
_INT = 32
_FLOAT = 24
_EXT = 72  # an Ext and its bytes, or a datetime

#: A run of values of one byte each: a positive or negative fixint, nil, (unused),
#: false, true, and an empty map, array or string.
_ONE_BYTE = re.compile(rb"[\x00-\x80\x90\xa0\xc0-\xc3\xe0-\xff]*")
#: Such a byte's class, for the count of each (what it costs beyond its 8 bytes): 1 an
#: empty map, 2 an empty array, 3 an empty string, 4 a negative fixint, 0 the rest.
_CLASS = bytes(
    1 if b == 0x80 else 2 if b == 0x90 else 3 if b == 0xA0 else 4 if b >= 0xE0 else 0
    for b in range(256)
)
#: Scalars of a fixed size, by their header: their size, and what one costs beyond its
#: 8 bytes. A run of one kind is found by reading every size-th byte.
_FIXED: dict[int, tuple[bytes, int, int]] = {
    header: (bytes((header,)), size, own)
    for header, size, own in (
        [(0xCA, 5, _FLOAT), (0xCB, 9, _FLOAT)]
        + [(0xCC + n, 1 + (1 << n), _INT) for n in range(4)]  # uint 8 to 64
        + [(0xD0 + n, 1 + (1 << n), _INT) for n in range(4)]  # int 8 to 64
        + [(0xD4 + n, 2 + (1 << n), _EXT + (1 << n)) for n in range(5)]  # fixext 1 to 16
    )
}
#: How much :func:`decoded_cost_paced` walks between two turns of the event loop: at most
#: some 5 ms of steps (small nested containers, the slowest to walk).
_SLICE = 64 * 1024
#: Containers of fewer values are walked step by step (a run's search costs as much as
#: some 15 steps).
_RUN_FROM = 16

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def decoded_budget(size: int) -> int:
    """The most ``size`` bytes of values may take once decoded."""
    return CALL_DECODED_BASE + CALL_DECODED_PER_BYTE * size


def decoded_cost(data: bytes | bytearray | memoryview | msgspec.Raw, budget: int) -> int:
    """About how many bytes of Python objects the msgpack value ``data`` decodes into;
    the walk stops as soon as that is over ``budget`` (then a number over it). A value
    that is malformed or cut short is costed as far as it goes: its decoding fails."""
    if len(data) * MOST_PER_BYTE <= budget:
        return len(data) * MOST_PER_BYTE
    return walk(data, budget)


async def decoded_cost_paced(
    data: bytes | bytearray | memoryview | msgspec.Raw, budget: int
) -> int:
    """:func:`decoded_cost`, letting the event loop run other tasks every
    :data:`_SLICE` bytes walked (a frame of small nested containers takes the walk up to
    a second: in one go, a second nobody else is served)."""
    if len(data) * MOST_PER_BYTE <= budget:
        return len(data) * MOST_PER_BYTE
    view = memoryview(data)
    end = len(view)
    pos, cost, pending = 0, 0, 1
    while True:
        pos, cost, pending = _walk(view, pos, cost, pending, budget, min(end, pos + _SLICE))
        if not pending or pos >= end or cost > budget:
            return cost
        await anyio.lowlevel.checkpoint()


def walk(data: bytes | bytearray | memoryview | msgspec.Raw, budget: int) -> int:
    """:func:`decoded_cost` by walking the value, whatever its size."""
    view = memoryview(data)
    return _walk(view, 0, 0, 1, budget, len(view))[1]


def _walk(
    view: memoryview, pos: int, cost: int, pending: int, budget: int, stop: int
) -> tuple[int, int, int]:
    """The walk from ``pos`` with ``pending`` values still to read, until none is, the
    count is over ``budget`` or the walk is at ``stop`` (then it goes on from there):
    where it is, the count, and the values still to read (0 once it ended)."""
    end = len(view)
    if pending >= _RUN_FROM and pos < stop and cost <= budget:
        # Resumed (the paced walk's next slice), or a run broken by a value of another
        # kind: the values still to read may go on as a run, whatever containers they are
        # in (each is one value of the count, as it is one step). Else a run's first
        # slice alone was counted at once, and the rest a step a value (16 MiB of nil:
        # 1.1 s of the server's loop, against 0.03 in one go).
        pos, run_cost, pending = _run(view, pos, stop, pending, pending, budget - cost)
        cost += run_cost
    while pending:
        if pos >= stop or cost > budget:
            return pos, cost, pending
        pending -= 1
        first = view[pos]
        pos += 1
        cost += 8
        if first <= 0x7F or first >= 0xE0:  # fixint: small ones are shared objects
            if first >= 0xE0:
                cost += _INT
        elif first <= 0x8F:  # fixmap
            size = first & 0x0F
            cost += _dict(size)
            pending += 2 * size
            if 2 * size >= _RUN_FROM:
                pos, run_cost, pending = _run(view, pos, stop, pending, 2 * size, budget - cost)
                cost += run_cost
        elif first <= 0x9F:  # fixarray
            size = first & 0x0F
            cost += _LIST + 8 * size
            pending += size
        elif first <= 0xBF:  # fixstr
            size = first & 0x1F
            cost += _STR + size
            pos += size
        elif first <= 0xC3:  # nil, (unused), false, true
            pass
        elif first <= 0xC6 or 0xD9 <= first <= 0xDB:  # bin 8/16/32, str 8/16/32
            width = 1 << (first - (0xC4 if first <= 0xC6 else 0xD9))
            if pos + width > end:
                return end, cost, 0  # cut short
            size = _length(view, pos, width)
            pos += width + size
            cost += (_BYTES if first <= 0xC6 else _STR) + size
        elif first <= 0xC9:  # ext 8/16/32
            width = 1 << (first - 0xC7)
            if pos + width > end:
                return end, cost, 0  # cut short
            size = _length(view, pos, width)
            pos += width + 1 + size
            cost += _EXT + size
        elif first <= 0xCB:  # float 32/64
            pos += 4 if first == 0xCA else 8
            cost += _FLOAT
        elif first <= 0xD3:  # (u)int 8/16/32/64
            pos += 1 << ((first - 0xCC) & 3)
            cost += _INT
        elif first <= 0xD8:  # fixext 1/2/4/8/16
            size = 1 << (first - 0xD4)
            pos += 1 + size
            cost += _EXT + size
        else:  # array 16/32 (0xdc, 0xdd), map 16/32 (0xde, 0xdf)
            width = 2 if first in (0xDC, 0xDE) else 4
            if pos + width > end:
                return end, cost, 0  # cut short
            size = _length(view, pos, width)
            pos += width
            if size > end - pos:  # more values than bytes left: cut short
                return end, cost, 0  # cut short
            if first <= 0xDD:
                cost += _LIST + 8 * size
                pending += size
            else:
                cost += _dict(size)
                pending += 2 * size
                size *= 2
            if size >= _RUN_FROM:
                pos, run_cost, pending = _run(view, pos, stop, pending, size, budget - cost)
                cost += run_cost
    return pos, cost, 0


def _run(
    view: memoryview, pos: int, end: int, pending: int, values: int, left: int
) -> tuple[int, int, int]:
    """The run that starts a container's ``values`` values at ``pos``, of values of one
    byte each or of scalars of one kind: where it ends, what it costs (as the walk counts
    its values one by one), and the values still to read once it is. No more are read
    than could fit in ``left`` bytes of the budget (8 each at least), and one: then it
    is passed, as step by step."""
    values = min(values, max(left, 0) // 8 + 1)
    if pos >= end:
        return pos, 0, pending
    fixed = _FIXED.get(view[pos])
    if fixed is not None:
        header, size, own = fixed
        whole = min(values, (end - pos) // size)  # scalars whole in the data
        heads = view[pos : pos + whole * size : size].tobytes()
        count = whole - len(heads.lstrip(header))
        return pos + count * size, count * (8 + own), pending - count
    found = _ONE_BYTE.match(view, pos, min(end, pos + values))
    run = found.end() - pos if found is not None else 0
    if not run:
        return pos, 0, pending
    classes = view[pos : pos + run].tobytes().translate(_CLASS)
    cost = 8 * run
    if classes.count(0) != run:
        cost += (
            64 * classes.count(1)  # _dict(0)
            + _LIST * classes.count(2)
            + _STR * classes.count(3)
            + _INT * classes.count(4)
        )
    return pos + run, cost, pending - run


def _dict(size: int) -> int:
    """A dict of ``size`` entries (its table grows by doubling: 54 bytes an entry, at
    most, past the first ten)."""
    if size > 10:
        return 64 + 54 * size
    return 352 if size > 5 else 224 if size else 64


def _length(view: memoryview, pos: int, width: int) -> int:
    if width == 1:
        return int(_U8.unpack_from(view, pos)[0])
    if width == 2:
        return int(_U16.unpack_from(view, pos)[0])
    return int(_U32.unpack_from(view, pos)[0])
