"""The ComfyUI node pack without ComfyUI: schemas, execution on ComfyUI-shaped data, the
settings route's validation, saved settings, the loader writer."""
import os

import pytest

torch = pytest.importorskip("torch", reason="the nodes exchange torch tensors")

import vramguard as vg  # noqa: E402
import vramguard_nodes  # noqa: E402
from vramguard_nodes import pack  # noqa: E402

GiB = 1 << 30


pytestmark = pytest.mark.usefixtures("fresh_stage_peaks")


# ------------------------------------------------------------------ schemas
def test_mappings_and_schemas():
    m, names = vramguard_nodes.NODE_CLASS_MAPPINGS, vramguard_nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert set(m) == set(names) and len(m) == 12  # 9 + the batch nodes (issue 16)
    assert set(names.values()) >= {"Memory Snapshot", "GC Checkpoint", "Unload Models", "Set Reserve",
                                   "Upscale Image (tiled, auto)", "VAE Decode (tiled, auto)",
                                   "VAE Encode (tiled, auto)", "Memory Guard", "Memory Timeline"}
    for key, cls in m.items():
        it = cls.INPUT_TYPES()
        assert set(it) <= {"required", "optional", "hidden"} and "required" in it, key
        for section in ("required", "optional"):
            for name, spec in it.get(section, {}).items():
                assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (key, name)
                assert spec[1].get("tooltip"), f"{key}.{name} has no tooltip"
                if spec[0] in ("INT", "FLOAT"):
                    assert spec[1]["min"] <= spec[1]["default"] <= spec[1]["max"], (key, name)
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY == "vramguard" and cls.DESCRIPTION
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)
    assert os.path.isfile(os.path.join(vramguard_nodes.WEB_DIRECTORY, "vramguard.js"))
    assert not (pack.ANY != "IMAGE") and not (pack.ANY != "LATENT")  # matches every socket type


# ------------------------------------------------------------------ execution with ComfyUI-shaped data
def test_memory_snapshot_node():
    vg.simulate("8GB", "3GB")
    vg.set_reserve("1GB")
    out = pack.MemorySnapshot().execute(0)
    text, free_mb, budget_mb, used, ledger_text = out["result"]
    assert ledger_text.startswith("ledger: not joined")  # issue 13: the shared-ledger output
    assert "Simulated GPU 0" in text and out["ui"]["text"] == [text]
    assert free_mb == 5 * 1024 and budget_mb == 4 * 1024 and abs(used - 37.5) < 1e-6


def test_gc_checkpoint_and_unload_pass_through():
    vg.simulate("8GB", "7GB")
    img = torch.rand(1, 8, 8, 3)
    (v,) = pack.GCCheckpoint().execute(img, "forced", "vae_decode")
    assert v is img and vg.gc_stats()["vae_decode"]["collections"] >= 1
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    assert pack.UnloadModels().execute(lat)[0] is lat


def test_set_reserve_node():
    vg.simulate("8GB", "2GB")
    p, budget = pack.SetReserve().execute(1.5, 0.0, -1, passthrough="x")
    assert p == "x" and vg.limits()["reserve"] == int(1.5 * GiB) and budget == int(4.5 * 1024)
    _, budget = pack.SetReserve().execute(0.0, 3.0, 0)
    assert budget == 1024  # cap 3 GiB - 2 GiB held


class FakeUpscaleModel:
    """Shaped like spandrel's ImageModelDescriptor: .scale, .model, __call__(NCHW) -> NCHW."""

    def __init__(self, scale=2):
        torch.manual_seed(0)
        self.scale = scale
        self.model = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.patcher = None
        self.calls = 0

    def to(self, dev):
        self.model.to(dev)
        return self

    def __call__(self, x):
        self.calls += 1
        y = self.model(x)
        return torch.nn.functional.interpolate(y, scale_factor=self.scale, mode="nearest")


def test_upscale_node_matches_untiled_and_keeps_alpha():
    model = FakeUpscaleModel(2)
    img = torch.rand(2, 70, 90, 3)
    (out,) = pack.UpscaleImageTiled().execute(model, img, overlap=8, reserve_gb=-1.0, max_tile=64)
    assert out.shape == (2, 140, 180, 3) and out.dtype == torch.float32
    with torch.no_grad():
        ref = torch.clamp(model(img.movedim(-1, 1)).movedim(1, -1), 0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert model.calls > 2  # it really tiled (max_tile 64)
    rgba = torch.rand(1, 32, 32, 4)
    (out4,) = pack.UpscaleImageTiled().execute(FakeUpscaleModel(2), rgba, overlap=8)
    assert out4.shape == (1, 64, 64, 4)


class FakeVAE:
    """Shaped like comfy.sd.VAE for a 2-D latent VAE with downscale 8."""

    def __init__(self):
        torch.manual_seed(1)
        self.upscale_ratio = self.downscale_ratio = 8
        self.latent_dim = 2
        self.extra_1d_channel = None
        self.device, self.vae_dtype = torch.device("cpu"), torch.float32
        self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * 4
        self.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * 4
        self.patcher = None
        dec, enc = torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Conv2d(3, 4, 1)

        class FSM:
            def decode(_, z):
                return torch.nn.functional.interpolate(dec(z), scale_factor=8, mode="nearest")

            def encode(_, x):
                return enc(torch.nn.functional.avg_pool2d(x, 8))

        self.first_stage_model = FSM()
        self.process_output = lambda im: torch.clamp((im + 1.0) / 2.0, 0.0, 1.0)
        self.process_input = lambda im: im * 2.0 - 1.0

    def vae_encode_crop_pixels(self, px):
        h, w = px.shape[1] // 8 * 8, px.shape[2] // 8 * 8
        return px[:, :h, :w]


def test_vae_decode_node_matches_untiled():
    vae = FakeVAE()
    z = torch.randn(1, 4, 24, 20)
    (img,) = pack.VAEDecodeTiled().execute({"samples": z}, vae, overlap=4, reserve_gb=-1)
    assert img.shape == (1, 192, 160, 3)
    with torch.no_grad():
        ref = vae.process_output(vae.first_stage_model.decode(z)).movedim(1, -1)
    torch.testing.assert_close(img, ref, atol=1e-5, rtol=0)


def test_vae_encode_node_matches_untiled():
    vae = FakeVAE()
    px = torch.rand(2, 100, 130, 3)          # cropped to 96 x 128 like ComfyUI
    (lat,) = pack.VAEEncodeTiled().execute(px, vae, overlap=16, reserve_gb=-1)
    assert lat["samples"].shape == (2, 4, 12, 16)
    with torch.no_grad():
        ref = vae.first_stage_model.encode(vae.process_input(px[:, :96, :128].movedim(-1, 1)))
    torch.testing.assert_close(lat["samples"], ref, atol=1e-5, rtol=0)


def test_memory_guard_without_comfyui_returns_a_clone():
    class M:
        def clone(self):
            return M()

    m = M()
    (out,) = pack.MemoryGuard().execute(m, "policy")
    assert isinstance(out, M) and out is not m


def test_memory_timeline_node():
    vg.simulate("8GB", "1GB")
    vg.reset_sampler()
    with vg.stage("vae_decode", gc=False):
        vg.update_simulated(0, used="5GB")
    (img,) = pack.MemoryTimeline().execute(400, 200, True)
    assert img.shape == (1, 200, 400, 3) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 1 and float(img.std()) > 0.01
    assert vg.stages() == []  # reset=True cleared it
    with pytest.raises(ValueError):
        pack.MemoryTimeline().execute(10, 10)


def test_low_vram_mode_makes_room_before_tiling(monkeypatch):
    vg.simulate("8GB", "2GB")
    vg.set_reserve("1GB")
    asked = []
    monkeypatch.setattr(pack.host, "unload_models", lambda dev, n: asked.append((n, dev)))
    monkeypatch.setattr(pack.host, "device_index", lambda dev: 0)
    img = torch.rand(1, 40, 40, 3)
    vg.configure_gc(low_vram=False)
    pack.UpscaleImageTiled().execute(FakeUpscaleModel(2), img, overlap=8)
    assert asked == []
    vg.configure_gc(low_vram=True)
    try:
        pack.UpscaleImageTiled().execute(FakeUpscaleModel(2), img, overlap=8)
    finally:
        vg.configure_gc(low_vram=False)
    assert len(asked) == 1 and asked[0][0] > GiB  # planned peak + the 1 GiB reserve


# ------------------------------------------------------------------ a CPU device plans against host RAM
def test_cpu_device_plans_against_host_ram_not_gpu0():
    """ComfyUI --cpu on a GPU machine: the VAE and the upscale model run on the CPU, so the
    plan must use host RAM's budget, not GPU 0's (here a full card with budget 0)."""
    vg.simulate("8GB", "8GB")
    assert vg.snapshot(0).budget == 0
    vae = FakeVAE()  # device cpu
    z = torch.randn(1, 4, 24, 20)
    (img,) = pack.VAEDecodeTiled().execute({"samples": z}, vae, overlap=4, reserve_gb=-1)
    assert img.shape == (1, 192, 160, 3)
    (lat,) = pack.VAEEncodeTiled().execute(torch.rand(1, 64, 64, 3), vae, overlap=16, reserve_gb=-1)
    assert lat["samples"].shape == (1, 4, 8, 8)
    (out,) = pack.UpscaleImageTiled().execute(FakeUpscaleModel(2), torch.rand(1, 40, 40, 3), overlap=8)
    assert out.shape == (1, 80, 80, 3)


def test_budget_for_a_device_is_that_snapshots():
    from vramguard.adapters import comfyui

    vg.simulate("8GB", "2GB")
    assert comfyui._budget(torch.device("cuda", 0), -1) == vg.snapshot(0).budget == 6 * GiB
    assert comfyui._budget(torch.device("cuda", 0), 2.5) == int(3.5 * GiB)  # 6 free - a 2.5 GB reserve floor
    assert comfyui._budget(torch.device("cpu"), -1) == vg.snapshot(None).budget


# ------------------------------------------------------------------ ComfyUI's cache
def _comfy_queue(graph, classes, cache, runs):
    """ComfyUI's output cache in miniature (comfy_execution/caching.py, 0.30.0): a node's key is
    [class_type, is_changed, inputs with links replaced by the ancestors' keys]; is_changed is
    False without IS_CHANGED, else the list of IS_CHANGED results.  Executes in graph order and
    serves a node from `cache` when its key is there."""
    keys, outs = {}, {}
    for nid, (ctype, inputs) in graph.items():
        cls = classes[ctype]
        vals = {k: (outs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in inputs.items()}
        changed = [cls.IS_CHANGED(**vals)] if hasattr(cls, "IS_CHANGED") else False
        sig = (ctype, repr(changed) if changed is False else tuple(changed),
               tuple(sorted((k, keys[v[0]] + (v[1],) if isinstance(v, list) else ("const", v))
                            for k, v in inputs.items())))
        keys[nid] = sig
        if sig in cache:
            outs[nid] = cache[sig]
            continue
        runs[ctype] = runs.get(ctype, 0) + 1
        outs[nid] = cache[sig] = getattr(cls(), cls.FUNCTION)(**vals)
    return outs


class _Source:
    FUNCTION = "execute"

    def execute(self, n):
        return (torch.full((1, 4, 4, 3), float(n)),)


class _Downstream:
    FUNCTION = "execute"

    def execute(self, value):
        return (value * 2,)


@pytest.mark.parametrize("node,extra", [("VramguardGCCheckpoint", {"mode": "forced", "stage": "vae_decode"}),
                                        ("VramguardUnloadModels", {})])
def test_identical_second_queue_reruns_nothing_downstream(node, extra):
    vg.simulate("8GB", "7GB")
    classes = {"Source": _Source, "Down": _Downstream, **vramguard_nodes.NODE_CLASS_MAPPINGS}
    graph = {"1": ("Source", {"n": 3}), "2": (node, {"value": ["1", 0], **extra}), "3": ("Down", {"value": ["2", 0]})}
    cache, runs = {}, {}
    first = _comfy_queue(graph, classes, cache, runs)
    second = _comfy_queue(graph, classes, cache, runs)
    assert runs == {"Source": 1, node: 1, "Down": 1}, runs
    assert second["3"][0] is first["3"][0]
    graph["1"] = ("Source", {"n": 4})  # the upstream changed: the passthrough acts again
    _comfy_queue(graph, classes, cache, runs)
    assert runs == {"Source": 2, node: 2, "Down": 2}, runs


def test_live_nodes_stay_uncached():
    for key in ("VramguardMemorySnapshot", "VramguardMemoryTimeline"):
        cls = vramguard_nodes.NODE_CLASS_MAPPINGS[key]
        a, b = cls.IS_CHANGED(), cls.IS_CHANGED()
        assert a != b, key


# ------------------------------------------------------------------ Set Reserve: for the rest of the prompt
def test_set_reserve_lasts_until_the_prompt_ends():
    from vramguard.adapters import comfyui

    vg.simulate("8GB", "2GB")
    vg.set_reserve("1GB")                                  # what the settings say
    _, budget = pack.SetReserve().execute(6.0, 0.0, -1)
    eff = vg.effective_reserve()
    assert budget == 0 and eff["reserve"] == 6 * GiB and eff["override"] == 6 * GiB
    assert eff["configured_before_override"] == GiB
    comfyui.prompt_finished("p1")                          # what the prompt hook runs at the end
    eff = vg.effective_reserve()
    assert eff["reserve"] == GiB and eff["override"] is None and vg.snapshot(0).budget == 5 * GiB
    # a settings change during the prompt is kept, not overwritten by the restore
    pack.SetReserve().execute(6.0, 0.0, -1)
    vg.set_reserve("2GB")
    comfyui.prompt_finished("p2")
    assert vg.limits()["reserve"] == 2 * GiB and vg.effective_reserve()["override"] is None


def test_prompt_hook_ends_the_override(monkeypatch):
    import asyncio
    import sys
    import types

    from vramguard.adapters import comfyui

    vg.simulate("8GB", "2GB")
    vg.set_reserve("1GB")

    class PromptExecutor:
        async def execute_async(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
            pack.SetReserve().execute(float(prompt["reserve"]), 0.0, -1)
            self.seen = vg.limits()["reserve"]

        def execute(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
            asyncio.run(self.execute_async(prompt, prompt_id, extra_data, execute_outputs))

    monkeypatch.setitem(sys.modules, "execution", types.SimpleNamespace(PromptExecutor=PromptExecutor))
    assert comfyui.install_prompt_hooks()
    try:
        ex = PromptExecutor()
        ex.execute({"reserve": 5}, "p1")
        assert ex.seen == 5 * GiB and vg.limits()["reserve"] == GiB
    finally:
        comfyui.uninstall_prompt_hooks()
    assert "__vramguard_prompt__" not in PromptExecutor.__dict__


# ------------------------------------------------------------------ >= 0.30: upscale models carry a patcher
def test_upscale_model_with_patcher_is_loaded_by_comfyui_not_moved(monkeypatch):
    import sys
    import types

    loads = []
    mm = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"),
        load_models_gpu=lambda models, memory_required=0, force_full_load=False: loads.append(
            (models, memory_required, force_full_load)),
        throw_exception_if_processing_interrupted=lambda: None,
        intermediate_dtype=lambda: torch.float32)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)

    class Patched(FakeUpscaleModel):
        def to(self, dev):
            raise AssertionError("core no longer moves upscale models with .to(); load_models_gpu does")

    model = Patched(2)
    model.patcher = types.SimpleNamespace(load_device=torch.device("cpu"))
    (out,) = pack.UpscaleImageTiled().execute(model, torch.rand(1, 24, 24, 3), overlap=8)
    assert out.shape == (1, 48, 48, 3)
    assert len(loads) == 1 and loads[0][0] == [model.patcher] and loads[0][2] is True


def test_set_reserve_without_a_gpu_is_what_cpu_nodes_plan_with():
    """No GPU: Set Reserve's value is the floor the tiled nodes use on host RAM, and
    effective_reserve() says so."""
    from vramguard.adapters import comfyui

    assert vg.device_count() == 0 or pytest.skip("a GPU is visible")
    h = vg.snapshot(None)
    big = max(0.0, round((h.free + h.evictable) / GiB + 1.0, 1))  # more than host RAM can give
    if big > 256:
        pytest.skip("more host RAM than Set Reserve's range")
    pack.SetReserve().execute(big, 0.0, -1)
    eff = vg.effective_reserve()
    assert eff["device"] is None and eff["override"] == int(big * GiB) and eff["reserve"] >= int(big * GiB)
    assert comfyui._budget(torch.device("cpu"), -1) == 0
    comfyui.prompt_finished("p")
    assert vg.effective_reserve()["override"] is None and comfyui._budget(torch.device("cpu"), -1) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x", None])
def test_gb_inputs_fail_at_once_naming_the_input(bad):
    """A NaN reserve_gb used to pass and fail deep inside (int(nan)); now the node fails before
    any work with the input's name."""
    from vramguard.adapters import comfyui

    with pytest.raises((ValueError, TypeError), match="reserve_gb"):
        comfyui.set_reserve_for_prompt(bad, 0.0)
    with pytest.raises((ValueError, TypeError), match="reserve_gb"):
        comfyui._budget(None, bad)
    with pytest.raises((ValueError, TypeError), match="cap_gb"):
        comfyui.set_reserve_for_prompt(1.0, bad)


def test_tiled_stages_make_room_first_through_comfyui(monkeypatch):
    """Before tiling, the stage's model is loaded through ComfyUI asking for the untiled working
    set (capped at the card minus the reserve), so ComfyUI unloads idle models first; what was
    freed is logged."""
    import sys
    import types

    from vramguard.adapters import comfyui

    vg.simulate(8 * GiB, used=6 * GiB)
    try:
        vg.set_reserve(GiB, device=0)
        asked = []

        def load_models_gpu(models, memory_required=0, force_full_load=False):
            asked.append(memory_required)
            vg.update_simulated(0, used=1 * GiB)  # ComfyUI unloaded an idle model

        mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cuda", 0), load_models_gpu=load_models_gpu)
        monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
        dev = torch.device("cuda", 0)
        comfyui.load_with_room([object()], 3 * GiB, dev, "upscale")
        assert asked == [3 * GiB]
        comfyui.load_with_room([object()], 100 * GiB, dev, "upscale")  # more than the card holds
        assert asked[-1] == 8 * GiB - GiB
        assert vg.snapshot(0).budget == 6 * GiB
    finally:
        vg.simulate_clear()
        vg.clear_limits()
