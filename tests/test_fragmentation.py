"""Fragmentation (issue 16): the changing-size sequence that runs out of memory on the
caching-allocator model although every size alone fits, and does not after prewarm; the
snapshot's fragmentation fields; the GC policy's "fragmentation" reason; the torch probe's
figures; and the same sequence against torch's real allocator where a GPU is present."""
import pytest

import vramguard as vg
from vramguard import _native
from vramguard.adapters import torch_adapter

MiB = 1 << 20
# 1024x1024, 1024x1152, 1360x1536 scaled down 4x; per pixel: two activations of 32 and 96
# bytes (freed after the item) and an 8-byte result kept on the device for the whole run
SIZES = [(256, 256), (256, 288), (340, 384)]
TEMP, TEMP2, OUT = 32, 96, 8
CAP = 23 * MiB


def run_item(a, w, h, kept):
    t = a.malloc(TEMP * w * h)
    u = a.malloc(TEMP2 * w * h)
    a.free(t)
    kept.append(a.malloc(OUT * w * h))
    a.free(u)


def run_sequence(a, sizes):
    kept = []
    for w, h in sizes:
        run_item(a, w, h, kept)
    return kept


def run_cost():
    """The run's working set as a cost model: the kept results are fixed, the activations per pixel."""
    return vg.CostModel(float(sum(OUT * w * h for w, h in SIZES)), float(TEMP + TEMP2), "test")


@pytest.mark.parametrize("size", SIZES)
def test_each_size_alone_fits(size):
    a = _native.AllocSim(CAP)
    run_sequence(a, [size])
    assert a.stats()["oom_count"] == 0


def test_changing_sizes_oom_without_prewarm():
    a = _native.AllocSim(CAP)
    with pytest.raises(MemoryError, match="out of memory") as ei:
        run_sequence(a, SIZES)
    s = a.stats()
    request = int(str(ei.value).split("allocate ")[1].split(" ")[0])
    # the cause is fragmentation, not size: the live bytes and the request fit the device
    # with megabytes to spare, but the free bytes held sit beside live blocks (not
    # releasable, not usable by the other pool) and the device has no room for a segment
    assert s["oom_count"] == 1 and s["retry_count"] >= 1 and s["releasable"] == 0
    assert s["allocated"] + request < CAP - 4 * MiB and s["inactive_split"] > 4 * MiB


def test_changing_sizes_fit_after_prewarm():
    a = _native.AllocSim(CAP)
    with vg.reserve_for(SIZES, cost=run_cost(), allocator=a) as n:
        assert n >= max(TEMP * w * h + TEMP2 * w * h for w, h in SIZES)
        assert a.stats()["segments"] == 1 and a.stats()["releasable"] >= n  # one cached block
        kept = run_sequence(a, SIZES)
    s = a.stats()
    large = [size for pool, size, _ in a.segments() if pool == "large"]
    assert s["oom_count"] == 0 and large == [n // (2 * MiB) * (2 * MiB) + (2 * MiB if n % (2 * MiB) else 0)]
    assert len(kept) == 3  # every activation carved from the prewarmed block (results <= 1 MiB: small pool)


def test_expandable_segments_do_not_fragment():
    a = _native.AllocSim(CAP, expandable_segments=True)
    run_sequence(a, SIZES)
    assert a.stats()["oom_count"] == 0


def test_prewarm_that_does_not_fit():
    a = _native.AllocSim(8 * MiB)
    assert vg.prewarm(SIZES, cost=run_cost(), allocator=a) == 0  # advisory: logged, not raised
    with pytest.raises(MemoryError):
        vg.prewarm(SIZES, cost=run_cost(), allocator=a, strict=True)


@pytest.mark.parametrize("bad,exc", [([(0, 5)], ValueError), ([(5,)], ValueError), ([("a", 1)], TypeError),
                                     (object(), TypeError), (-1, ValueError), (True, TypeError)])
def test_prewarm_rejects(bad, exc):
    with pytest.raises(exc):
        vg.prewarm(bad, allocator=_native.AllocSim(MiB))


# ------------------------------------------------------------------ snapshot and GC policy
def frag_fields(**kw):
    base = {"total": 1000 * MiB, "free": 100 * MiB, "used": 900 * MiB, "evictable": 300 * MiB,
            "reserve": 0, "largest_free_block": 20 * MiB}
    base.update(kw)
    return base


def test_policy_fragmentation_reason():
    p = _native.Policy(threshold=99)
    # budget 400 MiB covers 150 MiB, but no block that large can be had: free 100, largest 20
    assert p.decide(frag_fields(), need=150 * MiB) == (True, "fragmentation")
    # a cached block big enough, or free device memory: no obstacle
    assert p.decide(frag_fields(largest_free_block=200 * MiB), need=150 * MiB)[1] == "below-threshold"
    assert p.decide(frag_fields(free=160 * MiB), need=150 * MiB)[1] == "below-threshold"
    # the reserve is not to be had
    assert p.decide(frag_fields(free=160 * MiB, reserve=20 * MiB), need=150 * MiB)[1] == "fragmentation"
    # unknown largest block (no allocator figures): the rule cannot apply
    assert p.decide(frag_fields(largest_free_block=None), need=150 * MiB)[1] == "below-threshold"
    # over budget: that rule wins and says so
    assert p.decide(frag_fields(), need=500 * MiB) == (True, "budget")
    assert p.decide(frag_fields(), need=0)[1] == "below-threshold"


def test_snapshot_fields_roundtrip_and_validation():
    vg.simulate("1GB", "0")
    a = vg.simulate_allocator(0, expandable_segments=True)
    try:
        h = a.malloc(5 * MiB)
        s = vg.snapshot(0)
        assert s.expandable_segments is True and s.inactive_split is not None
        assert vg.budget_of(s) == s.budget
        d = vg.snapshot_dict(s)
        assert d["largest_free_block"] == s.largest_free_block
        a.free(h)
    finally:
        vg.clear_allocators()
    p = _native.Policy()
    for bad in ({"expandable_segments": "yes"}, {"expandable_segments": 2}, {"largest_free_block": -5},
                {"inactive_split": "1"}):
        with pytest.raises((TypeError, ValueError)):
            p.decide(frag_fields(**bad))


def test_policy_check_on_a_fragmented_simulated_device():
    vg.simulate("200MB", "0")
    a = vg.simulate_allocator(0)
    try:
        pins, bigs = [], []
        for _ in range(8):  # eight 20 MiB segments, each pinned by a 2 MiB block
            pins.append(a.malloc(2 * MiB))
            bigs.append(a.malloc(17 * MiB))
        a.free(a.malloc(30 * MiB))  # one whole free 30 MiB segment in the cache
        for h in bigs:
            a.free(h)
        s = vg.snapshot(0)
        assert s.free == 10 * MiB and s.largest_free_block == 30 * MiB and s.inactive_split == 8 * 18 * MiB
        need = 35 * MiB  # in the budget, but in no block and not in free device memory
        assert s.free < need <= s.budget
        p = _native.Policy(threshold=99, min_interval=0)
        assert p.check(0, False, need)[:2] == (True, "fragmentation")
        assert a.empty_cache() == 30 * MiB  # what the collection does: whole free segments go back
        assert p.check(0, False, need)[:2] == (False, "below-threshold")
        a.malloc(need)
        assert a.stats()["retry_count"] == 0 and a.stats()["oom_count"] == 0
    finally:
        vg.clear_allocators()


# ------------------------------------------------------------------ the torch probe's figures
def test_probe_figures_from_memory_stats():
    st = {"reserved_bytes.all.current": 100, "allocated_bytes.all.current": 60, "active_bytes.all.current": 60,
          "num_ooms": 2, "num_alloc_retries": 3, "inactive_split_bytes.all.current": 25}
    f = torch_adapter.figures(st, env={})
    assert f["inactive_split"] == 25 and f["expandable_segments"] is False and f["oom_count"] == 2


@pytest.mark.parametrize("env,on", [({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
                                    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"}, True),
                                    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False),
                                    ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, True),
                                    ({"PYTORCH_CUDA_ALLOC_CONF": "garbage"}, False), ({}, False)])
def test_expandable_from_env(env, on):
    assert torch_adapter.expandable_segments(env) is on


def test_largest_free_block_from_memory_snapshot():
    segs = [{"blocks": [{"size": 10, "state": "active_allocated"}, {"size": 30, "state": "inactive"}]},
            {"blocks": [{"size": 50, "state": "inactive"}, {"size": 70, "state": "active_pending_free"}]}]
    assert torch_adapter.largest_free_block(segs) == 50
    assert torch_adapter.largest_free_block([]) == 0


# ------------------------------------------------------------------ torch's real allocator
def _cuda():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the real-allocator version runs on a GPU only")
    return torch


class TorchAlloc:
    """The same sequence through torch's caching allocator, capped to CAP above what is held."""

    def __init__(self, torch):
        self.torch, self.live = torch, {}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(0) + CAP) / total, 0)

    def malloc(self, n):
        try:
            t = self.torch.empty(n, dtype=self.torch.uint8, device="cuda:0")
        except self.torch.cuda.OutOfMemoryError as e:
            raise MemoryError(str(e)) from None
        self.live[t.data_ptr()] = t
        return t.data_ptr()

    def free(self, h):
        del self.live[h]

    def close(self):
        self.live.clear()
        self.torch.cuda.empty_cache()
        self.torch.cuda.set_per_process_memory_fraction(1.0, 0)


def test_real_allocator_changing_sizes():
    torch = _cuda()
    a = TorchAlloc(torch)
    try:
        with pytest.raises(MemoryError):
            run_sequence(a, SIZES)
    finally:
        a.close()
    a = TorchAlloc(torch)
    try:
        vg.prewarm(SIZES, cost=run_cost(), device=0, strict=True)
        run_sequence(a, SIZES)
        s = vg.snapshot(0)
        assert s.inactive_split is not None and s.expandable_segments is not None
    finally:
        a.close()


def test_status_shows_fragmentation():
    from vramguard import cli

    vg.simulate("1GB", "0")
    a = vg.simulate_allocator(0)
    try:
        keep = a.malloc(2 * MiB)
        a.free(a.malloc(3 * MiB))
        text = cli.status_text(cli.status_data())
        flat = " ".join(text.split())  # wrapped at 80 columns
        assert "GPU 0: fragmentation: 18.00 MiB in inactive splits, largest free block 18.00 MiB" in flat
        assert "expandable_segments off" in flat and all(len(line) <= 80 for line in text.splitlines())
        a.free(keep)
    finally:
        vg.clear_allocators()
    vg.simulate_clear()
    vg.simulate("1GB", "0")  # no allocator model: nothing to say
    assert "fragmentation" not in cli.status_text(cli.status_data())


def test_gc_check_releases_a_fragmented_cache_and_logs_it(tmp_path):
    """The whole path on a simulated card with the allocator model: vg.gc_check(stage, need=N)
    decides "fragmentation", the GC's own release empties the allocator's whole free segments
    (what torch.cuda.empty_cache does on a real card), the next allocation of N succeeds without a
    retry, and the GC line carries the split bytes and the largest block."""
    import json

    vg.simulate("200MB", "0")
    a = vg.simulate_allocator(0)
    log = tmp_path / "gc.jsonl"
    g = vg.configure_gc(threshold=99, min_interval=0, log_file=str(log))
    try:
        pins, bigs = [], []
        for _ in range(8):
            pins.append(a.malloc(2 * MiB))
            bigs.append(a.malloc(17 * MiB))
        a.free(a.malloc(30 * MiB))
        for h in bigs:
            a.free(h)
        need = 35 * MiB
        held = a.stats()["reserved"]
        d = vg.gc_check("vae_decode", need=need, device=0)
        assert (d.collect, d.reason) == (True, "fragmentation")
        assert held - a.stats()["reserved"] == 30 * MiB  # the whole free segment went back
        a.malloc(need)
        assert a.stats()["retry_count"] == 0 and a.stats()["oom_count"] == 0
        rec = json.loads(log.read_text().splitlines()[-1])
        assert rec["reason"] == "fragmentation"
        assert rec["gc"]["split"] == round(8 * 18 * MiB / (1 << 30), 2) and "largest_free" in rec["gc"]
    finally:
        g.set_log_file(None)
        vg.configure_gc(threshold=70, min_interval=0.0)
        vg.clear_allocators()
