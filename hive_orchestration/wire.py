"""Moved to :mod:`hive_orchestration.api.wire`; kept so that
``hive_orchestration.wire.call_json`` and ``OPERATIONS`` (the path the docs name) still
work. Import :func:`call_json` from ``hive_orchestration``."""

from .api.wire import (
    CALL_DECODED_BASE,
    CALL_DECODED_PER_BYTE,
    EXCLUSIVE,
    OPERATIONS,
    WireRequest,
    call_json,
    held_by,
    most_held,
    msgpack_arguments,
)

__all__ = [
    "CALL_DECODED_BASE",
    "CALL_DECODED_PER_BYTE",
    "EXCLUSIVE",
    "OPERATIONS",
    "WireRequest",
    "call_json",
    "held_by",
    "most_held",
    "msgpack_arguments",
]
