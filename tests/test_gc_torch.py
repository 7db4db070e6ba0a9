"""GC hooks around real torch code (the CPU build): called once, after the stage, removable."""
import logging

import pytest

import vramguard as vg
from vramguard.hooks import HookSet

torch = pytest.importorskip("torch", reason="torch (CPU build) not installed")

class TinyVAE:
    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.events = []

    def decode(self, z):
        self.events.append("decode")
        with torch.no_grad():
            return self.conv(z)

    def decode_tiled(self, z):
        self.events.append("decode_tiled")
        return self.decode(z)  # nested: one stage, one check

    @classmethod
    def build(cls):
        return cls()


def test_hooks_around_real_torch_functions(g):
    vae = TinyVAE()
    g.release_cache = lambda: vae.events.append("gc")
    hs = HookSet("test")
    assert hs.wrap(TinyVAE, "decode", "vae_decode")
    assert hs.wrap(TinyVAE, "decode_tiled", "vae_decode")
    assert hs.wrap(torch.nn.functional, "interpolate", "upscale")
    assert hs.wrap(TinyVAE, "decode", "vae_decode")  # idempotent: no double wrap
    z = torch.randn(1, 4, 8, 8)
    out = vae.decode(z)
    assert out.shape == (1, 3, 8, 8)
    assert vae.events == ["decode", "gc"]  # the check ran once, after the stage
    vae.events.clear()
    vae.decode_tiled(z)
    assert vae.events == ["decode_tiled", "decode", "gc"]
    up = torch.nn.functional.interpolate(out, scale_factor=2)
    assert up.shape == (1, 3, 16, 16)
    assert vg.gc_stats()["upscale"]["checks"] == 1
    assert vg.gc_stats()["vae_decode"]["checks"] == 2
    hs.uninstall()
    vae.events.clear()
    vae.decode(z)
    torch.nn.functional.interpolate(out, scale_factor=2)
    assert vae.events == ["decode"]
    assert vg.gc_stats()["vae_decode"]["checks"] == 2 and vg.gc_stats()["upscale"]["checks"] == 1
    assert not hasattr(torch.nn.functional.interpolate, "__vramguard_stage__")


def test_hook_on_classmethod_and_missing_seam(g, caplog):
    caplog.set_level(logging.WARNING, logger="vramguard")
    hs = HookSet("test")
    assert hs.wrap(TinyVAE, "build", "vae_encode")
    assert isinstance(TinyVAE.build(), TinyVAE)
    assert vg.gc_stats()["vae_encode"]["checks"] == 1
    assert not hs.wrap(TinyVAE, "no_such_method", "vae_encode")
    assert not hs.wrap(TinyVAE, "no_such_method", "vae_encode")
    assert sum("no_such_method" in r.getMessage() for r in caplog.records) == 1
    hs.uninstall()
    assert isinstance(TinyVAE.__dict__["build"], classmethod)
    assert not hasattr(TinyVAE.__dict__["build"].__func__, "__vramguard_stage__")


def test_hooked_stage_exception_propagates_without_gc(g):
    class Boom:
        def encode(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    hs = HookSet("test")
    hs.wrap(Boom, "encode", "vae_encode")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Boom().encode(1)
    assert "vae_encode" not in vg.gc_stats()
    assert g.calls == []
    hs.uninstall()


def test_after_stage_decorator_with_torch(g):
    @vg.after_stage("text_encode")
    def encode(tokens):
        return torch.nn.functional.embedding(tokens, torch.eye(10))

    assert vg.after_stage("text_encode")(encode) is encode  # no double wrapping
    out = encode(torch.tensor([1, 2, 3]))
    assert out.shape == (3, 10)
    assert vg.gc_stats()["text_encode"]["collections"] == 1
    assert any(s["name"] == "text_encode" and s["end"] is not None for s in vg.stages())
