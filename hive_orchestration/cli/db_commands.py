"""``db current`` and ``db upgrade``: a database's schema version against this package's,
and migrating it (by opening a runtime, which refuses a database another one holds)."""

from __future__ import annotations

import argparse
import shlex

import anyio
import anyio.to_thread

from ..api.embedded import Runtime
from ..errors import NewerSchemaError, StorageError
from ..storage import SCHEMA_VERSION, open_store
from .output import print_json

__all__ = ["db_current", "db_upgrade"]


async def db_current(args: argparse.Namespace) -> None:
    version = await anyio.to_thread.run_sync(open_store(args.db).read_schema_version)
    if version == SCHEMA_VERSION:
        state, advice = "current", "up to date"
    elif version < SCHEMA_VERSION:
        state = "older"
        advice = f"older: run `hive-orchestration db upgrade --db {shlex.quote(args.db)}`"
    else:
        state, advice = "newer", "newer: upgrade hive-orchestration to read it"
    if args.json:
        print_json(
            {
                "db": args.db,
                "schema_version": version,
                "package_schema_version": SCHEMA_VERSION,
                "state": state,
            }
        )
    else:
        print(
            f"{args.db}: schema version {version}; this hive-orchestration uses"
            f" {SCHEMA_VERSION} ({advice})"
        )


async def db_upgrade(args: argparse.Namespace) -> None:
    before: int | None
    try:
        before = await anyio.to_thread.run_sync(open_store(args.db).read_schema_version)
    except StorageError as exc:
        if exc.fault != "needs_recovery":
            raise
        # A write a killed program left half-done: a reader cannot undo it, and the
        # version is unknown until it is undone. Opening for writing undoes it first.
        before = None
    if before is not None and before > SCHEMA_VERSION:
        raise NewerSchemaError(args.db, before, SCHEMA_VERSION)
    if before is None or before < SCHEMA_VERSION:
        # Opening a runtime migrates, in one transaction; it refuses a database that
        # another runtime holds, so an app's file is never migrated under its feet. It
        # also does what any open does (requeue the tasks a stopped app left claimed),
        # which the app's next start would do anyway.
        async with Runtime.open(args.db):
            pass
    after = await anyio.to_thread.run_sync(open_store(args.db).read_schema_version)
    if args.json:
        print_json(
            {
                "db": args.db,
                "from_version": before,
                "to_version": after,
                "migrated": after != before,
                "recovered": before is None,
            }
        )
    elif before is None:
        print(
            f"{args.db}: recovered from a write a killed program left unfinished; now at"
            f" schema version {after}"
        )
    elif after != before:
        print(f"{args.db}: migrated from schema version {before} to {after}")
    else:
        print(f"{args.db}: already at schema version {after}; nothing to do")
