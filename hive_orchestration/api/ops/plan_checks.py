"""Checking an execution plan's data before anything is sent: each subtask's payload
against its own limit, read no further than the plan's limit allows, then the types and
bounds of every subtask field (each error names it, ``plan_data.subtasks[2].priority``),
then the graph (:func:`check_plan_graph`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

import msgspec

from ..._validate import (
    MIN_LEASE,
    YEAR,
    check_identifier,
    check_int,
    check_json_object,
    check_names,
    check_seconds,
    check_str,
    too_big,
)
from ...config import RuntimeConfig
from ...errors import InvalidInputError
from ...messages.plans import Subtask
from .plan_graph import check_plan_graph

__all__ = ["check_payloads", "check_subtasks"]

_MAX_PRIORITY = 2**31 - 1
# msgspec names the place of a type error as "... - at `$.subtasks[3].priority`".
_AT = re.compile(r" - at `\$(.*)`$")


def check_payloads(plan_data: object, config: RuntimeConfig) -> None:
    """Each subtask payload of ``plan_data`` (as given) against ``max_payload_bytes``.

    The plan's subtasks are read no further than the plan's limit allows: the count is
    the same lower bound of the encoded size as the plan's own check (a subtask by its
    number of keys), so a plan too large to read is refused as such. Anything not
    shaped as expected is left to the plan's checks, which name it.
    """
    if not isinstance(plan_data, Mapping):
        return
    subtasks = plan_data.get("subtasks")
    if not isinstance(subtasks, list | tuple):
        return
    limit = config.max_plan_bytes
    used = 2 * len(subtasks) + 1
    for i, item in enumerate(subtasks):
        if used > limit:
            break
        if not isinstance(item, Mapping) or not item:
            continue
        used += 5 * len(item)
        payload = item.get("payload")
        if payload is not None and used <= limit:
            check_json_object(
                payload,
                f"plan_data.subtasks[{i}].payload",
                max_bytes=config.max_payload_bytes,
                max_depth=config.max_payload_depth,
                setting="max_payload_bytes",
            )
    if used > limit:
        raise too_big("plan_data", limit, used, "max_plan_bytes")


def check_subtasks(data: dict[str, Any]) -> tuple[Subtask, ...]:
    raw = data.get("subtasks")
    if raw is None:
        raise InvalidInputError("plan_data.subtasks", "is missing: a plan lists its subtasks")
    if not isinstance(raw, list):
        raise InvalidInputError(
            "plan_data.subtasks", f"must be a list of subtasks, got {type(raw).__name__}"
        )
    items = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and "type" in item:
            item = dict(item)
            alias = item.pop("type")
            if item.setdefault("task_type", alias) != alias:
                raise InvalidInputError(
                    f"plan_data.subtasks[{i}].type", "differs from its task_type"
                )
        items.append(item)
    try:
        subtasks = msgspec.convert(items, list[Subtask])
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text)
        where = match.group(1) if match else ""
        reason = text[: match.start()] if match else text
        raise InvalidInputError(f"plan_data.subtasks{where}", reason) from None
    checked = tuple(
        _subtask(subtask, f"plan_data.subtasks[{i}]") for i, subtask in enumerate(subtasks)
    )
    try:
        check_plan_graph(
            [subtask.id for subtask in checked], [subtask.dependencies for subtask in checked]
        )
    except InvalidInputError as exc:
        raise InvalidInputError(f"plan_data.{exc.field}", exc.reason) from None
    # The plan's other keys are kept as given; its subtasks are stored checked and
    # normalized ("type" read as task_type, repeated dependencies once, defaults
    # left out), so that the stored plan reads back exactly as it was checked.
    data["subtasks"] = cast(Any, msgspec.to_builtins(checked))
    return checked


def _subtask(subtask: Subtask, at: str) -> Subtask:
    check_identifier(subtask.id, f"{at}.id")
    check_identifier(subtask.task_type, f"{at}.task_type")
    if subtask.title is not None:
        check_str(subtask.title, f"{at}.title", empty=False)
    if subtask.description is not None:
        check_str(subtask.description, f"{at}.description")
    # Its payload was checked by check_payloads, before the plan was read.
    check_int(subtask.priority, f"{at}.priority", minimum=0, maximum=_MAX_PRIORITY)
    check_int(subtask.max_retries, f"{at}.max_retries", minimum=0, maximum=1000)
    if subtask.timeout is not None:
        check_seconds(subtask.timeout, f"{at}.timeout", minimum=MIN_LEASE, maximum=YEAR)
    if subtask.estimated_duration is not None:
        check_seconds(
            subtask.estimated_duration,
            f"{at}.estimated_duration",
            minimum=0.0,
            maximum=YEAR,
        )
    for k, need in enumerate(subtask.dependencies):
        check_identifier(need, f"{at}.dependencies[{k}]")
    check_names(subtask.requires, f"{at}.requires")
    # A repeated dependency is the same dependency.
    dependencies = tuple(dict.fromkeys(subtask.dependencies))
    requires = tuple(dict.fromkeys(subtask.requires))
    if dependencies == subtask.dependencies and requires == subtask.requires:
        return subtask
    return msgspec.structs.replace(subtask, dependencies=dependencies, requires=requires)
