"""What a JSON value will cost once decoded, found before it is decoded.

JSON packs small values into a few bytes each: ``{},`` is three bytes, and an empty dict
is 64 bytes of Python objects (and 8 more for its place in a list), so the 4 MiB of
``[{}, {}, ...]`` a ``call_json`` request may hold decodes into some 100 MB.
:func:`decoded_cost` counts what the decoded objects will take, as CPython 3.11+ lays
them out (never under, at most about three times over for the shapes of
``tests/test_json_cost.py``), without building any: a caller refuses what is over its
budget before decoding a byte of it.

It counts bytes, never values one by one (a loop in Python over a value per byte would
cost ten times the decoding it guards): ``bytes.count`` of the few characters that make
a value (``{ [ : , "``), in C. Three steps, each only when the one before could not
tell the value is within the budget:

1. A value so small that no shape of it could pass the budget (none costs more than
   :data:`MOST_PER_BYTE` bytes a byte) is not looked at.
2. A rough count of the whole text, string contents included (a ``,`` in a string is
   counted as if it made a value): never under, often twice over, a few milliseconds
   for 4 MiB.
3. The count of the text with every string cut to one ``"`` (a regular expression,
   linear on any input) and its whitespace dropped: exact numbers of objects, arrays,
   entries, elements, strings and other values, so the count is never much over.
   About the time decoding takes, for the requests the second step left.
"""

from __future__ import annotations

import re

__all__ = ["MOST_PER_BYTE", "decoded_cost"]

#: The most a byte of JSON can cost as counted (objects nested in objects by an empty key,
#: ``{"":{"":...}}``: five bytes a level for a dict of one entry, its key and its place,
#: 316 bytes counted with wide strings); the most it really takes is some 40.
MOST_PER_BYTE = 64

#: A value's own cost, beyond the 8 bytes of its place in its container (or a dict's
#: entry): as api/msgpack_cost.py counts them.
_EMPTY_DICT = 64
_DICT = 170  # and 54 per entry: at least what a dict of any size takes (224 for 1 to 5)
_ENTRY = 54
_LIST = 56  # and 8 per element
#: What a list that is not empty holds beyond that: the JSON decoder grows a list as it
#: reads it (4 slots for 1 to 4 elements, 8 for 5 to 8, 16 for 9 to 16, then about an
#: eighth over), so its spare slots take at most this, and _SPARE_SLOT per element.
_LIST_SPARE = 24
_SPARE_SLOT = 4
_STR = 49  # and a byte per byte of text
_WIDE_STR = 76  # and 4 bytes a character: text with a character past U+00FF
_NUMBER = 32  # an int past the small ones CPython shares (-5 to 256), or a float (24)
#: And what an int takes beyond that, a byte per two of its digits: CPython holds 30 bits
#: in 4 bytes, 0.45 bytes a decimal digit (msgspec decodes up to 4 300 of them, 1.9 KB:
#: counted 32 bytes each, 1 000-digit ints were counted at a ninth of what they take).
_NUMBER_PER_2_CHARS = 1

#: A string, from its opening quote to its closing one, or to the end of a text cut
#: short: always matched where it starts, so the search is linear on any input.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_SPACE = b" \t\n\r"
_DIGITS = b"0123456789"


def decoded_cost(data: bytes, budget: int) -> int:
    """About how many bytes of Python objects the JSON value ``data`` decodes into, never
    under (a number over ``budget`` once that is sure). A text that is not JSON is
    counted as far as its characters go: its decoding fails."""
    size = len(data)
    if size * MOST_PER_BYTE <= budget:
        return size * MOST_PER_BYTE
    rough = rough_cost(data)
    if rough <= budget:
        return rough
    return exact_cost(data)


def _wide(data: bytes) -> bool:
    """Whether a string of ``data`` may hold a character past U+00FF (4 bytes each,
    for all of its characters, where a character past U+FFFF is in it)."""
    return not data.isascii() or b"\\u" in data


def rough_cost(data: bytes) -> int:
    """Never under what ``data`` decodes into, from the counts of a few characters in
    the whole text. In JSON, every key follows a ``{`` or a ``,``, every other value a
    ``[``, a ``,``, a ``:`` or nothing (the top one), and a number that costs anything
    is a value of two digits or more (or one and a minus sign); characters of strings
    only add to these counts."""
    dicts = data.count(b"{")
    lists = data.count(b"[")
    entries = data.count(b":")
    commas = data.count(b",")
    strings = (data.count(b'"') + 1) // 2
    slots = 1 + dicts + lists + commas + entries  # values and keys
    # A number that costs anything has two digits, or a digit and a minus sign.
    signed_digits = len(data) - len(data.translate(None, _DIGITS)) + data.count(b"-")
    head, per_byte = (_WIDE_STR, 4) if _wide(data) else (_STR, 1)
    return (
        8 * slots
        + _DICT * dicts
        + _ENTRY * entries
        + (_LIST + _LIST_SPARE) * lists
        + (8 + _SPARE_SLOT) * (lists + commas)
        + head * strings
        + per_byte * len(data)
        + _NUMBER * min(1 + lists + commas + entries, signed_digits // 2)
    )


def exact_cost(data: bytes) -> int:
    """What ``data`` decodes into, counted from the text with its strings cut out: the
    numbers of dicts (empty or not), entries, lists, elements, strings and other values
    are then exact, and each costs what it takes (a dict of a few entries a little
    over)."""
    bare = _STRING.sub(b'"', data)
    text = len(data) - len(bare)  # what the strings held, and their closing quotes
    bare = bare.translate(None, _SPACE)
    strings = bare.count(b'"')
    dicts = bare.count(b"{")
    empty_dicts = bare.count(b"{}")
    lists = bare.count(b"[")
    empty_lists = bare.count(b"[]")
    entries = bare.count(b":")
    commas = bare.count(b",")
    full_dicts = dicts - empty_dicts
    # A dict of n entries has n - 1 commas; the others separate the elements of lists.
    elements = max(0, commas - (entries - full_dicts)) + lists - empty_lists
    values = elements + entries + 1  # the top one, each element, each entry's value
    # The other values: numbers, and true, false and null (which CPython shares, as it
    # shares the ints from -5 to 256). A number it does not share has three characters
    # or more, or two and a minus sign (-6 to -9): counting each sign twice, at least
    # two characters more than one a number, so at most half of what the numbers hold
    # beyond one character each. Every count here only grows as characters are added
    # to a text (or shrinks by less than what they add elsewhere): garbage after a
    # valid beginning, which decoding builds before it fails, cannot bring it down.
    scalars = max(0, values - dicts - lists - (strings - entries))
    literals = bare.count(b"true") + bare.count(b"null")
    falses = bare.count(b"false")
    scalar_bytes = len(bare) - strings - 2 * (dicts + lists) - entries - commas
    number_chars = max(0, scalar_bytes - 4 * literals - 5 * falses) + bare.count(b"-")
    numbers = scalars - literals - falses
    costly = min(scalars, max(0, number_chars - numbers) // 2)
    head, per_byte = (_WIDE_STR, 4) if _wide(data) else (_STR, 1)
    return (
        8 * (values + entries)
        + head * strings
        + per_byte * text
        + _EMPTY_DICT * empty_dicts
        + _DICT * full_dicts
        + _ENTRY * entries
        + _LIST * lists
        + _LIST_SPARE * (lists - empty_lists)
        + (8 + _SPARE_SLOT) * elements
        + _NUMBER * costly
        + _NUMBER_PER_2_CHARS * (number_chars // 2)
    )
