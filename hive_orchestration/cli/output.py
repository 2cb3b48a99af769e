"""How the commands print: JSON, or tables with rich (imported only when a table is
drawn, as rich is an extra), and stdout silenced when the reader of a pipe went away."""

from __future__ import annotations

import argparse
import os
import sys

import msgspec

__all__ = ["RICH_MISSING", "print_json", "rich_available", "show_answer", "silence_stdout"]


RICH_MISSING = (
    "this command draws tables with rich, which is not installed:"
    " pip install 'hive-orchestration[cli]' (or add --json for machine-readable output)"
)


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def print_json(value: object) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode())
    sys.stdout.write("\n")
    sys.stdout.flush()


def show_answer(args: argparse.Namespace, value: object, render: str) -> None:
    """Print ``value`` as JSON, or as a table with ``views.<render>`` (imported only then:
    it needs rich)."""
    if args.json:
        print_json(value)
        return
    from . import views

    getattr(views, render)(views.console(), value)
