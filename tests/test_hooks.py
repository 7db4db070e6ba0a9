"""Stage hooks and the ComfyUI adapter's seams on ComfyUI-shaped fakes (no ComfyUI, no torch):
async seams, nesting, one check per sampling run, nothing collected inside a sampling run,
nested collections skipped, node classes through NODE_CLASS_MAPPINGS, the LoRA-unload
predicate, Dynamic VRAM's figures and headroom, "saved" never negative."""
import asyncio
import inspect
import logging
import sys
import types

import pytest

import vramguard as vg
from vramguard import gcguard
from vramguard.hooks import HookSet, call_stage

GiB = 1 << 30


pytestmark = pytest.mark.usefixtures("fresh_stage_peaks")


# ------------------------------------------------------------------ generic hooks
def test_async_seam_is_checked_after_the_coroutine_completes(g):
    events = []
    g.release_cache = lambda: events.append("gc")

    class Node:
        async def run(self, x):
            events.append("started")
            await asyncio.sleep(0)
            events.append("done")
            return x + 1

    hs = HookSet("test")
    assert hs.wrap(Node, "run", "upscale")
    try:
        assert inspect.iscoroutinefunction(Node.run)  # ComfyUI picks its async path by this
        coro = Node().run(1)
        assert events == []  # creating the coroutine runs nothing, checks nothing
        assert asyncio.run(coro) == 2
        assert events == ["started", "done", "gc"]
        assert vg.gc_stats()["upscale"]["checks"] == 1
    finally:
        hs.uninstall()


def test_async_seam_exception_is_not_checked(g):
    class Node:
        async def run(self):
            raise KeyError("boom")

    hs = HookSet("test")
    hs.wrap(Node, "run", "upscale")
    try:
        with pytest.raises(KeyError):
            asyncio.run(Node().run())
        assert "upscale" not in vg.gc_stats()
    finally:
        hs.uninstall()


def test_nested_collection_is_skipped(g):
    """Low-VRAM unload -> a hooked unpatch_model -> its check must not collect again."""
    calls = []

    class Patcher:
        def unpatch_model(self):
            calls.append("unpatch")

    hs = HookSet("test")
    hs.wrap(Patcher, "unpatch_model", "lora_unload")

    def release():
        calls.append("release")
        Patcher().unpatch_model()  # what ComfyUI's free_memory does to loaded models

    g.release_cache = release
    try:
        d = vg.gc_check("vae_decode", forced=True)
    finally:
        hs.uninstall()
    assert d.collect and calls == ["release", "unpatch"]
    st = vg.gc_stats()
    assert st["vae_decode"]["collections"] == 1
    assert st["lora_unload"]["collections"] == 0
    assert any(r.startswith("nested") for r in st["lora_unload"]["skipped"]), st["lora_unload"]


def test_no_collection_inside_a_sampling_run(g):
    """The Comfy Compiler replays an allocation plan while sampling: nothing of ours may
    collect (or allocate) until the sampler returned; then the unet check runs once."""
    events = []
    g.release_cache = lambda: events.append("gc")

    def sampler():
        assert vg.in_sampling()
        d = vg.gc_check("vae_decode", forced=True)  # e.g. a hooked stage inside sampling
        events.append(("inner", d.collect, d.reason))
        return "latent"

    assert call_stage("unet", sampler, forced=True) == "latent"
    assert not vg.in_sampling()
    assert events == [("inner", False, "deferred: inside a sampling run"), "gc"]
    assert vg.gc_stats()["unet"]["collections"] == 1


def test_saved_is_never_negative(g):
    """Use grew while we collected (other work): saved 0, the growth reported apart."""
    def release():
        vg.update_simulated(0, used="7GB")

    g.release_cache = release
    d = vg.gc_check("vae_decode", forced=True)
    assert d.collect and d.saved == 0
    assert d.record["gc"]["saved"] == 0 and d.record["gc"]["grew"] == 1.0
    assert vg.gc_stats()["vae_decode"]["saved"] == 0
    line = gcguard.format_log_line(d.record)
    assert "'saved': 0" in line and "-" not in line.split("gc=")[1].split("}")[0]


# ------------------------------------------------------------------ a ComfyUI-shaped host
def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


@pytest.fixture
def fake_comfy(monkeypatch, g):
    """ComfyUI 0.30.0's shapes for every seam (signatures copied from its source)."""
    log = []

    class CFGGuider:
        def __init__(self, model):
            self.model = model

        def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None, latent_shapes=None):
            log.append("outer_sample")
            return "samples"

        def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                   disable_pbar=False, seed=None):
            return self.outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                     disable_pbar, seed)

    class Guider_Basic(CFGGuider):  # comfy_extras/nodes_custom_sampler.py
        pass

    class Guider_DualModel(CFGGuider):  # overrides outer_sample, not sample
        def outer_sample(self, *a, **kw):
            log.append("dual_outer")
            return "samples"

    def samplers_sample(model, noise, positive, negative, cfg, device, sampler, sigmas, **kw):
        return CFGGuider(model).sample(noise, kw.get("latent_image"), sampler, sigmas)

    samplers = _module("comfy.samplers", CFGGuider=CFGGuider, sample=samplers_sample)

    def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, **kw):
        return samplers.sample(model, noise, positive, negative, cfg, "cpu", sampler_name, [1], latent_image=latent_image)

    def sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, **kw):
        return samplers.sample(model, noise, positive, negative, cfg, "cpu", sampler, sigmas, latent_image=latent_image)

    class ModelPatcher:
        def __init__(self, patches=None):
            self.patches = patches or {}

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            log.append(("unpatch", unpatch_weights))

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            self.unpatch_model(None, unpatch_weights=False)

    class ModelPatcherDynamic(ModelPatcher):
        def unpatch_model(self, device_to=None, unpatch_weights=True):
            super().unpatch_model(device_to=None, unpatch_weights=False)

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            self.unpatch_model(None, unpatch_weights=False)

    class ImageUpscaleWithModel:  # V3 shape: classmethod execute, upscale an alias
        @classmethod
        def execute(cls, upscale_model, image):
            log.append("upscale")
            return image

        upscale = execute

    class SecondCopy(ImageUpscaleWithModel):  # what import_module("comfy_extras....") would give
        @classmethod
        def execute(cls, upscale_model, image):
            return image

        upscale = execute

    class CLIP:
        def encode_from_tokens(self, tokens):
            return tokens

        def encode_from_tokens_scheduled(self, tokens):
            return self.encode_from_tokens(tokens)

    class VAE:
        def decode(self, z):
            return z

        def decode_tiled(self, z):
            return z

        def encode(self, x):
            return x

        def encode_tiled(self, x):
            return x

    mods = {
        "comfy": _module("comfy"),
        "comfy.samplers": samplers,
        "comfy.sample": _module("comfy.sample", sample=sample, sample_custom=sample_custom),
        "comfy.model_patcher": _module("comfy.model_patcher", ModelPatcher=ModelPatcher,
                                       ModelPatcherDynamic=ModelPatcherDynamic, CoreModelPatcher=ModelPatcher),
        "comfy.sd": _module("comfy.sd", CLIP=CLIP, VAE=VAE, load_lora_for_models=lambda *a: a),
        "comfy.controlnet": _module("comfy.controlnet", load_controlnet=lambda *a: a),
        "comfy_extras": _module("comfy_extras"),
        "comfy_extras.nodes_upscale_model": _module("comfy_extras.nodes_upscale_model",
                                                    ImageUpscaleWithModel=SecondCopy),
        "nodes": _module("nodes", NODE_CLASS_MAPPINGS={"ImageUpscaleWithModel": ImageUpscaleWithModel}),
        "execution": _module("execution"),
    }
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    from vramguard.adapters import comfyui

    comfyui.install_hooks()
    ns = types.SimpleNamespace(log=log, guard=g, comfyui=comfyui, Guider_Basic=Guider_Basic,
                               Guider_DualModel=Guider_DualModel, CFGGuider=CFGGuider, ModelPatcher=ModelPatcher,
                               ModelPatcherDynamic=ModelPatcherDynamic, Upscale=ImageUpscaleWithModel,
                               SecondCopy=SecondCopy, **{k.replace(".", "_"): v for k, v in mods.items()})
    yield ns
    comfyui.uninstall_hooks()
    comfyui.uninstall_prompt_hooks()


def _checks(stage):
    return vg.gc_stats().get(stage, {}).get("checks", 0)


def test_every_sampler_is_one_unet_check(fake_comfy):
    fc = fake_comfy
    # SamplerCustomAdvanced: guider.sample, no comfy.sample.* on the way
    assert fc.Guider_Basic("m").sample("noise", "latent", "euler", [1]) == "samples"
    assert _checks("unet") == 1
    fc.Guider_DualModel("m").sample("noise", "latent", "euler", [1])
    assert _checks("unet") == 2 and "dual_outer" in fc.log
    # KSampler: comfy.sample.sample -> comfy.samplers.sample -> CFGGuider.sample -> outer_sample
    fc.comfy_sample.sample("m", "noise", 20, 7.0, "euler", "normal", "+", "-", "latent")
    assert _checks("unet") == 3
    fc.comfy_sample.sample_custom("m", "noise", 7.0, "euler", [1], "+", "-", "latent")
    assert _checks("unet") == 4
    assert not vg.in_sampling()


def test_upscale_seam_is_the_class_comfyui_runs(fake_comfy):
    fc = fake_comfy
    fc.Upscale.execute("model", "image")
    assert _checks("upscale") == 1 and fc.log.count("upscale") == 1
    fc.Upscale.upscale("model", "image")
    assert _checks("upscale") == 2
    fc.SecondCopy.execute("model", "image")  # the copy ComfyUI never runs is left alone
    assert _checks("upscale") == 2
    installed = dict(fc.comfyui.hook_report()["installed"])
    assert installed.get("ImageUpscaleWithModel.execute") == "upscale"
    assert not fc.comfyui.hook_report()["missing"]


def test_unpatch_without_weights_is_not_a_lora_unload(fake_comfy):
    fc = fake_comfy
    p = fc.ModelPatcher({"lora": 1})
    p.partially_load("cuda")                            # Dynamic VRAM's every load: unpatch_weights=False
    p.unpatch_model("cpu", unpatch_weights=False)
    assert _checks("lora_unload") == 0
    fc.ModelPatcher().unpatch_model("cpu")              # no patches: an offload
    assert _checks("lora_unload") == 0
    p.unpatch_model("cpu")                              # weights unpatched, patches exist
    assert _checks("lora_unload") == 1
    d = fc.ModelPatcherDynamic({"lora": 1})
    d.partially_load("cuda")
    assert _checks("lora_unload") == 1
    d.unpatch_model("cpu", unpatch_weights=True)        # its super() call passes False: still one unload
    assert _checks("lora_unload") == 2


def test_lora_unload_inside_sampling_does_not_collect(fake_comfy):
    fc = fake_comfy
    events = []
    fc.guard.release_cache = lambda: events.append("gc")
    patcher = fc.ModelPatcher({"lora": 1})

    def outer(self, *a, **kw):  # prepare_sampling loads models, which may unload another
        patcher.unpatch_model("cpu")
        events.append("sampled")
        return "samples"

    orig = fc.CFGGuider.__dict__["outer_sample"]
    fc.CFGGuider.outer_sample = lambda self, *a, **kw: outer(self)
    try:
        fc.Guider_Basic("m").sample("noise", "latent", "euler", [1])
    finally:
        fc.CFGGuider.outer_sample = orig
    assert events == ["sampled", "gc"]  # the only collection: the unet check, after the sampler returned
    st = vg.gc_stats()
    assert st["lora_unload"]["collections"] == 0
    assert st["lora_unload"]["skipped"] == {"deferred: inside a sampling run": 1}
    assert st["unet"]["checks"] == 1


def test_memory_guard_inside_the_hooked_sampler_checks_once(fake_comfy):
    fc = fake_comfy
    from vramguard.adapters import comfyui

    calls = []
    outer_sample = None

    class Model:
        def clone(self):
            return self

        def add_wrapper_with_key(self, kind, key, fn):
            nonlocal outer_sample
            outer_sample = fn

    sys.modules["comfy"].patcher_extension = _module("comfy.patcher_extension",
                                                     WrappersMP=types.SimpleNamespace(OUTER_SAMPLE="outer_sample"))
    sys.modules["comfy.patcher_extension"] = sys.modules["comfy"].patcher_extension
    try:
        comfyui.memory_guard(Model(), "forced")
        vg.update_simulated(0, used="1GB")  # below the threshold: only "forced" collects
        fc.guard.release_cache = lambda: calls.append("gc")
        # CFGGuider.sample (hooked) -> outer_sample -> the OUTER_SAMPLE wrapper -> the executor
        fc.CFGGuider.outer_sample = lambda self, *a, **kw: outer_sample(lambda *x, **y: "samples", *a, **kw)
        fc.Guider_Basic("m").sample("noise", "latent", "euler", [1])
    finally:
        del sys.modules["comfy.patcher_extension"]
    assert _checks("unet") == 1 and calls == ["gc"]  # forced by the guard, done once, after sampling


# ------------------------------------------------------------------ Dynamic VRAM (comfy-aimdo)
@pytest.fixture
def aimdo(monkeypatch):
    sent = []
    control = _module("comfy_aimdo.control", get_total_vram_usage=lambda: 3 * GiB,
                      set_simple_vram_headroom=lambda n: sent.append(n))
    vbar = _module("comfy_aimdo.model_vbar", vbars_analyze=lambda dev: 2 * GiB)
    monkeypatch.setitem(sys.modules, "comfy_aimdo", _module("comfy_aimdo", control=control, model_vbar=vbar))
    monkeypatch.setitem(sys.modules, "comfy_aimdo.control", control)
    monkeypatch.setitem(sys.modules, "comfy_aimdo.model_vbar", vbar)
    monkeypatch.setitem(sys.modules, "comfy.memory_management",
                        _module("comfy.memory_management", aimdo_enabled=True))
    monkeypatch.setitem(sys.modules, "comfy.model_management", _module("comfy.model_management"))
    from vramguard.adapters import comfyui

    monkeypatch.setattr(comfyui, "_headroom_sent", [None])
    return types.SimpleNamespace(sent=sent, control=control, comfyui=comfyui)


def test_aimdo_figures_and_headroom(aimdo):
    c = aimdo.comfyui
    assert c.aimdo_figures(0) == {"evictable": 2 * GiB, "usage": 3 * GiB}
    vg.simulate("8GB", "1GB")
    vg.set_reserve("1.5GB")
    assert c.sync_aimdo_headroom() == int(1.5 * GiB)
    assert c.sync_aimdo_headroom() is None            # unchanged: not sent again
    from vramguard_nodes import pack

    pack.SetReserve().execute(4.0, 0.0, -1)            # the prompt's reserve reaches Dynamic VRAM
    c.prompt_finished("p")                             # and the settings' one comes back
    assert aimdo.sent == [int(1.5 * GiB), 4 * GiB, int(1.5 * GiB)]


def test_aimdo_failures_are_ignored_and_logged_once(aimdo, caplog):
    caplog.set_level(logging.WARNING, logger="vramguard")
    c = aimdo.comfyui
    c._warned.discard("aimdo-headroom")

    def boom(n):
        raise RuntimeError("no device")

    aimdo.control.set_simple_vram_headroom = boom
    vg.simulate("8GB", "1GB")
    for r in ("1GB", "2GB"):
        vg.set_reserve(r)
        assert c.sync_aimdo_headroom() is None
    assert sum("comfy_aimdo" in r.getMessage() for r in caplog.records) == 1


def test_without_dynamic_vram_nothing_is_read(monkeypatch):
    from vramguard.adapters import comfyui

    monkeypatch.setitem(sys.modules, "comfy.memory_management",
                        _module("comfy.memory_management", aimdo_enabled=False))
    assert comfyui.aimdo_figures(0) is None and comfyui.sync_aimdo_headroom() is None


def test_calibration_does_not_measure_inside_a_sampling_run(g, monkeypatch):
    class CudaLike:
        shape = (1, 64, 64, 3)
        dtype = type("D", (), {"itemsize": 4})()
        device = type("Dev", (), {"type": "cuda"})()

        def element_size(self):
            return 4

    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or types.ModuleType("torch"))

    def fn(x):
        raise AssertionError("nothing may run on the device inside a sampling run")

    c = call_stage("unet", lambda: vg.calibrate(fn, CudaLike(), key="k"), check=False)
    assert c.source.startswith("default (not measured inside a sampling run")
    assert vg.cost_model("k") is None
