/* planner.c — plan the largest tile that fits the budget, as an even grid.
 *
 * Owns plan(): given an image, an overlap, an alignment, a cost model (fixed bytes + bytes per
 * input pixel of a tile) and a budget, the fewest tiles that fit; ties go to the smaller tile,
 * then the squarer one.  Positions are spread evenly, multiples of `align`, with every
 * neighbour overlap >= `overlap` and the feather bands of neighbouring pairs disjoint, so the
 * Canvas's 1-D ramps (canvas.c) multiply into weights that sum to one. */
#include "vg.h"

#include <math.h>
#include <string.h>
/* ================================================================ planner */

static int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

/* The tile n evenly spread tiles would need with exactly `ov` overlap (rounded up). */
static int64_t natural_tile(int64_t len, int64_t n, int64_t ov, int64_t align)
{
    return align_up((len + (n - 1) * ov + n - 1) / n, align);
}


/* Positions of n tiles of size t over [0, len): even spread, multiples of `align`, first at
 * 0, last ending at len.  Returns 0 when every neighbour overlap is >= ov and the feather
 * bands of neighbouring pairs do not intersect (each band is the middle `feather` of its
 * overlap), which is what keeps the weights a partition of unity.  A pixel may lie under a
 * third tile, but only where that tile's weight is exactly zero. */
static int axis_positions(int64_t len, int64_t t, int64_t n, int64_t ov, int64_t align, double feather,
                          int64_t *pos)
{
    if (n == 1) {
        pos[0] = 0;
        return t >= len ? 0 : -1;
    }
    if (t > len)
        return -1;
    int64_t span = len - t;
    for (int64_t i = 0; i < n; i++) {
        double ideal = (double)span * (double)i / (double)(n - 1);
        int64_t p = (int64_t)llround(ideal / (double)align) * align;
        if (p > span)
            p = span;
        pos[i] = p;
    }
    pos[n - 1] = span;
    for (int64_t i = 1; i < n; i++)
        if (pos[i] <= pos[i - 1] || pos[i - 1] + t - pos[i] < ov)
            return -1;
    for (int64_t i = 1; i + 1 < n; i++) {
        double l1 = (double)(pos[i - 1] + t - pos[i]), l2 = (double)(pos[i] + t - pos[i + 1]);
        double band1_end = (double)(pos[i - 1] + t) - l1 * (1 - feather) / 2;
        double band2_start = (double)pos[i + 1] + l2 * (1 - feather) / 2;
        if (band1_end > band2_start)
            return -1;
    }
    return 0;
}

/* Smallest tile in [tmin, tmax] (a multiple of align, or the whole length) that covers len
 * with n tiles. */
static int64_t axis_tile(int64_t len, int64_t n, int64_t ov, int64_t align, double feather, int64_t tmin,
                         int64_t tmax, int64_t *pos)
{
    if (n == 1) {
        pos[0] = 0;
        return len <= tmax ? len : -1;
    }
    int64_t t = natural_tile(len, n, ov, align);
    if (t < 2 * ov)
        t = align_up(2 * ov, align);
    if (t < tmin)
        t = align_up(tmin, align);
    for (; t <= tmax && t < len; t += align)
        if (axis_positions(len, t, n, ov, align, feather, pos) == 0)
            return t;
    return -1;
}

typedef struct {
    int64_t w, h, overlap, align, min_tile, max_tile;
    double feather;
    double fixed, per_px; /* bytes; per input pixel of a tile, per image */
    int64_t batch, budget;
} plan_in;

typedef struct {
    int fits;
    int64_t tw, th, nx, ny, batch;
    double peak;
    char why[VG_REASON];
} plan_out;

static double tile_cost(const plan_in *in, int64_t tw, int64_t th, int64_t b)
{
    return in->fixed + in->per_px * (double)tw * (double)th * (double)b;
}

/* Fewest tiles whose size fits the budget; ties go to the smaller tile (less redundant
 * overlap work), then the squarer one.  O(W/align * H/align) at worst, microseconds in
 * practice because both loops stop as soon as tiles get too small. */
static void plan_core(const plan_in *in, plan_out *out, int64_t *xs, int64_t *ys)
{
    memset(out, 0, sizeof *out);
    double room = (double)in->budget - in->fixed;
    double amax = in->per_px > 0 ? room / in->per_px : INFINITY;
    int64_t best = -1, bw = 0, bh = 0, bnx = 0, bny = 0;
    int64_t tmin = in->min_tile;
    for (int64_t nx = 1; nx <= in->w; nx++) {
        int64_t tw = axis_tile(in->w, nx, in->overlap, in->align, in->feather, tmin, in->max_tile, xs);
        if (tw < 0) {
            /* more tiles only shrink the stride further once tiles are at their minimum */
            if (nx > 1 && natural_tile(in->w, nx, in->overlap, in->align) < tmin)
                break;
            continue;
        }
        if (best > 0 && nx > best)
            break;
        double hmax = amax / (double)tw;
        if (hmax < 1)
            continue;
        for (int64_t ny = 1; ny <= in->h; ny++) {
            if (best > 0 && nx * ny > best)
                break;
            int64_t th = axis_tile(in->h, ny, in->overlap, in->align, in->feather, tmin, in->max_tile, ys);
            if (th < 0) {
                if (ny > 1 && natural_tile(in->h, ny, in->overlap, in->align) < tmin)
                    break;
                continue;
            }
            if ((double)th > hmax)
                continue;
            int64_t n = nx * ny, area = tw * th, barea = bw * bh;
            int better = best < 0 || n < best ||
                         (n == best && (area < barea ||
                                        (area == barea && llabs(tw - th) < llabs(bw - bh))));
            if (better)
                best = n, bw = tw, bh = th, bnx = nx, bny = ny;
            break; /* larger ny only adds tiles */
        }
    }
    if (best < 0) {
        double need = tile_cost(in, tmin < in->w ? tmin : in->w, tmin < in->h ? tmin : in->h, 1);
        snprintf(out->why, VG_REASON,
                 "no tile fits: the smallest tile (%lld px, overlap %lld) needs %.0f bytes, "
                 "budget is %lld",
                 (long long)tmin, (long long)in->overlap, need, (long long)in->budget);
        return;
    }
    out->fits = 1;
    out->tw = bw, out->th = bh, out->nx = bnx, out->ny = bny;
    int64_t b = 1;
    if (in->per_px > 0) {
        double per_tile = in->per_px * (double)bw * (double)bh;
        double fitb = floor(room / per_tile);
        b = fitb < 1 ? 1 : (fitb > (double)in->batch ? in->batch : (int64_t)fitb);
    } else {
        b = in->batch;
    }
    out->batch = b;
    out->peak = tile_cost(in, bw, bh, b);
    axis_tile(in->w, bnx, in->overlap, in->align, in->feather, in->min_tile, in->max_tile, xs);
    axis_tile(in->h, bny, in->overlap, in->align, in->feather, in->min_tile, in->max_tile, ys);
}

static int64_t get_pos_int(PyObject *kw_or_val, const char *what, int64_t lo, int64_t hi, int *err)
{
    if (PyBool_Check(kw_or_val) || !PyLong_Check(kw_or_val)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.80s %R", what,
                     Py_TYPE(kw_or_val)->tp_name, kw_or_val);
        *err = 1;
        return 0;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(kw_or_val, &overflow);
    if (overflow || v < lo || v > hi) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s must be %lld..%lld, got %R", what, (long long)lo,
                         (long long)hi, kw_or_val);
        *err = 1;
        return 0;
    }
    return (int64_t)v;
}

static PyObject *list_from(const int64_t *v, int64_t n)
{
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (int64_t i = 0; l && i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (x == NULL) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, x);
    }
    return l;
}

#define VG_MAX_SIDE ((int64_t)1 << 20) /* 1 Mpx per side: beyond any real image */

/* plan(width, height, *, overlap, align, fixed_bytes, per_px_bytes, budget, batch=1,
 *      min_tile=0, max_tile=0) -> dict */
static PyObject *py_plan(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"width", "height", "overlap", "align", "fixed_bytes", "per_px_bytes",
                             "budget", "batch", "min_tile", "max_tile", "feather", NULL};
    PyObject *o[11] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$OOOOOOOOO:plan", kwlist, &o[0], &o[1], &o[2],
                                     &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10]))
        return NULL;
    plan_in in = {.overlap = 0, .align = 1, .batch = 1, .feather = 0.5};
    if (o[10] && (vg_parse_double(o[10], "feather", -1e-300, 1.0, &in.feather) < 0))
        return NULL;
    int err = 0;
    in.w = get_pos_int(o[0], "width", 1, VG_MAX_SIDE, &err);
    if (!err)
        in.h = get_pos_int(o[1], "height", 1, VG_MAX_SIDE, &err);
    if (!err && o[2])
        in.overlap = get_pos_int(o[2], "overlap", 0, VG_MAX_SIDE, &err);
    if (!err && o[3])
        in.align = get_pos_int(o[3], "align", 1, 4096, &err);
    if (!err && o[7])
        in.batch = get_pos_int(o[7], "batch", 1, 1 << 20, &err);
    if (!err && o[8])
        in.min_tile = get_pos_int(o[8], "min_tile", 0, VG_MAX_SIDE, &err);
    in.max_tile = VG_MAX_SIDE;
    if (!err && o[9] && o[9] != Py_None)
        in.max_tile = get_pos_int(o[9], "max_tile", 1, VG_MAX_SIDE, &err);
    if (err)
        return NULL;
    int64_t fixed = 0, per = 0, budget = 0;
    if ((o[4] && vg_parse_bytes(o[4], "fixed_bytes", 1, &fixed) < 0) ||
        (o[5] && vg_parse_bytes(o[5], "per_px_bytes", 1, &per) < 0) ||
        (o[6] == NULL && (PyErr_SetString(PyExc_TypeError, "plan() needs budget="), 1)) ||
        vg_parse_bytes(o[6], "budget", 1, &budget) < 0)
        return NULL;
    in.fixed = (double)fixed;
    in.per_px = o[5] && PyFloat_Check(o[5]) ? PyFloat_AS_DOUBLE(o[5]) : (double)per;
    in.budget = budget;
    if (in.w % in.align || in.h % in.align) {
        PyErr_Format(PyExc_ValueError, "image %lldx%lld is not a multiple of align %lld",
                     (long long)in.w, (long long)in.h, (long long)in.align);
        return NULL;
    }
    if (in.overlap % in.align) {
        PyErr_Format(PyExc_ValueError, "overlap %lld is not a multiple of align %lld",
                     (long long)in.overlap, (long long)in.align);
        return NULL;
    }
    /* two strides must span a tile (no pixel three deep): tile >= 2 * overlap */
    if (in.min_tile < 2 * in.overlap)
        in.min_tile = 2 * in.overlap;
    if (in.min_tile < in.align)
        in.min_tile = in.align;
    in.min_tile = align_up(in.min_tile, in.align);
    if (in.max_tile < in.min_tile && in.max_tile < in.w && in.max_tile < in.h) {
        PyErr_Format(PyExc_ValueError,
                     "max_tile %lld is below the smallest tile %lld that overlap %lld allows",
                     (long long)in.max_tile, (long long)in.min_tile, (long long)in.overlap);
        return NULL;
    }
    int64_t *xs = PyMem_Malloc(sizeof(int64_t) * (size_t)(in.w + in.h + 2));
    if (xs == NULL)
        return PyErr_NoMemory();
    int64_t *ys = xs + in.w + 1;
    plan_out out;
    Py_BEGIN_ALLOW_THREADS
    plan_core(&in, &out, xs, ys);
    Py_END_ALLOW_THREADS
    PyObject *r;
    if (!out.fits) {
        r = Py_BuildValue("{s:O,s:s,s:L,s:L,s:L}", "fits", Py_False, "why", out.why,
                          "budget_bytes", (long long)in.budget, "min_tile", (long long)in.min_tile,
                          "overlap", (long long)in.overlap);
    } else {
        PyObject *lx = list_from(xs, out.nx), *ly = list_from(ys, out.ny);
        /* "O", not "N": Py_BuildValue steals "N" arguments even when it fails, and these
         * lists are released below on every path */
        r = (lx && ly) ? Py_BuildValue(
                             "{s:O,s:(LL),s:(LL),s:L,s:O,s:O,s:d,s:L,s:L,s:L,s:L}", "fits", Py_True,
                             "tile", (long long)out.tw, (long long)out.th, "grid",
                             (long long)out.nx, (long long)out.ny, "tiles",
                             (long long)(out.nx * out.ny), "xs", lx, "ys", ly,
                             "predicted_peak_bytes", out.peak, "budget_bytes",
                             (long long)in.budget, "batch", (long long)out.batch, "overlap",
                             (long long)in.overlap, "min_tile", (long long)in.min_tile)
                       : NULL;
        Py_XDECREF(lx);
        Py_XDECREF(ly);
    }
    PyMem_Free(xs);
    return r;
}

PyMethodDef vg_tiler_methods[] = {
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_VARARGS | METH_KEYWORDS,
     "plan(width, height, *, overlap=0, align=1, fixed_bytes=0, per_px_bytes=0, budget, batch=1, "
     "min_tile=0, max_tile=None, feather=0.5) -> dict"},
    {NULL, NULL, 0, NULL}};
