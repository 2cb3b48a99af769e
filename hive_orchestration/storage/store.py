"""Which store a database target names, and the factory that makes it.

``Runtime.open(path)``, the inspector, the CLI and the clients name a database by one
string: a ``postgresql://`` or ``postgres://`` URL is a PostgreSQL server
(``storage/pg/``, imported only then, so that psycopg stays an optional extra), anything
else a SQLite file or ``:memory:`` (``storage/sqlite/``).
"""

from __future__ import annotations

import importlib
from typing import cast

from ..config import SERVER_SCHEMES, RuntimeConfig
from ..errors import ConfigError
from .port import POSTGRES_SCHEMES, Store, StoreFactory, store_kind

__all__ = ["open_store"]

# config.py keeps a URL as it is given (no absolute path made of it): the same schemes.
assert SERVER_SCHEMES == POSTGRES_SCHEMES

_PG_PACKAGE = "hive_orchestration.storage.pg"
#: What a missing PostgreSQL store needs: the package's module, or its driver library.
_PG_MISSING = (_PG_PACKAGE, "psycopg")


def open_store(
    target: str, config: RuntimeConfig | None = None, *, field: str = "db_path"
) -> Store:
    """The store for ``target`` (no I/O: nothing is opened yet).

    Raises :class:`ConfigError` naming ``field`` for a PostgreSQL URL when this
    installation has no PostgreSQL support (``pip install 'hive-orchestration[postgres]'``).
    """
    checked = RuntimeConfig.checked(config)
    if store_kind(target) == "postgres":
        try:
            package = importlib.import_module(_PG_PACKAGE)
        except ImportError as exc:
            if exc.name is None or not exc.name.startswith(_PG_MISSING):
                raise
            raise ConfigError(
                field,
                "PostgreSQL support is not available in this installation"
                f" (cannot import {exc.name}): install it with"
                " `pip install 'hive-orchestration[postgres]'`, or name a SQLite file",
            ) from exc
        factory = cast(StoreFactory, package.open_store)
        return factory(target, checked)
    from .sqlite import open_store as open_sqlite

    return open_sqlite(target, checked)
