"""Which of the client's operations can travel as values (JSON for :func:`call_json`,
msgpack through the socket), and the type each argument is decoded into.

Read from the class's signatures, so that an operation added to the client travels with
no list to keep: one whose arguments and result are values (not callbacks, registries,
event objects or streams). The client (to send a call to a runtime of another process)
and the wire (to decode one) both read it; it imports neither, so that they need not
import each other.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

__all__ = ["EXCLUSIVE", "WAITING", "Operation", "carried"]

#: Operations that could be carried but make no sense from another process.
_LOCAL_ONLY = frozenset({"aclose_callbacks"})
#: Operations that hand the caller something no one else may hold at once (a claim): a
#: caller that leaves before it takes the answer hands it back.
EXCLUSIVE: frozenset[str] = frozenset({"claim_task", "claim_tasks", "claim_planning_request"})
#: Operations that may wait for what other callers do (a task queued, a task or a plan
#: ending), for as long as their ``wait`` or ``timeout`` says (wait_for_task: for ever).
#: A server holds nothing for them in its budget while they wait: the calls that would
#: end the wait may need that budget to be read (remote/budget.py).
WAITING: frozenset[str] = EXCLUSIVE | {"wait_for_task", "wait_for_plan"}


class Operation(msgspec.Struct, frozen=True):
    """What a call of one operation must give: its required arguments, and each
    argument's type."""

    required: tuple[str, ...]
    #: The type each argument is decoded into: a lease or a datetime, else any JSON value
    #: (the operation checks it as it checks a Python value).
    types: Mapping[str, Any]


def _carries(hint: object) -> bool:
    """Whether values of ``hint`` can travel as JSON (a Struct only where it is the only
    Struct of its union, so that a JSON object decodes into one type)."""
    if hint in (str, int, float, bool, type(None), object, Any, datetime):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        structs = [arg for arg in args if isinstance(arg, type) and issubclass(arg, msgspec.Struct)]
        return len(structs) <= 1 and all(_carries(arg) for arg in args)
    if origin in (list, tuple, dict, Mapping, Sequence, Iterable):
        return all(_carries(arg) for arg in args if arg is not Ellipsis)
    return isinstance(hint, type) and issubclass(hint, enum.Enum | msgspec.Struct)


def _needs_conversion(hint: object) -> bool:
    if hint is datetime or (isinstance(hint, type) and issubclass(hint, msgspec.Struct)):
        return True
    return any(_needs_conversion(arg) for arg in typing.get_args(hint))


def _describe(method: Callable[..., object]) -> Operation | None:
    """The operation's arguments, or None if it cannot be called with JSON."""
    try:
        hints = typing.get_type_hints(method)
    except (NameError, TypeError):  # a type only imported for type checking: not JSON
        return None
    parameters = list(inspect.signature(method).parameters.values())[1:]  # without self
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind not in plain for p in parameters):
        return None
    if not all(_carries(hints.get(p.name)) for p in parameters):
        return None
    if not _carries(hints.get("return")):
        return None
    return Operation(
        required=tuple(p.name for p in parameters if p.default is inspect.Parameter.empty),
        types={
            p.name: hints[p.name] if _needs_conversion(hints[p.name]) else Any for p in parameters
        },
    )


@functools.cache
def carried(client: type) -> Mapping[str, Operation]:
    """Every operation of the class ``client`` (the OrchestrationClient) that can travel,
    by name: its public async methods whose arguments and result are values."""
    found = {}
    for name, method in inspect.getmembers(client, inspect.iscoroutinefunction):
        if name.startswith("_") or name in _LOCAL_ONLY:
            continue
        operation = _describe(method)
        if operation is not None:
            found[name] = operation
    return found
