"""The idempotency keys of a batch's creates, looked up in storage before it is handled
(a key held only while its task is live: :mod:`.control`).

Idempotency keys. Memory knows the keys of the tasks in memory only; a finished task's key
leaves with it and lives on in SQLite, behind the unique index. Before a batch is handled,
the keys of its creates that memory does not know are looked up in storage, one read for
the whole batch, so a key stays its first task's until that task is deleted, however long
ago it finished and across restarts, and opening a database loads no key. A task created
with ``idempotency_scope="active"`` holds its key only while live: it lets go of it as it
ends, and storage's unique index covers only the keys still held (control.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...errors import HiveError
from ...messages.storage import FindIdempotencyKeys
from ...messages.tasks import CreateTask, CreateTasks, TaskManagerMessage
from ...runtime import Envelope
from .state import _Batch

if TYPE_CHECKING:
    from .actor import TaskManager


def _refuse_unknown_keys(items: Sequence[CreateTask], work: _Batch) -> None:
    """Raise the error of a key storage could not look up for this batch, if any."""
    if work.key_errors:
        for item in items:
            key = item.idempotency_key
            if key is not None and key in work.key_errors:
                raise work.key_errors[key]


async def look_up_keys(
    tm: TaskManager, batch: Sequence[Envelope[TaskManagerMessage]], work: _Batch
) -> None:
    """Ask storage, in one read for the whole batch, who owns the idempotency keys of
    its creates that memory does not know. Memory holds the keys of the tasks it holds
    only, so a key found there belongs to a task memory let go of (finished long ago,
    or in a queue's backlog). The TaskManager is the only writer of tasks and its last
    commit is done, so the answer is exact until this batch changes it."""
    keys: set[str] = set()
    for envelope in batch:
        message = envelope.message
        if isinstance(message, CreateTask):
            items: Sequence[CreateTask] = (message,)
        elif isinstance(message, CreateTasks):
            items = message.tasks
        else:
            continue
        for item in items:
            key = item.idempotency_key
            if key is not None and key not in tm._keys:
                keys.add(key)
    if not keys:
        return
    try:
        work.stored_keys = await tm._storage.ask(FindIdempotencyKeys(tuple(keys)))
    except HiveError as exc:
        # Without the answer such a create cannot know whether it would be a second
        # task with that key: it fails, and creates nothing, like a failed commit.
        work.key_errors = dict.fromkeys(keys, exc)
