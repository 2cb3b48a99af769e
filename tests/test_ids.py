"""Identifiers: time-ordered (UUID version 7) and increasing within a process."""

from __future__ import annotations

import threading
import uuid

from hive_orchestration._ids import new_id


def test_ids_increase_within_a_millisecond_and_across_threads() -> None:
    """Tasks made together share created_at; the queue breaks the tie by id, so ids must
    keep creation order (and never repeat when several runtimes make them at once)."""
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(new_id() for _ in range(20_000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ids in made:
        assert ids == sorted(ids)
    every = [i for ids in made for i in ids]
    assert len(set(every)) == len(every)
    assert {uuid.UUID(i).version for i in every} == {7}
