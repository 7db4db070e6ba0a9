"""Batches and changing sizes (issue 16): the batch size from the budget, a batch guard that
halves its chunk on out-of-memory without losing finished items, and prewarm — the
allocator made to hold one block fitting the largest working set before a run, so smaller
sizes reuse it instead of fragmenting the cache.

    import vramguard as vg
    n = vg.batch_size(1024, 1024, cost=vg.default_cost(4, 3, 8))   # largest batch that fits
    frames = vg.guarded_batch(vae.decode, latents)                # chunked, halves on OOM
    vg.prewarm([(1024, 1024), (1024, 1152), (1360, 1536)], cost=c)  # reserve for the largest

Prewarm goes through the framework (a torch tensor allocated and dropped, so the block stays
in torch's cache), never behind its back.  On a simulated device the same calls drive an
AllocSim (vramguard._native.AllocSim, a model of torch's caching allocator) registered with
simulate_allocator(), so every rule here is tested deterministically without a GPU.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import _native
from ._units import parse_size, short_repr
from .tiling import CostModel, _is_oom, _plan_device as _target, _release, default_cost, resolve_budget

__all__ = ["AllocSim", "batch_size", "clear_allocators", "guarded_batch", "prewarm", "reserve_for",
           "prewarm_for_tiles", "simulate_allocator", "simulated_allocator", "simulated_fn",
           "working_set"]

log = logging.getLogger("vramguard")

AllocSim = _native.AllocSim
MAX_BATCH = 1 << 16

# simulated device index -> the AllocSim driving it (simulate_allocator)
_sims: dict[int, Any] = {}


# ============================================================================ simulated allocator

def simulate_allocator(device: int = 0, *, capacity: Any = None, expandable_segments: bool = False) -> Any:
    """Put a caching-allocator model on simulated device `device` (see vramguard.simulate):
    its reserved bytes count as the device's used memory, and the device's snapshots carry
    its fragmentation figures.  prewarm/guarded_batch on that device use it.  Returns it."""
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device must be a simulated device index, got {short_repr(device)}")
    if not isinstance(expandable_segments, bool):
        raise TypeError(f"expandable_segments must be True or False, got {short_repr(expandable_segments)}")
    cap = None if capacity is None else parse_size(capacity, "capacity")
    sim = AllocSim(cap, device=device, expandable_segments=expandable_segments)
    _sims[device] = sim
    return sim


def simulated_allocator(device: int | None = 0) -> Any | None:
    """The AllocSim registered for simulated device `device`, or None."""
    return _sims.get(device) if isinstance(device, int) else None


def clear_allocators() -> None:
    """Forget every registered AllocSim (vramguard.simulate_clear does not)."""
    _sims.clear()


def simulated_fn(allocator: Any, per_item: Any, fn: Callable[[Any], Any] | None = None, *,
                 parts: int = 2) -> Callable[[Any], Any]:
    """Per-item work on the simulated device: a function that, for a chunk of c items,
    holds c x per_item bytes in `allocator` (as `parts` tensors, the way activations are
    held) while it computes fn(chunk) (default: the chunk itself), then frees them.  An
    allocation that does not fit raises the AllocSim's MemoryError, as torch would."""
    if not isinstance(allocator, AllocSim):
        raise TypeError(f"allocator must be a vramguard.AllocSim, got {type(allocator).__name__}")
    each = parse_size(per_item, "per_item")
    parts = _check_count(parts, "parts", 1, 64)
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be callable or None, got {type(fn).__name__}")

    def run(chunk: Any) -> Any:
        total = each * len(chunk)
        held = []
        try:
            for k in range(parts):
                held.append(allocator.malloc(total // parts + (total % parts if k == 0 else 0)))
            return fn(chunk) if fn is not None else chunk
        finally:
            for h in reversed(held):
                allocator.free(h)

    return run


# ============================================================================ prewarm

def working_set(sizes: Sequence[tuple[int, int]], cost: CostModel | None = None, batch: int = 1) -> int:
    """Bytes of the largest working set over `sizes` ((width, height) pairs) by the cost model."""
    c = cost if cost is not None else default_cost()
    if not isinstance(c, CostModel):
        raise TypeError(f"cost must be a vramguard.CostModel or None, got {type(c).__name__}")
    batch = _check_count(batch, "batch", 1, MAX_BATCH)
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"sizes must be a sequence of (width, height), got {short_repr(sizes)}")
    best = 0.0
    for i, wh in enumerate(sizes):
        if not isinstance(wh, (tuple, list)) or len(wh) != 2:
            raise ValueError(f"sizes[{i}] must be (width, height), got {short_repr(wh)}")
        w = _check_count(wh[0], f"sizes[{i}] width", 1, 1 << 20)
        h = _check_count(wh[1], f"sizes[{i}] height", 1, 1 << 20)
        best = max(best, c.bytes_for(w, h, batch))
    if not math.isfinite(best) or best > 9e18:
        raise ValueError(f"working set of {best!r} bytes is beyond any device")
    return int(math.ceil(best))


def _torch_cuda(device: int | None) -> Any | None:
    torch = sys.modules.get("torch")
    if torch is None or device is None:
        return None
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
    except Exception:
        return None
    return torch


def _release_for(sim: Any) -> None:
    """Give cached blocks back: the allocator model's on a simulated card, else gc + torch's."""
    if sim is not None:
        sim.empty_cache()
    else:
        _release()


def prewarm(what: Any, *, cost: CostModel | None = None, batch: int = 1, device: Any = None,
            allocator: Any = None, strict: bool = False) -> int:
    """Make the allocator hold one free block fitting the largest working set.

    what: bytes (int or "2GB"), or a sequence of (width, height) sizes a run will see (the
    largest by `cost` x `batch` counts).  The block is allocated through the framework and
    dropped at once: it stays in the cache, and the run's smaller sizes are carved from it.
    allocator: an AllocSim (else the one registered for `device`, else torch's CUDA
    allocator when torch has CUDA up).  Returns the bytes allocated (0: nothing to warm, e.g.
    no GPU, or it did not fit — then a warning is logged, or with strict=True the OOM
    propagates).  Count only tensors above 1 MiB in the working set: torch serves smaller
    ones from its small pool, which never uses the prewarmed block, and a block sized for
    them only takes room the small pool then lacks."""
    if isinstance(what, (int, float, str)) and not isinstance(what, bool):
        nbytes = parse_size(what, "prewarm bytes")
    else:
        nbytes = working_set(what, cost, batch)
    if allocator is not None and not isinstance(allocator, AllocSim):
        raise TypeError(f"allocator must be a vramguard.AllocSim or None, got {type(allocator).__name__}")
    if nbytes == 0:
        return 0
    idx = None if allocator is not None else _target(device)
    sim = allocator if allocator is not None else simulated_allocator(idx)
    try:
        if sim is not None:
            h = sim.malloc(nbytes)
            sim.free(h)
            return nbytes
        torch = _torch_cuda(idx)
        if torch is None:
            return 0
        t = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{idx}")
        del t  # back to torch's cache as one block: that is the point
        return nbytes
    except Exception as e:
        if strict or not _is_oom(e):
            raise
        log.warning("vramguard: prewarm of %d bytes did not fit; running without it", nbytes)
        return 0


def prewarm_for_tiles(image: Any, kw: dict) -> int:
    """tiled_many's reservation: the planned tile peak of its largest image (one image of the
    batch, the planner's lower bound), prewarmed on the device tiled() plans for.  0 when
    there is no allocator to warm or the arguments do not plan (tiled() then says why)."""
    dev = kw.get("device")
    idx = _target(dev) if dev is None or isinstance(dev, (int, np.integer)) else None
    if idx is None or (simulated_allocator(idx) is None and _torch_cuda(idx) is None):
        return 0
    from .tiling import _default_for, plan_tiles

    layout, scale = kw.get("layout", "nhwc"), kw.get("scale", 1.0)
    try:
        cost = kw.get("cost") or _default_for(image, layout, scale)
        h, w = (image.shape[-3], image.shape[-2]) if layout == "nhwc" else (image.shape[-2], image.shape[-1])
        p = plan_tiles(int(w), int(h), scale=scale, overlap=kw.get("overlap", 32), align=kw.get("align", 1),
                       cost=cost, budget=kw.get("budget"), card=kw.get("card"), reserve=kw.get("reserve"),
                       device=idx, min_tile=kw.get("min_tile", 64), max_tile=kw.get("max_tile"))
    except (TypeError, ValueError):
        return 0
    return prewarm(int(p.predicted_peak_bytes), device=idx) if p.fits else 0


@contextlib.contextmanager
def reserve_for(what: Any, *, cost: CostModel | None = None, batch: int = 1, device: Any = None,
                allocator: Any = None, release: bool = False) -> Iterator[int]:
    """with vg.reserve_for(sizes, cost=c): run ...  — prewarm on entry (yields the bytes);
    release=True empties the cache on exit (the run's blocks go back to the device)."""
    n = prewarm(what, cost=cost, batch=batch, device=device, allocator=allocator)
    try:
        yield n
    finally:
        if release:
            _release_for(allocator if allocator is not None else simulated_allocator(_target(device)))


# ============================================================================ batch size

def _check_count(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {short_repr(v)}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be {lo}..{hi}, got {short_repr(v)}")
    return int(v)


def _item_cost(width: Any, height: Any, per_item: Any, cost: Any) -> tuple[float, float]:
    """(fixed bytes, bytes per item)."""
    if per_item is not None:
        if cost is not None or width is not None or height is not None:
            raise ValueError("give per_item, or width/height with a cost model, not both")
        return 0.0, float(parse_size(per_item, "per_item"))
    if width is None or height is None:
        raise TypeError("batch size needs width and height (with a cost model) or per_item bytes")
    w = _check_count(width, "width", 1, 1 << 20)
    h = _check_count(height, "height", 1, 1 << 20)
    c = cost if cost is not None else default_cost()
    if not isinstance(c, CostModel):
        raise TypeError(f"cost must be a vramguard.CostModel or None, got {type(c).__name__}")
    return float(c.fixed), float(c.per_px) * w * h


def batch_size(width: int | None = None, height: int | None = None, *, cost: CostModel | None = None,
               per_item: Any = None, budget: Any = None, device: Any = None, reserve: Any = None,
               card: Any = None, max_batch: int = MAX_BATCH) -> int:
    """The largest batch that fits: (budget - cost.fixed) // (cost.per_px x width x height),
    or budget // per_item; at most max_batch, 0 when not even one item fits.  The budget is
    `budget`, else the snapshot's of `device` (reserve= a floor, card= a card of that size)."""
    max_batch = _check_count(max_batch, "max_batch", 1, MAX_BATCH)
    fixed, each = _item_cost(width, height, per_item, cost)
    b = resolve_budget(budget=budget, card=card, reserve=reserve, device=device)
    if each <= 0:
        return max_batch if b >= fixed else 0
    n = math.floor((b - fixed) / each) if b > fixed else 0
    return int(max(0, min(max_batch, n)))


# ============================================================================ the batch guard

def _join(parts: list[Any]) -> Any:
    if not parts:
        return []
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, axis=0)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    return list(itertools.chain.from_iterable(parts))


def guarded_batch(fn: Callable[[Any], Any], items: Any, *, chunk: int | None = None, per_item: Any = None,
                  cost: CostModel | None = None, width: int | None = None, height: int | None = None,
                  budget: Any = None, device: Any = None, reserve: Any = None, allocator: Any = None,
                  prewarm_chunk: bool = False, is_oom: Callable[[BaseException], bool] | None = None,
                  release: Callable[[], Any] | None = None, stats: dict | None = None) -> Any:
    """Run per-item work `fn` over `items` in the largest chunk that fits, halving the chunk
    on out-of-memory and keeping every finished item; results in order.

    items: a list/tuple, NumPy array or torch tensor (batch on axis 0); fn(items[i:j]) must
    return j - i results (a sequence, array or tensor).  The first chunk is `chunk`, else
    batch_size() from per_item / cost x width x height over the budget, else everything.
    After an OOM the cache is released (`release`, default: gc + the framework's cache, or
    the AllocSim's empty_cache) and the chunk halves; a single item is retried once after
    the release, and its second OOM propagates.
    prewarm_chunk=True reserves the first chunk's working set first (see prewarm).
    Returns a list for sequence results, else the concatenation along axis 0.  `stats`
    (a dict) is filled with items, chunks, ooms, first_chunk and chunk (the last used)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (filled in place) or None, got {type(stats).__name__}")
    for name, cb in (("is_oom", is_oom), ("release", release)):
        if cb is not None and not callable(cb):
            raise TypeError(f"{name} must be callable or None, got {type(cb).__name__}")
    if allocator is not None and not isinstance(allocator, AllocSim):
        raise TypeError(f"allocator must be a vramguard.AllocSim or None, got {type(allocator).__name__}")
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        raise TypeError(f"items must be a list, tuple, array or tensor, got {type(items).__name__}")
    n = len(items)
    sim = allocator if allocator is not None else simulated_allocator(_target(device))
    fixed = each = 0.0
    if chunk is not None:
        chunk = _check_count(chunk, "chunk", 1, MAX_BATCH)
    elif per_item is not None or cost is not None or width is not None:
        fixed, each = _item_cost(width, height, per_item, cost)
        chunk = max(1, batch_size(width, height, cost=cost, per_item=per_item, budget=budget, device=device,
                                  reserve=reserve))
    else:
        chunk = max(1, n)
    chunk = min(chunk, max(1, n))
    oom = is_oom or _is_oom
    rel = release or (lambda: _release_for(sim))
    st = {"items": n, "chunks": 0, "ooms": 0, "first_chunk": chunk, "chunk": chunk}
    if prewarm_chunk and n and each > 0:
        prewarm(int(fixed + each * chunk), device=device, allocator=sim)
    parts: list[Any] = []
    i, retried_at = 0, -1
    while i < n:
        c = min(chunk, n - i)
        failed: BaseException | None = None
        try:
            r = fn(items[i:i + c])
        except Exception as e:
            if not oom(e):
                raise
            e.__traceback__ = None  # the frames hold the chunk's tensors: let them go
            failed = e
        if failed is None:
            if not hasattr(r, "__len__") or len(r) != c:
                got = len(r) if hasattr(r, "__len__") else type(r).__name__
                raise ValueError(f"fn returned {got} results for a chunk of {c} items (items {i}..{i + c - 1})")
            parts.append(r)
            st["chunks"] += 1
            i += c
            continue
        # outside the except block: the exception frame no longer pins the chunk's memory
        st["ooms"] += 1
        rel()
        if c == 1 and retried_at == i:  # one item, after a release, twice: it does not fit
            st["chunk"] = 1
            if stats is not None:
                stats.update(st)
            raise failed
        if c == 1:
            retried_at = i  # a single item is retried once after the release
        chunk = max(1, c // 2)
        log.info("vramguard: out of memory at a chunk of %d items (item %d of %d); halving to %d", c, i, n, chunk)
    st["chunk"] = chunk
    if stats is not None:
        stats.update(st)
    return _join(parts)
