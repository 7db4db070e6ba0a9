"""Locks that a forked child gets back unlocked.

A thread of the parent may hold a lock at the instant another thread forks; the child has only
the forking thread, so such a lock would stay held forever and the child's first gc_check(),
snapshot() or stage() would hang.  Every Python lock of vramguard comes from `lock()` here, and
one at-fork hook re-initialises all of them in the child (CPython's logging module does the
same with `_at_fork_reinit`).  The C core's locks are reset by `_native.after_fork_child`.
"""
from __future__ import annotations

import os
import threading
import weakref

__all__ = ["lock"]

_locks: "weakref.WeakSet" = weakref.WeakSet()


def lock() -> threading.Lock:
    """A threading.Lock that is unlocked again in a forked child."""
    lk = threading.Lock()
    _locks.add(lk)
    return lk


def _reinit_in_child() -> None:
    for lk in list(_locks):
        reinit = getattr(lk, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_in_child)
