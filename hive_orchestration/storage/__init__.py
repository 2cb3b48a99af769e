"""Storage: the storage actor, the SQLite drivers, the schema and its migrations."""

from .actor import StorageActor
from .schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "StorageActor"]
