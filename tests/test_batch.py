"""Batches (issue 16): the batch size from the budget, the batch guard (an OOM injected at
every item index still returns every item, in order, equal to the unguarded result), the
guard on the caching-allocator model, the batch nodes, and the guard on torch's real
allocator where a GPU is present."""
import numpy as np
import pytest

import vramguard as vg
from vramguard import _native, batch

MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_allocators():
    vg.clear_allocators()
    yield
    vg.clear_allocators()


# ------------------------------------------------------------------ batch size from the budget
def test_batch_size_from_cost_model():
    c = vg.CostModel(100 * MiB, 64.0)
    # (1 GiB - 100 MiB) // (64 x 512 x 512 = 16 MiB) = 57
    assert vg.batch_size(512, 512, cost=c, budget="1GB") == (1024 - 100) // 16
    assert vg.batch_size(512, 512, cost=c, budget="1GB", max_batch=8) == 8
    assert vg.batch_size(512, 512, cost=c, budget=100 * MiB) == 0          # not even one
    assert vg.batch_size(512, 512, cost=c, budget=116 * MiB) == 1
    assert vg.batch_size(per_item=3 * MiB, budget=10 * MiB) == 3


def test_batch_size_from_the_snapshot_budget():
    vg.simulate("8GB", "2GB")
    vg.set_reserve("1GB")
    assert vg.batch_size(per_item="1GB", device=0) == 5
    assert vg.batch_size(per_item="1GB", device=0, reserve="3GB") == 3
    assert vg.batch_size(per_item="1GB", card="4GB") == 4
    assert vg.batch_size(1024, 1024) == vg.batch_size(1024, 1024, cost=vg.default_cost(), device=0)


@pytest.mark.parametrize("kw,exc", [({}, TypeError), ({"per_item": -1}, ValueError), ({"per_item": "x"}, ValueError),
                                    ({"per_item": 1, "max_batch": 0}, ValueError),
                                    ({"per_item": 1, "max_batch": True}, TypeError),
                                    ({"width": 0, "height": 5}, ValueError), ({"width": 5.5, "height": 5}, TypeError),
                                    ({"width": 5, "height": 5, "per_item": 1}, ValueError),
                                    ({"width": 5, "height": 5, "cost": "big"}, TypeError)])
def test_batch_size_rejects(kw, exc):
    with pytest.raises(exc):
        vg.batch_size(budget="1GB", **kw)


# ------------------------------------------------------------------ the guard
def work(chunk):
    """Per-item work with a result that depends on the item only (what the guard must keep)."""
    return np.sin(np.asarray(chunk, dtype=np.float64) * 1.7)[:, None] * np.arange(1, 4)


class InjectOOM:
    """fn raising MemoryError the first time a chunk contains item `at`."""

    def __init__(self, fn, at):
        self.fn, self.at, self.fired, self.calls = fn, at, False, []

    def __call__(self, chunk):
        ids = [int(x) for x in np.asarray(chunk).ravel()[:: max(1, np.asarray(chunk).size // len(chunk))]]
        self.calls.append(len(chunk))
        if not self.fired and self.at in ids:
            self.fired = True
            raise MemoryError(f"injected at item {self.at}")
        return self.fn(chunk)


@pytest.mark.parametrize("n", [1, 7, 16])
def test_oom_at_every_item_index_keeps_every_item_in_order(n):
    items = np.arange(n) * 3 + 1
    want = work(items)  # the unguarded result
    for at in items:
        fn = InjectOOM(work, int(at))
        st = {}
        got = vg.guarded_batch(fn, items, stats=st, release=lambda: None)
        np.testing.assert_array_equal(got, want)
        assert st["ooms"] == 1 and st["items"] == n
        assert fn.calls[0] == n and st["chunk"] == max(1, n // 2)  # all at once, then halved once
        assert sum(fn.calls) - fn.calls[0] == n  # the failed chunk is redone, nothing twice


def test_oom_every_time_halves_down_to_one_and_keeps_finished():
    items = list(range(13))
    seen = []

    def fn(chunk):
        if len(chunk) > 2:
            raise MemoryError("too big")
        seen.extend(chunk)
        return [x * x for x in chunk]

    st = {}
    assert vg.guarded_batch(fn, items, chunk=13, stats=st, release=lambda: None) == [x * x for x in items]
    assert seen == items and st["ooms"] == 3 and st["chunk"] == 1  # 13 -> 6 -> 3 -> 1
    assert st["first_chunk"] == 13


def test_oom_at_chunk_one_propagates_with_stats():
    released = []

    def fn(chunk):
        raise MemoryError("never fits")

    st = {}
    with pytest.raises(MemoryError, match="never fits") as ei:
        vg.guarded_batch(fn, [1, 2, 3, 4], stats=st, release=lambda: released.append(1))
    # 4 -> 2 -> 1 -> 1 again after the release -> give up
    assert ei.value.__traceback__ is not None and st["ooms"] == 4 and st["chunk"] == 1 and len(released) == 4


def test_other_errors_propagate_unchanged():
    def fn(chunk):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        vg.guarded_batch(fn, [1, 2])
    with pytest.raises(ValueError, match="returned 1 results for a chunk of 2"):
        vg.guarded_batch(lambda c: [0], [1, 2])
    with pytest.raises(ValueError, match="returned int"):
        vg.guarded_batch(lambda c: 5, [1, 2])


def test_custom_oom_test_and_sequences():
    class Boom(Exception):
        pass

    state = {"n": 0}

    def fn(chunk):
        state["n"] += 1
        if state["n"] == 1:
            raise Boom()
        return tuple(str(x) for x in chunk)

    assert vg.guarded_batch(fn, ("a", "b", "c"), is_oom=lambda e: isinstance(e, Boom)) == ["a", "b", "c"]
    assert vg.guarded_batch(lambda c: c, []) == []


@pytest.mark.parametrize("kw,exc", [({"fn": 5}, TypeError), ({"items": "abc"}, TypeError), ({"items": 5}, TypeError),
                                    ({"items": {"a": 1}}, TypeError), ({"chunk": 0}, ValueError),
                                    ({"chunk": 1.5}, TypeError), ({"stats": []}, TypeError),
                                    ({"is_oom": 3}, TypeError), ({"release": "x"}, TypeError),
                                    ({"allocator": object()}, TypeError), ({"per_item": -5}, ValueError)])
def test_guard_rejects(kw, exc):
    args = {"fn": lambda c: c, "items": [1, 2]}
    args.update(kw)
    with pytest.raises(exc):
        vg.guarded_batch(args.pop("fn"), args.pop("items"), **args)


def test_torch_tensors_join_on_axis_0():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = torch.arange(10.0).reshape(5, 2)
    sizes = []

    def fn(t):
        sizes.append(len(t))
        if len(t) > 2:
            raise torch.cuda.OutOfMemoryError("fake")  # torch's own OOM type, recognised
        return t * 2

    got = vg.guarded_batch(fn, x, release=lambda: None)
    assert torch.equal(got, x * 2) and sizes == [5, 2, 2, 1]


# ------------------------------------------------------------------ on the caching-allocator model
def test_guard_on_the_allocator_model_chunk_from_budget():
    vg.simulate("1GB", "0")
    a = vg.simulate_allocator(0)
    each = 40 * MiB
    items = np.arange(60)
    fn = batch.simulated_fn(a, each, work)
    st = {}
    got = vg.guarded_batch(fn, items, per_item=each, device=0, stats=st)
    np.testing.assert_array_equal(got, work(items))
    assert st["first_chunk"] == (1 << 30) // each and st["ooms"] == 0  # the budget's chunk fits
    assert a.stats()["oom_count"] == 0


def test_guard_on_the_allocator_model_halves_a_chunk_too_big():
    a = _native.AllocSim(1 << 30)
    items = np.arange(60)
    fn = batch.simulated_fn(a, 40 * MiB, work)
    st = {}
    got = vg.guarded_batch(fn, items, chunk=60, allocator=a, stats=st)
    np.testing.assert_array_equal(got, work(items))
    assert st["ooms"] >= 1 and st["chunk"] * 40 * MiB <= 1 << 30 and a.stats()["oom_count"] == st["ooms"]


def test_host_device_has_nothing_to_warm():
    assert vg.prewarm("1GB", device="host") == 0
    assert vg.guarded_batch(lambda c: c, [1, 2], device="host", per_item=1, budget="1GB") == [1, 2]
    with pytest.raises(TypeError, match="device"):
        vg.prewarm("1GB", device="gpu0")


def test_prewarm_chunk_reserves_before_the_first_chunk():
    a = _native.AllocSim(1 << 30)
    vg.guarded_batch(batch.simulated_fn(a, 10 * MiB), list(range(8)), per_item=10 * MiB, budget="1GB",
                     allocator=a, prewarm_chunk=True)
    s = a.stats()
    assert s["segment_allocs"] == 1 and s["reserved"] == 80 * MiB  # one block, reused by the chunk


def test_simulated_fn_rejects():
    with pytest.raises(TypeError):
        batch.simulated_fn(object(), 1)
    with pytest.raises(ValueError):
        batch.simulated_fn(_native.AllocSim(MiB), -1)


def test_tiled_many_prewarms_the_largest():
    vg.simulate("1GB", "0")
    a = vg.simulate_allocator(0)
    imgs = [np.zeros((1, 16, 24, 3), np.float32), np.zeros((1, 40, 32, 3), np.float32)]
    out = vg.tiled_many(lambda t: t, imgs, device=0, overlap=0, min_tile=8)
    assert [o.shape for o in out] == [i.shape for i in imgs]
    s = a.stats()
    assert s["segment_allocs"] == 1 and s["num_malloc"] == 1 and s["reserved"] > 0


# ------------------------------------------------------------------ nodes
def test_batch_nodes_registered_and_thin():
    pytest.importorskip("torch", reason="the nodes exchange torch tensors")
    from vramguard_nodes import pack

    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    for key, name in (("VramguardBatchSizeAuto", "Batch Size (auto)"),
                      ("VramguardVAEDecodeBatched", "VAE Decode (batch guard)"),
                      ("VramguardReserveForLargest", "Reserve for Largest")):
        assert names[key] == name
    vg.simulate("8GB", "0")
    n, info = pack.BatchSizeAuto().execute(512, 512, 64, -1.0)
    assert 1 <= n <= 64 and "default cost model" in info


def test_memory_snapshot_node_shows_fragmentation():
    pytest.importorskip("torch", reason="the nodes exchange torch tensors")
    from vramguard_nodes import pack

    vg.simulate("1GB", "0")
    a = vg.simulate_allocator(0)
    keep = a.malloc(2 * MiB)
    a.free(a.malloc(3 * MiB))
    text = pack.MemorySnapshot().execute(0)["result"][0]
    assert "inactive splits" in text and "largest free block   18.00 MiB" in text and "expandable segments  off" in text
    a.free(keep)


def test_vae_decode_batched_node_on_a_fake_vae():
    torch = pytest.importorskip("torch", reason="the nodes exchange torch tensors")
    from vramguard_nodes import pack

    class FakeVAE:
        device, vae_dtype = torch.device("cpu"), torch.float32

        def __init__(self):
            self.calls = []

        def memory_used_decode(self, shape, dtype):
            return 1 << 30  # one item costs 1 GiB

        def decode(self, z):
            self.calls.append(z.shape[0])
            if z.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("fake OOM")
            return (z[:, :3] * 2).movedim(1, -1).repeat_interleave(8, 1).repeat_interleave(8, 2)

    vg.simulate("8GB", "0")
    vae = FakeVAE()
    z = torch.randn(7, 4, 5, 6)
    (img,) = pack.VAEDecodeBatched().execute({"samples": z}, vae, -1.0)
    want = (z[:, :3] * 2).movedim(1, -1).repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert torch.equal(img, want)
    assert vae.calls == [7, 3, 1, 1, 1, 1, 1, 1, 1]  # 8 GiB at 1 GiB an item: all 7, then 3, then 1s


def test_reserve_for_largest_node_without_gpu():
    pytest.importorskip("torch", reason="the nodes exchange torch tensors")
    from vramguard_nodes import pack

    marker = object()
    out = pack.ReserveForLargest().execute(1360, 1536, 2, marker)
    assert out[0] is marker and out[1] == 0  # CPU: nothing to warm


# ------------------------------------------------------------------ torch's real allocator
def test_guard_on_the_real_allocator():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the real-allocator version runs on a GPU only")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = 256 * MiB
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(0) + cap) / total, 0)
    try:
        items = torch.arange(64.0, device="cuda:0")

        def fn(chunk):
            scratch = torch.empty(len(chunk) * 32 * MiB, dtype=torch.uint8, device="cuda:0")  # noqa: F841
            return chunk * 3

        st = {}
        got = vg.guarded_batch(fn, items, stats=st)
        assert torch.equal(got, items * 3) and st["ooms"] >= 1 and st["chunk"] * 32 * MiB <= cap
        assert vg.prewarm(128 * MiB, device=0, strict=True) == 128 * MiB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
