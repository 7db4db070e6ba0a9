"""Reserve-aware tiling: the largest tiles that fit, blended without seams, OOM back-off.

    out = vramguard.tiled(model, image, scale=4)          # NumPy or torch, NHWC by default
    p = vramguard.plan_tiles(4096, 4096, scale=4, card="8GB", reserve="1.5GB")

The planner and the blending are C (vramguard._native.plan / Canvas).  This module turns
inputs into tiles, calls `fn`, and on an out-of-memory error leaves the `except` block (the
exception frame holds tensors), releases caches, halves the tile (respecting alignment),
re-plans only the area not yet done and goes on; every finished tile stays in the output.

Blending weights along each axis are smoothstep ramps over the middle `feather` fraction of
each overlap; they sum to one exactly, so there is no weight buffer and no division pass.
An operator whose receptive-field radius is at most (1 - feather) * overlap / 2 input pixels
gives the untiled result (to float rounding).
"""
from __future__ import annotations

import gc as _pygc
import logging
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import _forksafe, _native
from . import accounting as acc
from ._units import fmt_bytes, parse_size
from .hostram import check_host_room

__all__ = ["CostModel", "Plan", "plan_tiles", "tiled", "tiled_many", "calibrate", "cost_model",
           "TilingError", "Cancelled", "default_cost"]

log = logging.getLogger("vramguard")
_MiB = 1 << 20


class TilingError(RuntimeError):
    """Tiling gave up: nothing fits, or back-off reached the minimum tile.

    `stats` holds what tiled() reports in its `stats` argument (tiles finished, retries, the
    tile sizes tried); it is {} when tiling never started."""

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = dict(stats or {})


class Cancelled(Exception):
    """Raised between tiles when `cancel()` returned True."""


@dataclass(frozen=True)
class CostModel:
    """Device bytes for one tile: fixed + per_px * (input pixels of the tile) * batch."""
    fixed: float
    per_px: float
    source: str = "given"

    def __post_init__(self) -> None:
        for name in ("fixed", "per_px"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cost model {name} must be a finite number >= 0, got {v!r}")

    def bytes_for(self, w: int, h: int, batch: int = 1) -> float:
        return self.fixed + self.per_px * w * h * batch


def default_cost(channels_in: int = 3, channels_out: int = 3, scale: float = 1.0, elem_size: int = 4,
                 model_bytes: int = 0) -> CostModel:
    """A conservative guess when nothing was measured: the tile's input and output tensors plus
    activations of a 64-channel network at input resolution (8 live tensors) and at output
    resolution (2 live tensors) — about what an ESRGAN-class upscaler holds in inference."""
    s2 = max(scale, 1.0) ** 2
    per_px = elem_size * (channels_in + channels_out * s2) + 64 * elem_size * (8 + 2 * s2)
    return CostModel(float(model_bytes + 64 * _MiB), float(per_px), "default")


class _CostCache:
    """Calibrated cost models keyed by a model's identity (plus a plain suffix: device, task).

    A key (model, *rest) or a bare model object is held by identity with a finalizer that
    drops its entries when the model dies, so a new model that reuses the id never sees a
    stale calibration.  Plain keys (str, numbers, tuples of them) are kept, newest last,
    up to `limit` entries."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._lock = _forksafe.lock()
        self._by_obj: dict[int, dict[Any, CostModel]] = {}
        self._plain: dict[Any, CostModel] = {}

    @staticmethod
    def _split(key: Any) -> tuple[Any, Any]:
        head, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(head, (str, bytes, int, float, complex, tuple, frozenset, type(None))):
            return None, key
        try:
            weakref.ref(head)
        except TypeError:
            return None, key  # not weak-referenceable: a plain (strongly held) key
        return head, rest

    def get(self, key: Any) -> CostModel | None:
        obj, rest = self._split(key)
        with self._lock:
            if obj is None:
                return self._plain.get(key)
            return self._by_obj.get(id(obj), {}).get(rest)

    def put(self, key: Any, cost: CostModel) -> None:
        obj, rest = self._split(key)
        with self._lock:
            if obj is None:
                self._plain.pop(key, None)
                self._plain[key] = cost
                while len(self._plain) > self.limit:
                    self._plain.pop(next(iter(self._plain)))
                return
            oid = id(obj)
            if oid not in self._by_obj:
                weakref.finalize(obj, self._drop, oid)
            self._by_obj.setdefault(oid, {})[rest] = cost

    def _drop(self, oid: int) -> None:
        with self._lock:
            self._by_obj.pop(oid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._plain) + sum(len(v) for v in self._by_obj.values())

    def clear(self) -> None:
        with self._lock:
            self._plain.clear()
            self._by_obj.clear()


_costs = _CostCache()


def cost_model(key: Any) -> CostModel | None:
    """The cached (calibrated) cost model for a model identity (`model` or `(model, *rest)`), if any."""
    return _costs.get(key)


def calibrate(fn: Callable[[Any], Any], sample: Any, *, key: Any = None, sizes: Sequence[int] = (64, 128),
              layout: str = "nhwc") -> CostModel:
    """Measure fn's device cost on two small tiles cut from `sample` (a torch tensor on the
    device fn runs on) and fit fixed + per_px.  Cached under `key`.  Without CUDA nothing can
    be measured: returns (and caches nothing but) the default model."""
    from .gcguard import in_sampling

    torch = sys.modules.get("torch")
    # duck-typed on purpose: NumPy 2 arrays have .device too (the string "cpu", no .type)
    if torch is None or getattr(getattr(sample, "device", None), "type", None) != "cuda":
        c = _default_for(sample, layout, 1.0)
        return CostModel(c.fixed, c.per_px, "default (nothing to measure on this device)")
    if in_sampling():  # measuring allocates on the device: never inside a (compiled) sampling run
        c = _default_for(sample, layout, 1.0)
        return CostModel(c.fixed, c.per_px, "default (not measured inside a sampling run)")
    if key is not None:
        cached = _costs.get(key)
        if cached is not None:
            return cached
    dev = sample.device
    pts = []
    for s in sizes:
        x = sample[..., :s, :s, :] if layout == "nhwc" else sample[..., :s, :s]
        x = x[:1].contiguous()
        h, w = (x.shape[1], x.shape[2]) if layout == "nhwc" else (x.shape[2], x.shape[3])
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            y = fn(x)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del y
        pts.append((w * h, peak))
    (a1, p1), (a2, p2) = pts[0], pts[-1]
    per_px = max(0.0, (p2 - p1) / (a2 - a1)) if a2 != a1 else p2 / a2
    fixed = max(0.0, p1 - per_px * a1)
    # 15 % headroom: the allocator rounds blocks and fragmentation grows with tile size
    c = CostModel(fixed * 1.15, per_px * 1.15, "measured")
    if key is not None:
        _costs.put(key, c)
    return c


@dataclass
class Plan:
    fits: bool
    tile: tuple[int, int] = (0, 0)
    grid: tuple[int, int] = (0, 0)
    tiles: int = 0
    xs: list[int] = field(default_factory=list)
    ys: list[int] = field(default_factory=list)
    predicted_peak_bytes: float = 0.0
    budget_bytes: int = 0
    batch: int = 1
    overlap: int = 0
    min_tile: int = 0
    why: str = ""
    cost: CostModel | None = None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("fits", "tile", "grid", "tiles", "xs", "ys", "predicted_peak_bytes",
                                           "budget_bytes", "batch", "overlap", "min_tile", "why")}
        d["tile"], d["grid"] = list(self.tile), list(self.grid)
        if self.cost is not None:
            d["cost"] = {"fixed": self.cost.fixed, "per_px": self.cost.per_px, "source": self.cost.source}
        return d


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or scale <= 0 or scale > 64:
        raise ValueError(f"scale must be finite, > 0 and <= 64, got {scale!r}")
    return float(scale)


def _check_int(v: Any, name: str, lo: int, hi: int = 1 << 20) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be {lo}..{hi}, got {v!r}")
    return int(v)


def _plan_device(device: Any) -> int | None:
    """The snapshot device a plan is for: an int is that GPU, "host" (or "cpu") is host RAM,
    None is the default device (GPU 0 when one is visible, host RAM otherwise)."""
    if device is None:
        return acc.default_device()
    if isinstance(device, str) and device in ("host", "cpu"):
        return None
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise TypeError(f"device must be an int, 'host' or None, got {type(device).__name__} {device!r}")
    return int(device)


def resolve_budget(*, budget: Any = None, card: Any = None, reserve: Any = None,
                   device: Any = None) -> int:
    """Bytes the tiler may use: an explicit `budget`, else the budget of the C snapshot of
    `device` (see _plan_device) with `card` (a card of that size) and `reserve` (a floor
    over the configured and the host's reserve) applied there."""
    if budget is not None:
        return parse_size(budget, "budget")
    r = None if reserve is None else parse_size(reserve, "reserve")
    c = None if card is None else parse_size(card, "card")
    return acc.snapshot(_plan_device(device), reserve=r, card=c).budget


def plan_tiles(width: int, height: int, *, scale: float = 1.0, overlap: int = 32, align: int = 1,
               channels: int = 3, out_channels: int | None = None, elem_size: int = 4, batch: int = 1,
               cost: CostModel | None = None, model_bytes: int | str = 0, budget: Any = None, card: Any = None,
               reserve: Any = None, device: Any = None, min_tile: int = 0,
               max_tile: int | None = None, feather: float = 0.5) -> Plan:
    """The largest tile that fits the budget, as an even grid with no sliver tiles."""
    width = _check_int(width, "width", 1)
    height = _check_int(height, "height", 1)
    scale = _check_scale(scale)
    overlap = _check_int(overlap, "overlap", 0)
    align = _check_int(align, "align", 1, 4096)
    _check_int(channels, "channels", 1, 4096)
    batch = _check_int(batch, "batch", 1)
    c = cost or default_cost(channels, out_channels or channels, scale, elem_size,
                             parse_size(model_bytes, "model_bytes"))
    b = resolve_budget(budget=budget, card=card, reserve=reserve, device=device)
    r = _native.plan(width, height, overlap=overlap, align=align, fixed_bytes=c.fixed, per_px_bytes=c.per_px,
                     budget=b, batch=batch, min_tile=min_tile, max_tile=max_tile, feather=feather)
    if not r["fits"]:
        return Plan(False, budget_bytes=b, overlap=overlap, min_tile=r["min_tile"], why=r["why"], cost=c)
    return Plan(True, tuple(r["tile"]), tuple(r["grid"]), r["tiles"], r["xs"], r["ys"],
                r["predicted_peak_bytes"], b, r["batch"], overlap, r["min_tile"], cost=c)


# ============================================================================ the driver

@dataclass
class _Region:
    x0: int
    y0: int
    x1: int
    y1: int
    xr: tuple = ()
    yr: tuple = ()


def _axis(n_len: int, tile: int, overlap: int, align: int, feather: float) -> tuple[list[int], int]:
    """Positions and tile size (<= tile) covering n_len with the fewest tiles."""
    # only the geometric minimum here: min_tile bounds the back-off, not the even grid under a cap
    r = _native.plan(n_len, align, overlap=overlap, align=align, budget=1 << 60,
                     max_tile=tile, min_tile=0, feather=feather)
    if not r["fits"]:
        raise TilingError(f"cannot cover {n_len} px with tiles <= {tile} px and overlap {overlap}: {r['why']}")
    return r["xs"], r["tile"][0]


def _ramps(pos: list[int], i: int, t: int, origin: int, scale: float, feather: float) -> tuple:
    """The ramps of tile i (in output coordinates) toward its neighbours."""
    out = []
    if i > 0:
        a, b = origin + pos[i], origin + pos[i - 1] + t
        m = (b - a) * (1 - feather) / 2
        out.append(((a + m) * scale, (b - m) * scale, True))
    if i < len(pos) - 1:
        a, b = origin + pos[i + 1], origin + pos[i] + t
        m = (b - a) * (1 - feather) / 2
        out.append(((a + m) * scale, (b - m) * scale, False))
    return tuple(out)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if "torch" in sys.modules:
        comfy = sys.modules.get("comfy.model_management")
        if comfy is not None:
            from .adapters import comfyui

            if comfyui.is_oom(e):
                return True
        from .adapters import torch_adapter

        return torch_adapter.is_oom(e)
    return False


def _release() -> None:
    _pygc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        from .adapters import torch_adapter

        try:
            torch_adapter.release_cache()
        except Exception:
            pass


def _default_for(x: Any, layout: str, scale: float) -> CostModel:
    """The default cost model for an image (or a calibration sample) of x's channels and dtype."""
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise TypeError(f"image must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if layout not in ("nhwc", "nchw"):
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    if len(shape) not in (3, 4):
        raise ValueError(f"image must be 3-D or 4-D ({layout.upper()}), got shape {tuple(shape)}")
    c = int(shape[-1] if layout == "nhwc" else shape[-3])
    elem = x.element_size() if hasattr(x, "element_size") else x.dtype.itemsize
    return default_cost(c, c, scale, elem)


class _Job:
    """One image range being tiled: its region queue and its current tile (w, h)."""

    def __init__(self, b0: int, b1: int, regions: list[_Region], tile: tuple[int, int]):
        self.b0, self.b1 = b0, b1
        self.regions = regions
        self.tile = tile


def tiled(fn: Callable[[Any], Any], image: Any, *, scale: float = 1.0, overlap: int = 32, align: int = 1,
          layout: str = "nhwc", tile: int | None = None, reserve: Any = None, budget: Any = None,
          card: Any = None, device: int | None = None, cost: CostModel | None = None, model_key: Any = None,
          min_tile: int = 64, feather: float = 0.5, progress: Callable[[int, int], Any] | None = None,
          cancel: Callable[[], bool] | None = None, max_batch: int | None = None,
          stats: dict | None = None, out: np.ndarray | None = None, max_tile: int | None = None,
          band: bool | None = None) -> Any:
    """Apply `fn` to `image` in the largest tiles that fit, blended seamlessly.

    image: NumPy array or torch tensor, [B,H,W,C] (layout="nhwc", ComfyUI's IMAGE) or
    [B,C,H,W] ("nchw"); 3-D means one image.  float32/float16 (bfloat16 results are
    converted).  fn gets tiles of the same kind and layout (torch tiles on the image's
    device) and must return scale x the size; output channels may differ (VAE decode).
    Returns the same kind (torch results on the CPU), float32 or float16 as fn returned.

    progress(done, total) runs between tiles; total grows if back-off re-plans.  cancel()
    returning True raises Cancelled between tiles (an exception it raises propagates).
    `stats`, when given, is filled with tiles, retries, tile sizes tried and seconds.
    `out`, a C-contiguous float32/float16 NumPy array of the output's shape (4-D), is
    written in place and returned — reuse one across calls (video frames) to skip the page
    faults of a fresh output.
    `band`: blend a row of tiles at once, row by row across them (Canvas.put_band: the output
    written in address order, ~1.3x faster into a fresh output here), holding that row's results (at
    most 256 MiB) until the last of them.  Only safe when fn returns a new buffer each call,
    not one it overwrites on the next: None (default) bands results that were copied here
    from a device (a CUDA tensor), True bands every result, False none.
    """
    t_start = time.perf_counter()
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_callbacks(progress=progress, cancel=cancel)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (filled in place) or None, got {type(stats).__name__}")
    if max_batch is not None:
        max_batch = _check_int(max_batch, "max_batch", 1)
    if band is not None and not isinstance(band, bool):
        raise TypeError(f"band must be True, False or None, got {type(band).__name__} {band!r}"[:200])
    if cost is not None and not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a vramguard.CostModel or None, got {type(cost).__name__}")
    if model_key is not None:
        try:
            hash(model_key)
        except TypeError:
            raise TypeError(f"model_key must be hashable (e.g. id(model) or a str), got "
                            f"{type(model_key).__name__}") from None
    if layout not in ("nhwc", "nchw"):
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    scale = _check_scale(scale)
    overlap = _check_int(overlap, "overlap", 0)
    align = _check_int(align, "align", 1, 4096)
    min_tile = _check_int(min_tile, "min_tile", 1)
    if isinstance(feather, bool) or not isinstance(feather, (int, float)) or not 0 <= feather <= 1:
        raise ValueError(f"feather must be 0..1, got {feather!r}")
    torch = sys.modules.get("torch")
    is_torch = torch is not None and isinstance(image, torch.Tensor)
    if not is_torch and not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray or torch.Tensor, got {type(image).__name__}")
    squeeze = image.ndim == 3
    if squeeze:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"image must be 3-D or 4-D, got shape {tuple(image.shape)}")
    if is_torch:
        if image.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"image dtype must be float32, float16 or bfloat16, got {image.dtype}")
    elif image.dtype not in (np.float32, np.float16):
        raise TypeError(f"image dtype must be float32 or float16, got {image.dtype}")
    B = int(image.shape[0])
    H, W = (int(image.shape[1]), int(image.shape[2])) if layout == "nhwc" else (int(image.shape[2]), int(image.shape[3]))
    C = int(image.shape[3] if layout == "nhwc" else image.shape[1])
    if B < 1 or H < 1 or W < 1 or C < 1:
        raise ValueError(f"image has a zero-size dimension: shape {tuple(image.shape)}")
    Ho, Wo = H * scale, W * scale
    if abs(Ho - round(Ho)) > 1e-6 or abs(Wo - round(Wo)) > 1e-6:
        raise ValueError(f"{W}x{H} x scale {scale} is not a whole number of pixels")
    if W % align or H % align:
        raise ValueError(f"image {W}x{H} is not a multiple of align {align}")
    if overlap % align:
        raise ValueError(f"overlap {overlap} is not a multiple of align {align}")
    if (align * scale) % 1:
        raise ValueError(f"align {align} x scale {scale} must be whole output pixels")
    Ho, Wo = int(round(Ho)), int(round(Wo))
    floor = max(min_tile, 2 * overlap, align)
    floor = -(-floor // align) * align

    c = cost or (cost_model(model_key) if model_key is not None else None) or _default_for(image, layout, scale)
    out_bytes = B * Ho * Wo * max(C, 4) * 4
    if out_bytes > acc.host().total:
        raise ValueError(f"output {B}x{Wo}x{Ho} would need ~{fmt_bytes(out_bytes)} of host memory, more "
                         f"than this machine has ({fmt_bytes(acc.host().total)})")
    if tile is not None:
        tile = _check_int(tile, "tile", 1)
        if tile < floor and tile < max(W, H):
            raise ValueError(f"tile {tile} is too small for overlap {overlap}: tiles must be at least "
                             f"max(min_tile, 2*overlap, align) = {floor} px")
        t0 = (max(floor, tile // align * align) if tile < W else W,
              max(floor, tile // align * align) if tile < H else H)
        # the tile is given, the batch still comes from the budget (which is checked here too):
        # as many images per call as fit, so a large batch of small images is a few calls
        b = resolve_budget(budget=budget, card=card, reserve=reserve, device=device)
        per = max(1.0, c.bytes_for(t0[0], t0[1], 1) - c.fixed)
        if b - c.fixed < per:
            raise TilingError(f"tile {t0[0]}x{t0[1]} needs {fmt_bytes(int(c.fixed + per))} for one image; the "
                              f"budget is {fmt_bytes(b)} (cost model {c.source})")
        batch = max_batch or int(max(1, min(B, (b - c.fixed) // per)))
    else:
        p = plan_tiles(W, H, scale=scale, overlap=overlap, align=align, channels=C, batch=B, cost=c,
                       budget=budget, card=card, reserve=reserve, device=device, min_tile=floor,
                       feather=feather, max_tile=max_tile)
        if not p.fits:
            raise TilingError(f"{p.why}; cost model {c.source}: {fmt_bytes(int(c.fixed))} + "
                              f"{c.per_px:.0f} B/px")
        t0 = p.tile
        batch = p.batch if max_batch is None else max(1, min(p.batch, max_batch))
    st = {"tiles": 0, "retries": 0, "tile_sizes": [list(t0)], "batch": batch, "ooms": []}

    canvas = None
    jobs = [_Job(b, min(b + batch, B), [_Region(0, 0, W, H)], t0) for b in range(0, B, batch)]
    done = 0

    def est_total() -> int:
        n = done
        for j in jobs:
            for r in j.regions:
                nx = len(_axis(r.x1 - r.x0, j.tile[0], overlap, align, feather)[0])
                ny = len(_axis(r.y1 - r.y0, j.tile[1], overlap, align, feather)[0])
                n += nx * ny
        return n

    total = est_total()
    pending: list[tuple] = []   # put() arguments of one band's tiles, blended together (put_band)

    def flush() -> None:
        if len(pending) == 1:
            canvas.put(*pending[0])
        elif pending:
            canvas.put_band(pending)
        pending.clear()

    while jobs:
        job = jobs[0]
        if not job.regions:
            jobs.pop(0)
            continue
        reg = job.regions.pop(0)
        rw, rh = reg.x1 - reg.x0, reg.y1 - reg.y0
        xs, tw = _axis(rw, job.tile[0], overlap, align, feather)
        ys, th = _axis(rh, job.tile[1], overlap, align, feather)
        failed = None
        for r_i, y in enumerate(ys):
            yr = reg.yr + _ramps(ys, r_i, th, reg.y0, scale, feather)
            for c_i, x in enumerate(xs):
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled after {done} of {total} tiles")
                X0, Y0 = reg.x0 + x, reg.y0 + y
                if layout == "nhwc":
                    tile_in = image[job.b0:job.b1, Y0:Y0 + th, X0:X0 + tw, :]
                else:
                    tile_in = image[job.b0:job.b1, :, Y0:Y0 + th, X0:X0 + tw]
                oom_msg = None
                try:
                    res = fn(tile_in)
                except BaseException as e:
                    if not _is_oom(e):
                        raise
                    oom_msg = f"{type(e).__name__}: {str(e)[:200]}"
                if oom_msg is not None:  # outside the except block: its frame is gone
                    del tile_in
                    failed = (r_i, c_i, oom_msg)
                    break
                # a result copied here from a device is ours: it can wait for the band's end
                own = band if band is not None else (torch is not None and isinstance(res, torch.Tensor)
                                                     and res.device.type != "cpu")
                res_np = _to_numpy(res, torch)
                del res
                exp = ((job.b1 - job.b0, int(th * scale), int(tw * scale)) if layout == "nhwc"
                       else (job.b1 - job.b0, None, int(th * scale), int(tw * scale)))
                got = res_np.shape
                ok = res_np.ndim == 4 and (got[0], got[1], got[2]) == exp if layout == "nhwc" else \
                    res_np.ndim == 4 and (got[0], got[2], got[3]) == (exp[0], exp[2], exp[3])
                if not ok:
                    raise ValueError(f"fn returned shape {tuple(got)} for a tile of {tw}x{th} px x "
                                     f"{job.b1 - job.b0} image(s); expected scale {scale} of it")
                if canvas is None:
                    co = got[3] if layout == "nhwc" else got[1]
                    shape = (B, Ho, Wo, co) if layout == "nhwc" else (B, co, Ho, Wo)
                    if out is None:
                        # host RAM like VRAM: the canvas must fit available - RAM reserve
                        check_host_room(math.prod(shape) * res_np.dtype.itemsize, "the output canvas")
                        out = np.empty(shape, dtype=res_np.dtype)
                    elif not isinstance(out, np.ndarray) or out.shape != shape:
                        raise ValueError(f"out must be a numpy array of shape {shape}, got "
                                         f"{getattr(out, 'shape', type(out).__name__)}")
                    canvas = _native.Canvas(out, layout)
                xr = reg.xr + _ramps(xs, c_i, tw, reg.x0, scale, feather)
                if not own:
                    flush()
                pending.append((res_np, job.b0, int(round(X0 * scale)), int(round(Y0 * scale)), xr, yr))
                if not own or sum(p[0].nbytes for p in pending) >= _BAND_MAX_BYTES:
                    flush()
                del res_np
                done += 1
                st["tiles"] += 1
                if progress is not None:
                    progress(done, max(total, done))
            flush()   # also before a back-off: the tiles finished so far are kept
            if failed:
                break
        if failed is None:
            continue
        # ---- back-off: release, then split the batch or shrink the tile; re-plan the rest only
        r_i, c_i, msg = failed
        st["retries"] += 1
        st["ooms"].append(msg)
        _release()
        rest = _remaining(reg, xs, ys, r_i, c_i, tw, th, scale, feather)
        if job.b1 - job.b0 > 1:
            mid = (job.b0 + job.b1) // 2
            # both halves resume at the failed tile; regions are never mutated, so they can share
            jobs.insert(1, _Job(mid, job.b1, rest + job.regions, job.tile))
            job.b1 = mid
            job.regions = rest + job.regions
            log.info("vramguard: out of memory at tile %d; halving the batch to %d", done, job.b1 - job.b0)
        else:
            # halve the area: the longer side first, so tiles stay near square; never below the
            # floor, but the floor itself is tried before giving up
            smaller = _shrink(min(job.tile[0], tw), min(job.tile[1], th), floor, align)
            if smaller is None:
                st["seconds"] = time.perf_counter() - t_start
                if stats is not None:
                    stats.update(st)
                raise TilingError(
                    f"out of memory even at the smallest tile: tried {st['tile_sizes']} px (overlap {overlap}, "
                    f"minimum {floor}); {done} tiles finished; last error {msg}", st)
            tx, ty = smaller
            job.tile = (tx, ty)
            st["tile_sizes"].append([tx, ty])
            job.regions = rest + job.regions
            log.info("vramguard: out of memory at tile %d; tile %s -> %dx%d px, re-planning the remaining area",
                     done, st["tile_sizes"][-2], tx, ty)
        total = est_total()
    if canvas is None:
        raise TilingError("no tile was processed", st)
    result = canvas.finish()
    st["seconds"] = time.perf_counter() - t_start
    if stats is not None:
        stats.update(st)
    if squeeze:
        result = result[0]
    if is_torch:
        return torch.from_numpy(result)
    return result


def _check_callbacks(**cbs: Any) -> None:
    for name, cb in cbs.items():
        if cb is not None and not callable(cb):
            raise TypeError(f"{name} must be callable or None, got {type(cb).__name__}")


def _shrink(tx: int, ty: int, floor: int, align: int) -> tuple[int, int] | None:
    """The next smaller tile after an OOM: the longer side halved (aligned), but not below
    `floor`; the other side when that one is at the floor already; None when both are."""
    t = [tx, ty]
    for i in ((0, 1) if tx >= ty else (1, 0)):
        if t[i] > floor:
            t[i] = max(floor, t[i] // 2 // align * align)
            return t[0], t[1]
    return None


def _remaining(reg: _Region, xs: list[int], ys: list[int], r_i: int, c_i: int, tw: int, th: int,
               scale: float, feather: float) -> list[_Region]:
    """The area of `reg` not yet done when tile (r_i, c_i) failed, as regions whose edge ramps
    complement what the finished tiles already wrote."""
    out = []
    strip_yr = reg.yr + _ramps(ys, r_i, th, reg.y0, scale, feather)
    if c_i > 0:
        left = _ramps(xs, c_i, tw, reg.x0, scale, feather)[:1]  # rising ramp toward tile c_i - 1
        out.append(_Region(reg.x0 + xs[c_i], reg.y0 + ys[r_i], reg.x1, reg.y0 + ys[r_i] + th,
                           reg.xr + left, strip_yr))
        if r_i + 1 < len(ys):
            top = _ramps(ys, r_i + 1, th, reg.y0, scale, feather)[:1]
            out.append(_Region(reg.x0, reg.y0 + ys[r_i + 1], reg.x1, reg.y1, reg.xr, reg.yr + top))
    else:
        top = _ramps(ys, r_i, th, reg.y0, scale, feather)[:1] if r_i > 0 else ()
        out.append(_Region(reg.x0, reg.y0 + ys[r_i], reg.x1, reg.y1, reg.xr, reg.yr + top))
    return out


_BAND_MAX_BYTES = 256 << 20   # tile results tiled() holds for one put_band


def _to_numpy(res: Any, torch: Any) -> np.ndarray:
    if isinstance(res, np.ndarray):
        a = res
    elif torch is not None and isinstance(res, torch.Tensor):
        t = res.detach()
        if not t.is_floating_point():
            raise TypeError(f"fn returned a tensor of dtype {t.dtype}; expected a float type")
        if t.dtype not in (torch.float32, torch.float16):
            t = t.float()
        try:
            a = t.cpu().numpy()
        except (RuntimeError, NotImplementedError, TypeError) as e:  # meta tensors, odd layouts
            raise TypeError(f"fn returned a tensor that cannot be read back ({t.device}, {t.layout}): "
                            f"{str(e)[:120]}") from None
    else:
        raise TypeError(f"fn must return a numpy.ndarray or torch.Tensor, got {type(res).__name__}")
    if a.dtype not in (np.float32, np.float16):
        if a.dtype.kind != "f":
            raise TypeError(f"fn returned dtype {a.dtype}; expected a float type")
        a = a.astype(np.float32)
    return a


def tiled_many(fn: Callable[[Any], Any], images: Sequence[Any], **kw: Any) -> list[Any]:
    """Tile several images of different sizes, largest first (growing sizes fragment the
    caching allocator) after prewarming the cache for the largest one's tiles (see
    vramguard.prewarm), returning results in the original order."""
    if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
        raise TypeError(f"images must be a sequence of arrays/tensors, got {type(images).__name__}")
    images = list(images)
    torch = sys.modules.get("torch")
    kinds = (np.ndarray,) + ((torch.Tensor,) if torch is not None else ())
    for i, im in enumerate(images):
        if not isinstance(im, kinds):
            raise TypeError(f"images[{i}] must be a numpy.ndarray or torch.Tensor, got {type(im).__name__}")
        if im.ndim not in (3, 4):
            raise ValueError(f"images[{i}] must be 3-D or 4-D, got shape {tuple(im.shape)}")
    order = sorted(range(len(images)), key=lambda i: -int(np.prod(images[i].shape)))
    if images:  # and reserve the cache for the largest tile set before the first (issue 16)
        from . import batch

        batch.prewarm_for_tiles(images[order[0]], kw)
    out: list[Any] = [None] * len(images)
    for i in order:
        out[i] = tiled(fn, images[i], **kw)
    return out
