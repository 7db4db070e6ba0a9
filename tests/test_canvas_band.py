"""Canvas.put_band (a row of tiles blended row by row: the output written in address order) and
the prefault thread (a fresh output's pages faulted in ahead of the tiles).  put_band must give
exactly what put() of each tile in order gives, refuse hostile input with errors naming the item,
and tiled(band=...) must never band results that fn may overwrite."""
import os
import resource
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import vramguard as vg
from vramguard import _native


def grid_items(rng, layout, dt, B, H, W, C, cols, rows, ov, strided=False):
    """Tiles of a cols x rows grid with overlap ov, random values and smoothstep-like ramps:
    a list of bands, each a list of put() argument tuples."""
    xs = np.linspace(0, W - W // cols - ov, cols).astype(int) if cols > 1 else [0]
    ys = np.linspace(0, H - H // rows - ov, rows).astype(int) if rows > 1 else [0]
    tw, th = (W // cols + ov if cols > 1 else W), (H // rows + ov if rows > 1 else H)
    bands = []
    for j, y in enumerate(ys):
        band = []
        for i, x in enumerate(xs):
            w, h = min(tw, W - x), min(th, H - y)
            shape = (B, h, w, C) if layout == "nhwc" else (B, C, h, w)
            rdt = rng.choice([dt, np.float32, np.float16])
            if strided:  # a movedim view, as the upscale node hands over
                base = rng.uniform(-1, 1, (B, C, h, w) if layout == "nhwc" else (B, h, w, C)).astype(rdt)
                res = base.transpose(0, 2, 3, 1) if layout == "nhwc" else base.transpose(0, 3, 1, 2)
            else:
                res = rng.uniform(-1, 1, shape).astype(rdt)
            xr = [] if i == 0 else [(float(x), float(xs[i - 1] + tw), True)]
            if i + 1 < len(xs):
                xr.append((float(xs[i + 1]), float(x + w), False))
            yr = [] if j == 0 else [(float(y), float(ys[j - 1] + th), True)]
            if j + 1 < len(ys):
                yr.append((float(ys[j + 1]), float(y + h), False))
            band.append((res, 0, int(x), int(y), xr, yr))
        bands.append(band)
    return bands


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dt", [np.float32, np.float16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("isa", _native.Canvas.isas())
def test_put_band_equals_puts_in_order_bit_for_bit(layout, dt, threads, strided, isa):
    rng = np.random.default_rng(threads * 7 + (dt == np.float16) + 3 * strided)
    B, H, W, C = 2, 61, 397, 3         # rows of > 1 KiB: the copy kernels' vector loops run
    shape = (B, H, W, C) if layout == "nhwc" else (B, C, H, W)
    bands = grid_items(rng, layout, dt, B, H, W, C, cols=4, rows=3, ov=9, strided=strided)
    a = _native.Canvas(np.empty(shape, dt), layout, threads, isa=isa)
    b = _native.Canvas(np.empty(shape, dt), layout, threads, isa=isa)
    for band in bands:
        for it in band:
            a.put(*it)
        b.put_band(band)
    assert a.puts == b.puts == sum(len(x) for x in bands)
    np.testing.assert_array_equal(a.finish(), b.finish())


def test_put_band_with_a_gap_tracks_coverage_exactly():
    """Tiles left of the written prefix leave a gap: put_band switches to exact coverage as the
    puts would, and finish() names the gap until a later put fills it."""
    out = np.empty((1, 8, 12, 1), np.float32)
    cv = _native.Canvas(out, threads=2)
    one = np.ones((1, 8, 4, 1), np.float32)
    cv.put_band([(one, 0, 0, 0, [], []), (one * 3, 0, 8, 0, [], [])])   # [4, 8) never written
    with pytest.raises(RuntimeError, match=r"pixel \(x=4, y=0\)"):
        cv.finish()
    cv.put(one * 2, 0, 4, 0, [], [])
    r = cv.finish()
    np.testing.assert_array_equal(r[0, :, :, 0], np.repeat([[1] * 4 + [2] * 4 + [3] * 4], 8, 0))


@pytest.mark.parametrize("items,exc,match", [
    ("notalist", TypeError, "list or tuple"),
    (None, TypeError, "list or tuple"),
    ([], ValueError, "1..4096"),
    ([[1, 2]], TypeError, "band item 0 must be a tuple"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0, 0, [], []), "x"], TypeError, "band item 1 must be a tuple"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0, 0, [], []), (np.ones((1, 4, 4, 1), np.float32), 0, 4, 2**63, [],
                                                             [])], ValueError, r"band item 1: y offset"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0, 0, [], []), (np.ones((1, 4, 4, 1), np.float32), 0, 4, 2, [], [])],
     ValueError, r"band item 1: a band's tiles share"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0, 0, [], []), (np.ones((1, 3, 4, 1), np.float32), 0, 4, 0, [], [])],
     ValueError, r"band item 1: a band's tiles share"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0, 0, [], []), (np.ones((1, 4, 9, 1), np.float32), 0, 4, 0, [], [])],
     ValueError, r"band item 1: result of 1 image\(s\) 9x4 px"),
    ([(np.ones((1, 4, 4, 1), np.float64), 0, 0, 0, [], [])], TypeError, r"band item 0: result must be float32"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0, 0, [(float("nan"), 1.0, True)], [])], ValueError,
     r"band item 0: xramps\[0\] has a non-finite bound"),
    ([(np.ones((1, 4, 4, 1), np.float32), 0, 0)], TypeError, r"band item 0: put\(\) takes exactly 6"),
])
def test_put_band_hostile_items_are_clear_errors_and_change_nothing(items, exc, match):
    out = np.zeros((1, 8, 12, 1), np.float32)
    cv = _native.Canvas(out, threads=2)
    with pytest.raises(exc, match=match):
        cv.put_band(items)
    assert cv.puts == 0 and (cv.coverage() == 0).all() and (out == 0).all()


def test_put_band_too_many_items():
    cv = _native.Canvas(np.zeros((1, 4, 4, 1), np.float32))
    one = (np.ones((1, 4, 1, 1), np.float32), 0, 0, 0, [], [])
    with pytest.raises(ValueError, match=r"1\.\.4096 tiles, got 4097"):
        cv.put_band([one] * 4097)


def test_put_band_survives_a_callback_that_closes_the_canvas_or_mutates_the_list():
    out = np.zeros((1, 4, 8, 1), np.float32)
    cv = _native.Canvas(out, threads=1)
    tile = np.ones((1, 4, 4, 1), np.float32)
    items = [(tile, 0, 0, 0, [], [])]

    class Evil:
        def __index__(self):
            items.clear()                         # the caller's list: put_band works on a copy
            cv.put(np.ones((1, 4, 8, 1), np.float32), 0, 0, 0, [], [])
            cv.finish()
            return 4

    items.append((tile, 0, Evil(), 0, [], []))
    with pytest.raises(RuntimeError, match="closed"):
        cv.put_band(items)
    with pytest.raises(RuntimeError, match="closed"):
        cv.put_band([(tile, 0, 0, 0, [], [])])


def test_put_band_result_aliasing_the_output_is_read_first():
    rng = np.random.default_rng(3)
    out = rng.uniform(size=(1, 6, 12, 1)).astype(np.float32)
    ref = out.copy()
    cv = _native.Canvas(out, threads=2)
    # tile 1 reads columns [0, 6) of the output while tile 0 writes them
    cv.put_band([(out[:, :, 6:12], 0, 0, 0, [], []), (out[:, :, 0:6], 0, 6, 0, [], [])])
    r = cv.finish()
    np.testing.assert_array_equal(r[0, :, :6, 0], ref[0, :, 6:, 0])
    np.testing.assert_array_equal(r[0, :, 6:, 0], ref[0, :, :6, 0])


# ------------------------------------------------------------------ tiled(band=...)
def _tiled_pair(fn, band, **kw):
    img = np.random.default_rng(1).uniform(size=(1, 96, 160, 3)).astype(np.float32)
    return vg.tiled(fn, img, scale=2, overlap=8, tile=48, min_tile=16, band=band, **kw)


def test_tiled_band_gives_the_same_output():
    def up(t):
        return np.repeat(np.repeat(t, 2, 1), 2, 2) * 0.5 + 0.25
    st_a, st_b = {}, {}
    a = _tiled_pair(up, False, stats=st_a)
    b = _tiled_pair(up, True, stats=st_b)
    assert st_a["tiles"] == st_b["tiles"] > 6
    np.testing.assert_array_equal(a, b)


def test_tiled_never_bands_a_result_fn_may_overwrite():
    """fn returning the same buffer each call (written in place): the default (band=None) must
    stitch each tile before the next call, band=True shows what banding would do to it."""
    buf = {}

    def reusing(t):
        k = t.shape
        if k not in buf:
            buf[k] = np.empty((t.shape[0], t.shape[1] * 2, t.shape[2] * 2, t.shape[3]), np.float32)
        np.copyto(buf[k], np.repeat(np.repeat(t, 2, 1), 2, 2))
        return buf[k]

    def fresh(t):
        return np.repeat(np.repeat(t, 2, 1), 2, 2)

    ref = _tiled_pair(fresh, False)
    np.testing.assert_array_equal(_tiled_pair(reusing, None), ref)
    assert not np.array_equal(_tiled_pair(reusing, True), ref)


@pytest.mark.parametrize("band", [1, "yes", 0.0])
def test_tiled_band_must_be_a_bool_or_none(band):
    with pytest.raises(TypeError, match="band must be True, False or None"):
        _tiled_pair(lambda t: t, band)


def test_tiled_band_with_an_oom_keeps_the_finished_tiles():
    """A back-off in the middle of a band: the band's finished tiles are stitched, the rest is
    re-planned, and the result equals an undisturbed run."""
    calls = {"n": 0}

    def up(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("CUDA out of memory (simulated)")
        return np.repeat(np.repeat(t, 2, 1), 2, 2)

    st = {}
    got = _tiled_pair(up, True, stats=st)
    assert st["retries"] == 1
    img = np.random.default_rng(1).uniform(size=(1, 96, 160, 3)).astype(np.float32)
    np.testing.assert_allclose(got, np.repeat(np.repeat(img, 2, 1), 2, 2), atol=1e-6)


# ------------------------------------------------------------------ the prefault thread
def _minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _populate_write_supported():
    rel = os.uname().release.split(".")
    try:
        return sys.platform == "linux" and (int(rel[0]), int(rel[1].split("-")[0])) >= (5, 14)
    except (ValueError, IndexError):
        return False


@pytest.mark.skipif(not _populate_write_supported(), reason="MADV_POPULATE_WRITE needs Linux >= 5.14")
def test_prefault_thread_faults_a_fresh_output_in_ahead_of_the_tiles():
    """Writing a 64 MiB fresh output takes page faults; with the prefault thread done first it
    takes (almost) none, and the values are those a canvas without it gives."""
    shape = (1, 2048, 2048, 4)
    tile = np.random.default_rng(0).uniform(size=(1, 2048, 2048, 4)).astype(np.float32)
    faults = {}
    for pf in (False, True):
        out = np.empty(shape, np.float32)
        cv = _native.Canvas(out, threads=1, prefault=pf)
        time.sleep(1.0)               # the thread runs while "the model computes"
        f0 = _minflt()
        cv.put(tile, 0, 0, 0, [], [])
        faults[pf] = _minflt() - f0
        np.testing.assert_array_equal(cv.finish(), tile)
    # (under ASan both also count the shadow memory's faults, ~1/8 of the data's pages)
    assert faults[False] >= 8 and faults[True] < 0.6 * faults[False], faults


def test_prefault_canvas_dropped_or_finished_at_once_is_safe():
    """finish() and dealloc stop and join the thread before letting go of out (under ASan a use
    after free would show here); a forked child never joins its parent's thread."""
    code = textwrap.dedent("""
        import gc, os, numpy as np
        from vramguard import _native
        for i in range(30):
            out = np.empty((1, 1024, 2048, 4), np.float32)
            cv = _native.Canvas(out, prefault=True)
            if i % 3 == 0:
                del out, cv                      # dealloc while prefaulting
            elif i % 3 == 1:
                cv.put(np.ones((1, 1024, 2048, 4), np.float32), 0, 0, 0, [], [])
                r = cv.finish(); del cv, out; r[...] = 0; del r
            else:
                gc.collect()
        out = np.empty((1, 1024, 2048, 4), np.float32)
        cv = _native.Canvas(out, prefault=True)
        pid = os.fork()
        if pid == 0:
            cv.put(np.ones((1, 1024, 2048, 4), np.float32), 0, 0, 0, [], [])
            os._exit(0 if float(cv.finish().min()) == 1.0 else 3)
        _, st = os.waitpid(pid, 0)
        cv.put(np.ones((1, 1024, 2048, 4), np.float32), 0, 0, 0, [], [])
        assert cv.finish().min() == 1.0
        print("ok", os.WEXITSTATUS(st))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ok 0" in p.stdout, p.stdout + p.stderr


def test_prefault_argument_whose_truth_raises_is_refused():
    class Bad:
        def __bool__(self):
            raise ValueError("no truth here")
    out = np.empty((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="no truth here"):
        _native.Canvas(out, prefault=Bad())
    assert _native.Canvas(out, prefault=False).puts == 0


# ------------------------------------------------------------------ writing into fresh pages
def _resident(arr_addr, length):
    """mincore() of [arr_addr, arr_addr + length): one bool per page."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGESIZE")
    lo = arr_addr & ~(page - 1)
    n = (arr_addr + length - lo + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * page), vec) == 0, ctypes.get_errno()
    return lo, page, [bool(v & 1) for v in vec]


def _fresh(shape, dtype=np.float32):
    """An array on pages never touched: an anonymous mapping of its own (np.empty may reuse
    malloc's heap)."""
    import mmap
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, n), dtype).reshape(shape)


def _no_huge_pages(arr):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGESIZE")
    lo = arr.ctypes.data & ~(page - 1)
    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(arr.ctypes.data + arr.nbytes - lo), 15)  # NOHUGEPAGE


@pytest.mark.skipif(not _populate_write_supported(), reason="MADV_POPULATE_WRITE needs Linux >= 5.14")
@pytest.mark.parametrize("threads", [1, 2])
def test_a_writer_populates_each_2mib_region_before_its_first_row_there(threads):
    """Before its first row in a 2 MiB region of a fresh output, the writer populates the region:
    its last page first (the kernel zeroes a huge page with the faulting part last, so the rows
    land in cache: that order shows only in bench/tiling.py's timings), then, where no huge page
    came in, the rest, so that no other thread faults there.  Regions no row reaches stay
    untouched.  Seen with 4 KiB pages (huge pages off for this buffer), where only what was
    touched is resident."""
    W, C = 1024, 4                                   # 16 KiB a row: 128 rows a region
    out = _fresh((1, 1024, W, C))                    # 16 MiB
    _no_huge_pages(out)
    cv = _native.Canvas(out, threads=threads, prefault=False)
    base, rowb, region = out.ctypes.data, W * C * 4, 2 << 20
    r0 = (base // region + 1) * region               # the first whole region: [r0, r0 + 2 MiB)
    rows = -(-(r0 - base) // rowb) + 1               # up to its first row, and one row into it
    lo, page, before = _resident(base, out.nbytes)
    second = range((r0 - lo) // page, (r0 + region - lo) // page)
    assert not any(before[i] for i in second)
    cv.put(np.ones((1, rows, W, C), np.float32), 0, 0, 0, [], [])
    _, _, after = _resident(base, out.nbytes)
    missing = [i for i in second if not after[i]]
    assert not missing, f"{len(missing)} of the region's {len(second)} pages not populated"
    far = (r0 + 3 * region - lo) // page             # a region no row reached
    assert not after[far]
    cv.put(np.ones((1, 1024 - rows, W, C), np.float32), 0, 0, rows, [], [])
    np.testing.assert_array_equal(cv.finish(), 1.0)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("threads", [2, 3])
def test_fresh_output_on_threads_equals_a_present_one_on_one_thread(layout, threads):
    """Into pages not yet present the threads take chunks of rows in turn behind one populating
    thread: every row is written once, by one thread, to the same values as one thread writing a
    present output (a row skipped would stay zero, a row written twice would double)."""
    rng = np.random.default_rng(threads)
    B, H, W, C = 2, 700, 1100, 3                     # 18 MiB of float32: regions of 2 MiB
    shape = (B, H, W, C) if layout == "nhwc" else (B, C, H, W)
    bands = grid_items(rng, layout, np.float32, B, H, W, C, cols=3, rows=4, ov=24)
    fresh = _native.Canvas(_fresh(shape), layout, threads, prefault=False)
    present = _native.Canvas(np.full(shape, 7.0, np.float32), layout, 1, prefault=False)
    for band in bands:
        fresh.put_band(band)
        for it in band:
            present.put(*it)
    np.testing.assert_array_equal(fresh.finish(), present.finish())


@pytest.mark.skipif(not _populate_write_supported() or not hasattr(os, "fork"),
                    reason="MADV_POPULATE_WRITE needs Linux >= 5.14; fork needed")
def test_a_region_in_hand_at_fork_is_not_waited_for_in_the_child():
    """A fork while the prefault thread has a region in hand: in the child nobody will finish
    it, so a put there must not wait for it (it waited ~1 s a region before the fix)."""
    code = textwrap.dedent("""
        import os, time, numpy as np
        from vramguard import _native
        shape = (1, 4096, 4096, 4)                           # 256 MiB: ~20 ms of prefaulting
        tile = np.ones(shape, np.float32)
        for i in range(4):
            out = np.empty(shape, np.float32)                # fresh pages (mmap'd: above malloc's threshold)
            cv = _native.Canvas(out, threads=2, prefault=True)
            time.sleep(0.012)                                # 5 ms quiet, then it runs
            pid = os.fork()
            if pid == 0:
                t = time.perf_counter()
                cv.put_band([(tile, 0, 0, 0, [], [])])
                took = time.perf_counter() - t
                ok = float(cv.finish().min()) == 1.0
                os._exit(0 if ok and took < 0.8 else 3)
            _, st = os.waitpid(pid, 0)
            assert os.WEXITSTATUS(st) == 0, ("child put waited", i)
            del cv, out
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr
