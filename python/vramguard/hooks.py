"""Wrapping a host's functions so a GC check runs after them.

HookSet.wrap(owner, "attr", "vae_decode") replaces owner.attr with a wrapper that marks the
stage on the sampler and runs the GC policy after a normal return.  Wrapping is idempotent
(a wrapped attribute is recognised and left alone, also after a module reload re-runs the
installer), nested calls of the same stage check once (VAE.decode falling back to
decode_tiled is one stage; comfy.sample.sample -> CFGGuider.sample is one sampling run), a
missing seam logs once and returns False, and uninstall() restores exactly what was there.
A failure inside the check never reaches the host.

Coroutine functions get a coroutine wrapper: the check runs after the coroutine completed,
not when it was created.  Nesting is tracked in a context variable, so concurrent asyncio
tasks and threads each see their own stages.

While a "unet" stage (a sampling run) is open anywhere in the process, gcguard refuses to
collect: a compiled sampling run replays a recorded allocation plan, and anything we free or
allocate inside it breaks the plan.  The unet check itself runs after the sampler returned.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from typing import Any, Callable

log = logging.getLogger("vramguard")

# stage -> [forced requested by an inner call]; one entry per stage open in this context
_open: contextvars.ContextVar[dict[str, list[bool]] | None] = contextvars.ContextVar("vramguard_open_stages",
                                                                                     default=None)


class _Run:
    """One outermost stage call: begin/end on the sampler, the sampling flag, the check."""

    def __init__(self, stage: str, forced: bool, check: bool):
        self.stage, self.forced, self.check = stage, forced, check
        self.token: Any = None
        self.req = [forced]

    def enter(self) -> contextvars.Token:
        from . import gcguard, sampling

        tok = _open.set({**(_open.get() or {}), self.stage: self.req})
        try:
            self.token = sampling.sampler().begin(self.stage)
        except Exception:
            self.token = None
        if self.stage == "unet":
            gcguard._sampling_enter()
        return tok

    def exit(self, tok: contextvars.Token) -> None:
        from . import gcguard, sampling

        if self.stage == "unet":
            gcguard._sampling_exit()
        _open.reset(tok)
        if self.token is not None:
            try:
                sampling.sampler().end(self.token)
            except Exception:
                pass

    def after(self) -> None:
        from . import gcguard

        if not self.check:
            return
        try:
            gcguard.guard().check(self.stage, forced=any(self.req))
        except Exception as e:  # never break the host's run
            _warn_once(f"check:{self.stage}", f"GC check after {self.stage} failed: {type(e).__name__}: {e}")


def _outer(stage: str, forced: bool, check: bool, when: Callable[..., bool] | None,
           args: tuple, kwargs: dict) -> _Run | None:
    """A _Run when this call is the outermost call of `stage` and relevant; None to just call through.
    An inner call's forced request is handed to the outer run."""
    inner = (_open.get() or {}).get(stage)
    if inner is not None:
        if forced:
            inner.append(True)
        return None
    if when is not None:
        try:
            relevant = when(*args, **kwargs)
        except Exception:
            relevant = True
        if not relevant:  # e.g. an unpatch that keeps the weights: not this stage
            return None
    return _Run(stage, forced, check)


def call_stage(stage: str, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
               forced: bool = False, check: bool = True, when: Callable[..., bool] | None = None) -> Any:
    """fn(*args, **kwargs) as stage `stage`: marked on the sampler, checked once after the
    outermost call of that stage returns (forced if any nested call asked for it)."""
    kwargs = kwargs or {}
    run = _outer(stage, forced, check, when, args, kwargs)
    if run is None:
        return fn(*args, **kwargs)
    tok = run.enter()
    try:
        result = fn(*args, **kwargs)
    finally:
        run.exit(tok)
    run.after()
    return result


def _make_wrapper(fn: Callable[..., Any], stage: str,
                  when: Callable[..., bool] | None = None) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            run = _outer(stage, False, True, when, args, kwargs)
            if run is None:
                return await fn(*args, **kwargs)
            tok = run.enter()
            try:
                result = await fn(*args, **kwargs)
            finally:
                run.exit(tok)
            run.after()
            return result

        awrapper.__vramguard_stage__ = stage  # type: ignore[attr-defined]
        return awrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return call_stage(stage, fn, args, kwargs, when=when)

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

    def wrap(self, owner: Any, attr: str, stage: str, when: Callable[..., bool] | None = None,
             own: bool = False) -> bool:
        """Wrap owner.attr as `stage`.  False (logged once) when the seam is missing.
        `when(*args, **kwargs)`, if given, decides per call whether the call is this stage.
        own=True wraps only an attribute defined in owner's own class body (a subclass's
        override) and leaves an inherited one to the base class's hook, silently."""
        from .gcguard import _check_stage

        _check_stage(stage)
        label = f"{getattr(owner, '__name__', owner)}.{attr}"
        if own and attr not in getattr(owner, "__dict__", {}):
            return False
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
