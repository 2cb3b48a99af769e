"""The storage actor against the port (storage/port.py): what it does with each kind of
store error, whatever the store. Injected at the SQLite drivers, which are patched to
raise the port's errors as a store would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import anyio
import msgspec
import pytest

from hive_orchestration import RuntimeConfig
from hive_orchestration.errors import ActorFailedError, StorageError
from hive_orchestration.messages.events import Event
from hive_orchestration.messages.storage import (
    AppendEvent,
    GetStorageStats,
    ReadEvents,
    StorageMessage,
    Write,
)
from hive_orchestration.runtime import ActorRef, ChildSpec, Supervisor
from hive_orchestration.storage import StorageActor
from hive_orchestration.storage.port import CommitUnknownError, Statement
from hive_orchestration.storage.sqlite import drivers

pytestmark = pytest.mark.anyio

Kind = Literal["aiosqlite", "thread"]


@pytest.fixture(params=["aiosqlite", "thread"])
def driver(request: pytest.FixtureRequest, anyio_backend: str) -> Kind:
    if request.param == "aiosqlite" and anyio_backend == "trio":
        pytest.skip("aiosqlite runs only on asyncio")
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def storage(db_path: str, driver: Kind) -> AsyncIterator[ActorRef[StorageMessage]]:
    cfg = RuntimeConfig(storage_driver=driver)
    ref: ActorRef[StorageMessage] = ActorRef("storage", mailbox_size=64, ask_timeout=30.0)
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: StorageActor(db_path, cfg))],
        max_restarts=3,
        restart_window=60.0,
        shutdown_timeout=10.0,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        try:
            yield ref
        finally:
            await supervisor.stop()


def append(kind: str) -> AppendEvent:
    event = Event(type=kind, timestamp=1.0, source="test", data={})
    return AppendEvent(event, msgspec.json.encode({}))


@pytest.mark.sqlite_only(
    "the loss is injected into the SQLite drivers (test_pg_driver loses a PostgreSQL COMMIT)"
)
async def test_a_commit_of_unknown_outcome_is_not_told_as_rolled_back(
    db_path: str, driver: Kind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection lost while COMMIT was on its way (the commit landed here): the
    writer must not hear "nothing of it was applied" (a StorageError), and the seq the
    batch took must not be given again: the actor restarts and reads the log."""
    lose_next = {"commit": False}
    originals = {cls: cls.transaction for cls in (drivers.ThreadDriver, drivers.AiosqliteDriver)}

    def losing(cls: type[drivers.Driver]) -> Callable[..., Awaitable[None]]:
        async def transaction(self: drivers.Driver, statements: Sequence[Statement]) -> None:
            await originals[cls](self, statements)  # type: ignore[arg-type]
            if lose_next["commit"]:
                lose_next["commit"] = False
                raise CommitUnknownError("server closed the connection during COMMIT")

        return transaction

    for cls in originals:
        monkeypatch.setattr(cls, "transaction", losing(cls))
    async with storage(db_path, driver) as ref:
        assert (await ref.ask(Write(ops=(append("first"),)))).seqs == (1,)
        lose_next["commit"] = True
        with pytest.raises(ActorFailedError) as caught:
            await ref.ask(Write(ops=(append("landed"),)))
        assert not isinstance(caught.value, StorageError)
        # The restarted actor knows the log as the database holds it.
        assert (await ref.ask(GetStorageStats())).last_seq == 2
        assert (await ref.ask(Write(ops=(append("next"),)))).seqs == (3,)
        events = await ref.ask(ReadEvents(after=0, limit=10))
    assert [(e.seq, e.type) for e in events] == [(1, "first"), (2, "landed"), (3, "next")]
