"""A client's operations when its runtime is in another process: each is sent as it is
called, to run as the very same operation in the owner's process (or, with
``take_over``, to whatever its keeper holds).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionLostError, OutcomeUnknownError
from ..remote.client import RemoteRuntime
from .carried import EXCLUSIVE, carried
from .embedded import Runtime
from .keeper import Keeper, usable

if TYPE_CHECKING:
    from .client import OrchestrationClient

__all__ = ["kept_operation", "remote_operation", "remote_operations"]


@functools.cache
def remote_operations(cls: type) -> Mapping[str, tuple[inspect.Signature, Any]]:
    """Every operation a client sends to a runtime in another process: its signature
    (without ``self``), to bind a call's arguments as Python would, and its return type,
    to decode the answer into. ``cls`` is :class:`OrchestrationClient`."""
    found = {}
    for name in sorted(carried(cls)):
        method = getattr(cls, name)
        signature = inspect.signature(method)
        parameters = list(signature.parameters.values())[1:]
        found[name] = (
            signature.replace(parameters=parameters),
            typing.get_type_hints(method)["return"],
        )
    return found


def remote_operation(
    cls: type, client: OrchestrationClient, remote: RemoteRuntime, name: str
) -> Callable[..., Awaitable[Any]]:
    """``client``'s operation ``name``, sent to ``remote`` as it is called."""
    signature, returns = remote_operations(cls)[name]
    exclusive = name in EXCLUSIVE

    async def operation(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        return await remote.call(
            name,
            bound.arguments,
            agent=client._default_agent,
            correlation=client._default_correlation,
            returns=returns,
            exclusive=exclusive,
        )

    operation.__name__ = operation.__qualname__ = name
    operation.__doc__ = getattr(cls, name).__doc__
    operation.__signature__ = signature  # type: ignore[attr-defined]
    return operation


def kept_operation(
    cls: type, client: OrchestrationClient, keeper: Keeper, name: str
) -> Callable[..., Awaitable[Any]]:
    """``client``'s operation ``name``, sent to whatever ``keeper`` holds when it is
    called: the owner in another process, or the runtime this client took over. A call
    made while the database changes hands waits for its next owner; one that could not go
    out to an owner that went away goes to the next."""
    signature, returns = remote_operations(cls)[name]
    exclusive = name in EXCLUSIVE
    method = getattr(cls, name)

    async def operation(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        backend = await client._live()
        while True:
            if isinstance(backend, Runtime):
                local = backend.client(
                    source_agent=client._default_agent,
                    correlation_id=client._default_correlation,
                )
                return await method(local, *args, **kwargs)
            try:
                return await backend.call(
                    name,
                    bound.arguments,
                    agent=client._default_agent,
                    correlation=client._default_correlation,
                    returns=returns,
                    exclusive=exclusive,
                )
            except OutcomeUnknownError:
                raise  # it went out: it may have been applied
            except ConnectionLostError:
                if usable(backend):
                    raise
                backend = await keeper.replaced(backend)  # it never went out

    operation.__name__ = operation.__qualname__ = name
    operation.__doc__ = method.__doc__
    operation.__signature__ = signature  # type: ignore[attr-defined]
    return operation
