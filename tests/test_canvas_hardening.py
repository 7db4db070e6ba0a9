"""Canvas under hostile input: overflowing offsets, re-entrant callbacks, aliased results,
uncovered gaps, odd arrays, threads.  Cases that crashed the old code run in a child process,
so a crash is a failed test here, not a dead test run."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from vramguard import _native

I64 = 2**63 - 1


def run_child(code, timeout=120):
    """Run `code` in a fresh interpreter; return (returncode, output)."""
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout + p.stderr


# ------------------------------------------------------------------ overflow-safe bounds
@pytest.mark.parametrize("b0,ox,oy", [(0, I64, 0), (0, 0, I64), (I64, 0, 0), (0, I64 - 2, 0),
                                      (0, 0, I64 - 3), (I64 - 1, 0, 0), (0, -1, 0), (-1, 0, 0),
                                      (0, 0, -(2**63)), (0, 2**63, 0), (0, 2**64 + 1, 0)])
def test_put_offsets_near_the_int64_limits_are_refused(b0, ox, oy):
    code = f"""
        import numpy as np
        from vramguard import _native
        out = np.zeros((2, 8, 8, 3), np.float32)
        cv = _native.Canvas(out, threads=1)
        try:
            cv.put(np.ones((2, 4, 4, 3), np.float32), {b0}, {ox}, {oy}, (), ())
        except (ValueError, OverflowError) as e:
            print("refused:", e)
        else:
            print("accepted")
        cv.put(np.ones((2, 8, 8, 3), np.float32), 0, 0, 0, (), ())
        assert (cv.finish() == 1).all()
        print("ok")
    """
    rc, out = run_child(code)
    assert rc == 0, out
    assert "refused:" in out and "ok" in out
    assert "offset" in out or "does not fit" in out, out


def test_offset_error_names_the_value():
    cv = _native.Canvas(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=str(I64)):
        cv.put(np.ones((1, 4, 4, 3), np.float32), 0, I64, 0, (), ())
    with pytest.raises(ValueError, match=str(2**64 + 1)):
        cv.put(np.ones((1, 4, 4, 3), np.float32), 0, 2**64 + 1, 0, (), ())
    with pytest.raises(TypeError, match="x offset"):
        cv.put(np.ones((1, 4, 4, 3), np.float32), 0, 1.5, 0, (), ())


# ------------------------------------------------------------------ re-entrancy
REENTRANT = """
    import gc, numpy as np
    from vramguard import _native
    out = np.zeros((1, 64, 64, 3), np.float32)
    cv = _native.Canvas(out, threads=1)
    cv.put(np.ones((1, 64, 64, 3), np.float32), 0, 0, 0, (), ())   # complete: finish() can succeed
    del out
    state = {{"finished": None}}

    def close():
        if state["finished"] is None:
            state["finished"] = cv.finish()
            state["finished"] = None          # drop the last reference to the output
            gc.collect()
            state["finished"] = False

    class Evil:
        def __float__(self):
            close(); return 1.0
        def __index__(self):
            close(); return 0
        def __bool__(self):
            close(); return True

    class EvilSeq:
        def __iter__(self):
            close(); return iter([(1.0, 2.0, True)])

    res = np.ones((1, 64, 64, 3), np.float32)
    try:
        cv.put({call})
    except RuntimeError as e:
        print("refused:", e)
    else:
        print("accepted")
    assert state["finished"] is False, state
    print("ok")
"""


@pytest.mark.parametrize("call", [
    "res, 0, 0, 0, [(Evil(), 2.0, True)], ()",        # __float__ of a ramp bound
    "res, 0, 0, 0, (), [(1.0, Evil(), True)]",
    "res, 0, 0, 0, [(1.0, 2.0, Evil())], ()",         # __bool__ of rising
    "res, 0, 0, 0, EvilSeq(), ()",                    # __iter__ of the ramp sequence
    "res, Evil(), 0, 0, (), ()",                      # __index__ of an offset
    "res, 0, Evil(), 0, (), ()",
    "res, 0, 0, Evil(), (), ()",
])
def test_put_survives_finish_called_while_parsing(call):
    rc, out = run_child(REENTRANT.format(call=call))
    assert rc == 0, out
    assert "refused:" in out and "closed" in out and "ok" in out, out


def test_put_reentered_from_a_ramp_callback_applies_both():
    out = np.zeros((1, 16, 16, 1), np.float32)
    cv = _native.Canvas(out, threads=1)

    class Inner:
        def __float__(self):
            cv.put(np.ones((1, 16, 16, 1), np.float32), 0, 0, 0, (), ())
            return -1.0            # ramp from -1 to 0: weight 1 over the whole tile

    cv.put(np.full((1, 16, 16, 1), 2, np.float32), 0, 0, 0, [(Inner(), 0.0, True)], ())
    assert cv.puts == 2
    np.testing.assert_array_equal(cv.finish(), 3.0)


# ------------------------------------------------------------------ aliasing
@pytest.mark.parametrize("shift", [2, -2])
def test_result_aliasing_the_output_is_read_before_it_is_written(shift):
    rng = np.random.default_rng(5)
    out = rng.random((1, 6, 20, 2), dtype=np.float32)
    before = out.copy()
    cv = _native.Canvas(out, threads=1)
    # result = a view of the output, put two pixels to the right (or left) of where it lives
    x0 = 4
    src = out[:, :, x0:x0 + 10, :]
    ramps = [(0.0, 40.0, True)]                       # weights < 1: the element-wise path
    cv.put(src, 0, x0 + shift, 0, ramps, ())
    w = _native.Canvas.weights(0, 20, ramps).astype(np.float32)
    expect = before.copy()
    xs = np.arange(x0 + shift, x0 + shift + 10)
    expect[:, :, xs, :] = w[xs][None, None, :, None] * before[:, :, x0:x0 + 10, :]
    np.testing.assert_allclose(out[:, :, xs, :], expect[:, :, xs, :], rtol=1e-6)


def test_result_that_is_the_output_itself():
    out = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    before = out.copy()
    cv = _native.Canvas(out)
    cv.put(out[::-1], 0, 0, 0, (), ())                # images swapped, through a reversed view
    np.testing.assert_array_equal(cv.finish(), before[::-1])


# ------------------------------------------------------------------ gaps
def test_finish_refuses_uncovered_gaps_and_names_the_first_pixel():
    out = np.full((2, 4, 10, 3), 7, np.float32)
    cv = _native.Canvas(out)
    cv.put(np.ones((2, 4, 4, 3), np.float32), 0, 6, 0, (), ())   # x 0..5 never covered
    with pytest.raises(RuntimeError, match=r"incomplete.*x=0, y=0.*image 0"):
        cv.finish()
    cv.put(np.ones((2, 4, 3, 3), np.float32), 0, 0, 0, (), ())   # now only x 3..5 are missing
    with pytest.raises(RuntimeError, match=r"x=3, y=0.*image 0"):
        cv.finish()
    np.testing.assert_array_equal(cv.coverage(), 3)
    cv.put(np.full((2, 4, 3, 3), 2, np.float32), 0, 3, 0, (), ())
    res = cv.finish()
    np.testing.assert_array_equal(res[:, :, :3], 1)
    np.testing.assert_array_equal(res[:, :, 3:6], 2)  # the gap was zeroed, then the tile added
    np.testing.assert_array_equal(res[:, :, 6:], 1)


def test_finish_names_a_gap_in_a_later_image_and_row():
    out = np.zeros((3, 5, 6, 1), np.float32)
    cv = _native.Canvas(out)
    cv.put(np.ones((3, 5, 6, 1), np.float32)[:, :, :2], 0, 0, 0, (), ())
    cv.put(np.ones((3, 5, 4, 1), np.float32), 0, 2, 0, (), ())
    cv.put(np.ones((1, 2, 6, 1), np.float32), 2, 0, 3, (), ())     # adds; no gap
    cv2 = _native.Canvas(np.zeros((3, 5, 6, 1), np.float32))
    cv2.put(np.ones((3, 5, 6, 1), np.float32), 0, 0, 0, (), ())
    cv2.finish()
    cv3 = _native.Canvas(np.zeros((3, 5, 6, 1), np.float32))
    cv3.put(np.ones((3, 5, 6, 1), np.float32)[:, :, :3], 0, 0, 0, (), ())
    cv3.put(np.ones((1, 2, 2, 1), np.float32), 1, 4, 3, (), ())
    with pytest.raises(RuntimeError, match=r"x=3, y=0.*image 0"):
        cv3.finish()
    cv3.put(np.ones((3, 5, 3, 1), np.float32), 0, 3, 0, (), ())
    cv3.finish()
    assert cv.finish() is out


# ------------------------------------------------------------------ odd arrays
def test_result_layouts_and_byte_orders_give_correct_results():
    rng = np.random.default_rng(7)
    x = rng.random((2, 9, 11, 3), dtype=np.float32)
    cases = [x.astype(">f4"), np.asfortranarray(x), x[:, :, ::-1][:, :, ::-1], np.ascontiguousarray(x),
             x.astype(np.float16)]
    ro = x.copy()
    ro.flags.writeable = False
    cases.append(ro)
    for c in cases:
        out = np.zeros((2, 9, 11, 3), np.float32)
        cv = _native.Canvas(out)
        cv.put(c, 0, 0, 0, (), ())
        np.testing.assert_allclose(cv.finish(), c.astype(np.float32), rtol=1e-6)


def test_nchw_result_with_strided_channels():
    rng = np.random.default_rng(8)
    x = rng.random((1, 6, 7, 8), dtype=np.float32)[:, ::2]         # channel stride 2
    out = np.zeros((1, 3, 7, 8), np.float32)
    cv = _native.Canvas(out, "nchw")
    cv.put(x, 0, 0, 0, (), ())
    np.testing.assert_array_equal(cv.finish(), x)


@pytest.mark.parametrize("res,exc,match", [
    (np.ones((0, 4, 4, 3), np.float32), ValueError, "empty"),
    (np.ones((1, 0, 4, 3), np.float32), ValueError, "empty"),
    (np.ones((1, 4, 0, 3), np.float32), ValueError, "empty"),
    (np.ones((1, 4, 4, 3), np.float64), TypeError, "float64"),
    (np.ones((1, 4, 4, 3), np.int32), TypeError, "int32"),
    (np.ones((4, 4, 3), np.float32), ValueError, "4-D"),
    (np.ones((1, 4, 4, 2), np.float32), ValueError, "does not fit"),
    ([[[[1.0]]]], TypeError, "numpy"),
])
def test_bad_results_are_clear_errors(res, exc, match):
    cv = _native.Canvas(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(exc, match=match):
        cv.put(res, 0, 0, 0, (), ())


def test_empty_or_changed_output_is_refused():
    with pytest.raises(ValueError, match="empty"):
        _native.Canvas(np.zeros((2**20, 2**20, 0, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        _native.Canvas(np.zeros((1, 0, 4, 3), np.float32))
    out = np.zeros((1, 8, 8, 3), np.float32)
    cv = _native.Canvas(out)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        cv.put(np.ones((1, 8, 8, 3), np.float32), 0, 0, 0, (), ())
    assert (out == 0).all()
    out.flags.writeable = True
    out.shape = (1, 4, 16, 3)
    with pytest.raises(ValueError, match="changed"):
        cv.put(np.ones((1, 8, 8, 3), np.float32), 0, 0, 0, (), ())
    out.shape = (1, 8, 8, 3)
    cv.put(np.ones((1, 8, 8, 3), np.float32), 0, 0, 0, (), ())
    assert cv.finish() is out


def test_weights_far_from_the_origin():
    w = _native.Canvas.weights(I64, 4, [(0.0, 1.0, True)])
    np.testing.assert_array_equal(w, 1.0)
    w = _native.Canvas.weights(-(2**63), 4, [(0.0, 1.0, True)])
    np.testing.assert_array_equal(w, 0.0)


# ------------------------------------------------------------------ threads
def test_concurrent_puts_are_serialised_not_refused():
    out = np.empty((1, 192, 192, 3), np.float32)
    cv = _native.Canvas(out, threads=2)
    tile = np.ones((1, 192, 192, 3), np.float32)
    errors = []
    n_threads, rounds = 8, 25

    def worker():
        for _ in range(rounds):
            try:
                cv.put(tile, 0, 0, 0, (), ())
            except Exception as e:  # noqa: BLE001 — any error is a failure here
                errors.append(repr(e))

    ts = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "deadlock"
    assert errors == []
    assert cv.puts == n_threads * rounds
    np.testing.assert_array_equal(cv.finish(), float(n_threads * rounds))


def test_finish_racing_puts_never_returns_a_half_written_output():
    for _ in range(20):
        out = np.zeros((1, 128, 128, 3), np.float32)
        cv = _native.Canvas(out, threads=2)
        cv.put(np.ones((1, 128, 128, 3), np.float32), 0, 0, 0, (), ())
        got, errs = [], []

        def putter():
            for _ in range(10):
                try:
                    cv.put(np.ones((1, 128, 128, 3), np.float32), 0, 0, 0, (), ())
                except RuntimeError as e:
                    errs.append(str(e))

        def finisher():
            got.append(cv.finish())

        ts = [threading.Thread(target=putter) for _ in range(3)] + [threading.Thread(target=finisher)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts)
        assert all("closed" in e for e in errs)
        snapshot = got[0].copy()
        # after finish() returned, nothing may write into the output any more
        assert (out == snapshot).all() and len(np.unique(snapshot)) == 1
        assert snapshot[0, 0, 0, 0] == cv.puts


def test_thread_hammer_with_many_calls():
    out = np.zeros((2, 64, 64, 3), np.float32)
    cv = _native.Canvas(out, threads=2)
    stop = threading.Event()
    errors = []

    def puts():
        rng = np.random.default_rng(threading.get_ident() % 1000)
        while not stop.is_set():
            x, y = (int(v) for v in rng.integers(0, 48, 2))
            try:
                cv.put(np.ones((2, 16, 16, 3), np.float32), 0, x, y, [(float(x), x + 8.0, True)], ())
                cv.coverage()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    ts = [threading.Thread(target=puts) for _ in range(16)]
    for t in ts:
        t.start()
    threading.Event().wait(1.5)
    stop.set()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts) and errors == []
    assert cv.puts > 16


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_holds_the_canvas_lock():
    """A child forked while a put() holds the canvas's lock must still be able to use it."""
    import time
    import warnings
    out = np.zeros((1, 512, 512, 3), np.float32)
    # one blending thread: ASan's own thread registry is not fork-safe while another thread
    # is creating threads; the canvas lock is held across the blend all the same
    cv = _native.Canvas(out, threads=1)
    tile = np.ones((1, 512, 512, 3), np.float32)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            cv.put(tile, 0, 0, 0, (), ())

    t = threading.Thread(target=busy)
    t.start()
    bad = []
    try:
        for _ in range(30):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover — the child
                try:
                    cv.put(tile, 0, 0, 0, (), ())
                    cv.coverage()
                    os._exit(0 if cv.finish().shape == (1, 512, 512, 3) else 3)
                except BaseException:
                    os._exit(4)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    if os.waitstatus_to_exitcode(status) != 0:
                        bad.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    bad.append("hung")
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        t.join(30)
    assert bad == []
    assert cv.finish() is out
