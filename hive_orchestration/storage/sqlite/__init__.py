"""The SQLite store (``storage/port.py``'s :class:`~hive_orchestration.storage.port.Store`
for a database file or ``:memory:``). Only this package imports ``sqlite3`` and
``aiosqlite``."""

from .store import SqliteStore, open_store

__all__ = ["SqliteStore", "open_store"]
