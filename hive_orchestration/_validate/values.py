"""The checks of single values: names and ids, integers, durations, choices, free text,
and a read of the event log built from checked arguments.

Each returns the value as the runtime takes it, or raises :class:`InvalidInputError`
naming the field and the reason.
"""

from __future__ import annotations

import enum
import math
import re
import reprlib
from collections.abc import Iterable
from typing import TypeVar

from ..errors import InvalidInputError
from ..messages.storage import ReadEvents

_SQLITE_MIN = -(2**63)
_SQLITE_MAX = 2**63 - 1
# C0, DEL and C1: the characters Unicode calls "control" (category Cc).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = _repr.maxlong = 80


def _show(value: object, limit: int = 80) -> str:
    """``value`` for an error message: its repr cut to ``limit`` characters, an integer too
    long to print (Python refuses past 4300 digits) by its size, and a value whose repr
    fails (nested too deep, or a caller's object that raises) by its type. The work is
    bounded too: a long string or a large container is not printed whole to be cut."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        if isinstance(value, str):
            text = repr(value[:limit])
        elif isinstance(value, int | float | bool | None):
            text = repr(value)
        else:
            text = _repr.repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_identifier(value: object, field: str, *, max_length: int = 256) -> str:
    """A non-empty string without surrogates or control characters (names, ids, types)."""
    if not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > max_length:  # first: the checks below read every character
        raise InvalidInputError(field, f"must be at most {max_length} characters")
    if value.isascii() and value.isprintable() and value.strip():
        return value  # the common case: plain ASCII, no control characters
    if not value or not value.strip():
        raise InvalidInputError(field, "must not be empty")
    check_text(value, field)
    if _CONTROL.search(value):
        raise InvalidInputError(field, "must not contain control characters")
    return value


#: Most names a list of names holds (tags, requirements, capabilities, task types): a
#: bound on the row and on the claim's matching work, far above real use.
MAX_NAMES = 256


def check_names(value: object, field: str) -> tuple[str, ...]:
    """A list of names (``check_identifier`` each, ``field[i]`` in an error), at most
    :data:`MAX_NAMES` of them; an iterator is read no further than that."""
    if type(value) is tuple and not value:
        return ()  # no tags, no requirements: most tasks' (and no ABC asked)
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidInputError(field, "must be a list of strings")
    names: list[str] = []
    for i, item in enumerate(value):
        if i == MAX_NAMES:
            raise InvalidInputError(field, f"holds more than {MAX_NAMES} names")
        names.append(check_identifier(item, f"{field}[{i}]"))
    return tuple(names)


def check_optional_text(value: object, field: str, *, max_length: int = 256) -> str | None:
    return None if value is None else check_identifier(value, field, max_length=max_length)


def check_int(value: object, field: str, *, minimum: int, maximum: int = _SQLITE_MAX) -> int:
    # bool is an int subclass; True as a limit or an offset is a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(field, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidInputError(
            field, f"must be between {minimum} and {maximum}, got {_show(value)}"
        )
    return value


#: Durations, in seconds. A duration is a finite number within bounds that say what it is
#: for: far below them a value is a mistake (``1e-300``, milliseconds given as seconds),
#: not a wish, and would burn a task's attempts or spin a deadline for nothing.
DAY = 86_400.0
YEAR = 366 * DAY
#: The shortest lease, lease extension, run timeout or worker timeout: what takes a task
#: away from a live worker must outlast an ordinary pause (a garbage collection, a slow
#: fsync, a busy event loop: tens of milliseconds), or a worker loses work it is doing.
MIN_LEASE = 0.1
#: The shortest deadline a caller waits for (``wait_for_plan``'s timeout, ``ask_timeout``,
#: ``busy_timeout``, ``shutdown_timeout``...): one commit may take this long.
MIN_DEADLINE = 0.01
#: The shortest delay or wait that is not 0 (``retry_after``, a claim's ``wait``, the
#: retry backoff): below a millisecond is below what the event loops' timers resolve; 0
#: means at once, or no wait.
MIN_DELAY = 0.001


def check_seconds(
    value: object, field: str, *, minimum: float, maximum: float, zero: bool = False
) -> float:
    """A duration: a finite number of seconds from ``minimum`` to ``maximum`` (or exactly
    0 if ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(field, f"must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an integer past the largest float: refused by the bounds below
        seconds = math.inf if value > 0 else -math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(field, f"must be a finite number of seconds, got {_show(value)}")
    if seconds == 0 and zero:
        return 0.0
    if not minimum <= seconds <= maximum:
        least = f"0 or from {minimum:g}" if zero else f"from {minimum:g}"
        raise InvalidInputError(
            field, f"must be {least} to {maximum:g} seconds, got {_show(value)}"
        )
    return seconds


def check_lease(value: object, field: str) -> float:
    """A lease or a lease extension: :data:`MIN_LEASE` to a day."""
    return check_seconds(value, field, minimum=MIN_LEASE, maximum=DAY)


def check_delay(value: object, field: str, *, maximum: float = DAY) -> float:
    """A delay or a wait: 0 (at once, no wait), or :data:`MIN_DELAY` to ``maximum``."""
    return check_seconds(value, field, minimum=MIN_DELAY, maximum=maximum, zero=True)


E = TypeVar("E", bound=enum.StrEnum)


def check_choice(
    value: object, choices: type[E], field: str, *, aliases: tuple[str, ...] = ()
) -> E:
    """A member of the string enum ``choices``, given as itself or as its value."""
    if isinstance(value, choices):
        return value
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return choices(value)
    except ValueError:
        valid = ", ".join([*aliases, *(choice.value for choice in choices)])
        raise InvalidInputError(field, f"must be one of {valid}, got {_show(value)}") from None


def check_str(value: object, field: str, *, empty: bool = True, limit: int = 10_000) -> str:
    """Free text (a title, a description, an error): a string of at most ``limit``
    characters, valid as text, and not blank unless ``empty``."""
    if not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:  # first: the checks below read every character
        raise InvalidInputError(field, f"must be at most {limit} characters")
    if not empty and not value.strip():
        raise InvalidInputError(field, "must not be empty")
    check_text(value, field)
    return value


def check_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(field, f"must be a bool, got {type(value).__name__}")
    return value


def check_text(value: str, field: str) -> None:
    """Refuse a string that is not valid text (a lone surrogate cannot be stored), or
    holds a NUL character (a PostgreSQL text cannot: refused on every store alike, so
    that what one store accepts the other does too)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            field, "contains a lone surrogate, which is not valid text"
        ) from None
    if "\x00" in value:
        raise InvalidInputError(
            field, "contains a NUL character (\\x00), which a database text cannot hold"
        )


#: Most rows one read returns.
MAX_READ = 10_000


def check_event_read(
    after: object,
    limit: object,
    pattern: object,
    task_id: object,
    plan_id: object,
    correlation_id: object,
    newest: object = False,
) -> ReadEvents:
    """A read of the event log, every argument checked (``Runtime`` and ``Inspector``)."""
    return ReadEvents(
        after=check_int(after, "after", minimum=0),
        limit=check_int(limit, "limit", minimum=1, maximum=MAX_READ),
        pattern=check_identifier(pattern, "pattern"),
        task_id=check_optional_text(task_id, "task_id"),
        plan_id=check_optional_text(plan_id, "plan_id"),
        correlation_id=check_optional_text(correlation_id, "correlation_id"),
        newest=check_bool(newest, "newest"),
    )
