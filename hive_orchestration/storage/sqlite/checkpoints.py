"""Checkpoints of the write-ahead log, off the commit path.

SQLite's automatic checkpoint runs inside the commit that takes the WAL past its
threshold (1 000 pages by default): that commit copies every page the WAL holds into the
database file and fsyncs it before it returns, and whoever waits for it waits that long.
With a million queued tasks a claim and its completion write about 15 pages each, so one
commit in 66 was such a commit (2 to 5 ms more at the p50 of a loaded machine), well
over the 1% a claim's p99 can hide.

At ``synchronous=NORMAL`` (no fsync per commit: the checkpoint's fsyncs are the only
ones, and a commit that runs one waits for them) the write connection's own threshold is
raised to :data:`BACKSTOP_PAGES`, and a
:class:`Checkpointer` does the copying instead: a thread with a connection of its own that
runs ``PRAGMA wal_checkpoint(PASSIVE)`` about every :data:`PAGES` pages written, while
commits go on (a passive checkpoint takes no lock a writer waits for; SQLite's checkpoint
lock keeps it and the writer's own from running at once, and the one that finds it taken
skips its turn). It only copies committed pages and fsyncs the database file before the
WAL may be reused, exactly as the automatic checkpoint does, so nothing about durability
changes: a commit is durable once its WAL frames are synced, as before, and a process
killed in a checkpoint leaves a WAL that the next open checkpoints again.

Bounded: a passive checkpoint rarely copies the whole WAL while commits keep coming (one
lands while it runs), and the WAL starts over only when a writer finds it all copied. The
writer's automatic checkpoint at :data:`BACKSTOP_PAGES` does that: it copies what the
thread has not yet copied (about :data:`PAGES` pages at most), on the commit path but
rarely (one commit in several hundred), and the next commit starts the WAL over. While the
thread holds SQLite's checkpoint lock the writer's turn is skipped, so the WAL may pass
the backstop by what is committed during one of the thread's checkpoints. A reader holding
an old snapshot keeps the WAL from starting over, as it always did; when it ends, the next
checkpoint and commit do (when the thread's is that checkpoint, what is committed while it
copies all the reader held back goes on the end of the WAL first). The WAL starts over at
times the writer does not choose, more often than SQLite's own checkpoint made it: on a
full disk a write may then still be accepted, in space the WAL file already has (and is as
durable as any other).

Only at ``NORMAL`` (:func:`off_the_commit_path`). At ``FULL`` every commit fsyncs the WAL
anyway, and on the 2-core machine of performance.md the thread's fsyncs of the database
file, beside the commits' own, measured no better for a claim's p99 (the ratio to bare
sqlite3's p99 within its drift, three pairs of runs) and worse for a writer beside the
largest read (p99 23-74 ms against 23-46 ms before, in six pairs of runs of
``bench/reads.py``; its checkpoints overlapped 18 of 543 slow calls, so how is not
established): there SQLite checkpoints in the commit, as before.

The thread is told of each commit (:meth:`Checkpointer.committed`: a count and a
``threading.Event``, no I/O) and checkpoints once the commits since its last checkpoint
hold about :data:`PAGES` pages, by the pages per commit it found last time (SQLite's
answer to a checkpoint says how many the WAL holds): a burst of commits is seen at its
first commits, not a second later, and an idle database costs nothing. Two checkpoints are
at least :data:`MIN_GAP` seconds apart.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from typing import Literal

__all__ = ["BACKSTOP_PAGES", "PAGES", "CheckpointStats", "Checkpointer", "off_the_commit_path"]

log = logging.getLogger("hive_orchestration.storage")

#: Pages of WAL the thread lets build up between its checkpoints (SQLite's default
#: automatic threshold).
PAGES = 1000
#: The write connection's ``wal_autocheckpoint``: the bound on the WAL while a checkpoint
#: cannot finish for commits landing during it (see the module's docstring).
BACKSTOP_PAGES = 4 * PAGES
#: Seconds between two checkpoints at least.
MIN_GAP = 0.01


def off_the_commit_path(synchronous: Literal["FULL", "NORMAL"]) -> bool:
    """Whether a database at this ``synchronous`` gets the checkpoint thread."""
    return synchronous == "NORMAL"


@dataclass(frozen=True, slots=True)
class CheckpointStats:
    """What the checkpoint thread did: checkpoints run, the pages they found in the WAL
    and copied, and the checkpoints that failed (logged; the writer's backstop goes on)."""

    checkpoints: int
    pages_copied: int
    failures: int


class Checkpointer:
    """A thread that checkpoints the WAL of the database at ``path`` on a connection of
    its own. :meth:`start` it once the write connection has set WAL mode; :meth:`close`
    it (blocking: from a worker thread) before the write connection closes, so that the
    writer's close is the last and checkpoints and removes the WAL as ever."""

    def __init__(
        self,
        path: str,
        *,
        uri: bool,
        synchronous: Literal["FULL", "NORMAL"],
        busy_timeout: float,
    ) -> None:
        self._path = path
        self._uri = uri
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._poked = threading.Event()
        self._commits = 0  # told so far (only ever grows; read by the thread)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hive-checkpoints", daemon=True)
        self._checkpoints = 0
        self._pages = 0
        self._failures = 0

    def start(self) -> None:
        self._thread.start()

    def committed(self) -> None:
        """A commit wrote pages to the WAL: checkpoint them in a while (never blocks)."""
        self._commits += 1
        self._poked.set()

    def close(self) -> None:
        """Stop the thread, after the checkpoint it is running if any (blocking)."""
        self._stopping.set()
        self._poked.set()
        if self._thread.is_alive():
            self._thread.join()

    def statistics(self) -> CheckpointStats:
        return CheckpointStats(self._checkpoints, self._pages, self._failures)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(
                self._path,
                uri=self._uri,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._busy_timeout,
            )
        except sqlite3.Error as exc:
            log.warning("no checkpoint thread (%s): the write connection checkpoints", exc)
            return
        try:
            # The checkpoint's fsyncs follow this connection's setting: the runtime's.
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._loop(conn)
        finally:
            conn.close()

    def _loop(self, conn: sqlite3.Connection) -> None:
        last_log = 0  # frames in the WAL at the last checkpoint
        last_commits = 0  # commits told of by then
        per_commit = float(PAGES)  # unknown yet: the first commit is checkpointed
        while True:
            self._poked.wait()
            if self._stopping.is_set():
                return
            self._poked.clear()
            commits = self._commits
            if (commits - last_commits) * per_commit < PAGES:
                continue  # fewer pages than that since the last checkpoint, by the estimate
            try:
                row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                self._failures += 1
                log.warning("a WAL checkpoint failed: %s", exc)
            else:
                busy, frames, copied = (int(x) for x in row)
                if busy or frames < 0:
                    # The writer's own checkpoint holds the lock: it copies what there is.
                    # Nothing learnt; the next commit asks again.
                    continue
                self._checkpoints += 1
                self._pages += max(0, copied)
                # Frames since the last checkpoint (fewer than then: the WAL started
                # over in between, and all it holds is new).
                grown = frames - last_log if frames >= last_log else frames
                if grown > 0:
                    per_commit = max(1.0, grown / max(1, commits - last_commits))
                last_log = frames
            last_commits = commits
            if self._stopping.wait(MIN_GAP):
                return
