"""Storage: the storage actor and the stores it runs on (``port.py`` says what a store is;
``sqlite/`` is the SQLite store; ``store.open_store`` picks one by the database's name).

``SCHEMA_VERSION`` is the schema version of every store: the SQLite store's migration
list defines it, and every other store keeps one migration per version (same number,
same tables and columns).
"""

from .actor import StorageActor, publisher
from .sqlite.schema import SCHEMA_VERSION
from .store import open_store

__all__ = ["SCHEMA_VERSION", "StorageActor", "open_store", "publisher"]
