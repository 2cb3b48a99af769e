"""Identifiers: time-ordered (UUID version 7) and increasing within a process."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

from hive_orchestration._ids import new_id, new_secret


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


def test_ids_work_where_there_is_no_fork() -> None:
    """Windows has no os.fork nor os.register_at_fork: importing must not need them."""
    code = (
        "import os; del os.fork, os.register_at_fork; "
        "from hive_orchestration._ids import new_id; a, b = new_id(), new_id(); "
        "assert a < b, (a, b); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_a_forked_child_makes_its_own_ids() -> None:
    import os

    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: ids after the parent's, and a lock it can take
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert uuid.UUID(child).version == 7
    assert child != parent


def test_ids_leave_the_random_module_alone() -> None:
    """An app that seeds the random module for its own use gets its own sequence."""
    import random

    random.seed(42)
    expected = [random.random() for _ in range(3)]
    random.seed(42)
    new_id()
    assert [random.random() for _ in range(3)] == expected


def test_a_forked_child_draws_secrets_of_its_own() -> None:
    """Lease secrets are cut from a pooled draw of os.urandom: a child that went on with
    its parent's pool would hand its claims the very secrets the parent hands its own."""
    import os

    new_secret()  # the parent's pool is drawn, and most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, " ".join(new_secret() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = set(os.read(read, 4096).decode().split())
    os.waitpid(pid, 0)
    parent = {new_secret() for _ in range(4)}
    assert len(child) == 4
    assert not child & parent


def test_secrets_never_repeat_across_threads() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(new_secret() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [s for secrets in made for s in secrets]
    assert len(set(every)) == len(every) == 20_000
    assert {len(s) for s in every} == {22}
