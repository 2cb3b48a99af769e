"""A throwaway PostgreSQL cluster for the test session, and a fresh database per test.

Where the server comes from:

- ``HIVE_TEST_PG`` (a server URL, e.g. ``postgresql://postgres@127.0.0.1:5433/hive``): used
  as is; ``.ci/run`` starts one cluster for both pytest runs and exports it.
- otherwise a cluster is made on first use: ``initdb`` in a temporary folder from the newest
  ``/usr/lib/postgresql/*/bin``, started on a free loopback port with its unix socket inside
  that folder. initdb and postgres refuse to run as root, so as root both run as the
  ``postgres`` user through ``runuser -u postgres --``.

One cluster serves the whole session, pytest-xdist workers included: the controller process
only makes an empty shared folder (:func:`configure_session`, no cluster yet, so a run that
needs no PostgreSQL pays nothing); the first worker that needs a database starts the cluster
under a lock in that folder and the others reuse it; the controller stops and removes it at
the end (:func:`finish_session`). Measured at load ~1.5: one shared cluster costs one
initdb + start (~1.5 s) against four of them in parallel with ``-n 4`` (~4 s of CPU on a
2-core machine, and four times the memory) for no gain: creating a database is per test.

:func:`new_database` creates a uniquely named database per call and never drops it: ``DROP
DATABASE`` checkpoints and costs seconds (pg-design section 1), while ``CREATE DATABASE``
from the template costs ~40 ms; the whole cluster is thrown away at the end instead.

``new_database(migrated=True)`` (what ``db_path`` gives in the PostgreSQL run) clones a
template database instead: one per server and schema, taken to the current version once by
the store's own migration steps, then copied with ``CREATE DATABASE ... TEMPLATE``. A
runtime's first open of an empty database creates the schema, 17 versions of DDL each in
its own transaction: measured at load ~6, 116 ms against 43 ms on a clone (the copy itself,
53 ms, costs no more than an empty database's 63 ms), once per test of the PostgreSQL run.
A clone is what a runtime's migration leaves and nothing else: no runtime has opened it (no
node, no event, no leader's epoch taken). Tests of the migration itself ask for ``pg_url``,
which stays empty. A process makes its next database of each kind in a thread while a
test runs (:func:`new_database`), so a test's setup no longer waits for the copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import itertools
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "BIN_GLOB_ENV",
    "DISK_TMP_ENV",
    "SHARED_ENV",
    "URL_ENV",
    "configure_session",
    "finish_session",
    "keep_on_disk",
    "new_database",
    "server_url",
    "unavailable_reason",
]

#: A PostgreSQL server to use instead of starting one (``.ci/run`` sets it).
URL_ENV = "HIVE_TEST_PG"
#: The folder the controller shares with its xdist workers (inherited through the
#: environment: workers are spawned after ``pytest_configure``).
SHARED_ENV = "_HIVE_TEST_PG_SHARED"
#: The controller's pid: the cluster goes when it does.
OWNER_ENV = "_HIVE_TEST_PG_OWNER"

#: Where the cluster's folder is made: the system's temporary folder, as it was before
#: the suite moved ``TMPDIR`` to memory (tests/conftest.py, :func:`keep_on_disk`).
DISK_TMP_ENV = "_HIVE_TEST_DISK_TMP"

_USER = "postgres"


def keep_on_disk(folder: str) -> None:
    """Make the cluster's folder under ``folder`` whatever ``TMPDIR`` becomes (the suite
    puts its own temporary files on a tmpfs): the cluster's databases, one per test, add
    up to gigabytes, which a tmpfs would hold in memory, and its server runs as the
    ``postgres`` user, who cannot enter a folder private to root."""
    os.environ.setdefault(DISK_TMP_ENV, folder)


#: Where PostgreSQL's programs are looked for (Debian's layout); a test points it elsewhere
#: to see the suite without them.
BIN_GLOB_ENV = "HIVE_TEST_PG_BIN_GLOB"


def _pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, if any."""
    pattern = os.environ.get(BIN_GLOB_ENV, "/usr/lib/postgresql/*/bin")
    found = [Path(p) for p in glob.glob(pattern) if Path(p, "initdb").exists()]
    if not found:
        return None

    def version(p: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in p.parent.name.split("."))
        except ValueError:
            return (0,)

    return max(found, key=version)


def unavailable_reason() -> str | None:
    """Why tests needing PostgreSQL cannot run here, or None when they can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if os.environ.get(URL_ENV):
        return None
    if _pg_bin() is None:
        return f"no PostgreSQL under /usr/lib/postgresql/*/bin and {URL_ENV} is unset"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_USER)
        except KeyError:
            return f"running as root and there is no {_USER!r} user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


# --- the cluster ------------------------------------------------------------------------


def _as_pg() -> list[str]:
    return ["runuser", "-u", _USER, "--"] if os.geteuid() == 0 else []


def _pg_user() -> str:
    return _USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}; its log ends:\n{tail}")


def _start_cluster(owner: int, shared: str | None = None) -> dict[str, Any]:
    """initdb + start; returns what :func:`_stop_cluster` needs and the server URL. The
    cluster (and ``shared``) is removed once process ``owner`` is gone, however it ended."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        raise RuntimeError(unavailable_reason() or "PostgreSQL is not installed")
    folder = Path(tempfile.mkdtemp(prefix="hive-pg-", dir=os.environ.get(DISK_TMP_ENV)))
    if os.geteuid() == 0:
        shutil.chown(folder, _USER, _USER)
    data, log, user = folder / "data", folder / "server.log", _pg_user()
    # --no-sync skips initdb's own fsync of the new files. The server runs with
    # synchronous_commit on, so a commit's WAL has been written to the kernel before the
    # reply: it survives the death of any process, the server's own included (a SIGKILL,
    # an immediate stop), which is every crash the tests make. It runs with fsync off:
    # fsync only adds survival of the machine's own crash or power loss, which no test
    # makes, and costs a disk flush per commit (~5 ms here) and more per CREATE TABLE:
    # measured at load ~13, a runtime's first open of an empty database (the schema's
    # creation, once per test on PostgreSQL) took 0.97 s with it, 0.5 s without.
    initdb = [str(pg_bin / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8"]
    _run([*_as_pg(), *initdb, "--no-locale", "--no-sync"], folder / "initdb.log")
    # The port is picked free just before the start; another process may take it in
    # between, so a failed start is retried on a new port a few times.
    for attempt in range(3):
        port = _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} "
            # Several runtimes at once (writer + readers + listener each) per xdist worker.
            "-c max_connections=300 -c fsync=off"
        )
        try:
            pg_ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-w"]
            _run([*_as_pg(), *pg_ctl, "-o", options, "start"], folder / "pg_ctl.log")
            break
        except RuntimeError:
            if attempt == 2:
                _stop_cluster({"bin": str(pg_bin), "folder": str(folder)})
                raise
    cluster = {
        "bin": str(pg_bin),
        "folder": str(folder),
        "url": f"postgresql://{user}@127.0.0.1:{port}/postgres",
    }
    _watch(cluster, owner, shared)
    return cluster


def _watch(cluster: dict[str, Any], owner: int, shared: str | None) -> None:
    """A watchdog in its own session: once ``owner`` has ended it stops the cluster and
    removes its folders. A pytest killed (a timeout, SIGKILL) never runs its unconfigure
    hook, and a cluster left running holds memory and a port on a shared machine. After a
    normal end :func:`finish_session` has done it already, and the watchdog finds nothing."""
    folder = str(cluster["folder"])
    pg_ctl = [*_as_pg(), str(Path(cluster["bin"]) / "pg_ctl"), "-D", f"{folder}/data"]
    stop = shlex.join([*pg_ctl, "-m", "immediate", "-w", "stop"])
    remove = shlex.join(["rm", "-rf", folder, *([shared] if shared else [])])
    script = f"while kill -0 {owner} 2>/dev/null; do sleep 2; done; {stop}; {remove}"
    # Backgrounded by the shell, which returns at once: nothing is left to wait for.
    subprocess.run(
        ["sh", "-c", f"( {script} ) >/dev/null 2>&1 &"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        check=True,
    )


def _stop_cluster(cluster: dict[str, Any]) -> None:
    folder = Path(cluster["folder"])
    if (folder / "data" / "postmaster.pid").exists():
        # immediate: nothing in a throwaway cluster needs a shutdown checkpoint.
        pg_ctl = [str(Path(cluster["bin"]) / "pg_ctl"), "-D", str(folder / "data")]
        subprocess.run(
            [*_as_pg(), *pg_ctl, "-m", "immediate", "-w", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    _remove_later(str(folder))


def _remove_later(*paths: str) -> None:
    """Remove ``paths`` in a process of its own, which this one does not wait for. A
    session's cluster holds a database per test (~7.5 MB each: 6 GB after the PostgreSQL
    selection's 837), and deleting that on this machine's disk (ext4 mounted with
    ``discard``: each freed extent is discarded as it is freed) held the pytest process for
    minutes after its summary (measured: the selection's run, 21.5 min by pytest's count,
    took 27.5 min to return). The server is stopped already; nothing waits for the files."""
    script = shlex.join(["rm", "-rf", "--", *paths])
    subprocess.run(
        ["sh", "-c", f"( {script} ) >/dev/null 2>&1 &"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        check=True,
    )


# --- the session: one cluster shared by the controller's workers -------------------------


def configure_session() -> None:
    """In the controller (or a run without xdist): name the shared folder (made by the
    first worker that needs it, so a run without PostgreSQL leaves nothing behind)."""
    if os.environ.get(URL_ENV) or os.environ.get(SHARED_ENV):
        return
    name = f"hive-pg-session-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[SHARED_ENV] = os.path.join(tempfile.gettempdir(), name)
    os.environ[OWNER_ENV] = str(os.getpid())


def finish_session() -> None:
    """In the controller: stop the cluster a worker may have started, remove the folder."""
    shared = os.environ.pop(SHARED_ENV, None)
    os.environ.pop(OWNER_ENV, None)
    if shared is None:
        return
    record = Path(shared, "cluster.json")
    if record.exists():
        _stop_cluster(json.loads(record.read_text()))
    _remove_later(shared)


_lock = threading.Lock()
_server: str | None = None


def server_url() -> str:
    """The session's server (``HIVE_TEST_PG``, or the shared cluster, started if need be)."""
    global _server
    with _lock:
        if _server is None:
            _server = os.environ.get(URL_ENV) or _shared_cluster_url()
        return _server


def _shared_cluster_url() -> str:
    shared = os.environ.get(SHARED_ENV)
    if shared is None:
        # Imported outside a pytest session (a script): own cluster, stopped at exit.
        import atexit

        cluster = _start_cluster(os.getpid())
        atexit.register(_stop_cluster, cluster)
        return str(cluster["url"])
    os.makedirs(shared, mode=0o700, exist_ok=True)
    with open(Path(shared, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = Path(shared, "cluster.json")
        if not record.exists():
            cluster = _start_cluster(int(os.environ.get(OWNER_ENV, os.getpid())), shared)
            record.write_text(json.dumps(cluster))
        return str(json.loads(record.read_text())["url"])


# --- databases ----------------------------------------------------------------------------

_admin: Any = None
_names = itertools.count(1)


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead (user, host, port and options kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _connect_admin(server: str) -> Any:
    """An autocommit connection to the server's own database, closed at exit."""
    import atexit

    import psycopg

    conn = psycopg.connect(server, autocommit=True)
    # Closed at exit, not left to the garbage collector: under pytest's
    # filterwarnings=error an open connection collected at exit printed
    # "Exception ignored ... ResourceWarning: ... deleted while still open".
    atexit.register(conn.close)
    return conn


def _create(conn: Any, server: str, *, migrated: bool) -> str:
    """Create a uniquely named database on ``conn`` and return its URL."""
    # Unique across processes and across runs on one HIVE_TEST_PG server.
    name = f"hive_t_{uuid.uuid4().hex[:12]}_{next(_names)}"
    with contextlib.closing(conn.cursor()) as cur:
        if migrated:
            cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_template(server, cur)}"')
        else:
            cur.execute(f'CREATE DATABASE "{name}"')
    return with_database(server, name)


#: The next database of each kind (migrated or empty), made in the background while a
#: test runs (see :func:`new_database`), and the thread and connection that make them.
_spares: dict[bool, concurrent.futures.Future[str]] = {}
_spare_maker: concurrent.futures.ThreadPoolExecutor | None = None
_spare_admin: Any = None


def _make_spare(server: str, migrated: bool) -> str:
    global _spare_admin
    if _spare_admin is None or _spare_admin.closed:
        _spare_admin = _connect_admin(server)
    return _create(_spare_admin, server, migrated=migrated)


def new_database(*, migrated: bool = False) -> str:
    """Create a fresh, uniquely named database and return its URL (never dropped): empty,
    or with ``migrated`` a copy of the template at the current schema version.

    Each kind is made one ahead: the database returned was created in a thread of this
    process while the previous test ran, and the next one of its kind is started before
    this returns. The copy (~40-60 ms of the server's work, ~65 ms of each test's setup
    at load ~6, in each of the ~1,100 tests of CI's PostgreSQL run) then overlaps a test,
    most of which waits, instead of adding to its setup. A spare is the same fresh
    database, made moments earlier, that nothing has opened: the database a test is given
    is no different. If making the spare failed, the database is made again here, where
    the error is the test's."""
    global _admin, _spare_maker
    server = server_url()
    url: str | None = None
    with _lock:
        spare = _spares.pop(migrated, None)
    if spare is not None:
        with contextlib.suppress(Exception):
            url = spare.result()
    if url is None:
        with _lock:
            if _admin is None or _admin.closed:
                _admin = _connect_admin(server)
            url = _create(_admin, server, migrated=migrated)
    with _lock:
        if _spare_maker is None:
            # Its thread is joined at exit before the connections close (atexit).
            _spare_maker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="hive-test-pg-spare"
            )
        if migrated not in _spares:
            _spares[migrated] = _spare_maker.submit(_make_spare, server, migrated)
    return url


#: The advisory lock under which a template is made (on the server's own database, which
#: every process's admin connection uses): "hivetmpl" in ASCII.
_TEMPLATE_LOCK = 0x68697665_746D706C
_templates: dict[str, str] = {}


def _template(server: str, cur: Any) -> str:
    """The name of the server's template at the current schema, made if it is not there
    yet (by whichever process gets there first: the others wait on the lock, then find it).
    It is named after a digest of the migrations, so a checkout with another schema
    sharing the server gets its own; it is built under a temporary name and renamed once
    complete, so a process killed halfway leaves no half-made template behind that name."""
    if server in _templates:
        return _templates[server]
    from hive_orchestration.storage.pg import schema

    digest = hashlib.sha256(repr((schema._BOOTSTRAP, schema.MIGRATIONS)).encode())
    name = f"hive_template_{digest.hexdigest()[:16]}"
    cur.execute("SELECT pg_advisory_lock(%s)", (_TEMPLATE_LOCK,))
    try:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            building = f"{name}_{uuid.uuid4().hex[:8]}"
            cur.execute(f'CREATE DATABASE "{building}"')
            _migrate(with_database(server, building))
            cur.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
    finally:
        cur.execute("SELECT pg_advisory_unlock(%s)", (_TEMPLATE_LOCK,))
    _templates[server] = name
    return name


def _migrate(url: str) -> None:
    """Take the database at ``url`` to the current schema version by the store's own steps
    (what ``storage/pg/schema.py``'s ``migrate`` runs at a runtime's open, one version per
    transaction), on a connection set up as the store's are."""
    import psycopg

    from hive_orchestration.storage.pg import schema

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        more = True
        while more:
            version, more = schema._step(conn, schema.SCHEMA_VERSION)
    assert version == schema.SCHEMA_VERSION, version
