"""AllocSim, the caching-allocator model (csrc/allocsim.c): PyTorch's rounding, pools,
splits, merges and releases, invariants under random traffic, hostile input, and the
simulated device it drives."""
import random

import pytest

import vramguard as vg
from vramguard import _native

MiB = 1 << 20


def layout(a):
    return [(pool, size, [(off, sz, used) for off, sz, used in blocks]) for pool, size, blocks in a.segments()]


# ------------------------------------------------------------------ torch's rules
@pytest.mark.parametrize("req,block,seg", [
    (1, 512, 2 * MiB), (512, 512, 2 * MiB), (513, 1024, 2 * MiB), (MiB, MiB, 2 * MiB),  # small pool
    (MiB + 1, MiB + 512, 20 * MiB), (9 * MiB, 9 * MiB, 20 * MiB),                      # large, 20 MiB segment
    (10 * MiB, 10 * MiB, 10 * MiB), (11 * MiB + 1, 11 * MiB + 512, 12 * MiB),         # rounded to 2 MiB
])
def test_rounding_and_segment_sizes(req, block, seg):
    a = _native.AllocSim(1 << 30)
    h = a.malloc(req)
    segs = a.segments()
    assert len(segs) == 1 and segs[0][1] == seg
    assert segs[0][0] == ("small" if block <= MiB else "large")
    # the rest is split off only when it is >= 512 B (small) or > 1 MiB (large)
    rest = seg - block
    split = rest >= 512 if block <= MiB else rest > MiB
    assert a.block_size(h) == (block if split else seg)
    s = a.stats()
    assert s["reserved"] == seg and s["allocated"] == a.block_size(h) and s["requested"] == req


def test_split_best_fit_and_merge():
    a = _native.AllocSim(1 << 30)
    x = a.malloc(3 * MiB)   # 20 MiB segment: [x 3 | free 17]
    y = a.malloc(4 * MiB)   # carved from the same segment: [x 3 | y 4 | free 13]
    assert layout(a) == [("large", 20 * MiB, [(0, 3 * MiB, True), (3 * MiB, 4 * MiB, True),
                                              (7 * MiB, 13 * MiB, False)])]
    a.free(x)               # a hole before y: inactive split
    s = a.stats()
    assert s["inactive_split"] == 16 * MiB and s["largest_free_block"] == 13 * MiB
    z = a.malloc(2 * MiB)   # best fit: the 3 MiB hole, not the 13 MiB tail; a 1 MiB rest is not split
    assert layout(a)[0][2][0] == (0, 3 * MiB, True)
    a.free(z)
    z = a.malloc(3 * MiB // 2)  # a 1.5 MiB rest is
    assert layout(a)[0][2][:2] == [(0, 3 * MiB // 2, True), (3 * MiB // 2, 3 * MiB // 2, False)]
    a.free(z)
    a.free(y)               # everything merges back into one free block
    assert layout(a) == [("large", 20 * MiB, [(0, 20 * MiB, False)])]
    assert a.stats()["inactive_split"] == 0 and a.stats()["releasable"] == 20 * MiB


def test_empty_cache_releases_only_whole_free_segments():
    a = _native.AllocSim(1 << 30)
    keep = a.malloc(2 * MiB)
    gone = a.malloc(30 * MiB)  # its own 30 MiB segment
    a.free(gone)
    assert a.stats()["reserved"] == 50 * MiB
    assert a.empty_cache() == 30 * MiB
    s = a.stats()
    assert s["reserved"] == 20 * MiB and s["inactive_split"] == 18 * MiB  # pinned by `keep`
    assert a.empty_cache() == 0
    a.free(keep)
    assert a.empty_cache() == 20 * MiB and a.stats()["reserved"] == 0


def test_oom_retry_and_counters():
    a = _native.AllocSim(40 * MiB)
    h = a.malloc(30 * MiB)
    a.free(h)                       # cached, not released
    g = a.malloc(36 * MiB)          # no block fits, no room: release the cache, retry
    s = a.stats()
    assert s["retry_count"] == 1 and s["oom_count"] == 0 and s["reserved"] == 36 * MiB
    with pytest.raises(MemoryError, match="tried to allocate 8388608 bytes"):
        a.malloc(8 * MiB)
    assert a.stats()["oom_count"] == 1
    a.free(g)
    with pytest.raises(MemoryError):
        a.malloc(40 * MiB + 1)      # more than the device: an OOM, never a wrap-around
    assert a.stats()["oom_count"] == 2


def test_expandable_segments_grow_and_unmap():
    a = _native.AllocSim(64 * MiB, expandable_segments=True)
    assert a.expandable_segments
    x = a.malloc(12 * MiB)
    y = a.malloc(12 * MiB)
    assert a.stats()["reserved"] == 24 * MiB       # pages mapped as needed, no 20 MiB segments
    a.free(x)
    assert a.stats()["reserved"] == 24 * MiB       # freed pages stay mapped (cached)
    assert a.empty_cache() == 12 * MiB             # ... until empty_cache unmaps what no block touches
    big = a.malloc(50 * MiB)                       # the hole plus the tail: no fragmentation OOM
    assert a.stats()["reserved"] == 62 * MiB
    a.free(big), a.free(y)
    a.empty_cache()
    assert a.stats()["reserved"] == 0


# ------------------------------------------------------------------ invariants under random traffic
@pytest.mark.parametrize("expandable", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_invariants(seed, expandable):
    rng = random.Random(seed)
    cap = rng.choice([64, 96, 200]) * MiB
    a = _native.AllocSim(cap, expandable_segments=expandable)
    live = {}
    for _ in range(1500):
        op = rng.random()
        if op < 0.55:
            n = int(rng.choice([rng.randint(1, 4096), rng.randint(1, 2 * MiB), rng.randint(1, 24 * MiB)]))
            try:
                h = a.malloc(n)
                live[h] = n
                assert a.block_size(h) >= n and a.block_size(h) % 512 == 0
            except MemoryError:
                pass
        elif op < 0.95 and live:
            h = rng.choice(list(live))
            a.free(h)
            del live[h]
        else:
            a.empty_cache()
        s = a.stats()
        assert 0 <= s["allocated"] <= s["reserved"] <= cap
        assert s["requested"] == sum(live.values())
        assert s["allocated"] == sum(a.block_size(h) for h in live)
        assert s["live_blocks"] == len(live)
        if not expandable:
            segs = a.segments()
            assert s["reserved"] == sum(size for _, size, _ in segs)
            for _, size, blocks in segs:  # blocks tile the segment; no two free neighbours
                assert blocks[0][0] == 0 and sum(b[1] for b in blocks) == size
                for b0, b1 in zip(blocks, blocks[1:]):
                    assert b0[0] + b0[1] == b1[0] and (b0[2] or b1[2])
            free = [b[1] for _, _, bl in segs for b in bl if not b[2]]
            assert s["largest_free_block"] == max(free, default=0)
            assert s["inactive_split"] + s["releasable"] == sum(free)
    for h in list(live):
        a.free(h)
    a.empty_cache()
    assert a.stats()["reserved"] == 0 and a.stats()["allocated"] == 0


# ------------------------------------------------------------------ hostile input
@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (float("nan"), ValueError), (True, TypeError),
                                     ("1MB", TypeError), (None, TypeError), (2 ** 70, ValueError)])
def test_malloc_rejects_bad_sizes(bad, exc):
    a = _native.AllocSim(64 * MiB)
    with pytest.raises(exc, match="nbytes"):
        a.malloc(bad)
    assert a.stats()["num_malloc"] == 0


def test_huge_requests_are_ooms_not_overflows():
    a = _native.AllocSim(1 << 40)
    for n in (9 * 10 ** 18, (1 << 40) + 1, (1 << 62)):
        with pytest.raises(MemoryError):
            a.malloc(n)
    assert a.stats()["oom_count"] == 3 and a.stats()["reserved"] == 0
    assert a.malloc(0) == 0 and a.free(0) is None  # an empty tensor holds no block


def test_bad_handles():
    a = _native.AllocSim(64 * MiB)
    h = a.malloc(1000)
    a.free(h)
    for bad in (h, h + 1, -5, 2 ** 64, 2 ** 200, 12345):
        with pytest.raises(ValueError, match="not a live block"):
            a.free(bad)
    for bad in (1.0, "x", None, True):
        with pytest.raises(TypeError, match="handle"):
            a.free(bad)
    h2 = a.malloc(1000)           # reuses the slot with a new generation: the old handle stays dead
    assert (h2 & 0xffffffff) == (h & 0xffffffff) and h2 != h
    with pytest.raises(ValueError):
        a.free(h)
    a.free(h2)


@pytest.mark.parametrize("kw,exc", [({}, TypeError), ({"capacity": -1}, ValueError),
                                    ({"capacity": (1 << 40) + 1}, ValueError), ({"capacity": "x"}, TypeError),
                                    ({"capacity": 1, "device": 0}, ValueError),
                                    ({"capacity": 1, "device": True}, TypeError),
                                    ({"capacity": 1, "device": 2 ** 80}, ValueError)])
def test_constructor_rejects(kw, exc):
    with pytest.raises(exc):
        _native.AllocSim(**kw)


# ------------------------------------------------------------------ driving a simulated device
def test_drives_the_simulated_device():
    vg.simulate("1GB", "100MB")
    a = vg.simulate_allocator(0)
    try:
        assert a.capacity == (1 << 30) - 100 * MiB and a.device == 0
        s0 = vg.snapshot(0)
        assert s0.framework_reserved == 0 and s0.inactive_split == 0 and s0.expandable_segments is False
        x = a.malloc(30 * MiB)
        y = a.malloc(5 * MiB)
        a.free(x)
        s = vg.snapshot(0)
        assert s.used == 100 * MiB + 50 * MiB and s.process_used == s.used
        assert s.framework_reserved == 50 * MiB and s.framework_allocated == 5 * MiB
        assert s.largest_free_block == 30 * MiB and s.inactive_split == 15 * MiB
        assert s.evictable == 45 * MiB  # cached bytes are reusable: in the budget
        assert s.budget == s.free + 45 * MiB
        a.free(y)
    finally:
        vg.clear_allocators()


def test_thread_hammer_one_model():
    from concurrent.futures import ThreadPoolExecutor

    a = _native.AllocSim(256 * MiB, expandable_segments=False)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(400):
                if mine and rng.random() < 0.5:
                    a.free(mine.pop(rng.randrange(len(mine))))
                else:
                    try:
                        mine.append(a.malloc(rng.choice([700, 3 * MiB, 12 * MiB])))
                    except MemoryError:
                        pass
                if rng.random() < 0.05:
                    a.empty_cache(), a.stats()
            for h in mine:
                a.free(h)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(worker, range(8)))
    assert not errors
    s = a.stats()
    assert s["allocated"] == 0 and s["live_blocks"] == 0 and s["num_malloc"] == s["num_free"]
    a.empty_cache()
    assert a.stats()["reserved"] == 0
