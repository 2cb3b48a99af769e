"""The PostgreSQL schema and the claim on a PostgreSQL database, on a real server.

One version number for both stores: the PostgreSQL migration list has one entry per
SQLite migration, and a database of either store at version n has the same tables,
columns and indexes. Migrations run a version per transaction under an advisory lock, from
any version up, several runtimes at once migrate once, a newer version is refused, a
failed step leaves the version before it. Each runtime on a database registers as a node
(several may), alive while its advisory lock is held, and a client finds a live one.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import _pg
import anyio
import pytest

psycopg = pytest.importorskip("psycopg")

from hive_orchestration.errors import NewerSchemaError, StorageError  # noqa: E402
from hive_orchestration.storage.pg import claim as pg_claim  # noqa: E402
from hive_orchestration.storage.pg import schema as pg_schema  # noqa: E402
from hive_orchestration.storage.pg.claim import (  # noqa: E402
    DatabaseClaim,
    read_owner,
)
from hive_orchestration.storage.pg.driver import PostgresDriver  # noqa: E402
from hive_orchestration.storage.port import STARTING, StoreError  # noqa: E402
from hive_orchestration.storage.sqlite import schema as sqlite_schema  # noqa: E402


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


# -- what a database at a version holds, in each store -----------------------------------

Shape = tuple[dict[str, set[str]], set[str]]


def sqlite_shape(version: int) -> Shape:
    conn = sqlite3.connect(":memory:")
    try:
        for migration in sqlite_schema.MIGRATIONS[:version]:
            for sql in migration:
                conn.execute(sql)
        tables = {
            name: {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        indexes = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
    finally:
        conn.close()
    return tables, indexes


def pg_shape(url: str) -> Shape:
    """Tables (but this store's own ``hive_*``) with their columns, and the indexes made
    by name (not the ones behind a primary key or UNIQUE constraint)."""
    tables: dict[str, set[str]] = {}
    for table, column in raw(
        url,
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name NOT LIKE 'hive\\_%'",
    ):
        tables.setdefault(table, set()).add(column)
    indexes = {
        name
        for (name,) in raw(
            url,
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename NOT LIKE 'hive\\_%'"
            " AND indexname NOT IN (SELECT conname FROM pg_constraint)",
        )
    }
    return tables, indexes


def version_of(url: str) -> int:
    return int(raw(url, "SELECT version FROM hive_schema")[0][0])


# -- the two lists -----------------------------------------------------------------------


def test_every_sqlite_migration_has_a_postgresql_twin() -> None:
    sqlite_count, pg_count = len(sqlite_schema.MIGRATIONS), len(pg_schema.MIGRATIONS)
    missing = ", ".join(str(v) for v in range(pg_count + 1, sqlite_count + 1))
    assert pg_count >= sqlite_count, (
        f"schema version(s) {missing} of storage/schema.py (SQLite) have no twin in"
        " storage/pg/schema.py: add the PostgreSQL migration with the same tables,"
        " columns and indexes at the same position"
    )
    extra = ", ".join(str(v) for v in range(sqlite_count + 1, pg_count + 1))
    assert pg_count == sqlite_count, (
        f"schema version(s) {extra} of storage/pg/schema.py have no SQLite twin in"
        " storage/schema.py"
    )
    assert pg_schema.SCHEMA_VERSION == sqlite_schema.SCHEMA_VERSION


@pytest.mark.anyio
async def test_each_version_has_the_same_tables_columns_and_indexes_as_on_sqlite(
    pg_url: str,
) -> None:
    db = await PostgresDriver.open(pg_url)
    try:
        for version in range(1, pg_schema.SCHEMA_VERSION + 1):
            assert await pg_schema.migrate(db, target=version) == version
            assert version_of(pg_url) == version
            assert pg_shape(pg_url) == sqlite_shape(version), f"schema version {version}"
    finally:
        await db.close()


# -- migrating ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_database_at_any_version_migrates_to_the_latest(pg_url: str) -> None:
    latest = sqlite_shape(pg_schema.SCHEMA_VERSION)
    for version in range(pg_schema.SCHEMA_VERSION + 1):
        url = pg_url if version == 0 else _pg.new_database()
        db = await PostgresDriver.open(url)
        try:
            await pg_schema.migrate(db, target=version)
            if version:  # data written at that version survives its migrations
                await db.execute(
                    "INSERT INTO tasks (id, title, task_type) VALUES (?, ?, ?)", ("t1", "x", "y")
                )
            assert await pg_schema.migrate(db) == pg_schema.SCHEMA_VERSION
            assert pg_shape(url) == latest, f"from version {version}"
            assert await db.fetchall("SELECT count(*) FROM tasks") == [(1 if version else 0,)]
        finally:
            await db.close()


@pytest.mark.anyio
async def test_migrating_an_up_to_date_database_writes_nothing(pg_url: str) -> None:
    db = await PostgresDriver.open(pg_url)
    try:
        await pg_schema.migrate(db)
        before = raw(pg_url, "SELECT xmin::text FROM hive_schema")
        assert await pg_schema.migrate(db) == pg_schema.SCHEMA_VERSION
        assert raw(pg_url, "SELECT xmin::text FROM hive_schema") == before
    finally:
        await db.close()


@pytest.mark.anyio
async def test_runtimes_starting_at_once_migrate_once(pg_url: str) -> None:
    drivers = [await PostgresDriver.open(pg_url) for _ in range(4)]
    versions: list[int] = []

    async def one(db: PostgresDriver) -> None:
        versions.append(await pg_schema.migrate(db))

    try:
        async with anyio.create_task_group() as tg:
            for db in drivers:
                tg.start_soon(one, db)
    finally:
        for db in drivers:
            await db.close()
    assert versions == [pg_schema.SCHEMA_VERSION] * 4
    assert raw(pg_url, "SELECT count(*) FROM hive_schema") == [(1,)]
    assert version_of(pg_url) == pg_schema.SCHEMA_VERSION


@pytest.mark.anyio
async def test_newer_schema_is_refused_and_left_untouched(pg_url: str) -> None:
    db = await PostgresDriver.open(pg_url)
    try:
        await pg_schema.migrate(db, target=3)
        raw(pg_url, "UPDATE hive_schema SET version = %s", (pg_schema.SCHEMA_VERSION + 1,))
        before = pg_shape(pg_url)
        with pytest.raises(NewerSchemaError) as caught:
            await pg_schema.migrate(db)
        assert caught.value.found == pg_schema.SCHEMA_VERSION + 1
        assert caught.value.supported == pg_schema.SCHEMA_VERSION
        assert "upgrade the package" in str(caught.value)
        assert pg_shape(pg_url) == before
        with pytest.raises(NewerSchemaError):
            await pg_schema.check_version(db)
    finally:
        await db.close()


@pytest.mark.anyio
async def test_older_schema_is_refused_by_a_reader_that_must_not_migrate(pg_url: str) -> None:
    db = await PostgresDriver.open(pg_url)
    try:
        await pg_schema.migrate(db, target=5)
        with pytest.raises(StorageError, match="db upgrade --db"):
            await pg_schema.check_version(db)
        assert version_of(pg_url) == 5
    finally:
        await db.close()


@pytest.mark.anyio
async def test_failed_migration_leaves_the_database_at_the_version_before(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = list(pg_schema.MIGRATIONS)
    broken[7] = (*broken[7], "CREATE INDEX oops ON nowhere (x)")  # version 8 fails at its end
    monkeypatch.setattr(pg_schema, "MIGRATIONS", tuple(broken))
    db = await PostgresDriver.open(pg_url)
    try:
        with pytest.raises(StoreError):
            await pg_schema.migrate(db)
        assert version_of(pg_url) == 7
        assert pg_shape(pg_url) == sqlite_shape(7)  # nothing of version 8's first statements
    finally:
        await db.close()


# -- nodes: each runtime registered, for its life ---------------------------------------


def backend_pid(conn: Any) -> int:
    return int(conn.info.backend_pid)


@pytest.mark.anyio
async def test_a_second_runtime_is_a_node_beside_the_first(pg_url: str) -> None:
    first = DatabaseClaim(pg_url, serving=True)
    await anyio.to_thread.run_sync(first.acquire)
    second = DatabaseClaim(pg_url)
    try:
        await anyio.to_thread.run_sync(second.acquire)  # admitted, not refused
        assert raw(pg_url, "SELECT count(*) FROM hive_nodes") == [(2,)]
        # A client finds a live node, one that is about to serve before one that never
        # will, and one that serves once it says so.
        assert await anyio.to_thread.run_sync(read_owner, pg_url) == (str(os.getpid()), STARTING)
        await anyio.to_thread.run_sync(first.record_address, "/run/hive.sock")
        assert await anyio.to_thread.run_sync(read_owner, pg_url) == (
            str(os.getpid()),
            "/run/hive.sock",
        )
        # Letting go clears the records first: that node is not named any more.
        await anyio.to_thread.run_sync(first.clear_records)
        assert await anyio.to_thread.run_sync(read_owner, pg_url) == (str(os.getpid()), None)
    finally:
        first.release()
        second.release()
    # Released: nobody is found any more, and the next runtime registers.
    assert await anyio.to_thread.run_sync(read_owner, pg_url) == (None, None)
    third = DatabaseClaim(pg_url)
    await anyio.to_thread.run_sync(third.acquire)
    third.release()


@pytest.mark.anyio
async def test_a_killed_nodes_record_names_no_one_and_goes_with_the_next_node(
    pg_url: str,
) -> None:
    first = DatabaseClaim(pg_url, serving=True)
    await anyio.to_thread.run_sync(first.acquire)
    writer = await PostgresDriver.open(pg_url, on_connect=first.hold)
    await anyio.to_thread.run_sync(first.record_address, "/run/old.sock")
    # Its sessions end, as when its process is killed or the server restarts.
    for pid in (backend_pid(first._conn), backend_pid(writer._conn)):
        raw(pg_url, "SELECT pg_terminate_backend(%s, 10000)", (pid,))
    assert await anyio.to_thread.run_sync(read_owner, pg_url) == (None, None)
    second = DatabaseClaim(pg_url)
    await anyio.to_thread.run_sync(second.acquire)
    try:
        # The dead node's row went as the next one registered.
        assert raw(pg_url, "SELECT id FROM hive_nodes") == [(second.node_id,)]
        # The first one's writer finds its connection gone, reconnects on its next call,
        # and registers its node again: alive beside the second, its writes fenced.
        with pytest.raises(StoreError) as lost:
            await writer.fetchall("SELECT 1")
        assert lost.value.fault == "unavailable"
        assert await writer.fetchall("SELECT current_setting('hive.node')") == [(first.node_id,)]
        assert raw(pg_url, "SELECT count(*) FROM hive_nodes") == [(2,)]
    finally:
        second.release()
        first.release()
        await writer.close()


@pytest.mark.anyio
async def test_owner_whose_connections_were_lost_takes_its_claim_back(pg_url: str) -> None:
    claim = DatabaseClaim(pg_url)
    await anyio.to_thread.run_sync(claim.acquire)
    writer = await PostgresDriver.open(pg_url, on_connect=claim.hold)
    try:
        for pid in (backend_pid(claim._conn), backend_pid(writer._conn)):
            raw(pg_url, "SELECT pg_terminate_backend(%s, 10000)", (pid,))
        with pytest.raises(StoreError):
            await writer.fetchall("SELECT 1")
        assert await writer.fetchall("SELECT 1") == [(1,)]  # reconnected, claim taken again
        key = pg_claim.node_key(claim.node_id)
        assert raw(
            pg_url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s"
            " AND classid::bigint = %s AND objid::bigint = %s",
            (backend_pid(claim._conn), (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        ) == [(1,)]
    finally:
        claim.release()
        await writer.close()


@pytest.mark.anyio
async def test_released_claim_lets_no_write_connection_open(pg_url: str) -> None:
    claim = DatabaseClaim(pg_url)
    await anyio.to_thread.run_sync(claim.acquire)
    claim.release()
    with pytest.raises(StoreError) as caught:
        await PostgresDriver.open(pg_url, on_connect=claim.hold)
    assert caught.value.fault == "in_use"
