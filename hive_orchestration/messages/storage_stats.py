"""The storage actor about itself: its statistics (commits, batches, the log's end), and
the check a crashed reader asks for."""

from __future__ import annotations

from typing import Literal

import msgspec

from ..runtime import Request

#: Upper bounds of the commit-duration buckets (seconds): an fsync on a fast disk is tens
#: of microseconds, a commit stalled on a busy or network disk seconds.
COMMIT_SECONDS_BOUNDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
#: Upper bounds of the batch-size buckets (writes grouped into one commit), up to the
#: default ``max_batch`` (1024).
COMMIT_BATCH_BOUNDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


class Buckets(msgspec.Struct, frozen=True):
    """A histogram: ``counts[i]`` observations at most ``bounds[i]`` and above the bound
    before it (not cumulative); the last count is above every bound."""

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    sum: float = 0.0


class StorageStats(msgspec.Struct, frozen=True):
    path: str
    driver: str
    synchronous: Literal["FULL", "NORMAL"]
    schema_version: int
    transactions: int
    writes: int
    failed_writes: int
    largest_batch: int
    last_seq: int
    #: How long each committed transaction took (its statements and COMMIT, fsync
    #: included), and how many writes each grouped (``COMMIT_*_BOUNDS``).
    commit_seconds: Buckets = Buckets()
    commit_batch_size: Buckets = Buckets()
    #: Every event up to this sequence number was trimmed by retention (0: none was).
    trimmed_through: int = 0


class GetStorageStats(Request[StorageStats], frozen=True):
    pass


class CheckReaders(msgspec.Struct, frozen=True):
    """Told by a read-only reader whose read crashed: the storage actor crashes on it
    (see ``storage/readers.py``), so that it is restarted and reported as ever."""
