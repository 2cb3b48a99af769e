"""What the task operations and the claim operations share: their base (the
TaskManager they send to, the config, the check of a JSON argument) and the checks of
arguments both take (a status, names, a lease, a time).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import cast

import msgspec

from ..._validate import (
    YEAR,
    _show,
    check_choice,
    check_identifier,
    check_int,
    check_names,
    check_str,
    encode_json_object,
)
from ...config import RuntimeConfig
from ...errors import InvalidInputError
from ...messages.events import JsonValue
from ...messages.tasks import (
    IdempotencyScope,
    Lease,
    TaskManagerMessage,
    TaskStatus,
)
from ...messages.workers import WorkerRegistryMessage
from ...runtime import ActorRef
from .caller import Caller

__all__ = ["TaskCalls"]

JsonObject = dict[str, JsonValue]
_MAX_PRIORITY = 2**31 - 1
#: Most tasks one create_tasks or claim_tasks call takes (each call is one transaction).
_MAX_BATCH = 1000
#: The longest delay or expiry span (ten years): past it, a date is the way to say it.
_LONGEST = 10 * YEAR
#: The longest lease secret taken to be hashed: a claim's is 22 characters.
_SECRET_LIMIT = 256


class TaskCalls(Caller):
    """The base of :class:`TaskOps` and :class:`ClaimOps`, mixed into :class:`Runtime`;
    needs ``_tasks`` (the TaskManager), ``_workers`` and ``_config``."""

    _tasks: ActorRef[TaskManagerMessage]
    _workers: ActorRef[WorkerRegistryMessage]
    _config: RuntimeConfig

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    def _json(self, value: Mapping[str, object] | None, field: str) -> JsonObject | None:
        if value is None:
            return None
        checked, _ = encode_json_object(
            value,
            field,
            max_bytes=self._config.max_payload_bytes,
            max_depth=self._config.max_payload_depth,
        )
        return cast(JsonObject, checked)


def _batch_items(
    items: Iterable[Mapping[str, object]], field: str, names: frozenset[str], unknown: str
) -> Iterator[tuple[str, Mapping[str, object]]]:
    """Each item of a batch call's argument ``field`` (``tasks``, ``items``) with its own
    field name (``items[i]``): a mapping of the names ``names``, at most
    :data:`_MAX_BATCH` of them; a name not among them is refused for ``unknown``."""
    if isinstance(items, Mapping | str | bytes) or not isinstance(items, Iterable):
        raise InvalidInputError(field, f"must be a list of mappings, got {type(items).__name__}")
    for index, item in enumerate(items):
        item_field = f"{field}[{index}]"
        if index >= _MAX_BATCH:
            raise InvalidInputError(field, f"holds more than {_MAX_BATCH} items")
        # A dict of known names (as items mostly are) is let through by one test in C,
        # neither asked of the Mapping ABC nor searched key by key (a generator an item).
        if type(item) is not dict or not names.issuperset(item):
            if not isinstance(item, Mapping):
                raise InvalidInputError(item_field, f"must be a mapping, got {type(item).__name__}")
            # Read no further than the first unknown key.
            name = next((key for key in item if key not in names), None)
            if name is not None:
                shown = name if isinstance(name, str) else _show(name)
                raise InvalidInputError(f"{item_field}.{shown[:80]}", unknown)
        yield item_field, item


def _status(value: object) -> TaskStatus:
    return check_choice(value, TaskStatus, "status", aliases=("pending",))


def _tags(value: Iterable[str] | None) -> tuple[str, ...]:
    return () if value is None else check_names(value, "tags")  # None: no tags, as the seeds


def _types(value: str | Iterable[str] | None, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (check_identifier(value, field),)
    if not isinstance(value, Iterable):
        raise InvalidInputError(field, "must be a name, a list of names, or None")
    types = check_names(value, field)
    if not types and field == "task_types":
        raise InvalidInputError(field, "must name at least one task type (None: any)")
    return tuple(dict.fromkeys(types))


def _lease(value: object) -> Lease:
    if not isinstance(value, Lease):
        raise InvalidInputError(
            "lease", f"must be the Lease from claim_task (claim.lease), got {type(value).__name__}"
        )
    # A Lease can be built by hand: its fields are checked too, before they reach the
    # TaskManager (which looks them up as they are).
    check_identifier(value.task_id, "lease.task_id")
    check_identifier(value.run_id, "lease.run_id")
    check_int(value.attempt, "lease.attempt", minimum=1)
    # Its shape only: a missing (empty) or wrong secret is the TaskManager's to refuse,
    # with LeaseLostError, as any lease that does not hold its task.
    check_str(value.secret, "lease.secret", limit=_SECRET_LIMIT)
    return value


def _when(value: object, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInputError(field, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(field, "must be timezone-aware (e.g. datetime.now(UTC))")
    try:
        return value.astimezone(UTC)  # stored and returned in UTC: the same instant
    except OverflowError:
        raise InvalidInputError(field, f"{value.isoformat()} is out of range in UTC") from None


def _scope(value: object) -> IdempotencyScope:
    if value == "forever" or value == "active":
        return value
    raise InvalidInputError(
        "idempotency_scope",
        f"must be 'forever' (the key is held until the task is deleted) or 'active' (held"
        f" until the task ends), got {_show(value)}",
    )


def _rfc3339(value: str, field: str) -> datetime:
    try:
        return msgspec.convert(value, datetime)
    except msgspec.ValidationError as exc:
        raise InvalidInputError(field, f"is not an RFC 3339 date and time: {exc}") from None
