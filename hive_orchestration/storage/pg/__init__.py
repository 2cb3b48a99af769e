"""The PostgreSQL store: a database on a PostgreSQL server, named by a ``postgresql://`` URL.

Only this package imports psycopg, and nothing imports this package until a runtime or a
client is given a PostgreSQL URL (:func:`~hive_orchestration.storage.port.store_kind`), so
``import hive_orchestration`` works without psycopg installed; :func:`require_psycopg`
turns its absence into an error that says which extra to install.

This module itself imports no database library.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...errors import StorageError

__all__ = ["display_url", "require_psycopg"]


def display_url(url: str) -> str:
    """``url`` without its password (in the user part or a ``password=`` parameter), for
    messages, logs and :attr:`StorageError.path`: errors are shown and logged, passwords
    must not be."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a PostgreSQL URL that cannot be parsed>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostinfo}" if user else hostinfo
    query = parts.query
    if query:
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "password"]
        query = urlencode(kept)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def require_psycopg(url: str) -> None:
    """Raise :class:`StorageError` (``fault="cannot_open"``) if psycopg is not installed."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        shown = display_url(url)
        raise StorageError(
            f"cannot open database {shown!r}: a PostgreSQL URL needs psycopg 3, which is not"
            " installed; install the extra: pip install 'hive-orchestration[postgres]'",
            path=shown,
            fault="cannot_open",
        ) from exc
