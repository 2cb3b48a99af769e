"""Checks run at the API boundary, before anything is sent to an actor.

msgspec validates types only when decoding, not when a Struct is built, so values coming
from user code are checked here: a wrong type, NaN, an integer SQLite cannot store, a lone
surrogate, or a payload nested too deep or too large becomes an :class:`InvalidInputError`
naming the field, and never a crash inside an actor.

Two rooms: ``values.py``, the checks of single values (names, integers, durations,
choices, text, an event read), and ``json_object.py``, the bounded check and encoding of a
JSON object. Import them from here.
"""

from __future__ import annotations

from .json_object import check_json_object, encode_json_object, too_big
from .values import (
    DAY,
    MAX_NAMES,
    MAX_READ,
    MIN_DEADLINE,
    MIN_DELAY,
    MIN_LEASE,
    YEAR,
    _show,
    check_bool,
    check_choice,
    check_delay,
    check_event_read,
    check_identifier,
    check_int,
    check_lease,
    check_names,
    check_optional_text,
    check_seconds,
    check_str,
    check_text,
)

__all__ = [
    "DAY",
    "MAX_NAMES",
    "MAX_READ",
    "MIN_DEADLINE",
    "MIN_DELAY",
    "MIN_LEASE",
    "YEAR",
    "_show",
    "check_bool",
    "check_choice",
    "check_delay",
    "check_event_read",
    "check_identifier",
    "check_names",
    "check_int",
    "check_lease",
    "check_optional_text",
    "check_seconds",
    "check_json_object",
    "check_str",
    "check_text",
    "encode_json_object",
    "too_big",
]
