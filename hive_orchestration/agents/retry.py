"""Which exceptions of a handler are worth another attempt.

A handler that raises fails its run. Whether the task then goes back to the queue (while
attempts remain) or fails for good at once is the runner's :class:`RetryPolicy`:

- ``retry_on``: the exception types that are retried. ``None`` (the default) retries
  every exception, as Temporal retries every error unless told otherwise; a tuple retries
  only those (and their subclasses), as Celery's ``autoretry_for``: anything else fails
  the task at once.
- ``fail_on``: the exception types that fail the task at once, whatever ``retry_on``
  says (Celery's ``dont_autoretry_for``, Temporal's ``non_retryable_error_types``).

An exception is matched with ``isinstance``, so naming a base class covers its
subclasses; ``fail_on`` wins over ``retry_on`` when both match. What a retry waits is the
runtime's backoff (``RuntimeConfig.retry_backoff``), as for any retryable failure.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import InvalidInputError

__all__ = ["RetryPolicy", "check_exception_types", "load_exception_type"]

#: More would be a configuration mistake, not a policy.
_MAX_TYPES = 100


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retry_on`` (None: every exception) and ``fail_on``, checked."""

    retry_on: tuple[type[BaseException], ...] | None = None
    fail_on: tuple[type[BaseException], ...] = ()

    @classmethod
    def of(
        cls,
        retry_on: Iterable[type[BaseException]] | None,
        fail_on: Iterable[type[BaseException]],
    ) -> RetryPolicy:
        return cls(
            None if retry_on is None else check_exception_types(retry_on, "retry_on"),
            check_exception_types(fail_on, "fail_on"),
        )

    def retryable(self, error: BaseException) -> bool:
        """Whether a run that raised ``error`` may be tried again."""
        if isinstance(error, self.fail_on):
            return False
        return self.retry_on is None or isinstance(error, self.retry_on)


def check_exception_types(
    types: Iterable[type[BaseException]], field: str
) -> tuple[type[BaseException], ...]:
    """``types`` as a tuple of exception classes, or :class:`InvalidInputError` naming
    the first that is not one (a class given as an instance, a string...)."""
    if isinstance(types, type | str) or not isinstance(types, Iterable):
        raise InvalidInputError(field, "must be a list of exception classes, as (KeyError,)")
    checked: list[type[BaseException]] = []
    for i, kind in enumerate(types):
        if i == _MAX_TYPES:
            raise InvalidInputError(field, f"holds more than {_MAX_TYPES} exception classes")
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise InvalidInputError(
                f"{field}[{i}]", f"must be an exception class, got {type(kind).__name__}"
            )
        checked.append(kind)
    return tuple(dict.fromkeys(checked))


def load_exception_type(target: str, field: str) -> type[BaseException]:
    """The exception class ``target`` names, ``package.module:Class`` (a bare name, as
    ``KeyError``, is a builtin), imported as ``python -m`` would (the current directory
    first, then ``PYTHONPATH``); anything else is an :class:`InvalidInputError` on
    ``field`` saying what went wrong."""
    module_name, colon, attribute = target.strip().rpartition(":")
    if not colon:
        module_name = "builtins"
    if not module_name.strip() or not attribute.strip():
        raise InvalidInputError(
            field, f"must name an exception class, as 'package.module:Error', got {target!r}"
        )
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        found: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise InvalidInputError(
            field,
            f"{target!r}: no module named {missing!r} (modules are found from the current"
            " directory and PYTHONPATH)",
        ) from None
    except Exception as exc:  # the module's own code failed: say so, not a traceback
        raise InvalidInputError(
            field, f"{target!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise InvalidInputError(
                field, f"{target!r}: module {module_name!r} has no {attribute!r}"
            ) from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise InvalidInputError(
            field, f"{target!r} is not an exception class (it is a {type(found).__name__})"
        )
    return found
