"""Listing pages on PostgreSQL: its spellings of the page statements, which are every
store's (``storage/pages.py``): ``LIMIT NULL`` where SQLite says ``LIMIT -1`` for "no
limit", and each subquery named.
"""

from __future__ import annotations

from datetime import datetime

from ...messages.plans import PlanStatus
from .. import pages
from ..port import Driver, Statement

__all__ = ["PAGE_SQL", "plan_page_sql", "request_page_sql", "tasks_page_sql"]

PAGE_SQL = pages.PageSql(
    no_limit=None, same_priority=" AS same_priority", lower_priorities=" AS lower"
)


def tasks_page_sql(
    status: str, task_type: str | None, after: tuple[int, datetime, str], limit: int | None
) -> Statement:
    return pages.tasks_page_sql(PAGE_SQL, status, task_type, after, limit)


async def plan_page_sql(
    db: Driver, select: str, status: PlanStatus | None, limit: int | None, after: str | None
) -> Statement:
    return await pages.plan_page_sql(PAGE_SQL, db, select, status, limit, after)


async def request_page_sql(
    db: Driver, select: str, status: str | None, limit: int | None, after: str | None
) -> Statement:
    return await pages.request_page_sql(PAGE_SQL, db, select, status, limit, after)
