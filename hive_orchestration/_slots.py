"""The slots of a schedule: when a cron expression or a fixed interval fires.

Cron expressions are read by ``cronsim`` (the optional extra ``cron``), in an IANA time
zone from :mod:`zoneinfo`. cronsim follows Debian cron across daylight-saving changes,
for expressions of 5 fields with a fixed minute and hour (``30 2 * * *``): a time the
spring change skips fires at the first minute after the gap (03:00), and a time the
autumn change repeats fires once, at its first occurrence. Expressions that name every
hour or minute (``*/15 * * * *``) follow elapsed time instead: they fire in both copies of
a repeated hour and not in a skipped one. Intervals are fixed elapsed time, in exact
microseconds from their ``start_at``: no time zone, no daylight saving.

A slot is an instant (an aware UTC datetime); a schedule fires each at most once, by its
identity, never by the clock's reading, so a clock stepped back fires nothing twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import InvalidInputError

__all__ = ["CRON_EXTRA", "Slots", "check_cron", "check_timezone", "floor_of"]

#: The optional extra that brings the cron parser.
CRON_EXTRA = "cron"
_TICK = timedelta(microseconds=1)
#: How many slots are counted one by one before a catch-up stops counting.
_COUNT_LIMIT = 1000


@functools.cache
def _cronsim() -> tuple[Callable[..., Iterator[datetime]], type[Exception]]:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:  # pragma: no cover - the test environment has the extra
        raise InvalidInputError(
            "when",
            "cron schedules need the cron parser of the optional extra"
            f" {CRON_EXTRA!r}: pip install 'hive-orchestration[{CRON_EXTRA}]' (or give"
            " a number of seconds for a fixed interval)",
        ) from None
    return CronSim, CronSimError


def check_timezone(value: object, field: str = "timezone") -> str:
    """An IANA time zone name that this machine's zone database knows."""
    if not isinstance(value, str) or not value.strip() or len(value) > 128:
        raise InvalidInputError(field, "must be an IANA time zone name such as 'Europe/Paris'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a path
        raise InvalidInputError(
            field,
            f"{value[:80]!r} is not a time zone this machine knows (an IANA name such as"
            " 'UTC' or 'America/New_York'; pip install tzdata where the system has none)",
        ) from None
    return value


def check_cron(value: object, timezone: str, field: str = "when") -> str:
    """A cron expression cronsim reads: 5 fields (minute hour day month weekday), or 6
    with seconds first; that fires at least once in the next 50 years."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(field, "must be a cron expression such as '0 3 * * *'")
    if len(value) > 256:
        raise InvalidInputError(field, "must be at most 256 characters")
    cron_sim, cron_error = _cronsim()
    try:
        next(iter(cron_sim(value, datetime.now(ZoneInfo(timezone)))))
    except (cron_error, ValueError, LookupError, ArithmeticError) as exc:
        # cronsim's own error for what it refuses; the others for what slips past its
        # checks (a range it cannot count): a bad expression either way.
        raise InvalidInputError(field, f"{value[:80]!r} is not a cron expression: {exc}") from None
    except StopIteration:
        raise InvalidInputError(field, f"{value!r} never fires in the next 50 years") from None
    return value


class Slots:
    """The slot arithmetic of one schedule: a cron expression in a time zone, or an
    interval of ``every`` seconds from ``start_at``."""

    __slots__ = ("_anchor", "_cron", "_every", "_zone")

    def __init__(
        self, *, cron: str | None, timezone: str, every: float | None, start_at: datetime
    ) -> None:
        self._cron = cron
        self._zone: tzinfo = ZoneInfo(timezone)
        self._anchor = _micros(start_at)
        self._every = None if every is None else max(1, round(every * 1_000_000))
        if cron is not None:
            _cronsim()  # refused now, naming the extra, if the parser is missing

    def next_after(self, after: datetime) -> datetime | None:
        """The first slot strictly after ``after`` (None: there is none)."""
        if self._every is not None:
            k = max(0, (_micros(after) - self._anchor) // self._every + 1)
            return _instant(self._anchor + k * self._every)
        for slot in self._cron_after(after):
            return slot
        return None

    def due(self, after: datetime, now: datetime) -> tuple[datetime | None, int]:
        """The latest slot in ``(after, now]`` and how many slots that span holds
        (counted up to 1000, then at least that)."""
        if now <= after:
            return None, 0
        if self._every is not None:
            first = max(0, (_micros(after) - self._anchor) // self._every + 1)
            last = (_micros(now) - self._anchor) // self._every
            if last < first:
                return None, 0
            return _instant(self._anchor + last * self._every), last - first + 1
        latest: datetime | None = None
        count = 0
        for slot in self._cron_after(after):
            if slot > now:
                return latest, count
            latest, count = slot, count + 1
            if count == _COUNT_LIMIT:
                break
        else:
            return latest, count
        # Many slots passed (a long downtime of a frequent schedule): the latest one is
        # found walking back from now rather than forward through all of them.
        back = self._cron_before(now)
        return (back if back is not None and back > after else latest), count

    def _cron_after(self, after: datetime) -> Iterator[datetime]:
        assert self._cron is not None
        cron_sim, _ = _cronsim()
        try:
            for slot in cron_sim(self._cron, after.astimezone(self._zone)):
                instant = slot.astimezone(UTC)
                # Around an autumn change a fixed-time expression is read on local wall
                # time, which may give a slot before ``after``: slots only move forward.
                if instant > after:
                    yield instant
        except StopIteration:  # pragma: no cover - cronsim ends by StopIteration
            return

    def _cron_before(self, now: datetime) -> datetime | None:
        assert self._cron is not None
        cron_sim, _ = _cronsim()
        start = (now + timedelta(seconds=1)).astimezone(self._zone).replace(microsecond=0)
        try:
            slot: Any = next(iter(cron_sim(self._cron, start, reverse=True)))
        except StopIteration:
            return None
        instant: datetime = slot.astimezone(UTC)
        return instant if instant <= now else None


def _micros(value: datetime) -> int:
    delta = value.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _instant(micros: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def floor_of(not_before: datetime, last_slot: datetime | None) -> datetime:
    """The instant after which a schedule's next slot lies: its last fired slot, or just
    before ``not_before`` (a slot exactly at it may fire), whichever is later."""
    start = not_before - _TICK
    return start if last_slot is None or last_slot < start else last_slot
