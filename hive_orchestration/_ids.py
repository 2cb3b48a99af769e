"""Identifiers: time-ordered UUIDs (version 7 layout), so that new rows land at the end of
the primary-key index (SQLite inserts them about 2.5x faster than random UUIDs here).

They are also monotonic within a process (RFC 9562, section 6.2): an id made later
compares greater, even within one millisecond. Tasks created together (one
``create_tasks`` call, or one TaskManager batch) share their ``created_at``, and the
queue breaks that tie by id: monotonic ids keep it in creation order, which is also the
database's row order.

Lease secrets (:func:`new_secret`) come from here too, but from ``os.urandom``: an id is
public and a secret is not, and the ids' Mersenne Twister is no cryptographic generator:
its state is linear in its output, so a few hundred ids (74 of its bits each) give it
away, and with it every later draw.
"""

from __future__ import annotations

import base64
import os
import random
import re
import threading
import time

__all__ = ["advance_past", "is_new_id", "new_id", "new_secret"]

_RANDOM_BITS = 74  # what a version 7 UUID leaves after 48 bits of time, version and variant
_lock = threading.Lock()  # runtimes in several threads share the counter
_last = 0
# Our own generator: drawing from the random module's would shift the sequence of an app
# that seeds it for its own use, and make our ids follow its seed.
_random = random.Random()
#: A lease secret's size: 128 bits, beyond any guess or search.
_SECRET_BYTES = 16
# os.urandom releases the GIL, so with another thread busy (the storage driver's) each
# call waited for that thread to give the GIL back (measured: 130 to 300 us a secret,
# against 0.4 us with no other thread; 1.4 us drawn in bulk with that thread busy).
# Secrets are cut from a 4 KiB draw instead, one wait per 256 claims. The bytes are the
# kernel's CSPRNG's either way; each is handed out once, and a forked child drops the rest.
_POOL_BYTES = 4096
_pool_lock = threading.Lock()
_pool = b""
_pool_at = 0


def _forget_after_fork() -> None:
    global _last, _lock
    _last = 0  # a child must not count on from its parent's last id in the same millisecond
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _random.seed()  # nor draw the same bits as its parent
    _forget_secrets()


def _forget_secrets() -> None:
    global _pool, _pool_at, _pool_lock
    # What is left of the parent's draw: a child handing it out would give its claims
    # the secrets the parent gives its own.
    _pool, _pool_at = b"", 0
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_after_fork)


def new_id() -> str:
    """A UUID whose first 48 bits are the Unix time in milliseconds (RFC 9562 version 7),
    greater than every id made before it in this process."""
    global _last
    # A Mersenne Twister, not os.urandom: these ids are unique, not secret, and urandom
    # releases the GIL, so with another thread busy each id waited for the GIL's switch
    # interval. It is seeded from urandom, and again in a forked child.
    fresh = (time.time_ns() // 1_000_000) << _RANDOM_BITS | _random.getrandbits(_RANDOM_BITS)
    with _lock:
        # The same millisecond again, or a clock stepped back: count on from the last.
        value = fresh if fresh > _last else _last + 1
        _last = value
    # Spread the 122 bits around the version (4 bits) and variant (2 bits) fields.
    high, low = value >> 62, value & ((1 << 62) - 1)
    full = (high >> 12) << 80 | 0x7 << 76 | (high & 0xFFF) << 64 | 0x2 << 62 | low
    # str(uuid.UUID(int=full)), without building the UUID object (a third of the cost);
    # the hex digits through bytes, which is about a third faster than formatting the int.
    h = full.to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def is_new_id(value: str) -> bool:
    """Whether ``value`` looks like an id :func:`new_id` made (a version 7 UUID, lower
    case): such ids compare in the order they were made."""
    return len(value) == 36 and _SHAPE.fullmatch(value) is not None


def advance_past(last: str) -> None:
    """Make every later :func:`new_id` of this process greater than ``last`` (an id made
    by :func:`new_id`, here or in another process), whatever the clock says: so that an
    id tells a row made by this process from one made before it (the TaskManager's
    clocks, actors/task_manager/delays.py). Anything else is ignored."""
    global _last
    if not is_new_id(last):
        return
    full = int(last.replace("-", ""), 16)
    high = (full >> 80) << 12 | (full >> 64) & 0xFFF
    value = high << 62 | full & ((1 << 62) - 1)
    with _lock:
        _last = max(_last, value)


def new_secret() -> str:
    """A fresh secret of 128 random bits from the OS's CSPRNG, as 22 URL-safe characters
    (what ``secrets.token_urlsafe(16)`` gives, drawn in bulk)."""
    global _pool, _pool_at
    with _pool_lock:
        if _pool_at + _SECRET_BYTES > len(_pool):
            _pool, _pool_at = os.urandom(_POOL_BYTES), 0
        raw = _pool[_pool_at : _pool_at + _SECRET_BYTES]
        _pool_at += _SECRET_BYTES
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
