"""Every Python lock of vramguard is unlocked again in a forked child (vramguard._forksafe).

Each lock is held by another thread at the instant of fork(); the child must be able to take it
at once.  Before the shared mechanism, sampling/accounting/reserve/tiling/settings locks stayed
held in the child for ever."""
import os
import sys
import threading

import pytest

import vramguard
from vramguard import _forksafe, accounting, gcguard, reserve, sampling, tiling

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _module_locks():
    locks = {
        "sampling._lock": sampling._lock,
        "accounting._probe_lock": accounting._probe_lock,
        "reserve._lock": reserve._lock,
        "gcguard._collect_lock": gcguard._collect_lock,
        "gcguard._sampling_lock": gcguard._sampling_lock,
        "gcguard._guard_lock": gcguard._guard_lock,
        "GCGuard._lock": gcguard.guard()._lock,
        "tiling cost cache": tiling._CostCache()._lock,
    }
    return locks


@pytest.mark.parametrize("name", sorted(_module_locks()))
def test_lock_held_by_another_thread_is_free_in_child(name):
    lk = _module_locks()[name]
    held, release = threading.Event(), threading.Event()

    def holder():
        with lk:
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # child: the holder thread does not exist here
            ok = lk.acquire(timeout=2)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    assert os.WEXITSTATUS(status) == 0, f"{name} stayed locked in the forked child"


def test_every_python_lock_comes_from_forksafe():
    """A new threading.Lock() in library code would miss the at-fork reset."""
    import pathlib
    root = pathlib.Path(vramguard.__file__).parent
    offenders = []
    for p in list(root.rglob("*.py")):
        if p.name == "_forksafe.py":
            continue
        text = p.read_text()
        for bad in ("threading.Lock()", "threading.RLock()"):
            if bad in text:
                offenders.append(f"{p.name}: {bad}")
    assert not offenders, offenders


def test_weakly_held():
    import gc
    n = len(_forksafe._locks)
    lk = _forksafe.lock()
    assert len(_forksafe._locks) == n + 1
    del lk
    gc.collect()
    assert len(_forksafe._locks) == n
