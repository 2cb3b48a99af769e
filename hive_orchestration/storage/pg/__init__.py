"""The PostgreSQL store (``storage/port.py``'s :class:`~hive_orchestration.storage.port.Store`
for a database on a PostgreSQL server, named by a ``postgresql://`` URL). Only this package
imports psycopg, and nothing imports this package until a runtime, a client or a command is
given such a URL (``storage/store.py``), so ``import hive_orchestration`` works without
psycopg installed (the ``postgres`` extra).
"""

from .store import PostgresStore, open_store

__all__ = ["PostgresStore", "open_store"]
