"""Wrapping a host's functions so a GC check runs after them.

HookSet.wrap(owner, "attr", "vae_decode") replaces owner.attr with a wrapper that marks the
stage on the sampler and runs the GC policy after a normal return.  Wrapping is idempotent
(a wrapped attribute is recognised and left alone, also after a module reload re-runs the
installer), nested calls of the same stage check once (VAE.decode falling back to
decode_tiled is one stage), a missing seam logs once and returns False, and uninstall()
restores exactly what was there.  A failure inside the check never reaches the host.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("vramguard")
_depth = threading.local()


def _make_wrapper(fn: Callable[..., Any], stage: str,
                  when: Callable[..., bool] | None = None) -> Callable[..., Any]:
    from . import gcguard, sampling

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        d = getattr(_depth, stage, 0)
        if d:  # inner call of the same stage: the outer one checks
            return fn(*args, **kwargs)
        if when is not None:
            try:
                relevant = when(*args, **kwargs)
            except Exception:
                relevant = True
            if not relevant:  # e.g. an unpatch with no LoRA patches: not this stage
                return fn(*args, **kwargs)
        setattr(_depth, stage, 1)
        token = None
        try:
            try:
                token = sampling.sampler().begin(stage)
            except Exception:
                token = None
            result = fn(*args, **kwargs)
        finally:
            setattr(_depth, stage, 0)
            if token is not None:
                try:
                    sampling.sampler().end(token)
                except Exception:
                    pass
        try:
            gcguard.guard().check(stage)
        except Exception as e:  # never break the host's run
            _warn_once(f"check:{stage}", f"GC check after {stage} failed: {type(e).__name__}: {e}")
        return result

    wrapper.__vramguard_stage__ = stage  # type: ignore[attr-defined]
    return wrapper


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("vramguard: %s", msg)


def is_wrapped(obj: Any) -> bool:
    f = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    return getattr(f, "__vramguard_stage__", None) is not None


class HookSet:
    """A set of installed wrappers that can be removed together."""

    def __init__(self, name: str = "hooks"):
        self.name = name
        self._installed: list[tuple[Any, str, Any, str]] = []  # owner, attr, original raw, stage
        self.missing: dict[str, str] = {}

    def wrap(self, owner: Any, attr: str, stage: str, when: Callable[..., bool] | None = None) -> bool:
        """Wrap owner.attr as `stage`.  False (logged once) when the seam is missing.
        `when(*args, **kwargs)`, if given, decides per call whether the call is this stage."""
        from .gcguard import _check_stage

        _check_stage(stage)
        label = f"{getattr(owner, '__name__', owner)}.{attr}"
        try:
            raw = inspect.getattr_static(owner, attr)
        except AttributeError:
            self.missing[label] = "not found"
            _warn_once(f"missing:{label}", f"{self.name}: seam {label} not found in this host version; "
                                           f"no GC hook for {stage}")
            return False
        if is_wrapped(raw):
            return True
        if isinstance(raw, classmethod):
            new: Any = classmethod(_make_wrapper(raw.__func__, stage, when))
        elif isinstance(raw, staticmethod):
            new = staticmethod(_make_wrapper(raw.__func__, stage, when))
        elif callable(raw):
            new = _make_wrapper(raw, stage, when)
        else:
            self.missing[label] = f"not callable ({type(raw).__name__})"
            _warn_once(f"missing:{label}", f"{self.name}: {label} is not callable; no GC hook for {stage}")
            return False
        setattr(owner, attr, new)
        self._installed.append((owner, attr, raw, stage))
        return True

    def installed(self) -> list[tuple[str, str]]:
        return [(f"{getattr(o, '__name__', o)}.{a}", s) for o, a, _, s in self._installed]

    def uninstall(self) -> None:
        """Restore every original, newest first (so double wraps unwind correctly)."""
        while self._installed:
            owner, attr, raw, _ = self._installed.pop()
            try:
                setattr(owner, attr, raw)
            except Exception as e:  # pragma: no cover - read-only owners
                _warn_once(f"uninstall:{attr}", f"cannot restore {attr}: {e}")
