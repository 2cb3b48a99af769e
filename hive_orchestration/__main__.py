"""``python -m hive_orchestration`` / ``hive-orchestration``: the command line.

The commands live in :mod:`hive_orchestration.cli` (``demo``, ``status``, ``tasks``,
``task``, ``workers``, ``plans``, ``plan``, ``events``, ``db``); ``--help`` lists them.
"""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
