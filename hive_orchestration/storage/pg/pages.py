"""Listing pages on PostgreSQL: its spellings of the page statements, which are every
store's (``storage/pages.py``): ``LIMIT NULL`` where SQLite says ``LIMIT -1`` for "no
limit", and each subquery named.
"""

from __future__ import annotations

from ..pages import PageSql

__all__ = ["PAGE_SQL"]

PAGE_SQL = PageSql(no_limit=None, same_priority=" AS same_priority", lower_priorities=" AS lower")
