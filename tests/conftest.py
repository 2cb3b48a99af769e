"""Shared fixtures. Every async test runs on asyncio and on trio (``anyio_backend``).

The store: ``HIVE_TEST_STORE=sqlite`` (the default) or ``postgres`` decides what the
``db_path`` fixture gives, a SQLite file path or a fresh PostgreSQL database's URL
(tests/_pg.py starts the server). In the PostgreSQL run, tests marked ``sqlite_only`` are
left out, and the tests CI runs there are given the ``on_postgres`` marker at collection
(see :func:`_on_postgres`), so CI runs ``HIVE_TEST_STORE=postgres pytest -m on_postgres``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import stat
import sys
import tempfile
import zlib
from collections.abc import Collection
from pathlib import Path

import _pg
import pytest
from _raw import STORE, fresh_database


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: two workers per core (``--maxprocesses`` caps it). Most of a test's
    time is waiting (fsyncs, sockets, child processes, leases and timers run out), so
    one worker per core left them half idle: on the 2-core machine at load ~2, 4
    workers ran the suite in 224 s against 345 s for 2 (CPU 327 s against 321 s).
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set (xdist's own rule)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 * cores


def _is_controller(config: pytest.Config) -> bool:
    """The process that runs the session (xdist's controller, or the only process)."""
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asyncio_only: runs on asyncio only (aiosqlite does not run under trio)"
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): checks a property only a SQLite file has (say which in the"
        " reason); left out of the HIVE_TEST_STORE=postgres run",
    )
    config.addinivalue_line(
        "markers",
        "pg_server: needs the session's PostgreSQL server without asking for ``pg_url`` by"
        " name (a parameter that gets it with getfixturevalue); left out where there is none",
    )
    config.addinivalue_line(
        "markers",
        "postgres: put this test in CI's PostgreSQL run (beside the guarantees table's tests,"
        " hypothesis and bad-input tests, which are in it by themselves); one asking for"
        " pg_url without db_path is on PostgreSQL in the SQLite run already and stays there",
    )
    config.addinivalue_line(
        "markers",
        "on_postgres: given at collection to the tests of CI's PostgreSQL run (select them"
        " with -m on_postgres); not for use by hand, mark with ``postgres`` instead",
    )
    config.addinivalue_line(
        "markers",
        "on_server: given at collection to the tests whose database is the session's"
        " PostgreSQL server whichever the run's store (``pg_url`` without ``db_path``);"
        " CI runs them in its PostgreSQL run, beside on_postgres, to balance the two runs;"
        " not for use by hand",
    )
    if STORE == "postgres" and (reason := _pg.unavailable_reason()) is not None:
        raise pytest.UsageError(f"HIVE_TEST_STORE=postgres, but {reason}")
    if STORE == "postgres" and importlib.util.find_spec("hive_orchestration.storage.pg") is None:
        # Without it a URL would be taken for a file name: SQLite files under ./postgresql:/
        # and a green run that never touched PostgreSQL.
        raise pytest.UsageError(
            "HIVE_TEST_STORE=postgres, but this hive_orchestration has no PostgreSQL store"
            " (hive_orchestration/storage/pg/)"
        )
    if _is_controller(config):
        _bytecode_cache()
        _memory_tempdir()
        _pg.configure_session()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _is_controller(config):
        _pg.finish_session()


def _bytecode_cache() -> None:
    """Where the environment forbids writing bytecode (``PYTHONDONTWRITEBYTECODE``, as on
    the shared test machine), give the suite's processes a bytecode cache of their own
    outside the checkout. Without one, every xdist worker and every child a test starts
    (the CLI, worker processes, crash children: several hundred per run) compiles the
    package from source again, about 0.3 s of CPU each, more than the import itself
    (measured: a test running the CLI seven times, 4.2 s of its children's CPU without,
    2.3 s with); and every worker rewrites the asserts of the test modules and of
    hypothesis (a pytest plugin, so all its modules) again, seconds per worker. The folder
    is kept between runs (Python checks each entry against its source's mtime and size, so
    a stale one is never used) and is private to this user: one that is not (another user
    could plant bytecode there) is not used, and a fresh folder is taken instead.
    Workers and children inherit it through the environment (xdist starts its workers
    after this hook)."""
    if not sys.flags.dont_write_bytecode or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    folder = os.path.join(tempfile.gettempdir(), f"hive-test-pycache-{os.geteuid()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        found = os.lstat(folder)
        private = stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid()
        private = private and not found.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    except OSError:
        private = False
    if not private:
        folder = tempfile.mkdtemp(prefix="hive-test-pycache-")
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = folder
    sys.dont_write_bytecode = False


#: A folder for the run's temporary files (``tmp_path``, the databases of the tests, of
#: their children and of the bench scripts), or empty for the system's own temporary
#: folder; unset, /dev/shm when that is a tmpfs with room.
TMPDIR_ENV = "HIVE_TEST_TMPDIR"
#: The tmpfs the suite's temporary files go to, and the least free room it must have (a
#: run's folders take ~1.3 GB while it runs).
_SHM = "/dev/shm"
_SHM_ROOM = 4 << 30


def _memory_tempdir() -> None:
    """Put the run's temporary files in memory (a tmpfs) rather than on the disk: every
    commit of a SQLite test database is an fsync (``synchronous=FULL``, the runtime's
    default), which a tmpfs answers at once. Measured at load ~12: tests/test_claims.py
    makes 1,787 fdatasync calls, which waited 3.46 s in all in /tmp on this machine's
    disk and 0.04 s on /dev/shm (strace -c -w); 300 commits one after another took 1.15
    to 1.5 s on the disk, 0.10 to 0.22 s on the tmpfs. No test needs the flush: every
    crash a test makes is a process's death (SIGKILL, an exit), after which the kernel
    still holds every write the dead process made, on a tmpfs as on a disk; only the
    machine's own crash would need it, which no test makes (the PostgreSQL clusters of the
    tests and of CI run with ``fsync=off`` for that reason, tests/_pg.py). The tests of a
    full disk mount their own small tmpfs (tests/reliability/test_storage_faults.py).

    ``HIVE_TEST_TMPDIR`` names another folder (empty: the system's temporary folder, the
    disk here); a ``TMPDIR`` set already is kept. The folder is ``/dev/shm`` itself, as
    ``/tmp`` was (sticky, world-writable: pytest makes its own private ``pytest-of-USER``
    in it, and every ``mkdtemp`` a private folder), not a folder under it: the paths of the
    tests' files grow by four bytes only, and a Unix socket beside a test's database must
    fit in ``sun_path`` (107 bytes; past that the runtime serves an abstract one, which
    the tests of the socket's place fail on). It is set as ``TMPDIR``, so xdist's workers
    (started after this hook), the children the tests start and the bench scripts use it
    too; pytest's ``tmp_path`` folders are made there. The PostgreSQL cluster stays on the
    disk (tests/_pg.py): its databases add up to gigabytes, and its server runs as another
    user."""
    chosen = os.environ.get(TMPDIR_ENV)
    if chosen is None and os.environ.get("TMPDIR"):
        return  # the user's own choice of temporary folder
    if chosen is None:
        try:
            shm = os.statvfs(_SHM)
            roomy = shm.f_bavail * shm.f_frsize >= _SHM_ROOM
        except OSError:
            roomy = False
        if not roomy or not _is_tmpfs(_SHM):
            return
        chosen = _SHM
    if not chosen:
        return
    _pg.keep_on_disk(tempfile.gettempdir())
    os.environ["TMPDIR"] = chosen
    tempfile.tempdir = chosen


def _is_tmpfs(folder: str) -> bool:
    """Whether ``folder`` is the mount point of a tmpfs (read from /proc/self/mounts)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return any(
                line.split()[1:3] == [folder, "tmpfs"] for line in mounts if line.count(" ") >= 2
            )
    except OSError:
        return False


# -- which tests run on PostgreSQL in CI ------------------------------------------------------
#
# The whole suite on PostgreSQL would double CI's time (the SQLite run takes ~6.5 min with
# xdist; both stores together must stay under 10). CI's PostgreSQL run takes instead:
#   1. every test the "Guarantees and the tests that prove them" table names (read from
#      docs/delivery.md itself, so a row added there is run on both stores without a second
#      list to keep; a file named whole means all of its tests);
#   2. the hypothesis and bad-input tests (_EXTRA below; the fuzz harness, which opens its own
#      database, is marked ``postgres`` in its file);
#   3. any test marked ``postgres`` by hand;
# and of 1 and 2 only the tests that open a database through ``db_path`` (directly or through
# a fixture): the others (mailboxes, frames, the subscription index, ...) never reach the
# store and would only run twice. Tests marked ``sqlite_only`` are never in it, nor are the
# tests asking for ``pg_url`` without ``db_path``: they run on PostgreSQL in the SQLite run
# already (CI gives both runs the server), the same test against the same server.
# Each of 1 and 2 runs there on one event loop, asyncio or trio, chosen by a stable hash of
# the test and its other parameters: both loops drive the PostgreSQL store across the
# selection at half the cost (the store's own tests, using ``pg_url``, run on both loops in
# the SQLite run). Measured: the selection on both loops took as long as half the suite.
# The tests asking for ``pg_url`` without ``db_path`` are marked ``on_server`` instead:
# CI moves them from its SQLite run to its PostgreSQL run (see :func:`_on_server`).

_GUARANTEES = Path(__file__).resolve().parent.parent / "docs" / "delivery.md"

_EXTRA = (
    # hypothesis
    "tests/test_write_grouping.py",
    "tests/test_broadcast.py::test_the_index_matches_what_brute_force_matches",
    # bad input: refused naming the field, nothing written
    "tests/test_validation.py",
    "tests/test_claims.py::test_a_token_that_never_held_the_task_is_refused",
    "tests/test_claims.py::test_bad_claim_arguments_are_refused",
    "tests/test_claims.py::test_bad_claim_settings_on_create_are_refused",
    "tests/test_claims.py::test_bad_worker_calls_are_refused_and_change_nothing",
    "tests/test_tasks.py::test_bad_create_is_refused_and_writes_nothing",
    "tests/test_tasks.py::test_bad_arguments_to_the_other_operations",
    "tests/test_plans.py::test_bad_plan_arguments_are_refused_and_nothing_is_written",
    "tests/test_plans.py::test_a_subtask_payload_over_the_limit_is_refused",
    "tests/test_plans.py::test_a_plan_over_max_plan_bytes_is_refused",
    "tests/test_batch_ops.py::test_bad_batch_claim_arguments_are_refused",
    "tests/test_schedules.py::test_bad_input_is_refused_naming_the_field_and_nothing_is_written",
    "tests/test_workers.py::test_bad_registrations_are_refused",
    "tests/test_workers.py::test_bad_heartbeats_are_refused",
)


def _guarantee_refs(page: Path) -> list[str]:
    """The tests (``path::name``, or a whole ``path``) the guarantees table names.

    A page without the table gives none: tests/test_store_selection.py fails then, rather
    than CI's PostgreSQL run quietly losing the guarantees."""
    if not page.exists():
        return []
    text = page.read_text(encoding="utf-8")
    found = re.search(r"^#+ Guarantees and the tests that prove them$", text, re.MULTILINE)
    if found is None:
        return []
    refs: list[str] = []
    for line in text[found.end() :].split("\n#", 1)[0].splitlines():
        if not line.startswith("|"):
            continue
        current = ""
        for token in re.findall(r"`([^`]+)`", line):
            if token.startswith("tests/"):
                current = token.partition("::")[0]
                refs.append(token)
            elif token.startswith("::") and current:
                refs.append(current + token)
    return refs


def _matches(nodeid: str, ref: str) -> bool:
    if "*" in ref:  # brackets are the test's parameters, not a set of characters
        return fnmatch.fnmatchcase(nodeid, re.sub(r"([\[\]])", r"[\1]", ref))
    return nodeid == ref or nodeid.startswith((ref + "[", ref + "::"))


_SELECTION = (*_guarantee_refs(_GUARANTEES), *_EXTRA)


def _one_loop(item: pytest.Item) -> bool:
    """Whether ``item`` is the one of its asyncio/trio pair that runs on PostgreSQL."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    backend = next((v for v in params.values() if v in ("asyncio", "trio")), None)
    return backend is None or backend == _loop_for(item.nodeid)


def _loop_for(nodeid: str) -> str:
    """The loop a test runs on in the PostgreSQL run: a hash of its node id without its
    loop, so both of a pair agree, and every xdist worker too (ids are stable)."""
    key = re.sub(r"(?<=[\[-])(asyncio|trio)(?=[-\]])", "", nodeid)
    return ("asyncio", "trio")[zlib.crc32(key.encode()) % 2]


#: The fixtures that give a database in the run's store.
_DB_FIXTURES = ("db_path", "new_db_path")


def _has_db(names: Collection[str]) -> bool:
    return any(name in names for name in _DB_FIXTURES)


def _on_postgres(item: pytest.Item) -> bool:
    if item.get_closest_marker("sqlite_only") is not None:
        return False
    names = getattr(item, "fixturenames", ())
    if "pg_url" in names and not _has_db(names):
        # Its database is PostgreSQL in either run (the store's own tests, several nodes):
        # the SQLite run has it already, on both loops, against the same server. Run here
        # again, it would prove nothing more (measured: the 17 such tests of test_pg_nodes.py
        # and test_pg_event_log.py took 11 s of the selection's 195 s of test CPU, and 65 s
        # of its 1,092 s of worker time, their server's work besides).
        return False
    if not _one_loop(item):
        return False
    if item.get_closest_marker("postgres") is not None:
        return True
    if not _has_db(names):
        return False
    return any(_matches(item.nodeid, ref) for ref in _SELECTION)


def _on_server(item: pytest.Item) -> bool:
    """Whether ``item``'s database is the PostgreSQL server in either run (``pg_url``
    without ``db_path``): the same test against the same server, on both loops, whichever
    run it is in. CI's two runs share one server, so CI runs these in the PostgreSQL run
    (``-m "(on_postgres or on_server) and not slow"``) and leaves them out of the SQLite
    run (``-m "not slow and not on_server"``): each still runs once, and the two runs,
    side by side, end closer together. Measured on a full SQLite run at load ~6: these
    tests (the several-node ones, the store's own) took ~280 s of its ~1,200 s of worker
    time, while the PostgreSQL run took half the SQLite run's wall time."""
    names = getattr(item, "fixturenames", ())
    return "pg_url" in names and not _has_db(names) and not _on_postgres(item)


def _needs_postgres(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return (
        "pg_url" in names
        or item.get_closest_marker("pg_server") is not None
        or (STORE == "postgres" and _has_db(names))
    )


@pytest.hookimpl(tryfirst=True)  # before ``-m`` reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the combinations that cannot run, rather than skip each one: aiosqlite
    under trio (a driver parameter named ``aiosqlite...``, or the ``asyncio_only``
    marker), tests needing PostgreSQL where there is none, and in the PostgreSQL run the
    tests of SQLite-only properties (each reason is printed once in the summary). A skip
    would say "not tested here" of what is tested elsewhere."""
    no_postgres = _pg.unavailable_reason() is not None
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        impossible = params.get("anyio_backend") == "trio" and (
            item.get_closest_marker("asyncio_only") is not None
            or any(isinstance(v, str) and v.startswith("aiosqlite") for v in params.values())
        )
        impossible = impossible or (no_postgres and _needs_postgres(item))
        impossible = impossible or (
            STORE == "postgres" and item.get_closest_marker("sqlite_only") is not None
        )
        if not impossible and _on_postgres(item):
            item.add_marker(pytest.mark.on_postgres)
        if not impossible and _on_server(item):
            item.add_marker(pytest.mark.on_server)
        (dropped if impossible else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reason = _pg.unavailable_reason()
    if reason is not None:
        terminalreporter.write_line(f"tests needing PostgreSQL were deselected: {reason}")
    if STORE == "postgres":
        terminalreporter.write_line(
            "HIVE_TEST_STORE=postgres: tests marked sqlite_only were deselected"
            " (they check properties only a SQLite file has)"
        )


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A database no runtime has opened, in this run's store, its schema at the current
    version already: a real SQLite file in a fresh folder, a copy of a template file
    migrated once per process (tests/_raw.py), or with ``HIVE_TEST_STORE=postgres`` a new
    PostgreSQL database's URL, a copy of a template database migrated once (tests/_pg.py).
    A test of what the first open does to a path holding nothing asks for ``new_db_path``."""
    return fresh_database(tmp_path)


@pytest.fixture
def new_db_path(tmp_path: Path) -> str:
    """As ``db_path``, but on SQLite a path where nothing exists yet, not even its folder:
    for the tests of what a runtime's first open does there (the folder and file made,
    their modes, every migration run on an empty file). With ``HIVE_TEST_STORE=postgres``
    the same as ``db_path`` (what those tests were given there before db_path's SQLite
    file became a template's copy)."""
    return fresh_database(tmp_path, migrated=False)


@pytest.fixture
def pg_url() -> str:
    """A fresh, empty database on the session's PostgreSQL server (tests/_pg.py)."""
    return _pg.new_database()
