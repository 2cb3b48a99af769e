"""An in-process tap on the broadcast actor's fan-out: a sink that folds each commit's
events as they are handed over, instead of queueing them for a reader task.

A public subscription costs, per event, a reference queued, a wake-up of its reader, a
decoded copy of the event's data and a trip through an async iterator; an observer in
the runtime's own process that only counts (the Prometheus exporter) needs none of that.
A tap is registered like any subscription (``Subscribe`` with ``pattern="*"``), so the
broadcast actor needs nothing new: it hands the tap each commit whole, and the tap calls
its ``fold`` at once, in the fan-out. It queues nothing (``unread`` stays 0), so it can
never lag or hold memory; the price is that ``fold`` runs in the committing actor's
task, so it must be quick and never block. Events reach ``fold`` as published, with
their ``data`` as the publisher built it: ``fold`` must only read them.

The tap ends like a feed: cleanly when the runtime stops, with a ``Lagged`` marker if
the broadcast actor crashed (events of the crash's commit may not have been folded:
replay the log from the last seq folded), or with the exception ``fold`` raised (it is
then never called again, and the runtime goes on). Its owner waits for that end with
:meth:`EventFeed.receive`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .events import Entry, EventFeed

__all__ = ["EventTap", "Fold"]

log = logging.getLogger("hive_orchestration.tap")

#: Called with one commit's events (in seq order, never empty), in the fan-out.
Fold = Callable[[Sequence[Entry]], None]


class EventTap(EventFeed):
    """A feed that folds what it is handed instead of queueing it."""

    __slots__ = ("_fold",)

    def __init__(self, fold: Fold) -> None:
        super().__init__()
        self._fold: Fold | None = fold

    def push(self, entries: Sequence[Entry]) -> None:
        fold = self._fold
        if fold is None or self.reader_closed:
            return
        try:
            fold(entries)
        except Exception as exc:
            # The observer's bug must not crash the broadcast actor (every subscriber
            # would lag): the tap ends with it, raised to its owner.
            self._fold = None
            log.exception("event tap failed at event %d; it is removed", entries[0][0].seq)
            self.fail(exc)
