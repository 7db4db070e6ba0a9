"""The ComfyUI adapter: every call vramguard makes into ComfyUI lives here.

The probe, the GC actions, the stage hooks, the prompt hooks, and the library side of the
node pack (nodes/pack.py is a table of nodes, each execute one call into this module).
Imported lazily (by the node pack, by the settings, by tiling's OOM test), never by
`import vramguard`.  Outside ComfyUI (tests, other hosts) `comfy(name)` is None and the node
functions fall back to plain torch.  Checked against ComfyUI 0.3.64 and the 2026 line
(0.30.0 read in full); every seam is looked up defensively — a host version that lacks one
logs it once and the rest carry on.

Seams, most stable first (see DESIGN.md):
  text_encode  comfy.sd.CLIP.encode_from_tokens_scheduled / encode_from_tokens
  unet         comfy.samplers.CFGGuider.sample (every sampler passes it: KSampler through
               comfy.sample.sample* -> comfy.samplers.sample, SamplerCustomAdvanced through
               guider.sample; subclasses inherit it), outer_sample for guiders that override
               sample, and comfy.sample.sample / sample_custom for hosts older than the
               guiders.  Nested calls are one sampling run: one check, after it returned.
  vae_decode   comfy.sd.VAE.decode / decode_tiled
  vae_encode   comfy.sd.VAE.encode / encode_tiled
  controlnet   comfy.controlnet.load_controlnet
  lora_load    comfy.sd.load_lora_for_models
  lora_unload  comfy.model_patcher.ModelPatcher.unpatch_model (and ModelPatcherDynamic's
               override) when it removes weight patches: unpatch_weights=False, which
               Dynamic VRAM's partially_load passes on every load, is not an unload
  upscale      ImageUpscaleWithModel.execute / upscale, reached through
               nodes.NODE_CLASS_MAPPINGS: ComfyUI loads comfy_extras/*.py under path-derived
               module names, so importing comfy_extras.nodes_upscale_model gives a second
               copy whose class never runs
  ipadapter    the IPAdapter pack's node FUNCTIONs, when that pack is loaded
Per prompt: execution.PromptExecutor.execute_async (or execute) -> the INFO run summary,
and the end of a Set Reserve override.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
from typing import Any, Callable

from .. import accounting as acc
from .. import gcguard
from .. import reserve as _reserve
from .._units import parse_size
from ..hooks import HookSet, call_stage

log = logging.getLogger("vramguard")

_hooks = HookSet("ComfyUI")
_prompt_hooks = HookSet("ComfyUI prompt")
_GiB = 1 << 30
_MiB = 1 << 20
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("vramguard: " + msg, *args)


def _is_lora_unload(patcher: Any, device_to: Any = None, unpatch_weights: Any = True, *a: Any, **kw: Any) -> bool:
    """unpatch_model runs on every offload, and Dynamic VRAM's partially_load calls it with
    unpatch_weights=False on every load: a LoRA unload only when weights are unpatched and
    patches exist."""
    return bool(unpatch_weights) and bool(getattr(patcher, "patches", None))


# (module, attribute path, stage, predicate deciding per call whether it is that stage, optional)
# optional seams are absent on some lines by design and never reported missing.
SEAMS: list[tuple[str, str, str, Callable[..., bool] | None, bool]] = [
    ("comfy.sd", "CLIP.encode_from_tokens_scheduled", "text_encode", None, True),
    ("comfy.sd", "CLIP.encode_from_tokens", "text_encode", None, False),
    ("comfy.samplers", "CFGGuider.sample", "unet", None, False),
    ("comfy.samplers", "CFGGuider.outer_sample", "unet", None, False),
    ("comfy.sample", "sample", "unet", None, False),
    ("comfy.sample", "sample_custom", "unet", None, False),
    ("comfy.sd", "VAE.decode", "vae_decode", None, False),
    ("comfy.sd", "VAE.decode_tiled", "vae_decode", None, False),
    ("comfy.sd", "VAE.encode", "vae_encode", None, False),
    ("comfy.sd", "VAE.encode_tiled", "vae_encode", None, False),
    ("comfy.controlnet", "load_controlnet", "controlnet", None, False),
    ("comfy.sd", "load_lora_for_models", "lora_load", None, False),
    ("comfy.model_patcher", "ModelPatcher.unpatch_model", "lora_unload", _is_lora_unload, False),
    ("comfy.model_patcher", "ModelPatcherDynamic.unpatch_model", "lora_unload", _is_lora_unload, True),
]
# Node classes, reached through nodes.NODE_CLASS_MAPPINGS: (node, methods tried in order, stage).
# The first method the class defines itself is wrapped (0.30: execute, with upscale an alias).
NODE_SEAMS: list[tuple[str, tuple[str, ...], str]] = [
    ("ImageUpscaleWithModel", ("execute", "upscale"), "upscale"),
]
IPADAPTER_NODES = ("IPAdapter", "IPAdapterAdvanced", "IPAdapterFaceID", "IPAdapterTiled",
                   "IPAdapterBatch", "IPAdapterEmbeds", "IPAdapterStyleComposition")


# ----------------------------------------------------------------------------- the host
def comfy(name: str) -> Any | None:
    """comfy.<name> if this process is a ComfyUI, else None."""
    try:
        return importlib.import_module(f"comfy.{name}")
    except Exception:
        return None


def _mm() -> Any:
    """comfy.model_management; raises ImportError outside ComfyUI."""
    return importlib.import_module("comfy.model_management")


def node_class(name: str) -> Any | None:
    """The class ComfyUI runs for node `name` (from nodes.NODE_CLASS_MAPPINGS, the only copy
    that executes), None when that node is not loaded."""
    nodes = sys.modules.get("nodes")
    mapping = getattr(nodes, "NODE_CLASS_MAPPINGS", None) if nodes is not None else None
    return mapping.get(name) if isinstance(mapping, dict) else None


def torch_device() -> Any:
    """ComfyUI's compute device (cpu under --cpu); elsewhere CUDA when present, else CPU."""
    import torch

    mm = comfy("model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_index(dev: Any) -> int | None:
    """The CUDA index of a torch device; None for CPU-like devices, whose memory is host RAM."""
    if getattr(dev, "type", "cpu") != "cuda":
        return None
    return dev.index or 0


def plan_device(dev: Any) -> int | str:
    """What a tiled stage on torch device `dev` plans against: its GPU, or host RAM."""
    idx = device_index(dev)
    return "host" if idx is None else idx


def host_reserve() -> int:
    """ComfyUI's own reserve: max(--reserve-vram / its OS default, --vram-headroom); 0 outside ComfyUI."""
    mm = comfy("model_management")
    r = int(getattr(mm, "extra_reserved_memory", lambda: 0)() or 0) if mm is not None else 0
    try:
        from comfy.cli_args import args

        r = max(r, int(float(getattr(args, "vram_headroom", 0) or 0) * _GiB))
    except Exception:
        pass
    return r


# ----------------------------------------------------------------------------- Dynamic VRAM
def _aimdo(part: str) -> Any | None:
    """comfy_aimdo.<part> when ComfyUI runs with Dynamic VRAM on, else None."""
    mem = sys.modules.get("comfy.memory_management")
    if mem is None or not getattr(mem, "aimdo_enabled", False):
        return None
    try:
        return importlib.import_module(f"comfy_aimdo.{part}")
    except Exception:
        return None


def aimdo_figures(index: int | None) -> dict[str, int] | None:
    """Dynamic VRAM's figures: idle-weight VRAM it would evict for us (vbars_analyze, what
    ComfyUI adds to free memory) and its total VRAM use; None without Dynamic VRAM.
    Any failure is logged once and reads as None."""
    vbar, control = _aimdo("model_vbar"), _aimdo("control")
    if vbar is None and control is None:
        return None
    out: dict[str, int] = {}
    try:
        if vbar is not None and hasattr(vbar, "vbars_analyze"):
            out["evictable"] = max(0, int(vbar.vbars_analyze(index)))
        if control is not None and hasattr(control, "get_total_vram_usage"):
            out["usage"] = max(0, int(control.get_total_vram_usage()))
    except Exception as e:
        _warn_once("aimdo-read", "comfy_aimdo figures unavailable (%s: %s); using ComfyUI's", type(e).__name__, e)
        return None
    return out


_headroom_sent: list[int | None] = [None]


def sync_aimdo_headroom() -> int | None:
    """Forward the reserve in force to Dynamic VRAM (set_simple_vram_headroom, comfy-aimdo
    >= 0.6), so the settings' reserve holds where --lowvram is a no-op.  Sends only changes;
    returns the bytes sent, None when nothing was (absent, unchanged, or it failed: logged once)."""
    control = _aimdo("control")
    setter = getattr(control, "set_simple_vram_headroom", None) if control is not None else None
    if not callable(setter):
        return None
    try:
        want = max(int(acc.limits(acc.default_device())["reserve"]), host_reserve())
        if want == _headroom_sent[0]:
            return None
        setter(want)
        _headroom_sent[0] = want
        return want
    except Exception as e:
        _warn_once("aimdo-headroom", "cannot forward the reserve to comfy_aimdo (%s: %s); ignored",
                   type(e).__name__, e)
        return None


# ----------------------------------------------------------------------------- probe and actions
def probe(index: int) -> dict[str, Any] | None:
    """ComfyUI's view: its evictable-aware free figure, torch's allocator, its reserve.
    Reads only (no allocation, no CUDA context): safe inside a sampling run."""
    import torch

    mm = _mm()
    dev = mm.get_torch_device()
    if getattr(dev, "type", "cpu") != "cuda" or not torch.cuda.is_initialized():
        return None
    if (dev.index or 0) != index:
        dev = torch.device("cuda", index)
    free_total = mm.get_free_memory(dev)
    aim = aimdo_figures(index)
    if aim is not None and "evictable" in aim:
        # Dynamic VRAM: idle weights stay resident but evictable, as ModelPatcher.get_free_memory counts
        free_total += aim["evictable"]
    else:
        for lm in list(getattr(mm, "current_loaded_models", []) or []):
            fn = getattr(getattr(lm, "model", None), "get_free_memory", None)
            if callable(fn):
                try:
                    free_total = max(free_total, int(fn(dev)))
                except Exception:
                    pass
    st = torch.cuda.memory_stats(dev)
    return {"reserved": st.get("reserved_bytes.all.current", 0),
            "allocated": st.get("allocated_bytes.all.current", 0),
            "active": st.get("active_bytes.all.current", 0),
            "oom_count": st.get("num_ooms", 0), "retry_count": st.get("num_alloc_retries", 0),
            "free": int(free_total), "reserve": host_reserve()}


def release_cache() -> None:
    """Give cached device memory back (ComfyUI's soft_empty_cache; torch's elsewhere)."""
    mm = comfy("model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    from . import torch_adapter

    torch_adapter.release_cache()


def unload_models(device: Any, bytes_needed: int) -> None:
    """Let ComfyUI unload models until `bytes_needed` are free on `device` (a CUDA index or a
    torch device); nothing for CPU devices or outside ComfyUI.  The GC guard's low-VRAM
    action and the tiled nodes' make-room step."""
    mm = comfy("model_management")
    if mm is None:
        return
    if isinstance(device, int):
        import torch

        dev = mm.get_torch_device()
        if getattr(dev, "type", "cpu") != "cuda" or (dev.index or 0) != device:
            dev = torch.device("cuda", device)
    else:
        dev = device
    if getattr(dev, "type", "cpu") == "cuda":
        mm.free_memory(int(bytes_needed), dev)


def unload_all() -> None:
    """Unload every model and release caches (ComfyUI), or just release torch's cache."""
    mm = comfy("model_management")
    if mm is not None:
        mm.unload_all_models()
    release_cache()


def is_oom(exc: BaseException) -> bool:
    mm = _mm()
    f = getattr(mm, "is_oom", None)
    if callable(f):
        try:
            return bool(f(exc))
        except Exception:
            pass
    oom = getattr(mm, "OOM_EXCEPTION", None)
    return bool(oom is not None and oom is not Exception and isinstance(exc, oom))


def load_models(patchers: list, memory_required: int = 0, force_full_load: bool = False) -> None:
    mm = comfy("model_management")
    patchers = [p for p in patchers if p is not None]
    if mm is not None and patchers:
        mm.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=force_full_load)


def load_with_room(patchers: list, working: int, dev: Any, what: str, force_full_load: bool = False) -> None:
    """Make room first: load the stage's model through ComfyUI asking for `working` bytes of
    working memory beside it, so ComfyUI unloads idle models (and, under Dynamic VRAM, evicts
    weights) until the stage's untiled working set — or as much of it as the card can hold
    beside the reserve — is free.  The plan is then made against what was freed, instead of
    tiling small while a sampled-out UNet sits idle in VRAM.  Logs what was freed and why."""
    idx = device_index(dev)
    before = None
    if idx is not None and idx < acc.device_count():
        before = acc.snapshot(idx)
        working = max(0, min(int(working), before.total - before.reserve))
    load_models(patchers, memory_required=max(0, int(working)), force_full_load=force_full_load)
    if before is not None:
        after = acc.snapshot(idx)
        freed = max(0, after.free - before.free)
        if freed:
            log.info("vramguard: made room for %s on cuda:%d: %.0f MiB freed by ComfyUI (asked for a "
                     "working set of %.0f MiB beside the %.0f MiB reserve); budget now %.0f MiB", what, idx,
                     freed / _MiB, working / _MiB, after.reserve / _MiB, after.budget / _MiB)


def progress(total: int) -> Callable[[int, int], None]:
    """A progress callback; in ComfyUI it also raises the user's Cancel between tiles."""
    utils, mm = comfy("utils"), comfy("model_management")
    pbar = utils.ProgressBar(total) if utils is not None else None

    def cb(done: int, tot: int) -> None:
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        if pbar is not None:
            pbar.update_absolute(done, tot)
    return cb


def intermediate_dtype(default: Any) -> Any:
    mm = comfy("model_management")
    f = getattr(mm, "intermediate_dtype", None) if mm is not None else None
    return f() if callable(f) else default


# ----------------------------------------------------------------------------- stage hooks
def _resolve(module: str, path: str) -> tuple[Any, str] | None:
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:
        log.info("vramguard: %s not importable here (%s); skipping its hooks", module, e)
        return None
    *owners, attr = path.split(".")
    for name in owners:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj, attr


def install_hooks(stages: dict[str, bool] | None = None) -> list[tuple[str, str]]:
    """Install every available stage hook (idempotent) and register the probe and actions.
    Returns the (seam, stage) pairs now installed."""
    g = gcguard.guard()
    g.release_cache = release_cache
    g.unload_models = unload_models
    acc.register_probe(probe, origin="comfyui")
    _hooks.missing.clear()
    for module, path, stage, when, optional in SEAMS:
        if stages is not None and not stages.get(stage, True):
            continue
        found = _resolve(module, path)
        if found is None or (optional and found[1] not in getattr(found[0], "__dict__", {})):
            if not optional:
                _hooks.missing[f"{module}.{path}"] = "not found"
            continue
        # a subclass's own override (ModelPatcherDynamic) gets its own hook; inherited ones share the base's
        _hooks.wrap(found[0], found[1], stage, when, own=optional)
    install_node_hooks(stages)
    install_prompt_hooks()
    return _hooks.installed()


def install_node_hooks(stages: dict[str, bool] | None = None) -> int:
    """Hooks on node classes (core's upscale node, the IPAdapter pack's nodes), taken from
    nodes.NODE_CLASS_MAPPINGS.  Packs may load after ours: called again at each prompt."""
    n = 0
    for node, methods, stage in NODE_SEAMS:
        if stages is not None and not stages.get(stage, True):
            continue
        cls = node_class(node)
        meth = next((m for m in methods if cls is not None and m in cls.__dict__), None)
        if meth is None:
            _hooks.missing[f"nodes.NODE_CLASS_MAPPINGS[{node!r}]"] = "not loaded" if cls is None else "no method"
            continue
        _hooks.missing.pop(f"nodes.NODE_CLASS_MAPPINGS[{node!r}]", None)
        # each name the class defines (0.30 keeps upscale = execute as an alias) gets a
        # wrapper; one calling the other is one stage, checked once
        for m in methods:
            if m in cls.__dict__ and _hooks.wrap(cls, m, stage):
                n += 1
    if stages is None or stages.get("ipadapter", True):
        n += install_ipadapter_hooks()
    return n


def install_ipadapter_hooks() -> int:
    """IPAdapter nodes come from another pack that may load after ours; call again later."""
    n = 0
    for key in IPADAPTER_NODES:
        cls = node_class(key)
        fn = getattr(cls, "FUNCTION", None) if cls is not None else None
        if isinstance(fn, str) and _hooks.wrap(cls, fn, "ipadapter"):
            n += 1
    return n


def install_prompt_hooks() -> bool:
    """Wrap PromptExecutor so each prompt starts clean and ends with the run summary and the
    end of any Set Reserve override.  Installed at pack load, with or without stage hooks."""
    found = _resolve("execution", "PromptExecutor")
    if found is None:
        return False
    cls = getattr(*found, None)
    if cls is None:
        return False
    if getattr(cls, "__vramguard_prompt__", False):
        return True
    # execute() runs execute_async() where both exist: wrap one, or prompts count twice
    for meth in ("execute_async", "execute"):
        orig = cls.__dict__.get(meth)
        if orig is None:
            continue
        setattr(cls, meth, _prompt_wrapper(orig))
        _prompt_hooks._installed.append((cls, meth, orig, "prompt"))
        break
    cls.__vramguard_prompt__ = True
    return True


def prompt_started() -> None:
    """What a prompt's start does: late packs' hooks, fresh run stats, no leftover override,
    the reserve forwarded to Dynamic VRAM."""
    if _hooks._installed:
        install_node_hooks()  # packs loaded after ours are there by the first prompt
    g = gcguard.guard()
    with g._lock:
        g._run_stats = {}
    _reserve.end_override()
    sync_aimdo_headroom()


def prompt_finished(prompt_id: Any) -> None:
    """What a prompt's end does: the INFO summary, Set Reserve's override ends."""
    try:
        gcguard.guard().run_summary(f"prompt {prompt_id}")
    except Exception as e:  # pragma: no cover
        log.debug("vramguard: summary failed: %s", e)
    try:
        if _reserve.end_override():
            sync_aimdo_headroom()
    except Exception as e:  # pragma: no cover
        log.warning("vramguard: could not end the Set Reserve override: %s", e)


def _prompt_wrapper(orig: Any) -> Any:
    if inspect.iscoroutinefunction(orig):
        @functools.wraps(orig)
        async def awrapper(self, prompt, prompt_id, *a, **kw):
            prompt_started()
            try:
                return await orig(self, prompt, prompt_id, *a, **kw)
            finally:
                prompt_finished(prompt_id)
        return awrapper

    @functools.wraps(orig)
    def wrapper(self, prompt, prompt_id, *a, **kw):
        prompt_started()
        try:
            return orig(self, prompt, prompt_id, *a, **kw)
        finally:
            prompt_finished(prompt_id)
    return wrapper


def uninstall_hooks() -> None:
    """Remove the stage hooks and the probe; the prompt hooks stay (Set Reserve's scope)."""
    _hooks.uninstall()
    if acc.probe()[0] == "comfyui":
        acc.register_probe(None)


def uninstall_prompt_hooks() -> None:
    while _prompt_hooks._installed:
        cls, meth, orig, _ = _prompt_hooks._installed.pop()
        setattr(cls, meth, orig)
        try:
            del cls.__vramguard_prompt__
        except AttributeError:
            pass


def hook_report() -> dict[str, Any]:
    return {"installed": _hooks.installed(), "missing": dict(_hooks.missing),
            "prompt_hooks": bool(_prompt_hooks._installed), "aimdo": aimdo_figures(acc.default_device())}


# ============================================================================= the nodes' library side
# Each node's execute in nodes/pack.py is one call to one of these.

def memory_report(device: int) -> tuple[str, dict[str, Any]]:
    """Memory Snapshot: readable text and the numbers (free, budget, used %).  Without a GPU
    (or with device beyond the visible ones) host RAM is the device, judged the same way."""
    lines: list[str] = []
    idx: int | None = device if device < acc.device_count() else None
    if idx is None and acc.device_count() > 0:
        lines.append(f"no GPU {device} (visible: {acc.device_count()}); host RAM instead")
    elif idx is None:
        lines.append(f"no GPU ({acc.gpu_status().get('devices_reason')}); host RAM as the device")
    s = acc.snapshot(idx)
    nums = {"free": int(s.free), "budget": int(s.budget), "used_pct": 100.0 * s.used / s.total if s.total else 0.0}
    from .._units import fmt_bytes

    lines.append(f"{'GPU ' + str(s.index) if idx is not None else 'host'} {s.name} ({s.source})")
    for k in ("total", "used", "free", "process_used", "framework_reserved", "framework_allocated",
              "evictable", "reserve", "cap", "budget"):
        lines.append(f"  {k:20s} {fmt_bytes(getattr(s, k))}")
    if s.oom_count is not None:
        lines.append(f"  {'oom / retries':20s} {s.oom_count} / {s.retry_count}")
    if s.inactive_split is not None or s.largest_free_block is not None:  # issue 16: fragmentation
        lines.append(f"  {'inactive splits':20s} {fmt_bytes(s.inactive_split)}")
        lines.append(f"  {'largest free block':20s} {fmt_bytes(s.largest_free_block)}")
    if s.expandable_segments is not None:
        lines.append(f"  {'expandable segments':20s} {'on' if s.expandable_segments else 'off'}")
    eff = _reserve.effective_reserve(idx)
    if eff["override"] is not None:
        lines.append(f"  reserve set by Set Reserve for this prompt: {fmt_bytes(eff['override'])} "
                     f"(settings: {fmt_bytes(eff['configured_before_override'])})")
    h = acc.host()
    lines.append(f"host RAM: {fmt_bytes(h.available)} available of {fmt_bytes(h.total)}, "
                 f"this process {fmt_bytes(h.process_rss)}")
    return "\n".join(lines), nums


def gc_checkpoint(value: Any, mode: str, stage: str) -> Any:
    """GC Checkpoint: run the policy (or force a collection) after `stage`; pass value on."""
    d = gcguard.gc_check(stage, forced=(mode == "forced"))
    log.info("vramguard: GC checkpoint after %s: %s (%s)", stage, "collected" if d.collect else "skipped", d.reason)
    return value


def unload_models_node(value: Any) -> Any:
    """Unload Models: every model out of VRAM, caches released; value passed on."""
    unload_all()
    return value


def _gb(value: Any, what: str, *, unset_ok: bool = False) -> int | None:
    """A node's GB input as bytes, checked before any work: NaN, ±inf, negative (except the
    -1 "not set" of the tiled nodes) and non-numbers fail with the input's name and value."""
    import math

    if unset_ok and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 \
            and math.isfinite(value):
        return None
    return parse_size(value, what, default_unit=_GiB)


def set_reserve_for_prompt(reserve_gb: float, cap_gb: float, device: int = -1) -> int:
    """Set Reserve: reserve and cap for the rest of this prompt (ComfyUI's prompt hook ends
    the override; outside ComfyUI, vramguard.end_override() does).  Returns the budget now,
    in MiB, of that device (the default device for -1; host RAM without a GPU)."""
    dev = None if device < 0 else device
    _reserve.override_limits(reserve=_gb(reserve_gb, "reserve_gb"), cap=_gb(cap_gb, "cap_gb"), device=dev)
    sync_aimdo_headroom()
    target = dev if dev is not None and dev < acc.device_count() else acc.default_device()
    return int(acc.snapshot(target).budget) >> 20


def _budget(dev: Any, reserve_gb: float) -> int:
    """The planning budget for a stage on torch device `dev`: its GPU's snapshot, host RAM's
    for a CPU device; reserve_gb >= 0 is a floor over the configured reserve."""
    from .. import tiling

    target = plan_device(dev)
    reserve = _gb(reserve_gb, "reserve_gb", unset_ok=True)
    if reserve is None and target == "host":
        # a CPU device's "VRAM" is host RAM: the settings' reserve applies to it, as before
        reserve = int(acc.limits()["reserve"])
    return tiling.resolve_budget(reserve=reserve, device=target)


def _run_tiled(stage: str, fn: Any, x: Any, *, layout: str = "nhwc", dev: Any = None, **kw: Any) -> Any:
    """Plan once for the progress bar's total, then tile inside a GC stage.  In low-VRAM mode
    other models are unloaded first, until the planned peak plus the reserve is free."""
    from .. import tiling

    H, W = (x.shape[1], x.shape[2]) if layout == "nhwc" else (x.shape[2], x.shape[3])
    plan_kw = {k: kw[k] for k in ("scale", "overlap", "align", "cost", "budget", "min_tile", "max_tile") if k in kw}
    p = tiling.plan_tiles(W, H, batch=x.shape[0], **plan_kw)
    idx = device_index(dev)
    if gcguard.guard().low_vram and p.fits and idx is not None:
        unload_models(dev, int(p.predicted_peak_bytes) + int(acc.snapshot(idx).reserve))
    with _ledger_claim(idx, p), gcguard.stage(stage):
        return tiling.tiled(fn, x, layout=layout, progress=progress(max(1, p.tiles) * x.shape[0]), **kw)


def _ledger_claim(idx: int | None, plan: Any) -> Any:
    """Announce the planned peak in the shared ledger (when this process joined it) for the
    duration of a tiled stage, so the other participants' budgets leave room for it."""
    import contextlib

    from .. import ledger

    if idx is None or not plan.fits or not ledger.status().get("joined"):
        return contextlib.nullcontext()
    return ledger.claim(idx, int(plan.predicted_peak_bytes))


def _model_key(upscale_model: Any, dev: Any) -> tuple:
    # the model object itself (held weakly by the cost cache), never its id: ids are reused
    return (getattr(upscale_model, "model", upscale_model), "upscale", str(dev))


def upscale_tiled(upscale_model: Any, image: Any, overlap: int = 32, reserve_gb: float = -1.0,
                  max_tile: int = 0) -> Any:
    """Upscale Image (tiled, auto): the model loaded the way core loads it, the alpha channel
    split off and resized, the RGB tiled in the largest tiles that fit the budget."""
    import torch

    scale = float(getattr(upscale_model, "scale", 0) or 0)
    if scale <= 0:
        raise ValueError(f"upscale model has no usable scale ({getattr(upscale_model, 'scale', None)!r})")
    # back-off stops at 64 px, or lower when the user capped tiles below that
    floor = max(2 * overlap, min(64, max_tile) if max_tile else 64)
    if max_tile and max_tile < floor:
        raise ValueError(f"max_tile {max_tile} is below 2 x overlap ({2 * overlap}); lower the overlap")
    patcher = getattr(upscale_model, "patcher", None)
    dev = getattr(patcher, "load_device", None) or torch_device()
    alpha = None
    if image.shape[-1] == 4:
        alpha, image = image[..., 3:4], image[..., :3]
    from .. import tiling

    key = _model_key(upscale_model, dev)
    cost = tiling.cost_model(key)
    if patcher is not None:
        # >= 0.30: a (Core)ModelPatcher owns the weights; ComfyUI moves them, fully, and never
        # .to(); asking for the untiled working set makes room first
        guess = cost or tiling.default_cost(3, 3, scale, image.element_size())
        load_with_room([patcher], int(guess.bytes_for(image.shape[2], image.shape[1], image.shape[0])), dev,
                       "upscale", force_full_load=True)
    elif hasattr(upscale_model, "to"):
        upscale_model.to(dev)

    def fn(t):
        with torch.no_grad():
            y = upscale_model(t.movedim(-1, -3).to(dev).float())
        return y.movedim(-3, -1)

    if cost is None and device_index(dev) is not None:
        cost = tiling.calibrate(fn, image[:1].to(dev), key=key)
    out = _run_tiled("upscale", fn, image, dev=dev, scale=scale, overlap=overlap, cost=cost,
                     budget=_budget(dev, reserve_gb), min_tile=floor, max_tile=max_tile or None, max_batch=1,
                     band=True)   # the model returns a new tensor per tile: a row of them can wait
    out = torch.clamp(out, 0.0, 1.0)
    if alpha is not None:
        a = torch.nn.functional.interpolate(alpha.movedim(-1, -3).float(), size=out.shape[1:3], mode="bilinear")
        out = torch.cat((out, a.movedim(-3, -1).to(out)), dim=-1)
    return out.to(intermediate_dtype(out.dtype))


def _vae_ratio(vae: Any, attr: str) -> int | None:
    """The VAE's integer spatial ratio when vramguard can tile it itself (2-D image VAEs);
    None sends the node to ComfyUI's own code path (video, audio, self-tiling VAEs)."""
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    r = getattr(vae, attr, 8)
    if not isinstance(r, int) or r <= 0 or getattr(vae, "latent_dim", 2) != 2:
        return None
    if getattr(vae, "extra_1d_channel", None) is not None or getattr(vae, "handles_tiling", False):
        return None
    return r


def _vae_program(direction: str, vae: Any, ndim: int) -> tuple[Any, dict] | None:
    """The seamless (layer-synchronous) tiled path for this VAE, or None where its modules are
    not a layout vramguard.vae knows (then the planner's overlap tiling or ComfyUI's own path)."""
    from .. import vae as vae_mod

    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None or getattr(vae, "handles_tiling", False):
        return None
    try:
        if direction == "decode" and ndim == 4:
            vae_mod.compile_decoder(fsm.decoder, getattr(fsm, "post_quant_conv", None))
            return vae_mod.decode_tiled, {"decoder": fsm.decoder,
                                          "post_quant_conv": getattr(fsm, "post_quant_conv", None)}
        if direction == "encode" and ndim == 4:
            vae_mod.compile_encoder(fsm.encoder, getattr(fsm, "quant_conv", None))
            return vae_mod.encode_tiled, {"encoder": fsm.encoder, "quant_conv": getattr(fsm, "quant_conv", None)}
        if direction == "decode" and ndim == 5:
            return vae_mod.video_program(fsm)   # Wan: layer-synchronous; local (LTX-shaped): halo tiles
        kind = vae_mod.video_layout(getattr(fsm, "decoder", fsm))[0] if direction == "encode" and ndim == 5 else ""
        if kind in ("wan", "wan22"):     # Wan 2.1 / 2.2-shaped: its own chunks and caches, tiled
            from .. import vae_wan22
            (vae_mod.check_wan_encoder if kind == "wan" else vae_wan22.check_wan22_encoder)(fsm.encoder)
            return vae_mod.encode_tiled, {"encoder": fsm.encoder, "quant_conv": getattr(fsm, "conv1", None)}
        if direction == "encode" and ndim == 5:   # HunyuanVideo-shaped (Encoder with conv3d=True)
            vae_mod.compile_carried_encoder(fsm.encoder, part="down")
            return vae_mod.encode_tiled, {"encoder": fsm.encoder, "quant_conv": getattr(fsm, "quant_conv", None)}
    except (vae_mod.VaeTilingError, AttributeError, TypeError) as e:
        log.info("vramguard: seamless tiled VAE not available for %s (%s); using %s", type(fsm).__name__, e,
                 "ComfyUI's own tiled path" if ndim == 5 else "overlap tiling")
    return None


def _vae_seamless(direction: str, vae: Any, x: Any, reserve_gb: float) -> Any | None:
    """VAE decode/encode through vramguard.vae: the untiled result to float rounding, at about
    one pass of compute (GroupNorm statistics over the whole map, global attention)."""
    import torch

    dec = direction == "decode"
    z = x["samples"] if dec else None
    found = _vae_program(direction, vae, z.ndim if dec else (5 if getattr(vae, "latent_dim", 2) == 3 else 4))
    if found is None:
        return None
    run, mods = found
    dev, dtype = vae.device, vae.vae_dtype
    est = getattr(vae, "memory_used_decode" if dec else "memory_used_encode", None)
    shape = tuple(z.shape) if dec else (x.shape[0], 3, x.shape[1], x.shape[2])
    working = int(est(shape, dtype)) if callable(est) else 0
    load_with_room([getattr(vae, "patcher", None)], working, dev, "vae_decode" if dec else "vae_encode",
                   force_full_load=getattr(vae, "disable_offload", False))
    budget = _budget(dev, reserve_gb)
    cb = progress(1)
    tick: Any = cb  # image steps report (done, total); video chunks only done
    if dec:
        src = z.to(dtype)
        if z.ndim == 5:
            tick = lambda done: cb(done, done + 1)  # noqa: E731
    else:
        px = vae.vae_encode_crop_pixels(x) if hasattr(vae, "vae_encode_crop_pixels") else x
        src = vae.process_input(px[:, :, :, :3].movedim(-1, 1)).to(dtype)
        if getattr(vae, "latent_dim", 2) == 3:   # frames -> one (1, C, T, H, W) video, as VAE.encode does
            src = src.movedim(1, 0).unsqueeze(0)
    with gcguard.stage("vae_decode" if dec else "vae_encode"), torch.no_grad():
        out = run(**mods, **{"latent" if dec else "image": src}, budget_bytes=budget, device=dev,
                  store_device=torch.device("cpu"), progress=tick)
    out = out.float()
    if not dec:
        return {"samples": out[:, : out.shape[1] // 2].contiguous()}  # the regulariser's mean
    img = vae.process_output(out)
    if img.ndim == 5:  # video (B, C, T, H, W) -> frames as IMAGE
        img = img.movedim(1, -1).reshape(-1, *img.shape[-2:], img.shape[1])
        return img.contiguous()
    return img.movedim(1, -1).contiguous()


def vae_tiled(direction: str, vae: Any, x: Any, overlap: int, reserve_gb: float = -1.0) -> Any:
    """VAE Decode / Encode (tiled, auto).  direction "decode": x is a LATENT dict, returns an
    IMAGE; "encode": x is an IMAGE, returns a LATENT dict.  Image VAEs of the SD/SDXL/Flux
    layout and Wan-shaped video VAEs run seamless (vramguard.vae); other image VAEs are tiled
    by the planner with ComfyUI's own cost estimate; the rest (audio, self-tiling) go through
    ComfyUI's own call, still as a GC stage."""
    import torch

    if direction not in ("decode", "encode"):
        raise ValueError(f"direction must be 'decode' or 'encode', got {direction!r}")
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    done = _vae_seamless(direction, vae, x, reserve_gb)
    if done is not None:
        return done
    dec = direction == "decode"
    stage = "vae_decode" if dec else "vae_encode"
    ratio = _vae_ratio(vae, "upscale_ratio" if dec else "downscale_ratio")
    if dec:
        z = x["samples"]
        if z.ndim != 4 or ratio is None:
            log.info("vramguard: latent %s / this VAE is not 2-D; using ComfyUI's own decode", tuple(z.shape))
            with gcguard.stage(stage):
                img = vae.decode(z)
            return img.reshape(-1, *img.shape[-3:]) if img.ndim == 5 else img
        src, layout, scale, align = z.float(), "nchw", ratio, 1
        ov = overlap
    else:
        if ratio is None:
            with gcguard.stage(stage):
                return {"samples": vae.encode(x[:, :, :, :3])}
        px = vae.vae_encode_crop_pixels(x) if hasattr(vae, "vae_encode_crop_pixels") else x
        src, layout, scale, align = px[:, :, :, :3].float().contiguous(), "nhwc", 1 / ratio, ratio
        ov = max(ratio, overlap // ratio * ratio) if overlap else 0
    dev, dtype = vae.device, vae.vae_dtype
    # ComfyUI's own estimate per pixel of the tile's input; the weights are loaded first, so
    # the budget already excludes them and the fixed term is just workspace
    if dec:
        per_px = float(vae.memory_used_decode((1, z.shape[1], 1, 1), dtype))
    else:
        per_px = float(vae.memory_used_encode((1, 3, 1, 1), dtype))
    from .. import tiling

    cost = tiling.CostModel(64 * _MiB, per_px, "ComfyUI VAE estimate")
    h, w = (src.shape[2], src.shape[3]) if dec else (src.shape[1], src.shape[2])
    load_with_room([getattr(vae, "patcher", None)], int(cost.bytes_for(w, h, src.shape[0])), dev, stage,
                   force_full_load=getattr(vae, "disable_offload", False))

    def fn(t):
        with torch.no_grad():
            if dec:
                return vae.process_output(vae.first_stage_model.decode(t.to(dtype).to(dev)).float())
            out = vae.first_stage_model.encode(vae.process_input(t.movedim(-1, 1)).to(dtype).to(dev))
            return out.float().movedim(1, -1)

    min_tile = max(16, 2 * ov) if dec else max(8 * ratio, 2 * ov)
    out = _run_tiled(stage, fn, src, layout=layout, dev=dev, scale=scale, overlap=ov, align=align, cost=cost,
                     budget=_budget(dev, reserve_gb), min_tile=min_tile)
    if dec:
        return out.movedim(1, -1).contiguous()
    return {"samples": out.movedim(-1, 1).contiguous()}


def memory_guard(model: Any, mode: str) -> Any:
    """Memory Guard: a clone of `model` whose sampling runs as the 'unet' stage through a
    ModelPatcher OUTER_SAMPLE wrapper, checked (policy / forced / off) after the sampler
    returned — once per run, also when the automatic CFGGuider hook is on."""
    m = model.clone()
    pe = comfy("patcher_extension")
    if pe is None or not hasattr(m, "add_wrapper_with_key"):
        _warn_once("no-wrappers", "this ComfyUI has no ModelPatcher wrappers; Memory Guard does nothing")
        return m

    def outer_sample(executor, *args, **kwargs):
        return call_stage("unet", executor, args, kwargs, forced=(mode == "forced"), check=(mode != "off"))

    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "vramguard", outer_sample)
    return m


def timeline_image(width: int, height: int, reset: bool) -> Any:
    """Memory Timeline: the sampler's timeline with per-stage peaks as an IMAGE [1,H,W,3]."""
    import numpy as np
    import torch

    from .. import sampling
    from ..timeline_png import render_sampler

    s = sampling.sampler()
    img = render_sampler(s, width=width, height=height)
    if reset:
        s.reset()
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


# ----------------------------------------------------------------------------- batches (issue 16)
def _item_bytes(width: int, height: int, model: Any = None, vae: Any = None) -> tuple[int, str]:
    """Device bytes one item of width x height pixels costs, by the host's own estimates:
    the diffusion model's memory_required over its latent, plus the VAE's decode estimate;
    without either, the planner's default cost model.  Returns (bytes, what it came from)."""
    import torch

    from .. import tiling

    lw, lh = max(1, width // 8), max(1, height // 8)
    total, src = 0, []
    inner = getattr(model, "model", None)
    if inner is not None and callable(getattr(inner, "memory_required", None)):
        ch = int(getattr(getattr(inner, "latent_format", None), "latent_channels", 4) or 4)
        total += int(inner.memory_required([1, ch, lh, lw]))
        src.append("model")
    if vae is not None and callable(getattr(vae, "memory_used_decode", None)):
        ch = int(getattr(vae, "latent_channels", 4) or 4)
        total += int(vae.memory_used_decode((1, ch, lh, lw), getattr(vae, "vae_dtype", torch.float32)))
        src.append("vae")
    if not src:
        c = tiling.default_cost(4, 3, 8.0)
        return int(c.per_px * lw * lh), "default cost model"
    return total, "+".join(src) + " estimate"


def batch_size_auto(width: int, height: int, max_batch: int, reserve_gb: float = -1.0, model: Any = None,
                    vae: Any = None) -> tuple[int, str]:
    """Batch Size (auto): the largest batch of width x height images whose working set fits
    the budget of the compute device (at least 1: the batch guard catches the rest)."""
    from .. import batch

    each, src = _item_bytes(width, height, model, vae)
    budget = _budget(torch_device(), reserve_gb)
    n = batch.batch_size(per_item=each, budget=budget, max_batch=max_batch)
    info = f"batch {max(1, n)}: {each >> 20} MiB per {width}x{height} item ({src}), budget {budget >> 20} MiB"
    if n == 0:
        info += " (not even one fits: 1, and the guard halves tiles/chunks on OOM)"
    return max(1, n), info


def vae_decode_batched(vae: Any, samples: dict, reserve_gb: float = -1.0) -> Any:
    """VAE Decode (batch guard): ComfyUI's own decode over the batch in the largest chunk that
    fits, halved on out-of-memory, finished frames kept, as the vae_decode GC stage."""
    from .. import batch

    z = samples["samples"]
    est = getattr(vae, "memory_used_decode", None)
    each = int(est((1,) + tuple(z.shape[1:]), vae.vae_dtype)) if callable(est) else None
    dev = getattr(vae, "device", None) or torch_device()
    with gcguard.stage("vae_decode"):
        img = batch.guarded_batch(vae.decode, z, per_item=each, budget=_budget(dev, reserve_gb))
    return img.reshape(-1, *img.shape[-3:]) if img.ndim == 5 else img


def reserve_for_largest(width: int, height: int, batch_n: int, model: Any = None, vae: Any = None) -> int:
    """Reserve for Largest: torch's cache made to hold one block for the largest working set
    of the run (width x height x batch) before it starts.  Returns the MiB reserved."""
    from .. import batch

    each, _ = _item_bytes(width, height, model, vae)
    idx = device_index(torch_device())
    if idx is None:
        return 0
    return batch.prewarm(each * batch_n, device=idx) >> 20
