"""The leader of the nodes of one PostgreSQL database, and the duties dead nodes leave.

Several runtimes (nodes, :mod:`.claim`) share the database; what a node leaves behind when
it dies must be done while the others run, once: its claims go back to the queue, its
workers (whose heartbeats went to it) are declared offline. One node at a time does it,
the *leader* (pg-design 4.3):

- **The role** is a session advisory lock (:data:`LEADER_KEY`) on a connection of the
  node's own, tried every :data:`POLL_SECONDS`; PostgreSQL drops it the moment that
  session ends (the node closed, killed, even by SIGKILL), and another node's next try
  takes it.
- **The epoch.** Taking the role bumps ``hive_leader.epoch`` (schema 17), and every duty
  is a transaction fenced by it: the leader's look for dead nodes runs under ``SELECT ...
  FOR SHARE`` of its epoch's row, and each write that does a duty (the TaskManager's
  requeue, the WorkerRegistry's offline marks) carries ``FenceLeader(epoch)``, which fails
  it whole unless the epoch is still the leader's. So a leader that lost its session
  (the server ended it, the network parted) but has not noticed yet changes nothing once
  another node took the role; and a leader stops acting the moment its session errors
  (it cannot know whether it still holds the lock), until it wins the role again.
- **Dead nodes** are those whose node lock is free (:func:`.claim.alive_sql`) while a
  claim or a live worker still names them, seen so for :data:`GRACE_SECONDS` (a node that
  lost its session with a server restart takes its lock again as it reconnects). Their
  claims are handed to this node's TaskManager (``RecoverClaims``: the code of recovery
  on open, the same runs lost, ``task.retrying`` or dead letter, events), each with the
  version it was read at (recovered only if nothing changed it since), and their workers
  to the WorkerRegistry (``WorkersLost``), by ``storage/leader.py``.
- **Leases by the database's clock.** A live node whose event loop is stuck (or whose
  process is stopped) keeps its lock, so its claims never look dead, and its own lease
  deadlines do not run. The database keeps each claimed run's lease deadline by its own
  clock (``runs.lease_deadline``, schema 18: set as the lease is set or renewed, to its
  now() plus the span the node set; a node writes a heartbeat on this store once it
  moves the lease more than half a second from what the row records),
  and the leader hands the claims of other live nodes whose deadline passed by
  :data:`REAP_GRACE_SECONDS` to its TaskManager (``RecoverClaims`` with
  ``lease_expired``: ended as their owner's expiry would, each only at the version read).
  The stuck node, when it wakes, finds those claims gone as a lost claim is found: its
  writes of them conflict, and its workers' calls get ``LeaseLostError``.
- **Workers of a stuck node.** A worker belongs to the node it talks to, which alone
  hears its heartbeats and declares it offline; a node that does not act (its process
  stopped, its event loop blocked) keeps its lock, so its workers were never declared
  offline by anyone. Each node's poll connection (this one) also holds a second advisory
  lock of its own (:func:`poll_lock_sql`: the node's key, ``objsubid`` 2), and runs a
  statement at each poll, so the server's ``pg_stat_activity.state_change`` of that
  session is the node's last poll by the database's clock. A live node whose poll session
  has sat idle for the worker liveness bound (that node's own ``worker_timeout``, which
  its poll session's ``application_name`` says, at least :data:`STUCK_FLOOR_SECONDS`),
  or has had none for as long by the leader's clock (a stuck leader's session another
  node ended), is *stuck*: no heartbeat of its workers has been heard since, so the
  leader declares its live workers offline (``WorkersLost``, as a dead node's), each
  fenced by its row still naming the stuck node. Its claims are the lease reaper's
  (above): requeued within the lease bound. A live node that cannot poll (its poll
  connection refused: ``too many connections``; or its poll lock held by a lost session
  of its own) is not stuck: it runs a statement at each poll on its own session too
  (the claim's, holding its node lock: ``DatabaseClaim.touch``, which also opens that
  session again and takes the lock again if the server ended it), and the leader takes
  for stuck only a node neither of whose two sessions ran one within the bound, by the
  database's clock. Seeing another user's session state takes the same database user or
  ``pg_read_all_stats``; a node whose poll session's state the leader cannot see is
  never taken for stuck, and its own session's unseen state is no sign of life.
- Claims of no node (``node_id`` NULL: written before schema 15) are left to recovery
  on open, as before.
- **A stuck leader** (its process stopped, its event loop or threads blocked) keeps its
  session and so the role, and while it does nobody does the duties. A node that fails to
  take the role ends the holder's session once it has sat idle for :data:`STALE_SECONDS`
  by the server's clock (``pg_terminate_backend``: the same database user may), and takes
  the role at its next poll. A live leader polls every :data:`POLL_SECONDS`, so only a
  leader that stopped acting loses its session; woken, it finds the session gone, steps
  down, and its epoch is stale.
- **A leader without its node lock** (lost, and held by another session: it writes
  nothing, ``DatabaseClaim.check``) lets the role go at its next poll and does not take
  it while it lacks the lock: its duties would all be refused, and while it polls no
  other node could take the role.

The connection is driven from worker threads, one call at a time (psycopg's async mode
runs on asyncio only), with keepalives, so that a server gone silent ends the session
(and the role) within seconds. Nothing here fails the runtime: a fault ends the node's
term, logged, and it contends again after a pause.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import psycopg.errors

from ...messages.leader import DeadClaim
from ..port import DeadNodes, LeaderDuties
from ..rows import WORKER_COLUMNS, worker_from_row
from .claim import alive_sql, node_key, node_lock_sql, poll_lock_sql

__all__ = [
    "GRACE_SECONDS",
    "LEADER_KEY",
    "POLL_SECONDS",
    "REAP_GRACE_SECONDS",
    "STALE_SECONDS",
    "STUCK_FLOOR_SECONDS",
    "Leader",
]

log = logging.getLogger("hive_orchestration.storage")

#: The advisory lock key of the leader's role ("hiveLead"); a node's key is random.
LEADER_KEY = 0x68697665_4C656164
#: How often a node tries to take the role, and the leader looks for dead nodes.
POLL_SECONDS = 0.5
#: How long a node must look dead before its duties are done (a node whose session the
#: server ended takes its lock again as its write connection reconnects).
GRACE_SECONDS = 1.0
#: How long past its deadline (by the database's clock) a live node's lease is left to
#: its node, whose own deadline (the same instant, on its clock) normally ends it first:
#: a renewal committing just then wins; one slower than this loses the claim.
REAP_GRACE_SECONDS = 2.0
#: Claims recovered in one duty (one TaskManager write); the next poll takes the rest.
BATCH = 1000
#: How long the leader's session may sit idle (no poll: its process stopped, its event
#: loop or its threads stuck) before a node that wants the role ends that session, and
#: with it the role. A live leader polls every POLL_SECONDS.
STALE_SECONDS = 10.0
#: The least time a node's poll session may sit idle before the leader takes the node
#: for stuck and declares its workers offline, whatever ``worker_timeout`` says (a live
#: node polls every POLL_SECONDS; a loop late by a second is not stuck).
STUCK_FLOOR_SECONDS = 2.0
#: Seconds a statement of the leader may take before the server cancels it.
_STATEMENT_TIMEOUT_MS = 10_000
#: Pause after a fault before contending again (doubling up to the second figure).
_RETRY = (0.5, 5.0)

_HOLDING = "('assigned', 'running')"

_TAKE = (
    "UPDATE hive_leader SET epoch = epoch + 1, node_id = %s, since = now() WHERE id = 1"
    " RETURNING epoch"
)
_FENCE = "SELECT 1 FROM hive_leader WHERE id = 1 AND epoch = %s FOR SHARE"
# The session holding the role, if it has sat idle for longer than the given seconds
# (pg_locks shows a bigint advisory key as two halves); then ended, which frees the role.
_KEY = LEADER_KEY & 0xFFFFFFFF_FFFFFFFF
_STALE = (
    "SELECT pg_terminate_backend(a.pid) FROM pg_locks l"
    " JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    f" AND l.classid::bigint = {_KEY >> 32} AND l.objid::bigint = {_KEY & 0xFFFFFFFF}"
    " AND a.state IN ('idle', 'idle in transaction')"
    " AND a.state_change < now() - make_interval(secs => %s)"
)
# The nodes that a claim or a live worker names and whose lock is free: dead.
_DEAD = (
    "SELECT n FROM ("
    f" SELECT node_id FROM tasks WHERE status IN {_HOLDING} AND node_id IS NOT NULL"
    " UNION"
    " SELECT node_id FROM workers WHERE status <> 'offline' AND node_id IS NOT NULL"
    " UNION"
    " SELECT node_id FROM execution_plans WHERE status = 'executing' AND node_id IS NOT NULL"
    f") AS holders (n) WHERE n <> %s AND NOT {alive_sql('n')}"
)
_CLAIMS = (
    f"SELECT id, version, node_id FROM tasks WHERE status IN {_HOLDING}"
    " AND node_id = ANY(%s) ORDER BY id LIMIT %s"
)
# Claims of live nodes (not this one: its own deadlines run on the loop that polls)
# whose lease passed its deadline by the database's clock, by REAP_GRACE_SECONDS (schema
# 18: runs.lease_deadline, set by the database as the lease is set or renewed, NULL once
# the run ends).
_EXPIRED = (
    "SELECT t.id, t.version, t.node_id FROM runs r JOIN tasks t ON t.id = r.task_id"
    " WHERE r.lease_deadline IS NOT NULL"
    " AND r.lease_deadline < now() - make_interval(secs => %s)"
    f" AND t.status IN {_HOLDING} AND t.node_id IS NOT NULL AND t.node_id <> %s"
    " ORDER BY t.id LIMIT %s"
)


def _idle_sql(alias: str) -> str:
    # For how long by the database's clock the session ``alias`` of pg_stat_activity has
    # sat idle: 0 while it runs a statement; NULL when its state is not ours to see.
    return (
        f"CASE WHEN {alias}.state IN ('idle', 'idle in transaction')"
        f" THEN extract(epoch FROM now() - {alias}.state_change)::float8"
        f" WHEN {alias}.state IS NULL THEN NULL ELSE 0 END"
    )


# The live nodes (not this one) that watch a live worker, each with whether its poll
# session (the second lock, objsubid 2) is there, and for how long it has sat idle, and
# its application_name, which says the node's worker_timeout (_APPLICATION); and for how
# long its own session (the one holding its node lock, objsubid 1) has sat idle, which
# a node that cannot poll keeps short (Leader._sign_of_life).
_WATCHERS = (
    f"SELECT w.n, a.application_name, a.pid IS NOT NULL, {_idle_sql('a')}, {_idle_sql('o')}"
    " FROM (SELECT DISTINCT node_id FROM workers WHERE status <> 'offline'"
    " AND node_id IS NOT NULL AND node_id <> %s) AS w (n)"
    f" LEFT JOIN pg_locks l ON {poll_lock_sql('w.n', 'l')}"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
    f" LEFT JOIN pg_locks ol ON {node_lock_sql('w.n', 'ol')}"
    " LEFT JOIN pg_stat_activity o ON o.pid = ol.pid"
    f" WHERE {alive_sql('w.n')}"
)
#: A poll session's application_name: the node's ``worker_timeout`` in it is the
#: liveness bound of that node's workers, which the leader keeps when it is stuck.
_APPLICATION = "hive-orchestration:leader worker_timeout={:g}"
_TIMEOUT_IN_NAME = re.compile(r" worker_timeout=([0-9.e+-]+)$")
_PLANS = "SELECT count(*) FROM execution_plans WHERE status = 'executing' AND node_id = ANY(%s)"
_WORKERS = (
    f"SELECT {WORKER_COLUMNS}, node_id FROM workers"
    " WHERE status <> 'offline' AND node_id = ANY(%s) ORDER BY id LIMIT %s"
)

Connection = psycopg.Connection[tuple[Any, ...]]


class Leader:
    """This node's :class:`~hive_orchestration.storage.port.Leadership` (see the module):
    ``node_id`` names it (its claim's id), ``duties`` does what it finds."""

    def __init__(
        self,
        url: str,
        node_id: str,
        duties: LeaderDuties,
        *,
        connect_timeout: float,
        poll: float = POLL_SECONDS,
        grace: float = GRACE_SECONDS,
        reap_grace: float = REAP_GRACE_SECONDS,
        stale: float | None = None,
        worker_timeout: float = 30.0,
        touch: Callable[[], bool] | None = None,
        held: Callable[[], bool] | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._url = url
        self.node_id = node_id
        self._duties = duties
        self._connect_timeout = connect_timeout
        self._poll = poll
        self._grace = grace
        self._reap_grace = reap_grace
        self._stale = STALE_SECONDS if stale is None else stale
        # A node whose poll session sat idle this long is stuck (see the module): its
        # own worker_timeout when its session says it, else this node's.
        self._worker_timeout = worker_timeout
        self._stuck_after = max(worker_timeout, STUCK_FLOOR_SECONDS)
        # A statement on the node's own session (DatabaseClaim.touch): its sign of life
        # to the leader while it has no poll session (see the module).
        self._touch = touch
        # Whether the node holds its node lock (DatabaseClaim.held): one that does not
        # writes nothing, so it neither takes the role nor keeps it (_step).
        self._held = held
        self._clock = clock
        self._conn: Connection | None = None
        self._epoch: int | None = None
        # Dead-looking node -> when it was first seen so (the clock's time).
        self._suspects: dict[str, float] = {}
        # Live node with live workers and no poll session -> when first seen so.
        self._unpolled: dict[str, float] = {}
        # Whether this connection holds the node's poll lock (taken at the first poll).
        self._polling = False
        self._polled = anyio.Event()

    @property
    def epoch(self) -> int | None:
        return self._epoch

    async def polled(self) -> None:
        await self._polled.wait()

    async def run(self) -> None:
        delay = _RETRY[0]
        last: float | None = None  # when the last poll began
        pause = self._poll  # how long it meant to sleep after it
        # Its own thread, never waiting behind the app's to_thread calls in anyio's
        # default limiter: a node whose app fills that is busy, not stuck, and its polls
        # are what the leader reads as its sign of life.
        limiter = anyio.CapacityLimiter(1)
        try:
            while True:
                now = self._clock()
                if last is not None and now - last >= pause + STUCK_FLOOR_SECONDS:
                    # This node did not poll for that long (a poll, its duties or a stall
                    # of the process or loop): the leader may have taken it for stuck,
                    # and declared its workers offline meanwhile.
                    await self._duties.woke(now - last)
                last, pause = now, self._poll
                try:
                    found = await anyio.to_thread.run_sync(self._step, now, limiter=limiter)
                except (psycopg.Error, OSError) as exc:
                    self._step_down(f"{type(exc).__name__}: {exc}")
                    await self._duties.leading(None)
                    self._polled.set()
                    pause = delay
                    await self._unpolled_for(delay, limiter)
                    delay = min(delay * 2, _RETRY[1])
                    continue
                delay = _RETRY[0]
                # A statement on its own session at each poll: the sign of life when its
                # poll lock is held by a lost session of its own (whose idle time grows),
                # and how a session of its own the server ended is found and its node
                # lock taken again (DatabaseClaim.touch), before the leader's grace.
                await anyio.to_thread.run_sync(self._sign_of_life, limiter=limiter)
                await self._duties.leading(self._epoch)
                self._polled.set()
                if found is not None:
                    await self._duties.dead(found)
                await anyio.sleep(self._poll)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close, limiter=limiter)

    async def _unpolled_for(self, span: float, limiter: anyio.CapacityLimiter) -> None:
        """Wait ``span`` seconds (before trying to poll again) giving the sign of life
        of a node that cannot poll at every poll meanwhile (:meth:`_sign_of_life`): a
        live node that cannot open its poll connection (the server's or its role's
        connection limit reached, say) is not stuck."""
        end = self._clock() + span
        while True:
            await anyio.to_thread.run_sync(self._sign_of_life, limiter=limiter)
            left = end - self._clock()
            if left <= 0:
                return
            await anyio.sleep(min(self._poll, left))

    # -- in a worker thread, one call at a time ---------------------------------------------

    def _sign_of_life(self) -> None:
        """A statement on the node's own session, whose idle time the leader reads beside
        the poll session's (:meth:`_stuck`); a session found lost is opened again and
        the node's lock taken again (its lock was free meanwhile: the node looked dead)."""
        if self._touch is not None and not self._touch():
            log.debug("leader: node %s could not give its sign of life", self.node_id)

    def _connect(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._close()
        conn = psycopg.connect(
            self._url,
            autocommit=True,
            application_name=_APPLICATION.format(self._worker_timeout),
            connect_timeout=max(1, round(self._connect_timeout)),
            options=f"-c statement_timeout={_STATEMENT_TIMEOUT_MS}",
            # A server or network gone silent ends the session (and so the role) in
            # seconds; the leader finds out at its next poll.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=10_000,
        )
        self._conn = conn
        self._polling = False
        return conn

    def _step(self, now: float) -> DeadNodes | None:
        """One poll: take the role if it is free, else (as the leader) look for dead
        nodes' duties under the epoch. Raises psycopg's errors (the caller steps down)."""
        conn = self._connect()
        if not self._polling:
            # The node's poll lock: its session's activity is the node's sign of life to
            # the leader (a try: a lost session of this node may hold it a while yet).
            key = node_key(self.node_id) & 0xFFFFFFFF_FFFFFFFF
            halves = (_int4(key >> 32), _int4(key & 0xFFFFFFFF))
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", halves).fetchone()
            self._polling = bool(row is not None and row[0])
        if self._held is not None and not self._held():
            # This node lost its node lock and could not take it again: it writes
            # nothing (DatabaseClaim.check), so every duty it took on would be refused,
            # and while it polls as the leader no other node may take the role: the
            # duties of the whole database (dead nodes' claims, expired leases, stuck
            # nodes' workers) would wait for its lock. It lets the role go, and takes it
            # again only once it holds its lock.
            if self._epoch is not None:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_KEY,))
                log.warning(
                    "leader: node %s lets the role go (epoch %d): it does not hold its lock",
                    self.node_id,
                    self._epoch,
                )
                self._epoch = None
                self._suspects.clear()
                self._unpolled.clear()
            else:
                conn.execute("SELECT 1")  # a poll all the same: its sign of life
            return None
        if self._epoch is None:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_KEY,)).fetchone()
            if row is None or not row[0]:
                # Held: by a live leader, which polls, or by a stuck one (its process
                # stopped, its loop blocked), whose session keeps the role and whose
                # duties nobody does. Such a session is ended (by the database's clock
                # of its last statement) and the role taken at the next poll; the old
                # leader, if it wakes, finds its session gone and steps down, and its
                # epoch is stale by then, so its duties change nothing.
                ended = conn.execute(_STALE, (self._stale,)).fetchall()
                if ended:
                    log.warning(
                        "leader: node %s ended the session of a leader idle for over %gs",
                        self.node_id,
                        self._stale,
                    )
                return None
            try:
                taken = conn.execute(_TAKE, (self.node_id,)).fetchone()
            except psycopg.errors.UndefinedTable:
                # The database is not migrated yet (a node opening it first): next poll.
                conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_KEY,))
                return None
            assert taken is not None
            self._epoch = int(taken[0])
            self._suspects.clear()
            self._unpolled.clear()
            log.info("leader: node %s took the role (epoch %d)", self.node_id, self._epoch)
        return self._look(conn, self._epoch, now)

    def _look(self, conn: Connection, epoch: int, now: float) -> DeadNodes | None:
        with conn.transaction():
            if conn.execute(_FENCE, (epoch,)).fetchone() is None:
                # Another node took the role since (this one's session was lost and taken
                # again without its noticing): this term is over.
                conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_KEY,))
                self._epoch = None
                log.warning(
                    "leader: node %s lost the role (epoch %d is stale)", self.node_id, epoch
                )
                return None
            dead = {str(row[0]) for row in conn.execute(_DEAD, (self.node_id,))}
            expired = tuple(
                DeadClaim(str(task_id), int(version), str(node))
                for task_id, version, node in conn.execute(
                    _EXPIRED, (self._reap_grace, self.node_id, BATCH)
                )
                if str(node) not in dead  # a dead node's claims go with its own duty
            )
            for node in list(self._suspects):
                if node not in dead:
                    del self._suspects[node]  # came back, or nothing of it is left
            for node in dead:
                self._suspects.setdefault(node, now)
            due = sorted(n for n in dead if now - self._suspects[n] >= self._grace)
            stuck = self._stuck(conn, now)
            claims: tuple[DeadClaim, ...] = ()
            plans = 0
            if due:
                claims = tuple(
                    DeadClaim(str(task_id), int(version), str(node))
                    for task_id, version, node in conn.execute(_CLAIMS, (due, BATCH))
                )
                counted = conn.execute(_PLANS, (due,)).fetchone()
                plans = 0 if counted is None else int(counted[0])
            watched = due + stuck
            rows = conn.execute(_WORKERS, (watched, BATCH)).fetchall() if watched else []
        if not claims and not rows and not plans and not expired:
            return None
        return DeadNodes(
            epoch=epoch,
            nodes=tuple(due),
            claims=claims,
            workers=tuple(worker_from_row(row[:-1]) for row in rows),
            worker_nodes=tuple(str(row[-1]) for row in rows),
            plans=plans,
            expired=expired,
            stuck=tuple(stuck),
        )

    def _stuck(self, conn: Connection, now: float) -> list[str]:
        """The live nodes watching live workers that have given no sign of life for the
        liveness bound: neither a poll (by the database's clock of their poll session's
        last statement, or, with no poll session, by this leader's clock since it first
        found none) nor a statement on their own session (the one holding their node
        lock, by the database's clock), which a node that cannot poll runs at each poll
        instead. A session whose state is not ours to see gives no sign either way."""
        stuck: list[str] = []
        missing: set[str] = set()
        for node, name, polled, idle, own_idle in conn.execute(_WATCHERS, (self.node_id,)):
            node = str(node)
            if not polled:
                missing.add(node)
                since = self._unpolled.setdefault(node, now)
                bound = self._stuck_after
                quiet = now - since >= bound
            else:
                bound = self._bound(name)
                quiet = idle is not None and float(idle) >= bound
            if quiet and (own_idle is None or float(own_idle) >= bound):
                stuck.append(node)
        for node in list(self._unpolled):
            if node not in missing:
                del self._unpolled[node]
        return sorted(stuck)

    def _bound(self, application_name: object) -> float:
        """How long the poll session of a node named ``application_name`` may sit idle:
        that node's ``worker_timeout`` (a worker there heartbeats by it), at least
        :data:`STUCK_FLOOR_SECONDS`; this node's when the name does not say it."""
        found = (
            _TIMEOUT_IN_NAME.search(application_name) if isinstance(application_name, str) else None
        )
        if found is None:
            return self._stuck_after
        try:
            timeout = float(found.group(1))
        except ValueError:
            return self._stuck_after
        if not math.isfinite(timeout):
            return self._stuck_after
        return max(timeout, STUCK_FLOOR_SECONDS)

    def _step_down(self, why: str) -> None:
        if self._epoch is not None:
            log.warning("leader: node %s stops acting as the leader: %s", self.node_id, why)
        else:
            log.debug("leader: node %s cannot contend for the role: %s", self.node_id, why)
        self._epoch = None
        self._suspects.clear()
        self._unpolled.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _close(self) -> None:
        """Let the role go at once (not when the server notices the closed session: a
        node waiting for it would wait that long) and close the connection."""
        conn, self._conn = self._conn, None
        held, self._epoch = self._epoch, None
        if conn is None:
            return
        with contextlib.suppress(psycopg.Error):
            if held is not None and not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_KEY,))
        conn.close()


def _int4(half: int) -> int:
    """An unsigned 32-bit half of a key as the signed int4 ``pg_advisory_lock(int, int)``
    takes (pg_locks shows it back as the unsigned oid)."""
    return half - (1 << 32) if half >= 1 << 31 else half
