"""Moved to :mod:`hive_orchestration.api.wire`; kept so that
``hive_orchestration.wire.call_json`` and ``OPERATIONS`` (the path the docs name) still
work. Import :func:`call_json` from ``hive_orchestration``."""

from .api.wire import EXCLUSIVE, OPERATIONS, WireRequest, call_json, msgpack_arguments

__all__ = ["EXCLUSIVE", "OPERATIONS", "WireRequest", "call_json", "msgpack_arguments"]
