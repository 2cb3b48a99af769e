"""The ``hive-orchestration`` command line (also ``python -m hive_orchestration``).

Commands (each takes ``--db PATH``, default ``hive/db/hive-internal.db``):

- ``demo``: run the embedded runtime with the example agents, live.
- ``status``: task counts by status, active workers, executing plans with progress.
- ``tasks [--status S] [--type T] [--limit N]``: tasks, newest first.
- ``task ID [--events N]``: one task, its runs and its newest events.
- ``workers [--status S]``: registered workers, newest heartbeat first.
- ``plans [--status S] [--limit N]``: plans with their progress, newest first.
- ``plan ID``: one plan, its subtasks in dependency layers with their status, progress.
- ``events [--follow] [--pattern GLOB] [--after SEQ] [--task ID] [--plan ID]
  [--correlation ID] [--limit N] [--max-events N] [--for SECONDS]``: the event log.
- ``db current`` / ``db upgrade``: the file's schema version; migrating it.

The readers (``status`` to ``events``) ask the runtime that owns the database through
its socket when one serves it, else read the file through the read-only inspector, so
they work on the database of a running app; with ``--url URL`` (``--token``,
``--tls-ca``) they ask a runtime served over TCP instead. ``--json`` prints one JSON document (for
``events --follow``, one JSON object per line) and needs nothing beyond the package; the
tables need ``rich`` (``pip install 'hive-orchestration[cli]'``).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
