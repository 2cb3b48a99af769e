"""Listing pages on SQLite: its spellings of the page statements, which are every
store's (``storage/pages.py``): ``LIMIT -1`` for "no limit", subqueries unnamed.
"""

from __future__ import annotations

from datetime import datetime

from ...messages.plans import PlanStatus
from .. import pages
from ..port import Driver, Statement

__all__ = ["PAGE_SQL", "plan_page_sql", "request_page_sql", "tasks_page_sql"]

PAGE_SQL = pages.PageSql(no_limit=-1, same_priority="", lower_priorities="")


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
